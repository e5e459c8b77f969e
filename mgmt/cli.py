"""The `ambit mgmt` subcommand: run the management plane, or mint a node join token.

  ambit mgmt [--source files] --config-dir D --state-dir S [--trust-domain cluster.local]
             [--listen 0.0.0.0:15012] [--bootstrap-listen 0.0.0.0:15013] [--join-token NODE ...]
             [--audit-log F]
  ambit mgmt --source kube [--kubeconfig F] --state-dir S [...]   (config from the Kubernetes API)
  ambit mgmt token --state-dir S --node N [--ttl 1h] [--config-dir D]
  ambit mgmt token --state-dir S --gateway NAMESPACE/NAME [--ttl 1h] [--config-dir D]
  ambit mgmt rotate-root --state-dir S [--step prepare|activate|drop|all] [--wait SECONDS]

The plane owns: the config store (D watched, or the API server's objects), the CA (persisted in S), join
tokens (file-backed in S, so `ambit mgmt token` works while the plane runs), the mTLS relay + CSR
service on --listen and the join-token bootstrap on --bootstrap-listen. The public trust bundle agents
need is S/ca-bundle.pem. `rotate-root` rewrites the CA files in S; the running plane notices the new
revision and reloads them (mgmt.ca_store.CaReloader), which is what the command waits for.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent.errors import UsageError

DEFAULT_LISTEN = "0.0.0.0:15012"
DEFAULT_BOOTSTRAP_LISTEN = "0.0.0.0:15013"
KUBE_SYNC_TIMEOUT_S = 60.0  # first list of every watched type, before the plane serves anything
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
ROTATION_STEP_CHOICES = ("prepare", "activate", "drop", "all")  # mgmt.ca_store.ROTATION_STEPS + all


def parse_duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise UsageError(f"bad duration {text!r} (examples: 90s, 30m, 1h, 7d)")
    return dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _store_nodes(snapshot: Any) -> frozenset[str]:
    return frozenset(r.obj.name for r in snapshot.of_kind("Node"))


def _store_gateways(snapshot: Any) -> frozenset[str]:
    return frozenset(f"{r.key.namespace}/{r.key.name}" for r in snapshot.of_kind("Gateway"))


def _record_names(state_dir: Path, snapshot: Any) -> None:
    from mgmt.join_tokens import GATEWAYS_FILE, record_nodes

    record_nodes(state_dir, _store_nodes(snapshot))
    record_nodes(state_dir, _store_gateways(snapshot), GATEWAYS_FILE)


def _cmd_token(args: argparse.Namespace) -> int:
    from api.spiffe import SpiffeId, SpiffeIdError
    from mgmt.join_tokens import JoinTokens, UnknownNodeError

    if bool(args.node) == bool(args.gateway):
        raise UsageError("ambit mgmt token needs --node N or --gateway NAMESPACE/NAME")
    if args.gateway:
        return _gateway_token(args)
    try:
        SpiffeId.node("check.local", args.node)
    except SpiffeIdError:
        raise UsageError(f"--node {args.node!r} is not a valid node name") from None
    known = _config_nodes(Path(args.config_dir)) if args.config_dir else None
    if known is None:
        from mgmt.join_tokens import recorded_nodes

        known = recorded_nodes(Path(args.state_dir))
    if known is None:
        raise UsageError(
            f"cannot tell whether node {args.node!r} is in the config: pass --config-dir, or start the plane "
            "with this --state-dir first"
        )
    try:
        print(JoinTokens(Path(args.state_dir)).create(args.node, parse_duration(args.ttl), known))
    except UnknownNodeError as exc:
        raise UsageError(str(exc)) from None
    return 0


def _gateway_token(args: argparse.Namespace) -> int:
    from mgmt.join_tokens import GATEWAYS_FILE, JoinTokens, UnknownNodeError, recorded_nodes

    known = (
        _config_names(Path(args.config_dir), _store_gateways)
        if args.config_dir
        else recorded_nodes(Path(args.state_dir), GATEWAYS_FILE)
    )
    if known is None:
        raise UsageError(
            f"cannot tell whether Gateway {args.gateway!r} is in the config: pass --config-dir, or start the "
            "plane with this --state-dir first"
        )
    try:
        print(
            JoinTokens(Path(args.state_dir)).create_for_gateway(args.gateway, parse_duration(args.ttl), known)
        )
    except (UnknownNodeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _config_names(config_dir: Path, names: Any) -> frozenset[str]:
    from mgmt.store import ConfigLoadError, ConfigSnapshot, read_config

    try:
        resources, _ = read_config(config_dir)
    except ConfigLoadError as exc:
        raise UsageError(f"config rejected: {exc.errors[0]}") from None
    return frozenset(names(ConfigSnapshot(resources=resources)))


def _config_nodes(config_dir: Path) -> frozenset[str]:
    # Invalid documents are skipped (per-document validity): a Node whose document is broken is unknown.
    return _config_names(config_dir, _store_nodes)


# How long rotate-root waits for the running plane to confirm it loaded a step (it polls every second).
PLANE_CONFIRM_TIMEOUT_S = 30.0
# Default pause between the steps of `--step all`: twice the agents' default trust-bundle poll (30 s), so
# every agent trusts the new root before it signs, and has re-issued its certificates before the old
# root is dropped.
DEFAULT_STEP_WAIT_S = 60.0


def _cmd_rotate_root(args: argparse.Namespace) -> int:
    import time

    from mgmt import ca_store
    from mgmt.ca import CAError

    state_dir = Path(args.state_dir)
    if not state_dir.is_dir():
        raise UsageError(f"--state-dir {state_dir}: no such directory (no plane state)")
    if args.wait is not None and args.wait < 0:
        raise UsageError("--wait must be >= 0 seconds")
    if args.step == "all":
        try:
            state = ca_store.rotation_state(ca_store.load_state(state_dir))
        except (CAError, OSError) as exc:
            raise UsageError(str(exc)) from None
        if state != "idle":
            raise UsageError(f"a rotation is already under way ({state}); resume it with single --step runs")
        steps = list(ca_store.ROTATION_STEPS)
        wait = DEFAULT_STEP_WAIT_S if args.wait is None else args.wait
    else:
        steps = [args.step]
        wait = args.wait or 0.0
    for i, step in enumerate(steps):
        try:
            ca, revision = ca_store.rotate_step(state_dir, step)
        except CAError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise UsageError(f"{state_dir}: {exc}") from None
        what = {
            "prepare": f"new root {ca.pending[1].subject.rfc4514_string() if ca.pending else '?'} "
            "added to the trust bundle",
            "activate": f"new certificates now chain to {ca.cert.subject.rfc4514_string()}",
            "drop": f"old root(s) removed; the bundle holds {len(ca.anchors())} root",
        }[step]
        print(f"{step}: {what} (revision {revision})", flush=True)
        if not ca_store.wait_loaded(state_dir, revision, PLANE_CONFIRM_TIMEOUT_S):
            if len(steps) > 1:
                print(
                    f"ambit: no running plane loaded revision {revision} within "
                    f"{PLANE_CONFIRM_TIMEOUT_S:.0f} s (is it running on this state dir?); "
                    f"stopped after {step}",
                    file=sys.stderr,
                )
                return 1
            print(f"{step}: saved; no running plane confirmed it (it takes effect when the plane starts)")
            continue
        print(f"{step}: the running plane loaded revision {revision}", flush=True)
        if wait and (len(steps) == 1 or i < len(steps) - 1):  # no pause after the last step of all
            print(f"{step}: waiting {wait:.0f} s for agents to follow", flush=True)
            time.sleep(wait)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    if args.verb == "token":
        return _cmd_token(args)
    if args.verb == "rotate-root":
        return _cmd_rotate_root(args)
    if not args.state_dir or (args.source == "files" and not args.config_dir):
        raise UsageError("ambit mgmt needs --state-dir, and --config-dir with --source files")
    from api import logformat

    logformat.configure("info", args.log_format)
    plane = Plane(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            plane.start()
        except OSError as exc:  # a listener could not bind: one line, not a traceback
            print(f"ambit mgmt: {exc}", file=sys.stderr)
            return 1
        # Timed waits: a signal the kernel hands to another thread runs its Python handler only once the
        # main thread executes bytecode again.
        while not stop.wait(0.2):
            pass
    finally:
        plane.stop()
    return 0


class Plane:
    """Everything `ambit mgmt` runs, started in dependency order and stopped in reverse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._stops: list[Any] = []
        self._config_counters: dict[str, Any] = {}  # the config source's, for the admin API

    def start(self) -> None:
        from api.jsonlog import AuditLog
        from mgmt import ca_store
        from mgmt.bootstrap import BootstrapServer
        from mgmt.ca import CAError
        from mgmt.gateway_scope import CurrentGateways
        from mgmt.identity_service import add_identity_service
        from mgmt.join_tokens import JoinTokens, UnknownNodeError
        from mgmt.metrics import PlaneCollector, PlaneMetrics
        from mgmt.server import MgmtServer

        a = self.args
        state_dir = Path(a.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # AuditLog.record(event, /, **fields) satisfies mgmt's Audit protocol at run time; mypy is stricter.
        audit: Any = AuditLog(a.audit_log) if a.audit_log else None
        store = self._config_store(state_dir)
        upstream = ca_store.Upstream.from_dir(Path(a.ca_dir)) if a.ca_dir else None
        try:
            ca = ca_store.load_or_create(state_dir, a.trust_domain, upstream)
        except (CAError, OSError) as exc:
            raise UsageError(f"certificate authority: {exc}") from None
        if upstream is None:  # a root kept in the state dir: follow `ambit mgmt rotate-root`
            reloader = ca_store.CaReloader(state_dir, ca)
            reloader.start()
            self._stops.append(reloader.stop)
        tokens = JoinTokens(state_dir)
        _record_names(state_dir, store.current)  # for `ambit mgmt token`, refreshed per version
        store.add_listener(lambda snapshot: _record_names(state_dir, snapshot))
        gateways = CurrentGateways(lambda: store.current, a.trust_domain)

        csr_services: list[Any] = []

        def add_csr_service(grpc_server: Any) -> None:
            csr_services.append(
                add_identity_service(grpc_server, ca, store, audit, gateways=gateways.is_gateway)
            )

        server = MgmtServer(
            store,
            ca,
            a.listen,
            a.trust_domain,
            extra_services=[add_csr_service],
            audit=audit,
        )
        server.start()
        self._stops.append(server.stop)
        bootstrap = BootstrapServer(
            ca, tokens, a.bootstrap_listen, audit, kube=self._kube_verifier(), gateways=gateways.index
        )
        bootstrap.start()
        self._stops.append(bootstrap.stop)
        store.watch()
        self._stops.append(store.stop)
        csr = csr_services[0].counters
        metrics = PlaneMetrics(PlaneCollector(store, server.relay, ca, csr, bootstrap.counters))
        self._start_admission_and_admin(
            ca,
            server.relay,
            {"csr": csr, "bootstrap": bootstrap.counters, **self._config_counters},
            metrics.registry,
        )
        for node in a.join_token or ():
            try:
                print(
                    f"join-token {node} {tokens.create(node, known_nodes=_store_nodes(store.current))}",
                    flush=True,
                )
            except UnknownNodeError as exc:
                raise UsageError(str(exc)) from None
        print(
            f"mgmt: relay on port {server.port}, bootstrap on port {bootstrap.port}, config version "
            f"{store.version}, trust bundle {state_dir / ca_store.BUNDLE_FILE}",
            file=sys.stderr,
            flush=True,
        )

    def _kube_verifier(self) -> Any:
        """With --kube-bootstrap: nodes may join with their agent pod's ServiceAccount token."""
        a = self.args
        if not a.kube_bootstrap:
            return None
        from mgmt.kube.client import api_client
        from mgmt.kube_bootstrap import AgentPods, KubeNodeVerifier

        return KubeNodeVerifier(api_client(a.kubeconfig), AgentPods.parse(a.kube_bootstrap))

    def _start_admission_and_admin(
        self, ca: Any, relay: Any, counters: dict[str, Any], registry: Any
    ) -> None:
        from mgmt.admin import ADMIN_LISTEN, PlaneAdmin

        a = self.args
        if a.webhook_listen:
            from mgmt.webhook import WebhookServer

            dns = tuple(d for d in a.webhook_dns.split(",") if d)

            def mesh_configs() -> list[str]:
                return [r.obj.meta.name for r in relay.store.current.of_kind("MeshConfig")]

            webhook = WebhookServer(ca, a.trust_domain, a.webhook_listen, dns, mesh_configs)
            webhook.start()
            self._stops.append(webhook.stop)
            counters["webhook"] = webhook.counters
            print(f"mgmt: admission webhook on port {webhook.port}", file=sys.stderr, flush=True)
        admin = PlaneAdmin(relay, a.admin_listen or ADMIN_LISTEN, counters, registry)
        try:
            admin.start()
        except OSError as exc:
            if a.admin_listen:  # asked for: the probes depend on it
                raise UsageError(f"--admin-listen {a.admin_listen}: {exc}") from None
            # The default port is taken (another plane on this host, a test): run without the admin API.
            logging.getLogger("ambit.mgmt").warning("admin API not started on %s: %s", ADMIN_LISTEN, exc)
            return
        self._stops.append(admin.stop)
        print(f"mgmt: admin on port {admin.port}", file=sys.stderr, flush=True)
        admin.set_ready()

    def _config_store(self, state_dir: Path) -> Any:
        """The store, fed by the files (invalid documents are logged and skipped) or by the API server."""
        from mgmt.store import ConfigStore

        a = self.args
        if a.source == "files":
            store = ConfigStore(a.config_dir, state_dir, trust_domain=a.trust_domain)
            for err in store.load():
                print(f"mgmt: skipped invalid document: {err}", file=sys.stderr, flush=True)
            self._config_counters = {"config": store.counters}
            return store
        from mgmt.kube.client import api_client
        from mgmt.kube.source import KubeSource

        store = ConfigStore(None, state_dir, trust_domain=a.trust_domain)
        source = KubeSource(api_client(a.kubeconfig), store)
        source.start()
        self._stops.append(source.stop)
        # invalid_objects, rejected_objects, per-type lists/relists/watches/errors, Events posted/dropped
        self._config_counters = {"config": store.counters, "kube": source.counters}
        if not source.wait_synced(KUBE_SYNC_TIMEOUT_S):
            raise UsageError(
                f"the Kubernetes API was not listed within {KUBE_SYNC_TIMEOUT_S:.0f} s (see the log)"
            )
        return store

    def stop(self) -> None:
        while self._stops:
            try:
                self._stops.pop()()
            except Exception:
                logging.getLogger("ambit.mgmt").exception("stopping the plane")


def add_mgmt_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mgmt",
        help="run the management plane (or `ambit mgmt token` for a join token)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  ambit mgmt --config-dir /etc/ambit/config --state-dir /var/lib/ambit/mgmt \\\n"
        "      --admin-listen 0.0.0.0:15014 --log-format json\n"
        "  ambit mgmt token --state-dir /var/lib/ambit/mgmt --node node1 --ttl 1h\n"
        "  ambit mgmt token --state-dir /var/lib/ambit/mgmt --gateway shop/edge\n"
        "  ambit mgmt rotate-root --state-dir /var/lib/ambit/mgmt --step prepare",
    )
    p.add_argument(
        "--source",
        choices=["files", "kube"],
        default="files",
        help="config from --config-dir (files) or from the Kubernetes API (kube; docs/kube.md)",
    )
    p.add_argument("--config-dir", help="directory of YAML resources (watched; --source files)")
    p.add_argument(
        "--kubeconfig", help="--source kube: kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    p.add_argument("--state-dir", help="CA, join tokens and config version (private, 0700)")
    p.add_argument(
        "--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)"
    )
    p.add_argument("--listen", default=DEFAULT_LISTEN, help="relay + CSR service, mTLS (default %(default)s)")
    p.add_argument(
        "--bootstrap-listen", default=DEFAULT_BOOTSTRAP_LISTEN, help="join bootstrap (default %(default)s)"
    )
    p.add_argument("--join-token", nargs="+", metavar="NODE", help="print a one-time join token per NODE")
    p.add_argument(
        "--ca-dir",
        help="run as an intermediate CA under an external root: DIR holds ca-cert.pem, ca-key.pem (0600), "
        "root-cert.pem and optionally cert-chain.pem (default: a self-signed root kept in --state-dir)",
    )
    p.add_argument("--audit-log", help="JSON-lines audit log of refused requests and joins")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="stderr log: text or JSON")
    p.add_argument(
        "--admin-listen",
        "--metrics-listen",
        dest="admin_listen",
        metavar="HOST:PORT",
        help="istiod's 15014: Prometheus /metrics, readiness, per-node ACK/NACK status (`ambit debug "
        "status`), counters (default 127.0.0.1:15014, skipped with a warning when that port is taken)",
    )
    p.add_argument(
        "--webhook-listen", help="serve the validating admission webhook (HTTPS) here, e.g. 0.0.0.0:15017"
    )
    p.add_argument(
        "--webhook-dns",
        default="",
        help="comma-separated DNS names of the webhook certificate (the Service: ambit-mgmt.NS.svc)",
    )
    p.add_argument(
        "--kube-bootstrap",
        metavar="NS/SA/DAEMONSET",
        help="admit nodes presenting the ServiceAccount token of a pod of this agent DaemonSet on that node "
        "(TokenReview; --kubeconfig or in-cluster credentials), e.g. ambit-system/ambit-agent/ambit-agent",
    )
    p.set_defaults(func=_cmd_run, verb=None)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    token = verbs.add_parser(
        "token", help="create a one-time join token for a node or an edge gateway (prints it)"
    )
    token.add_argument("--state-dir", required=True, help="the plane's state directory")
    token.add_argument("--node", help="node name the token admits (must be a Node in the config)")
    token.add_argument(
        "--gateway",
        metavar="NAMESPACE/NAME",
        help="instead of --node: the Gateway whose SVID the token buys (`ambit gateway --plane`)",
    )
    token.add_argument(
        "--config-dir",
        help="the plane's config directory (default: the node list the running plane recorded)",
    )
    token.add_argument("--ttl", default="1h", help="token lifetime, e.g. 10m, 1h (default %(default)s)")
    rotate = verbs.add_parser(
        "rotate-root",
        help="rotate the root CA of a running plane without dropping connections",
        description="prepare: a new root joins the trust bundle; activate: new certificates chain to it "
        "(agents re-issue theirs at their next bundle poll); drop: the old root leaves the bundle. The "
        "running plane reloads each step from the state dir.",
    )
    rotate.add_argument("--state-dir", required=True, help="the plane's state directory")
    rotate.add_argument(
        "--step", choices=[*ROTATION_STEP_CHOICES], default="all", help="step to run (default %(default)s)"
    )
    rotate.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="after the plane loaded a step, wait this long for agents to follow (default 0 for one step; "
        f"{DEFAULT_STEP_WAIT_S:.0f} between the steps of `all`: at least twice the agents' bundle poll)",
    )
