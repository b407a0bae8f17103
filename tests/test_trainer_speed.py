"""The Trainer's speed switches: mixed precision (train.amp), channels-last, torch.compile,
and what a step does when its numbers stop being finite.

Each switch is checked against the default float32 path on the same tiny model and batch: the
switch must change how the step is computed, not what it computes (within a tolerance). A
non-finite loss term, saliency map or gradient stops the run at that step with one line and
the last good checkpoint; fp16's GradScaler skips overflowing steps and counts them.
"""

import json
import logging
import math

import pytest
import torch

from esreid.cli import main
from esreid.config import load_config
from esreid.data.synthetic import generate_synthetic
from esreid.engine.checkpoint import read_checkpoint
from esreid.engine.objective import TrainingObjective
from esreid.engine.trainer import Trainer, TrainingDiverged
from esreid.models.erasers import BESM

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


def _first_forward(trainer):
    trainer.loader.sampler.set_epoch(0)
    images, pids, *_ = next(iter(trainer.loader))
    trainer.model.train()
    with torch.autocast("cpu", dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
        out = trainer.model.forward_train(images, pids, trainer.generator)
        shared = trainer.model.trunk(images)
    return images, pids, shared, out


def test_bf16_saliency_maps_are_the_float32_maps_and_erase_what_float32_erases(
        tmp_path, synth_root):
    _, _, _, ref = _first_forward(_trainer(tmp_path, synth_root, "fp32"))
    trainer = _trainer(tmp_path, synth_root, "bf16", "train.amp=bf16")
    images, pids, shared, out = _first_forward(trainer)
    assert shared.dtype == torch.bfloat16 and out.saliency.dtype == torch.float32
    # The maps of a bf16 step are the float32 maps of its (bf16) trunk output ...
    torch.testing.assert_close(out.saliency,
                               trainer.model.saliency_maps(images, pids, shared=shared.float()),
                               rtol=0, atol=0)
    # ... so BESM erases nearly the pixels the float32 step erases (the trunk's rounding
    # moves a few pixels near the top-R threshold).
    erased, ref_erased = ((o.erased_images != 0).all(1).logical_not() for o in (out, ref))
    union = (erased | ref_erased).flatten(1).sum(1)
    # An image neither step erases (its map has no contrast in both) agrees fully.
    iou = torch.where(union > 0, (erased & ref_erased).flatten(1).sum(1) / union.clamp_min(1),
                      torch.ones(len(union)))
    assert bool(out.was_erased.any())
    assert float(iou.mean()) >= 0.9 and float(iou.min()) >= 0.6, iou.tolist()


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


# --- non-finite values never travel silently -------------------------------------------------

def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_non_finite_loss_term_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, synth_root, monkeypatch, capsys):
    real_forward = TrainingObjective.forward
    calls = []

    def third_step_diverges(self, images, pids, generator=None):
        loss, terms, info = real_forward(self, images, pids, generator)
        calls.append(1)
        if len(calls) == 3:  # epoch 2, iteration 1
            nan = float("nan")
            loss, terms = loss * nan, {**terms, "id_esb": terms["id_esb"] * nan}
        return loss, terms, info

    monkeypatch.setattr(TrainingObjective, "forward", third_step_diverges)
    args = ["train", "--config", "esnet", "--no-eval", "--set", *TINY, f"data.root={synth_root}",
            f"train.output_dir={tmp_path}", "train.run_name=nan", "optim.epochs=2"]
    assert main(args) == 3
    run = tmp_path / "nan"
    lines = capsys.readouterr().err.strip().splitlines()  # the log's lines come first
    said = [line for line in lines if line.startswith("esreid train:")]
    assert said == lines[-1:], lines
    err = said[0]
    assert err.startswith("esreid train: id_esb became nan at epoch 2, iteration 1/2 under "
                          "train.amp=none; the step was not applied.")
    assert (f"Last good checkpoint: {run / 'checkpoints' / 'last.pt'} (epoch 1); resume with: "
            f"esreid train --resume {run} (add --set optim.lr=<lower> --force") in err
    ckpt = read_checkpoint(run / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    last = _records(run)[-1]
    assert last == {"type": "nonfinite", "epoch": 1, "iteration": 0, "term": "id_esb",
                    "value": "nan", "amp": "train.amp=none", "world_size": 1}
    # The resume command of the message continues from the kept checkpoint.
    monkeypatch.setattr(TrainingObjective, "forward", real_forward)
    assert main(["train", "--resume", str(run), "--no-eval"]) == 0
    assert read_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_non_finite_saliency_maps_stop_the_run_naming_them_and_the_precision(
        tmp_path, synth_root, monkeypatch):
    real_maps = BESM.maps

    def maps_with_a_nan(self, *args):
        maps = real_maps(self, *args).clone()
        maps[1, 0, 0] = float("inf")
        return maps

    monkeypatch.setattr(BESM, "maps", maps_with_a_nan)
    trainer = _trainer(tmp_path, synth_root, "inf_maps", "train.amp=bf16")
    with pytest.raises(TrainingDiverged) as stop:
        trainer.fit(evaluate=False)
    assert stop.value.term == "saliency maps" and stop.value.exit_code == 3
    assert str(stop.value).startswith(
        "saliency maps became non-finite in 12% of the batch at epoch 1, iteration 1/2 under "
        "train.amp=bf16; the step was not applied. No checkpoint was written yet")
    assert not (tmp_path / "inf_maps" / "checkpoints" / "last.pt").exists()


def test_non_finite_gradients_stop_the_run_before_the_weights_change(tmp_path, synth_root):
    trainer = _trainer(tmp_path, synth_root, "inf_grads")
    weight = trainer.model.trunk.stem[0].weight
    weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" not in k
              and "num_batches" not in k}
    with pytest.raises(TrainingDiverged, match=r"^gradients became non-finite at epoch 1, "
                                               r"iteration 1/2 under train.amp=none"):
        _first_steps(trainer, 1)
    after = trainer.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_fp16_grad_scaler_skips_overflowing_steps_lowers_its_scale_and_counts_them(
        tmp_path, synth_root):
    trainer = _trainer(tmp_path, synth_root, "scaler", "optim.iters_per_epoch=3")
    # GradScaler's real skip-and-lower: a scale of 2^127 makes the scaled float32 gradients
    # overflow (as fp16 gradients do at far smaller scales), so the steps are skipped.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=100)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.fit(evaluate=False)
    record = next(r for r in _records(tmp_path / "scaler") if r["type"] == "train")
    skipped = record["amp_skipped_steps"]
    assert 1 <= skipped <= 3 and record["amp_scale"] == 2.0 ** (127 - skipped)
    changed = any(not torch.equal(v, dict(trainer.model.named_parameters())[k])
                  for k, v in before.items())
    assert changed == (skipped < 3)
    assert read_checkpoint(tmp_path / "scaler" / "checkpoints" / "last.pt")["scaler"]["scale"] \
        == 2.0 ** (127 - skipped)
