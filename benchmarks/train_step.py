"""Time the Trainer's own training step for Base, a two-branch model without erasing, and ES-Net.

    python benchmarks/train_step.py [--backbone resnet50] [--height 384 --width 128]
                                    [--ids 4 --instances 4] [--repeats 5] [--warmup 1]
                                    [--device cpu] [--set train.amp=bf16 train.channels_last=true]

Each model is a real ``Trainer`` (its optimiser groups, autocast, scaler and memory format as
configured) on the embedded synthetic benchmark in a temporary folder, and what is timed is
``Trainer.train_step`` on one fixed random batch of ``--ids`` x ``--instances`` images (see
``_trainer_step.py``; the classifier has max(ids, 8) classes, the synthetic benchmark's).
``--set`` overrides apply to every model. Models take turns step by step; the script prints
the median seconds of ``--repeats`` steps (after ``--warmup`` steps) per model with min and
max, and the ratios measured in this one run. Target (issue 3): ES-Net /
two-branch-without-erasing <= 1.35: one extra no-grad forward of the ESB stages for CG-RAM and
a second trunk pass on the erased batch should be the whole extra cost. The AGW rows (Table
VII) give the same ratio on the stronger baseline: ES-Net* / AGW.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _trainer_step import TrainerStep, fixed_batch, machine_description, prepare_data

MODELS = [
    ("base", "base", []),
    ("two-branch, no erasing", "esnet", ["erase.method=none"]),
    ("ES-Net (BESM, P=0.5)", "esnet", []),
    ("ES-Net (P=0.5, full I* pass)", "esnet", ["erase.reuse_clean=false"]),
    ("ES-Net (BESM, P=1.0)", "esnet", ["erase.prob=1.0"]),
    ("AGW", "agw", []),
    ("ES-Net* (on AGW)", "esnet_agw", []),
]

# AGW puts 3 non-local blocks after layer3's last blocks; backbones with fewer blocks per
# stage get as many as they have (stated in the output).
_NON_LOCAL = {"resnet10": "[0,1,1,0]", "resnet18": "[0,2,2,0]"}


def main() -> None:
    """Parse the options, time the models in turn and print the table and ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ids", type=int, default=4, help="J identities per batch")
    p.add_argument("--instances", type=int, default=4, help="K images per identity")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides applied to every model, e.g. train.amp=bf16")
    args = p.parse_args()
    print(f"{args.backbone} {args.height}x{args.width}, batch {args.ids}x{args.instances}, "
          f"device {args.device}: {machine_description(args.device)}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    if args.overrides:
        print(f"overrides: {' '.join(args.overrides)}")
    with tempfile.TemporaryDirectory(prefix="esreid-train-step-") as tmp:
        work = Path(tmp)
        data_root, synth_ids = prepare_data(work, args.ids)
        images, pids = fixed_batch(args.ids, args.instances, args.height, args.width, args.device)
        agw_fit = []
        if args.backbone in _NON_LOCAL:
            agw_fit = [f"model.non_local={_NON_LOCAL[args.backbone]}"]
            print(f"AGW rows with model.non_local={_NON_LOCAL[args.backbone]} on {args.backbone}")
        runners = {
            label: TrainerStep(preset, overrides + (agw_fit if "agw" in preset else [])
                               + args.overrides, backbone=args.backbone,
                               device=args.device, images=images, pids=pids,
                               instances=args.instances, data_root=data_root,
                               synth_ids=synth_ids, run_dir=work / "runs" / str(i))
            for i, (label, preset, overrides) in enumerate(MODELS)
        }
        print(f"{synth_ids // 2} classes (the synthetic benchmark's training identities)")
        times: dict[str, list[float]] = {label: [] for label in runners}
        # Models take turns step by step, so drifts of the machine's speed hit all of them alike.
        for rep in range(args.warmup + args.repeats):
            for label, runner in runners.items():
                t = runner.step()
                if rep >= args.warmup:
                    times[label].append(t)
    medians = {label: statistics.median(ts) for label, ts in times.items()}
    for label, ts in times.items():
        print(f"  {label:28s} {medians[label]:7.3f} s/step  (min {min(ts):.3f}, max {max(ts):.3f})")
    two = medians["two-branch, no erasing"]
    print(f"  two-branch / base            {two / medians['base']:.2f}")
    for label in ("ES-Net (BESM, P=0.5)", "ES-Net (P=0.5, full I* pass)", "ES-Net (BESM, P=1.0)"):
        print(f"  {label:28s} / two-branch  {medians[label] / two:.2f}  (target <= 1.35)")
    print(f"  ES-Net* (on AGW) / AGW       {medians['ES-Net* (on AGW)'] / medians['AGW']:.2f}")
    print(f"  AGW / base                   {medians['AGW'] / medians['base']:.2f}")


if __name__ == "__main__":
    main()
