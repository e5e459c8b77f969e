"""Builds and removes the lab's kernel objects with pyroute2: namespaces, veths, bridge, addresses, routes.

This module is the only owner of the lab's links and routes; it runs no `ip` commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from pyroute2 import NetNS, netns

from agent import netns as nsx
from agent.lab.plan import POD_GATEWAY, LabPlan, NodePlan, PodPlan

BRIDGE = "br0"
# Writable per-netns sysctls a node needs: it forwards pod traffic, and the agent later answers for
# addresses it does not own (TPROXY / sk_assign), which strict reverse-path filtering would drop.
NODE_SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    "net/ipv4/conf/all/rp_filter": "0",
    "net/ipv4/conf/default/rp_filter": "0",
}


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        Path("/proc/sys", key).write_text(value)


def _link_index(ns: NetNS, ifname: str) -> int:
    found = ns.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"link {ifname} not found")
    return int(found[0])


def _add_veth_into(ns: NetNS, local: str, temp_peer: str, peer_netns: str) -> None:
    """Create veth local<->temp_peer in `ns` and move the peer end into `peer_netns`."""
    ns.link("add", ifname=local, kind="veth", peer=temp_peer)
    ns.link("set", index=_link_index(ns, temp_peer), net_ns_fd=peer_netns)


def _bring_up_lo(ns: NetNS) -> None:
    ns.link("set", index=_link_index(ns, "lo"), state="up")


def _create_netns(name: str) -> None:
    if name not in netns.listnetns():
        netns.create(name)


def _build_fabric(plan: LabPlan) -> None:
    _create_netns(plan.fabric_netns)
    with NetNS(plan.fabric_netns) as fab:
        _bring_up_lo(fab)
        fab.link("add", ifname=BRIDGE, kind="bridge")
        idx = _link_index(fab, BRIDGE)
        if plan.mgmt_ip:
            fab.addr("add", index=idx, address=plan.mgmt_ip, prefixlen=plan.node_prefixlen)
        fab.link("set", index=idx, state="up")


def _build_node(plan: LabPlan, node: NodePlan) -> None:
    _create_netns(node.netns)
    with NetNS(plan.fabric_netns) as fab:
        _add_veth_into(fab, node.fabric_ifname, "tmp-" + node.fabric_ifname, node.netns)
        idx = _link_index(fab, node.fabric_ifname)
        fab.link("set", index=idx, master=_link_index(fab, BRIDGE))
        fab.link("set", index=idx, state="up")
    with NetNS(node.netns) as ns:
        _bring_up_lo(ns)
        idx = _link_index(ns, "tmp-" + node.fabric_ifname)
        ns.link("set", index=idx, ifname="eth0")
        ns.addr("add", index=idx, address=node.ip, prefixlen=plan.node_prefixlen)
        ns.link("set", index=idx, state="up")
    nsx.run_in(node.netns, _write_sysctls, NODE_SYSCTLS)


def _build_pod(node: NodePlan, pod: PodPlan) -> None:
    _create_netns(pod.netns)
    temp = "tmp-" + pod.host_ifname
    with NetNS(node.netns) as ns:
        _add_veth_into(ns, pod.host_ifname, temp, pod.netns)
        idx = _link_index(ns, pod.host_ifname)
        ns.addr("add", index=idx, address=POD_GATEWAY, prefixlen=32)
        ns.link("set", index=idx, state="up")
        ns.route("add", dst=f"{pod.ip}/32", oif=idx, scope="link")
    with NetNS(pod.netns) as ns:
        _bring_up_lo(ns)
        idx = _link_index(ns, temp)
        ns.link("set", index=idx, ifname="eth0")
        ns.addr("add", index=idx, address=pod.ip, prefixlen=32)
        ns.link("set", index=idx, state="up")
        ns.route("add", dst=f"{POD_GATEWAY}/32", oif=idx, scope="link")
        ns.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=idx)


def _route_between_nodes(plan: LabPlan) -> None:
    for node in plan.nodes:
        with NetNS(node.netns) as ns:
            for other in plan.nodes:
                if other is not node:
                    ns.route("add", dst=other.pod_cidr, gateway=other.ip)


def build(plan: LabPlan, progress: Callable[[str], None] | None = None) -> None:
    """Create every namespace, link and route of `plan`. The caller removes leftovers on failure."""
    _build_fabric(plan)
    for node in plan.nodes:
        if progress is not None:
            progress(f"{node.name}: namespace {node.netns}, {len(node.pods)} pods")
        _build_node(plan, node)
        for pod in node.pods:
            _build_pod(node, pod)
    _route_between_nodes(plan)


def existing_netns(prefix: str) -> list[str]:
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def pids_in_netns(name: str) -> list[int]:
    """PIDs of processes whose network namespace is `name` (they keep the namespace alive)."""
    try:
        target = os.stat(nsx.path_of(name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def stop_pids(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def remove_netns(names: list[str]) -> None:
    """Stop every process inside the namespaces, then delete them (their links and routes go too)."""
    for name in names:
        stop_pids(pids_in_netns(name))
    for name in names:
        if name in netns.listnetns():
            netns.remove(name)
