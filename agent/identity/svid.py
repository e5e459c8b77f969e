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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str | None) -> bytes:
    """A CSR with an empty subject and the single URI SAN the plane is asked to sign (none: plane decides)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)])
        builder = builder.add_extension(san, critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


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
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        return cls(
            spiffe_id=spiffe_id,
            chain_pem=chain_pem,
            key_pem=key_pem_bytes,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            issuer=leaf.issuer.rfc4514_string(),
            received_at=time.time() if received_at is None else received_at,
        )

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

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
