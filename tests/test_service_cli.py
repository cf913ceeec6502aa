"""tmu-admin forget/jobs/versions/report/rollback/audit/purge/extension against a real service on loopback."""

from __future__ import annotations

import json
import sqlite3
import stat

import pytest
from click.testing import CliRunner

import tmu_core.cli.forget_cmd  # noqa: F401  (attaches the commands)
from test_service_support import make_index, make_workspace, record_fake_version
from tmu_core.cli import cli
from tmu_core.service import server
from tmu_core.state.audit import AuditLog
from tmu_core.state.jobs import JobStore
from tmu_core.state.versions import VersionRegistry
from tmu_core.service.server import ServiceConfig, in_process


@pytest.fixture()
def running(tmp_path):
    workspace = make_workspace(tmp_path)
    make_index(workspace, tmp_path, train=6, test=2).close()
    record_fake_version(workspace, "m")
    with in_process(workspace, ServiceConfig(run_jobs=False)) as service:
        yield workspace, service


def _run(workspace, *args):
    return CliRunner().invoke(cli, ["--home", str(workspace.home), "--model-store", str(workspace.model_store),
                                    *args])


def test_forget_jobs_versions(running) -> None:
    workspace, _ = running
    result = _run(workspace, "forget", "m", "--owners", "owner-a-0", "--noise", "4")
    assert result.exit_code == 0, result.output
    accepted = json.loads(result.output)
    assert accepted["samples"] == 3 and accepted["state"] == "pending" and accepted["job_state"] == "queued"
    job = JobStore(workspace.state_db).get(accepted["job_id"])
    assert job.options == {"method": "tmu", "noise_std": 4.0}
    assert job.owner_ids == [AuditLog(workspace.state_db).id_hash("owner-a-0")]  # never the plain owner id
    listing = _run(workspace, "jobs")
    assert listing.exit_code == 0 and accepted["job_id"] in listing.output and "queued" in listing.output
    one = _run(workspace, "jobs", accepted["job_id"])
    assert json.loads(one.output)["id"] == accepted["job_id"]
    versions = _run(workspace, "versions", "m")
    assert versions.exit_code == 0 and "serving" in versions.output and "m-v1.mar" in versions.output


def test_forget_without_a_model_asks_every_model_trained_on_the_samples(running) -> None:
    workspace, _ = running
    record_fake_version(workspace, "n", members=["train/a/0000", "train/b/0000"])
    result = _run(workspace, "forget", "--owners", "owner-a-0")
    assert result.exit_code == 0, result.output
    accepted = json.loads(result.output)
    assert accepted["scope"] == "all" and accepted["state"] == "pending"
    # m's membership is unknown (read as every sample), n was trained on train/a/0000 only of the owner's three
    by_model = {j["model"]: JobStore(workspace.state_db).get(j["job_id"]) for j in accepted["jobs"]}
    assert sorted(by_model) == ["m", "n"] and by_model["n"].sample_ids == ["train/a/0000"]
    assert len(by_model["m"].sample_ids) == 3
    versions = _run(workspace, "versions", "n")
    assert versions.exit_code == 0 and "forgotten samples: 0; owed again after a rollback: 0" in versions.output


def test_versions_show_each_approximate_versions_drift_with_its_error(running) -> None:
    workspace, _ = running
    v1 = VersionRegistry(workspace.state_db).get("m", 1)
    drift = {"exact_base": 1, "base_acc_test": 60.0, "acc_test": 57.6, "cost": 2.4, "cost_se": 1.1, "forgets": 2,
             "samples": 9, "exact_since": v1.created_at}
    VersionRegistry(workspace.state_db).record_version("m", 2, v1.archive, v1.checkpoint, None, 1, "fj-x",
                                                       {"drift": drift})
    listing = _run(workspace, "versions", "m")
    assert listing.exit_code == 0 and "+2.40+-1.10" in listing.output, listing.output


def test_errors_are_clear(running) -> None:
    workspace, _ = running
    usage = _run(workspace, "forget", "m")
    assert usage.exit_code == 2 and "give --samples or --owners" in usage.output
    unknown = _run(workspace, "forget", "m", "--samples", "nope/1")
    assert unknown.exit_code == 1 and "1 unknown sample id(s): nope/1" in unknown.output
    model = _run(workspace, "versions", "ghost")
    assert model.exit_code == 1 and "'ghost' has no recorded versions" in model.output
    job = _run(workspace, "report", "fj-missing")
    assert job.exit_code == 1 and "no job with id 'fj-missing'" in job.output
    same = _run(workspace, "rollback", "m", "--to", "1")
    assert same.exit_code == 1 and "already serves version 1" in same.output
    assert JobStore(workspace.state_db).count() == 0


def test_report_of_a_queued_job(running) -> None:
    workspace, _ = running
    accepted = json.loads(_run(workspace, "forget", "m", "--samples", "train/a/0000").output)
    result = _run(workspace, "report", accepted["job_id"])
    assert result.exit_code == 1 and "is queued and has no report" in result.output


def test_wrong_token_from_env(running, monkeypatch) -> None:
    workspace, _ = running
    monkeypatch.setenv("TMU_TOKEN", "not-the-key")
    result = _run(workspace, "jobs")
    assert result.exit_code == 1 and "wrong token" in result.output


def test_audit_verify_and_tamper(running) -> None:
    workspace, _ = running
    log = AuditLog(workspace.state_db)
    log.append("forget", "m", {"from": 1, "to": 2}, ["fj-1"], ["train/a/0000"])
    log.append("swap", "m", {"from": 1, "to": 2}, ["fj-1"])
    ok = _run(workspace, "audit", "--verify")
    assert ok.exit_code == 0 and "2 records, hash chain intact" in ok.output
    rows = [json.loads(line) for line in _run(workspace, "audit").output.splitlines()]
    assert [r["kind"] for r in rows] == ["forget", "swap"] and rows[0]["samples"] == 1
    conn = sqlite3.connect(workspace.state_db)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET versions='{\"from\":1,\"to\":3}' WHERE seq=2")
    conn.commit()
    conn.close()
    broken = _run(workspace, "audit", "--verify")
    assert broken.exit_code == 1 and "broken at record 2" in broken.output


def test_purge_cli(running) -> None:
    workspace, _ = running
    result = _run(workspace, "purge", "--older-than", "0s", "--dry-run")
    assert result.exit_code == 0 and json.loads(result.output) == {"purged": [], "dry_run": True}
    bad = _run(workspace, "purge", "--older-than", "soon")
    assert bad.exit_code == 1 and "duration 'soon' not understood" in bad.output


def test_background_extension_start_status_stop(tmp_path) -> None:
    workspace = make_workspace(tmp_path)
    started = _run(workspace, "extension", "start")
    try:
        assert started.exit_code == 0, started.output
        info = json.loads(started.output)
        assert info["url"].startswith("http://127.0.0.1:")
        assert stat.S_IMODE(server.key_path(workspace).stat().st_mode) == 0o600
        assert json.loads(_run(workspace, "extension", "status").output)["running"] is True
        again = _run(workspace, "extension", "start")
        assert again.exit_code == 1 and "already runs" in again.output
        assert _run(workspace, "versions", "m").exit_code == 1
    finally:
        stopped = _run(workspace, "extension", "stop")
    assert "extension stopped." in stopped.output
    assert json.loads(_run(workspace, "extension", "status").output)["running"] is False
