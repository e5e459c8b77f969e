"""End-entity certificates must be CA:false (both sides); a refused handshake ends with a TLS alert."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from engine_abuse import Listener, tls_client
from engine_testkit import CLIENT_ID, Events, Pki, Svid, contexts, tcp_pair

from native.engine import Engine, EngineError, cert_is_ca


def ca_true_leaf(pki: Pki, spiffe_id: str) -> Svid:
    """An SVID-shaped leaf (one URI SAN, signed by the mesh CA) that claims CA:true."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")]))
        .issuer_name(pki.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    return Svid(
        spiffe_id,
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
    )  # fmt: skip


def test_cert_is_ca(pki: Pki) -> None:
    assert cert_is_ca(pki.bundle)
    assert not cert_is_ca(pki.client.chain_pem)
    assert cert_is_ca(ca_true_leaf(pki, str(CLIENT_ID)).chain_pem)
    with pytest.raises(EngineError):
        cert_is_ca(b"not a certificate")


def test_ca_true_client_leaf_is_refused_with_an_alert(engine: Engine, events: Events, pki: Pki) -> None:
    _, sctx = contexts(engine, pki)
    lst = Listener(engine, sctx)
    bad = ca_true_leaf(pki, str(CLIENT_ID))
    with pytest.raises(ssl.SSLError) as info:
        sock = tls_client(pki, bad).wrap_socket(lst.connect())
        sock.recv(100)  # TLS 1.3: the server's verdict on our certificate comes after our Finished
    assert "ALERT" in str(info.value).upper(), info.value  # an alert, not a bare EOF
    err = events.kind("conn_error")
    assert "leaf certificate is a CA" in err.detail
    assert not [e for e in events.seen if e.kind == "peer_verified"]
    lst.close()


def test_ca_true_server_leaf_is_refused(engine: Engine, events: Events, pki: Pki) -> None:
    bad = ca_true_leaf(pki, "spiffe://cluster.local/node/node-2")
    cctx, _ = contexts(engine, pki)
    sctx = engine.tls_context(
        server=True, chain_pem=bad.chain_pem, key_pem=bad.key_pem, bundle_pem=pki.bundle
    )
    a, b = tcp_pair()
    cid = engine.connect_hbone(a.detach(), cctx, bad.spiffe_id)
    engine.serve_hbone(b.detach(), sctx)
    assert "leaf certificate is a CA" in events.kind("conn_error", conn_id=cid).detail
    assert not [e for e in events.seen if e.kind == "handshake_done"]
