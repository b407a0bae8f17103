"""TensorBoard logs of a training run: the ``metrics.jsonl`` records as scalars, CG-RAM overlays.

The trainer opens one :class:`TensorBoardLog` per run with :func:`open_tensorboard` and hands
it every record it appends to ``metrics.jsonl``; the epoch is the global step, so the curves
line up with the JSON log. The ``tensorboard`` package is optional (``esreid[tensorboard]``)
and imported only when a log is opened: ``torch.utils.tensorboard`` takes seconds to import,
which a run with ``train.tensorboard=false`` should not pay.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from esreid.data.loader import ImageReadError, read_rgb
from esreid.data.records import Record
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from esreid.engine.checkpoint import RunFolder
from esreid.saliency.cgram import upsample_saliency
from esreid.saliency.visualize import denormalize, overlay_heatmap

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from esreid.models.esnet import ESNet

__all__ = ["TensorBoardLog", "cgram_overlay_batch", "open_tensorboard", "overlay_batch",
           "scalar_tag"]

log = logging.getLogger("esreid.train")

# Keys of a "train" record that are not training losses get their own groups, so the
# TensorBoard scalar page shows losses, speed and the over-erasing diagnostic apart.
_TRAIN_GROUPS = {
    "images_per_s": "speed/images_per_s",
    "seconds": "speed/seconds",
    "erased_loss": "diagnostic/erased_loss",
    "clean_loss": "diagnostic/clean_loss",
    "skipped_images": "run/skipped_images",
    "world_size": "run/world_size",
    "zero_map_frac": "saliency/zero_map_frac",
    "erased_pixel_frac": "saliency/erased_pixel_frac",
    "saliency_nonfinite": "saliency/nonfinite",
    "amp_skipped_steps": "amp/skipped_steps",
    "amp_scale": "amp/scale",
}
_NOT_A_VALUE = {"type", "epoch"}
_INVALID_TAG_CHARS = re.compile(r"[^A-Za-z0-9_./-]+")


def scalar_tag(record_type: str, key: str) -> str | None:
    """The TensorBoard tag of ``key`` in a ``metrics.jsonl`` record of ``record_type``.

    ``train`` keys go to ``train/`` (losses, ``lr``, ``erased_frac``), ``speed/``
    (``images_per_s``, ``seconds``), ``diagnostic/`` (Fig. 3's ``erased_loss`` and
    ``clean_loss``), ``saliency/`` (``zero_map_frac``, ``erased_pixel_frac``,
    ``saliency_nonfinite`` -> ``saliency/nonfinite``), ``amp/`` (fp16's ``amp_skipped_steps``
    and ``amp_scale``), ``ppool/`` (``ppool_l_esb`` -> ``ppool/l_esb``) or ``run/``
    (``skipped_images``, ``world_size``); ``eval`` keys go to ``eval/`` with ``@`` spelled
    ``_at_`` and other characters outside ``[A-Za-z0-9_./-]`` replaced by ``_``
    (``TPR@FPR=0.001`` -> ``eval/TPR_at_FPR_0.001``). None for any other record type
    (``config_change``) and for ``type`` and ``epoch``.
    """
    if key in _NOT_A_VALUE:
        return None
    if record_type == "train":
        if key in _TRAIN_GROUPS:
            return _TRAIN_GROUPS[key]
        if key.startswith("ppool_"):
            return "ppool/" + _clean(key[len("ppool_"):])
        return "train/" + _clean(key)
    if record_type == "eval":
        return "eval/" + _clean(key)
    return None


def _clean(key: str) -> str:
    return _INVALID_TAG_CHARS.sub("_", key.replace("@", "_at_")).strip("_") or "value"


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (bools are flags, not numbers)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class TensorBoardLog:
    """One run's TensorBoard event files; create it with :func:`open_tensorboard`."""

    def __init__(self, writer: SummaryWriter) -> None:
        """Wrap an open ``SummaryWriter``."""
        self.writer = writer

    @property
    def log_dir(self) -> Path:
        """The folder the event files are written to."""
        return Path(self.writer.get_logdir())

    def log_record(self, record: Mapping[str, Any]) -> list[str]:
        """Write the finite numeric values of one ``metrics.jsonl`` record as scalars.

        The step is the record's ``epoch``; tags follow :func:`scalar_tag`. Records of
        other types than ``train`` and ``eval``, records without an integer epoch, and
        non-numeric or non-finite values are skipped. The events are flushed, so a running
        TensorBoard shows the epoch at once. Returns the tags written.
        """
        record_type = record.get("type")
        epoch = record.get("epoch")
        if record_type not in ("train", "eval") or isinstance(epoch, bool) \
                or not isinstance(epoch, int):
            return []
        written = []
        for key, value in record.items():
            tag = scalar_tag(record_type, key)
            number = _finite_number(value)
            if tag is None or number is None:
                continue
            self.writer.add_scalar(tag, number, global_step=epoch)
            written.append(tag)
        if written:
            self.writer.flush()
        return written

    def log_overlays(
        self,
        tag: str,
        images: Tensor,
        maps: Tensor,
        step: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> bool:
        """Write CG-RAM heat-map overlays of a few images as one image grid.

        Args:
            tag: the image's TensorBoard tag, e.g. ``"cgram/train"``.
            images: normalised images [N, 3, H, W] (as the transforms give them).
            maps: their saliency maps [N, h, w] (e.g. :func:`cgram_overlay_batch`), each
                resized to H x W and min-max scaled before it is drawn.
            step: the global step (the epoch).
            mean, std: the normalisation the images went through.

        The grid has two rows, the images above and their overlays below, with a 2-pixel
        white border around every tile: ``[3, 2H + 6, N (W + 2) + 2]``. Maps with NaN or
        infinite values are not drawn (a warning says so and False is returned): a picture
        must not stop a training run. Returns True when the grid was written.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
            raise ValueError(
                f"maps must be [N={images.shape[0]}, h, w], got {tuple(maps.shape)}"
            )
        maps = maps.detach().float().cpu()
        if not bool(torch.isfinite(maps).all()):
            log.warning("CG-RAM overlays for %s at epoch %d not written: the maps hold NaN or "
                        "infinite values", tag, step)
            return False
        pictures = denormalize(images.detach().float().cpu(), mean, std)
        height, width = pictures.shape[-2:]
        resized = upsample_saliency(maps, (height, width))
        overlays = torch.stack([
            torch.from_numpy(overlay_heatmap(picture, saliency)).permute(2, 0, 1).float() / 255.0
            for picture, saliency in zip(pictures, resized, strict=True)
        ])
        self.writer.add_image(tag, _grid(pictures, overlays), global_step=step,
                              dataformats="CHW")
        self.writer.flush()
        return True

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def _grid(top: Tensor, bottom: Tensor, border: int = 2) -> Tensor:
    """Two rows of N tiles [N, 3, H, W] each, on white with ``border`` pixels between tiles."""
    n, channels, height, width = top.shape
    grid = torch.ones(channels, 2 * (height + border) + border, n * (width + border) + border)
    for row, tiles in enumerate((top, bottom)):
        y = border + row * (height + border)
        for i, tile in enumerate(tiles):
            x = border + i * (width + border)
            grid[:, y:y + height, x:x + width] = tile
    return grid


def open_tensorboard(
    run_dir: str | os.PathLike[str], enabled: bool, purge_step: int | None = None
) -> TensorBoardLog | None:
    """Open the TensorBoard log of the run in ``run_dir`` (``train.tensorboard``).

    Returns None when ``enabled`` is false (nothing is created), and when the
    ``tensorboard`` package cannot be imported (one INFO line on ``esreid.train`` says how to
    install it). Event files go to ``run_dir/tensorboard/``. A resumed run passes
    ``purge_step = restored epoch + 1``: TensorBoard then hides the events the interrupted
    run wrote from that step on, as the trainer drops those records from ``metrics.jsonl``.
    """
    if not enabled:
        return None
    try:
        # The package itself first: torch.utils.tensorboard may already sit in sys.modules
        # from an earlier import even when tensorboard has gone since.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.info("TensorBoard logging is off: the tensorboard package is not installed (%s); "
                 "pip install esreid[tensorboard] turns it on, --set train.tensorboard=false "
                 "silences this line", err)
        return None
    folder = RunFolder(Path(run_dir)).tensorboard
    return TensorBoardLog(SummaryWriter(log_dir=str(folder), purge_step=purge_step))


def overlay_batch(
    records: Sequence[Record],
    height: int,
    width: int,
    identities: int = 2,
    per_identity: int = 2,
) -> tuple[Tensor, Tensor] | None:
    """A fixed small batch for CG-RAM overlays: ``per_identity`` images of each of the first
    ``identities`` identities (in record order) that have that many readable images.

    Images go through the evaluation transform (resize to ``height`` x ``width``,
    ImageNet normalisation); unreadable files are passed over. Every image has a positive
    in the batch, which batch CG-RAM needs (a sample without one has an all-zero map).
    Returns ``(images [N, 3, H, W], pids [N])``, or None when no identity has
    ``per_identity`` readable images.
    """
    if identities < 1 or per_identity < 2:
        raise ValueError(f"need identities >= 1 and per_identity >= 2, got {identities} and "
                         f"{per_identity}")
    by_pid: dict[int, list[Record]] = {}
    for record in records:
        by_pid.setdefault(record.pid, []).append(record)
    transform = build_transforms(height, width, is_train=False)
    chosen: list[tuple[int, list[Tensor]]] = []
    for pid, group in by_pid.items():
        if len(group) < per_identity:
            continue
        loaded = []
        for record in group:
            try:
                loaded.append(transform(read_rgb(record.path)))
            except ImageReadError:
                continue
            if len(loaded) == per_identity:
                chosen.append((pid, loaded))
                break
        if len(chosen) == identities:
            break
    if not chosen:
        return None
    images = torch.stack([image for _, loaded in chosen for image in loaded])
    pids = torch.tensor([pid for pid, _ in chosen], dtype=torch.long).repeat_interleave(per_identity)
    return images, pids


def cgram_overlay_batch(model: ESNet, images: Tensor, pids: Tensor) -> Tensor:
    """Batch CG-RAM maps [N, h, w] (Eq. 5) of ``images`` with the model's own
    ``saliency_maps``: the ESB's when the model has one, else the AIB's.

    Runs in eval mode (BatchNorm uses running statistics and updates nothing) and restores
    the model's train flag; works inside ``torch.no_grad()``. ``model`` is the bare
    ``ESNet`` (not a DDP or compiled wrapper); the images and pids are moved to its device.
    The maps are returned detached, on the CPU.
    """
    device = next(model.parameters()).device
    branch = "esb" if model.esb is not None else "aib"
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            maps = model.saliency_maps(images.to(device), pids.to(device), branch=branch)
    finally:
        model.train(was_training)
    return maps.detach().cpu()
