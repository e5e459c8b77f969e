"""`ambit agent`: the node daemon. Wires the components; each one owns its own kernel objects and sockets.

Start order follows the trust chain: node identity (join token) -> config pull (relay, mTLS with the node
certificate) -> datapath (proxy listeners before BPF redirection, so a captured SYN always finds a listener).
Stop order is the reverse. A config update is validated by the policy engine before it is applied (a
policy that does not compile NACKs the whole update), then enrolment and live connections follow it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import enrolment, memory, threads
from agent.identity.bootstrap import JoinError
from agent.settings import PLANE_SERVER_NAME, AgentSettings, add_arguments
from api import logformat

log = logging.getLogger("ambit.agent")
COUNTER_REFRESH_S = 2.0
# SIGTERM to exit: Kubernetes waits 30 s before SIGKILL, but a rolling restart waits for us; well under 2 s.
STOP_BUDGET_S = 1.3
SIGNAL_POLL_S = 0.1


class _Stopped(Exception):
    """start() noticed a stop request between two steps."""


def _exit_now(why: str) -> None:
    log.error("%s: exiting now", why)
    logging.shutdown()
    os._exit(0)


class _CountingAuthorizer:
    """The policy engine as the proxy sees it, with every decision counted by action."""

    def __init__(self, policy: Any, metrics: Any) -> None:
        self._policy = policy
        self._metrics = metrics

    def authorize(self, attrs: Any) -> Any:
        decision = self._policy.authorize(attrs)
        self._metrics.count_decision("ALLOW" if decision.allow else "DENY")
        if decision.audited:
            self._metrics.count_decision("AUDIT")
        return decision

    def reusable(self, attrs: Any, decision: Any) -> bool:
        return bool(self._policy.reusable(attrs, decision))  # the inbound fast path (proxy/fastpath_in.py)

    def mtls_mode(self, workload: Any, port: int) -> str:
        return str(self._policy.mtls_mode(workload, port))


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._apply_lock = threading.Lock()
        self._recheck_wanted = threading.Event()
        self._stack: list[tuple[str, Callable[[], None]]] = []  # what to undo, in reverse order
        self.relay: Any = None
        self.identity: Any = None
        self.policy: Any = None
        self.proxy: Any = None
        self.redirector: Any = None
        self.metrics: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from prometheus_client import CollectorRegistry

        from agent.identity.bootstrap import join
        from agent.identity.manager import IdentityManager
        from agent.observe.accesslog import AccessLog
        from agent.observe.audit import AuditLog
        from agent.observe.fanout import FanOut
        from agent.observe.metrics import Metrics
        from agent.policy.engine import PolicyEngine
        from agent.proxy.proxy import Proxy
        from agent.relay.client import RelayClient

        s = self.settings
        bundle = s.trust_bundle.read_bytes()
        token = s.join_token_file.read_text().strip()
        log.info("joining as node %s via %s", s.node, s.bootstrap)
        node_identity = join(s.bootstrap, token, s.node, bundle, service_account=s.kube_token)
        del token
        self._check_stopping()

        self.metrics = Metrics(
            CollectorRegistry(), snapshot=lambda: self.relay.snapshot if self.relay else None
        )
        audit = AuditLog(s.audit_log) if s.audit_log else None
        observers: list[Any] = [self.metrics]
        if s.access_log:
            access = AccessLog(s.access_log)
            observers.append(access)
            self._stack.append(("access log", access.close))
        self._servers(audit)

        self.identity = IdentityManager(
            s.mgmt, node_identity, s.trust_domain, bundle_refresh_s=s.bundle_refresh_s
        )
        self.identity.start()
        self._stack.append(("identity", self.identity.stop))
        self._check_stopping()

        self.policy = PolicyEngine(
            s.trust_domain, audit=(lambda rec: audit.record("decision", **rec)) if audit else None
        )
        self.relay = RelayClient(
            s.mgmt,
            s.node,
            # Rebuilt on reconnect: follows node-certificate renewals and trust-bundle (root) rotations.
            lambda: self.identity.node.credentials(self.identity.trust_bundle_pem()),
            on_snapshot=self._apply,
            validate=self._validate,
            server_name=PLANE_SERVER_NAME,
        )
        self.proxy = Proxy(
            s.node,
            state=lambda: self.relay.snapshot,
            credentials=self.identity,
            authorizer=_CountingAuthorizer(self.policy, self.metrics),
            observer=FanOut(*observers),
            listen_ip=s.listen_ip,
            lookup=self.relay.lookup,
            audit=audit.record if audit else None,  # identity refusals on 15008
            limits=s.limits,  # --limit: the engine's share is set on the engine, the rest stay budgets
        )
        before = threads.tids()
        self.proxy.start()
        threads.name_native(before, "engine-loop")
        self._stack.append(("proxy", self.proxy.stop))
        self._check_stopping()
        if s.redirect:
            from agent.redirect.redirector import Redirector

            self.redirector = Redirector(s.node, s.pin_dir)
            self.redirector.start()
            self._stack.append(("redirect", lambda: self.redirector.stop(keep_datapath=s.keep_datapath)))
            self._check_stopping()
        self.relay.start()
        self._stack.append(("relay", self.relay.stop))
        threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True).start()

    def _servers(self, audit: Any) -> None:
        from agent.admin import AdminServer
        from agent.observe.servers import MetricsServer, ReadinessServer, ServiceGroup

        s = self.settings
        admin = AdminServer(s.admin, self._providers())
        metrics = MetricsServer(self.metrics.registry, s.metrics)
        ready = ReadinessServer(s.readiness, self._ready.is_set)
        # One thread accepts on the three ports (requests still get a thread each).
        servers = ServiceGroup("http", [admin, metrics, ready])
        servers.start()
        self._stack.append(("admin, metrics and readiness servers", servers.stop))
        if audit is not None:
            self._stack.append(("audit", audit.close))

    def stop(self) -> None:
        self._stopping.set()
        self._ready.clear()
        while self._stack:
            name, undo = self._stack.pop()
            try:
                undo()
            except Exception:
                log.exception("stopping %s failed", name)

    def run_until_signal(self) -> int:
        """Run until SIGTERM/SIGINT, then stop within STOP_BUDGET_S, whatever stage the agent is in.

        start() runs on its own thread so the main thread is always free to take the signal: a join still
        retrying, a BPF compile or a slow teardown cannot hold a rolling restart (25 s during bootstrap
        before). A stage that does not finish within the budget is cut short by exiting the process; the
        kernel frees its ports, and the next agent's start reconciles the datapath it left (pins, rules)."""
        stop, signalled = threading.Event(), threading.Event()

        def on_signal(*_: object) -> None:
            signalled.set()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        failed: list[BaseException] = []

        def starter() -> None:
            try:
                self.start()
                log.info("agent for node %s running", self.settings.node)
            except BaseException as exc:  # re-raised on the main thread below
                failed.append(exc)
                stop.set()

        thread = threading.Thread(target=starter, name="start", daemon=True)
        thread.start()
        # Short waits, not one: the kernel may deliver SIGTERM to any thread, and Python runs its handler
        # only when the main thread next executes bytecode, which an untimed wait would never let it do.
        while not stop.wait(SIGNAL_POLL_S):
            pass
        if failed and not signalled.is_set():
            raise failed[0]  # start() failed on its own (and has undone what it did)
        log.info("shutting down (keep datapath: %s)", self.settings.keep_datapath)
        self._stopping.set()
        watchdog = threading.Timer(STOP_BUDGET_S, _exit_now, args=("stopping took too long",))
        watchdog.daemon = True
        watchdog.start()
        thread.join()  # start() sees _stopping at its next step and undoes what it did
        self.stop()
        watchdog.cancel()
        return 0

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise _Stopped("stopped while starting")

    # -- config ----------------------------------------------------------------------------------------

    def _validate(self, snapshot: Any) -> None:
        """Compile the snapshot's policies; raising here makes the relay NACK and keep the old config."""
        try:
            self.policy.update(snapshot)
        except Exception:
            self.metrics.count_ack(False)
            raise

    def _apply(self, snapshot: Any) -> None:
        """Make the datapath follow a snapshot that the policy engine has already accepted."""
        with self._apply_lock:
            if self.redirector is not None:
                self._reconcile_enrolment(snapshot)
            if self.proxy is not None:  # the engine's fast path entries stop now (takes no proxy lock)
                self.proxy.mesh_changed()
            # Not on this (relay) thread: the proxy's loop may be waiting on the relay for a lookup.
            self._recheck_wanted.set()
            self.metrics.count_ack(True)
            self.metrics.set_relay_version(snapshot.version)
            # Certificates of local workloads are fetched ahead of their first connection (in the manager's
            # background, with its retries); those of workloads that left this node are forgotten.
            td = self.settings.trust_domain
            self.identity.retain(str(w.spiffe_id(td)) for w in snapshot.local_workloads())
            self._ready.set()
            log.info("config version %d applied (%d workloads)", snapshot.version, len(snapshot.workloads))

    def _reconcile_enrolment(self, snapshot: Any) -> None:
        wanted = enrolment.desired(
            snapshot.local_workloads(),
            lambda w: w.enrolled(snapshot.namespace_of(w)),
            lambda w: self.policy.mtls_mode(w, 0),
        )
        # sync() also drops pods a previous agent left enrolled in the pinned map, and reports (never
        # raises for) a pod it cannot enrol, so one bad workload cannot stall the others.
        result = self.redirector.sync(wanted)
        for ip in result.unenrolled:
            log.info("unenrolled %s", ip)
        for ip in result.enrolled:
            mode = "STRICT" if wanted[ip].strict else "PERMISSIVE"
            log.info("enrolled %s (%s, %s)", ip, wanted[ip].workload, mode)
        for ip, reason in result.failed.items():
            log.error("could not enrol %s: %s", ip, reason)

    def _housekeeping_loop(self) -> None:
        """The agent's periodic work on one thread: re-check live connections as soon as a policy change
        is applied, refresh counters every COUNTER_REFRESH_S."""
        next_refresh = time.monotonic() + COUNTER_REFRESH_S
        while not self._stopping.is_set():
            if self._recheck_wanted.wait(timeout=max(0.0, next_refresh - time.monotonic())):
                self._recheck_wanted.clear()
                self._recheck()
            if time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + COUNTER_REFRESH_S

    def _recheck(self) -> None:
        """A policy change applies to live connections too: close the ones it now denies."""
        try:
            for conn_id, decision in self.policy.recheck(self.proxy.inbound_connections()):
                self.proxy.close(conn_id, f"denied after policy change: {decision.reason}")
        except Exception:
            log.exception("re-checking live connections failed")

    def _refresh(self) -> None:
        try:
            if self.redirector is not None:
                self.metrics.set_bpf_counters(self.redirector.counters())
            engine = self.proxy.engine_counters()
            self.metrics.set_engine_counters(engine)
            threads.name_os_threads()  # some start lazily (relay, lookups)
            for row in self.identity.rows():
                expiry = dt.datetime.fromisoformat(row["not_after"]).timestamp()
                self.metrics.set_cert_expiry(row["identity"], expiry)
        except Exception:
            log.exception("refreshing counters failed")

    # -- admin -----------------------------------------------------------------------------------------

    def _providers(self) -> dict[str, Callable[[], Any]]:
        return {
            "workloads": self._workload_rows,
            "services": self._service_rows,
            "reachable": self._reachable_rows,
            "policies": self._policy_rows,
            "certs": self._cert_rows,
            "trust_bundle": self._trust_bundle_rows,
            "connections": lambda: self.proxy.rows() if self.proxy else [],
            "bpf": lambda: self.redirector.rows() if self.redirector else [],
            "config_dump": self._config_dump,
            "threads": threads.rows,
            "memory": memory.report,
        }

    def _trust_bundle_rows(self) -> list[dict[str, Any]]:
        from agent.observe import views

        return views.bundle(self.identity.trust_bundle_pem()) if self.identity else []

    def _policy_rows(self) -> list[dict[str, Any]]:
        from agent.observe import views

        snap = self._snapshot()
        rows = self.policy.rows() if self.policy else []
        return views.policies(rows, snap.policies if snap else ())

    def _cert_rows(self) -> list[dict[str, Any]]:
        from agent.observe import views

        if self.identity is None:
            return []

        def chain_of(row: dict[str, Any]) -> bytes | None:
            # Only what is held: never a CSR from the admin API (pending or expired identities show none).
            if row.get("state") == "node":
                return bytes(self.identity.node_identity().chain_pem)
            if row.get("state") == "valid":
                return bytes(self.identity.svid_for(row["identity"]).chain_pem)
            return None

        return views.certificates(self.identity.rows(), chain_of, self.identity.trust_bundle_pem())

    def _snapshot(self) -> Any:
        return self.relay.snapshot if self.relay else None

    def _workload_rows(self) -> list[dict[str, Any]]:
        snap = self._snapshot()
        if snap is None:
            return []
        local = {w.uid for w in snap.local_workloads()}
        enrolled = {e.workload for e in self.redirector.enrolled().values()} if self.redirector else set()
        return [
            {
                "workload": w.uid,
                "node": w.node,
                "ips": ",".join(w.ips),
                "identity": str(w.spiffe_id(self.settings.trust_domain)),
                "local": w.uid in local,
                "enrolled": w.uid in enrolled,
            }
            for w in sorted(snap.workloads.values(), key=lambda w: w.uid)
        ]

    def _reachable_rows(self) -> list[dict[str, Any]]:
        """Every workload the node could reach (ztunnel's full list), asked of the plane when viewed."""
        if self.relay is None:
            return []
        snap = self._snapshot()
        held = set(snap.workloads) if snap else set()
        td = self.settings.trust_domain
        return [
            {
                "workload": w.uid,
                "node": w.node,
                "ips": ",".join(w.ips),
                "identity": str(w.spiffe_id(td)),
                "local": w.node == self.settings.node,
                "held": w.uid in held,
            }
            for w in sorted(self.relay.reachable(), key=lambda w: w.uid)
        ]

    def _service_rows(self) -> list[dict[str, Any]]:
        snap = self._snapshot()
        if snap is None:
            return []
        return [
            {
                "service": svc.uid,
                "addresses": ",".join(svc.addresses),
                "ports": ",".join(f"{p.port}->{p.target_port}" for p in svc.ports),
                "endpoints": sum(1 for w in snap.workloads.values() if svc.selects(w)),
            }
            for svc in sorted(snap.services.values(), key=lambda s: s.uid)
        ]

    def _config_dump(self) -> dict[str, Any]:
        s = self.settings
        snap = self._snapshot()
        return {
            "node": s.node,
            "trust_domain": s.trust_domain,
            "mgmt": s.mgmt,
            "listen_ip": s.listen_ip,
            "redirect": s.redirect,
            "config_version": snap.version if snap else 0,
            "workloads": self._workload_rows(),
            "services": self._service_rows(),
            "policies": self._policy_rows(),
            "certs": self._cert_rows(),
        }


def _run(args: argparse.Namespace) -> int:
    settings = AgentSettings.from_args(args)
    # `kill -USR1 <pid>` dumps every thread's stack to the log: how a stuck agent gets debugged in place.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # The engine owns the process's malloc policy (set when it is loaded): load it before any thread starts.
    import native.engine  # noqa: F401

    logformat.configure(settings.log_level, settings.log_format)
    try:
        return Agent(settings).run_until_signal()
    except JoinError as exc:
        # The plane's answer says it all (bad, used or expired token; wrong node; unreachable).
        log.error("cannot join the mesh: %s", exc)
        return 1


def add_agent_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.cliargs import add_command

    p = add_command(
        sub,
        "agent",
        "run the node agent",
        (
            "ambit mgmt token --state-dir /var/lib/ambit/mgmt --node node1 > /etc/ambit/join-token",
            "ambit agent --node node1 --mgmt 10.0.0.10:15012 --bootstrap 10.0.0.10:15013 \\",
            "    --trust-bundle /etc/ambit/ca-bundle.pem --join-token-file /etc/ambit/join-token \\",
            "    --listen-ip 10.0.0.11 --access-log /var/log/ambit-access.jsonl --log-format json",
        ),
    )
    add_arguments(p)
    p.set_defaults(func=_run)
