"""`ambit gateway`: run the edge gateway from a directory of Gateway/HTTPRoute/WafPolicy/Service/Secret
YAML, or `--check` it (every WafPolicy compiled, every reference resolved) and exit."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.hbone import Identity


def _run(args: argparse.Namespace) -> int:
    from gateway import config as gwconfig
    from gateway import dataplane as dp
    from gateway.server import GatewayServer, ServerOptions, check, load_plan
    from gateway.waf import WafConfigError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
            identity=read_identity(Path(args.identity_dir)) if args.identity_dir else None,
        )
        server = GatewayServer(plan, options)
    except (gwconfig.GatewayConfigError, WafConfigError, dp.DataplaneError) as exc:
        print(f"ambit gateway: config refused: {exc}", file=sys.stderr)
        return 2
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    def reload(*_: object) -> None:
        try:
            server.reload(load_plan(directory, args.gateway))
        except (gwconfig.GatewayConfigError, WafConfigError, dp.DataplaneError) as exc:
            logging.getLogger("gateway").error("reload refused, the previous config stays: %s", exc)

    signal.signal(signal.SIGHUP, reload)
    print(f"ambit gateway: {plan.gateway} listening on {server.ports}", flush=True)
    done.wait()
    server.stop()
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
        ),
    )
    p.add_argument("--config-dir", required=True, help="directory of Gateway/HTTPRoute/WafPolicy/... YAML")
    p.add_argument(
        "--gateway", default="", help="namespace/name of the Gateway to serve (default: the only one)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="data plane loop threads; the WAF runs on each (default: 2 when there are 2+ CPUs)",
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
    p.add_argument("--prefix", default=os.environ.get("AMBIT_LAB_PREFIX", DEFAULT_PREFIX), help="lab prefix")
    p.set_defaults(func=_run)
