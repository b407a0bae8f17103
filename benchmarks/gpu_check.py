"""Everything esreid does on a GPU, checked in one command (at most about 8 minutes).

    python benchmarks/gpu_check.py [--out runs/gpu_check/summary.json] [--device cuda]
                                   [--skip NAME ...] [--budget 480]

For a session lent a GPU: no CUDA path of esreid runs anywhere else. The checks, in order:

- ``pytest``: ``pytest -m cuda`` (the tests that only a GPU can run; none may be skipped);
- ``precision``: a real Trainer on the embedded synthetic benchmark (ResNet-10, 64x32, ES-Net
  with BESM) in fp32, fp16 and bf16: a few steps with finite losses, the first step's loss and
  terms within 5% (2% for the ID terms) of fp32, fp16's GradScaler counted, then ``fit`` with
  an evaluation; every precision also trains and evaluates for one epoch end to end;
- ``channels_last`` and ``compile``: the first steps' losses equal the default path's within
  1% (random erasing, so both erase the same pixels; TF32 convolutions and other kernels
  differ in the last bits); ``compile`` uses inductor and records its compile time;
- ``onnx``: a ReIDModel on the GPU exported to ONNX, onnxruntime's descriptors against the
  GPU model's (cosine >= 0.999 per image);
- ``throughput``: ``train_throughput.py``'s table, ResNet-50 384x128, Base and ES-Net, fp32,
  fp16 and bf16, 16x4 batches: images/s and peak memory.

It writes one JSON summary (card, torch and CUDA versions, each check's status, seconds and
figures) and exits 1 when any check fails (2 for bad arguments). ``--device cpu`` runs the
same checks on the CPU (fp16 and the CUDA tests are then reported as skipped): a way to see
that the script itself works on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _trainer_step import machine_description  # noqa: E402

#: The tiny setting of the end-to-end checks (as the test suite's, a little larger).
TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=64", "data.width=32", "data.ids_per_batch=4", "data.num_instances=4",
    "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
    "optim.iters_per_epoch=4", "train.progress=false", "train.tensorboard=false",
    "eval.batch_size=128", "erase.prob=1.0",
]
CHECKS = ("pytest", "precision", "channels_last", "compile", "onnx", "throughput")


class CheckFailed(AssertionError):
    """A check ran and found something wrong."""


class Skipped(Exception):
    """A check that cannot run on this device (said why)."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


class Context:
    """What the checks share: the device, a work folder with the synthetic benchmark, the
    time left."""

    def __init__(self, device: torch.device, work: Path, deadline: float) -> None:
        from esreid.data.synthetic import generate_synthetic

        self.device = device
        self.work = work
        self.deadline = deadline
        self.data_root = work / "synthetic"
        generate_synthetic(self.data_root, num_ids=24, height=64, width=32, seed=0,
                           progress=False)
        self._runs = 0

    def seconds_left(self) -> float:
        """Seconds until the whole script's budget is spent."""
        return self.deadline - time.monotonic()

    def trainer(self, *settings: str, preset: str = "esnet"):
        """A fresh Trainer of the tiny setting plus ``settings``, in its own run folder."""
        from esreid.config import load_config
        from esreid.engine.trainer import Trainer

        self._runs += 1
        cfg = load_config(preset, [*TINY, f"data.root={self.data_root}",
                                   f"train.device={self.device}",
                                   f"train.output_dir={self.work / 'runs'}",
                                   f"train.run_name=run{self._runs}", *settings])
        trainer = Trainer(cfg)
        logging.getLogger("esreid").setLevel(logging.WARNING)
        return trainer


def _first_steps(trainer, n: int) -> list[tuple[float, dict[str, float]]]:
    """The trainer's first ``n`` steps on the epoch-0 batches (loss, terms)."""
    trainer.loader.sampler.set_epoch(0)
    out = []
    for (images, pids, *_), _ in zip(trainer.loader, range(n), strict=False):
        out.append(trainer.train_step(images.to(trainer.device), pids.to(trainer.device)))
    return out


def _close(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * abs(b)


def check_pytest(ctx: Context) -> dict:
    """``pytest -m cuda``: every CUDA-only test passes, none skipped."""
    if ctx.device.type != "cuda":
        raise Skipped("no CUDA device: the cuda-marked tests would all be skipped")
    timeout = max(30.0, min(240.0, ctx.seconds_left() - 200))
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    _expect(done.returncode == 0, f"pytest -m cuda exited {done.returncode}: " + " | ".join(tail))
    _expect("skipped" not in tail[-1], f"some cuda tests were skipped: {tail[-1]}")
    return {"summary": tail[-1]}


def check_precision(ctx: Context) -> dict:
    """fp32, fp16, bf16: finite losses, first step close to fp32, a run trained and evaluated."""
    cuda = ctx.device.type == "cuda"
    precisions = ["none", "bf16"] + (["fp16"] if cuda else [])
    if cuda and not torch.cuda.is_bf16_supported():
        precisions.remove("bf16")
    figures: dict[str, dict] = {}
    ref = None
    for amp in precisions:
        trainer = ctx.trainer(f"train.amp={amp}")
        steps = _first_steps(trainer, 3)
        losses = [loss for loss, _ in steps]
        _expect(all(math.isfinite(v) for v in losses), f"{amp}: non-finite losses {losses}")
        loss, parts = steps[0]
        if ref is None:
            ref = steps[0]
        else:
            ref_loss, ref_parts = ref
            _expect(_close(loss, ref_loss, 0.05), f"{amp}: first loss {loss} vs fp32 {ref_loss}")
            for key in ("id_aib", "triplet_aib", "id_esb"):
                rel = 0.02 if key.startswith("id") else 0.05
                _expect(_close(parts[key], ref_parts[key], rel),
                        f"{amp}: {key} {parts[key]} vs fp32 {ref_parts[key]}")
        result = ctx.trainer(f"train.amp={amp}").fit()
        mAP = result["metrics"]["mAP"]
        _expect(0.0 <= mAP <= 1.0, f"{amp}: mAP {mAP}")
        figures[amp] = {"first_losses": losses, "terms": parts, "mAP": mAP,
                        "scaler_scale": trainer.scaler.get_scale()
                        if trainer.scaler.is_enabled() else None,
                        "amp_skipped_steps": trainer.progress.amp_skipped}
    if not cuda:
        figures["fp16"] = "skipped: fp16 autocast needs CUDA"
    return figures


def _compare_to_default(ctx: Context, *settings: str) -> dict:
    random = "erase.method=random"
    ref = _first_steps(ctx.trainer(random), 2)
    start = time.perf_counter()
    got = _first_steps(ctx.trainer(random, *settings), 2)
    seconds = time.perf_counter() - start
    for (loss, parts), (ref_loss, ref_parts) in zip(got, ref, strict=True):
        _expect(_close(loss, ref_loss, 0.01), f"{settings}: loss {loss} vs default {ref_loss}")
        for key, value in ref_parts.items():
            _expect(abs(parts[key] - value) <= 0.01 * abs(value) + 1e-4,
                    f"{settings}: {key} {parts[key]} vs default {value}")
    return {"losses": [loss for loss, _ in got], "default_losses": [loss for loss, _ in ref],
            "seconds_for_two_steps": seconds}


def check_channels_last(ctx: Context) -> dict:
    """``train.channels_last``: the default path's losses."""
    return _compare_to_default(ctx, "train.channels_last=true")


def check_compile(ctx: Context) -> dict:
    """``train.compile`` with inductor: the default path's losses; the compile time."""
    figures = _compare_to_default(ctx, "train.compile=true", "train.compile_backend=inductor")
    figures["note"] = "seconds_for_two_steps includes inductor's compilation"
    return figures


def check_onnx(ctx: Context) -> dict:
    """A ReIDModel on the device exported to ONNX: onnxruntime's descriptors match it."""
    import numpy as np

    from esreid.export import export_onnx
    from esreid.inference import ReIDModel

    trainer = ctx.trainer()
    trainer.fit(evaluate=False)
    model = ReIDModel.from_checkpoint(trainer.folder.last, device=ctx.device)
    gen = np.random.default_rng(0)
    images = [gen.integers(0, 256, (128, 64, 3), dtype=np.uint8) for _ in range(12)]
    ours = model.embed(images, progress=False)
    path = export_onnx(model, ctx.work / "model.onnx")
    theirs = ReIDModel.from_onnx(path).embed(images, progress=False)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    _expect(bool(np.all(cos >= 0.999)), f"ONNX vs {ctx.device} cosine min {cos.min():.6f}")
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "model_device": str(model.device)}


def check_throughput(ctx: Context) -> dict:
    """train_throughput.py's table for ResNet-50 384x128 (CPU: ResNet-18, 2x2 batches)."""
    from train_throughput import measure, selected_variants

    cuda = ctx.device.type == "cuda"
    names = ["fp32", "fp16", "bf16"]
    lines: list[str] = []
    variants = selected_variants(ctx.device, names, say=lines.append)
    if cuda:
        rows = measure(ctx.device, "resnet50", 16, 4, steps=10, warmup=3, variants=variants,
                       say=lines.append)
    else:
        rows = measure(ctx.device, "resnet18", 2, 2, steps=2, warmup=1, variants=variants,
                       say=lines.append)
    for line in lines:
        print("  " + line, flush=True)
    return {"rows": rows, "table": lines}


def main(argv: list[str] | None = None) -> int:
    """Run the checks, write the summary, return the exit code."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="runs/gpu_check/summary.json", help="the JSON summary")
    p.add_argument("--skip", nargs="+", default=[], choices=CHECKS, help="checks to leave out")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for all checks (default 480); a check that would start after "
                        "it is spent is reported as not run")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
              "pass --device cpu to check the script itself", file=sys.stderr)
        return 2
    start = time.monotonic()
    summary = {"machine": machine_description(device), "device": str(device),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}}
    print(f"gpu_check on {summary['machine']}", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="esreid-gpu-check-") as tmp:
        ctx = Context(device, Path(tmp), start + args.budget)
        for name in CHECKS:
            entry: dict = {}
            began = time.monotonic()
            if name in args.skip:
                entry["status"] = "skipped: --skip"
            elif ctx.seconds_left() <= 0:
                entry["status"] = "not run: the time budget was spent"
                failed = True
            else:
                try:
                    entry["figures"] = globals()[f"check_{name}"](ctx)
                    entry["status"] = "passed"
                except Skipped as why:
                    entry["status"] = f"skipped: {why}"
                except Exception as err:  # every failure is reported, then the next check runs
                    entry["status"] = "failed"
                    entry["error"] = f"{type(err).__name__}: {err}"
                    entry["traceback"] = traceback.format_exc(limit=6)
                    failed = True
            entry["seconds"] = round(time.monotonic() - began, 1)
            summary["checks"][name] = entry
            print(f"{name:14s} {entry['status']:12s} {entry['seconds']:7.1f} s"
                  + (f"  {entry['error']}" if "error" in entry else ""), flush=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["passed"] = not failed
    out = Path(os.path.expandvars(args.out)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp_out, out)
    print(f"{'all checks passed' if not failed else 'FAILED'} in {summary['seconds']:.0f} s; "
          f"summary: {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
