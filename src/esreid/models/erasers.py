"""Erasers: what the Erasing Salient Branch sees during training, one registry of named builders.

An eraser turns a training batch into the ESB's output: BESM erases the pixels CG-RAM finds
most salient (Algorithm 1), Grad-CAM erasing does the same with Grad-CAM maps, Random Erasing
blanks a random rectangle, batch feature dropping (BDB) zeroes a block of the ESB's feature
map, and ``none`` leaves the batch clean. ``ERASERS`` maps each ``erase.method`` name to its
class; config validation, ``esreid presets``, the model and the trainer's over-erasing
diagnostic all read it, so a new eraser is one class and one entry here.

Erasers hold options only (no parameters or buffers), so they add nothing to a checkpoint.
This module imports torch only inside the erasing calls: ``esreid.config`` reads the registry
and stays cheap to import.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from esreid.models.esnet import BranchOutput, ESNet

__all__ = [
    "ERASERS",
    "BatchFeatureDropping",
    "BESM",
    "Eraser",
    "Erasure",
    "GradCAMErasing",
    "NoErasing",
    "RandomErasing",
    "RandomMapErasing",
    "build_eraser",
    "canonical_erase_value",
    "eraser_from_config",
    "eraser_names",
]

#: Erasing ratio of the over-erasing diagnostic for erasers without a ratio of their own.
DEFAULT_DIAGNOSTIC_RATIO = 0.2

#: The named fills of ``erase.value`` (``esreid.saliency.erasing.erase_fill`` makes them).
ERASE_VALUES = ("mean", "zero", "random")


def canonical_erase_value(value: Any) -> str:
    """``erase.value`` as the config keeps it: a fill name, or a number as its string; 0 is
    the mean colour and reads as ``"mean"`` (configs written before the names say 0.0)."""
    if isinstance(value, str) and value in ERASE_VALUES:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is neither a number nor one of "
                         f"{', '.join(ERASE_VALUES)}") from None
    if not number == number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{value!r} is not a finite number")
    return "mean" if number == 0 else repr(number)


@dataclass
class Erasure:
    """An eraser's result for one batch: the ESB's output and what was erased.

    ``was_erased``, ``erased_images`` and ``saliency`` stay None for erasers that do not
    erase images (or draw no maps).
    """

    esb: BranchOutput
    was_erased: torch.Tensor | None = None
    erased_images: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    #: What the eraser measured on the batch (logged per step and epoch), by name.
    info: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Eraser(ABC):
    """Base of the erasers: options shared by all and the interface the model calls.

    ``layer`` is the ESB stage whose output CG-RAM explains (``erase.layer``); the model's
    saliency maps use it whatever the eraser, since the over-erasing diagnostic draws them
    for every run.
    """

    name: ClassVar[str] = ""
    #: Whether it acts on the ESB (a model without one cannot use it).
    needs_esb: ClassVar[bool] = True
    #: Why it needs two images of an identity in every batch, or None.
    pairs_reason: ClassVar[str | None] = None

    layer: str = "layer4"

    @property
    def diagnostic_ratio(self) -> float:
        """Erasing ratio R the over-erasing diagnostic (paper Fig. 3) uses for this run."""
        return DEFAULT_DIAGNOSTIC_RATIO

    def describe(self) -> str:
        """One-line summary for ``esreid presets``, e.g. ``besm(R=0.2,P=0.5)``; empty for none."""
        return self.name

    @abstractmethod
    def __call__(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
                 shared: torch.Tensor, generator: torch.Generator | None) -> Erasure:
        """The ESB's output for a batch.

        ``shared`` is the trunk's output on the clean ``images``; random draws come from
        ``generator`` in a fixed order.
        """


def _trunk_erased(trunk: nn.Module, shared: torch.Tensor, erased: torch.Tensor,
                  was_erased: torch.Tensor, reuse_clean: bool) -> torch.Tensor:
    """Trunk features of the erased batch I*.

    Unerased images of I* are the clean images, so with ``reuse_clean`` only the erased
    ones take a second trunk pass and the rest reuse ``shared``.
    """
    if not bool(was_erased.any()):
        return shared
    if not reuse_clean or bool(was_erased.all()):
        return trunk(erased)
    idx = was_erased.nonzero().squeeze(1).to(shared.device)
    return shared.index_put((idx,), trunk(erased[idx]))


@dataclass(frozen=True)
class NoErasing(Eraser):
    """The ESB sees the clean batch."""

    name: ClassVar[str] = "none"
    needs_esb: ClassVar[bool] = False

    def describe(self) -> str:
        """Empty: a run that does not erase says nothing about erasing."""
        return ""

    def __call__(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
                 shared: torch.Tensor, generator: torch.Generator | None) -> Erasure:
        """The ESB on the clean trunk features."""
        return Erasure(esb=model.esb(shared))


@dataclass(frozen=True)
class _SalientErasing(Eraser):
    """Erase each image's most salient pixels (Algorithm 1) from maps the subclass draws."""

    ratio: float = 0.2
    prob: float = 0.5
    value: str | float = "mean"
    reuse_clean: bool = True

    @property
    def diagnostic_ratio(self) -> float:
        """The run's own ratio R."""
        return self.ratio

    def describe(self) -> str:
        """``<name>(R=<ratio>,P=<prob>)``."""
        return f"{self.name}(R={self.ratio},P={self.prob})"

    @abstractmethod
    def maps(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
             shared: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Saliency maps [N, h, w] of the clean batch."""

    def __call__(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
                 shared: torch.Tensor, generator: torch.Generator | None) -> Erasure:
        """Erase the salient pixels, then the trunk and the ESB on the erased batch.

        Reports ``zero_map_frac`` (maps without contrast, in practice all zero: BESM leaves
        their images, see ``besm_erase``), ``erased_pixel_frac`` (erased pixel positions
        over the batch's) and ``saliency_nonfinite`` (maps with a non-finite value; they are
        counted and erase nothing, so that the step completes on every process and the
        trainer stops the run at that step with a message rather than one process raising
        inside its forward).
        """
        import torch

        from esreid.saliency.erasing import besm_erase

        maps = self.maps(model, images, pids, shared, generator)
        flat = maps.flatten(1)
        finite = torch.isfinite(flat).all(dim=1)
        nonfinite = float((~finite).float().mean())
        if nonfinite:
            maps = torch.where(finite[:, None, None], maps, torch.zeros_like(maps))
            flat = maps.flatten(1)
        erased, was = besm_erase(images, maps, self.ratio, self.prob, self.value,
                                 generator=generator)
        if nonfinite:
            erased = torch.where(finite[:, None, None, None].to(erased.device), erased, images)
            was = was & finite.to(was.device)
        height, width = images.shape[-2:]
        per_image = round(self.ratio * height * width) / (height * width)
        info = {"saliency_nonfinite": nonfinite,
                "zero_map_frac": float((finite & (flat.amax(1) <= flat.amin(1))).float().mean()),
                "erased_pixel_frac": float(was.float().mean()) * per_image}
        esb_in = _trunk_erased(model.trunk, shared, erased, was, self.reuse_clean)
        return Erasure(esb=model.esb(esb_in), was_erased=was, erased_images=erased,
                       saliency=maps, info=info)


@dataclass(frozen=True)
class BESM(_SalientErasing):
    """ES-Net's Batch Erasing Salient Method: batch CG-RAM maps (Eq. 5) drive the erasing."""

    name: ClassVar[str] = "besm"
    pairs_reason: ClassVar[str | None] = "BESM's easiest positive"

    def maps(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
             shared: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Batch CG-RAM of the ESB at ``layer``, reusing the clean trunk output."""
        return model.saliency_maps(images, pids, "esb", shared=shared)


@dataclass(frozen=True)
class RandomMapErasing(_SalientErasing):
    """BESM driven by random maps: uniform noise at the CG-RAM map's resolution, resized and
    erased like a saliency map. The same number of pixels in blobs of the same size as BESM's,
    at random places: the control that separates CG-RAM's targeting from erasing itself."""

    name: ClassVar[str] = "randmap"

    def maps(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
             shared: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """[N, h, w] uniform draws from ``generator``, (h, w) the ESB's map at ``layer``."""
        import torch

        h, w = model.saliency_map_size(images, "esb", shared, layer=self.layer)
        device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.rand((images.shape[0], h, w), generator=generator, device=device)
        return draws.to(images.device)


@dataclass(frozen=True)
class GradCAMErasing(_SalientErasing):
    """Table V's Grad-CAM erasing: Grad-CAM of the true class's log-probability at ``layer``."""

    name: ClassVar[str] = "gradcam"

    def maps(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
             shared: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Grad-CAM of the ESB's classifier; only the part after ``layer`` is differentiated
        (float32, from the clean trunk output, as CG-RAM)."""
        from esreid.saliency.cgram import grad_cam_batch

        b = model.esb
        fmap = model.saliency_feature_map(images, "esb", shared, layer=self.layer)
        return grad_cam_batch(lambda a: b.head(a, after=self.layer).logits, fmap, pids)


@dataclass(frozen=True)
class RandomErasing(Eraser):
    """Random Erasing: a rectangle of 2-40% of the image, aspect 0.3-3.33, with probability P."""

    name: ClassVar[str] = "random"

    prob: float = 0.5
    value: str | float = "mean"
    reuse_clean: bool = True

    def describe(self) -> str:
        """``random(P=<prob>)``."""
        return f"random(P={self.prob})"

    def __call__(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
                 shared: torch.Tensor, generator: torch.Generator | None) -> Erasure:
        """Erase random rectangles, then the trunk and the ESB on the erased batch."""
        from esreid.saliency.erasing import random_erase

        erased, was = random_erase(images, prob=self.prob, value=self.value, generator=generator)
        esb_in = _trunk_erased(model.trunk, shared, erased, was, self.reuse_clean)
        return Erasure(esb=model.esb(esb_in), was_erased=was, erased_images=erased)


@dataclass(frozen=True)
class BatchFeatureDropping(Eraser):
    """Batch DropBlock: one random block of the ESB's last feature map, the same for the batch.

    ``bfd_height`` and ``bfd_width`` are the block's size as fractions of the map.
    """

    name: ClassVar[str] = "bfd"

    bfd_height: float = 0.3
    bfd_width: float = 1.0

    def describe(self) -> str:
        """``bfd(<height>x<width> block)``."""
        return f"bfd({self.bfd_height}x{self.bfd_width} block)"

    def __call__(self, model: ESNet, images: torch.Tensor, pids: torch.Tensor,
                 shared: torch.Tensor, generator: torch.Generator | None) -> Erasure:
        """The ESB's stages on the clean batch, the block dropped, then its head."""
        from esreid.saliency.erasing import batch_feature_drop

        fmap = model.esb.feature_map(shared)
        fmap = batch_feature_drop(fmap, self.bfd_height, self.bfd_width, generator=generator)
        return Erasure(esb=model.esb.head(fmap))


#: The erasers by ``erase.method`` name.
ERASERS: dict[str, type[Eraser]] = {
    "none": NoErasing,
    "besm": BESM,
    "randmap": RandomMapErasing,
    "gradcam": GradCAMErasing,
    "random": RandomErasing,
    "bfd": BatchFeatureDropping,
}


def eraser_names() -> tuple[str, ...]:
    """The registered ``erase.method`` names, in registration order."""
    return tuple(ERASERS)


def _eraser_class(name: str) -> type[Eraser]:
    if name not in ERASERS:
        raise ValueError(f"unknown eraser {name!r}; valid names: {', '.join(ERASERS)}")
    return ERASERS[name]


def eraser_options(name: str) -> tuple[str, ...]:
    """The option names eraser ``name`` takes (a subset of the ``erase`` config keys)."""
    return tuple(f.name for f in dataclasses.fields(_eraser_class(name)))


def build_eraser(name: str, **options: Any) -> Eraser:
    """Build the eraser registered as ``name`` with ``options`` (e.g. ``ratio=0.2``).

    An unknown name or an option the eraser does not take raises ``ValueError`` listing
    the valid ones.
    """
    cls = _eraser_class(name)
    valid = eraser_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"eraser {name!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(valid)}")
    return cls(**options)


def eraser_from_config(erase_cfg: Any) -> Eraser:
    """The eraser an ``erase`` config section describes: ``erase_cfg.method`` picks it and
    the attributes named like its options fill them (any object with those attributes)."""
    name = erase_cfg.method
    return build_eraser(name, **{k: getattr(erase_cfg, k) for k in eraser_options(name)})
