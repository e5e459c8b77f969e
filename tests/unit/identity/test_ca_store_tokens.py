"""CA persistence (0600 keys, looser modes refused, upstream plug-in files) and one-time join tokens."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.identity.svid import key_and_csr
from mgmt import ca_store
from mgmt.ca import CAError, CertificateAuthority, certs_pem, private_key_pem
from mgmt.identity_service import CsrError, load_csr
from mgmt.join_tokens import JoinTokens, TokenError

TD = "cluster.local"
URI = f"spiffe://{TD}/ns/shop/sa/cart"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_on_first_start_then_loaded(tmp_path: Path) -> None:
    ca = ca_store.load_or_create(tmp_path / "state", TD)
    state = tmp_path / "state"
    assert _mode(state / ca_store.KEY_FILE) == 0o600
    assert (state / ca_store.BUNDLE_FILE).read_bytes() == ca.bundle_pem()
    again = ca_store.load_or_create(state, TD)
    assert again.cert == ca.cert and again.key.private_numbers() == ca.key.private_numbers()


def test_loose_key_permissions_refused(tmp_path: Path) -> None:
    ca_store.load_or_create(tmp_path, TD)
    os.chmod(tmp_path / ca_store.KEY_FILE, 0o644)
    with pytest.raises(CAError, match="0600"):
        ca_store.load_or_create(tmp_path, TD)


def test_other_trust_domain_refused(tmp_path: Path) -> None:
    ca_store.load_or_create(tmp_path, TD)
    with pytest.raises(CAError, match="not spiffe://other.org"):
        ca_store.load_or_create(tmp_path, "other.org")


def test_rotation_state_survives_restart(tmp_path: Path) -> None:
    ca = ca_store.load_or_create(tmp_path, TD)
    old = ca.cert
    new = ca.prepare_root_rotation()
    ca_store.save(tmp_path, ca)
    assert ca_store.load_or_create(tmp_path, TD).anchors() == [old, new]
    ca.activate_pending_root()
    ca_store.save(tmp_path, ca)
    loaded = ca_store.load_or_create(tmp_path, TD)
    assert loaded.cert == new and loaded.anchors() == [new, old]
    assert not (tmp_path / ca_store.PENDING_KEY_FILE).exists()


def test_upstream_plugin_files(tmp_path: Path) -> None:
    external = CertificateAuthority.generate_root(TD)
    inter = external.issue_intermediate(TD)
    plug = tmp_path / "plugin"
    plug.mkdir()
    ca_store.write_file(plug / "ca-key.pem", private_key_pem(inter.key), 0o600)
    (plug / "ca-cert.pem").write_bytes(certs_pem([inter.cert]))
    (plug / "root-cert.pem").write_bytes(certs_pem([external.cert]))
    (plug / "cert-chain.pem").write_bytes(certs_pem([inter.cert, external.cert]))
    state = tmp_path / "state"
    ca = ca_store.load_or_create(state, TD, ca_store.Upstream.from_dir(plug))
    assert ca.cert == inter.cert and ca.chain == (external.cert,)
    assert x509.load_pem_x509_certificates((state / ca_store.BUNDLE_FILE).read_bytes()) == [external.cert]
    assert not (state / ca_store.KEY_FILE).exists()  # the upstream key is never copied


def test_join_token_one_time(tmp_path: Path) -> None:
    tokens = JoinTokens(tmp_path)
    token = tokens.create("node-1", 60)
    assert _mode(tmp_path / "join-tokens.json") == 0o600
    assert token not in (tmp_path / "join-tokens.json").read_text()  # only a digest is stored
    assert JoinTokens(tmp_path).consume(token) == "node-1"  # another process (the CLI) minted it
    with pytest.raises(TokenError) as err:
        tokens.consume(token)
    assert err.value.kind == "used"
    with pytest.raises(TokenError) as err:
        tokens.consume("not-a-token")
    assert err.value.kind == "unknown"


def test_join_token_expires(tmp_path: Path) -> None:
    now = [1000.0]
    tokens = JoinTokens(tmp_path, clock=lambda: now[0])
    token = tokens.create("node-2", 30)
    now[0] += 31
    with pytest.raises(TokenError) as err:
        tokens.consume(token)
    assert err.value.kind == "expired"


def test_csr_checks() -> None:
    # The agent's CSRs (made on the engine's OpenSSL) as the plane reads them.
    key_pem, csr = key_and_csr(URI)
    key = serialization.load_pem_private_key(key_pem, None)
    assert load_csr(csr, URI).public_numbers() == key.public_key().public_numbers()
    assert load_csr(key_and_csr(None)[1], URI)  # the plane sets the SAN
    with pytest.raises(CsrError, match="malformed"):
        load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", URI)
    with pytest.raises(CsrError, match="SANs must be exactly"):
        load_csr(key_and_csr(f"spiffe://{TD}/ns/other/sa/x")[1], URI)
    extra = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URI), x509.DNSName("evil.example")]),
            critical=True,
        )
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrError, match="SANs must be exactly"):
        load_csr(extra, URI)
    with pytest.raises(CsrError, match="must not carry SANs"):
        load_csr(csr, None)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(rsa.generate_private_key(65537, 2048), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrError, match="P-256"):
        load_csr(rsa_csr, URI)
