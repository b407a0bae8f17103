"""TensorBoard logs: metrics.jsonl records as scalars, CG-RAM overlays, the optional import."""

import io
import logging
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from esreid.config import load_config
from esreid.data.records import Record
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from esreid.engine.tensorboard import (
    TensorBoardLog,
    cgram_overlay_batch,
    open_tensorboard,
    overlay_batch,
    scalar_tag,
)
from esreid.models.esnet import build_model

TRAIN_1 = {"type": "train", "epoch": 1, "loss": 7.25, "lr": 3.5e-05, "images_per_s": 812.5,
           "seconds": 40.0, "id_aib": 3.5, "triplet_aib": 0.25, "id_esb": 3.0,
           "triplet_esb": 0.5, "erased_frac": 0.3125, "ppool_l_esb": 2.75, "erased_loss": 6.5,
           "clean_loss": 6.0, "skipped_images": 2, "world_size": 1, "zero_map_frac": 0.125,
           "erased_pixel_frac": 0.0625, "saliency_nonfinite": 0.0, "amp_skipped_steps": 3,
           "amp_scale": 32768.0}
TRAIN_2 = {**TRAIN_1, "epoch": 2, "loss": 6.0, "lr": 7e-05, "erased_loss": float("nan"),
           "clean_loss": float("inf")}
EVAL_2 = {"type": "eval", "epoch": 2, "rank1": 0.5, "mAP": 0.375, "mINP": 0.125,
          "rank5": 0.75, "TPR@FPR=0.001": 0.0625, "TPR@FPR=0.01": 0.25}
CHANGE = {"type": "config_change", "epoch": 2, "iteration": 3, "forced": False,
          "changes": {"data.workers": [4, 2]}}

EXPECTED_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "id_aib": "train/id_aib",
    "triplet_aib": "train/triplet_aib", "id_esb": "train/id_esb",
    "triplet_esb": "train/triplet_esb", "erased_frac": "train/erased_frac",
    "images_per_s": "speed/images_per_s", "seconds": "speed/seconds",
    "ppool_l_esb": "ppool/l_esb", "erased_loss": "diagnostic/erased_loss",
    "clean_loss": "diagnostic/clean_loss", "skipped_images": "run/skipped_images",
    "world_size": "run/world_size", "zero_map_frac": "saliency/zero_map_frac",
    "erased_pixel_frac": "saliency/erased_pixel_frac", "saliency_nonfinite": "saliency/nonfinite",
    "amp_skipped_steps": "amp/skipped_steps", "amp_scale": "amp/scale",
}


def _scalars(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                 for tag in acc.Tags()["scalars"]}


def test_scalar_tags_are_grouped_and_valid():
    for key, tag in EXPECTED_TAGS.items():
        assert scalar_tag("train", key) == tag
    assert scalar_tag("eval", "TPR@FPR=0.001") == "eval/TPR_at_FPR_0.001"
    assert scalar_tag("eval", "TPR@FPR=1e-05") == "eval/TPR_at_FPR_1e-05"
    assert scalar_tag("eval", "rank1") == "eval/rank1"
    assert scalar_tag("train", "epoch") is None and scalar_tag("eval", "type") is None
    assert scalar_tag("config_change", "iteration") is None


def test_records_round_trip_through_event_files(tmp_path):
    tb = open_tensorboard(tmp_path, enabled=True)
    assert isinstance(tb, TensorBoardLog) and tb.log_dir == tmp_path / "tensorboard"
    for record in (TRAIN_1, CHANGE, TRAIN_2, EVAL_2):
        tb.log_record(record)
    # Flushed per record: a reader sees everything before the writer is closed.
    _, scalars = _scalars(tmp_path / "tensorboard")
    tb.close()

    expected = {}
    for record in (TRAIN_1, TRAIN_2):
        for key, tag in EXPECTED_TAGS.items():
            if math.isfinite(record[key]):
                expected.setdefault(tag, []).append((record["epoch"], record[key]))
    expected.update({"eval/rank1": [(2, 0.5)], "eval/mAP": [(2, 0.375)],
                     "eval/mINP": [(2, 0.125)], "eval/rank5": [(2, 0.75)],
                     "eval/TPR_at_FPR_0.001": [(2, 0.0625)],
                     "eval/TPR_at_FPR_0.01": [(2, 0.25)]})
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    # NaN and inf values of epoch 2 are skipped, the finite ones of epoch 1 stay.
    assert scalars["diagnostic/erased_loss"] == [(1, 6.5)]
    assert scalars["diagnostic/clean_loss"] == [(1, 6.0)]


def test_log_record_skips_what_is_not_a_scalar(tmp_path):
    tb = open_tensorboard(tmp_path, enabled=True)
    assert tb.log_record(CHANGE) == []
    assert tb.log_record({"type": "train", "loss": 1.0}) == []  # no epoch, no step
    written = tb.log_record({"type": "train", "epoch": 3, "loss": 2.0, "note": "x",
                             "flag": True, "parts": [1.0], "lr": float("-inf")})
    tb.close()
    assert written == ["train/loss"]
    _, scalars = _scalars(tmp_path / "tensorboard")
    assert scalars == {"train/loss": [(3, 2.0)]}


def test_resume_purges_the_interrupted_runs_later_epochs(tmp_path):
    tb = open_tensorboard(tmp_path, enabled=True)
    for epoch in (1, 2, 3):
        tb.log_record({"type": "train", "epoch": epoch, "loss": float(epoch)})
    tb.close()
    # Resumed from the checkpoint of epoch 1: epochs 2 and 3 are trained again.
    tb = open_tensorboard(tmp_path, enabled=True, purge_step=2)
    tb.log_record({"type": "train", "epoch": 2, "loss": 20.0})
    tb.close()
    _, scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 20.0)]


def test_disabled_returns_none_and_creates_nothing(tmp_path):
    run = tmp_path / "run"
    assert open_tensorboard(run, enabled=False) is None
    assert not run.exists()


def test_missing_package_logs_one_line_and_returns_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with caplog.at_level(logging.INFO, logger="esreid.train"):
        assert open_tensorboard(tmp_path / "run", enabled=True) is None
    lines = [r for r in caplog.records if r.name == "esreid.train"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "TensorBoard logging is off" in lines[0].getMessage()
    assert "pip install esreid[tensorboard]" in lines[0].getMessage()
    assert not (tmp_path / "run").exists()


def _tiny_model():
    cfg = load_config("esnet", ["model.backbone=resnet10", "model.pretrained=none"])
    return build_model(cfg.model, 4, cfg.erase)


def test_cgram_overlay_batch_gives_finite_varied_maps_and_keeps_the_mode():
    model = _tiny_model().train()
    images = torch.randn(4, 3, 64, 32)
    pids = torch.tensor([0, 0, 1, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the trainer evaluates under no_grad; CG-RAM must still work
        maps = cgram_overlay_batch(model, images, pids)
    assert model.training
    assert maps.shape == (4, 4, 2)  # ESB at layer4: stride 16 with last stride 1
    assert maps.device.type == "cpu" and not maps.requires_grad
    assert bool(torch.isfinite(maps).all()) and bool((maps >= 0).all())
    assert float(maps.max() - maps.min()) > 0
    # Eval mode: no BatchNorm running statistic changed.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_cgram_overlay_batch_uses_the_aib_without_an_esb():
    cfg = load_config("esnet", ["model.backbone=resnet10", "model.pretrained=none",
                                "model.esb=false", "erase.method=none"])
    model = build_model(cfg.model, 4, cfg.erase).eval()
    maps = cgram_overlay_batch(model, torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1]))
    assert not model.training
    assert maps.shape == (4, 4, 2) and bool(torch.isfinite(maps).all())
    assert float(maps.max() - maps.min()) > 0


def test_overlays_are_written_as_one_grid(tmp_path):
    images = torch.randn(4, 3, 64, 32)
    maps = torch.rand(4, 4, 2)
    tb = open_tensorboard(tmp_path, enabled=True)
    assert tb.log_overlays("cgram/train", images, maps, step=3)
    tb.close()
    acc, _ = _scalars(tmp_path / "tensorboard")
    assert acc.Tags()["images"] == ["cgram/train"]
    (event,) = acc.Images("cgram/train")
    assert event.step == 3
    assert (event.height, event.width) == (2 * 64 + 6, 4 * (32 + 2) + 2)
    with Image.open(io.BytesIO(event.encoded_image_string)) as png:
        grid = np.asarray(png.convert("RGB"))
    # Top row: the denormalised image itself; bottom row: its overlay, which differs.
    first = images[0] * torch.tensor(IMAGENET_STD)[:, None, None] \
        + torch.tensor(IMAGENET_MEAN)[:, None, None]
    first = np.rint(first.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.abs(grid[2:66, 2:34].astype(int) - first.astype(int)).max() <= 1
    assert not np.array_equal(grid[68:132, 2:34], grid[2:66, 2:34])
    assert (grid[0:2] == 255).all()  # white border


def test_overlays_with_non_finite_maps_are_skipped(tmp_path, caplog):
    tb = open_tensorboard(tmp_path, enabled=True)
    maps = torch.rand(2, 4, 2)
    maps[1, 0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="esreid.train"):
        assert not tb.log_overlays("cgram/train", torch.randn(2, 3, 64, 32), maps, step=1)
    tb.close()
    assert "NaN or infinite" in caplog.text
    acc, _ = _scalars(tmp_path / "tensorboard")
    assert acc.Tags()["images"] == []


def _write_png(path, value):
    Image.fromarray(np.full((40, 20, 3), value, dtype=np.uint8)).save(path)
    return str(path)


def test_overlay_batch_picks_readable_pairs_in_record_order(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    records = [
        Record(_write_png(tmp_path / "a0.png", 10), pid=5, camid=0),  # one image only
        Record(str(bad), pid=3, camid=0),
        Record(_write_png(tmp_path / "b0.png", 60), pid=3, camid=1),
        Record(_write_png(tmp_path / "c0.png", 110), pid=7, camid=0),
        Record(_write_png(tmp_path / "b1.png", 160), pid=3, camid=2),
        Record(_write_png(tmp_path / "c1.png", 210), pid=7, camid=1),
        Record(_write_png(tmp_path / "d0.png", 30), pid=9, camid=0),
        Record(_write_png(tmp_path / "d1.png", 90), pid=9, camid=1),
    ]
    images, pids = overlay_batch(records, 64, 32)
    assert pids.tolist() == [3, 3, 7, 7]
    transform = build_transforms(64, 32, is_train=False)
    expected = torch.stack([transform(Image.open(tmp_path / f"{n}.png").convert("RGB"))
                            for n in ("b0", "b1", "c0", "c1")])
    assert torch.equal(images, expected)
    assert overlay_batch(records[:3], 64, 32) is None


def test_a_training_run_logs_its_metrics_and_overlays(tmp_path):
    """A real Trainer run: every numeric value of metrics.jsonl is in the event file at its
    epoch, and each evaluation adds a CG-RAM overlay grid."""
    import json

    from esreid.data.synthetic import generate_synthetic
    from esreid.engine.trainer import Trainer

    root = tmp_path / "synthetic"
    generate_synthetic(root, num_ids=8, height=32, width=16, seed=0, progress=False)
    cfg = load_config("esnet", [
        "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
        f"data.root={root}", "data.height=32", "data.width=16", "data.ids_per_batch=2",
        "data.num_instances=2", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=0",
        "optim.iters_per_epoch=1", "train.progress=false", "train.eval_every=1",
        f"train.output_dir={tmp_path}", "train.run_name=run"])
    Trainer(cfg).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc, scalars = _scalars(run / "tensorboard")
    assert [r["type"] for r in records] == ["train", "eval", "train", "eval"]
    for record in records:
        for key, value in record.items():
            tag = scalar_tag(record["type"], key)
            if tag is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            assert (record["epoch"], pytest.approx(value)) in scalars[tag], (tag, record["epoch"])
    assert [e.step for e in acc.Images("cgram/train")] == [1, 2]
