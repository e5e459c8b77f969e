"""Keys, CSRs and certificate facts on the engine's OpenSSL (native/src/pki.c), for the agent's identity code.

The agent links OpenSSL through the engine anyway; doing this here rather than with `cryptography` keeps
that library (~9 MiB resident) out of the node agent (docs/footprint.md). Private keys exist only in
memory: the C side wipes its copies, Python holds the PEM bytes like any key material it is handed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from native._engine import ffi, lib  # type: ignore[import-not-found]

_ERRLEN = 512


class PkiError(ValueError):
    """Material that does not parse, or OpenSSL refused an operation."""


@dataclass(frozen=True)
class CertFacts:
    """What the identity code needs to know of one certificate."""

    serial: int
    not_before: dt.datetime  # UTC
    not_after: dt.datetime
    subject: str  # RFC 2253
    issuer: str
    uri: str  # the first URI SAN ("" when none)
    uri_count: int

    @property
    def spiffe_uri(self) -> str:
        """The single URI SAN of a SPIFFE certificate; ValueError when there is none or more than one."""
        if self.uri_count != 1:
            raise PkiError(f"certificate must carry exactly one URI SAN, has {self.uri_count}")
        return self.uri


def _text(field: object) -> str:
    return bytes(ffi.string(field)).decode("utf-8", "replace")


def key_and_csr(uri: str | None) -> tuple[bytes, bytes]:
    """(PKCS#8 PEM of a fresh P-256 key, PEM CSR for it): empty subject, one critical URI SAN when `uri`."""
    key = ffi.new("char **")
    csr = ffi.new("char **")
    err = ffi.new("char[]", _ERRLEN)
    if lib.ambit_pki_key_and_csr(uri.encode() if uri is not None else ffi.NULL, key, csr, err, _ERRLEN) != 0:
        raise PkiError(_text(err))
    try:
        return bytes(ffi.string(key[0])), bytes(ffi.string(csr[0]))
    finally:
        lib.ambit_pki_free(key[0])
        lib.ambit_pki_free(csr[0])


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def chain_facts(pem: bytes) -> list[CertFacts]:
    """Facts of every certificate of a PEM chain, in order; PkiError when it holds none or one is bad."""
    out: list[CertFacts] = []
    facts = ffi.new("ambit_cert_facts *")
    err = ffi.new("char[]", _ERRLEN)
    count = 1
    while len(out) < count:
        count = lib.ambit_pki_cert_facts(pem, len(pem), len(out), facts, err, _ERRLEN)
        if count < 0:
            raise PkiError(_text(err))
        out.append(
            CertFacts(
                serial=int(_text(facts.serial_hex), 16),
                not_before=_utc(facts.not_before),
                not_after=_utc(facts.not_after),
                subject=_text(facts.subject),
                issuer=_text(facts.issuer),
                uri=_text(facts.uri),
                uri_count=int(facts.uri_count),
            )
        )
    return out


def leaf_facts(chain_pem: bytes) -> CertFacts:
    return chain_facts(chain_pem)[0]


def top_signed_by(chain_pem: bytes, issuer_pem: bytes) -> bool:
    """Whether the last certificate of `chain_pem` names the first of `issuer_pem` as its issuer and bears
    its valid signature (False too when either does not parse)."""
    return int(lib.ambit_pki_last_signed_by(chain_pem, len(chain_pem), issuer_pem, len(issuer_pem))) == 1


def has_key(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the first certificate of `cert_pem` carries the public half of `key_pem` (False when either
    does not parse)."""
    return int(lib.ambit_pki_cert_has_key(cert_pem, len(cert_pem), key_pem, len(key_pem))) == 1
