"""`ambit gateway`: the edge gateway process. Turns a GatewayPlan into data plane tables (listening
sockets, TLS certificates, backends, routes with their compiled WAF rule sets), runs the C data plane, and
turns its WAF events into audit records, per-rule counters and rate-limited log lines."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from api.jsonlog import AuditLog
from gateway import config as gwconfig
from gateway import dataplane as dp
from gateway.hbone import HboneUpstreams, Identity
from gateway.metrics import GatewayMetrics
from gateway.waf import RuleSetCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    threads: int = 1
    limits: dp.Limits = dp.Limits()
    audit_log: Path | None = None
    metrics_listen: str = ""  # "host:port"; "" for none
    identity: Identity | None = None  # the gateway's SVID, for HBONE backends
    # listening sockets made by the caller (socket activation, tests), by listener name; the rest are bound
    sockets: Mapping[str, socket.socket] = field(default_factory=dict)
    # binds every listener here instead of the Gateway's spec.addresses[0]: on Kubernetes that field names
    # the external (load balancer) address, which the gateway pod does not hold
    listen_address: str = ""


class GatewayServer:
    def __init__(self, plan: gwconfig.GatewayPlan, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        self._rules = RuleSetCache()
        self._slots: dict[str, int] = {}
        self.upstreams: HboneUpstreams | None = None
        self.identity = self.options.identity  # replaced on renewal (set_identity)
        self._drain_lock = threading.Lock()  # events and HBONE upstreams: one thread at a time
        self._plan = plan
        self._config = self._build(plan)  # compiles everything first: a bad policy fails before binding
        self.gateway = dp.Gateway(self.options.threads, self.options.limits)
        self.ports: dict[str, int] = {}
        self.audit = AuditLog(self.options.audit_log) if self.options.audit_log else None
        self.metrics = GatewayMetrics(self._route_stats, self.gateway.counters)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log = 0.0
        self._suppressed = 0
        self._dropped_seen = 0

    # ---- tables ----

    def _slot(self, route: str) -> int:
        if route not in self._slots:
            if len(self._slots) >= dp.MAX_ROUTE_SLOTS:
                raise gwconfig.GatewayConfigError(f"more than {dp.MAX_ROUTE_SLOTS} routes")
            self._slots[route] = len(self._slots)
        return self._slots[route]

    def _build(self, plan: gwconfig.GatewayPlan) -> dp.Config:
        cfg = dp.Config()
        for lst in plan.listeners:
            if lst.refused:
                continue  # no config for its id: the engine refuses (and counts) its connections
            tls = None
            if lst.certificates:
                tls = dp.ServerTls()
                for i, cert in enumerate(lst.certificates):  # the first is also the default (no SNI match)
                    for name in ("",) * (i == 0) + cert.names:
                        tls.add(name, cert.chain_pem, cert.key_pem)
            cfg.listener(lst.listener_id, tls)
        targets: list[gwconfig.HboneBackend] = []
        for backend in plan.backends:
            if isinstance(backend, gwconfig.HboneBackend):
                cfg.backend_external(len(targets))
                targets.append(backend)
            else:
                cfg.backend(list(backend))
        if targets and self.identity is None:
            raise gwconfig.GatewayConfigError("HBONE backends need the gateway's identity (--identity-dir)")
        for e in plan.entries:
            pol = e.policy
            waf = self._rules.compile(pol) if pol else None
            mode = dp.WAF_OFF if pol is None else dp.WAF_BLOCK if pol.blocking else dp.WAF_DETECT
            cfg.route(
                dp.RouteEntry(
                    e.listener_id,
                    e.hostname,
                    e.match.path,
                    e.match.path_exact,
                    tuple((h.name, h.value) for h in e.match.headers),
                    e.match.method,
                    e.backend,
                    waf,
                    mode,
                    pol.body_limit if pol else 8 * 1024 * 1024,
                    self._slot(e.route),
                    e.route,
                )
            )
        for warning in plan.warnings:
            log.warning("gateway config: %s", warning)
        # Last: a config refused above (a bad policy) must leave the running one's HBONE targets alone.
        self._hbone(targets)
        return cfg

    def _hbone(self, targets: list[gwconfig.HboneBackend]) -> None:
        with self._drain_lock:  # the event thread opens streams on the same upstreams
            if self.upstreams is not None:
                self.upstreams.retarget(targets)
            elif targets and self.identity is not None:
                self.upstreams = HboneUpstreams(self.identity, targets)

    def set_identity(self, identity: Identity) -> None:
        """The gateway's renewed SVID or a new trust bundle (from the plane): new HBONE connections use it."""
        with self._drain_lock:
            self.identity = identity
            if self.upstreams is not None:
                self.upstreams.set_identity(identity)

    def reload(self, plan: gwconfig.GatewayPlan) -> None:
        """New routes, backends, certificates and policies; listeners (ports) need a restart."""
        old = [(lp.name, lp.bind, lp.port, lp.tls) for lp in self._plan.listeners]
        new = [(lp.name, lp.bind, lp.port, lp.tls) for lp in plan.listeners]
        if old != new:
            raise gwconfig.GatewayConfigError("listeners changed: restart the gateway to change ports")
        cfg = self._build(plan)
        self.gateway.apply(cfg)
        self._config, self._plan = cfg, plan
        log.info("gateway config applied: %d routes, %d table entries", len(plan.routes), len(plan.entries))

    # ---- lifetime ----

    def start(self) -> None:
        for lst in self._plan.listeners:
            address = self.options.listen_address or lst.bind
            sock = self.options.sockets.get(lst.name) or _bind(address, lst.port)
            self.ports[lst.name] = sock.getsockname()[1]
            self.gateway.listen(sock.detach(), lst.listener_id)
        self.gateway.apply(self._config)
        self.gateway.start()
        if self.options.metrics_listen:
            from prometheus_client import start_http_server

            host, _, port = self.options.metrics_listen.rpartition(":")
            start_http_server(int(port), addr=host or "127.0.0.1", registry=self.metrics.registry)
        self._thread = threading.Thread(target=self._event_loop, name="gateway-events", daemon=True)
        self._thread.start()
        log.info("gateway %s listening on %s", self._plan.gateway, self.ports)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        self.drain()
        self.gateway.stop()
        if self.upstreams:
            self.upstreams.stop()
        if self.audit:
            self.audit.close()

    # ---- events ----

    def _route_stats(self) -> dict[str, dict[str, int]]:
        return {route: self.gateway.route_stats(slot) for route, slot in self._slots.items()}

    def _event_loop(self) -> None:
        while not self._stop.is_set():
            # Upstreams appear with the first config that has HBONE backends (a reload, the plane).
            fds = [self.gateway.eventfd] + ([self.upstreams.eventfd] if self.upstreams else [])
            ready, _, _ = select.select(fds, [], [], 0.5)
            if ready:
                self.drain()

    def drain(self) -> list[dp.WafEvent]:
        """Handles pending WAF events now (the event thread does this continuously)."""
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> list[dp.WafEvent]:
        if self.upstreams:
            self.upstreams.drain()
        events: list[dp.WafEvent] = []
        for ev in self.gateway.events():
            if isinstance(ev, dp.UpstreamRequest):
                self._open_upstream(ev)
            else:
                events.append(ev)
                self._handle(ev)
        dropped = self.gateway.counters().get("events_dropped", 0)
        if dropped > self._dropped_seen:
            self.metrics.audit_errors.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        return events

    def _open_upstream(self, req: dp.UpstreamRequest) -> None:
        client_ip = req.client.rpartition(":")[0].strip("[]")
        fd = self.upstreams.open(req.provider, client_ip) if self.upstreams else -1
        self.gateway.upstream_ready(req.token, fd)

    def _handle(self, ev: dp.WafEvent) -> None:
        for rule in ev.rules:
            self.metrics.rule_matches.labels(rule.rule_id, ev.route or "-", ev.action).inc()
        if self.audit:
            self.audit.record(
                "request_refused" if ev.action == "refused" else f"waf_{ev.action}",
                request_id=ev.request_id,
                route=ev.route,
                client=ev.client,
                host=ev.host,
                method=ev.method,
                uri=ev.uri,
                status=ev.status,
                anomaly_score=ev.score,
                rules=[{"id": r.rule_id, "msg": r.message} for r in ev.rules],
                rules_matched=ev.nrules,
                detail=ev.detail,
            )
        self._log(ev)

    def _log(self, ev: dp.WafEvent) -> None:
        now = time.monotonic()
        if now - self._last_log < 1.0:  # at most one line a second; the audit log has every record
            self._suppressed += 1
            return
        more = f" (+{self._suppressed} more since the last line)" if self._suppressed else ""
        self._last_log, self._suppressed = now, 0
        ids = ",".join(r.rule_id for r in ev.rules) or "-"
        log.warning(
            "waf %s %s %s %s route=%s client=%s score=%d rules=%s id=%s%s",
            ev.action,
            ev.status,
            ev.method,
            ev.uri[:80],
            ev.route,
            ev.client,
            ev.score,
            ids,
            ev.request_id,
            more,
        )


def _bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    return sock


def load_plan(config_dir: Path, gateway: str = "") -> gwconfig.GatewayPlan:
    return gwconfig.plan(gwconfig.load_dir(config_dir), gateway, cert_dir=config_dir)


def check(plan: gwconfig.GatewayPlan) -> list[str]:
    """Compiles every table of `plan` without opening sockets; returns the warnings."""
    GatewayServer(plan)
    return list(plan.warnings)
