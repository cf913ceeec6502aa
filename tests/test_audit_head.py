"""The audit head kept outside the database: written after COMMIT, checked by verify and by tmu-admin audit."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from tmu_core.cli import cli
from tmu_core.errors import InvalidInputError
from tmu_core.state.audit import (
    GENESIS,
    AuditHead,
    AuditLog,
    append_head_line,
    chain_hash,
    parse_head,
)
from tmu_core.state.db import connect, write_tx


def _log_with_three(home: Path) -> AuditLog:
    log = AuditLog(home / "state.sqlite")
    log.append("forget", "m", {"from": 1, "to": 2}, ["fj-a"], ["s1", "s2"], {"acc": 0.5})
    log.append("swap", "m", {"from": 1, "to": 2}, ["fj-a"])
    log.append("rollback", "m", {"from": 2, "to": 1}, ["fj-a"], details={"undo_forgets": True})
    return log


def _raw(db: Path, *statements: str) -> None:
    """Tamper as someone with write access to the file would: drop the triggers, then change rows."""
    conn = sqlite3.connect(db)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _head_lines(log: AuditLog) -> list[list[str]]:
    return [line.split() for line in log.head_path.read_text().splitlines()]


def _audit(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), "audit", *args])


def test_each_commit_appends_a_head_line(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    records = log.records()
    assert log.head_path == tmp_path / "audit.head"
    assert stat.S_IMODE(log.head_path.stat().st_mode) == 0o600
    assert [(int(seq), digest, time) for seq, digest, time in _head_lines(log)] == \
        [(r.seq, r.hash, r.time) for r in records]
    assert log.head() == AuditHead(3, records[-1].hash)
    verdict = log.verify()
    assert verdict.ok and verdict.head == log.head() and verdict.head_source == str(log.head_path)
    assert verdict.note.startswith(f"matches head 3:{records[-1].hash[:12]}...")


def test_tail_truncation_is_detected_with_the_head_file(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    _raw(log.path, "DELETE FROM audit WHERE seq >= 2")
    verdict = log.verify()
    assert not verdict.ok and verdict.broken_seq == 2 and verdict.records == 1
    assert "names record 3, but the log ends at record 1: records 2..3 were removed" in verdict.reason


def test_tail_truncation_is_detected_with_an_explicit_head(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    kept = log.head()
    _raw(log.path, "DELETE FROM audit WHERE seq = 3")
    log.head_path.unlink()  # the attacker removed the local head too
    assert log.verify().ok and "checked the chain only" in log.verify().note
    verdict = log.verify(kept)
    assert not verdict.ok and verdict.broken_seq == 3 and verdict.head_source == "given"
    assert "records 3..3 were removed" in verdict.reason


def test_everything_deleted_is_detected(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    _raw(log.path, "DROP TABLE audit")
    verdict = AuditLog(log.path).verify()
    assert not verdict.ok and verdict.records == 0 and "records 1..3 were removed" in verdict.reason


def _rewrite_chain(log: AuditLog) -> None:
    """Change record 1's model and recompute every hash after it, so the chain alone still holds."""
    statements, prev = [], GENESIS
    for record in log.records():
        body = {**record.body(), "model": "other"} if record.seq == 1 else record.body()
        digest = chain_hash(prev, body)
        statements.append(f"UPDATE audit SET model='{body['model']}', prev_hash='{prev}', hash='{digest}' "
                          f"WHERE seq={record.seq}")
        prev = digest
    _raw(log.path, *statements)


def test_full_rewrite_is_detected_against_the_head(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    kept = log.head()
    _rewrite_chain(log)
    assert log.verify(AuditHead(3, log.head().hash)).ok  # the forged chain is self-consistent
    for verdict in (log.verify(), log.verify(kept)):
        assert not verdict.ok and verdict.broken_seq == 3
        assert f"differs from the head's {kept.hash[:12]}..." in verdict.reason
        assert "the chain was rewritten" in verdict.reason


def test_database_ahead_of_the_head_is_accepted(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    lines = log.head_path.read_text().splitlines(keepends=True)
    log.head_path.write_text("".join(lines[:-1]))  # a crash between the COMMIT and the head write
    verdict = log.verify()
    assert verdict.ok and verdict.head.seq == 2 and "1 record(s) newer than the head" in verdict.note


def test_rolled_back_transaction_writes_no_head_line(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    before = log.head_path.read_bytes()
    with pytest.raises(RuntimeError, match="caller failed"), write_tx(log.path) as conn:
        log.append("purge", "m", {"purged": 1}, conn=conn)
        raise RuntimeError("caller failed")
    assert log.head_path.read_bytes() == before and len(log.records()) == 3 and log.verify().ok


def test_head_line_waits_for_the_commit(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    with write_tx(log.path) as conn:
        record = log.append("purge", "m", {"purged": 1}, conn=conn)
        assert not log.head_path.exists()
    assert _head_lines(log) == [[str(record.seq), record.hash, record.time]]


def test_append_refuses_a_connection_outside_write_tx(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "state.sqlite")
    conn = sqlite3.connect(log.path, isolation_level=None)
    with pytest.raises(InvalidInputError, match="needs a connection from tmu_core.state.db.write_tx"):
        log.append("purge", "m", {"purged": 1}, conn=conn)
    conn.close()


def test_failed_after_commit_step_keeps_the_commit(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    with write_tx(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.after_commit.append(lambda: 1 / 0)
    with write_tx(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0 and conn.after_commit == []


def test_head_file_only_moves_forward_and_survives_a_torn_line(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    first = log.records()[0]
    append_head_line(log.head_path, first)  # a late after-commit step of an older record
    assert int(_head_lines(log)[-1][0]) == 3
    with log.head_path.open("ab") as head:
        head.write(b"4 0123")  # a line torn by a power cut
    record = log.append("purge", "m", {"purged": 1})
    assert _head_lines(log)[-1] == [str(record.seq), record.hash, record.time]
    assert log.verify().ok and log.verify().head.seq == 4


def test_parse_head() -> None:
    digest = "ab" * 32
    assert parse_head(f"12:{digest.upper()}") == AuditHead(12, digest)
    for bad in ("12", f"x:{digest}", f"12:{digest[:-1]}", f"12-{digest}", ""):
        with pytest.raises(InvalidInputError, match="audit head must be SEQ:HASH"):
            parse_head(bad)


def test_state_database_runs_synchronous_full(tmp_path: Path) -> None:
    conn = connect(tmp_path / "state.sqlite")
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_cli_verify_detects_truncation_with_the_head_file(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    head = log.head()
    ok = _audit(tmp_path, "--verify")
    assert ok.exit_code == 0, ok.output
    assert ok.output == (f"audit log OK: 3 records, hash chain intact; matches head 3:{head.hash[:12]}... "
                         f"({log.head_path})\n")
    _raw(log.path, "DELETE FROM audit WHERE seq = 3")
    broken = _audit(tmp_path, "--verify")
    assert broken.exit_code == 1
    assert broken.output == (f"Error: audit log broken at record 3: the head 3:{head.hash[:12]}... "
                             f"({log.head_path}) names record 3, but the log ends at record 2: "
                             f"records 3..3 were removed\n")


def test_cli_verify_against_a_head_kept_elsewhere(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    shown = _audit(tmp_path, "--show-head")
    assert shown.exit_code == 0 and shown.output == f"{log.head()}\n"
    kept = shown.output.strip()
    _raw(log.path, "DELETE FROM audit WHERE seq >= 2")
    log.head_path.unlink()
    assert _audit(tmp_path, "--verify").exit_code == 0
    broken = _audit(tmp_path, "--verify", "--head", kept)
    assert broken.exit_code == 1
    assert "audit log broken at record 2: the head 3:" in broken.output
    assert "(given) names record 3, but the log ends at record 1: records 2..3 were removed" in broken.output


def test_cli_rewrite_against_a_head_kept_elsewhere(tmp_path: Path) -> None:
    log = _log_with_three(tmp_path)
    kept = str(log.head())
    _rewrite_chain(log)
    broken = _audit(tmp_path, "--verify", "--head", kept)
    assert broken.exit_code == 1 and "the chain was rewritten" in broken.output


def test_cli_head_usage_errors(tmp_path: Path) -> None:
    _log_with_three(tmp_path)
    bad = _audit(tmp_path, "--verify", "--head", "3-abc")
    assert bad.exit_code == 2
    assert "Invalid value for '--head': audit head must be SEQ:HASH" in bad.output and "'3-abc'" in bad.output
    alone = _audit(tmp_path, "--head", "3:" + "a" * 64)
    assert alone.exit_code == 2 and "--head is only used with --verify" in alone.output
    both = _audit(tmp_path, "--verify", "--show-head")
    assert both.exit_code == 2 and "--verify and --show-head cannot be combined" in both.output
