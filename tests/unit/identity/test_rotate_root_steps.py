"""Root rotation driven through the state dir: steps in order only, a manifest written last, a reloader that
adopts only consistent files, and `ambit mgmt rotate-root` misuse as one-line errors with exit 2."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.cli import main
from api.spiffe import SpiffeId
from mgmt import ca_store
from mgmt.ca import CAError, CertificateAuthority

TD = "cluster.local"
WORKLOAD = SpiffeId.workload(TD, "shop", "cart")


def _bundle(state: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((state / ca_store.BUNDLE_FILE).read_bytes())


def test_steps_in_order_update_files_and_manifest(tmp_path: Path) -> None:
    ca = ca_store.load_or_create(tmp_path, TD)
    old_root = ca.cert
    first = ca_store.read_json(tmp_path / ca_store.STATE_FILE)
    assert first and first["mode"] == "root" and first["trust_domain"] == TD

    prepared, rev1 = ca_store.rotate_step(tmp_path, "prepare")
    assert prepared.pending is not None and rev1 == first["revision"] + 1
    assert _bundle(tmp_path) == [old_root, prepared.pending[1]]  # signer first
    new_root = prepared.pending[1]

    activated, rev2 = ca_store.rotate_step(tmp_path, "activate")
    assert activated.cert == new_root and rev2 == rev1 + 1
    assert _bundle(tmp_path) == [new_root, old_root]  # the signer moved to the front
    leaf = activated.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key())[0]
    assert leaf.issuer == new_root.subject

    dropped, _ = ca_store.rotate_step(tmp_path, "drop")
    assert _bundle(tmp_path) == [new_root] and dropped.previous == ()
    assert ca_store.rotation_state(ca_store.load_state(tmp_path)) == "idle"
    assert not (tmp_path / ca_store.PENDING_KEY_FILE).exists()
    assert not (tmp_path / ca_store.PREVIOUS_FILE).exists()


@pytest.mark.parametrize(
    ("done", "step", "message"),
    [
        ([], "activate", "the next step is prepare"),
        ([], "drop", "the next step is prepare"),
        (["prepare"], "prepare", "the next step is activate"),
        (["prepare"], "drop", "the next step is activate"),
        (["prepare", "activate"], "prepare", "the next step is drop"),
        (["prepare", "activate"], "activate", "the next step is drop"),
    ],
)
def test_out_of_order_steps_are_refused(tmp_path: Path, done: list[str], step: str, message: str) -> None:
    ca_store.load_or_create(tmp_path, TD)
    for d in done:
        ca_store.rotate_step(tmp_path, d)
    before = (tmp_path / ca_store.STATE_FILE).read_bytes()
    with pytest.raises(ca_store.RotationError, match=message):
        ca_store.rotate_step(tmp_path, step)
    assert (tmp_path / ca_store.STATE_FILE).read_bytes() == before  # nothing written


def test_no_root_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ca_store.RotationError, match="no plane CA state"):
        ca_store.rotate_step(tmp_path, "prepare")
    upstream = CertificateAuthority.generate_root(TD).issue_intermediate(TD)
    ca_store.save(tmp_path, upstream)  # intermediate mode keeps only the bundle and the manifest
    with pytest.raises(ca_store.RotationError, match="intermediate"):
        ca_store.rotate_step(tmp_path, "prepare")


def test_reloader_adopts_new_revisions_in_place(tmp_path: Path) -> None:
    live = ca_store.load_or_create(tmp_path, TD)
    reloader = ca_store.CaReloader(tmp_path, live)
    reloader._confirm()
    generation = live.generation
    assert ca_store.loaded_revision(tmp_path) == reloader.revision
    assert not reloader.poll()  # nothing new

    prepared, rev = ca_store.rotate_step(tmp_path, "prepare")
    assert reloader.poll()
    assert live.pending is not None and live.pending[1] == prepared.pending[1]  # type: ignore[index]
    assert live.generation > generation and ca_store.loaded_revision(tmp_path) == rev
    ca_store.rotate_step(tmp_path, "activate")
    assert reloader.poll()
    assert (
        live.issue(WORKLOAD, ec.generate_private_key(ec.SECP256R1()).public_key())[0].issuer
        == live.cert.subject
    )
    assert live.cert == prepared.pending[1]  # type: ignore[index]


def test_reloader_never_adopts_files_that_do_not_match_the_manifest(tmp_path: Path) -> None:
    live = ca_store.load_or_create(tmp_path, TD)
    reloader = ca_store.CaReloader(tmp_path, live)
    signer = live.cert
    # A writer that got as far as the manifest of the next revision but not its files.
    manifest = json.loads((tmp_path / ca_store.STATE_FILE).read_text())
    manifest.update(revision=manifest["revision"] + 1, signer="00" * 32)
    (tmp_path / ca_store.STATE_FILE).write_text(json.dumps(manifest))
    assert not reloader.poll()
    assert live.cert == signer and live.pending is None
    # A manifest being rewritten (unreadable) is skipped too.
    (tmp_path / ca_store.STATE_FILE).write_text("{")
    assert not reloader.poll()


def test_adopt_refuses_another_trust_domain() -> None:
    live = CertificateAuthority.generate_root(TD)
    with pytest.raises(CAError, match="other.local"):
        live.adopt(CertificateAuthority.generate_root("other.local"))


def test_concurrent_steps_serialise(tmp_path: Path) -> None:
    ca_store.load_or_create(tmp_path, TD)
    results: list[str] = []

    def prepare() -> None:
        try:
            ca_store.rotate_step(tmp_path, "prepare")
            results.append("ok")
        except ca_store.RotationError:
            results.append("refused")

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]
    assert len(_bundle(tmp_path)) == 2


def test_cli_misuse_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> tuple[int, str]:
        code = main(["mgmt", "rotate-root", *args])
        return code, capsys.readouterr().err

    code, err = run("--state-dir", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and "no such directory" in err
    code, err = run("--state-dir", str(tmp_path), "--step", "prepare")
    assert code == 2 and err.count("\n") == 1 and "no plane CA state" in err
    ca_store.load_or_create(tmp_path, TD)
    code, err = run("--state-dir", str(tmp_path), "--step", "activate")
    assert code == 2 and err.count("\n") == 1 and "the next step is prepare" in err
    ca_store.rotate_step(tmp_path, "prepare")
    code, err = run("--state-dir", str(tmp_path), "--step", "all")
    assert code == 2 and err.count("\n") == 1 and "already under way" in err
    code, err = run("--state-dir", str(tmp_path), "--step", "drop", "--wait", "-1")
    assert code == 2 and "--wait" in err


def test_cli_step_with_a_running_plane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = ca_store.load_or_create(tmp_path, TD)
    reloader = ca_store.CaReloader(tmp_path, live, interval=0.05)
    reloader.start()
    try:
        assert main(["mgmt", "rotate-root", "--state-dir", str(tmp_path), "--step", "prepare"]) == 0
        out = capsys.readouterr().out
        assert "the running plane loaded revision" in out and "PRIVATE KEY" not in out
        assert live.pending is not None
        assert main(["mgmt", "rotate-root", "--state-dir", str(tmp_path), "--step", "activate"]) == 0
        assert main(["mgmt", "rotate-root", "--state-dir", str(tmp_path), "--step", "drop"]) == 0
        assert live.anchors() == [live.cert] and live.previous == ()
        capsys.readouterr()
        # `all` from idle, without pauses, runs all three steps against the running plane.
        assert main(["mgmt", "rotate-root", "--state-dir", str(tmp_path), "--wait", "0"]) == 0
        assert capsys.readouterr().out.count("the running plane loaded") == 3
        assert ca_store.rotation_state(live) == "idle" and live.cert == ca_store.load_state(tmp_path).cert
    finally:
        reloader.stop()
