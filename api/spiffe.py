"""SPIFFE IDs: spiffe://<trust-domain>/ns/<ns>/sa/<sa> for workloads, spiffe://<td>/node/<name> for nodes."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the node agent reads its certificates with native.pki and never loads cryptography
    from cryptography import x509

# Trust domain and path charset per the SPIFFE ID spec (lowercase letters, digits, '.', '-', '_').
_TD = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


class SpiffeIdError(ValueError):
    pass


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # always starts with '/'

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        if not uri.startswith("spiffe://"):
            raise SpiffeIdError(f"not a SPIFFE ID (scheme must be spiffe://): {uri!r}")
        rest = uri[len("spiffe://") :]
        td, sep, path = rest.partition("/")
        if not td or not _TD.match(td):
            raise SpiffeIdError(f"bad trust domain in {uri!r}")
        if not sep or not path:
            raise SpiffeIdError(f"SPIFFE ID has no path: {uri!r}")
        segments = path.split("/")
        if any(not s or s in (".", "..") or not _SEGMENT.match(s) for s in segments):
            raise SpiffeIdError(f"bad path segment in {uri!r}")
        return cls(td, "/" + path)

    @classmethod
    def workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        if cls is SpiffeId:  # the proxy asks this per stream (source and destination): parsed once
            return _workload_id(trust_domain, namespace, service_account)
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")

    @classmethod
    def node(cls, trust_domain: str, node_name: str) -> SpiffeId:
        return cls.parse(f"spiffe://{trust_domain}/node/{node_name}")

    @property
    def segments(self) -> list[str]:
        return self.path.strip("/").split("/")

    @property
    def namespace(self) -> str | None:
        seg = self.segments
        return seg[1] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def service_account(self) -> str | None:
        seg = self.segments
        return seg[3] if len(seg) == 4 and seg[0] == "ns" and seg[2] == "sa" else None

    @property
    def node_name(self) -> str | None:
        seg = self.segments
        return seg[1] if len(seg) == 2 and seg[0] == "node" else None


def check_trust_domain(td: str) -> str:
    """`td` when it is a valid SPIFFE trust domain name, else SpiffeIdError."""
    if not _TD.match(td):
        raise SpiffeIdError(f"bad trust domain {td!r}")
    return td


@dataclass(frozen=True)
class TrustDomains:
    """The trust domains whose identities this mesh believes: its own, plus configured aliases (Istio's
    `trustDomainAliases`: identities of a domain being migrated from). An identity of any other domain, even
    one signed by the same root, names nothing here: no namespace, no service account, no workload.

    Every place that turns a peer's SPIFFE ID into a namespace or service account goes through `workload`,
    so that decision is made once."""

    local: str
    aliases: frozenset[str] = frozenset()

    def accepts(self, sid: SpiffeId) -> bool:
        return sid.trust_domain == self.local or sid.trust_domain in self.aliases

    def workload(self, sid: SpiffeId) -> SpiffeId | None:
        """The workload identity `sid` stands for, in the local domain (an alias maps onto it), or None when
        `sid` is not a workload ID (`/ns/<ns>/sa/<sa>`) of an accepted domain."""
        if not self.accepts(sid) or sid.namespace is None:
            return None
        return sid if sid.trust_domain == self.local else SpiffeId(self.local, sid.path)


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE URI SAN of a leaf certificate (raises ValueError otherwise)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no SAN extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise ValueError(f"certificate must carry exactly one URI SAN, has {len(uris)}")
    return SpiffeId.parse(uris[0])


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a peer's end-entity certificate. A CA certificate (basicConstraints CA:true) is
    refused even when it chains to our root: an identity is a leaf's, never a signer's (X.509 path
    validation alone lets a CA certificate stand as the end entity). Raises ValueError."""
    from cryptography import x509

    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise ValueError("a CA certificate (CA:true) was presented as an end-entity identity")
    return spiffe_id_of(cert)


@functools.lru_cache(maxsize=4096)  # bounded; SpiffeId is immutable, a failed parse is not cached
def _workload_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
