"""native.pki: the agent's keys, CSRs and certificate facts on the engine's OpenSSL, checked against the
plane's real CA and against cryptography's reading of the same certificates. Bad material is refused,
never read in part."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority, certs_pem, private_key_pem
from native import pki

TD = "cluster.local"
WORKLOAD = SpiffeId.workload(TD, "shop", "cart")


def _leaf_with(ca: CertificateAuthority, sans: list[x509.GeneralName] | None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_key_and_csr_as_the_plane_reads_them() -> None:
    key_pem, csr_pem = pki.key_and_csr(str(WORKLOAD))
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted (memory only)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid and csr.subject == x509.Name([])
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(WORKLOAD))]
    assert len(x509.load_pem_x509_csr(pki.key_and_csr(None)[1]).extensions) == 0
    assert pki.key_and_csr(None)[0] != key_pem  # a fresh key each time


def test_chain_facts_match_cryptography() -> None:
    root = CertificateAuthority.generate_root(TD)
    ca = root.issue_intermediate(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue(WORKLOAD, key.public_key())
    facts = pki.chain_facts(certs_pem(chain))
    assert len(facts) == len(chain) >= 2
    for fact, cert in zip(facts, chain, strict=True):
        assert fact.serial == cert.serial_number
        assert fact.not_before == cert.not_valid_before_utc and fact.not_after == cert.not_valid_after_utc
        assert fact.subject == cert.subject.rfc4514_string() and fact.issuer == cert.issuer.rfc4514_string()
    assert facts[0].spiffe_uri == str(WORKLOAD) and facts[0].uri_count == 1
    assert pki.has_key(certs_pem(chain), private_key_pem(key))
    assert not pki.has_key(certs_pem(chain), private_key_pem(ec.generate_private_key(ec.SECP256R1())))


def test_uri_sans_other_than_exactly_one_are_no_spiffe_id() -> None:
    ca = CertificateAuthority.generate_root(TD)
    two = [x509.UniformResourceIdentifier(str(WORKLOAD)), x509.UniformResourceIdentifier(f"spiffe://{TD}/x")]
    for sans, count in ((None, 0), ([x509.DNSName("cart.example")], 0), (two, 2)):
        facts = pki.leaf_facts(_leaf_with(ca, sans))
        assert facts.uri_count == count
        with pytest.raises(ValueError, match="exactly one URI SAN"):
            facts.spiffe_uri  # noqa: B018


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "garbage", "bad-der"],
)
def test_bad_material_is_refused(pem: bytes) -> None:
    with pytest.raises(pki.PkiError):
        pki.chain_facts(pem)
    key_pem, _ = pki.key_and_csr(None)
    assert not pki.has_key(pem, key_pem)
    assert not pki.top_signed_by(pem, pem)


def test_a_chain_with_one_bad_certificate_is_refused_not_cut_short() -> None:
    ca = CertificateAuthority.generate_root(TD)
    good = _leaf_with(ca, [x509.UniformResourceIdentifier(str(WORKLOAD))])
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    for chain in (good + broken, broken + good, good + good[: len(good) // 2]):
        with pytest.raises(pki.PkiError):
            pki.chain_facts(chain)


def test_uri_with_a_nul_byte_is_refused() -> None:
    ca = CertificateAuthority.generate_root(TD)
    pem = _leaf_with(ca, [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b\x00.evil")])
    with pytest.raises(pki.PkiError, match="NUL"):
        pki.leaf_facts(pem)


def test_top_signed_by_checks_the_signature_not_only_the_name() -> None:
    root = CertificateAuthority.generate_root(TD)
    chain = certs_pem(root.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key()))
    assert pki.top_signed_by(chain, root.bundle_pem())
    assert not pki.top_signed_by(chain, CertificateAuthority.generate_root(TD).bundle_pem())
    # A self-signed root with the same name but another key: not the signer.
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    impostor = (
        x509.CertificateBuilder()
        .subject_name(root.cert.subject)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    assert not pki.top_signed_by(chain, impostor.public_bytes(serialization.Encoding.PEM))


def test_an_encrypted_key_is_refused_without_a_pass_phrase_prompt() -> None:
    root = CertificateAuthority.generate_root(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = certs_pem(root.issue(WORKLOAD, key.public_key()))
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert not pki.has_key(chain, locked)
    assert pki.has_key(chain, private_key_pem(key))
