"""ONNX export of a trained model, and the onnxruntime backend of ``ReIDModel.from_onnx``.

```python
from esreid import ReIDModel
from esreid.export import export_onnx
export_onnx(ReIDModel.from_checkpoint("runs/esnet/checkpoints/last.pt"), "esnet.onnx")
m = ReIDModel.from_onnx("esnet.onnx")          # embeds with onnxruntime, no checkpoint needed
```

The ONNX graph maps the preprocessed batch ``images`` (float32 ``[N, 3, H, W]``, any ``N``)
to ``descriptors`` (float32 ``[N, D]``): exactly what :meth:`ReIDModel.embed` returns, flip
averaging included when the config uses it. The file's ``metadata_props`` carry what it takes
to rebuild a :class:`~esreid.inference.ReIDModel` without the checkpoint (see
:data:`METADATA_KEYS`). Needs the optional packages of ``pip install 'esreid[export]'``
(onnx and onnxscript to export, onnxruntime to run).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from esreid import __version__
from esreid.utils import atomic_write

if TYPE_CHECKING:
    from esreid.config import Config
    from esreid.inference import ReIDModel

#: The pip extra that installs the optional packages this module needs.
EXTRA = "export"

INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"

#: ``metadata_props`` of an exported file. ``esreid_config``: the full config as JSON;
#: ``esreid_model_id``: :attr:`ReIDModel.identity`; ``esreid_version``; ``esreid_descriptor_dim``;
#: ``esreid_input_size``: JSON ``[3, H, W]``; ``esreid_mean``/``esreid_std``: JSON RGB
#: normalisation of the input (for users outside esreid; esreid itself preprocesses).
METADATA_KEYS = ("esreid_config", "esreid_model_id", "esreid_version", "esreid_descriptor_dim",
                 "esreid_input_size", "esreid_mean", "esreid_std")

# Export refuses a file whose onnxruntime output strays further than this from torch's,
# relative to the largest descriptor value: float32 convolutions of two libraries differ by
# ~1e-6 relative, a mistranslated operator by orders of magnitude more.
_SELF_CHECK_RTOL = 1e-3

#: The oldest opset :func:`export_onnx` writes: torch's exporter translates to opset 18 and
#: its conversion to older opsets fails on this model (it then silently keeps 18).
MIN_OPSET = 18


class OnnxModelError(RuntimeError):
    """An ONNX file is missing, unreadable, not written by esreid, or does not work."""


def require(module_name: str, extra: str = EXTRA) -> ModuleType:
    """Import ``module_name``, or raise ImportError saying which pip extra installs it."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{module_name} is not installed; it comes with pip install 'esreid[{extra}]'",
            name=module_name,
        ) from err


def export_onnx(model: ReIDModel, out: str | os.PathLike, opset: int | None = None) -> Path:
    """Write ``model`` as an ONNX file ``out`` (atomically) and return its path.

    Input ``images``: the preprocessed batch float32 ``[N, 3, H, W]`` with dynamic ``N``;
    output ``descriptors``: float32 ``[N, D]``, what ``model.embed`` returns. ``opset``
    defaults to the exporter's; older than :data:`MIN_OPSET` raises ValueError. The file is
    checked with ``onnx.checker`` and, before it replaces ``out``, run once in onnxruntime
    against torch (:class:`OnnxModelError` if they disagree).
    """
    onnx = require("onnx")
    require("onnxscript")  # torch's exporter imports it lazily, with a less helpful message
    ort = require("onnxruntime")
    import torch

    from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from esreid.engine.features import Descriptor

    if model.model is None:
        raise ValueError(f"{model.source}: this model already runs in onnxruntime; export from "
                         "the checkpoint (ReIDModel.from_checkpoint)")
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is not supported: the export needs opset {MIN_OPSET} or newer")
    out = Path(os.path.expandvars(str(out))).expanduser()
    name = model.source or f"model {model.identity}"
    net = model.model
    if model.device.type != "cpu":
        # The export traces on CPU so that no device-specific kernel choice enters the graph.
        import copy

        net = copy.deepcopy(net).cpu()
    wrapper = Descriptor(net, model.flip).eval()
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = torch.randn(2, 3, model.height, model.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, verbose=False,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        )
        expected = wrapper(example).numpy()
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise ValueError(f"the exporter could not write opset {opset} (it wrote {written})")
    for node in proto.graph.node:
        # The exporter tags every node with its Python stack trace: source paths of the
        # exporting machine that nothing downstream reads.
        del node.metadata_props[:]
    dim = int(expected.shape[1])
    metadata = {
        "esreid_config": json.dumps(model.cfg.to_dict()),
        "esreid_model_id": model.identity,
        "esreid_version": __version__,
        "esreid_descriptor_dim": str(dim),
        "esreid_input_size": json.dumps([3, model.height, model.width]),
        "esreid_mean": json.dumps(list(IMAGENET_MEAN)),
        "esreid_std": json.dumps(list(IMAGENET_STD)),
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = (f"esreid {__version__} re-ID model {model.identity}: {INPUT_NAME} "
                        f"float32 [N, 3, {model.height}, {model.width}] (RGB in [0, 1], normalised "
                        f"with mean {metadata['esreid_mean']}, std {metadata['esreid_std']}) -> "
                        f"{OUTPUT_NAME} float32 [N, {dim}]")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise OnnxModelError(f"the ONNX export of {name} is invalid: {_first_line(err)}") from err
    data = proto.SerializeToString()
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
    except Exception as err:  # onnxruntime's own exception classes
        raise OnnxModelError(f"onnxruntime {ort.__version__} cannot run the ONNX export of "
                             f"{name} ({_first_line(err)}); {out} was not written") from err
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not diff <= _SELF_CHECK_RTOL * scale:
        raise OnnxModelError(f"the ONNX export of {name} does not reproduce torch "
                             f"(max difference {diff:.3g} for descriptors up to {scale:.3g}); "
                             f"{out} was not written")
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class OnnxBackend:
    """An esreid ONNX file in an onnxruntime session (CPU), with its metadata.

    ``config`` is the esreid Config the model was exported with, ``identity`` the model's
    :attr:`ReIDModel.identity`, ``descriptor_dim`` the descriptor length, ``path`` the file.
    ``threads`` sets onnxruntime's intra-op threads (default: onnxruntime's choice).
    Problems with the file raise :class:`OnnxModelError`, one line naming it.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        ort = require("onnxruntime")
        from esreid.config import ConfigError, build_config

        self.path = Path(os.path.expandvars(str(path))).expanduser()
        if self.path.is_dir():
            raise OnnxModelError(f"not an ONNX model: {self.path} (it is a folder)")
        if not self.path.exists():
            raise OnnxModelError(f"ONNX model not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise OnnxModelError(f"not an ONNX model: {self.path} (empty file)")
        options = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own classes per kind of damage
            raise OnnxModelError(f"not an ONNX model: {self.path} (truncated or unreadable: "
                                 f"{_first_line(err)})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("esreid_config", "esreid_model_id", "esreid_descriptor_dim")
                   if k not in meta]
        if missing:
            raise OnnxModelError(f"ONNX model {self.path} was not written by esreid (no "
                                 f"{', '.join(missing)} metadata): export it with esreid's "
                                 "export_onnx")
        names = ([i.name for i in self.session.get_inputs()],
                 [o.name for o in self.session.get_outputs()])
        if names != ([INPUT_NAME], [OUTPUT_NAME]):
            raise OnnxModelError(f"ONNX model {self.path} has inputs {names[0]} and outputs "
                                 f"{names[1]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")
        try:
            raw: dict[str, Any] = json.loads(meta["esreid_config"])
            self.config: Config = build_config(raw, name=str(raw.get("name", "custom")))
            self.descriptor_dim = int(meta["esreid_descriptor_dim"])
        except (ValueError, TypeError, AttributeError, ConfigError) as err:
            raise OnnxModelError(f"ONNX model {self.path} has unreadable esreid metadata: "
                                 f"{_first_line(err)}") from err
        self.identity = meta["esreid_model_id"]
        self.version = meta.get("esreid_version", "?")
        self.input_shape = (3, self.config.data.height, self.config.data.width)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Descriptors float32 ``[N, D]`` of a preprocessed batch float32 ``[N, 3, H, W]``."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"{self.path}: expects a batch [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.descriptor_dim), dtype=np.float32)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return f"OnnxBackend({str(self.path)!r}, identity={self.identity!r}, dim={self.descriptor_dim})"
