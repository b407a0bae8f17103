"""CG-RAM saliency (ES-Net Eqs. 2-5) and Grad-CAM, computed without touching parameter grads.

All three map functions share one discipline: the feature map ``A`` of the chosen layer is
replaced by a detached leaf tensor that requires grad, the score is differentiated with
``torch.autograd.grad`` with respect to that leaf only, and the map is
``M = ReLU(sum_k w^k * A^k)``. Consequences:

* only the part of the network downstream of ``A`` is differentiated (cheap);
* no parameter's ``.grad`` is created or changed (``.backward`` is never called);
* it works inside ``torch.no_grad()`` blocks, in eval mode and on frozen models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "batch_cg_ram",
    "cg_ram",
    "cosine_score",
    "easiest_positive",
    "full_precision",
    "grad_cam_batch",
    "upsample_saliency",
]

_COS_EPS = 1e-12


def cosine_score(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity (Eq. 2) of ``a`` and ``b`` [N, D] -> [N].

    The norm product is floored at 1e-12 so an all-zero descriptor scores 0 instead of NaN.
    """
    dot = (a * b).sum(dim=1)
    return dot / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_COS_EPS)


def _weighted_activation_map(weights: Tensor, feature_map: Tensor) -> Tensor:
    """``ReLU(sum_k weights^k * A^k)``: [N, C, h, w] (or broadcastable) x [N, C, h, w] -> [N, h, w]."""
    return torch.relu((weights * feature_map).sum(dim=1))


def _leaf(feature_map: Tensor, name: str) -> Tensor:
    """Detached copy of ``feature_map`` [N, C, h, w] that requires grad (a new autograd leaf),
    in at least float32."""
    if feature_map.dim() != 4:
        raise ValueError(f"{name} must be [N, C, h, w], got shape {tuple(feature_map.shape)}")
    if not feature_map.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {feature_map.dtype}")
    return at_least_float32(feature_map.detach()).requires_grad_(True)


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or as it is when it is already float32 or float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def full_precision(x: Tensor):
    """A context with autocast switched off on ``x``'s device.

    Saliency is a measurement, not a training computation: in half precision the gradients
    (cosine scores of nearly equal descriptors, then products with A) lose their ranking, and
    a half-precision forward of the branch can overflow (float16) or meet a faulty native
    kernel, and one non-finite activation of one image becomes NaN in every map through the
    BNNeck's batch statistics. So everything from the clean trunk output on runs in float32.
    """
    return torch.autocast(x.device.type, enabled=False)


def _grad_wrt(score: Tensor, leaf: Tensor, what: str) -> Tensor:
    """d score / d leaf via ``torch.autograd.grad``; a clear error if the score ignores the leaf."""
    (grad,) = torch.autograd.grad(score, leaf, allow_unused=True)
    if grad is None:
        raise ValueError(f"the {what} does not depend on the feature map, no saliency exists")
    return grad


def _check_descriptors(f: Tensor, n: int, who: str) -> None:
    if f.dim() != 2 or f.shape[0] != n:
        raise ValueError(f"{who} must return descriptors [N={n}, D], got shape {tuple(f.shape)}")


def cg_ram(
    embed: nn.Module,
    layer: nn.Module,
    query_images: Tensor,
    gallery_images: Tensor,
    return_gallery: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """CG-RAM saliency (Eqs. 2-4) of N query-gallery pairs at ``layer``'s resolution.

    Args:
        embed: model mapping images [B, 3, H, W] to retrieval descriptors [B, D]. It is run in
            eval mode (its and its submodules' train/eval flags are restored afterwards, also
            on error), so BatchNorm uses running statistics and nothing is updated.
        layer: a submodule of ``embed`` whose (single tensor) output is ``A`` [B, C, h, w];
            it must run exactly once per forward.
        query_images, gallery_images: [N, 3, H, W] each, pair ``i`` is
            ``(query_images[i], gallery_images[i])``; both go through one forward as a
            batch of 2N (equivalent to separate forwards in eval mode).
        return_gallery: also return the gallery images' maps.

    Returns:
        query maps [N, h, w] (``M = ReLU(sum_k dS/dA^k * A^k)`` with ``S`` the cosine of the
        pair's descriptors), or ``(query_maps, gallery_maps)`` when ``return_gallery``.
        Maps are detached, non-negative, in ``A``'s dtype. No parameter ``.grad`` is
        created or modified.
    """
    if query_images.dim() != 4:
        raise ValueError(
            f"query_images must be [N, 3, H, W], got shape {tuple(query_images.shape)}"
        )
    if gallery_images.shape != query_images.shape:
        raise ValueError(
            f"gallery_images must have the same shape as query_images "
            f"{tuple(query_images.shape)} (N pairs), got {tuple(gallery_images.shape)}"
        )
    if not any(m is layer for m in embed.modules()):
        raise ValueError("layer must be a submodule of embed")
    n = query_images.shape[0]
    captured: list[Tensor] = []

    def replace_with_leaf(_module: nn.Module, _inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer must output a single tensor for CG-RAM, got {type(output).__name__}"
            )
        leaf = _leaf(output, "layer output")
        captured.append(leaf)
        # Downstream code may modify the output in place (e.g. ReLU(inplace=True) after a
        # BatchNorm), which autograd forbids on a leaf; a copy keeps the leaf intact.
        return leaf.clone()

    modes = [(m, m.training) for m in embed.modules()]
    handle = layer.register_forward_hook(replace_with_leaf)
    try:
        embed.eval()
        with torch.enable_grad():
            descriptors = embed(torch.cat([query_images, gallery_images], dim=0))
            if len(captured) != 1:
                raise ValueError(
                    f"layer must run exactly once in embed's forward, it ran {len(captured)} times"
                )
            _check_descriptors(descriptors, 2 * n, "embed")
            f_q, f_g = descriptors[:n], descriptors[n:]
            # Pairs do not interact in eval mode, so the gradient of the sum gives every
            # pair's own dS_i/dA in its two rows of A.
            score = cosine_score(f_q, f_g).sum()
            activation = captured[0]
            phi = _grad_wrt(score, activation, "cosine score")
    finally:
        handle.remove()
        for module, was_training in modes:
            module.training = was_training
    maps = _weighted_activation_map(phi, activation.detach())
    if return_gallery:
        return maps[:n], maps[n:]
    return maps[:n]


def upsample_saliency(maps: Tensor, size: tuple[int, int], normalize: bool = True) -> Tensor:
    """Bilinearly resize saliency maps [N, h, w] to ``size`` = (H, W), giving [N, H, W].

    Uses ``align_corners=False`` (the same resize as ``besm_erase``); integer maps become
    float32, floating maps keep their dtype.

    With ``normalize`` each map is min-max scaled to [0, 1]; a constant map (no contrast,
    e.g. all zeros) becomes all zeros.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [N, h, w], got shape {tuple(maps.shape)}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    source = maps if maps.is_floating_point() else maps.float()
    resized = F.interpolate(source[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    out = resized[:, 0]
    if not normalize:
        return out
    flat = out.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = flat.max(dim=1).values[:, None, None] - low
    scaled = (out - low) / span.clamp_min(torch.finfo(out.dtype).tiny)
    return torch.where(span > 0, scaled, torch.zeros_like(out))


def easiest_positive(features: Tensor, pids: Tensor) -> Tensor:
    """Index of each sample's easiest positive in the batch.

    Args:
        features: descriptors [N, D].
        pids: identity labels [N] (integers).

    Returns:
        [N] int64: for sample ``i`` the index ``j != i`` with ``pids[j] == pids[i]`` and the
        smallest Euclidean distance ``|f_i - f_j|`` (ties go to the lowest index), or -1 when
        ``i`` has no other sample of its identity in the batch. Computed without grad.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if pids.dim() != 1 or pids.shape[0] != features.shape[0]:
        raise ValueError(f"pids must be [N={features.shape[0]}], got shape {tuple(pids.shape)}")
    if pids.is_floating_point() or pids.is_complex():
        raise ValueError(f"pids must be an integer tensor, got {pids.dtype}")
    with torch.no_grad():
        f = features.detach().float()
        # The mm-based cdist loses precision for near-identical rows; the direct form is exact.
        dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
        pids = pids.to(f.device)
        same = pids[:, None] == pids[None, :]
        same.fill_diagonal_(False)
        dist = dist.masked_fill(~same, float("inf"))
        index = dist.argmin(dim=1)  # argmin returns the first minimum: lowest index wins ties
        return torch.where(same.any(dim=1), index, torch.full_like(index, -1))


def batch_cg_ram(head: Callable[[Tensor], Tensor], feature_map: Tensor, pids: Tensor) -> Tensor:
    """CG-RAM of a training batch (Eq. 5): saliency of every sample against its easiest positive.

    Args:
        head: maps the feature map A [N, C, h, w] to retrieval descriptors [N, D]
            (pooling + BNNeck). Note that a BatchNorm in training mode inside ``head`` uses
            batch statistics (coupling the samples) and updates its running statistics;
            put it in eval mode around this call if that is unwanted.
        feature_map: A [N, C, h, w], typically from a no-grad forward of the branch on the
            clean batch; it is detached here, so no graph upstream of A is used.
        pids: identity labels [N].

    Returns:
        maps [N, h, w], detached and non-negative. With ``p(i) = easiest_positive(f, pids)``
        and ``S_i = cos(f_i, f_p(i))``, ``S_batch = sum_i exp(S_i) * S_i`` where the weights
        ``exp(S_i)`` are constants (detached); ``M = ReLU(sum_k dS_batch/dA^k * A^k)``. The
        gradient reaches both members of every pair, so a sample's map mixes its own pair
        and every pair in which it is the easiest positive. A sample with no positive in the
        batch forms no pair; as being a positive is symmetric it is nobody's positive either,
        so with a per-sample head its map is exactly zero (a BatchNorm in training mode
        couples the samples and can make it nonzero). If no sample has a positive, all maps
        are zero. Parameters' ``.grad`` are neither created nor modified.
    """
    activation = _leaf(feature_map, "feature_map")
    n = activation.shape[0]
    if pids.dim() != 1 or pids.shape[0] != n:
        raise ValueError(f"pids must be [N={n}], got shape {tuple(pids.shape)}")
    with torch.enable_grad(), full_precision(activation):
        features = head(activation)
        _check_descriptors(features, n, "head")
        partner = easiest_positive(features, pids).to(features.device)
        has_pair = partner >= 0
        if not bool(has_pair.any()):
            return torch.zeros(
                activation.shape[:1] + activation.shape[2:],
                dtype=activation.dtype,
                device=activation.device,
            )
        anchors = has_pair.nonzero().squeeze(1)
        scores = cosine_score(features[anchors], features[partner[anchors]])
        # Eq. 5: the exp(S) weights only rank the pairs' importance; they are not differentiated.
        score_batch = (torch.exp(scores).detach() * scores).sum()
        grad = _grad_wrt(score_batch, activation, "batch score")
    return _weighted_activation_map(grad, activation.detach())


def grad_cam_batch(
    logits_fn: Callable[[Tensor], Tensor], feature_map: Tensor, targets: Tensor
) -> Tensor:
    """Grad-CAM maps for a batch (the "Grad-CAM erasing" comparison of Table V).

    Args:
        logits_fn: maps the feature map A [N, C, h, w] to class logits [N, K].
        feature_map: A [N, C, h, w] (detached here).
        targets: true class indices [N] in [0, K).

    Returns:
        [N, h, w] detached maps ``ReLU(sum_k alpha_k A^k)`` with ``alpha_k`` the spatial mean
        of ``d log softmax(logits)[target] / dA^k`` (the score is minus the per-sample
        cross-entropy). Parameters' ``.grad`` are neither created nor modified.
    """
    activation = _leaf(feature_map, "feature_map")
    n = activation.shape[0]
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [N={n}], got shape {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    with torch.enable_grad(), full_precision(activation):
        logits = logits_fn(activation)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(
                f"logits_fn must return logits [N={n}, K], got shape {tuple(logits.shape)}"
            )
        num_classes = logits.shape[1]
        targets = targets.to(device=logits.device, dtype=torch.long)
        if bool(((targets < 0) | (targets >= num_classes)).any()):
            raise ValueError(
                f"targets must lie in [0, {num_classes}), got values "
                f"{targets.min().item()}..{targets.max().item()}"
            )
        log_prob = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).sum()
        grad = _grad_wrt(log_prob, activation, "class log-probability")
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return _weighted_activation_map(alpha, activation.detach())
