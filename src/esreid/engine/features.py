"""Descriptor extraction: eval mode, optional flip averaging, batches from a loader."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from esreid.data.loader import BadImageLog

log = logging.getLogger("esreid.features")


def descriptor(model: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """The retrieval descriptor of a preprocessed batch: ``model(images)``, averaged with the
    mirrored images' descriptor when ``flip`` (the paper's test-time flip). The one
    definition evaluation, :class:`esreid.inference.ReIDModel` and the ONNX export share."""
    f = model(images)
    if flip:
        f = (f + model(torch.flip(images, dims=[3]))) / 2
    return f


class Descriptor(nn.Module):
    """``model`` wrapped so that ``forward`` returns :func:`descriptor` (what ONNX exports)."""

    def __init__(self, model: nn.Module, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.flip = bool(flip)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors [N, D] of preprocessed images [N, 3, H, W]."""
        return descriptor(self.model, images, self.flip)


def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    flip: bool = True,
    progress: bool = False,
    desc: str = "features",
    bad_images: BadImageLog | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Embed every image of ``loader`` (batches of ``(images, pids, camids, ...)``).

    Returns ``(features [N, D] float32 on CPU, pids [N], camids [N])``. With ``flip`` the
    descriptor is the mean of the image's and its mirror's (the paper's test-time flip).
    The model's train/eval mode is restored afterwards. Batches of esreid's loaders carry
    the paths of images they skipped as a fifth element; they are logged once each and
    added to ``bad_images`` when given.
    """
    # torch.no_grad as a block, not as a decorator: mutmut (docs/testing.md) leaves decorated
    # functions unmutated, and this one holds the evaluation protocol's extraction loop.
    with torch.no_grad():
        was_training = model.training
        model.eval()
        feats, pids, camids = [], [], []
        skipped = bad_images if bad_images is not None else BadImageLog()
        start, seen = time.time(), 0
        bar = tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch")
        try:
            for batch in bar:
                if len(batch) > 4:
                    for path in skipped.update(batch[4]):
                        log.warning("skipped unreadable image %s (data.on_bad_image=skip)", path)
                if len(batch[0]) == 0:
                    continue
                images = batch[0].to(device, non_blocking=True)
                f = descriptor(model, images, flip)
                feats.append(f.float().cpu())
                pids.append(np.asarray(batch[1]))
                camids.append(np.asarray(batch[2]))
                seen += images.shape[0]
                bar.set_postfix(img_s=f"{seen / max(time.time() - start, 1e-9):.0f}")
        finally:
            model.train(was_training)
        if not feats:
            raise ValueError(f"{desc}: the loader yielded no images")
        return torch.cat(feats), np.concatenate(pids), np.concatenate(camids)
