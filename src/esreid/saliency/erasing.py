"""Image and feature erasers: BESM (ES-Net Algorithm 1) and the Table V comparison erasers.

Every random decision is drawn from the ``generator`` argument (or torch's global generator
when it is None), in a fixed order, so a seeded generator makes every call reproducible.
Random numbers are drawn on the generator's device and then moved to the data's device.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FILL_VALUES", "BatchFeatureDrop", "batch_feature_drop", "besm_erase", "erase_fill",
           "random_erase"]

_RANDOM_ERASE_ATTEMPTS = 10

#: What erased pixels become, by name (``erase.value``): ``mean`` the dataset's mean colour
#: (0 in normalised space, the paper's choice), ``zero`` black (``-mean / std`` per channel),
#: ``random`` per-pixel standard normal noise in normalised space (as Random Erasing).
FILL_VALUES = ("mean", "zero", "random")


def erase_fill(value: float | str, images: Tensor, generator: torch.Generator | None = None
               ) -> Tensor | float:
    """The fill for erasing ``images`` [N, C, H, W]: a number (a constant in normalised
    space, or ``"mean"`` = 0), a [1, C, 1, 1] tensor (``"zero"``: black, RGB images only) or
    a [N, C, H, W] noise tensor drawn from ``generator`` (``"random"``). A numeric string is
    read as its number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if value == "mean":
        return 0.0
    if value == "zero":
        if images.shape[1] != 3:
            raise ValueError(f"value 'zero' (black) needs RGB images, got {images.shape[1]} channels")
        from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        black = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
        return torch.tensor(black, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    if value == "random":
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(images.shape, generator=generator, device=device)
        return noise.to(device=images.device, dtype=images.dtype)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"value must be a number or one of {', '.join(FILL_VALUES)}, "
                         f"got {value!r}") from None


def _check_unit_interval(value: float, name: str) -> None:
    if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_images(images: Tensor, name: str = "images") -> None:
    if images.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(images.shape)}")


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` uniform draws in [0, 1) on the generator's device (CPU without a generator)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device)


def _randint(high: int, generator: torch.Generator | None) -> int:
    """One integer uniform in [0, high)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(high, (1,), generator=generator, device=device).item())


def besm_erase(
    images: Tensor,
    saliency: Tensor,
    ratio: float,
    prob: float,
    value: float | str = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Batch Erasing Salient Method (Algorithm 1): erase each image's most salient pixels.

    For every image one uniform number ``u`` is drawn; if ``u < prob`` its saliency map is
    resized bilinearly (``align_corners=False``) to H x W and the ``round(ratio * H * W)``
    pixel positions with the largest values (Python's ``round``, halves to even) are set
    to ``value`` in all channels. Ties are broken deterministically by a stable descending
    sort: among equal values the lower row-major position is erased first.

    A map without contrast (every value equal; after CG-RAM's ReLU that is an all-zero map,
    where no position raises the score) ranks no pixel above another, so it names no salient
    part: its image is not erased (``was_erased`` False), whatever ``u``. Ranking it anyway
    would erase the tie-break's region, the image's top rows, for every such image.

    Args:
        images: [N, C, H, W] batch (not modified).
        saliency: [N, h, w] maps, one per image, any resolution, finite.
        ratio: erased fraction R of the pixel positions, in [0, 1].
        prob: erasing probability P per image, in [0, 1].
        value: fill value, see :func:`erase_fill`: a number in normalised space (0 is the
            paper's choice, the mean colour) or ``"mean"``, ``"zero"``, ``"random"``.
        generator: source of the per-image draws (and, after them, of ``"random"`` noise).

    Returns:
        ``(erased, was_erased)``: a new [N, C, H, W] tensor and a bool [N] mask of the
        images that were erased (selected, with a map that has contrast; all False when
        ``ratio`` rounds to zero pixels).
    """
    _check_images(images)
    _check_unit_interval(ratio, "ratio")
    _check_unit_interval(prob, "prob")
    if saliency.dim() != 3:
        raise ValueError(f"saliency must be [N, h, w], got shape {tuple(saliency.shape)}")
    n, _, height, width = images.shape
    if saliency.shape[0] != n:
        raise ValueError(
            f"saliency has {saliency.shape[0]} maps but images has {n} images; N must match"
        )
    if not bool(torch.isfinite(saliency).all()):
        raise ValueError("saliency contains NaN or infinite values")
    selected = (_uniform(n, generator) < prob).to(images.device)
    flat = saliency.flatten(1)
    selected &= (flat.amax(dim=1) > flat.amin(dim=1)).to(images.device)
    count = round(ratio * height * width)
    erased = images.clone()
    if count == 0:
        return erased, torch.zeros_like(selected)
    if not bool(selected.any()):
        return erased, selected
    fill = erase_fill(value, erased[selected], generator)
    maps = F.interpolate(
        saliency[selected][:, None].float().to(images.device),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    ).flatten(1)
    order = torch.sort(maps, dim=1, descending=True, stable=True).indices[:, :count]
    mask = torch.zeros_like(maps, dtype=torch.bool).scatter_(1, order, True)
    mask = mask.view(-1, 1, height, width)
    erased[selected] = torch.where(mask, fill, erased[selected]) if isinstance(fill, Tensor) \
        else erased[selected].masked_fill(mask, fill)
    return erased, selected


def random_erase(
    images: Tensor,
    prob: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 3.33),
    value: float | str | None = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random Erasing (Zhong et al.): erase one random rectangle per selected image.

    Each image is selected with probability ``prob``. For a selected image up to 10 attempts
    draw a target area ``S = U(area) * H * W`` and an aspect ratio ``r = h / w`` log-uniform
    in ``aspect``; the rectangle is ``h = round(sqrt(S * r))`` by ``w = round(sqrt(S / r))``
    and is used at a uniform position as soon as ``1 <= h <= H`` and ``1 <= w <= W``. If no
    attempt fits the image is left unchanged.

    Args:
        images: [N, C, H, W] batch (not modified).
        prob: selection probability in [0, 1].
        area: (min, max) area fraction, 0 < min <= max <= 1.
        aspect: (min, max) aspect ratio h / w, 0 < min <= max.
        value: fill value as for :func:`besm_erase` (a number, ``"mean"``, ``"zero"``), or
            ``"random"`` / None for per-pixel standard normal noise.
        generator: source of all random draws.

    Returns:
        ``(erased, was_erased)``: a new [N, C, H, W] tensor and a bool [N] mask of the
        images that actually received a rectangle.
    """
    _check_images(images)
    _check_unit_interval(prob, "prob")
    lo_area, hi_area = area
    if not 0.0 < lo_area <= hi_area <= 1.0:
        raise ValueError(f"area must be (min, max) with 0 < min <= max <= 1, got {area}")
    lo_aspect, hi_aspect = aspect
    if not 0.0 < lo_aspect <= hi_aspect:
        raise ValueError(f"aspect must be (min, max) with 0 < min <= max, got {aspect}")
    n, channels, height, width = images.shape
    erased = images.clone()
    was_erased = torch.zeros(n, dtype=torch.bool, device=images.device)
    noise = value is None or value == "random"
    if not noise:
        constant = erase_fill(value, images[:1])
        if isinstance(constant, Tensor):
            constant = constant.view(channels, 1, 1)
    log_lo, log_hi = math.log(lo_aspect), math.log(hi_aspect)
    for i in range(n):
        if _uniform(1, generator).item() >= prob:
            continue
        for _ in range(_RANDOM_ERASE_ATTEMPTS):
            u_area, u_aspect = _uniform(2, generator).tolist()
            target = (lo_area + (hi_area - lo_area) * u_area) * height * width
            ratio = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
            h = round(math.sqrt(target * ratio))
            w = round(math.sqrt(target / ratio))
            if 1 <= h <= height and 1 <= w <= width:
                top = _randint(height - h + 1, generator)
                left = _randint(width - w + 1, generator)
                if noise:
                    device = generator.device if generator is not None else torch.device("cpu")
                    fill = torch.randn((channels, h, w), generator=generator, device=device).to(
                        erased
                    )
                    erased[i, :, top : top + h, left : left + w] = fill
                else:
                    erased[i, :, top : top + h, left : left + w] = constant
                was_erased[i] = True
                break
    return erased, was_erased


def _block_size(extent: int, ratio: float, name: str) -> int:
    if not (isinstance(ratio, numbers.Real) and 0.0 < ratio <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {ratio!r}")
    return min(extent, max(1, round(extent * ratio)))


def batch_feature_drop(
    feature_map: Tensor,
    height_ratio: float = 0.3,
    width_ratio: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Batch DropBlock (Dai et al.): zero ONE random block, at the same place for the whole batch.

    The block is ``max(1, round(h * height_ratio))`` by ``max(1, round(w * width_ratio))``
    (capped at the map size) at a uniform position; values are not rescaled.

    Args:
        feature_map: [N, C, h, w].
        height_ratio, width_ratio: block size fractions in (0, 1].
        generator: source of the block position.

    Returns:
        [N, C, h, w] copy with the block zeroed (differentiable: gradient 1 outside the
        block, 0 inside).
    """
    _check_images(feature_map, "feature_map")
    _, _, height, width = feature_map.shape
    block_h = _block_size(height, height_ratio, "height_ratio")
    block_w = _block_size(width, width_ratio, "width_ratio")
    top = _randint(height - block_h + 1, generator)
    left = _randint(width - block_w + 1, generator)
    keep = torch.ones((height, width), dtype=feature_map.dtype, device=feature_map.device)
    keep[top : top + block_h, left : left + block_w] = 0
    return feature_map * keep


class BatchFeatureDrop(nn.Module):
    """Batch DropBlock layer: ``batch_feature_drop`` in training mode, identity in eval mode.

    Args:
        height_ratio, width_ratio: block size fractions in (0, 1].
        generator: optional generator for reproducible block positions.
    """

    def __init__(
        self,
        height_ratio: float = 0.3,
        width_ratio: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _block_size(1, height_ratio, "height_ratio")
        _block_size(1, width_ratio, "width_ratio")
        self.height_ratio = height_ratio
        self.width_ratio = width_ratio
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        """Drop one block of ``x`` [N, C, h, w] when training; return ``x`` unchanged otherwise."""
        if not self.training:
            return x
        return batch_feature_drop(x, self.height_ratio, self.width_ratio, self.generator)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``print(module)``."""
        return f"height_ratio={self.height_ratio}, width_ratio={self.width_ratio}"
