"""An esreid model as the appearance encoder of BoxMOT's multi-object trackers.

```python
from boxmot import BotSort
from esreid.integrations.boxmot import BoxMOTEncoder

encoder = BoxMOTEncoder(checkpoint="runs/esnet/checkpoints/last.pt")   # or onnx="esnet.onnx"
tracker = BotSort(reid_model=encoder)             # BoxMOT calls encoder.get_features(boxes, frame)
tracks = tracker.update(dets, frame_bgr)          # dets [N, 6]: x1, y1, x2, y2, score, class
```

:class:`BoxMOTEncoder` implements both ways BoxMOT 25 takes appearance from outside:

- the ``boxmot.reid.AppearanceEncoder`` protocol (``embedding_dim``, ``requirements``,
  ``encode(frames, detections) -> list[Tensor]``), which ``boxmot.pipelines.TrackingPipeline``
  and ``PerceptionPipeline`` use (``reid=encoder``);
- the duck-typed runtime ``get_features(xyxys [N, 4], image HxWx3 BGR uint8) -> [N, D]`` that a
  tracker built with ``reid_model=encoder`` calls on each update.

Each box is cut out of the frame (clipped to it), converted to RGB and preprocessed with the
model's own evaluation transform; the descriptor is the model's evaluation descriptor
(:meth:`esreid.inference.ReIDModel.embed`, flip averaging included), L2-normalised, float32.
BoxMOT rejects zero rows, so a box without usable pixels gets the descriptor of a black crop, a
unit vector like every other row: an empty, zero-area or inverted box, one wholly outside the
frame, and one whose part inside the frame is under 8 pixels on a side (the smallest image
esreid reads; so little says nothing about who it is).

BoxMOT 25 builds encoders from a ``boxmot.reid.ReIDEncoderSpec`` only for its own backends;
:func:`create_encoder` is a factory of that signature (backend ``"esreid"``) and
:func:`encoder_spec` writes such a spec, for code that passes specs around.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from esreid.inference import ReIDModel

__all__ = ["BACKEND", "BoxMOTEncoder", "create_encoder", "encoder_spec"]

#: The ``ReIDEncoderSpec.backend`` name of esreid models.
BACKEND = "esreid"
_EXTRA = "track"
_SPEC_OPTIONS = ("batch_size",)
# The smallest side esreid's image reader accepts (esreid.data.images.MIN_IMAGE_SIDE).
_MIN_CROP_SIDE = 8


def _boxmot(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"BoxMOT is not installed ({err}); it comes with "
                          f"pip install 'esreid[{_EXTRA}]'", name="boxmot") from err


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _bgr_frame(img: Any) -> np.ndarray:
    """``img`` itself when it is a uint8 ``[H, W, 3]`` array; the one error otherwise."""
    if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3
            or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0):
        raise ValueError("BoxMOTEncoder: a frame must be a uint8 numpy array [H, W, 3] with H, W "
                         f"> 0, in BGR order as OpenCV reads it; got {_describe(img)}")
    return img


def _boxes(xyxys: Any) -> np.ndarray:
    """The boxes as float64 ``[N, 4]`` (x1, y1, x2, y2), checked."""
    if isinstance(xyxys, torch.Tensor):
        xyxys = xyxys.detach().cpu().numpy()
    try:
        boxes = np.asarray(xyxys, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"BoxMOTEncoder: boxes must be numbers [N, 4] (x1, y1, x2, y2); {err}") from err
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError("BoxMOTEncoder: boxes must be axis-aligned [N, 4] (x1, y1, x2, y2); got "
                         f"shape {boxes.shape} (oriented boxes are not supported)")
    if not np.isfinite(boxes).all():
        raise ValueError("BoxMOTEncoder: boxes must be finite; got NaN or infinity in row "
                         f"{int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])}")
    return boxes


def _crops(rgb: np.ndarray, boxes: np.ndarray) -> list[np.ndarray | None]:
    """The pixels of each box inside ``rgb`` ``[H, W, 3]``; None for a box with none, or with
    fewer than ``_MIN_CROP_SIDE`` on a side."""
    height, width = rgb.shape[:2]
    crops: list[np.ndarray | None] = []
    for x1, y1, x2, y2 in boxes:
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            crops.append(None)
            continue
        # Every pixel the box touches.
        c0, c1 = int(math.floor(x1)), int(math.ceil(x2))
        r0, r1 = int(math.floor(y1)), int(math.ceil(y2))
        if min(c1 - c0, r1 - r0) < _MIN_CROP_SIDE:
            crops.append(None)
            continue
        crops.append(np.ascontiguousarray(rgb[r0:r1, c0:c1]))
    return crops


class BoxMOTEncoder:
    """An esreid model as a BoxMOT appearance encoder (see the module docstring).

    Give exactly one of ``checkpoint`` (written by ``esreid train``; runs on ``device``),
    ``onnx`` (written by ``esreid export``; onnxruntime on the CPU) or ``model`` (a loaded
    :class:`~esreid.inference.ReIDModel`, on its own device). Crops are embedded
    ``batch_size`` at a time. Building it does not need BoxMOT; ``requirements`` does.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None,
                 onnx: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32, model: ReIDModel | None = None) -> None:
        given = [name for name, value in (("checkpoint", checkpoint), ("onnx", onnx),
                                          ("model", model)) if value is not None]
        if len(given) != 1:
            raise ValueError("BoxMOTEncoder needs exactly one of checkpoint=, onnx= or model=; "
                             f"got {', '.join(given) or 'none'}")
        self.batch_size = _check_batch_size(batch_size)
        if checkpoint is not None:
            model = ReIDModel.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
        elif torch.device(device).type != "cpu":
            raise ValueError(f"device={device!r} applies to checkpoint=: an ONNX model runs on "
                             "onnxruntime's CPU provider and a ReIDModel stays on its own device")
        elif onnx is not None:
            model = ReIDModel.from_onnx(onnx, batch_size=batch_size)
        elif not isinstance(model, ReIDModel):
            raise TypeError(f"model must be an esreid ReIDModel, got {type(model).__name__}")
        self.model: ReIDModel = model
        self.device = model.device
        self._requirements = None

    def __repr__(self) -> str:
        return (f"BoxMOTEncoder({self.model.source or 'model'!s}, dim={self.embedding_dim}, "
                f"input={self.model.height}x{self.model.width}, batch_size={self.batch_size})")

    @property
    def embedding_dim(self) -> int:
        """Width of every descriptor: the model's descriptor length."""
        return int(self.model.descriptor_dim)

    @property
    def requirements(self) -> Any:
        """What the encoder needs besides frames and boxes: nothing (BoxMOT's
        ``EncoderRequirements(masks=False)``). Needs BoxMOT installed."""
        if self._requirements is None:
            protocols = _boxmot("boxmot.reid.protocols")
            self._requirements = protocols.EncoderRequirements(masks=False)
        return self._requirements

    def embed_crops(self, crops: Sequence[np.ndarray | None]) -> np.ndarray:
        """L2-normalised descriptors float32 ``[N, D]`` of RGB uint8 crops ``[h, w, 3]``
        (at least 8 pixels a side); None stands for a box without usable pixels (the
        descriptor of a black crop)."""
        out = np.empty((len(crops), self.embedding_dim), dtype=np.float32)
        if not crops:
            return out
        blank = np.zeros((self.model.height, self.model.width, 3), dtype=np.uint8)
        images = [blank if crop is None else crop for crop in crops]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            out[start:start + len(chunk)] = self.model.embed(chunk, progress=False)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, np.finfo(np.float32).tiny)

    def get_features(self, xyxys: Any, img: np.ndarray) -> np.ndarray:
        """Descriptors float32 ``[N, D]`` (unit rows) of the boxes ``xyxys`` ``[N, 4]`` (x1, y1,
        x2, y2 in pixels) in the frame ``img``, a uint8 BGR ``[H, W, 3]`` array; BoxMOT's
        ``reid_model`` interface. No boxes give ``[0, D]``."""
        frame = _bgr_frame(img)
        boxes = _boxes(xyxys)
        return self.embed_crops(_crops(frame[:, :, ::-1], boxes))

    def encode(self, frames: Sequence[Any], detections: Sequence[Any]) -> list[torch.Tensor]:
        """BoxMOT's ``AppearanceEncoder.encode``: for each ``boxmot.structures.Frame`` (RGB
        uint8 ``[3, H, W]``) and its ``Detections`` (axis-aligned boxes), a float32 CPU tensor
        ``[N, D]`` of unit rows. Crops of all frames are embedded together."""
        frames, detections = list(frames), list(detections)
        if len(frames) != len(detections):
            raise ValueError(f"frames and detections must be aligned, got {len(frames)} frames "
                             f"and {len(detections)} detection sets")
        crops: list[np.ndarray | None] = []
        counts: list[int] = []
        for frame, dets in zip(frames, detections, strict=True):
            frame_id, dets_id = getattr(frame, "sample_id", None), getattr(dets, "sample_id", None)
            if frame_id != dets_id:
                raise ValueError(f"frame {frame_id!r} was given the detections of {dets_id!r}")
            if getattr(dets, "is_obb", False):
                raise ValueError("BoxMOTEncoder takes axis-aligned boxes; these detections are "
                                 "oriented (OBB)")
            image = getattr(frame, "image", None)
            if (not isinstance(image, torch.Tensor) or image.dtype != torch.uint8
                    or image.dim() != 3 or image.shape[0] != 3):
                raise ValueError("BoxMOTEncoder: Frame.image must be a uint8 tensor [3, H, W] (RGB); "
                                 f"got {_describe(image)}")
            boxes = _boxes(dets.geometry.values)
            crops.extend(_crops(image.detach().cpu().permute(1, 2, 0).numpy(), boxes))
            counts.append(len(boxes))
        features = self.embed_crops(crops)
        bounds = np.cumsum(counts)[:-1]
        return [torch.from_numpy(np.ascontiguousarray(part))
                for part in np.split(features, bounds)] if counts else []


def encoder_spec(artifact: str | os.PathLike, device: str = "cpu", batch_size: int = 32) -> Any:
    """A ``boxmot.reid.ReIDEncoderSpec`` for an esreid checkpoint or ONNX file (``.onnx``):
    backend ``"esreid"``, the file's absolute path and SHA-256 (BoxMOT verifies both)."""
    specs = _boxmot("boxmot.reid.specs")
    artifacts = _boxmot("boxmot.components.artifacts")
    path = Path(os.path.expandvars(str(artifact))).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"esreid model not found: {path}")
    return specs.ReIDEncoderSpec(backend=BACKEND, artifact=str(path),
                                 artifact_sha256=artifacts.sha256_artifact(path), device=device,
                                 options=(("batch_size", _check_batch_size(batch_size)),))


def create_encoder(spec: Any) -> BoxMOTEncoder:
    """BoxMOT's ReID factory signature: the encoder of a ``ReIDEncoderSpec`` with backend
    ``"esreid"`` (artifact: a checkpoint, or an ONNX file when it ends in ``.onnx``; option
    ``batch_size``; fp32 and the model's own preprocessing only)."""
    if getattr(spec, "backend", None) != BACKEND:
        raise ValueError(f"create_encoder builds backend {BACKEND!r} encoders, "
                         f"not {getattr(spec, 'backend', None)!r}")
    if spec.artifact is None:
        raise ValueError("an esreid ReIDEncoderSpec needs artifact= (a checkpoint or ONNX file)")
    if spec.precision != "fp32":
        raise ValueError(f"esreid encoders compute in fp32, not {spec.precision}")
    if spec.preprocessing != "default":
        raise ValueError("esreid encoders preprocess with the model's own evaluation transform "
                         f"(preprocessing='default'), not {spec.preprocessing!r}")
    options = dict(spec.options)
    unknown = sorted(set(options) - set(_SPEC_OPTIONS))
    if unknown:
        raise ValueError(f"unknown esreid encoder options {unknown}; known: {list(_SPEC_OPTIONS)}")
    batch_size = options.get("batch_size", 32)
    if str(spec.artifact).lower().endswith(".onnx"):
        return BoxMOTEncoder(onnx=spec.artifact, device=spec.device, batch_size=batch_size)
    return BoxMOTEncoder(checkpoint=spec.artifact, device=spec.device, batch_size=batch_size)
