"""Time one training step of Base, a two-branch model without erasing, and ES-Net.

    python benchmarks/train_step.py [--backbone resnet50] [--height 384 --width 128]
                                    [--ids 4 --instances 4] [--repeats 5] [--device cpu]

Prints the median seconds of ``--repeats`` steps (after warm-up steps) per model and the
ratios measured in this one run. Target (issue 3): ES-Net / two-branch-without-erasing
<= 1.35: one extra no-grad forward of the ESB stages for CG-RAM and a second trunk pass on
the erased batch should be the whole extra cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from esreid.config import load_config
from esreid.engine.objective import total_loss
from esreid.models.esnet import build_model

MODELS = [
    ("base", "base", []),
    ("two-branch, no erasing", "esnet", ["erase.method=none"]),
    ("ES-Net (BESM, P=0.5)", "esnet", []),
    ("ES-Net (P=0.5, full I* pass)", "esnet", ["erase.reuse_clean=false"]),
    ("ES-Net (BESM, P=1.0)", "esnet", ["erase.prob=1.0"]),
]


class StepRunner:
    """One model with its optimiser and a fixed random batch; :meth:`step` times one step."""

    def __init__(self, preset: str, overrides: list[str], args: argparse.Namespace) -> None:
        cfg = load_config(preset, overrides + [f"model.backbone={args.backbone}",
                                               "model.pretrained=none"])
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        self.loss_cfg = cfg.loss
        self.model = build_model(cfg.model, 100, cfg.erase).to(self.device).train()
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=3.5e-4)
        n = args.ids * args.instances
        self.images = torch.randn(n, 3, args.height, args.width, device=self.device)
        self.pids = torch.arange(args.ids, device=self.device).repeat_interleave(args.instances)
        self.gen = torch.Generator().manual_seed(0)

    def step(self) -> float:
        """Seconds of one training step (forward, Eq. 1, backward, Adam)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.model.forward_train(self.images, self.pids, generator=self.gen)
        loss, _ = total_loss(out, self.pids, self.loss_cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--ids", type=int, default=4, help="J identities per batch")
    p.add_argument("--instances", type=int, default=4, help="K images per identity")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"{args.backbone} {args.height}x{args.width}, batch {args.ids}x{args.instances}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} steps after {args.warmup} warm-up")
    runners = {label: StepRunner(preset, overrides, args) for label, preset, overrides in MODELS}
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


if __name__ == "__main__":
    main()
