"""`ambit mgmt --ca-dir`: the plane runs as an intermediate under an external (enterprise) root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from mgmt.ca import CertificateAuthority, certs_pem, private_key_pem


def _ca_dir(tmp: Path, key_mode: int) -> tuple[Path, CertificateAuthority]:
    root = CertificateAuthority.generate_root("cluster.local")
    inter = root.issue_intermediate("cluster.local")
    ca = tmp / "ca"
    ca.mkdir()
    (ca / "ca-cert.pem").write_bytes(certs_pem([inter.cert]))
    (ca / "root-cert.pem").write_bytes(certs_pem([root.cert]))
    fd = os.open(ca / "ca-key.pem", os.O_WRONLY | os.O_CREAT, key_mode)
    os.write(fd, private_key_pem(inter.key))
    os.close(fd)
    os.chmod(ca / "ca-key.pem", key_mode)
    return ca, root


def _plane(tmp: Path, ca: Path) -> subprocess.Popen[str]:
    (tmp / "cfg").mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "agent.cli", "mgmt", "--config-dir", str(tmp / "cfg"), "--state-dir"]
    argv += [
        str(tmp / "state"),
        "--ca-dir",
        str(ca),
        "--listen",
        "127.0.0.1:0",
        "--bootstrap-listen",
        "127.0.0.1:0",
    ]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)


def test_plane_trusts_only_the_external_root(tmp_path: Path) -> None:
    ca, root = _ca_dir(tmp_path, 0o600)
    proc = _plane(tmp_path, ca)
    try:
        bundle = tmp_path / "state" / "ca-bundle.pem"
        deadline = time.monotonic() + 30
        while not bundle.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        anchors = x509.load_pem_x509_certificates(bundle.read_bytes())
        assert [a.fingerprint(a.signature_hash_algorithm) for a in anchors] == [  # type: ignore[arg-type]
            root.cert.fingerprint(root.cert.signature_hash_algorithm)  # type: ignore[arg-type]
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_plane_refuses_a_readable_ca_key(tmp_path: Path) -> None:
    ca, _ = _ca_dir(tmp_path, 0o644)
    proc = _plane(tmp_path, ca)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert "0644" in err and "ca-key.pem" in err
    assert "PRIVATE KEY" not in err
