"""Helpers for the native engine tests: a real CA and SVIDs, event waiting, fd counting, TCP pairs, scripts
run in a network namespace of their own."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine, Event

TD = "cluster.local"
CLIENT_ID = SpiffeId.workload(TD, "default", "client")


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes


def issue(ca: CertificateAuthority, spiffe_id: SpiffeId) -> Svid:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue(spiffe_id, key.public_key())
    return Svid(
        str(spiffe_id),
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    bundle: bytes
    client: Svid
    server: Svid


def make_pki() -> Pki:
    ca = CertificateAuthority.generate_root(TD)
    return Pki(ca, ca.bundle_pem(), issue(ca, CLIENT_ID), issue(ca, SpiffeId.node(TD, "node-2")))


class Events:
    """Collects engine events; `wait` blocks on the eventfd until a matching event arrives."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[Event] = []

    def drain(self) -> None:
        self.seen.extend(self.engine.events())

    def wait(self, pred: Callable[[Event], bool], timeout: float = 20.0) -> Event:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            for ev in self.seen:
                if pred(ev):
                    self.seen.remove(ev)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event; seen: {self.seen}")
            select.select([self.engine.eventfd], [], [], left)

    def kind(self, kind: str, **fields: object) -> Event:
        return self.wait(lambda e: e.kind == kind and all(getattr(e, k) == v for k, v in fields.items()))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (real TCP, so resets and FINs behave as on the wire)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    return a, b


@dataclass
class Tunnel:
    """A client and a server HBONE connection of one engine, joined by loopback TCP."""

    engine: Engine
    events: Events
    client_ctx: int
    server_ctx: int
    client: int = 0
    server: int = 0

    def open(self, authority: str = "10.244.2.2:8080") -> tuple[socket.socket, socket.socket, Event, Event]:
        """Opens and accepts a stream; returns (app side, upstream side, stream_open, stream_request)."""
        app, local = socket.socketpair()
        self.engine.open_stream(self.client, authority, local.detach(), tag=11)
        req = self.events.kind("stream_request", conn_id=self.server)
        upstream, ours = socket.socketpair()
        self.engine.accept_stream(self.server, req.stream_id, ours.detach(), tag=22)
        opened = self.events.kind("stream_open", conn_id=self.client)
        return app, upstream, opened, req


def contexts(engine: Engine, pki: Pki) -> tuple[int, int]:
    client = engine.tls_context(
        server=False, chain_pem=pki.client.chain_pem, key_pem=pki.client.key_pem, bundle_pem=pki.bundle
    )
    server = engine.tls_context(
        server=True, chain_pem=pki.server.chain_pem, key_pem=pki.server.key_pem, bundle_pem=pki.bundle
    )
    return client, server


def tunnel(engine: Engine, events: Events, pki: Pki, expected_peer: str | None = None) -> Tunnel:
    cctx, sctx = contexts(engine, pki)
    t = Tunnel(engine, events, cctx, sctx)
    a, b = tcp_pair()
    t.client = engine.connect_hbone(a.detach(), cctx, expected_peer or pki.server.spiffe_id, tag=1)
    t.server = engine.serve_hbone(b.detach(), sctx, tag=2)
    return t


def run_in_own_netns(script: str, timeout: float) -> Any:
    """Runs tests/unit/native/`script` under `unshare --net` (its own loopback, sysctls, nftables) and
    returns the JSON of its last output line."""
    here = os.path.dirname(__file__)
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, os.path.join(here, script)],
        cwd=os.path.join(here, "..", "..", ".."), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
