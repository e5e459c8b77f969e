"""Helpers for the native engine tests: a real CA and SVIDs, event waiting, fd counting, TCP pairs."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority
from native.engine import Engine, Event

TD = "cluster.local"


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
    return Pki(
        ca,
        ca.bundle_pem(),
        issue(ca, SpiffeId.workload(TD, "default", "client")),
        issue(ca, SpiffeId.node(TD, "node-2")),
    )


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
