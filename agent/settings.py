"""The node agent's settings: parsed and checked once, before anything starts."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UsageError
from agent.proxy.limits import Limits
from api.spiffe import SpiffeId, SpiffeIdError

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/ambit")
PLANE_SERVER_NAME = "ambit-mgmt"  # DNS SAN of the plane's serving certificate


def host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class AgentSettings:
    node: str
    mgmt: str  # relay + CA service (mTLS with the node certificate)
    bootstrap: str  # join-token exchange (server-auth TLS)
    trust_bundle: Path
    join_token_file: Path  # a one-time join token, or with kube_token the pod's ServiceAccount token
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    listen_ip: str = "0.0.0.0"  # where HBONE (15008) and plaintext inbound (15006) listen
    admin: str = "127.0.0.1:15000"
    metrics: str = "0.0.0.0:15020"
    readiness: str = "0.0.0.0:15021"
    pin_dir: Path = DEFAULT_PIN_ROOT
    redirect: bool = True
    keep_datapath: bool = False
    access_log: Path | None = None
    audit_log: Path | None = None
    log_level: str = "info"
    log_format: str = "text"  # or "json": one JSON object per line (api/logformat.py)
    bundle_refresh_s: float = 30.0
    kube_token: bool = False
    limits: Limits = Limits()  # per-peer limits: the engine's share set at start, the rest the proxy's

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentSettings:
        try:
            SpiffeId.node(args.trust_domain, args.node)
        except SpiffeIdError as exc:
            raise UsageError(f"--node/--trust-domain do not form a node identity: {exc}") from None
        for what in ("mgmt", "bootstrap", "admin", "metrics", "readiness"):
            host_port(getattr(args, what), f"--{what}")
        try:
            ipaddress.ip_address(args.listen_ip)
        except ValueError:
            raise UsageError(f"--listen-ip must be an IP address, got {args.listen_ip!r}") from None
        if not 0.5 <= args.bundle_refresh <= 3600:
            raise UsageError(
                f"--bundle-refresh must be between 0.5 and 3600 seconds, got {args.bundle_refresh}"
            )
        if bool(args.join_token_file) == bool(args.kube_token_file):
            raise UsageError("give one of --join-token-file (lab, VMs) or --kube-token-file (Kubernetes)")
        token_arg = "join_token_file" if args.join_token_file else "kube_token_file"
        for what in ("trust_bundle", token_arg):
            path = Path(getattr(args, what))
            if not path.is_file():
                raise UsageError(f"--{what.replace('_', '-')} {path}: no such file")
        return cls(
            node=args.node,
            mgmt=args.mgmt,
            bootstrap=args.bootstrap,
            trust_bundle=Path(args.trust_bundle),
            join_token_file=Path(getattr(args, token_arg)),
            trust_domain=args.trust_domain,
            listen_ip=args.listen_ip,
            admin=args.admin,
            metrics=args.metrics,
            readiness=args.readiness,
            pin_dir=Path(args.pin_dir) if args.pin_dir else DEFAULT_PIN_ROOT / args.node,
            redirect=not args.no_redirect,
            keep_datapath=args.keep_datapath,
            access_log=Path(args.access_log) if args.access_log else None,
            audit_log=Path(args.audit_log) if args.audit_log else None,
            log_level=args.log_level,
            log_format=args.log_format,
            bundle_refresh_s=args.bundle_refresh,
            kube_token=bool(args.kube_token_file),
            limits=parse_limits(args.limit or []),
        )


def parse_limits(items: list[str]) -> Limits:
    """`--limit NAME=N` (repeatable) over the defaults in agent/proxy/limits.py; bad ones: UsageError."""
    given: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in Limits.names():
            raise UsageError(f"--limit {item!r}: want NAME=N, NAME one of {', '.join(Limits.names())}")
        if not value.strip().isdigit():
            raise UsageError(f"--limit {item!r}: N must be an integer >= 0 (0: unlimited)")
        given[name] = int(value)
    try:
        return Limits(**given)
    except ValueError as exc:
        raise UsageError(f"--limit: {exc}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", required=True, help="this node's name (its identity is spiffe://TD/node/NAME)")
    p.add_argument("--mgmt", required=True, help="management plane relay address HOST:PORT (port 15012)")
    p.add_argument("--bootstrap", required=True, help="management plane bootstrap address HOST:PORT (15013)")
    p.add_argument("--trust-bundle", required=True, help="PEM file with the mesh's trust anchors")
    p.add_argument("--join-token-file", help="file holding the one-time join token")
    p.add_argument(
        "--kube-token-file",
        help="on Kubernetes, instead: the pod's projected ServiceAccount token (audience ambit), re-read "
        "at each join",
    )
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="default %(default)s")
    p.add_argument("--listen-ip", default="0.0.0.0", help="address of the 15008/15006 listeners")
    p.add_argument("--admin", default="127.0.0.1:15000", help="admin HTTP (localhost only by default)")
    p.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus /metrics")
    p.add_argument("--readiness", default="0.0.0.0:15021", help="/healthz/ready")
    p.add_argument("--pin-dir", default="", help=f"bpffs pin directory (default {DEFAULT_PIN_ROOT}/NODE)")
    p.add_argument("--no-redirect", action="store_true", help="do not load eBPF redirection")
    p.add_argument(
        "--keep-datapath",
        action="store_true",
        help="leave BPF programs and rules in place on exit (upgrades)",
    )
    p.add_argument("--access-log", default="", help="JSON-lines access log file")
    p.add_argument("--audit-log", default="", help="JSON-lines audit log file")
    p.add_argument(
        "--bundle-refresh",
        type=float,
        default=30.0,
        help="seconds between trust-bundle polls (root rotation reaches the agent within this)",
    )
    defaults = Limits()
    p.add_argument(
        "--limit",
        action="append",
        metavar="NAME=N",
        help="a per-peer limit (repeatable; 0 = unlimited); defaults: "
        + ", ".join(f"{n}={getattr(defaults, n)}" for n in Limits.names()),
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="stderr log: text or JSON")
