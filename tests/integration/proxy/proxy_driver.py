"""Runs one node's Proxy inside its lab netns from a JSON config (python -m ...proxy_driver CONFIG).

Static mesh view, certificates issued by the test, an authorizer with an explicit deny list (plus the
product's PolicyEngine when the config carries policy documents), and an observer that appends every
connection record to a JSON-lines file; status (counters, rows, pool) is rewritten every 0.2 s so tests
can read it. SIGUSR1 closes every live inbound connection (what the daemon does when a policy update
denies them). Stops on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.connections import ConnectionClose, ConnectionRecord
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.limits import Limits
from agent.proxy.proxy import Proxy
from agent.relay.client import LookupFailed
from agent.state import MeshSnapshot
from api.resources import Meta, load_kinds, parse
from api.resources.workload import (
    DATAPLANE_LABEL,
    Namespace,
    Node,
    Service,
    ServiceCIDR,
    ServicePort,
    Workload,
)
from api.spiffe import SpiffeId


@dataclasses.dataclass(frozen=True)
class Pem:
    chain_pem: bytes
    key_pem: bytes


class StaticCredentials:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self._bundle = cfg["bundle_pem"].encode()
        self._svids = {k: Pem(v[0].encode(), v[1].encode()) for k, v in cfg["svids"].items()}
        # Like the IdentityManager, the first request for an identity waits for the CA.
        self._first_fetch_delay = float(cfg.get("first_fetch_delay", 0.0))
        self._fetched: set[str] = set()

    def svid_for(self, spiffe_id: SpiffeId) -> Pem:
        if str(spiffe_id) not in self._fetched:
            time.sleep(self._first_fetch_delay)
            self._fetched.add(str(spiffe_id))
        return self._svids[str(spiffe_id)]

    def trust_bundle_pem(self) -> bytes:
        return self._bundle


class ListAuthorizer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.reload(cfg)

    def reload(self, cfg: dict[str, Any]) -> None:
        """A new config version's deny list (SIGUSR2), in force before the proxy is told."""
        self._deny = {tuple(d) for d in cfg.get("deny", [])}
        self._strict = set(cfg.get("strict", []))

    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        src = str(attrs.source_principal) if attrs.source_principal else ""
        if (src, attrs.destination_workload) in self._deny:
            return Decision(False, "app/deny-list", "denied by test list")
        return Decision(True, "", "allow all")

    def reusable(self, attrs: ConnectionAttrs, decision: Decision) -> bool:
        return decision.allow  # a fixed list: the same attributes get the same answer until a reload

    def mtls_mode(self, workload: Workload, port: int) -> str:
        return "STRICT" if workload.uid in self._strict else "PERMISSIVE"


class PolicyAuthorizer:
    """The product's PolicyEngine over the config's policy documents, then the test deny list."""

    def __init__(self, engine: Any, fallback: ListAuthorizer) -> None:
        self._engine = engine
        self._fallback = fallback

    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        decision: Decision = self._engine.authorize(attrs)
        return decision if not decision.allow else self._fallback.authorize(attrs)

    def reusable(self, attrs: ConnectionAttrs, decision: Decision) -> bool:
        return bool(self._engine.reusable(attrs, decision))

    def reload(self, cfg: dict[str, Any]) -> None:
        self._engine.update(snapshot(cfg))
        self._fallback.reload(cfg)

    def mtls_mode(self, workload: Workload, port: int) -> str:
        return self._fallback.mtls_mode(workload, port)


def authorizer(cfg: dict[str, Any], snap: MeshSnapshot) -> ListAuthorizer | PolicyAuthorizer:
    deny_list = ListAuthorizer(cfg)
    if not cfg.get("policies"):
        return deny_list
    from agent.policy.engine import PolicyEngine

    engine = PolicyEngine(cfg["trust_domain"])
    engine.update(snap)
    return PolicyAuthorizer(engine, deny_list)


class FileObserver:
    def __init__(self, path: Path) -> None:
        self._out = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self._lock = threading.Lock()

    def _write(self, event: str, record: ConnectionRecord, **extra: Any) -> None:
        doc = {"event": event, **dataclasses.asdict(record), **extra}
        doc["direction"] = record.direction.value
        with self._lock:
            self._out.write(json.dumps(doc) + "\n")

    def opened(self, record: ConnectionRecord) -> None:
        self._write("opened", record)

    def closed(self, close: ConnectionClose) -> None:
        self._write(
            "closed", close.record, bytes_sent=close.bytes_sent, bytes_received=close.bytes_received,
            response_flags=close.response_flags, error=close.error,
        )  # fmt: skip


def snapshot(cfg: dict[str, Any], local_only: bool = False) -> MeshSnapshot:
    ns = Namespace(Meta(name="app", labels={DATAPLANE_LABEL: "ambient"}))
    workloads = [
        Workload(
            Meta(name=w["name"], namespace="app", labels={"app": w["name"]}), w["sa"], w["node"], (w["ip"],)
        )
        for w in cfg["workloads"]
        if not local_only or w["node"] == cfg["node"]
    ]
    pod_cidrs = cfg.get("pod_cidrs", {})
    nodes = [Node(Meta(name=n), (ip,), tuple(pod_cidrs.get(n, ()))) for n, ip in cfg["nodes"].items()]
    service_cidrs = [ServiceCIDR(Meta(name="services"), tuple(c)) for c in [cfg.get("service_cidrs")] if c]
    services = [
        Service(
            Meta(name=s["name"], namespace="app"),
            (s["ip"],),
            (ServicePort(s["port"], s["target"]),),
            {"app": s["selects"]},
        )  # fmt: skip
        for s in cfg.get("services", [])
    ]
    policies = [parse(doc, f"policies[{i}]") for i, doc in enumerate(cfg.get("policies", []))]
    objects = [ns, *workloads, *nodes, *services, *service_cidrs, *policies]
    return MeshSnapshot.from_objects(1, cfg["trust_domain"], cfg["node"], objects)


class OnDemandView:
    """Like the RelayClient: peers (workloads on other nodes) are known only after a lookup by IP."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.reloads = 0
        self.reload(cfg)
        self.lookups = 0
        # While this file exists the plane is "unreachable": lookups fail (a relay hiccup).
        self._fail_file = Path(cfg["lookup_fail_file"]) if cfg.get("lookup_fail_file") else None

    def reload(self, cfg: dict[str, Any]) -> None:
        """A new config version (SIGUSR2 re-reads the config file): peers are learnt again on demand."""
        self._full = snapshot(cfg)
        self.current = snapshot(cfg, local_only=bool(cfg.get("on_demand_peers")))
        self.reloads += 1

    def lookup(self, ip: str) -> Workload | None:
        self.lookups += 1
        time.sleep(0.05)  # a round trip to the plane
        if self._fail_file is not None and self._fail_file.exists():
            raise LookupFailed(f"lookup of {ip} failed: plane unreachable (test)")
        found = self._full.workload_by_ip(ip)
        service = self._full.service_by_ip(ip)
        extra = [found] if found else self._full.service_endpoints(service) if service else []
        if extra:
            self.current = self.current.with_workloads(extra)
        return found


class FileAudit:
    """The agent's audit log as the proxy sees it (AuditLog.record): one JSON line per event."""

    def __init__(self, path: Path) -> None:
        self._out = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self._lock = threading.Lock()

    def __call__(self, event: str, /, **fields: Any) -> None:
        with self._lock:
            self._out.write(json.dumps({"event": event, **fields}) + "\n")


def start_redirect(node: str, cfg: dict[str, Any]) -> Any:
    """The product's eBPF capture (H3's Redirector) for this node's enrolled pods."""
    from agent.redirect.redirector import Redirector

    redirector = Redirector(node, Path(cfg["pin_dir"]))
    redirector.start()
    for ip, uid, strict in cfg["enrolled"]:
        redirector.enroll(ip, uid, strict)
    return redirector


def _limits(cfg: dict[str, Any]) -> Limits | None:
    outbound = cfg.get("outbound_connections_per_source")
    return Limits(outbound_connections_per_source=outbound) if outbound else None


def reload(
    view: OnDemandView, authz: ListAuthorizer | PolicyAuthorizer, proxy: Proxy, config_path: str
) -> None:
    """A new config version, applied as the daemon applies one: policies, the new view, the proxy told."""
    cfg = json.loads(Path(config_path).read_text())
    authz.reload(cfg)
    view.reload(cfg)
    proxy.mesh_changed()


def close_inbound(proxy: Proxy) -> None:
    for conn_id, _attrs in proxy.inbound_connections():
        proxy.close(conn_id, "policy changed")


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if cfg.get("redirect"):
        # libbcc must be loaded before regopy (PolicyEngine): the other order makes bcc's first compile
        # abort with "double free or corruption" (two copies of LLVM/libstdc++ state in one process).
        import bcc  # noqa: F401

    load_kinds()
    view = OnDemandView(cfg)
    authz = authorizer(cfg, view.current)
    proxy = Proxy(
        cfg["node"],
        lambda: view.current,
        StaticCredentials(cfg),
        authz,
        FileObserver(Path(cfg["events"])),
        cfg["listen_ip"],
        max_streams=cfg.get("max_streams", 100),
        idle_timeout=cfg.get("idle_timeout", 60.0),
        preserve_source_ip=cfg.get("preserve_source_ip", True),
        engine_threads=cfg.get("engine_threads"),
        connections_per_key=cfg.get("connections_per_key"),
        lookup=view.lookup,
        audit=FileAudit(Path(cfg["audit"])),
        limits=_limits(cfg),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # SIGUSR1 plays a policy update that denies everything: re-check and close live inbound connections.
    signal.signal(signal.SIGUSR1, lambda *_: close_inbound(proxy))
    signal.signal(signal.SIGUSR2, lambda *_: reload(view, authz, proxy, config_path))
    proxy.start()
    redirector = start_redirect(cfg["node"], cfg["redirect"]) if cfg.get("redirect") else None
    status = Path(cfg["status"])
    while not stop.wait(0.2):
        doc = {
            "counters": proxy.counters(),
            "lookups": view.lookups,
            "reloads": view.reloads,
            "engine": proxy.engine_counters(),
            "rows": proxy.rows(),
            "pool": proxy.pool_rows(),
        }
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, default=str))
        os.replace(tmp, status)
    if redirector is not None:
        redirector.stop()
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
