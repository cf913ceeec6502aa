"""TMU's twin problem (paper section 3.1) and the feature columns of either problem.

Twin problem: M_t = M_o fine-tuned on D_test. For M_t, "forget D_test" has a known gold model, M_o, so
M_o's correctness on D_test labels each twin sample easy (1) or hard (0). The twin problem's features of
D_test are computed with M_t as "the original model" and D_r + D_f as the retained set; the real problem's
features of D_f with M_o and D_r.

The training set (D_r + D_f) is never in memory as images: its penultimate features under M_o and M_t are
computed in one pass each, a batch at a time, and the samples the twin and CF models train on are read one
training batch at a time. D_test is small and loads whole.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, NamedTuple

import torch
from torch import nn

from tmu_core.unlearn.common import (
    copy_model,
    correct_of,
    features_of,
    features_over,
    fresh_model,
    logits_of,
    model_hash,
    subset_rows,
    train_epochs,
)
from tmu_core.unlearn.data import LazyImages, UnlearnData
from tmu_core.unlearn.easy_hard import EasyHardMLP, fit_classifier
from tmu_core.unlearn.features import (
    adversarial_feature,
    assemble,
    class_prior,
    curriculum_feature,
    distance_feature,
)
from tmu_core.unlearn.forget_tune import logit_margin
from tmu_core.unlearn.options import TmuOptions
from tmu_core.unlearn.prepared import PreparedTmu

logger = logging.getLogger(__name__)


def prepare_key(model: nn.Module, data: UnlearnData, options: TmuOptions) -> str:
    """Identifies a prepared state: the model's weights, the preparation options, training and twin ids."""
    digest = hashlib.sha256()
    for part in (model_hash(model), options.prepare_key(), "\n".join(data.training_ids), "\n".join(data.twin_ids)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def training_ids(data: UnlearnData) -> tuple[tuple[str, ...], torch.Tensor]:
    """D_r + D_f ids (retain rows first, then forget rows) and their labels (N,); no image is read.

    Raises:
        InvalidInputError: the retained set is empty.
    """
    ids = data.nonempty("retain") + data.forget_ids
    return ids, data.labels_of(ids)


def problem_columns(original: nn.Module, images: torch.Tensor, labels: torch.Tensor, query_feats: torch.Tensor,
                    reference_feats: torch.Tensor, reference_labels: torch.Tensor, cf_model: nn.Module,
                    options: TmuOptions, device: torch.device) -> dict[str, torch.Tensor]:
    """DF, AF and CF (only the kinds in ``options.features``) of one problem's samples, on the CPU.

    Args:
        original: the problem's "original model" (M_o, or M_t for the twin problem).
        images, labels: the samples to describe (D_f, or D_test).
        query_feats: (N, D) their penultimate features under ``original``.
        reference_feats, reference_labels: the problem's retained set under ``original``.
        cf_model: the curriculum model.
        options: feature settings.
        device: where to compute.
    """
    columns: dict[str, torch.Tensor] = {}
    if "df" in options.features:
        columns["df"] = distance_feature(query_feats.to(device), labels, reference_feats.to(device), reference_labels,
                                         options.df_top_n, options.df_same_class, options.df_normalise).cpu()
    if "af" in options.features:
        columns["af"] = adversarial_feature(original, images, labels, device, options.af_eps, options.af_steps,
                                            options.af_step).cpu()
    if "cf" in options.features:
        columns["cf"] = curriculum_feature(cf_model, images, labels, device).cpu()
    return columns


def train_cf_model(model: nn.Module, meta: Any, images: torch.Tensor | LazyImages, labels: torch.Tensor,
                   options: TmuOptions, device: torch.device) -> nn.Module:
    """A fresh network of M_o's architecture trained ``cf_epochs`` epochs on the given samples.

    ``images`` (N, C, H, W) uint8 may be :class:`LazyImages`: each step then reads only its own batch.
    """
    cf_model = fresh_model(model, meta, options.seed + 2, device)
    train_epochs(cf_model, images, labels, epochs=options.cf_epochs, lr=options.cf_lr, batch_size=options.cf_batch,
                 seed=options.seed + 3, device=device)
    return cf_model


def make_twin_model(model: nn.Module, data: UnlearnData, train: tuple[tuple[str, ...], torch.Tensor],
                    options: TmuOptions, target: float, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """M_t: a copy of M_o fine-tuned on D_test until it fits D_test as well as ``target`` (or ``twin_epochs``).

    ``target`` is a fraction; matching M_o's own fit of its training set keeps D_test under M_t as
    "memorised" as D_f is under M_o, so features of the two problems are comparable. With
    ``twin_retain_mix > 0`` a random part of the training set (that share of |D_test|) joins the fine-tune,
    so that M_t keeps fitting D_r + D_f as a model trained on all three would (read a batch at a time).

    Args:
        model: M_o.
        data: the twin ids and the source of every image.
        train: the training ids and their labels.
        options: TMU options.
        target: the fraction of D_test M_t must fit.
        device: where to compute.
    """
    twin_images, twin_labels = data.tensors("twin")
    images, labels = twin_images, twin_labels
    if options.twin_retain_mix > 0:
        train_ids, train_labels = train
        rows = subset_rows(len(train_ids), min(1.0, options.twin_retain_mix * len(twin_labels) / len(train_ids)),
                           options.seed + 8)
        images = data.rows(data.twin_ids + tuple(train_ids[row] for row in rows.tolist()))
        labels = torch.cat([twin_labels, train_labels[rows]])
    twin_model = copy_model(model, device)

    def fitted() -> bool:
        return correct_of(twin_model, twin_images, twin_labels, device).float().mean().item() >= target

    fit = train_epochs(twin_model, images, labels, epochs=options.twin_epochs, lr=options.twin_lr,
                       batch_size=options.twin_batch, seed=options.seed + 1, device=device, until=fitted)
    fit["fit_accuracy"] = 100.0 * correct_of(twin_model, twin_images, twin_labels, device).float().mean().item()
    fit["target_accuracy"] = 100.0 * target
    return twin_model, fit


def original_fit(model: nn.Module, train_feats: torch.Tensor, train_labels: torch.Tensor) -> float:
    """M_o's accuracy (fraction) on its training set, from its penultimate features and ``model.head``."""
    device = next(model.head.parameters()).device
    with torch.inference_mode():
        logits = model.head(train_feats.to(device))
    return (logits.argmax(dim=1).cpu() == train_labels.cpu()).float().mean().item()


class OriginalSide(NamedTuple):
    """What a prepared state holds under the version's own model M_o (see :func:`original_side`)."""

    train_ids: tuple[str, ...]
    train_labels: torch.Tensor
    train_features: torch.Tensor
    twin_easy: torch.Tensor
    class_rates: torch.Tensor
    twin_prior: torch.Tensor
    twin_margins: torch.Tensor
    twin_logits: torch.Tensor
    train_counts: torch.Tensor


def original_side(model: nn.Module, data: UnlearnData, device: torch.device) -> OriginalSide:
    """The training ids and labels (:func:`training_ids`), their (N, D) penultimate features under M_o (one pass,
    a batch at a time, on the CPU), and M_o on the twin samples: which it classifies correctly (their easy
    labels), the per-class easy rates and each twin sample's leave-one-out rate (:func:`class_prior`), its
    logits and logit margins; and the training samples of each class."""
    train_ids, train_labels = training_ids(data)
    twin_images, twin_labels = data.tensors("twin")
    train_feats = features_over(model, data.batches(train_ids), len(train_ids), device)
    twin_logits = logits_of(model, twin_images, device).cpu()
    twin_easy = twin_logits.argmax(dim=1) == twin_labels.cpu()
    num_classes = int(max(train_labels.max(), twin_labels.max())) + 1
    class_rates, twin_prior = class_prior(twin_labels, twin_easy, num_classes)
    train_counts = torch.bincount(train_labels.cpu().long(), minlength=twin_logits.shape[1])
    return OriginalSide(train_ids, train_labels, train_feats, twin_easy, class_rates, twin_prior,
                        logit_margin(twin_logits, twin_labels.cpu()), twin_logits, train_counts)


def build_prepared(model: nn.Module, meta: Any, data: UnlearnData, options: TmuOptions, device: torch.device,
                   key: str) -> PreparedTmu:
    """Build TMU's per-model-version state (twin model, CF model, features, classifier).

    Args:
        model: M_o (left unchanged).
        meta: its checkpoint metadata (to build the CF model's architecture).
        data: the training samples (retain + forget) and the twin ids.
        options: TMU options.
        device: where to compute.
        key: the :func:`prepare_key` to store.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # (N, D) under M_o: the first of the two passes over D_r + D_f
    side = original_side(model, data, device)
    train_ids, train_labels, train_feats = side.train_ids, side.train_labels, side.train_features
    twin_easy = side.twin_easy
    twin_images, twin_labels = data.tensors("twin")
    timings["original_features"] = time.perf_counter() - started

    mark = time.perf_counter()
    target = options.twin_target_accuracy
    if target is None:
        target = original_fit(model, train_feats, train_labels)
    twin_model, twin_fit = make_twin_model(model, data, (train_ids, train_labels), options, target, device)
    timings["twin_model"] = time.perf_counter() - mark

    mark = time.perf_counter()
    rows = subset_rows(len(train_ids), options.cf_subset, options.seed + 6)
    cf_ids = data.twin_ids + tuple(train_ids[i] for i in rows.tolist())
    cf_model = train_cf_model(model, meta, data.rows(cf_ids), torch.cat([twin_labels, train_labels[rows]]), options,
                              device)
    timings["cf_model"] = time.perf_counter() - mark

    mark = time.perf_counter()
    twin_train_feats = features_over(twin_model, data.batches(train_ids), len(train_ids), device)  # the second pass
    columns = problem_columns(twin_model, twin_images, twin_labels, features_of(twin_model, twin_images, device),
                              twin_train_feats, train_labels, cf_model, options, device)
    if "prior" in options.features:
        columns["prior"] = side.twin_prior
    timings["twin_features"] = time.perf_counter() - mark

    mark = time.perf_counter()
    clf = fit_twin_classifier(columns, twin_easy, options, device)
    timings["classifier"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    info = {"kind": "full", "chain": 0, "options": options.prepare_key(), "timings": timings, "twin_fit": twin_fit,
            "twin_easy_rate": 100.0 * twin_easy.float().mean().item(), "twin_size": len(data.twin_ids),
            "train_size": len(train_ids), "cf_size": len(cf_ids)}
    logger.info("prepared TMU: twin fit %.1f%% in %d epochs, easy rate %.1f%%, %.1fs", twin_fit["fit_accuracy"],
                twin_fit["epochs"], info["twin_easy_rate"], timings["total"])
    return PreparedTmu(key=key, train_ids=train_ids, train_features=train_feats.cpu(), train_labels=train_labels.cpu(),
                       twin_ids=data.twin_ids, twin_columns=columns, twin_easy=twin_easy, class_rates=side.class_rates,
                       twin_margins=side.twin_margins, twin_logits=side.twin_logits,
                       reference_counts=side.train_counts,
                       twin_state={k: v.detach().cpu() for k, v in twin_model.state_dict().items()},
                       cf_state={k: v.detach().cpu() for k, v in cf_model.state_dict().items()},
                       cf_ids=cf_ids, classifier=clf, info=info)


def fit_twin_classifier(columns: dict[str, torch.Tensor], twin_easy: torch.Tensor, options: TmuOptions,
                        device: torch.device) -> EasyHardMLP:
    """The easy/hard MLP fitted on the twin problem's features; returned on the CPU."""
    features = assemble(columns, options.features, options.log_losses).to(device)
    return fit_classifier(features, twin_easy.to(device), options.classifier_config()).cpu()


def incremental_refusal(parent: PreparedTmu | None, data: UnlearnData, options: TmuOptions) -> str | None:
    """Why ``parent`` cannot be updated into the state of ``data``'s version (None when it can).

    It can when it was made with the same preparation options and twin ids, its training ids hold every id of
    ``data`` (the new version forgot samples, it learnt none), and fewer than ``options.incremental_max``
    incremental updates lead to it from its last full build.
    """
    if options.incremental_max == 0:
        return "incremental_max is 0"
    if parent is None:
        return "no prepared state of the parent version in memory"
    if parent.info.get("options") != options.prepare_key():
        return "the parent state was prepared with other options"
    if tuple(parent.twin_ids) != tuple(data.twin_ids):
        return "the parent state has other twin ids"
    if not set(data.training_ids) <= set(parent.train_ids):
        return "the new version has training ids the parent state does not hold"
    chain = int(parent.info.get("chain", 0))
    if chain >= options.incremental_max:
        return f"{chain} incremental updates since the last full build (incremental_max {options.incremental_max})"
    return None


def update_prepared(parent: PreparedTmu, model: nn.Module, meta: Any, data: UnlearnData, options: TmuOptions,
                    device: torch.device, key: str, origin: str | None = None) -> PreparedTmu:
    """The prepared state of ``model``, a version unlearned from ``parent``'s, from ``parent`` (call only when
    :func:`incremental_refusal` is None).

    What is recomputed and what is kept follows one rule: nothing derived from a model that was trained on the
    forgotten samples is kept, except values computed on the held-out twin samples (D_test) alone.

    - Recomputed under ``model``: the training features (one pass over the new training set, which has no row
      of a forgotten id).
    - The held-out measurements (which twin samples M_o classifies correctly, hence the class rates and the
      twin "prior" column, its logits and logit margins on them, and the class counts of the training set it
      was measured with): kept from the parent with ``reference="lineage"``,
      so that every version of a chain of updates compares with the version its last full build was made for;
      recomputed under ``model`` with ``reference="version"``. A retrained model keeps the held-out accuracy
      of the model it replaces; an approximate version that drifted below it would otherwise make its own
      drift the reference: a lower easy share (more samples predicted hard, more forgetting), lower easy
      targets, and a guard that watches only each request's own cost, so the costs add up over a stream.
    - The curriculum model never saw M_o's weights (a fresh network trained on ``cf_ids``): kept when no
      forgotten id is in ``cf_ids``, else retrained with the same seeds on ``cf_ids`` without the forgotten ids
      (exactly what :func:`train_cf_model` gives on those ids), and the twin "cf" column recomputed with it.
    - Kept from the parent: the twin problem's other columns and the fitted easy/hard classifier (both computed
      on D_test only). The classifier is not refitted when the curriculum model is retrained:
      ``scripts/bench_prepare.py`` compares a request's easy/hard predictions and accuracies with this state
      against a full build on the same version (BENCHMARKS.md).
    - Not kept: the twin model M_t, a fine-tune of the parent's model; the new state has none (``twin_state`` is
      empty). Requests do not use it; the next full build makes a new one.

    Args:
        parent: the parent version's prepared state (in memory).
        model: the new version's model.
        meta: its checkpoint metadata (the curriculum model's architecture).
        data: the new version's training ids (D_r' as retain, no forget ids) and the twin ids.
        options: TMU options (the parent's preparation options).
        device: where to compute.
        key: the new state's :func:`prepare_key`.
        origin: names the parent version in ``info`` (e.g. ``"m:v3"``).
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    side = original_side(model, data, device)
    train_ids, train_labels, train_feats = side.train_ids, side.train_labels, side.train_features
    forgotten = set(parent.train_ids) - set(train_ids)
    twin_images, twin_labels = data.tensors("twin")
    timings["original_features"] = time.perf_counter() - started

    mark = time.perf_counter()
    columns = dict(parent.twin_columns)
    held_out = ["twin_easy", "class_rates", "twin_margins", "twin_logits", "reference_counts"] + (
        ["twin_columns.prior"] if "prior" in columns else [])
    if options.reference == "lineage":
        twin_easy, class_rates, twin_margins = parent.twin_easy, parent.class_rates, parent.twin_margins
        twin_logits, reference_counts = parent.twin_logits, parent.reference_counts
        recomputed, kept = ["train_features"], held_out
    else:
        twin_easy, class_rates, twin_margins = side.twin_easy, side.class_rates, side.twin_margins
        twin_logits, reference_counts = side.twin_logits, side.train_counts
        if "prior" in columns:
            columns["prior"] = side.twin_prior
        recomputed, kept = ["train_features", *held_out], []
    kept += ["twin_columns." + name for name in sorted(columns) if name not in ("prior", "cf")] + ["classifier"]
    cf_ids, cf_state = parent.cf_ids, parent.cf_state
    if forgotten & set(parent.cf_ids):
        cf_ids = tuple(sample for sample in parent.cf_ids if sample not in forgotten)
        cf_model = train_cf_model(model, meta, data.rows(cf_ids), data.labels_of(cf_ids), options, device)
        cf_state = {k: v.detach().cpu() for k, v in cf_model.state_dict().items()}
        if "cf" in columns:
            columns["cf"] = curriculum_feature(cf_model, twin_images, twin_labels, device).cpu()
        recomputed += ["cf_model"] + (["twin_columns.cf"] if "cf" in columns else [])
    else:
        kept += ["cf_model"] + (["twin_columns.cf"] if "cf" in columns else [])
    timings["cf_model"] = time.perf_counter() - mark
    timings["total"] = time.perf_counter() - started
    chain = int(parent.info.get("chain", 0)) + 1
    info = {"kind": "incremental", "chain": chain, "parent_key": parent.key, "parent": origin,
            "reference": options.reference, "options": options.prepare_key(), "forgotten": len(forgotten),
            "kept": kept, "recomputed": recomputed,
            "dropped": ["twin_model"], "timings": timings,
            "twin_easy_rate": 100.0 * twin_easy.float().mean().item(), "twin_size": len(data.twin_ids),
            "train_size": len(train_ids), "cf_size": len(cf_ids)}
    logger.info("prepared TMU incrementally from %s (chain %d, %d forgotten, curriculum model %s) in %.1fs",
                origin or parent.key[:12], chain, len(forgotten),
                "retrained" if "cf_model" in recomputed else "kept", timings["total"])
    return PreparedTmu(key=key, train_ids=train_ids, train_features=train_feats.cpu(), train_labels=train_labels.cpu(),
                       twin_ids=data.twin_ids, twin_columns=columns, twin_easy=twin_easy, class_rates=class_rates,
                       twin_margins=twin_margins, twin_logits=twin_logits, reference_counts=reference_counts,
                       twin_state={}, cf_state=cf_state, cf_ids=cf_ids,
                       classifier=parent.classifier, info=info)
