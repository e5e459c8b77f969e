"""One-time, expiring join tokens that a node exchanges for its node certificate.

Tokens live in `<state_dir>/join-tokens.json` (0600) so `ambit mgmt token` can mint one while the server
runs; a flock serialises the two processes. Only a SHA-256 of each token is stored: a leaked state file does
not let anyone join. A consumed token is kept (marked used) until it expires so a replay is reported as such.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from api.spiffe import SpiffeId
from mgmt.ca_store import check_private, write_file

TOKENS_FILE = "join-tokens.json"
# The node names of the running plane's current config, rewritten on every version: `ambit mgmt token`
# (another process, maybe without the config) refuses to mint a token for a node the config does not list.
NODES_FILE = "config-nodes.json"
# The same for the config's Gateways ("namespace/name"): `ambit mgmt token --gateway`.
GATEWAYS_FILE = "config-gateways.json"
# A token minted for an edge gateway is bound to this subject instead of a node name (node names are SPIFFE
# path segments and never contain ':').
GATEWAY_SUBJECT = "gateway:"
LOCK_FILE = "join-tokens.lock"
DEFAULT_TOKEN_TTL = dt.timedelta(hours=1)
# Expired and used tokens are remembered this long so a late replay is reported as expired/used.
RETAIN_S = 24 * 3600.0


class TokenError(Exception):
    """A token was refused; `kind` is "unknown", "expired" or "used" (for audit and counters)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class UnknownNodeError(ValueError):
    """A token was asked for a node the config does not list (one line, for the CLI)."""


def record_nodes(state_dir: Path, nodes: Iterable[str], file: str = NODES_FILE) -> None:
    """What the plane calls on every accepted config version (atomic; 0600 like the rest of the state)."""
    Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file(Path(state_dir) / file, json.dumps(sorted(set(nodes))).encode(), 0o600)


def recorded_nodes(state_dir: Path, file: str = NODES_FILE) -> frozenset[str] | None:
    """The node names (or, with GATEWAYS_FILE, Gateways) the plane last recorded; None when no plane has
    run with this state dir."""
    path = Path(state_dir) / file
    if not path.exists():
        return None
    return frozenset(json.loads(path.read_text()))


def gateway_subject(gateway: str) -> str:
    return f"{GATEWAY_SUBJECT}{gateway}"


def check_known_node(node: str, known: Collection[str]) -> None:
    if node not in known:
        listed = ", ".join(sorted(known)[:10]) or "none"
        raise UnknownNodeError(f"node {node!r} is not in the config (nodes: {listed})")


def fingerprint(token: str) -> str:
    """What logs and audit records show instead of the token: a short digest prefix."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(state_dir)
        self._clock = clock

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self._dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self._dir / TOKENS_FILE
            entries: dict[str, Any] = {}
            if path.exists():
                check_private(path)
                entries = json.loads(path.read_text() or "{}")
            before = json.dumps(entries, sort_keys=True)
            yield entries
            now = self._clock()
            live = {k: v for k, v in entries.items() if v["expires"] + RETAIN_S > now}
            if json.dumps(live, sort_keys=True) != before:
                write_file(path, json.dumps(live, sort_keys=True).encode(), 0o600)

    def create(
        self,
        node: str,
        ttl: dt.timedelta | float = DEFAULT_TOKEN_TTL,
        known_nodes: Collection[str] | None = None,
    ) -> str:
        """A new token for `node`; with `known_nodes` (the config's Node names) an unknown node is refused
        (UnknownNodeError): a token must never admit a node the mesh does not route to or scope for."""
        SpiffeId.node("example.org", node)  # validates the name with the SPIFFE path rules
        if known_nodes is not None:
            check_known_node(node, known_nodes)
        return self._mint(node, ttl)

    def create_for_gateway(
        self,
        gateway: str,
        ttl: dt.timedelta | float = DEFAULT_TOKEN_TTL,
        known_gateways: Collection[str] | None = None,
    ) -> str:
        """A token an edge gateway trades for the SVID of Gateway `gateway` ("namespace/name"); with
        `known_gateways` (the config's Gateways) an unknown one is refused (UnknownNodeError)."""
        namespace, _, name = gateway.partition("/")
        SpiffeId.workload("example.org", namespace or "-", name or "-")  # path segment rules for both
        if not namespace or not name or "/" in name:
            raise ValueError(f"gateway must be namespace/name, got {gateway!r}")
        if known_gateways is not None and gateway not in known_gateways:
            listed = ", ".join(sorted(known_gateways)[:10]) or "none"
            raise UnknownNodeError(f"Gateway {gateway!r} is not in the config (gateways: {listed})")
        return self._mint(gateway_subject(gateway), ttl)

    def _mint(self, subject: str, ttl: dt.timedelta | float) -> str:
        seconds = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
        if seconds <= 0:
            raise ValueError("join token TTL must be positive")
        token = secrets.token_urlsafe(32)
        with self._locked() as entries:
            # "node" holds the subject: a node name, or gateway_subject() for a gateway's token.
            entries[_digest(token)] = {"node": subject, "expires": self._clock() + seconds, "used": False}
        return token

    def consume(self, token: str) -> str:
        """The node (or gateway_subject()) the token was minted for; raises TokenError if unknown, expired
        or already used."""
        with self._locked() as entries:
            entry = entries.get(_digest(token))
            if entry is None:
                raise TokenError("unknown", f"unknown join token {fingerprint(token)}")
            if entry["used"]:
                raise TokenError(
                    "used", f"join token {fingerprint(token)} was already used by {entry['node']}"
                )
            if entry["expires"] <= self._clock():
                raise TokenError(
                    "expired", f"join token {fingerprint(token)} for {entry['node']} has expired"
                )
            entry["used"] = True
            return str(entry["node"])
