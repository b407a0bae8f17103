"""Training images/s of Base and ES-Net per precision and memory format.

    python benchmarks/train_throughput.py [--device cuda] [--backbone resnet50]
                                          [--batch-ids 16 --instances 4] [--steps 20] [--warmup 5]

For each variant (fp32, fp16, bf16, fp32 + channels_last, bf16 + channels_last: the config keys
``train.amp`` and ``train.channels_last``) and model (``base`` and ``esnet`` presets), a real
``Trainer`` on the embedded synthetic benchmark in a temporary folder runs ``--warmup`` then
``--steps`` calls of its own ``train_step`` on one fixed random 384x128 batch of ``--batch-ids``
x ``--instances`` images (see ``_trainer_step.py``; the classifier has max(ids, 8) classes).
The table shows images/s (batch size / median s/step), the median s/step and, on CUDA, the
peak memory allocated by that Trainer (weights, optimiser state, activations). One Trainer
exists at a time, so each peak is its own. fp16 autocast only exists on CUDA: on CPU the fp16
variants are skipped with a note; bf16 is skipped on a card that lacks it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
from pathlib import Path

import torch
from _trainer_step import (
    TrainerStep,
    default_device,
    fixed_batch,
    machine_description,
    prepare_data,
)

MODELS = [("Base", "base"), ("ES-Net", "esnet")]
#: (label, train.amp, train.channels_last)
VARIANTS = [
    ("fp32", "none", False),
    ("fp16", "fp16", False),
    ("bf16", "bf16", False),
    ("fp32+channels_last", "none", True),
    ("bf16+channels_last", "bf16", True),
]
HEIGHT, WIDTH = 384, 128


def selected_variants(device: torch.device, names: list[str] | None = None,
                      say=print) -> list[tuple[str, list[str]]]:
    """The variants (label, config overrides) this device can run, optionally only ``names``;
    each one left out is said with its reason."""
    cuda = device.type == "cuda"
    out = []
    for label, amp, channels_last in VARIANTS:
        if names is not None and label not in names:
            continue
        if amp == "fp16" and not cuda:
            say(f"note: {label} skipped, fp16 autocast needs CUDA")
        elif amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            say(f"note: {label} skipped, this card has no bfloat16")
        else:
            out.append((label, [f"train.amp={amp}",
                                f"train.channels_last={str(channels_last).lower()}"]))
    return out


def measure(device: torch.device, backbone: str = "resnet50", batch_ids: int = 16,
            instances: int = 4, steps: int = 20, warmup: int = 5,
            variants: list[tuple[str, list[str]]] | None = None, say=print) -> list[dict]:
    """Time every model and variant in turn; returns one dict per row (model, variant,
    images_per_s, s_per_step, and peak_mib on CUDA) and says each row as a table line."""
    cuda = device.type == "cuda"
    batch = batch_ids * instances
    variants = selected_variants(device, say=say) if variants is None else variants
    header = f"{'model':8s} {'variant':20s} {'images/s':>9s} {'s/step':>8s}"
    if cuda:
        header += f" {'peak MiB':>9s}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="esreid-train-throughput-") as tmp:
        work = Path(tmp)
        data_root, synth_ids = prepare_data(work, batch_ids)
        images, pids = fixed_batch(batch_ids, instances, HEIGHT, WIDTH, device)
        say(f"{synth_ids // 2} classes (the synthetic benchmark's training identities)")
        say(header)
        say("-" * len(header))
        for v, (variant, overrides) in enumerate(variants):
            for m, (model, preset) in enumerate(MODELS):
                if cuda:
                    # The previous Trainer is gone; its cached blocks must not count here.
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                runner = TrainerStep(preset, overrides, backbone=backbone,
                                     device=str(device), images=images, pids=pids,
                                     instances=instances, data_root=data_root,
                                     synth_ids=synth_ids, run_dir=work / "runs" / f"{v}-{m}")
                times = [runner.step() for _ in range(warmup + steps)][warmup:]
                sec = statistics.median(times)
                row = {"model": model, "variant": variant, "images_per_s": batch / sec,
                       "s_per_step": sec}
                line = f"{model:8s} {variant:20s} {batch / sec:9.1f} {sec:8.3f}"
                if cuda:
                    row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    line += f" {row['peak_mib']:9.0f}"
                rows.append(row)
                say(line)
                del runner
    return rows


def main() -> None:
    """Parse the options, run every model and variant in turn and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device())
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-ids", type=int, default=16, help="J identities per batch")
    p.add_argument("--instances", type=int, default=4, help="K images per identity")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model and variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS],
                   help="only these variants (default: all the device can run)")
    args = p.parse_args()
    device = torch.device(args.device)
    batch = args.batch_ids * args.instances
    print(f"{args.backbone} {HEIGHT}x{WIDTH}, batch {args.batch_ids}x{args.instances} = {batch}, "
          f"{machine_description(device)}; median of {args.steps} steps after {args.warmup} warm-up")
    variants = selected_variants(device, args.variants)
    measure(device, args.backbone, args.batch_ids, args.instances, args.steps, args.warmup,
            variants, say=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
