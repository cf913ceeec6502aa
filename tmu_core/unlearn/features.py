"""TMU's three discriminative features of a sample (paper section 3.2), as functions over tensors.

- DF, distance feature: the top-N smallest L2 distances from a sample to the retained samples in the
  penultimate-layer space of "the original model" (optionally same-class only, on L2-normalised features).
- AF, adversarial-attack feature: cross-entropy H(p_clean, p_adv) between the softmax of the clean logits and
  the log-softmax of the logits after an untargeted L-inf PGD attack (eps = 4/255 by default). Samples near the
  decision boundary flip under a small budget and get a large value.
- CF, curriculum-loss feature: the per-sample loss under a randomly initialised network of the same
  architecture trained for only one or two epochs; easy samples are learned first and get a small loss.

One more, not in the paper: "prior", the share of easy samples of the sample's class in the twin problem
(the original model's held-out accuracy on that class; leave-one-out for the twin samples themselves).
DF, AF and CF rank samples within a class but say little about how hard the class is as a whole; without
the prior the predicted easy rate of a one-class forget set was off by 20 to 40 points for some classes.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.errors import InvalidInputError
from tmu_core.unlearn.common import as_input, eval_mode, inference_batch, losses_of

logger = logging.getLogger(__name__)

FEATURE_KINDS = ("df", "af", "cf", "prior")
PAPER_FEATURES = ("df", "af", "cf")


# Floats one distance block may take (64 MiB): the (q, r) distances twice over (cdist's result and the
# running top-k's concatenation) plus the (q + r, D + 2) operands cdist builds for its matrix product.
DISTANCE_BLOCK_FLOATS = 1 << 24


def distance_chunks(n_query: int, n_reference: int, dim: int, budget: int | None = None) -> tuple[int, int]:
    """Query and reference rows per distance block, so that ``2 q r + (q + r) (dim + 2) <= budget`` floats
    (``DISTANCE_BLOCK_FLOATS`` when None).

    Square blocks (``q = r``) for large sets on both sides; a small side is taken whole and the other grows
    into the budget left (100 forget samples against a large retained set: one query block). The block, not
    the sizes of the sets, bounds the memory.
    """
    budget = DISTANCE_BLOCK_FLOATS if budget is None else budget
    width = dim + 2
    side = max(1, int((math.sqrt(width * width + 2 * budget) - width) / 2))  # 2 c^2 + 2 c width = budget
    query_rows = max(1, min(n_query, side))
    reference_rows = max(1, min(n_reference, (budget - query_rows * width) // (2 * query_rows + width)))
    return query_rows, reference_rows


def _pairwise_topk(query: torch.Tensor, reference: torch.Tensor, k: int, chunk: int | None) -> torch.Tensor:
    """(Q, k) smallest L2 distances from each query row to the reference rows, ascending; padded if short.

    Both sides are taken in blocks (a running top-k over reference blocks) of :func:`distance_chunks` rows
    (``chunk`` rows on each side when given), so memory stays within one block whatever the size of the
    retained set. Distances do not depend on the block sizes.
    """
    if chunk is None:
        query_rows, reference_rows = distance_chunks(query.shape[0], reference.shape[0], query.shape[1])
    else:
        query_rows = reference_rows = chunk
    out = []
    take = min(k, reference.shape[0])
    for start in range(0, query.shape[0], query_rows):
        block = query[start:start + query_rows]
        best = torch.empty(block.shape[0], 0, device=query.device)
        for ref_start in range(0, reference.shape[0], reference_rows):
            dist = torch.cdist(block, reference[ref_start:ref_start + reference_rows])  # (q, r)
            best = torch.cat([best, dist], dim=1).topk(min(take, best.shape[1] + dist.shape[1]), dim=1,
                                                       largest=False).values
        out.append(best)
    values = torch.cat(out)
    if take < k:  # fewer references than N: repeat the farthest one found
        values = torch.cat([values, values[:, -1:].expand(-1, k - take)], dim=1)
    return values


def distance_feature(query: torch.Tensor, query_labels: torch.Tensor, reference: torch.Tensor,
                     reference_labels: torch.Tensor, top_n: int = 5, same_class: bool = False,
                     normalise: bool = False, chunk: int | None = None) -> torch.Tensor:
    """DF: the ``top_n`` smallest L2 distances from each query sample to the reference (retained) samples.

    Args:
        query: (Q, D) penultimate features of the samples to describe.
        query_labels: (Q,) their labels (used when ``same_class``).
        reference: (R, D) penultimate features of the retained samples; must not contain the query samples.
        reference_labels: (R,) their labels.
        top_n: how many nearest neighbours (columns).
        same_class: only compare with retained samples of the query's class (the public code's choice);
            a class without retained samples falls back to all of them.
        normalise: L2-normalise the features first (the public code's choice).
        chunk: query and reference rows per distance block, to bound memory; None follows the number of
            query and reference rows and the feature width (:func:`distance_chunks`).

    Returns:
        (Q, top_n) distances, ascending in each row.

    Raises:
        InvalidInputError: shapes do not match, ``top_n < 1`` or there is no reference sample.
    """
    if top_n < 1:
        raise InvalidInputError(f"distance_feature: top_n must be >= 1, got {top_n}")
    if reference.shape[0] == 0:
        raise InvalidInputError("distance_feature: the retained (reference) set is empty")
    if query.dim() != 2 or reference.dim() != 2 or query.shape[1] != reference.shape[1]:
        raise InvalidInputError(
            f"distance_feature: expected (Q, D) and (R, D) features, got {tuple(query.shape)} and {tuple(reference.shape)}"
        )
    query, reference = query.float(), reference.float()
    if normalise:
        query, reference = F.normalize(query, dim=1), F.normalize(reference, dim=1)
    if not same_class:
        return _pairwise_topk(query, reference, top_n, chunk)
    out = torch.empty(query.shape[0], top_n, device=query.device)
    query_labels, reference_labels = query_labels.to(query.device), reference_labels.to(reference.device)
    for label in query_labels.unique().tolist():
        rows = (query_labels == label).nonzero().squeeze(1)
        pool = reference[reference_labels == label]
        if pool.shape[0] == 0:
            logger.warning("distance feature: no retained sample of class %d; using all classes", label)
            pool = reference
        out[rows] = _pairwise_topk(query[rows], pool, top_n, chunk)
    return out


def pgd_attack(model: nn.Module, x01: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
               step_size: float) -> torch.Tensor:
    """Untargeted L-inf PGD from the clean point (no random start); returns the adversarial [0, 1] inputs.

    The model's parameter gradients are left untouched (gradients are taken w.r.t. the input only).
    """
    delta = torch.zeros_like(x01, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(model((x01 + delta).clamp(0.0, 1.0)), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += step_size * grad.sign()
            delta.clamp_(-eps, eps)
    return (x01 + delta.detach()).clamp(0.0, 1.0)


def adversarial_feature(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                        eps: float = 4 / 255, steps: int = 5, step_size: float | None = None,
                        batch_size: int | None = None) -> torch.Tensor:
    """AF: H(p_clean, p_adv) = -sum_k softmax(clean)_k * log_softmax(adv)_k per sample (paper Eq. 6).

    Args:
        model: "the original model" of the problem (M_o, or the twin M_t for the twin problem).
        images: (N, C, H, W) uint8.
        labels: (N,) int64 true labels (the attack raises their loss).
        device: where to compute.
        eps: L-inf budget in [0, 1] pixel units.
        steps: PGD iterations.
        step_size: per-step size; ``eps / 4`` when None.
        batch_size: samples per attack batch; None follows the input size (``inference_batch``).

    Returns:
        (N,) float feature on ``device``.
    """
    step = eps / 4 if step_size is None else step_size
    batch_size = batch_size or inference_batch(images)
    out = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x01 = as_input(images[start:start + batch_size], device)
            y = labels[start:start + batch_size].to(device)
            with torch.enable_grad():
                adv = pgd_attack(model, x01, y, eps, steps, step)
            with torch.inference_mode():
                clean_probs = F.softmax(model(x01), dim=1)
                adv_log_probs = F.log_softmax(model(adv), dim=1)
                out.append(-(clean_probs * adv_log_probs).sum(dim=1))
    return torch.cat(out) if out else torch.empty(0, device=device)


def curriculum_feature(cf_model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
    """CF: (N,) per-sample cross-entropy under the briefly trained curriculum model."""
    return losses_of(cf_model, images, labels, device)


def class_prior(labels: torch.Tensor, easy: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class easy rates of the twin problem, and each twin sample's leave-one-out rate.

    Args:
        labels: (T,) twin labels.
        easy: (T,) twin easy labels.
        num_classes: K.

    Returns:
        ``rates`` (K,): easy share of each class (the overall share for a class with fewer than two twin
        samples) and ``loo`` (T,): the share of the sample's class without the sample itself.
    """
    labels, easy = labels.cpu().long(), easy.cpu().float()
    sums = torch.zeros(num_classes).index_add_(0, labels, easy)
    counts = torch.zeros(num_classes).index_add_(0, labels, torch.ones_like(easy))
    overall = easy.mean() if easy.numel() else torch.tensor(0.5)
    rates = torch.where(counts >= 2, sums / counts.clamp_min(1), overall)
    loo_counts = counts[labels] - 1
    loo = torch.where(loo_counts >= 1, (sums[labels] - easy) / loo_counts.clamp_min(1), overall)
    return rates, loo


def assemble(columns: dict[str, torch.Tensor], kinds: tuple[str, ...], log_losses: bool) -> torch.Tensor:
    """Concatenate the chosen feature kinds into one (N, F) matrix, in the order of ``kinds``.

    Args:
        columns: ``{"df": (N, top_n), "af": (N,), "cf": (N,), "prior": (N,)}`` (only the kinds used).
        kinds: which of ``FEATURE_KINDS`` to use.
        log_losses: take ``log(value + 1e-6)`` of AF and CF, whose values span orders of magnitude
            (a memorised sample's loss is ~1e-4, a misclassified one's several units).
    """
    parts = []
    for kind in kinds:
        value = columns[kind].float()
        value = value.unsqueeze(1) if value.dim() == 1 else value
        if log_losses and kind in ("af", "cf"):
            value = torch.log(value.clamp_min(0.0) + 1e-6)
        parts.append(value)
    return torch.cat(parts, dim=1)
