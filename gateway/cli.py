"""`ambit gateway`: run the edge gateway from a directory of Gateway/HTTPRoute/WafPolicy/Service/Secret
YAML, or `--check` it (every WafPolicy compiled, every reference resolved) and exit; or, with `--plane`, as a
client of the management plane (SVID by CSR, config over the relay: gateway/plane.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import UsageError

if TYPE_CHECKING:
    from gateway.hbone import Identity


def _run(args: argparse.Namespace) -> int:
    from gateway import config as gwconfig
    from gateway import dataplane as dp
    from gateway.server import GatewayServer, ServerOptions, check, load_plan
    from gateway.waf import WafConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.config_dir) == bool(args.plane or args.lab_node):
        raise UsageError("ambit gateway needs --config-dir D (files) or --plane ADDR (the management plane)")
    if args.lab_node:
        return _start_in_lab_from_plane(args)
    if args.plane:
        return _run_from_plane(args)
    directory = Path(args.config_dir)
    if args.lab_pod:
        return _start_in_lab(args, directory)
    try:
        plan = load_plan(directory, args.gateway)
        if args.check:
            for warning in check(plan):
                print(f"warning: {warning}")
            print(
                f"ok: Gateway {plan.gateway}: {len(plan.listeners)} listeners, {len(plan.routes)} routes, "
                f"{len(plan.entries)} table entries"
            )
            return 0
        options = ServerOptions(
            threads=args.threads,
            audit_log=Path(args.audit_log) if args.audit_log else None,
            metrics_listen=args.metrics,
            listen_address=args.listen_address,
            identity=read_identity(Path(args.identity_dir)) if args.identity_dir else None,
        )
        server = GatewayServer(plan, options)
    except (gwconfig.GatewayConfigError, WafConfigError, dp.DataplaneError) as exc:
        print(f"ambit gateway: config refused: {exc}", file=sys.stderr)
        return 2
    try:
        server.start()
    except OSError as exc:
        hint = "--listen-address overrides the Gateway's addresses"
        print(f"ambit gateway: {exc.strerror} ({hint})", file=sys.stderr)
        return 2
    done = threading.Event()

    def reload(*_: object) -> None:
        try:
            server.reload(load_plan(directory, args.gateway))
        except (gwconfig.GatewayConfigError, WafConfigError, dp.DataplaneError) as exc:
            logging.getLogger("gateway").error("reload refused, the previous config stays: %s", exc)

    signal.signal(signal.SIGHUP, reload)
    print(f"ambit gateway: {plan.gateway} listening on {server.ports}", flush=True)
    _wait_for_signal(done)
    server.stop()
    return 0


def _wait_for_signal(done: threading.Event) -> None:
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    # Timed waits: a signal's Python handler runs only once the main thread executes bytecode again.
    while not done.wait(0.5):
        pass


def _secret(args: argparse.Namespace) -> tuple[str, bool]:
    """(token, is a ServiceAccount token) from the flags; the token is never logged."""
    given = [bool(args.join_token), bool(args.join_token_file), bool(args.service_account_token_file)]
    if sum(given) != 1:
        raise UsageError(
            "--plane needs one of --join-token-file F, --join-token T or --service-account-token-file F"
        )
    if args.service_account_token_file:
        return Path(args.service_account_token_file).read_text().strip(), True
    if args.join_token_file:
        return Path(args.join_token_file).read_text().strip(), False
    return str(args.join_token), False


def _run_from_plane(args: argparse.Namespace) -> int:
    from agent.identity.bootstrap import JoinError
    from gateway.plane import PlaneGateway, PlaneOptions
    from gateway.server import ServerOptions

    if not args.gateway or not args.trust_bundle:
        raise UsageError(
            "--plane needs --gateway NAMESPACE/NAME and --trust-bundle F (the plane's CA bundle)"
        )
    if args.identity_dir:
        raise UsageError("--identity-dir is for --config-dir: with --plane the SVID comes from the plane")
    token, service_account = _secret(args)
    host = args.plane.rpartition(":")[0]
    plane = PlaneOptions(
        relay=args.plane,
        bootstrap=args.bootstrap or f"{host}:15013",
        trust_bundle_pem=Path(args.trust_bundle).read_bytes(),
        gateway=args.gateway,
        token=token,
        service_account=service_account,
        bundle_refresh_s=args.bundle_refresh,
    )
    options = ServerOptions(
        threads=args.threads,
        audit_log=Path(args.audit_log) if args.audit_log else None,
        metrics_listen=args.metrics,
        listen_address=args.listen_address,
    )
    gateway = PlaneGateway(plane, options)
    done = threading.Event()
    try:
        gateway.start()
    except JoinError as exc:
        print(f"ambit gateway: {exc}", file=sys.stderr)
        return 2
    print(f"ambit gateway: {args.gateway} joined; config from {args.plane}", flush=True)
    _wait_for_signal(done)
    gateway.stop()
    return 0


def read_identity(directory: Path) -> Identity:
    from cryptography import x509

    from gateway.hbone import Identity

    chain = (directory / "svid.pem").read_bytes()
    leaf = x509.load_pem_x509_certificate(chain)
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    return Identity(
        uris[0] if uris else "",
        chain,
        (directory / "key.pem").read_bytes(),
        (directory / "bundle.pem").read_bytes(),
    )


def _start_in_lab(args: argparse.Namespace, directory: Path) -> int:
    from agent.lab import gateway as lab_gateway
    from gateway.server import check, load_plan

    plan = load_plan(directory, args.gateway)
    check(plan)  # refuse a bad config here rather than in the background process
    ports = [lp.port for lp in plan.listeners]
    audit = lab_gateway.start(args.prefix, args.lab_pod, directory.resolve(), ports[0])
    print(
        f"ambit gateway: {plan.gateway} running in lab pod {args.lab_pod} on ports {ports}; audit log {audit}"
    )
    return 0


def _start_in_lab_from_plane(args: argparse.Namespace) -> int:
    from agent.lab import gateway as lab_gateway

    if not args.gateway or not args.port:
        raise UsageError("--lab-node needs --gateway NAMESPACE/NAME and --port (its listener, to wait for)")
    audit = lab_gateway.start_from_plane(args.prefix, args.lab_node, args.gateway, args.port)
    print(
        f"ambit gateway: {args.gateway} running on lab node {args.lab_node}, config from the lab's plane; "
        f"audit log {audit}"
    )
    return 0


def add_gateway_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.cliargs import add_command
    from agent.lab.plan import DEFAULT_PREFIX

    p = add_command(
        sub,
        "gateway",
        "edge gateway with a WAF (Gateway API config from files)",
        (
            "ambit gateway --config-dir edge/ --check            # compile every WafPolicy, resolve refs",
            "ambit gateway --config-dir edge/ --audit-log waf.jsonl --metrics 127.0.0.1:15020",
            "ambit gateway --config-dir edge/ --identity-dir svid/  # HBONE backends as the gateway",
            "ambit gateway --config-dir edge/ --lab-pod pod-1-2     # inside a lab pod (ambit lab mesh)",
            "ambit gateway --plane 10.0.0.2:15012 --trust-bundle ca-bundle.pem --gateway shop/edge \\\n"
            "      --join-token-file edge.token                    # SVID and config from the plane",
            "ambit gateway --lab-node node-1 --gateway demo/edge --port 8000  # the lab's plane, on node-1",
        ),
    )
    p.add_argument("--config-dir", default="", help="directory of Gateway/HTTPRoute/WafPolicy/... YAML")
    p.add_argument(
        "--plane", default="", help="the management plane's mTLS address host:port (instead of --config-dir)"
    )
    p.add_argument("--bootstrap", default="", help="--plane: its bootstrap address (default: port 15013)")
    p.add_argument("--trust-bundle", default="", help="--plane: the plane's CA bundle (PEM), to verify it")
    p.add_argument(
        "--join-token-file", default="", help="--plane: file holding a token of `ambit mgmt token --gateway`"
    )
    p.add_argument(
        "--join-token", default="", help="--plane: the token itself (visible in ps: prefer a file)"
    )
    p.add_argument(
        "--service-account-token-file",
        default="",
        help="--plane on Kubernetes: the pod's projected ServiceAccount token (audience ambit)",
    )
    p.add_argument(
        "--bundle-refresh", type=float, default=30.0, help="--plane: trust bundle poll interval, seconds"
    )
    p.add_argument(
        "--gateway", default="", help="namespace/name of the Gateway to serve (default: the only one)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="data plane loop threads; the WAF runs on each (default: 2 when there are 2+ CPUs)",
    )
    p.add_argument(
        "--listen-address",
        default="",
        help="bind every listener on this address (default: the Gateway's spec.addresses[0], else 0.0.0.0; "
        "on Kubernetes spec.addresses is the external address: the chart passes 0.0.0.0)",
    )
    p.add_argument("--audit-log", default="", help="JSON-lines audit log of WAF blocks and detections")
    p.add_argument("--metrics", default="", help="Prometheus listen address host:port (default: none)")
    p.add_argument(
        "--identity-dir",
        default="",
        help="the gateway's SVID for HBONE backends: svid.pem "
        "(chain), key.pem, bundle.pem (read into memory)",
    )
    p.add_argument("--check", action="store_true", help="validate and compile the config, then exit")
    p.add_argument("--lab-pod", default="", help="start it in the background inside this lab pod (ambit lab)")
    p.add_argument(
        "--lab-node",
        default="",
        help="start it in the background on this lab node, as a client of the lab's plane (ambit lab mesh)",
    )
    p.add_argument("--port", type=int, default=0, help="--lab-node: the listener port to wait for")
    p.add_argument("--prefix", default=os.environ.get("AMBIT_LAB_PREFIX", DEFAULT_PREFIX), help="lab prefix")
    p.set_defaults(func=_run)
