"""Certificates per second: local signing by the CA (baseline), and full SVID fetches by an agent (key
generation + CSR + mTLS gRPC round trip + chain check) against a plane on loopback.

Ratios read as "fraction of raw signing speed the whole path keeps". Each phase runs ~3 s.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.bootstrap import join
from agent.identity.manager import IdentityManager
from api.spiffe import SpiffeId
from mgmt import ca_store
from mgmt.bootstrap import BootstrapServer
from mgmt.identity_service import add_identity_service, plane_server_credentials
from mgmt.join_tokens import JoinTokens

PHASE_S = 3.0
TD = "cluster.local"
IDS = [f"spiffe://{TD}/ns/bench/sa/sa-{i}" for i in range(64)]


def _rate(step: Callable[[int], object]) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < PHASE_S:
        step(done)
        done += 1
    return done / (time.perf_counter() - started)


class _Directory:
    def identities_on_node(self, node: str) -> frozenset[str]:
        return frozenset(IDS)


def _fresh(manager: IdentityManager, spiffe_id: str) -> None:
    manager.forget(spiffe_id)  # defeat the cache: every call is a new key, CSR and signing round trip
    manager.svid_for(spiffe_id)


def run() -> list[dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix="bench-identity-"))
    ca = ca_store.load_or_create(state, TD)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    sign_rate = _rate(lambda i: ca.issue(SpiffeId.parse(IDS[i % len(IDS)]), key))

    tokens = JoinTokens(state)
    bootstrap = BootstrapServer(ca, tokens, "127.0.0.1:0")
    bootstrap.start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_identity_service(server, ca, _Directory())
    port = server.add_secure_port("127.0.0.1:0", plane_server_credentials(ca, True))
    server.start()
    try:
        node = join(f"127.0.0.1:{bootstrap.port}", tokens.create("bench", 60), "bench", ca.bundle_pem())
        manager = IdentityManager(f"127.0.0.1:{port}", node, TD)
        fetch_rate = _rate(lambda i: _fresh(manager, IDS[i % len(IDS)]))
        cached_rate = _rate(lambda i: manager.svid_for(IDS[0]))
        manager.stop()
    finally:
        server.stop(0)
        bootstrap.stop(0)
    rows: list[dict[str, Any]] = [
        {"name": "identity.ca_sign", "value": sign_rate, "unit": "certs/s", "baseline": ""},
        {
            "name": "identity.svid_fetch_grpc",
            "value": fetch_rate,
            "unit": "certs/s",
            "baseline": "identity.ca_sign",
        },
        {
            "name": "identity.svid_cached",
            "value": cached_rate,
            "unit": "lookups/s",
            "baseline": "identity.ca_sign",
        },
    ]
    return rows
