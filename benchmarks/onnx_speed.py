"""Images per second of a ResNet-50 ES-Net descriptor on CPU: torch eager vs onnxruntime.

    python benchmarks/onnx_speed.py [--batches 1 16] [--repeats 5] [--threads N] [--no-flip]

Builds the ``esnet`` preset (ResNet-50, 384x128, random weights: speed does not depend on
them), exports it with :func:`esreid.export.export_onnx` and times the descriptor of one
preprocessed batch in both runtimes (preprocessing excluded), with the same number of
threads. With flip averaging (the preset's default) each image costs two forward passes in
both. Per batch size: one warm-up call each, then ``--repeats`` calls alternating between the
runtimes so that load from other processes hits both alike; the table shows the medians.

The weights are perturbed away from their initialisation so that the two branches differ, as
after training: with the identical branches of a fresh model, onnxruntime's common
subexpression elimination would compute one branch for both and flatter itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Multiply every parameter and BatchNorm statistic by ``1 + 0.05 * noise``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point():
                tensor.mul_(1 + 0.05 * torch.randn(tensor.shape, generator=g))
                if "running_var" in name:
                    tensor.abs_()


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Warm each call up once, then time ``repeats`` rounds of all of them in turn."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    """Parse the options, build, export and time the model, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per runtime and batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads of both runtimes (default: all CPU cores)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="flip averaging in the descriptor (the preset's default)")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1 or min(args.batches) < 1:
        parser.error("--repeats, --threads and --batches must be >= 1")

    import onnxruntime

    from esreid.config import load_config
    from esreid.engine.features import descriptor
    from esreid.export import OnnxBackend, export_onnx
    from esreid.inference import ReIDModel
    from esreid.models.esnet import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("esnet", ["model.pretrained=none", f"eval.flip={str(args.flip).lower()}"])
    net = build_model(cfg.model, 751, cfg.erase)
    perturb(net)
    model = ReIDModel(net, cfg)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "esnet.onnx")
        export_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20
        backend = OnnxBackend(path, threads=args.threads)

        print(f"ES-Net ResNet-50 {cfg.data.height}x{cfg.data.width}, descriptor "
              f"{model.descriptor_dim}-d, flip {'on' if args.flip else 'off'}; torch "
              f"{torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.threads} "
              f"threads on {os.cpu_count()} CPU cores; median of {args.repeats}")
        print(f"export: {export_s:.1f} s, {size_mb:.0f} MiB")
        print()
        print(f"{'batch':>5}  {'runtime':<12} {'s/batch':>8} {'images/s':>9}")
        rng = np.random.default_rng(0)
        for n in args.batches:
            batch = torch.from_numpy(rng.standard_normal((n, 3, cfg.data.height, cfg.data.width),
                                                         dtype=np.float32))

            def torch_call(batch: torch.Tensor = batch) -> np.ndarray:
                with torch.inference_mode():
                    return descriptor(model.model, batch, model.flip).numpy()

            def onnx_call(batch: torch.Tensor = batch) -> np.ndarray:
                return backend.run(batch.numpy())

            expected = torch_call()
            diff = float(np.abs(expected - onnx_call()).max())
            med = median_seconds({"torch eager": torch_call, "onnxruntime": onnx_call},
                                 args.repeats)
            for name, seconds in med.items():
                print(f"{n:>5}  {name:<12} {seconds:>8.3f} {n / seconds:>9.1f}")
            print(f"{'':>5}  onnxruntime / torch images/s: "
                  f"{med['torch eager'] / med['onnxruntime']:.2f}x (max |descriptor difference| "
                  f"{diff:.2g}, descriptors up to {float(np.abs(expected).max()):.3g})")


if __name__ == "__main__":
    main()
