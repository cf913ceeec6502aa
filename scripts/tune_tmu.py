"""Tune TMU against cached original and gold models on the ``cpu-small`` protocol.

Stage 1 (``train``) builds the protocol's index and trains, once, the original model and the gold model of
each forget class (plus, with ``--floor``, the second-seed "floor" golds) with the protocol's own recipe,
caching them with the evaluation harness's cache code (same keys as ``tmu-admin evaluate``) under ``--cache``
(default /tmp/tmu-tune/cache); checkpoints from a harness cache can be copied in and are reused.

Stage 2 (``run``) runs unlearning variants against the cached models and prints one JSON row per variant
and class, then the mean over the forget classes of Delta, ACC_Df, ACC_Dtest (and gold's), ASR (and gold's),
ACC_gl, the predicted-easy rate and the request seconds.

    python scripts/tune_tmu.py train [--floor] [--classes 3 8 1]
    python scripts/tune_tmu.py run --persist --variant tmu --variant 'tmu:noise_std=0' --variant finetune

A variant is ``method[:key=value,key=value]``; values are parsed as JSON when they can be
(``features=["df","cf"]``), else kept as strings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from tmu_core.device import resolve_device
from tmu_core.evaluate.cache import open_index, trained_model
from tmu_core.evaluate.metrics import generalization_label_accuracy
from tmu_core.evaluate.protocols import builtin_protocol
from tmu_core.evaluate.scoring import EvalTensors, MemorySource, hard_mask, make_forget_set, model_outputs, score
from tmu_core.evaluate.splits import pick_forget_ids, split_test
from tmu_core.unlearn import UnlearnData, get_method, parse_method_spec

logger = logging.getLogger("tune_tmu")


def setup(cache: Path, device: torch.device, epochs: int | None = None, lr: float | None = None):
    # The protocol's recipe fits the training set (no augmentation), so D_f is memorised.
    protocol = builtin_protocol("cpu-small")
    changes = {k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None}
    if changes:
        protocol = replace(protocol, train=replace(protocol.train, **changes))
    index = open_index(protocol.source, cache)
    split = split_test(index, protocol.twin_fraction, protocol.split_seed)
    source = MemorySource(index, [*index.ids("train"), *split.twin_ids, *split.eval_ids])
    train_ids = tuple(source.ids("train"))
    tensors = EvalTensors(train_ids, split.eval_ids, source.labels(train_ids), source.labels(split.eval_ids))
    return protocol, source, split, tensors


def train_model_for(protocol, source, cache: Path, ids, seed: int, role: str, device: torch.device):
    cfg = replace(protocol.train, seed=seed)
    return trained_model(source, ids, protocol.arch, cfg, protocol.source, cache, device, role)


def stage_train(args: argparse.Namespace, device: torch.device) -> None:
    protocol, source, split, tensors = setup(args.cache, device, args.epochs, args.lr)
    original = train_model_for(protocol, source, args.cache, tensors.train_ids, 0, "original", device)
    outputs = model_outputs(original.model, source, tensors, device, 512)
    acc = (outputs.train_logits.argmax(1) == tensors.train_labels).float().mean().item()
    print(f"original: train acc {100 * acc:.1f} ({original.seconds:.0f}s, cached={original.cached})")
    for forget_class in args.classes or protocol.forget_classes:
        forget_ids = pick_forget_ids(source, forget_class, protocol.forget_size, 0)
        forget_set = make_forget_set(tensors, 0, forget_class, source.classes[forget_class], forget_ids)
        gold = train_model_for(protocol, source, args.cache, forget_set.retain_ids, 0, "gold", device)
        print(f"gold class {forget_class}: {gold.seconds:.0f}s cached={gold.cached}")
        if args.floor:
            floor = train_model_for(protocol, source, args.cache, forget_set.retain_ids,
                                    protocol.floor_seed_offset, "floor", device)
            print(f"floor class {forget_class}: {floor.seconds:.0f}s cached={floor.cached}")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def class_context(protocol, source, tensors, cache: Path, device: torch.device, forget_class: int, floor: bool):
    forget_ids = pick_forget_ids(source, forget_class, protocol.forget_size, 0)
    forget_set = make_forget_set(tensors, 0, forget_class, source.classes[forget_class], forget_ids)
    gold = train_model_for(protocol, source, cache, forget_set.retain_ids, 0, "gold", device)
    gold_scores = score(model_outputs(gold.model, source, tensors, device, 512), tensors, forget_set,
                        protocol.mia_alpha)
    floor_scores = None
    if floor:
        floor_model = train_model_for(protocol, source, cache, forget_set.retain_ids, protocol.floor_seed_offset,
                                      "floor", device)
        floor_scores = score(model_outputs(floor_model.model, source, tensors, device, 512), tensors, forget_set,
                             protocol.mia_alpha)
    return forget_set, gold_scores, floor_scores


def row(label: str, scores, gold_scores, hard=None, seconds=None, extra=None) -> dict:
    out = {"variant": label, "acc_df": scores.acc_df, "delta": abs(scores.acc_df - gold_scores.acc_df),
           "acc_dtest": scores.acc_dtest, "gold_acc_dtest": gold_scores.acc_dtest, "asr": scores.asr,
           "gold_asr": gold_scores.asr, "acc_dr": scores.acc_dr, "seconds": seconds}
    if hard is not None:
        out["acc_gl"] = generalization_label_accuracy(hard, gold_scores.forget_correct)
        out["pred_easy"] = 100.0 * (~hard).float().mean().item()
    out.update(extra or {})
    return out


def stage_run(args: argparse.Namespace, device: torch.device) -> None:
    protocol, source, split, tensors = setup(args.cache, device, args.epochs, args.lr)
    original = train_model_for(protocol, source, args.cache, tensors.train_ids, 0, "original", device)
    original_outputs = model_outputs(original.model, source, tensors, device, 512)
    classes = args.classes or list(protocol.forget_classes)
    contexts = {c: class_context(protocol, source, tensors, args.cache, device, c, args.floor) for c in classes}
    rows: list[dict] = []
    for c, (forget_set, gold_scores, floor_scores) in contexts.items():
        rows.append({"class": c, **row("original", score(original_outputs, tensors, forget_set, protocol.mia_alpha),
                                       gold_scores)})
        rows.append({"class": c, **row("gold", gold_scores, gold_scores,
                                       hard=~gold_scores.forget_correct)})
        if floor_scores is not None:
            rows.append({"class": c, **row("gold-floor", floor_scores, gold_scores,
                                           hard=~floor_scores.forget_correct)})
    prep_data = UnlearnData(source, (), tensors.train_ids, split.twin_ids)
    for text in args.variant:
        name, options = parse_method_spec(text)
        method = get_method(name, **options)
        workdir = None
        if args.persist and hasattr(method.options, "prepare_key"):
            # Variants that differ only in fine-tune options share one prepared state.
            digest = hashlib.sha256(f"{original.key}{method.options.prepare_key()}".encode()).hexdigest()[:16]
            workdir = args.cache.parent / "prepared" / digest
        started = time.perf_counter()
        method.prepare(original.model, original.meta, prep_data, device, workdir)
        prep_seconds = time.perf_counter() - started
        for c, (forget_set, gold_scores, _) in contexts.items():
            data = UnlearnData(source, forget_set.forget_ids, forget_set.retain_ids, split.twin_ids)
            outcome = method.unlearn(original.model, original.meta, data, device, workdir)
            scores = score(model_outputs(outcome.model, source, tensors, device, 512), tensors, forget_set,
                           protocol.mia_alpha)
            hard = None
            if outcome.predicted_hard_ids is not None:
                hard = hard_mask(forget_set.forget_ids, outcome.predicted_hard_ids)
            tune = outcome.details.get("tune", {})
            extra = {"prepare_s": prep_seconds, "steps": outcome.details.get("steps"),
                     "stop": outcome.details.get("stop_reason"), "hard_after": tune.get("hard_accuracy_after"),
                     "easy_after": tune.get("easy_accuracy_after"), "timings": outcome.details.get("timings")}
            rows.append({"class": c, **row(text, scores, gold_scores, hard, outcome.seconds, extra)})
            print(json.dumps(rows[-1], default=lambda v: round(v, 2) if isinstance(v, float) else str(v)))
            sys.stdout.flush()
    print_summary(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


def print_summary(rows: list[dict]) -> None:
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    cols = ("delta", "acc_df", "acc_dtest", "gold_acc_dtest", "asr", "gold_asr", "acc_gl", "pred_easy", "seconds")
    print("\nmean over classes")
    print(f"{'variant':60s} " + " ".join(f"{c:>9s}" for c in cols))
    for label in labels:
        mine = [r for r in rows if r["variant"] == label]
        values = [_mean([r.get(c) for r in mine]) for c in cols]
        print(f"{label[:60]:60s} " + " ".join(f"{v:9.2f}" for v in values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("train", "run"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tmu-tune/cache"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, help="epochs of the original and gold models (default: the protocol's)")
    parser.add_argument("--lr", type=float, help="initial learning rate of those models (default: the protocol's)")
    parser.add_argument("--floor", action="store_true", help="also train/score the second-seed gold")
    parser.add_argument("--classes", type=int, nargs="*", help="forget classes (default: the protocol's)")
    parser.add_argument("--variant", action="append", default=[], help="method[:key=value,...] (repeatable)")
    parser.add_argument("--persist", action="store_true",
                        help="keep prepared TMU state under <cache>/../prepared, shared by variants that only differ "
                             "in fine-tune options")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    device = resolve_device(args.device)
    args.cache.mkdir(parents=True, exist_ok=True)
    stage_train(args, device) if args.stage == "train" else stage_run(args, device)


if __name__ == "__main__":
    main()
