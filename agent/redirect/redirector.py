"""The redirection datapath of one node: owns the BPF programs and maps, their tc attachments and the
routing rule, and follows enrolment changes live.

Runs in the node's network namespace (the calling thread's netns). Programs and maps are pinned under
`pin_dir`, and tc filters keep their program alive, so stop(keep_datapath=True) leaves pods' traffic
flowing through the pinned state; the next start() reuses the maps and swaps in its freshly loaded
program atomically on every link a previous agent had attached. The programs' instructions come from
the compile cache (cache.py): bcc runs in a child when they are not cached, never in this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.redirect import cache, loader, marks, pins, rules, tc
from agent.redirect.maps import CounterMap, FlowMap, PodEntry, PodMap, pod_key
from agent.redirect.rtnl import NetlinkError, Route, RtNetlink
from agent.redirect.sources import HOOKS
from agent.redirect.syscall import MapFd

log = logging.getLogger(__name__)

POD_HOOK = "pod_ingress"
POD_EGRESS_HOOK = "pod_egress"  # STRICT pods refuse plaintext the node itself sends (bpf/pod_egress.c)
POD_HOOKS = (POD_HOOK, POD_EGRESS_HOOK)
UPLINK_HOOK = "uplink_ingress"
MAIN_TABLE = 254
RTN_UNICAST = 1
SCOPE_LINK = 253


class RedirectError(RuntimeError):
    pass


@dataclass
class SyncResult:
    enrolled: list[str] = field(default_factory=list)
    unenrolled: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Redirector:
    def __init__(
        self,
        node: str,
        pin_dir: Path,
        uplink: str | None = None,
        cache_dir: Path | None = None,
        bpf_dir: Path | None = None,
    ) -> None:
        """`uplink`: the interface other nodes' traffic arrives on; found from the routes when None.
        `cache_dir`: the compile cache (cache.DEFAULT_DIR); `bpf_dir`: the program sources (bpf/)."""
        self.node = node
        self.pin_dir = Path(pin_dir)
        self._uplink_name = uplink
        self._cache_dir = cache_dir
        self._bpf_dir = bpf_dir
        self._lock = threading.Lock()
        self._ipr: RtNetlink | None = None
        self._programs: dict[str, loader.LoadedProgram] = {}
        self._maps: dict[str, MapFd] = {}
        self.bpf_origin = ""  # "cache" or "compiled": where the last start's instructions came from
        self._pods: PodMap | None = None
        self._counters: CounterMap | None = None
        self._flows: FlowMap | None = None
        self._enroll_errors = 0
        self._attached: dict[tuple[int, str], tc.Attachment] = {}  # by (link index, hook)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._ipr is not None:
                return
            pins.ensure_bpffs()
            self.pin_dir.mkdir(parents=True, exist_ok=True)
            self._ipr = RtNetlink()
            try:
                self._load()
                rules.ensure(self._ipr)
                self._adopt_attachments()
                self._attach_uplink()
                self._attach_pod_links()
            except Exception:
                self._close()
                raise
            log.info(
                "redirector for %s started: %d links attached, %d pods enrolled (pins %s)",
                self.node,
                len(self._attached_links()),
                len(self._pods.entries()) if self._pods else 0,
                self.pin_dir,
            )

    def stop(self, keep_datapath: bool = False) -> None:
        """Detach everything and remove the pins, or with keep_datapath leave the datapath running."""
        with self._lock:
            if self._ipr is None:
                return
            try:
                if not keep_datapath:
                    for attachment in tc.attachments(self._ipr):
                        tc.detach(self._ipr, attachment.index, attachment.hook)
                    rules.remove(self._ipr)
                    pins.remove_pin_dir(self.pin_dir)
            finally:
                self._close()
            log.info(
                "redirector for %s stopped (datapath %s)", self.node, "kept" if keep_datapath else "removed"
            )

    def _close(self) -> None:
        for program in self._programs.values():
            program.close()
        self._programs.clear()
        loader.close_maps(self._maps)
        self._maps.clear()
        self._pods = self._counters = self._flows = None
        self._attached.clear()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _load(self) -> None:
        compiled = cache.artifact(self._cache_dir, self._bpf_dir)
        self.bpf_origin = compiled.origin
        self._maps = loader.open_maps(compiled, self.pin_dir)
        # Checked against maps.py before any program that writes them is loaded.
        self._pods = PodMap(compiled.maps["ambit_pods"], self._maps["ambit_pods"])
        self._counters = CounterMap(compiled.maps["ambit_counters"], self._maps["ambit_counters"])
        self._flows = FlowMap(compiled.maps["ambit_captured"], self._maps["ambit_captured"])
        for hook in HOOKS:
            self._programs[hook] = loader.load(hook, compiled, self._maps, self.pin_dir)

    def _adopt_attachments(self) -> None:
        """Put this run's programs on every link a previous agent attached (atomic replace)."""
        assert self._ipr is not None
        for found in tc.attachments(self._ipr):
            if found.hook in self._programs:
                self._attach(found.index, found.hook)
            else:  # left by an older version with a hook that no longer exists
                tc.detach(self._ipr, found.index, found.hook)
        # A pod link adopted from an agent that had no egress program gets it now.
        for index in {i for i, hook in self._attached if hook == POD_HOOK}:
            self._attach(index, POD_EGRESS_HOOK)

    def _attach(self, index: int, hook: str) -> None:
        assert self._ipr is not None
        tc.attach(self._ipr, index, self._programs[hook].fd, hook)
        self._attached[(index, hook)] = tc.Attachment(index, self._ifname(index), hook)

    def _attach_pod(self, index: int) -> str:
        """Both pod programs on a pod's node-side link; returns the link's name."""
        for hook in POD_HOOKS:
            self._attach(index, hook)
        return self._attached[(index, POD_HOOK)].ifname

    def _attached_links(self) -> set[int]:
        return {index for index, _hook in self._attached}

    def _attach_uplink(self) -> None:
        index = self._uplink_index()
        if index is None:
            log.warning("no uplink found in this netns: plaintext from other nodes is not steered")
            return
        self._attach(index, UPLINK_HOOK)

    # -- enrolment -------------------------------------------------------------------------------------

    def enroll(self, pod_ip: str, workload_uid: str, strict: bool) -> None:
        """Capture the pod's new connections (and plaintext sent to it); idempotent, also to change mode."""
        _check_ip(pod_ip)
        with self._lock:
            pods = self._require_started()
            index = self._pod_link(pod_ip)
            # Always (re)attach: an atomic replace, and right even if the pod's veth was re-created.
            link = self._attach_pod(index)
            pods.put(pod_ip, workload_uid, strict)
        log.info("enrolled %s (%s, %s) on %s", pod_ip, workload_uid, _mode(strict), link)

    def unenroll(self, pod_ip: str) -> None:
        """Stop capturing the pod's new connections; connections already captured keep their sockets."""
        _check_ip(pod_ip)
        with self._lock:
            removed = self._require_started().delete(pod_ip)
        if removed:
            log.info("unenrolled %s", pod_ip)

    def sync(self, desired: Mapping[str, PodEntry]) -> SyncResult:
        """Make the pinned enrolment equal `desired` (pod IP -> entry): enrol what is missing or changed,
        unenrol the rest, including pods a previous agent left. A pod that cannot be enrolled (not on this
        node, bad address) is logged, counted and reported; it never stops the others."""
        current = self.enrolled()
        result = SyncResult()
        for ip in sorted(current.keys() - desired.keys()):
            self.unenroll(ip)
            result.unenrolled.append(ip)
        for ip, entry in sorted(desired.items()):
            if current.get(ip) == entry:
                continue
            try:
                self.enroll(ip, entry.workload, entry.strict)
            except RedirectError as exc:
                log.warning("cannot enrol %s (%s): %s", ip, entry.workload, exc)
                with self._lock:
                    self._enroll_errors += 1
                result.failed[ip] = str(exc)
            else:
                result.enrolled.append(ip)
        return result

    def enrolled(self) -> dict[str, PodEntry]:
        """The pinned enrolment (after a restart: what the previous agent left), by pod IP."""
        with self._lock:
            return self._require_started().entries()

    def _require_started(self) -> PodMap:
        if self._pods is None:
            raise RedirectError(f"redirector for {self.node} is not started")
        return self._pods

    # -- links -----------------------------------------------------------------------------------------

    def _ifname(self, index: int) -> str:
        assert self._ipr is not None
        link = self._ipr.link(index)
        return link.name if link is not None else f"#{index}"

    def _pod_link(self, pod_ip: str) -> int:
        """The node-side link of a local pod: where the route to its address points."""
        assert self._ipr is not None
        try:
            route = self._ipr.route_get(pod_ip)
        except NetlinkError as exc:
            raise RedirectError(f"no route to pod {pod_ip} on node {self.node}: {exc}") from exc
        oif = route.oif
        uplink = self._uplink_index()
        if route.type != RTN_UNICAST or oif is None or oif == uplink or route.gateway:
            via = self._ifname(oif) if oif else "nowhere"
            raise RedirectError(f"pod {pod_ip} is not on node {self.node}: its route goes via {via}")
        return int(oif)

    def _uplink_index(self) -> int | None:
        """The named uplink; else the default route's link; else the link with a node-subnet address."""
        assert self._ipr is not None
        if self._uplink_name:
            found = self._ipr.link_index(self._uplink_name)
            if found is None:
                raise RedirectError(f"uplink {self._uplink_name!r} not found on node {self.node}")
            return found
        for route in self._main_routes():
            if route.dst_len == 0 and route.oif:
                return route.oif
        lo = self._ipr.link_index("lo")
        for addr in self._ipr.ipv4_addresses():
            # Pod-side gateways are /32s; the node's own address sits in a subnet shared with other nodes.
            if addr.prefixlen < 32 and addr.index != lo:
                return addr.index
        return None

    def _main_routes(self) -> list[Route]:
        assert self._ipr is not None
        return [r for r in self._ipr.routes(MAIN_TABLE) if r.type == RTN_UNICAST]

    def _pod_links(self) -> set[int]:
        """Links that carry a /32 route straight to one address: the node side of pod veths (CNI style)."""
        uplink = self._uplink_index()
        return {
            r.oif
            for r in self._main_routes()
            if r.dst_len == 32 and r.scope == SCOPE_LINK and not r.gateway and r.oif not in (None, uplink)
        }

    def refresh_links(self) -> list[str]:
        """Attach the pod program to pod links that appeared since start; returns the new links' names.

        Every pod link gets it, enrolled or not: replies to connections the agent opens with a pod's
        address (spoofed source) can come from any local pod and must reach the agent's socket."""
        with self._lock:
            self._require_started()
            return self._attach_pod_links()

    def attach_pod_link(self, ifname: str) -> None:
        """Attach the pod program to a named link (CNIs whose pod veths have no per-pod route)."""
        with self._lock:
            self._require_started()
            assert self._ipr is not None
            found = self._ipr.link_index(ifname)
            if found is None:
                raise RedirectError(f"link {ifname!r} not found on node {self.node}")
            self._attach_pod(found)

    def _attach_pod_links(self) -> list[str]:
        return [self._attach_pod(index) for index in sorted(self._pod_links() - self._attached_links())]

    # -- introspection ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        with self._lock:
            return self._counter_values()

    def _counter_values(self) -> dict[str, int]:
        if self._counters is None:
            return {}
        return {**self._counters.values(), "enroll_errors": self._enroll_errors}

    def rows(self) -> list[dict[str, str]]:
        """Programs, attachments, routing, enrolled pods and per-path counters, for `ambit debug bpf`."""
        with self._lock:
            if self._ipr is None or self._pods is None or self._counters is None:
                return []
            rows = [
                _row(
                    "program", p.hook, str(p.prog_id), f"tag {p.tag}, pinned {p.pin}, from {self.bpf_origin}"
                )
                for p in self._programs.values()
            ]
            rows += [
                _row("attachment", a.ifname, a.hook, f"tc {_direction(a.hook)} prio {tc.FILTER_PRIO:#x}")
                for a in tc.attachments(self._ipr)
            ]
            state = rules.present(self._ipr)
            rows.append(
                _row(
                    "routing",
                    f"fwmark {marks.ROUTE_MARK:#x}/{marks.ROUTE_MASK:#x} -> table {marks.ROUTE_TABLE}",
                    "ok" if all(state.values()) else "MISSING",
                    ", ".join(f"{k} {'present' if v else 'missing'}" for k, v in state.items()),
                )
            )
            rows += [
                _row("pod", ip, _mode(e.strict), e.workload) for ip, e in sorted(self._pods.entries().items())
            ]
            if self._flows is not None:
                rows.append(
                    _row("flows", "captured", str(self._flows.count()), "connections handed to listeners")
                )
            rows += [_row("counter", name, str(value), "") for name, value in self._counter_values().items()]
            return rows


def _row(kind: str, name: str, value: str, detail: str) -> dict[str, str]:
    return {"kind": kind, "name": name, "value": value, "detail": detail}


def _direction(hook: str) -> str:
    return "egress" if tc.parent_of(hook) == tc.EGRESS_PARENT else "ingress"


def _mode(strict: bool) -> str:
    return "STRICT" if strict else "PERMISSIVE"


def _check_ip(pod_ip: str) -> None:
    try:
        pod_key(pod_ip)
    except ValueError as exc:
        raise RedirectError(f"bad pod address {pod_ip!r}: {exc}") from None
