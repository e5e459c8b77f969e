"""api.jsonlog: redaction of keys and tokens, rotation, concurrent writers, failing disks, batched flushes."""

from __future__ import annotations

import dataclasses
import enum
import json
import threading
from pathlib import Path

from api.jsonlog import REDACTED, JsonLog, batched, redact, secret_name, utc_iso

PEM_KEY = "\n".join(
    [
        "-----BEGIN PRIVATE KEY-----",
        "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg",
        "-----END PRIVATE KEY-----",
        "",
    ]
)
EC_KEY = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBd\n-----END EC PRIVATE KEY-----"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"


class Kind(enum.Enum):
    A = "a"


@dataclasses.dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes


def test_pem_keys_are_removed_wherever_they_hide() -> None:
    doc = {
        "certs": [Svid("spiffe://td/ns/a/sa/b", CERT.encode(), PEM_KEY.encode())],
        "note": "chain then key: " + CERT + EC_KEY,
        "nested": [{"blob": PEM_KEY.encode()}, ("x", {PEM_KEY})],
        "truncated": "-----BEGIN RSA PRIVATE KEY-----\nMIIE",
        "kind": Kind.A,
    }
    out = json.dumps(redact(doc))
    assert "PRIVATE KEY" not in out
    assert "MIGHAgEAMBMG" not in out and "MHcCAQEEIBd" not in out
    red = redact(doc)
    assert red["certs"][0]["chain_pem"] == CERT  # certificates are public: kept
    assert red["certs"][0]["key_pem"] == REDACTED
    assert red["note"].startswith("chain then key: -----BEGIN CERTIFICATE-----")
    assert red["kind"] == "a"


def test_secret_field_names() -> None:
    for name in ("join_token", "token", "private_key", "key_pem", "client_secret", "password", "apiKey"):
        assert secret_name(name), name
    for name in ("key", "public_key", "spiffe_id", "peer_cert_sha256", "keys", "policy"):
        assert not secret_name(name), name
    red = redact({"join_token": "abc123", "when": [{"key": "source.ip", "values": ["10.0.0.1"]}], "n": 3})
    assert red == {"join_token": REDACTED, "when": [{"key": "source.ip", "values": ["10.0.0.1"]}], "n": 3}


def test_utc_iso() -> None:
    assert utc_iso(0.5) == "1970-01-01T00:00:00.500Z"


def test_rotation_keeps_backups_and_whole_lines(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "a.log", max_bytes=400, backups=2)
    for i in range(60):
        log.write({"i": i, "pad": "x" * 40})
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["a.log", "a.log.1", "a.log.2"]
    seen = []
    for f in (files[2], files[1], files[0]):
        assert f.stat().st_size <= 400
        seen += [json.loads(line)["i"] for line in f.read_text().splitlines()]
    assert seen == list(range(60 - len(seen), 60))  # newest records, in order, none torn
    assert log.records == 60 and log.errors == 0


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "c.log")

    def writer(n: int) -> None:
        for i in range(200):
            log.write({"writer": n, "i": i, "token": "s3cret"})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / "c.log").read_text().splitlines()
    assert len(lines) == 1600
    records = [json.loads(line) for line in lines]
    assert all(r["token"] == REDACTED for r in records)
    assert "s3cret" not in (tmp_path / "c.log").read_text()


def test_unwritable_path_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "dir.log").mkdir()
    log = JsonLog(tmp_path / "dir.log")
    log.write({"a": 1})
    log.write({"a": 2})
    assert log.errors == 2 and log.records == 0


def test_batched_defers_only_deferrable_logs_to_the_end_of_the_block(tmp_path: Path) -> None:
    access = JsonLog(tmp_path / "access.log", deferrable=True)
    audit = JsonLog(tmp_path / "audit.log")
    with batched():
        access.write({"n": 1})
        with batched():  # nested: the outer block flushes
            access.write({"n": 2})
        audit.write({"n": 3})
        assert not (tmp_path / "access.log").read_text()  # one write(2) for the batch, at its end
        assert (tmp_path / "audit.log").read_text().count("\n") == 1  # audit records: never deferred
        seen: list[str] = []
        other = threading.Thread(target=lambda: (access.write({"n": 4}), seen.append("done")))
        other.start()
        other.join()  # another thread's write is flushed at once (and with it what this one buffered)
        assert seen == ["done"]
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert [r["n"] for r in lines] == [1, 2, 4] and access.records == 3
    access.write({"n": 5})  # outside a batch: flushed per record again
    assert (tmp_path / "access.log").read_text().count("\n") == 4
