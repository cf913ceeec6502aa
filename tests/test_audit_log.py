"""The hash-chained audit log on a real SQLite file, including tampering with sqlite3 directly, and its keyed ids."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from pathlib import Path

import pytest

from tmu_core.errors import InvalidInputError
from tmu_core.state.audit import GENESIS, AuditLog, chain_hash
from tmu_core.state.secret import keyed_id, load_or_create_secret


def _log_with_three(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "state.sqlite")
    log.append("forget", "m", {"from": 1, "to": 2}, ["fj-a"], ["s1", "s2"], {"acc": 0.5})
    log.append("swap", "m", {"from": 1, "to": 2}, ["fj-a"])
    log.append("rollback", "m", {"from": 2, "to": 1}, ["fj-a"], details={"undo_forgets": True})
    return log


def test_chain_links_and_hashes(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    records = log.records()
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS
    for prev, cur in zip(records, records[1:]):
        assert cur.prev_hash == prev.hash
    assert records[0].hash == chain_hash(GENESIS, records[0].body())
    assert records[0].sample_hashes == sorted(log.id_hash(s) for s in ("s1", "s2"))
    verdict = log.verify()
    assert verdict.ok and verdict.records == 3 and verdict.broken_seq is None


def test_no_raw_ids_stored(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    log.append("forget", "m", {"to": 2}, ["fj-x"], ["owner7/secret-sample"])
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    assert b"secret-sample" not in raw
    assert log.contains_sample("owner7/secret-sample") == [1]
    assert log.id_hash("owner7/secret-sample").encode() in raw


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    _log_with_three(tmp_path)
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET model='x' WHERE seq=2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE seq=2")


def _tamper(db: Path, statement: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("statement, seq, words", [
    ("UPDATE audit SET details='{\"acc\":0.99}' WHERE seq=1", 1, "was edited"),
    ("UPDATE audit SET model='other' WHERE seq=2", 2, "was edited"),
    ("UPDATE audit SET prev_hash='" + "1" * 64 + "' WHERE seq=3", 3, "does not match the previous"),
    ("DELETE FROM audit WHERE seq=2", 3, "expected sequence number 2"),
])
def test_tampering_names_the_record(tmp_path: Path, statement: str, seq: int, words: str) -> None:
    log = _log_with_three(tmp_path)
    _tamper(tmp_path / "state.sqlite", statement)
    verdict = log.verify()
    assert not verdict.ok
    assert verdict.broken_seq == seq
    assert f"record {seq}" in verdict.reason and words in verdict.reason


def test_rehashed_edit_still_breaks_next_link(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    first = log.records()[0]
    forged = chain_hash(GENESIS, {**first.body(), "model": "other"})
    _tamper(tmp_path / "state.sqlite", f"UPDATE audit SET model='other', hash='{forged}' WHERE seq=1")
    verdict = log.verify()
    assert verdict.broken_seq == 2 and "does not match the previous" in verdict.reason


def test_unknown_kind_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="forget, retrain, swap, rollback, purge"):
        AuditLog(tmp_path / "state.sqlite").append("delete", "m", {})


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def test_stored_ids_are_keyed_not_plain_sha256(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    ids = ["train/cat/0001", "train/cat/0002", "alice@example.com/photo-3"]
    log.append("forget", "m", {"from": 1, "to": 2}, ["fj-a"], ids)
    stored = log.records()[0].sample_hashes
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    secret = load_or_create_secret(tmp_path / "secret.key")
    for sample_id in ids:
        assert _sha256(sample_id) not in stored and _sha256(sample_id).encode() not in raw
        expected = hmac.new(secret, sample_id.encode("utf-8"), hashlib.sha256).hexdigest()
        assert keyed_id(secret, sample_id) == expected == log.id_hash(sample_id) and expected in stored
        assert log.contains_sample(sample_id) == [1]
    assert log.contains_sample("train/cat/0003") == []


def test_another_secret_does_not_find_the_ids(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    log.append("forget", "m", {"to": 2}, ["fj-a"], ["train/cat/0001"])
    other = AuditLog(tmp_path / "state.sqlite", secret_path=tmp_path / "elsewhere" / "secret.key")
    assert other.contains_sample("train/cat/0001") == [] and log.contains_sample("train/cat/0001") == [1]


def test_owner_ids_are_stored_keyed(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    owners = ["alice@example.com", "bob@example.com"]
    log.append("forget", "m", {"to": 2}, ["fj-a"], ["train/cat/0001"], {"owners": sorted(map(log.id_hash, owners))})
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    stored = log.records()[0].details["owners"]
    for owner in owners:
        assert owner.encode() not in raw and _sha256(owner).encode() not in raw and _sha256(owner) not in stored
        assert log.id_hash(owner) in stored
