"""The hash-chained audit log on a real SQLite file, including tampering with sqlite3 directly."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from tmu_core.errors import InvalidInputError
from tmu_core.state.audit import GENESIS, AuditLog, chain_hash, hash_id


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
    assert records[0].sample_hashes == sorted(hashlib.sha256(s.encode()).hexdigest() for s in ("s1", "s2"))
    verdict = log.verify()
    assert verdict.ok and verdict.records == 3 and verdict.broken_seq is None


def test_no_raw_ids_stored(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    log.append("forget", "m", {"to": 2}, ["fj-x"], ["owner7/secret-sample"])
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.sqlite*"))
    assert b"secret-sample" not in raw
    assert log.contains_sample("owner7/secret-sample") == [1]
    assert hash_id("owner7/secret-sample").encode() in raw


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
    with pytest.raises(InvalidInputError, match="forget, swap, rollback, purge"):
        AuditLog(tmp_path / "state.sqlite").append("delete", "m", {})
