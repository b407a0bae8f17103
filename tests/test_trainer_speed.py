"""The Trainer's speed switches: mixed precision (train.amp), channels-last, torch.compile.

Each is checked against the default float32 path on the same tiny model and batch: the
switch must change how the step is computed, not what it computes (within a tolerance).
"""

import logging
import math

import pytest
import torch

from esreid.config import load_config
from esreid.data.synthetic import generate_synthetic
from esreid.engine.trainer import Trainer

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
    "optim.iters_per_epoch=2", "train.progress=false", "train.tensorboard=false",
    "eval.batch_size=64", "erase.prob=1.0",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, num_ids=12, height=32, width=16, seed=0, progress=False)
    return root


def _trainer(tmp_path, synth_root, name, *extra):
    cfg = load_config("esnet", TINY + [f"data.root={synth_root}", f"train.output_dir={tmp_path}",
                                       f"train.run_name={name}", *extra])
    return Trainer(cfg)


def _first_steps(trainer, n=2):
    """Losses (and their parts) of the trainer's first ``n`` steps on the epoch-0 batches."""
    trainer.loader.sampler.set_epoch(0)
    out = []
    for (images, pids, *_), _ in zip(trainer.loader, range(n), strict=False):
        out.append(trainer.train_step(images, pids))
    return out


def test_bf16_on_cpu_trains_and_evaluates_end_to_end(tmp_path, synth_root):
    ref = _first_steps(_trainer(tmp_path, synth_root, "fp32"))
    trainer = _trainer(tmp_path, synth_root, "bf16", "train.amp=bf16")
    assert trainer.amp_dtype is torch.bfloat16
    steps = _first_steps(trainer)
    assert all(math.isfinite(loss) for loss, _ in steps)
    (loss, parts), (ref_loss, ref_parts) = steps[0], ref[0]
    # Autocast really ran (bf16 convolutions give another loss) ...
    assert loss != ref_loss
    # ... and the first step's terms stay close to float32. (The ESB's triplet term is left
    # out: BESM erases the top 20% of a CG-RAM map computed from bf16 features, so pixels
    # near the threshold change sides, and 8 images make a coarse triplet estimate.)
    assert loss == pytest.approx(ref_loss, rel=0.05)
    for key in ("id_aib", "triplet_aib", "id_esb"):
        assert parts[key] == pytest.approx(ref_parts[key], rel=0.02), key
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    result = _trainer(tmp_path, synth_root, "bf16_fit", "train.amp=bf16",
                      "optim.iters_per_epoch=1").fit()
    assert 0.0 <= result["metrics"]["mAP"] <= 1.0


def test_fp16_without_cuda_warns_and_trains_in_float32(tmp_path, synth_root, caplog):
    with caplog.at_level(logging.WARNING, logger="esreid.train"):
        trainer = _trainer(tmp_path, synth_root, "fp16", "train.amp=fp16")
    assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()
    assert "train.amp=fp16 needs CUDA" in caplog.text
    assert _first_steps(trainer, 1) == _first_steps(_trainer(tmp_path, synth_root, "ref"), 1)


# The exact comparisons erase at random (same generator, same rectangles) rather than with
# BESM, whose top-R selection turns last-bit differences of other convolution kernels into
# other erased pixels; the erased batch still takes its second trunk pass.
RANDOM_ERASING = "erase.method=random"


def test_channels_last_gives_the_default_loss(tmp_path, synth_root):
    trainer = _trainer(tmp_path, synth_root, "cl", "train.channels_last=true", RANDOM_ERASING)
    conv = trainer.model.trunk.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    steps = _first_steps(trainer)
    ref = _first_steps(_trainer(tmp_path, synth_root, "ref", RANDOM_ERASING))
    for (loss, parts), (ref_loss, ref_parts) in zip(steps, ref, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert parts == pytest.approx(ref_parts, rel=1e-4, abs=1e-5)


def test_compiled_step_gives_the_default_loss(tmp_path, synth_root):
    # aot_eager traces the whole step (dynamo, then AOTAutograd's joint forward-backward
    # graph) without inductor's code generation, which takes minutes on 2 cores.
    trainer = _trainer(tmp_path, synth_root, "compiled", "train.compile=true",
                       "train.compile_backend=aot_eager", RANDOM_ERASING)
    assert hasattr(trainer.objective, "_orig_mod")  # what torch.compile returns
    steps = _first_steps(trainer)
    ref = _first_steps(_trainer(tmp_path, synth_root, "ref", RANDOM_ERASING))
    for (loss, parts), (ref_loss, ref_parts) in zip(steps, ref, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-4)
        assert parts == pytest.approx(ref_parts, rel=1e-4, abs=1e-5)
