"""Twin Machine Unlearning (TMU): the registered ``tmu`` method.

``prepare()`` builds (or reloads) the per-model-version state of :mod:`tmu_core.unlearn.prepared`;
``prepare_from()`` makes a new version's state from its parent version's by an incremental update.
A forget request then only computes D_f's own features (DF against the prepared retained features with D_f's
rows left out, AF under M_o, CF under the prepared curriculum model), predicts easy/hard with the prepared
classifier and runs the bounded fine-tune of :mod:`tmu_core.unlearn.forget_tune`. With
``cf_per_request=True`` the curriculum model is retrained on D_f + D_test + a part of D_r, as in the paper,
and the classifier is refitted on the twin problem with the new CF column.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.unlearn.base import UnlearnMethod, UnlearnOutcome, register_method
from tmu_core.unlearn.common import (
    copy_model,
    features_over,
    fresh_model,
    logits_of,
    on_device,
    subset_rows,
)
from tmu_core.unlearn.data import UnlearnData
from tmu_core.unlearn.easy_hard import EasyHardMLP, predict_easy, shift_scale
from tmu_core.unlearn.features import assemble, curriculum_feature
from tmu_core.unlearn.forget_tune import TuneSet, forget_finetune
from tmu_core.unlearn.options import TmuOptions
from tmu_core.unlearn.prepared import (
    PreparedTmu,
    load_prepared,
    save_prepared,
    stored_key,
)
from tmu_core.unlearn.twin import (
    build_prepared,
    fit_twin_classifier,
    incremental_refusal,
    prepare_key,
    problem_columns,
    train_cf_model,
    update_prepared,
)

logger = logging.getLogger(__name__)


@register_method("tmu")
class TmuMethod(UnlearnMethod):
    """Twin Machine Unlearning with prepared per-version state (see the module docstring)."""

    options_type = TmuOptions

    def __init__(self, options: TmuOptions | None = None) -> None:
        super().__init__(options)
        self._memory: PreparedTmu | None = None
        self.builds = 0  # how many times this instance built prepared state from scratch
        self.updates = 0  # how many times it made prepared state by an incremental update
        self.last_prepare: str | None = None  # "memory", "disk", "built" or "incremental": how the last one went

    @property
    def prepared(self) -> PreparedTmu | None:
        """The prepared state this instance holds in memory (that of the last version it prepared or used)."""
        return self._memory

    def prepare(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> None:
        """Build TMU's per-model-version state, or reuse it from memory or ``workdir`` when it matches."""
        self._ensure_prepared(on_device(model, device), meta, data, device, workdir)

    def prepare_from(self, parent: PreparedTmu | None, model: nn.Module, meta: Any, data: UnlearnData,
                     device: torch.device, workdir: Path | None = None, origin: str | None = None) -> str:
        """Prepare the state of ``model``, a version unlearned from the one ``parent`` was prepared for.

        Reuses a matching state from memory or ``workdir`` as :meth:`prepare` does; otherwise updates ``parent``
        incrementally (:func:`tmu_core.unlearn.twin.update_prepared`), or builds from scratch when
        :func:`tmu_core.unlearn.twin.incremental_refusal` gives a reason (the reason goes to ``info``).

        Args:
            parent: the parent version's prepared state (e.g. ``prepared`` of the job's method), or None.
            model, meta, data, device, workdir: as for :meth:`prepare`; ``data`` holds the new training ids.
            origin: names the parent version in the new state's ``info``.

        Returns:
            How it went: ``"memory"``, ``"disk"``, ``"built"`` or ``"incremental"``.
        """
        self._ensure_prepared(on_device(model, device), meta, data, device, workdir, parent=(parent, origin))
        return self.last_prepare or "built"

    def _ensure_prepared(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                         workdir: Path | None,
                         parent: tuple[PreparedTmu | None, str | None] | None = None) -> tuple[PreparedTmu, str]:
        if not data.twin_ids:
            raise InvalidInputError("tmu needs twin_ids (held-out samples never trained on) for its twin problem")
        key = prepare_key(model, data, self.options)
        if self._memory is not None and self._memory.key == key:
            return self._memory, self._went("memory")
        if workdir is not None and stored_key(workdir) == key:
            try:
                self._memory = load_prepared(workdir)
                return self._memory, self._went("disk")
            except CheckpointError as err:
                logger.warning("rebuilding TMU prepared state: %s", err)
        refusal = None if parent is None else incremental_refusal(parent[0], data, self.options)
        if parent is not None and refusal is None:
            self._memory = update_prepared(parent[0], model, meta, data, self.options, device, key, parent[1])
            self.updates += 1
            source = "incremental"
        else:
            self._memory = build_prepared(model, meta, data, self.options, device, key)
            if refusal is not None:
                self._memory.info["full_reason"] = refusal
            self.builds += 1
            source = "built"
        if workdir is not None:
            save_prepared(self._memory, workdir)
        return self._memory, self._went(source)

    def _went(self, source: str) -> str:
        self.last_prepare = source
        return source

    def unlearn(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device,
                workdir: Path | None = None) -> UnlearnOutcome:
        """Forget ``data.forget_ids``: predict easy/hard, then fine-tune a copy of ``model``."""
        started = time.perf_counter()
        if not data.forget_ids:
            raise InvalidInputError("tmu: forget_ids is empty; name at least one sample to forget")
        if not data.retain_ids:
            raise InvalidInputError("tmu: retain_ids is empty; the distance feature needs retained samples")
        model = on_device(model, device)
        prepared, source = self._ensure_prepared(model, meta, data, device, workdir)
        timings = {"prepare": time.perf_counter() - started}

        mark = time.perf_counter()
        forget_images, forget_labels = data.tensors("forget")
        clf, columns, cf_info = self._request_features(model, meta, data, prepared, device)
        scale, shift_info = self._shift_scale(data, prepared, forget_labels)
        predicted = predict_easy(clf, assemble(columns, self.options.features, self.options.log_losses),
                                 self.options.easy_rule, columns["prior"], scale)
        timings["features_and_classifier"] = time.perf_counter() - mark

        mark = time.perf_counter()
        unlearned = copy_model(model, device)
        easy_rows, hard_rows = predicted.nonzero().squeeze(1).cpu(), (~predicted).nonzero().squeeze(1).cpu()
        hard = TuneSet(forget_images[hard_rows], forget_labels[hard_rows])
        easy_labels = forget_labels[easy_rows]
        easy = TuneSet(forget_images[easy_rows], easy_labels, self._easy_targets(prepared, data, easy_labels))
        guard, guard_level, held_out = self._twin_sets(data, prepared, model, device)
        tuned = forget_finetune(unlearned, hard, easy, self._retain_set(data), self.options.tune_config(), device,
                                anchor=model, guard=guard, guard_level=guard_level, held_out=held_out)
        timings["fine_tune"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started

        hard_ids = [data.forget_ids[i] for i in hard_rows.tolist()]
        details = {
            "prepared": source, "predicted_hard": len(hard_ids), "predicted_easy": int(easy_rows.numel()),
            "features": list(self.options.features), "easy_rule": self.options.easy_rule,
            "easy_target": self.options.easy_target,
            "cf_per_request": self.options.cf_per_request, "prior_shift": shift_info,
            "twin_images": {"guard": guard.size if guard else 0, "held_out": held_out.size if held_out else 0},
            "held_out_reference": self.options.held_out_reference,
            "steps": tuned.steps, "stop_reason": tuned.stop_reason, "tune": asdict(tuned),
            "timings": timings, "prepared_info": prepared.info, **cf_info,
        }
        logger.info("tmu: %d forget samples, %d predicted hard, %d steps (%s), %.2fs", len(data.forget_ids),
                    len(hard_ids), tuned.steps, tuned.stop_reason, timings["total"])
        return UnlearnOutcome(model=unlearned, details=details, seconds=timings["total"], predicted_hard_ids=hard_ids)

    def _request_features(self, model: nn.Module, meta: Any, data: UnlearnData, prepared: PreparedTmu,
                          device: torch.device) -> tuple[EasyHardMLP, dict[str, torch.Tensor], dict[str, Any]]:
        """D_f's feature columns under M_o, and the classifier to apply (refitted when ``cf_per_request``)."""
        forget_images, forget_labels = data.tensors("forget")
        forget_feats = self._original_features(model, data, data.forget_ids, prepared, device)
        retain_feats = self._original_features(model, data, data.retain_ids, prepared, device)
        retain_labels = self._labels_of(data, data.retain_ids, prepared)
        prior = prepared.class_rates[forget_labels.cpu().clamp(max=prepared.class_rates.numel() - 1)]
        if not self.options.cf_per_request:
            cf_model = self._cf_model(prepared, model, meta, device)
            columns = problem_columns(model, forget_images, forget_labels, forget_feats, retain_feats, retain_labels,
                                      cf_model, self.options, device)
            return prepared.classifier, {**columns, "prior": prior}, {"cf_model": "prepared"}
        mark = time.perf_counter()
        cf_model = self._request_cf_model(model, meta, data, device)
        columns = problem_columns(model, forget_images, forget_labels, forget_feats, retain_feats, retain_labels,
                                  cf_model, self.options, device)
        columns["prior"] = prior
        twin_columns = dict(prepared.twin_columns)
        if "cf" in self.options.features:
            twin_images, twin_labels = data.tensors("twin")
            twin_columns["cf"] = curriculum_feature(cf_model, twin_images, twin_labels, device).cpu()
        clf = fit_twin_classifier(twin_columns, prepared.twin_easy, self.options, device)
        return clf, columns, {"cf_model": "per_request", "cf_seconds": time.perf_counter() - mark}

    def _shift_scale(self, data: UnlearnData, prepared: PreparedTmu,
                     forget_labels: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
        """Each forget sample's class factor from :func:`tmu_core.unlearn.easy_hard.shift_scale` (None when
        ``prior_shift`` is off), and what it used: the temperature and the factor and kept share of each class
        of D_f."""
        if not self.options.prior_shift:
            return None, None
        classes = prepared.twin_logits.shape[1]
        kept = torch.bincount(self._labels_of(data, data.retain_ids, prepared).cpu().long(), minlength=classes)
        reference = prepared.reference_counts.float()
        share = torch.where(reference > 0, kept[:classes].float() / reference.clamp_min(1.0), torch.ones(classes))
        factors, temperature = shift_scale(prepared.twin_logits, data.labels_of(data.twin_ids), share.clamp(max=1.0))
        labels = forget_labels.cpu().long().clamp(max=classes - 1)
        info = {"temperature": temperature, "classes": {
            int(c): {"kept_share": round(float(share[c]), 4), "factor": round(float(factors[c]), 4)}
            for c in labels.unique().tolist()}}
        return factors[labels], info

    def _original_features(self, model: nn.Module, data: UnlearnData, ids: tuple[str, ...], prepared: PreparedTmu,
                           device: torch.device) -> torch.Tensor:
        """M_o's penultimate features of ``ids``: from the prepared store, computing any it lacks."""
        rows, missing = prepared.rows_of(ids)
        if not missing:
            return prepared.train_features[rows]
        logger.info("tmu: computing penultimate features of %d samples not in the prepared state", len(missing))
        return features_over(model, data.batches(ids), len(ids), device)

    @staticmethod
    def _labels_of(data: UnlearnData, ids: tuple[str, ...], prepared: PreparedTmu) -> torch.Tensor:
        rows, missing = prepared.rows_of(ids)
        return prepared.train_labels[rows] if not missing else data.labels_of(ids)

    def _cf_model(self, prepared: PreparedTmu, model: nn.Module, meta: Any, device: torch.device) -> nn.Module:
        cf_model = fresh_model(model, meta, self.options.seed + 2, device)
        cf_model.load_state_dict(prepared.cf_state, strict=True)
        return cf_model.eval()

    def _request_cf_model(self, model: nn.Module, meta: Any, data: UnlearnData, device: torch.device) -> nn.Module:
        """The paper's curriculum model: trained on D_f + D_test + ``cf_subset`` of D_r (read a batch at a time)."""
        rows = subset_rows(len(data.retain_ids), self.options.cf_subset, self.options.seed + 6)
        ids = data.forget_ids + data.twin_ids + tuple(data.retain_ids[row] for row in rows.tolist())
        return train_cf_model(model, meta, data.rows(ids), data.labels_of(ids), self.options, device)

    def _easy_targets(self, prepared: PreparedTmu, data: UnlearnData, labels: torch.Tensor) -> torch.Tensor | None:
        """Per easy sample, the ``easy_quantile`` quantile (0.5: the median) of the logit margins that the
        prepared state's reference model (``reference``) gives held-out (twin) samples of its class that it
        classifies correctly (``easy_target="held_out"``); None for plain cross-entropy."""
        if self.options.easy_target == "none" or not labels.numel():
            return None
        twin_labels = data.labels_of(data.twin_ids)
        margins = prepared.twin_margins
        correct = margins > 0

        def level(values: torch.Tensor) -> float:
            return float(torch.quantile(values, self.options.easy_quantile, interpolation="lower"))

        targets = torch.full(labels.shape, level(margins[correct]) if correct.any() else 1.0)
        for label in labels.unique().tolist():
            mine = correct & (twin_labels == label)
            if mine.any():
                targets[labels == label] = level(margins[mine])
        return targets

    def _twin_sets(self, data: UnlearnData, prepared: PreparedTmu, model: nn.Module, device: torch.device
                   ) -> tuple[TuneSet | None, float | None, TuneSet | None]:
        """The twin (held-out) images the fine-tune measures and holds:

        - the guard's: up to ``guard_size`` of them (None when the guard is off, or when the request has more
          than ``guard_max_samples`` samples: see :mod:`tmu_core.unlearn.options`), and with
          ``reference="lineage"`` the accuracy on them of the version the prepared state's last full build was
          made for (the level the guard's repair steps restore);
        - the held-out anchor's (``held_out_weight > 0``, else None): the others, with the logits it pulls towards:
          the prepared state's (the lineage's version's with ``reference="lineage"``), or with
          ``held_out_reference="version"`` those of ``model``, the version the request starts from. The guard
          never measures an image the fine-tune trains on.
        """
        opts = self.options
        guarded = opts.guard_drop is not None and (opts.guard_max_samples is None
                                                   or len(data.forget_ids) <= opts.guard_max_samples)
        if not guarded and opts.held_out_weight <= 0:
            return None, None, None
        images, labels = data.tensors("twin")
        rows = subset_rows(labels.numel(), min(1.0, opts.guard_size / max(labels.numel(), 1)), opts.seed + 8)
        guard = level = held_out = None
        if guarded and rows.numel():
            guard = TuneSet(images[rows], labels[rows])
            if opts.reference == "lineage":
                level = 100.0 * prepared.twin_easy[rows].float().mean().item()
        if opts.held_out_weight > 0:
            others = torch.ones(labels.numel(), dtype=torch.bool)
            others[rows] = False
            rest = others.nonzero().squeeze(1)
            if not rest.numel():
                logger.warning("tmu: guard_size %d reserves all %d twin images for the guard; the held-out anchor "
                               "gets none, so held_out_weight=%g does nothing. Set guard_size below %d",
                               opts.guard_size, labels.numel(), opts.held_out_weight, labels.numel())
            reference = (prepared.twin_logits[rest] if opts.held_out_reference == "lineage"
                         else logits_of(model, images[rest], device).cpu())
            held_out = TuneSet(images[rest], labels[rest], reference_logits=reference)
        return guard, level, held_out

    def _retain_set(self, data: UnlearnData) -> TuneSet | None:
        """A random sample of D_r big enough for every step's retain batch (None without a retain term); each
        step reads only the batch it draws from it."""
        opts = self.options
        if opts.retain_weight <= 0:
            return None
        count = min(len(data.retain_ids), opts.retain_batch * opts.max_steps)
        rows = subset_rows(len(data.retain_ids), count / len(data.retain_ids), opts.seed + 7)
        ids = [data.retain_ids[i] for i in rows.tolist()]
        return TuneSet(data.rows(ids), data.labels_of(ids))
