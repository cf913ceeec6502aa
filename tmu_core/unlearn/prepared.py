"""TMU's per-model-version state: built once by ``prepare()``, saved as files, reloaded when it still matches.

Nothing here depends on which samples a later request forgets:

- the twin model M_t (M_o fine-tuned on D_test) and the twin problem's features and easy/hard labels;
- the curriculum (CF) model, a fresh network trained briefly on D_test and a random part of the training set;
- M_o's penultimate features of every training sample (the retained set of any later request is a subset);
- the fitted easy/hard classifier with its standardisation statistics.

Files under ``workdir``: ``twin_model.pt``, ``cf_model.pt``, ``train_features.pt``, ``twin_problem.pt``,
``classifier.pt`` and ``manifest.json``; the manifest's ``key`` (model hash + preparation options + ids)
decides whether they can be reused. Every ``.pt`` file loads with ``weights_only=True``.

A state made by an incremental update (:func:`tmu_core.unlearn.twin.update_prepared`) holds no twin model:
its ``twin_state`` is empty and no ``twin_model.pt`` is written (the manifest's ``files`` lists what is there).
Requests never read the twin model; only a full build makes one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tmu_core.errors import CheckpointError
from tmu_core.unlearn.easy_hard import EasyHardMLP

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 4  # 3: twin_margins; 4: twin_logits and reference_counts


@dataclass(frozen=True)
class PreparedTmu:
    """Everything a TMU request needs that does not depend on the forget set.

    Attributes:
        key: identifies the model, the preparation options and the ids this was built for.
        train_ids: training samples (D_r + D_f of the model version), in the row order of ``train_features``.
        train_features: (N, D) penultimate features of the training samples under M_o, on the CPU.
        train_labels: (N,) their labels.
        twin_ids: D_test.
        twin_columns: raw features of the twin problem, ``{"df": (T, top_n), "af": (T,), "cf": (T,)}``.
        twin_easy: (T,) bool, M_o classifies the twin sample correctly.
        class_rates: (K,) share of easy twin samples per class (the "prior" feature of a forget sample).
        twin_margins: (T,) M_o's logit margins on the twin samples (the easy samples' target margins are
            quantiles of the correct ones).
        twin_logits: (T, K) M_o's logits on the twin samples (the prior shift of
            :func:`tmu_core.unlearn.easy_hard.shift_scale`).
        reference_counts: (K,) per class, the training samples of the model the twin measurements were taken
            under (a request's gold keeps these minus what was forgotten since).
        twin_state: state_dict of M_t; empty for a state made by an incremental update (no twin model kept).
        cf_state: state_dict of the curriculum model.
        cf_ids: samples the curriculum model was trained on.
        classifier: the fitted easy/hard MLP (on the CPU).
        info: numbers about the build (timings, twin fit, class balance).
    """

    key: str
    train_ids: tuple[str, ...]
    train_features: torch.Tensor
    train_labels: torch.Tensor
    twin_ids: tuple[str, ...]
    twin_columns: dict[str, torch.Tensor]
    twin_easy: torch.Tensor
    class_rates: torch.Tensor
    twin_margins: torch.Tensor
    twin_logits: torch.Tensor
    reference_counts: torch.Tensor
    twin_state: dict[str, torch.Tensor]
    cf_state: dict[str, torch.Tensor]
    cf_ids: tuple[str, ...]
    classifier: EasyHardMLP
    info: dict[str, Any] = field(default_factory=dict)

    def rows_of(self, ids: list[str] | tuple[str, ...]) -> tuple[torch.Tensor, list[str]]:
        """Row indices of the ids held in ``train_features``, and the ids it does not hold."""
        position = {sample: row for row, sample in enumerate(self.train_ids)}
        found = [position[sample] for sample in ids if sample in position]
        missing = [sample for sample in ids if sample not in position]
        return torch.tensor(found, dtype=torch.long), missing


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in state.items()}


def save_prepared(prepared: PreparedTmu, workdir: Path) -> None:
    """Write the prepared state as files under ``workdir``; the manifest is written last, atomically."""
    workdir.mkdir(parents=True, exist_ok=True)
    clf = prepared.classifier
    files = {
        "cf_model.pt": {"state_dict": _cpu(prepared.cf_state), "ids": list(prepared.cf_ids)},
        "train_features.pt": {"ids": list(prepared.train_ids), "features": prepared.train_features.cpu(),
                              "labels": prepared.train_labels.cpu()},
        "twin_problem.pt": {"ids": list(prepared.twin_ids), "easy": prepared.twin_easy.cpu(),
                            "class_rates": prepared.class_rates.cpu(), "margins": prepared.twin_margins.cpu(),
                            "logits": prepared.twin_logits.cpu(), "reference_counts": prepared.reference_counts.cpu(),
                            "columns": {k: v.cpu() for k, v in prepared.twin_columns.items()}},
        "classifier.pt": {"state_dict": _cpu(clf.state_dict()), **clf.shape},
    }
    if prepared.twin_state:
        files["twin_model.pt"] = {"state_dict": _cpu(prepared.twin_state)}
    stale = workdir / "twin_model.pt"
    if not prepared.twin_state and stale.exists():
        stale.unlink()  # a full build's twin model left in this folder is not this state's
    for name, payload in files.items():
        torch.save(payload, workdir / name)
    manifest = {"format": FORMAT, "key": prepared.key, "files": sorted(files), "info": prepared.info}
    tmp = workdir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=float))
    os.replace(tmp, workdir / MANIFEST)
    logger.info("saved TMU prepared state to %s", workdir)


def stored_key(workdir: Path) -> str | None:
    """The key of the prepared state under ``workdir``, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((workdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("key") if manifest.get("format") == FORMAT else None


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"prepared TMU file {path} is missing or corrupt: {err}") from err


def load_prepared(workdir: Path) -> PreparedTmu:
    """Read the prepared state written by :func:`save_prepared`.

    Raises:
        CheckpointError: the manifest or a file is missing or corrupt.
    """
    key = stored_key(workdir)
    if key is None:
        raise CheckpointError(f"no prepared TMU state in {workdir} (missing or unreadable {MANIFEST})")
    manifest = json.loads((workdir / MANIFEST).read_text())
    info = manifest.get("info", {})
    feats, twin = _load(workdir / "train_features.pt"), _load(workdir / "twin_problem.pt")
    cf, clf_file = _load(workdir / "cf_model.pt"), _load(workdir / "classifier.pt")
    clf = EasyHardMLP(clf_file["in_features"], tuple(clf_file["hidden"]), clf_file["outputs"], clf_file["members"])
    clf.load_state_dict(clf_file["state_dict"], strict=True)
    clf.eval()
    return PreparedTmu(
        key=key, train_ids=tuple(feats["ids"]), train_features=feats["features"], train_labels=feats["labels"],
        twin_ids=tuple(twin["ids"]), twin_columns=dict(twin["columns"]), twin_easy=twin["easy"],
        class_rates=twin["class_rates"], twin_margins=twin["margins"], twin_logits=twin["logits"],
        reference_counts=twin["reference_counts"],
        twin_state=_load(workdir / "twin_model.pt")["state_dict"] if "twin_model.pt" in manifest.get("files", ())
        else {}, cf_state=cf["state_dict"],
        cf_ids=tuple(cf["ids"]), classifier=clf, info=info,
    )
