"""Use a trained model: preprocess any images, embed them, explain a match.

```python
from esreid import ReIDModel
m = ReIDModel.from_checkpoint("runs/esnet/checkpoints/last.pt", device="cpu")
x = m.preprocess(["a.jpg", pil_image, uint8_array])   # float32 [N, 3, H, W], the eval transform
f = m.embed(["a.jpg", "b.jpg"])                        # np.float32 [N, D], the eval descriptor
q_map, g_map = m.explain("query.jpg", "gallery.jpg")   # CG-RAM maps [H, W] in [0, 1]
```

``embed`` returns exactly the descriptor evaluation ranks with (same transform, same flip
averaging). ``ReIDModel.from_onnx`` embeds with onnxruntime instead of torch. This module
never imports the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from esreid.config import Config
from esreid.data.images import prepare_image
from esreid.data.loader import read_rgb
from esreid.data.transforms import build_transforms
from esreid.engine.features import descriptor

#: What ``preprocess`` and ``embed`` accept as one image.
ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def model_identity(model: nn.Module, height: int, width: int, flip: bool) -> str:
    """A short hash of everything the descriptor depends on: the weights and the input
    size and flip setting. An index remembers it to refuse queries embedded by another model."""
    h = hashlib.sha256()
    h.update(json.dumps({"height": height, "width": width, "flip": bool(flip)}).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        return [images]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    return list(images)


def to_pil(image: ImageLike, target: tuple[int, int] | None = None) -> Image.Image:
    """An upright 8-bit RGB PIL image from a path or a PIL image (both through the one image
    reader, :mod:`esreid.data.images`: EXIF orientation, 16-bit, float, palette, alpha, CMYK
    and grayscale converted, images under 8 pixels a side refused, an unreadable file named),
    a uint8 array ``[H, W]``/``[H, W, 1|3|4]`` (RGB) or a uint8 tensor ``[1|3, H, W]``.
    ``target`` (height, width) lets a much larger image decode smaller."""
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(image, target)
    if isinstance(image, Image.Image):
        return prepare_image(image, target=target)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError("a tensor image must be uint8 [3, H, W] (or a float [3, H, W] "
                             f"already preprocessed), got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError("an array image must be uint8 [H, W] or [H, W, 3|4] (RGB), got "
                             f"{image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        # An array's fourth channel is alpha, composited like an RGBA file's.
        return prepare_image(Image.fromarray(np.ascontiguousarray(image)), name="array image",
                             target=target)
    raise TypeError(f"cannot read an image from a {type(image).__name__}: pass a path, a PIL "
                    "image, a uint8 array or a tensor")


class ReIDModel:
    """A trained re-ID model ready for inference (see the module docstring).

    Build it with :meth:`from_checkpoint` (torch) or :meth:`from_onnx` (onnxruntime).
    ``height``, ``width``, ``flip``, ``metric`` and ``mean``/``std`` are the evaluation
    settings the model was trained for; ``identity`` hashes the weights and those settings.
    """

    def __init__(self, model: nn.Module | None, cfg: Config, device: str | torch.device = "cpu",
                 identity: str | None = None, source: str = "", batch_size: int | None = None,
                 backend: Any = None) -> None:
        self.cfg = cfg
        self.height, self.width = cfg.data.height, cfg.data.width
        self.flip = bool(cfg.eval.flip)
        self.metric = cfg.eval.metric
        self.device = torch.device(device)
        self.model = model.to(self.device).eval() if model is not None else None
        self.source = source
        self.batch_size = int(batch_size or cfg.eval.batch_size)
        self._backend = backend
        self._transform = build_transforms(self.height, self.width, is_train=False)
        if identity is None:
            if model is None:
                raise ValueError("ReIDModel needs a model or an identity")
            identity = model_identity(model, self.height, self.width, self.flip)
        self.identity = identity

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        overrides: list[str] | None = None, batch_size: int | None = None) -> ReIDModel:
        """Load a checkpoint written by ``esreid train``; its own config says how to build
        and preprocess (``overrides`` like ``["eval.flip=false"]`` change it)."""
        from esreid.engine.checkpoint import (
            config_from_checkpoint,
            model_from_checkpoint,
            read_checkpoint,
        )

        path = Path(os.path.expandvars(str(path))).expanduser()
        ckpt = read_checkpoint(path)
        cfg = config_from_checkpoint(ckpt, path, overrides)
        model = model_from_checkpoint(path, cfg, ckpt=ckpt)
        return cls(model, cfg, device=device, source=str(path), batch_size=batch_size)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, batch_size: int | None = None,
                  threads: int | None = None) -> ReIDModel:
        """Load a model written by ``esreid export``; embedding runs in onnxruntime (torch
        is still used for preprocessing). :meth:`explain` needs the torch checkpoint."""
        from esreid.export import OnnxBackend

        backend = OnnxBackend(path, threads=threads)
        return cls(None, backend.config, identity=backend.identity, source=str(path),
                   batch_size=batch_size, backend=backend)

    @property
    def input_size(self) -> tuple[int, int]:
        """The model's input (height, width): what images are resized to, and what the
        image reader may decode much larger images down towards."""
        return self.height, self.width

    @property
    def descriptor_dim(self) -> int:
        """Length of a descriptor."""
        if self._backend is not None:
            return self._backend.descriptor_dim
        return int(self.model.descriptor_dim)

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """The evaluation transform of each image, stacked: float32 ``[N, 3, H, W]``.

        Accepts paths, PIL images, uint8 arrays ``[H, W, 3]`` (RGB) and uint8 tensors
        ``[3, H, W]``; a float tensor ``[3, H, W]`` / ``[N, 3, H, W]`` of the model's size is
        taken as already preprocessed.
        """
        items = _as_list(images)
        if not items:
            raise ValueError("no images given")
        out = []
        for item in items:
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                if tuple(item.shape) != (3, self.height, self.width):
                    raise ValueError(f"a preprocessed image must be [3, {self.height}, {self.width}], "
                                     f"got {tuple(item.shape)}")
                out.append(item.float().cpu())
            else:
                out.append(self._transform(to_pil(item, self.input_size)))
        return torch.stack(out)

    def _embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        if self._backend is not None:
            return self._backend.run(batch.numpy())
        with torch.no_grad():
            f = descriptor(self.model, batch.to(self.device), self.flip)
        return f.float().cpu().numpy()

    def embed(self, images: ImageLike | Sequence[ImageLike] | Iterable[ImageLike],
              progress: bool | None = None) -> np.ndarray:
        """Descriptors ``np.float32 [N, D]``: exactly what evaluation ranks with.

        Images are read and embedded in batches of ``batch_size``; a progress bar is shown
        for more than one batch (``progress`` forces it on or off).
        """
        items = _as_list(images)
        if not items:
            return np.zeros((0, self.descriptor_dim), dtype=np.float32)
        n_batches = (len(items) + self.batch_size - 1) // self.batch_size
        show = n_batches > 1 if progress is None else progress
        feats = []
        for start in tqdm(range(0, len(items), self.batch_size), total=n_batches, unit="batch",
                          desc="embedding", disable=not show, leave=False):
            feats.append(self._embed_batch(self.preprocess(items[start:start + self.batch_size])))
        return np.concatenate(feats).astype(np.float32, copy=False)

    def embed_files(self, paths: Sequence[str | os.PathLike], progress: bool | None = None
                    ) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """Embed image files, skipping the unreadable ones instead of failing.

        Returns ``(features [M, D], embedded paths [M], failed [(path, reason)])`` with the
        embedded paths in the given order.
        """
        from esreid.data.loader import ImageReadError

        items = [str(p) for p in paths]
        n_batches = (len(items) + self.batch_size - 1) // self.batch_size
        show = n_batches > 1 if progress is None else progress
        feats, kept, failed = [], [], []
        for start in tqdm(range(0, len(items), self.batch_size), total=n_batches, unit="batch",
                          desc="embedding", disable=not show, leave=False):
            tensors = []
            for path in items[start:start + self.batch_size]:
                try:
                    tensors.append(self._transform(read_rgb(path, self.input_size)))
                except ImageReadError as err:
                    failed.append((path, str(err)))
                    continue
                kept.append(path)
            if tensors:
                feats.append(self._embed_batch(torch.stack(tensors)))
        features = (np.concatenate(feats).astype(np.float32, copy=False) if feats
                    else np.zeros((0, self.descriptor_dim), dtype=np.float32))
        return features, kept, failed

    def explain(self, query: ImageLike, gallery: ImageLike) -> tuple[np.ndarray, np.ndarray]:
        """CG-RAM maps (Eqs. 2-4) of a query-gallery pair at the explanation layer, resized
        to the input size and scaled to [0, 1]: ``(query_map [H, W], gallery_map [H, W])``.
        A map that is zero everywhere stays zero."""
        from esreid.saliency import cg_ram, upsample_saliency

        if self.model is None:
            raise RuntimeError(f"{self.source}: CG-RAM needs gradients, which an ONNX model does "
                               "not give: load the checkpoint with ReIDModel.from_checkpoint")
        q = self.preprocess(query)[:1].to(self.device)
        g = self.preprocess(gallery)[:1].to(self.device)
        q_map, g_map = cg_ram(self.model, explanation_layer(self.model), q, g, return_gallery=True)
        size = (self.height, self.width)
        return (upsample_saliency(q_map, size)[0].float().cpu().numpy(),
                upsample_saliency(g_map, size)[0].float().cpu().numpy())


def explanation_layer(model: nn.Module) -> nn.Module:
    """The layer CG-RAM explains by default: the ESB's last stage (res_conv5), else the AIB's."""
    branch = model.esb if getattr(model, "esb", None) is not None else model.aib
    return list(branch.stages.children())[-1]
