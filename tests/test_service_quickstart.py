"""Quickstart pieces that need no server: owner grouping, the folder rule, the digits index (the full run is
``tmu-admin quickstart``, run by hand and by scripts/bench_swap.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tmu_core.errors import ConflictError, InvalidInputError
from tmu_core.service.quickstart import QuickstartConfig, build_index, owner_groups, prepare_folder


def test_owner_groups_are_seeded_and_sized() -> None:
    ids = [f"s{n}" for n in range(23)]
    owners = owner_groups(ids, 5, seed=0)
    assert sorted(Counter(owners.values()).values()) == [3, 5, 5, 5, 5]
    assert owners == owner_groups(ids, 5, seed=0) and owners != owner_groups(ids, 5, seed=1)


def test_folder_rule(tmp_path: Path) -> None:
    earlier = tmp_path / "qs"
    (earlier / ".tmu").mkdir(parents=True)
    (earlier / "model_store").mkdir()
    workspace = prepare_folder(QuickstartConfig(folder=earlier))
    assert not earlier.exists() and workspace.home == earlier / ".tmu"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConflictError, match="holds other files; pass overwrite"):
        prepare_folder(QuickstartConfig(folder=other))
    assert (other / "notes.txt").exists()
    prepare_folder(QuickstartConfig(folder=other, overwrite=True))
    assert not other.exists()


@pytest.mark.parametrize("kwargs, words", [({"owner_size": 0}, "owner_size"), ({"forget_samples": -1}, "forget"),
                                           ({"data": Path("/nope.zip")}, "does not exist")])
def test_config_checks(kwargs, words) -> None:
    with pytest.raises(InvalidInputError, match=words):
        QuickstartConfig(**kwargs)


def test_digits_index_has_owners_of_five(tmp_path: Path) -> None:
    config = QuickstartConfig(folder=tmp_path / "qs")
    workspace = prepare_folder(config)
    with build_index(workspace, config) as index:
        train = index.ids("train")
        owners = Counter(r.owner_id for r in index.lookup(train))
        assert len(owners) == -(-len(train) // 5) and max(owners.values()) == 5
        first = index.lookup([train[0]])[0].owner_id
        assert len(index.ids_for_owners([first])) == owners[first]
