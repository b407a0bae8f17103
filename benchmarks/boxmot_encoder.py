"""Crops per second of BoxMOTEncoder.get_features with a ResNet-50 ES-Net: torch vs ONNX.

    python benchmarks/boxmot_encoder.py [--boxes 32] [--batch-size 32] [--repeats 5]
                                        [--threads N] [--no-flip]

What a tracker pays per frame for appearance: ``--boxes`` person boxes (about 250x100 pixels,
what a pedestrian 250 px tall in a 1280x720 frame gives) cut out of one BGR frame, converted,
preprocessed with the eval transform (384x128) and embedded in batches of ``--batch-size``,
once with the torch model and once with its ONNX export (onnxruntime), same threads. The
``esnet`` preset with random weights (speed does not depend on them), perturbed so that the
two branches differ as after training (see ``onnx_speed.py``); flip averaging on, as the
preset, so each crop costs two forward passes. The preprocessing alone (cropping plus
``ReIDModel.preprocess``) is timed too, since both runtimes pay it on the CPU.

One warm-up call each, then ``--repeats`` rounds alternating between them so that load from
other processes hits all alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnx_speed import median_seconds, perturb


def person_boxes(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``count`` boxes [x1, y1, x2, y2] of about 250x100 pixels inside a height x width frame."""
    rng = np.random.default_rng(seed)
    h = rng.uniform(220, 280, size=count)
    w = h * rng.uniform(0.35, 0.45, size=count)
    x1 = rng.uniform(0, width - w)
    y1 = rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def main() -> None:
    """Parse the options, build and export the model, time both encoders, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, default=32, help="person boxes per frame")
    parser.add_argument("--batch-size", type=int, default=32, help="crops embedded at once")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per encoder")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="intra-op threads of both runtimes (default: all CPU cores)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="flip averaging in the descriptor (the preset's default)")
    args = parser.parse_args()
    if min(args.boxes, args.batch_size, args.repeats, args.threads) < 1:
        parser.error("--boxes, --batch-size, --repeats and --threads must be >= 1")

    from esreid.config import load_config
    from esreid.export import export_onnx
    from esreid.inference import ReIDModel
    from esreid.integrations.boxmot import BoxMOTEncoder
    from esreid.models.esnet import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config("esnet", ["model.pretrained=none", f"eval.flip={str(args.flip).lower()}"])
    net = build_model(cfg.model, 751, cfg.erase)
    perturb(net)
    model = ReIDModel(net, cfg, batch_size=args.batch_size)
    frame = np.random.default_rng(0).integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    boxes = person_boxes(args.boxes, *frame.shape[:2])

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "esnet.onnx")
        encoders = {
            "torch": BoxMOTEncoder(model=model, batch_size=args.batch_size),
            "onnx": BoxMOTEncoder(model=ReIDModel.from_onnx(path, batch_size=args.batch_size,
                                                            threads=args.threads),
                                  batch_size=args.batch_size),
        }
        calls = {name: (lambda e=enc: e.get_features(boxes, frame)) for name, enc in encoders.items()}
        pixels = boxes.round().astype(int)
        calls["preprocess only"] = lambda: model.preprocess(
            [np.ascontiguousarray(frame[y1:y2, x1:x2, ::-1]) for x1, y1, x2, y2 in pixels])
        gap = np.abs(calls["torch"]() - calls["onnx"]()).max()
        seconds = median_seconds(calls, args.repeats)

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{args.threads} threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"esnet ResNet-50 {cfg.data.height}x{cfg.data.width}, flip={args.flip}, "
          f"{args.boxes} boxes per frame, batch size {args.batch_size}, median of "
          f"{args.repeats}; torch and ONNX descriptors differ by at most {gap:.1e}")
    print(f"{'':16s} {'s/frame':>8s} {'crops/s':>8s}")
    for name, s in seconds.items():
        print(f"{name:16s} {s:8.3f} {args.boxes / s:8.1f}")


if __name__ == "__main__":
    main()
