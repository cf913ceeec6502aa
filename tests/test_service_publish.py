"""Recording a packaged version with the samples it was trained on (real index, real SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_service_support import make_index, make_workspace
from tmu_core.errors import InvalidInputError, UnknownIdsError
from tmu_core.models import build_model
from tmu_core.service.publish import read_manifest, training_ids
from tmu_core.train import CheckpointMeta, save_checkpoint
from tmu_core.index.forget import ids_fingerprint


@pytest.fixture
def indexed(tmp_path: Path):
    workspace = make_workspace(tmp_path)
    with make_index(workspace, tmp_path, train=3, test=1) as index:
        train = index.ids("train")
    return workspace, train


def _checkpoint(tmp_path: Path, ids: list[str]) -> Path:
    meta = CheckpointMeta("small_cnn", 4, ("a", "b", "c", "d"), 3, 16, (0.0,) * 3, (1.0,) * 3, 0, {},
                          ids_fingerprint(ids), len(ids))
    return save_checkpoint(tmp_path / "ckpt.pt", build_model("small_cnn", 4, 3, 16), meta)


def test_the_whole_training_split_is_the_default_when_it_matches(indexed, tmp_path) -> None:
    workspace, train = indexed
    assert training_ids(workspace, _checkpoint(tmp_path, train)) == train


def test_a_subset_needs_its_manifest(indexed, tmp_path) -> None:
    workspace, train = indexed
    subset = train[:5]
    checkpoint = _checkpoint(tmp_path, subset)
    with pytest.raises(InvalidInputError, match=r"index's current training split \(12 ids\) is not what .* "
                                                r"was trained on \(5 samples.*pass --trained-on"):
        training_ids(workspace, checkpoint)
    manifest = tmp_path / "ids.txt"
    manifest.write_text("# the five samples\n" + "\n".join(reversed(subset)) + "\n\n")
    assert training_ids(workspace, checkpoint, read_manifest(manifest)) == sorted(subset)
    with pytest.raises(InvalidInputError, match=r"the manifest \(4 ids\) is not what"):
        training_ids(workspace, checkpoint, subset[:4])


def test_a_manifest_naming_unknown_samples_is_refused(indexed, tmp_path) -> None:
    workspace, train = indexed
    with pytest.raises(UnknownIdsError) as err:
        training_ids(workspace, _checkpoint(tmp_path, train), train + ["train/z/9999"])
    assert err.value.ids == ["train/z/9999"]


def test_an_empty_or_unreadable_manifest_is_refused(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InvalidInputError, match="names no sample id"):
        read_manifest(empty)
    with pytest.raises(InvalidInputError, match="cannot read the sample-id manifest"):
        read_manifest(tmp_path / "missing.txt")
