"""The CA's leaf profile, checked with independent verifiers: cryptography's X.509 path validation and the
`spiffe` package's X509-SVID parser; root and intermediate (external root) modes; root rotation bundles."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from spiffe import X509Svid

from api.spiffe import SpiffeId
from mgmt.ca import MGMT_SERVER_NAME, CAError, CertificateAuthority, private_key_pem, serving_cert

TD = "cluster.local"
WORKLOAD = SpiffeId.workload(TD, "shop", "cart")


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _verify_client(anchors: list[x509.Certificate], chain: list[x509.Certificate]) -> list[x509.Certificate]:
    verifier = PolicyBuilder().store(Store(anchors)).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert [str(s.value) for s in verified.subjects or []] == [str(WORKLOAD)]
    return list(verified.chain)


def _issue(
    ca: CertificateAuthority, ttl: dt.timedelta = dt.timedelta(hours=24)
) -> tuple[list[x509.Certificate], bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca.issue(WORKLOAD, key.public_key(), ttl), private_key_pem(key)


def test_leaf_profile_is_a_spiffe_x509_svid() -> None:
    ca = CertificateAuthority.generate_root(TD)
    chain, _ = _issue(ca)
    leaf = chain[0]
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    assert len(list(san.value)) == 1
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=24) <= lifetime <= dt.timedelta(hours=24, minutes=6)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)


def test_root_mode_verifies_with_cryptography_and_spiffe_parser() -> None:
    ca = CertificateAuthority.generate_root(TD)
    chain, key = _issue(ca, dt.timedelta(hours=2))
    assert _verify_client([ca.cert], chain)[-1] == ca.cert
    svid = X509Svid.parse(_pem(chain), key)
    assert str(svid.spiffe_id) == str(WORKLOAD)
    assert svid.leaf.serial_number == chain[0].serial_number


def test_intermediate_under_external_root() -> None:
    external_root = CertificateAuthority.generate_root(TD)  # the enterprise PKI, not the plane
    ca = external_root.issue_intermediate(TD)
    assert not ca.is_root and ca.trust_anchor == external_root.cert
    chain, key = _issue(ca)
    assert chain[1] == ca.cert  # the intermediate travels with the leaf
    assert _verify_client([external_root.cert], chain)[-1] == external_root.cert
    assert X509Svid.parse(_pem(chain), key).spiffe_id.__str__() == str(WORKLOAD)
    assert ca.bundle_pem() == _pem([external_root.cert])
    # A leaf from the intermediate does not verify without the intermediate in the path.
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([external_root.cert])).build_client_verifier().verify(chain[0], [])


def test_intermediate_rejects_mismatched_material() -> None:
    root = CertificateAuthority.generate_root(TD)
    other = CertificateAuthority.generate_root(TD)
    inter = root.issue_intermediate(TD)
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.intermediate(TD, other.key, inter.cert, (root.cert,))
    with pytest.raises(CAError, match="chain broken"):
        CertificateAuthority.intermediate(TD, inter.key, inter.cert, (other.cert,))


def test_serving_cert_verifies_as_server_ambit_mgmt() -> None:
    ca = CertificateAuthority.generate_root(TD)
    chain_pem, key = serving_cert(ca)
    chain = x509.load_pem_x509_certificates(chain_pem)
    verifier = PolicyBuilder().store(Store([ca.cert])).build_server_verifier(x509.DNSName(MGMT_SERVER_NAME))
    assert verifier.verify(chain[0], chain[1:])[-1] == ca.cert
    assert serialization.load_pem_private_key(key, None).public_key() == chain[0].public_key()


def test_root_rotation_keeps_old_root_until_dropped() -> None:
    ca = CertificateAuthority.generate_root(TD)
    old_root = ca.cert
    old_chain, _ = _issue(ca)
    new_root = ca.prepare_root_rotation()
    assert ca.anchors() == [old_root, new_root]
    assert _issue(ca)[0][0].issuer == old_root.subject  # pending roots do not sign yet
    ca.activate_pending_root()
    new_chain, _ = _issue(ca)
    assert new_chain[0].issuer == new_root.subject
    anchors = [x509.load_pem_x509_certificates(ca.bundle_pem())][0]
    assert set(anchors) == {old_root, new_root}
    assert _verify_client(anchors, old_chain)[-1] == old_root
    assert _verify_client(anchors, new_chain)[-1] == new_root
    ca.drop_previous_roots()
    assert ca.anchors() == [new_root]
    with pytest.raises(VerificationError):
        _verify_client(ca.anchors(), old_chain)


def test_issue_refuses_foreign_trust_domain() -> None:
    ca = CertificateAuthority.generate_root(TD)
    with pytest.raises(ValueError, match="outside trust domain"):
        ca.issue(
            SpiffeId.workload("evil.org", "a", "b"), ec.generate_private_key(ec.SECP256R1()).public_key()
        )
