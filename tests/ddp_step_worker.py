"""One training step of the real Trainer, run by ``torchrun`` in tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/ddp_step_worker.py OUT_DIR SYNTH_ROOT

For each case of :data:`CASES` every rank builds a Trainer (DistributedDataParallel over
Gloo), takes its first local batch, runs ``Trainer.train_step`` once and saves its batch,
its gradients (averaged by DDP) and its parameters after the step to
``OUT_DIR/<case>_rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from esreid.config import load_config
from esreid.engine import distributed
from esreid.engine.trainer import Trainer

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_epochs=0", "erase.prob=1.0",
]
# case -> (extra overrides, BatchNorm layers in eval mode during the step). The whole-batch
# comparison runs without erasing: convolutions of 4 and 8 images differ in the last float
# bits, and BESM's top-R selection turns such differences into other erased pixels. The
# train_mode case compares batches of equal size, with BESM.
CASES = {
    "bn_eval_id_only": (["loss.triplet=false", "erase.method=none"], True),
    "train_mode": ([], False),
}


def bn_eval(model: torch.nn.Module) -> None:
    """Keep every BatchNorm in eval mode, also when the trainer calls ``model.train()``."""
    train = model.train

    def train_with_frozen_bn(mode: bool = True):
        train(mode)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        return model

    model.train = train_with_frozen_bn


def make_trainer(case: str, synth_root: str, run_dir: Path) -> Trainer:
    """The Trainer of ``case`` (distributed when run under torchrun)."""
    extra, frozen = CASES[case]
    cfg = load_config("esnet", TINY + extra + [f"data.root={synth_root}"])
    trainer = Trainer(cfg, run_dir=run_dir, overwrite=True)
    if frozen:
        bn_eval(trainer.model)
    return trainer


def main() -> None:
    out, synth_root = Path(sys.argv[1]), sys.argv[2]
    for case in CASES:
        trainer = make_trainer(case, synth_root, out / f"run_{case}")
        trainer.loader.sampler.set_epoch(0)
        images, pids, *_ = next(iter(trainer.loader))
        loss, _ = trainer.train_step(images, pids)
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"images": images, "pids": pids, "loss": loss, "grads": grads,
                    "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                    "world_size": trainer.world_size},
                   out / f"{case}_rank{trainer.ctx.rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
