"""The certificate authority: the only owner of the CA private key. Issues SPIFFE X.509 SVIDs.

Leaf profile (SPIFFE X509-SVID): exactly one URI SAN, marked critical because the subject is empty,
digitalSignature (+keyEncipherment not needed for ECDSA), CA:false, serverAuth+clientAuth.

The CA is either a self-signed root or an intermediate under an external root (enterprise PKI). A root can
be rotated without dropping connections: the new root first joins the trust bundle (`prepare_root_rotation`),
then becomes the signer (`activate_pending_root`) while the old root stays trusted until every leaf it
signed has expired (`drop_previous_roots`). One lock guards the signer so a rotation never mixes the key of
one root with the certificate of another in a single issuance.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from api.spiffe import SpiffeId

DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
ROOT_TTL = dt.timedelta(days=365 * 10)
INTERMEDIATE_TTL = dt.timedelta(days=365)
SERVING_TTL = dt.timedelta(days=30)
# Tolerate small clock skew between nodes: certificates are valid from slightly in the past.
BACKDATE = dt.timedelta(minutes=5)
# gRPC clients of the plane check this DNS name (grpc.ssl_target_name_override) on its serving certificate.
MGMT_SERVER_NAME = "ambit-mgmt"

PublicKey = ec.EllipticCurvePublicKey


class CAError(ValueError):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ca_name(trust_domain: str, role: str) -> x509.Name:
    # Successive roots of a rotation must differ by name: verifiers (and `ambit debug certs` readers) pick
    # issuers by subject. A timestamp alone collides when two roots are made within one second.
    stamp = f"{_now().strftime('%Y%m%dT%H%M%S')} {secrets.token_hex(3)}"
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ambit"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ambit {role} CA ({trust_domain}) {stamp}"),
        ]
    )


def _ca_cert(
    subject: x509.Name,
    public_key: PublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    ttl: dt.timedelta,
    not_after_cap: dt.datetime | None = None,
) -> x509.Certificate:
    now = _now()
    not_after = now + ttl if not_after_cap is None else min(now + ttl, not_after_cap)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )


def _new_root(trust_domain: str, ttl: dt.timedelta) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _ca_name(trust_domain, "root")
    return key, _ca_cert(name, key.public_key(), name, key, trust_domain, ttl)


def certs_pem(certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def check_ca_material(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, chain: tuple[x509.Certificate, ...]
) -> None:
    """Refuse a CA whose key does not match its certificate or whose chain does not link up to the anchor."""
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError("CA key must be an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError("CA key does not match the CA certificate")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError("CA certificate has no basicConstraints") from None
    if not basic.ca:
        raise CAError("CA certificate is not a CA (basicConstraints CA:false)")
    child = cert
    for parent in chain:
        try:
            child.verify_directly_issued_by(parent)
        except (InvalidSignature, ValueError, TypeError) as e:
            raise CAError(
                f"chain broken: {child.subject.rfc4514_string()} not issued by "
                f"{parent.subject.rfc4514_string()}: {e}"
            ) from None
        child = parent
    if chain:
        anchor = chain[-1]
        if anchor.subject != anchor.issuer:
            raise CAError("the last certificate of the upstream chain must be the self-signed root")


@dataclass
class CertificateAuthority:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate
    # Certificates above this CA up to and including the trust anchor (empty when this CA is the root).
    chain: tuple[x509.Certificate, ...] = ()
    # A root that is trusted but does not sign yet (first step of a root rotation).
    pending: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = field(default=None, repr=False)
    # Roots that no longer sign but stay trusted until the leaves they signed have expired.
    previous: tuple[x509.Certificate, ...] = ()
    # Bumped on every change of signer or bundle, so servers know when to reload their TLS material.
    generation: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def generate_root(cls, trust_domain: str, ttl: dt.timedelta = ROOT_TTL) -> CertificateAuthority:
        key, cert = _new_root(trust_domain, ttl)
        return cls(trust_domain, key, cert)

    @classmethod
    def intermediate(
        cls,
        trust_domain: str,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        chain: tuple[x509.Certificate, ...],
    ) -> CertificateAuthority:
        """A CA signed by an upstream (external) root: `chain` runs from its issuer up to the root."""
        if not chain:
            raise CAError("an intermediate CA needs the upstream chain up to its root")
        check_ca_material(key, cert, chain)
        return cls(trust_domain, key, cert, chain)

    def issue_intermediate(
        self, trust_domain: str, ttl: dt.timedelta = INTERMEDIATE_TTL
    ) -> CertificateAuthority:
        """Sign a subordinate CA (how an enterprise root hands out an intermediate to the plane)."""
        with self._lock:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _ca_cert(
                _ca_name(trust_domain, "intermediate"),
                key.public_key(),
                self.cert.subject,
                self.key,
                trust_domain,
                ttl,
                self.cert.not_valid_after_utc,
            )
            return CertificateAuthority.intermediate(trust_domain, key, cert, (self.cert, *self.chain))

    @property
    def trust_anchor(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

    @property
    def is_root(self) -> bool:
        return not self.chain

    def anchors(self) -> list[x509.Certificate]:
        """Every root a peer must trust now: the signing one FIRST, then a pending one, then previous ones.

        The order is a contract: agents compare their certificates with the first anchor to notice that the
        signer changed (a root rotation was activated) and re-issue at once instead of at half life.
        """
        with self._lock:
            out = [self.trust_anchor]
            if self.pending:
                out.append(self.pending[1])
            out.extend(self.previous)
            return out

    def bundle_pem(self) -> bytes:
        return certs_pem(self.anchors())

    def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        dns_names: tuple[str, ...] = (),
    ) -> list[x509.Certificate]:
        """Sign a leaf SVID for `spiffe_id`; returns [leaf, this CA, intermediates...] (anchor excluded).

        `dns_names` is only for the management plane's own serving certificate, which gRPC clients check by
        host name; workload SVIDs carry the URI SAN alone.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise ValueError(f"{spiffe_id} is outside trust domain {self.trust_domain}")
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("only ECDSA public keys are signed")
        with self._lock:
            key, cert, chain = self.key, self.cert, self.chain
        now = _now()
        not_after = min(now + ttl, cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(str(spiffe_id))] + [x509.DNSName(d) for d in dns_names]
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        out = [leaf]
        if chain:  # an intermediate CA sends itself and the path up to (not including) the anchor
            out.append(cert)
            out.extend(chain[:-1])
        return out

    # Root rotation (root mode only: an intermediate is rotated by installing a new one from upstream).

    def prepare_root_rotation(self, ttl: dt.timedelta = ROOT_TTL) -> x509.Certificate:
        """Create the next root and add it to the bundle; it does not sign until activated."""
        with self._lock:
            if not self.is_root:
                raise CAError("root rotation needs a root CA; an intermediate is replaced from upstream")
            if self.pending is None:
                self.pending = _new_root(self.trust_domain, ttl)
                self.generation += 1
            return self.pending[1]

    def activate_pending_root(self) -> None:
        """Sign with the pending root; the old root stays in the bundle (see `drop_previous_roots`)."""
        with self._lock:
            if self.pending is None:
                raise CAError("no pending root: call prepare_root_rotation first")
            self.previous = (self.cert, *self.previous)
            self.key, self.cert = self.pending
            self.pending = None
            self.generation += 1

    def adopt(self, other: CertificateAuthority) -> None:
        """Take over `other`'s signer and roots in place (a running plane reloading its state dir).

        Everything holding this object (CSR service, serving credentials) sees the change at once; the
        generation bump makes the servers re-issue their TLS material on the next handshake.
        """
        if other.trust_domain != self.trust_domain:
            raise CAError(f"CA state is for {other.trust_domain}, the plane serves {self.trust_domain}")
        check_ca_material(other.key, other.cert, other.chain)
        if other.pending is not None:
            check_ca_material(other.pending[0], other.pending[1], ())
        with self._lock:
            self.key, self.cert, self.chain = other.key, other.cert, other.chain
            self.pending, self.previous = other.pending, other.previous
            self.generation += 1

    def drop_previous_roots(self) -> None:
        """Stop trusting retired roots: only once every leaf they signed has expired."""
        with self._lock:
            if self.previous:
                self.previous = ()
                self.generation += 1


def serving_cert(ca: CertificateAuthority, ttl: dt.timedelta = SERVING_TTL) -> tuple[bytes, bytes]:
    """The plane's own TLS serving certificate: (chain PEM leaf first, key PEM), DNS SAN `ambit-mgmt`."""
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue(
        SpiffeId.parse(f"spiffe://{ca.trust_domain}/mgmt"), key.public_key(), ttl, (MGMT_SERVER_NAME,)
    )
    return certs_pem(chain), private_key_pem(key)
