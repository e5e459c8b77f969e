"""Capture in a two-node lab: enrolled pods reach the agent's listener with their original destination,
pods that are not enrolled bypass it, STRICT pods fail closed without a listener, replies to the agent's
own (spoofed-source) connections come back to it, and plaintext sent to an enrolled pod goes to :15006."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import pytest

from agent import netns as nsx
from agent.lab.plan import LabPlan
from agent.lab.probe import ECHO_PORT
from agent.netns import NetnsError
from agent.redirect import marks, pins
from tests.integration.redirect.redirect_lab import Agent, Listener, greeting_of

pytestmark = pytest.mark.root


def start_agent(roles: ExitStack, lab: LabPlan, node_name: str) -> Agent:
    node = lab.node(node_name)
    agent = roles.enter_context(Agent(node.netns, node.name, pins.lab_pin_dir(lab.prefix, node.name)))
    agent.call("start")
    return agent


def pod_servers(roles: ExitStack, lab: LabPlan) -> None:
    for pod in lab.pods():
        roles.enter_context(Listener(pod.netns, ECHO_PORT, pod.name, transparent=False))


def test_enrolled_pod_is_captured_with_original_destination(lab: LabPlan) -> None:
    node = lab.node("node-1")
    pod, other, remote = lab.pod("pod-1-1"), lab.pod("pod-1-2"), lab.pod("pod-2-1")
    with ExitStack() as roles:
        pod_servers(roles, lab)
        proxy = roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent"))
        agent = start_agent(roles, lab, node.name)
        agent.call("enroll", pod.ip, "default/pod-1-1", False)
        with pytest.raises(AssertionError, match="not on node node-1"):
            agent.call("enroll", remote.ip, "default/pod-2-1", False)
        with pytest.raises(AssertionError, match="bad pod address"):
            agent.call("enroll", "fd00::1", "default/v6", False)
        assert agent.call("refresh_links") == []  # start() attached every pod link already
        agent.call("attach_pod_link", "vp1")  # idempotent
        with pytest.raises(AssertionError, match="not found"):
            agent.call("attach_pod_link", "nope0")
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == "agent"
        accepted = proxy.accepts()
        assert [(a["peer"][0], tuple(a["orig_dst"])) for a in accepted] == [(pod.ip, (remote.ip, ECHO_PORT))]
        # Not enrolled: straight to the server.
        assert greeting_of(other.netns, remote.ip, ECHO_PORT) == remote.name
        assert proxy.accepts() == []
        counters = agent.call("counters")
        assert counters["outbound_captured"] >= 1  # a retransmitted SYN counts again
        assert counters["not_enrolled_pass"] > 0
        rows = agent.call("rows")
        assert {"kind": "pod", "name": pod.ip, "value": "PERMISSIVE", "detail": "default/pod-1-1"} in rows
        attached = {(r["name"], r["value"]) for r in rows if r["kind"] == "attachment"}
        pod_hooks = {(link, hook) for link in ("vp1", "vp2") for hook in ("pod_ingress", "pod_egress")}
        assert attached == pod_hooks | {("eth0", "uplink_ingress")}
        assert [r["value"] for r in rows if r["kind"] == "routing"] == ["ok"]

        agent.call("stop")
        assert not Path(pins.lab_pin_dir(lab.prefix, node.name)).exists()
        # Detached: the enrolled pod reaches the server directly again.
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == remote.name


def _strict_and_permissive(roles: ExitStack, lab: LabPlan) -> Agent:
    """Servers in every pod; node-1's agent with pod-1-1 enrolled STRICT and pod-1-2 PERMISSIVE."""
    pod_servers(roles, lab)
    agent = start_agent(roles, lab, "node-1")
    agent.call("enroll", lab.pod("pod-1-1").ip, "default/strict", True)
    agent.call("enroll", lab.pod("pod-1-2").ip, "default/permissive", False)
    return agent


def test_strict_pod_fails_closed_without_listener(lab: LabPlan) -> None:
    node = lab.node("node-1")
    strict, permissive, remote = lab.pod("pod-1-1"), lab.pod("pod-1-2"), lab.pod("pod-2-1")
    with ExitStack() as roles:
        agent = _strict_and_permissive(roles, lab)
        with pytest.raises(NetnsError, match="timed out"):
            greeting_of(strict.netns, remote.ip, ECHO_PORT, timeout=1.5)
        assert greeting_of(permissive.netns, remote.ip, ECHO_PORT) == remote.name
        counters = agent.call("counters")
        assert counters["outbound_strict_drop"] >= 1
        assert counters["outbound_permissive_pass"] >= 1
        # The listener appears: both are captured from now on.
        roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent"))
        assert greeting_of(strict.netns, remote.ip, ECHO_PORT) == "agent"
        assert greeting_of(permissive.netns, remote.ip, ECHO_PORT) == "agent"


def test_replies_to_spoofed_agent_connections_reach_the_agent(lab: LabPlan) -> None:
    """A forwarding proxy connects as the client pod (IP_TRANSPARENT + bind(pod ip) + SO_MARK): the
    destination's replies come back on a pod veth (same node) or on the uplink (other node)."""
    node = lab.node("node-1")
    pod, neighbour, remote = lab.pod("pod-1-1"), lab.pod("pod-1-2"), lab.pod("pod-2-1")
    with ExitStack() as roles:
        pod_servers(roles, lab)
        proxy = roles.enter_context(Listener(node.netns, marks.OUTBOUND_PORT, "agent", mode="forward"))
        agent = start_agent(roles, lab, node.name)
        agent.call("enroll", pod.ip, "default/pod-1-1", False)
        assert greeting_of(pod.netns, neighbour.ip, ECHO_PORT) == neighbour.name
        assert greeting_of(pod.netns, remote.ip, ECHO_PORT) == remote.name
        assert {tuple(a["orig_dst"]) for a in proxy.accepts()} == {
            (neighbour.ip, ECHO_PORT),
            (remote.ip, ECHO_PORT),
        }
        assert agent.call("counters")["socket_assigned"] > 0


def test_plaintext_to_enrolled_pod_goes_to_inbound_listener(lab: LabPlan) -> None:
    node = lab.node("node-2")
    target, strict_target, client = lab.pod("pod-2-1"), lab.pod("pod-2-2"), lab.pod("pod-1-2")
    with ExitStack() as roles:
        pod_servers(roles, lab)
        agent = start_agent(roles, lab, node.name)
        agent.call("enroll", target.ip, "default/target", False)
        agent.call("enroll", strict_target.ip, "default/strict-target", True)
        # No inbound listener yet: PERMISSIVE passes in clear, STRICT drops.
        assert greeting_of(client.netns, target.ip, ECHO_PORT) == target.name
        with pytest.raises(NetnsError, match="timed out"):
            greeting_of(client.netns, strict_target.ip, ECHO_PORT, timeout=1.5)
        inbound = roles.enter_context(Listener(node.netns, marks.INBOUND_PLAINTEXT_PORT, "inbound"))
        assert greeting_of(client.netns, target.ip, ECHO_PORT) == "inbound"
        assert greeting_of(client.netns, strict_target.ip, ECHO_PORT) == "inbound"
        # From a pod of the same node that is not enrolled, too.
        agent.call("unenroll", strict_target.ip)
        assert greeting_of(strict_target.netns, target.ip, ECHO_PORT) == "inbound"
        assert [(a["peer"][0], tuple(a["orig_dst"])) for a in inbound.accepts()] == [
            (client.ip, (target.ip, ECHO_PORT)),
            (client.ip, (strict_target.ip, ECHO_PORT)),
            (strict_target.ip, (target.ip, ECHO_PORT)),
        ]
        counters = agent.call("counters")
        assert counters["inbound_captured"] >= 3
        assert counters["inbound_permissive_pass"] >= 1
        assert counters["inbound_strict_drop"] >= 1


def _marked_greeting(ip: str, port: int) -> str:
    """What the agent's upstream connects look like: SO_MARK with the agent's socket mark."""
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, marks.AGENT_SOCKET_MARK)
        conn.settimeout(3.0)
        conn.connect((ip, port))
        return conn.makefile("rb").readline().decode().strip()


def test_strict_pod_refuses_plaintext_from_the_node_itself(lab: LabPlan) -> None:
    """A host-network process crosses neither ingress program: pod_egress drops its SYN into a STRICT pod,
    with or without the agent's listeners; the agent's own (marked) connects and PERMISSIVE pods pass."""
    node = lab.node("node-1")
    strict, permissive = lab.pod("pod-1-1"), lab.pod("pod-1-2")
    with ExitStack() as roles:
        agent = _strict_and_permissive(roles, lab)
        with pytest.raises(NetnsError, match="timed out"):
            greeting_of(node.netns, strict.ip, ECHO_PORT, timeout=1.5)
        roles.enter_context(Listener(node.netns, marks.INBOUND_PLAINTEXT_PORT, "inbound"))
        with pytest.raises(NetnsError, match="timed out"):
            greeting_of(node.netns, strict.ip, ECHO_PORT, timeout=1.5)
        assert greeting_of(node.netns, permissive.ip, ECHO_PORT) == permissive.name
        assert nsx.run_in(node.netns, _marked_greeting, strict.ip, ECHO_PORT) == strict.name
        assert agent.call("counters")["strict_unmediated_drop"] >= 2
        rows = agent.call("rows")
        hooks = {(r["name"], r["value"]) for r in rows if r["kind"] == "attachment"}
        assert {("vp1", "pod_ingress"), ("vp1", "pod_egress")} <= hooks
        agent.call("unenroll", strict.ip)  # not enrolled: the node reaches it as before
        assert greeting_of(node.netns, strict.ip, ECHO_PORT) == strict.name


def test_hbone_to_an_enrolled_pod_goes_to_the_hbone_listener(lab: LabPlan) -> None:
    """<pod ip>:15008 (how ztunnel and ambit dial a pod) reaches the agent's HBONE listener, from another
    node (uplink) and from a local pod that is not enrolled (pod veth); without the listener it is dropped
    even for a PERMISSIVE pod (HBONE bytes never reach the pod's own 15008), while the pod's other ports
    still pass."""
    node = lab.node("node-2")
    target, local_client, client = lab.pod("pod-2-1"), lab.pod("pod-2-2"), lab.pod("pod-1-2")
    with ExitStack() as roles:
        pod_servers(roles, lab)
        roles.enter_context(Listener(target.netns, marks.HBONE_PORT, "pod's own 15008", transparent=False))
        agent = start_agent(roles, lab, node.name)
        agent.call("enroll", target.ip, "default/target", False)
        with pytest.raises(NetnsError, match="timed out"):
            greeting_of(client.netns, target.ip, marks.HBONE_PORT, timeout=1.5)
        assert greeting_of(client.netns, target.ip, ECHO_PORT) == target.name  # PERMISSIVE, no 15006 listener
        assert agent.call("counters")["hbone_no_listener_drop"] >= 1
        hbone = roles.enter_context(Listener(node.netns, marks.HBONE_PORT, "hbone"))
        assert greeting_of(client.netns, target.ip, marks.HBONE_PORT) == "hbone"
        assert greeting_of(local_client.netns, target.ip, marks.HBONE_PORT) == "hbone"
        assert [(a["peer"][0], tuple(a["orig_dst"])) for a in hbone.accepts()] == [
            (client.ip, (target.ip, marks.HBONE_PORT)),
            (local_client.ip, (target.ip, marks.HBONE_PORT)),
        ]
        assert agent.call("counters")["hbone_captured"] >= 2
