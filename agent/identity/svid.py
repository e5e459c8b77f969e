"""An X.509 SVID held in memory: chain (leaf first), private key, and the facts `ambit debug certs` shows.

Keys are generated here, per identity, and never written to disk. Python's ssl module only loads keys from
paths, so `ssl_context` hands it an anonymous memory file (memfd) through /proc/self/fd.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import time
from dataclasses import dataclass, field

from native import pki


def key_and_csr(spiffe_id: str | None) -> tuple[bytes, bytes]:
    """A fresh P-256 key (PKCS#8 PEM) and a CSR for it with an empty subject and the single URI SAN the
    plane is asked to sign (none: the plane decides). On the engine's OpenSSL (native/pki.py)."""
    return pki.key_and_csr(spiffe_id)


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain_pem: bytes  # leaf first, then intermediates (no trust anchor)
    key_pem: bytes = field(repr=False)  # in memory only
    not_after: dt.datetime
    serial: int
    not_before: dt.datetime
    issuer: str
    received_at: float  # wall clock when the plane answered: rotation is timed from here, not not_before

    @classmethod
    def from_pem(
        cls, spiffe_id: str, chain_pem: bytes, key_pem_bytes: bytes, received_at: float | None = None
    ) -> Svid:
        leaf = pki.leaf_facts(chain_pem)
        return cls(
            spiffe_id=spiffe_id,
            chain_pem=chain_pem,
            key_pem=key_pem_bytes,
            not_after=leaf.not_after,
            serial=leaf.serial,
            not_before=leaf.not_before,
            issuer=leaf.issuer,
            received_at=time.time() if received_at is None else received_at,
        )

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.not_after.timestamp()

    def ssl_context(self, bundle_pem: bytes, server: bool) -> ssl.SSLContext:
        """A TLS 1.3 mTLS context presenting this SVID and trusting `bundle_pem` (peer cert required)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False  # SPIFFE peers are checked by URI SAN, not host name
        ctx.load_verify_locations(cadata=bundle_pem.decode())
        fds = [_memfd("svid-chain", self.chain_pem), _memfd("svid-key", self.key_pem)]
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return ctx


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd
