"""The certificate authority: the only owner of the CA private key. Issues SPIFFE X.509 SVIDs.

Leaf profile (SPIFFE X509-SVID): exactly one URI SAN, marked critical because the subject is empty,
digitalSignature (+keyEncipherment not needed for ECDSA), CA:false, serverAuth+clientAuth.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from api.spiffe import SpiffeId

DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
ROOT_TTL = dt.timedelta(days=365 * 10)
# Tolerate small clock skew between nodes: certificates are valid from slightly in the past.
BACKDATE = dt.timedelta(minutes=5)

PublicKey = ec.EllipticCurvePublicKey


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class CertificateAuthority:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    # Certificates between this CA and the trust anchor (empty when this CA is the root).
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def generate_root(cls, trust_domain: str, ttl: dt.timedelta = ROOT_TTL) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ambit"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ambit root CA ({trust_domain})"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert)

    @property
    def trust_anchor(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

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
        now = _now()
        not_after = min(now + ttl, self.cert.not_valid_after_utc)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
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
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = [leaf]
        if self.chain:  # an intermediate CA sends itself and the path up to (not including) the anchor
            chain.append(self.cert)
            chain.extend(self.chain[:-1])
        return chain

    def bundle_pem(self) -> bytes:
        return self.trust_anchor.public_bytes(serialization.Encoding.PEM)
