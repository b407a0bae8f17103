"""Training losses: label-smoothed cross-entropy and batch-hard triplet (Eq. 1), and AGW's
weighted regularization triplet.

Each loss is a plain function (easy to test against a hand computation) plus a thin
``nn.Module`` wrapper holding its hyper-parameter, in the pytorch-metric-learning style:
the distance, the miner and the reduction are separate pieces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossEntropyLabelSmooth",
    "TripletLoss",
    "WeightedRegularizedTripletLoss",
    "batch_hard_triplet_loss",
    "cross_entropy_label_smooth",
    "hard_mining",
    "pairwise_euclidean",
    "weighted_regularized_triplet_loss",
]

# Squared distances are clamped to this before the square root: d/dx sqrt(x) is infinite
# at 0, which would turn the zero diagonal (and duplicate features) into NaN gradients.
_MIN_SQUARED_DISTANCE = 1e-12


def _check_labels(name: str, labels: Tensor, n: int) -> None:
    """Raise ValueError unless ``labels`` is a 1-D integer tensor of length ``n``."""
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name}: expected a 1-D tensor of {n} labels, got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got dtype {labels.dtype}")


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Mean cross-entropy against label-smoothed targets ("Bag of Tricks" re-ID).

    Takes ``logits`` [N, C] and integer ``targets`` [N] in ``0..C-1``; the target
    distribution of sample i is ``(1 - epsilon) * onehot(targets[i]) + epsilon / C``.
    Returns a scalar tensor.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"cross_entropy_label_smooth: logits must be [N, C], got shape {tuple(logits.shape)}"
        )
    n, num_classes = logits.shape
    _check_labels("cross_entropy_label_smooth: targets", targets, n)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"cross_entropy_label_smooth: epsilon must be in [0, 1), got {epsilon}")
    if n == 0:
        raise ValueError("cross_entropy_label_smooth: empty batch (N = 0)")
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"cross_entropy_label_smooth: targets must lie in [0, {num_classes - 1}] "
            f"for {num_classes} classes, got values in [{lo}, {hi}]"
        )
    # Under autocast the logits may be half precision; the log-softmax needs float32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # PyTorch's label_smoothing mixes the one-hot target with the uniform distribution over
    # all C classes, which is exactly the Bag-of-Tricks definition (checked in the tests).
    # It takes class indices as int64 only; _check_labels admits every integer dtype.
    return F.cross_entropy(logits, targets.long(), label_smoothing=epsilon)


def pairwise_euclidean(x: Tensor) -> Tensor:
    """Euclidean distance between every pair of rows of ``x`` [N, D]; returns [N, N].

    Squared distances are clamped at 1e-12 before the square root, so the diagonal is
    1e-6 rather than 0 and its gradient is finite (zero), not NaN. Computed in float32 (or
    float64) even under autocast: ``|a|^2 + |b|^2 - 2ab`` cancels catastrophically in half
    precision, and batch-hard mining compares these differences.
    """
    if x.dim() != 2:
        raise ValueError(f"pairwise_euclidean: x must be [N, D], got shape {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        squared_norms = x.pow(2).sum(dim=1)
        squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * (x @ x.t())
        return squared.clamp(min=_MIN_SQUARED_DISTANCE).sqrt()


def hard_mining(dist: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
    """Hardest positive and hardest negative distance of every anchor (batch-hard mining).

    Takes a distance matrix ``dist`` [N, N] and identity labels ``pids`` [N]. Returns
    ``(dist_ap, dist_an)``, both [N]: the largest distance from anchor i to another sample
    of its identity (the anchor itself is excluded) and the smallest distance to a sample of
    a different identity. An anchor with no other sample of its identity gets ``-inf`` as
    ``dist_ap``; one with no sample of another identity gets ``+inf`` as ``dist_an``.
    Gradients flow only into the selected entries of ``dist``.
    """
    if dist.dim() != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"hard_mining: dist must be square [N, N], got shape {tuple(dist.shape)}")
    n = dist.shape[0]
    _check_labels("hard_mining: pids", pids, n)
    same = pids[:, None] == pids[None, :]
    is_self = torch.eye(n, dtype=torch.bool, device=dist.device)
    positive = same & ~is_self
    negative = ~same
    dist_ap = dist.masked_fill(~positive, float("-inf")).amax(dim=1)
    dist_an = dist.masked_fill(~negative, float("inf")).amin(dim=1)
    return dist_ap, dist_an


def batch_hard_triplet_loss(features: Tensor, pids: Tensor, margin: float | None = 0.3) -> Tensor:
    """Batch-hard triplet loss (Hermans et al.) on Euclidean distances; returns a scalar.

    Takes ``features`` [N, D] and ``pids`` [N]. Each anchor's loss is
    ``relu(d_ap - d_an + margin)``, or the soft margin ``softplus(d_ap - d_an)`` when
    ``margin`` is None, with ``d_ap``/``d_an`` from :func:`hard_mining`; the result is the
    mean over anchors that have both a positive and a negative in the batch. Raises
    ValueError when no anchor has both.
    """
    if features.dim() != 2:
        raise ValueError(
            f"batch_hard_triplet_loss: features must be [N, D], got shape {tuple(features.shape)}"
        )
    if margin is not None and margin < 0:
        raise ValueError(f"batch_hard_triplet_loss: margin must be >= 0 or None, got {margin}")
    _check_labels("batch_hard_triplet_loss: pids", pids, features.shape[0])
    dist = pairwise_euclidean(features)
    dist_ap, dist_an = hard_mining(dist, pids)
    valid = torch.isfinite(dist_ap) & torch.isfinite(dist_an)
    if not bool(valid.any()):
        raise ValueError(
            "batch_hard_triplet_loss: no anchor has both a positive (another sample of its "
            f"identity) and a negative in the batch; pids = {pids.tolist()}"
        )
    gap = dist_ap[valid] - dist_an[valid]
    per_anchor = F.softplus(gap) if margin is None else F.relu(gap + margin)
    return per_anchor.mean()


def _published_softmax_weights(exponent: Tensor, mask: Tensor) -> Tensor:
    """Softmax weights over the True entries of ``mask`` as the published AGW code forms
    them (see :func:`weighted_regularized_triplet_loss`): shifted by the row maximum of
    ``exponent`` with the other entries counted as 0, and 1e-6 added to the denominator."""
    shift = torch.where(mask, exponent, torch.zeros_like(exponent)).amax(dim=1, keepdim=True)
    # The published code exponentiates every entry and multiplies by the mask, so an entry
    # outside the set far above the shift overflows to inf and turns into NaN; masking
    # before exp gives the finite value the formula has.
    unnormalised = torch.exp((exponent - shift).masked_fill(~mask, float("-inf")))
    return unnormalised / (unnormalised.sum(dim=1, keepdim=True) + 1e-6)


def weighted_regularized_triplet_loss(
    features: Tensor, pids: Tensor, published_quirks: bool = False
) -> Tensor:
    """AGW's weighted regularization triplet loss (Ye et al., 2021) on Euclidean distances.

    Takes ``features`` [N, D] and ``pids`` [N]; returns a scalar. With ``D`` from
    :func:`pairwise_euclidean`, the positives ``P(i)`` of anchor i are the samples of its
    identity, i itself included (its distance is 1e-6, the clamp of ``pairwise_euclidean``),
    and the negatives ``N(i)`` the samples of other identities. Softmax weights
    ``exp(D_ij) / sum_{k in P(i)} exp(D_ik)`` over the positives and
    ``exp(-D_ij) / sum_{k in N(i)} exp(-D_ik)`` over the negatives (each computed with the
    row maximum of its exponent over its own entries subtracted, so large distances do not
    overflow) give ``d_p(i) = sum_{P(i)} w_ij D_ij`` and ``d_n(i) = sum_{N(i)} w_ij D_ij``,
    and the loss is ``mean_i log(1 + exp(d_p(i) - d_n(i)))`` over all anchors. There is no
    margin and no mining: every pair contributes, the farther positives and the closer
    negatives the more. Distances and weights are computed in float32 (or float64) even
    under autocast. Raises ValueError when no anchor has a negative (a single identity).

    ``published_quirks=True`` reproduces the published AGW code's weights, which differ in
    two ways: 1e-6 is added to each softmax denominator, and the shift is the row maximum
    of the exponent with the masked entries counted as 0. For the positives this changes
    the result only at the 1e-6 level (the exponents are >= 0 and the largest term is 1).
    For the negatives the exponents ``-D`` are all below 0, so nothing is subtracted and
    the weights sum to ``S / (S + 1e-6)`` with ``S = sum exp(-D)``: for a lone negative,
    0.98 at distance 10, 0.5 at 13.8 and 0.002 at 20. Beyond about 10, ``d_n`` shrinks
    towards 0 and the negatives stop contributing; features are not normalised, so how
    often that happens depends on their scale. Where the published code gets NaN (in
    float32, a negative more than about 89 farther than the farthest positive overflows
    ``exp`` before the mask multiplies it by 0), this gives the finite value of its formula.
    """
    if features.dim() != 2:
        raise ValueError(
            "weighted_regularized_triplet_loss: features must be [N, D], got shape "
            f"{tuple(features.shape)}"
        )
    _check_labels("weighted_regularized_triplet_loss: pids", pids, features.shape[0])
    same = pids[:, None] == pids[None, :]
    if bool(same.all()):
        raise ValueError(
            "weighted_regularized_triplet_loss: no anchor has a negative (a sample of another "
            f"identity) in the batch; pids = {pids.tolist()}"
        )
    dist = pairwise_euclidean(features)
    with torch.autocast(dist.device.type, enabled=False):
        if published_quirks:
            w_p = _published_softmax_weights(dist, same)
            w_n = _published_softmax_weights(-dist, ~same)
        else:
            # softmax subtracts each row's maximum; -inf leaves the other set's entries out
            # of both the maximum and the sum (every row has a positive: the anchor itself;
            # every row has a negative once two identities are present).
            w_p = torch.softmax(dist.masked_fill(~same, float("-inf")), dim=1)
            w_n = torch.softmax((-dist).masked_fill(same, float("-inf")), dim=1)
        d_p = (w_p * dist).sum(dim=1)
        d_n = (w_n * dist).sum(dim=1)
        # log(1 + exp(t)) = -logsigmoid(-t), evaluated without overflow for any t.
        return -F.logsigmoid(d_n - d_p).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Module form of :func:`cross_entropy_label_smooth` with a fixed ``epsilon``."""

    def __init__(self, epsilon: float = 0.1) -> None:
        """Store the smoothing ``epsilon`` (must be in [0, 1))."""
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Return the scalar smoothed cross-entropy of ``logits`` [N, C] against ``targets`` [N]."""
        return cross_entropy_label_smooth(logits, targets, self.epsilon)

    def extra_repr(self) -> str:
        """Show epsilon when the module is printed."""
        return f"epsilon={self.epsilon}"


class TripletLoss(nn.Module):
    """Module form of :func:`batch_hard_triplet_loss` with a fixed margin (None = soft)."""

    def __init__(self, margin: float | None = 0.3) -> None:
        """Store the ``margin`` (>= 0, or None for the soft-margin variant)."""
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"TripletLoss: margin must be >= 0 or None, got {margin}")
        self.margin = margin

    def forward(self, features: Tensor, pids: Tensor) -> Tensor:
        """Return the scalar batch-hard triplet loss of ``features`` [N, D] with ``pids`` [N]."""
        return batch_hard_triplet_loss(features, pids, self.margin)

    def extra_repr(self) -> str:
        """Show the margin when the module is printed."""
        return f"margin={self.margin}"


class WeightedRegularizedTripletLoss(nn.Module):
    """Module form of :func:`weighted_regularized_triplet_loss` (it has no margin)."""

    def __init__(self, published_quirks: bool = False) -> None:
        """Store whether to reproduce the published AGW code's softmax weights."""
        super().__init__()
        self.published_quirks = bool(published_quirks)

    def forward(self, features: Tensor, pids: Tensor) -> Tensor:
        """Return the scalar weighted regularization triplet loss of ``features`` [N, D]."""
        return weighted_regularized_triplet_loss(features, pids, self.published_quirks)

    def extra_repr(self) -> str:
        """Show the published-code switch when the module is printed."""
        return f"published_quirks={self.published_quirks}"
