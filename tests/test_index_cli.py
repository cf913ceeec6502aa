"""``tmu-admin index build|info|verify`` through click's CliRunner: exit codes and exact messages."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_index_support import make_tree, zip_tree

from tmu_core.cli import cli
from tmu_core.index import TrainingIndex


@pytest.fixture
def runner():
    return CliRunner()


def _run(runner, tmp_path, *args):
    return runner.invoke(cli, ["--home", str(tmp_path / "home"), "index", *args])


def test_build_digits_into_workspace_then_info(runner, tmp_path):
    result = _run(runner, tmp_path, "build", "--digits")
    dest = tmp_path / "home" / "index"
    assert result.exit_code == 0, result.output
    assert result.output == (f"indexed 1438 train and 359 test images (10 classes, shape 1x8x8) into {dest}\n")
    info = _run(runner, tmp_path, "info")
    assert info.exit_code == 0
    lines = info.output.splitlines()
    assert lines[:7] == [f"index:      {dest}", "classes:    10", "shape:      1x8x8 (C x H x W)",
                         "samples:    train 1438, test 359", "owners:     1797", "tombstones: 0",
                         f"size:       {TrainingIndex.open(dest).info().size_bytes} bytes"]
    assert lines[7] == "class  train   test" and lines[8] == "0        142     36"


def test_build_zip_subset_with_owners_and_json_info(runner, tmp_path):
    make_tree(tmp_path / "src", train=3, test=2)
    archive = zip_tree(tmp_path / "src", tmp_path / "data.zip")
    owners = tmp_path / "owners.json"
    owners.write_text(json.dumps({"train/cat/0000": "alice", "train/dog/0000": "alice"}))
    dest = tmp_path / "idx"
    result = _run(runner, tmp_path, "build", "--zip", str(archive), "--owners", str(owners),
                  "--train-per-class", "2", "--test-per-class", "1", "--index", str(dest))
    assert result.exit_code == 0, result.output
    assert result.output == f"indexed 6 train and 3 test images (3 classes, shape 3x8x8) into {dest}\n"
    info = json.loads(_run(runner, tmp_path, "info", "--json", "--index", str(dest)).output)
    assert info["counts"] == {"train": 6, "test": 3} and info["owners"] == 8
    assert info["class_counts"]["test"] == {"cat": 1, "dog": 1, "eel": 1}
    assert info["image_shape"] == [3, 8, 8] and info["path"] == str(dest)


def test_build_folder_refuses_to_overwrite_without_flag(runner, tmp_path):
    make_tree(tmp_path / "src", train=1, test=1)
    dest = tmp_path / "idx"
    args = ("build", "--folder", str(tmp_path / "src"), "--index", str(dest))
    assert _run(runner, tmp_path, *args).exit_code == 0
    again = _run(runner, tmp_path, *args)
    assert again.exit_code == 1
    assert again.output == f"Error: destination {dest} already exists; pass overwrite to replace it\n"
    assert _run(runner, tmp_path, *args, "--overwrite").exit_code == 0


def test_build_needs_exactly_one_source(runner, tmp_path):
    none = _run(runner, tmp_path, "build")
    assert none.exit_code == 2
    assert "Error: give exactly one of --zip, --folder or --digits (got none)" in none.output
    both = _run(runner, tmp_path, "build", "--digits", "--folder", str(tmp_path))
    assert both.exit_code == 2
    assert "Error: give exactly one of --zip, --folder or --digits (got --folder and --digits)" in both.output
    limits = _run(runner, tmp_path, "build", "--digits", "--train-per-class", "3")
    assert limits.exit_code == 2
    assert "--train-per-class and --test-per-class apply to --zip and --folder, not --digits" in limits.output


def test_build_reports_bad_image(runner, tmp_path):
    make_tree(tmp_path / "src", train=1, test=1)
    bad = tmp_path / "src" / "test" / "dog" / "0000.png"
    bad.write_bytes(b"oops")
    result = _run(runner, tmp_path, "build", "--folder", str(tmp_path / "src"))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad}: not a readable image (4 bytes starting b'oops'); expected JPEG, PNG, WebP, BMP, GIF or TIFF")


def test_info_without_index(runner, tmp_path):
    result = _run(runner, tmp_path, "info")
    assert result.exit_code == 1
    assert result.output == f"Error: no training index at {tmp_path / 'home' / 'index'}: index.sqlite is missing\n"


def test_verify_ok_then_damaged(runner, tmp_path):
    make_tree(tmp_path / "src", train=2, test=1)
    dest = tmp_path / "idx"
    index = TrainingIndex.open(_build(runner, tmp_path, dest))
    index.forget(["train/cat/0000"], "r1")
    ok = _run(runner, tmp_path, "verify", "--index", str(dest))
    assert ok.exit_code == 0 and ok.output == "ok: 9 checked\n"
    record = index.lookup(["train/eel/0001"])[0]
    with open(dest / "blobs.bin", "r+b") as blob:
        blob.seek(record.offset + record.length // 2)
        blob.write(b"\xff\x00\xff\x00")
    index.close()
    bad = _run(runner, tmp_path, "verify", "--index", str(dest))
    assert bad.exit_code == 1
    assert bad.output == ("bad: train/eel/0001\n"
                          "Error: index check failed: 1 bad sample(s), 0 unwiped tombstone(s) of 9 checked\n")


def _build(runner, tmp_path, dest):
    result = _run(runner, tmp_path, "build", "--folder", str(tmp_path / "src"), "--index", str(dest))
    assert result.exit_code == 0, result.output
    return dest
