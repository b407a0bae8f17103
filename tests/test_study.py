"""The multi-seed study: its summary arithmetic, and one tiny study end to end."""

from __future__ import annotations

import json

import pytest
import torch

from esreid.cli import main
from esreid.config import ConfigError, load_config
from esreid.data import load_dataset
from esreid.engine.checkpoint import model_from_checkpoint
from esreid.engine.evaluate import evaluate_model
from esreid.metrics import load_results
from esreid.study import OCCLUDED_RESULTS, format_summary, run_study, summarize

TINY = ["model.backbone=resnet10", "data.height=32", "data.width=16", "data.synth_ids=12",
        "data.ids_per_batch=4", "data.num_instances=2", "data.num_workers=0",
        "optim.epochs=1", "optim.iters_per_epoch=1", "optim.warmup_epochs=0",
        "optim.milestones=[]", "eval.batch_size=64", "train.diagnose_erasing=false"]


def _res(rank1, mAP):
    return {"metrics": {"rank1": rank1, "mAP": mAP}}


def test_summary_means_stds_and_paired_differences():
    runs = {
        "base": {0: {"normal": _res(0.50, 0.40), "occluded": _res(0.30, 0.20)},
                 1: {"normal": _res(0.52, 0.42), "occluded": _res(0.34, 0.22)},
                 2: {"normal": _res(0.54, 0.44), "occluded": _res(0.32, 0.24)}},
        "esnet": {0: {"normal": _res(0.51, 0.40), "occluded": _res(0.35, 0.25)},
                  1: {"normal": _res(0.52, 0.43), "occluded": _res(0.38, 0.27)},
                  2: {"normal": _res(0.56, 0.45), "occluded": _res(0.38, 0.30)},
                  3: {"normal": _res(0.99, 0.99), "occluded": _res(0.99, 0.99)}},
    }
    summary = summarize(runs)
    base = summary["models"]["base"]
    assert base["seeds"] == [0, 1, 2]
    assert base["normal"]["rank1"]["mean"] == pytest.approx(0.52)
    assert base["normal"]["rank1"]["std"] == pytest.approx(0.02)  # sample std (n - 1)
    assert base["occluded"]["rank1"]["stderr"] == pytest.approx(0.02 / 3**0.5)
    assert summary["models"]["esnet"]["normal"]["rank1"]["n"] == 4

    diff = summary["differences"]["esnet"]
    assert diff["seeds"] == [0, 1, 2]  # only the seeds both models have are paired
    occluded = diff["occluded"]["rank1"]
    assert occluded["values"] == pytest.approx([0.05, 0.04, 0.06])
    assert occluded["mean"] == pytest.approx(0.05) and occluded["std"] == pytest.approx(0.01)
    assert occluded["reliable"]  # 0.05 is far more than 2 standard errors (0.012) from 0
    normal = diff["normal"]["rank1"]
    assert normal["values"] == pytest.approx([0.01, 0.0, 0.02]) and not normal["reliable"]
    gain = diff["occluded_gain"]["rank1"]
    assert gain["values"] == pytest.approx([0.04, 0.04, 0.04])

    table = format_summary(summary)
    assert "| Base | 3 | 52.0 ± 2.0 | 42.0 ± 2.0 | 32.0 ± 2.0 | 22.0 ± 2.0 |" in table
    assert "| ES-Net − Base | occluded | +5.0 ± 1.0 * [+5.0, +4.0, +6.0] |" in table
    assert "| ES-Net − Base | normal | +1.0 ± 1.0 [+1.0, +0.0, +2.0] |" in table

    # Without the reference model there is nothing to pair.
    assert summarize({"esnet": runs["esnet"]})["differences"] == {}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "study"
    summary = run_study(out, models=["base", "esnet"], seeds=[0], settings=TINY)
    return out, summary


def test_a_tiny_study_writes_runs_summary_table_and_figure(tiny_study, capsys):
    out, summary = tiny_study
    assert set(summary["models"]) == {"base", "esnet"}
    saved = json.loads((out / "study.json").read_text())
    assert saved["differences"]["esnet"]["seeds"] == [0]
    assert (out / "study.md").read_text() == format_summary(summary)
    assert (out / "study.png").stat().st_size > 5000
    for preset in ("base", "esnet"):
        run = out / "runs" / f"{preset}_seed0"
        normal, occluded = load_results(run), load_results(run / OCCLUDED_RESULTS)
        assert normal["dataset"] == "synthetic" and occluded["dataset"] == "synthetic_occluded"
        assert occluded["sizes"] == normal["sizes"] and occluded["epoch"] == normal["epoch"] == 1
        assert saved["runs"][preset]["0"]["occluded"] == occluded["metrics"]
        assert summary["models"][preset]["occluded"]["mAP"]["values"] == [
            occluded["metrics"]["mAP"]]
    # What the ESB saw, from each run's last training record.
    diagnostics = summary["diagnostics"]
    assert {"id_aib", "id_esb", "erased_frac", "ppool_l_esb"} <= set(diagnostics["esnet"])
    assert "id_esb" not in diagnostics["base"] and "id_aib" in diagnostics["base"]
    assert diagnostics["esnet"]["ppool_l_esb"] == pytest.approx(
        saved["runs"]["esnet"]["0"]["last_epoch"]["ppool_l_esb"])
    assert "| ES-Net |" in (out / "study.md").read_text().split("ppool_l_esb")[-1]
    manifest = json.loads((out / "synthetic_occluded" / "synthetic.json").read_text())
    assert manifest["params"]["occlude_queries"] == ["head", "upper", "lower", "shoes"]
    assert manifest["params"]["height"] == 32 and manifest["params"]["num_ids"] == 12


def test_the_occluded_evaluation_reuses_the_gallery_without_changing_the_result(tiny_study):
    out, _ = tiny_study
    checkpoint = out / "runs" / "esnet_seed0" / "checkpoints" / "last.pt"
    cfg = load_config(out / "runs" / "esnet_seed0" / "config.yaml")
    model = model_from_checkpoint(checkpoint, cfg)
    normal = load_dataset("synthetic", out / "synthetic")
    occluded = load_dataset("synthetic", out / "synthetic_occluded")
    feats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        evaluate_model(model, normal, cfg, features_out=feats)
        full = evaluate_model(model, occluded, cfg)
        reused = evaluate_model(model, occluded, cfg, gallery_features=feats["gallery"])
    assert reused["metrics"] == pytest.approx(full["metrics"])
    assert full["metrics"] == pytest.approx(load_results(out / "runs" / "esnet_seed0" /
                                                         OCCLUDED_RESULTS)["metrics"])
    with pytest.raises(ValueError, match="gallery_features: 3 rows for the"):
        evaluate_model(model, occluded, cfg, gallery_features=feats["gallery"][:3])


def test_running_the_study_again_trains_nothing(tiny_study):
    out, summary = tiny_study
    run = out / "runs" / "base_seed0"
    stamps = {p: p.stat().st_mtime_ns for p in
              (run / "checkpoints" / "last.pt", run / "results.json", run / OCCLUDED_RESULTS)}
    again = run_study(out, models=["base", "esnet"], seeds=[0], settings=TINY)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["models"] == summary["models"]
    # Other settings in the same folder are refused, naming what differs.
    with pytest.raises(ConfigError, match=r"base_seed0 holds a run with other settings than "
                                          r"this study's \(loss.margin: 0.3 -> 0.5\)"):
        run_study(out, models=["base"], seeds=[0], settings=[*TINY, "loss.margin=0.5"])


@pytest.mark.parametrize(("args", "message"), [
    (["--seeds", "1", "1"], "--seeds: each seed once"),
    (["--seeds", "-2"], "--seeds must be non-negative integers"),
    (["--models", "base", "base"], "--models: each preset once"),
    (["--models", "nope"], "unknown preset 'nope'"),
    (["--set", "train.seed=4"], "--set train.seed: the study sets it for every run"),
])
def test_bad_study_options_are_named(tmp_path, capsys, args, message):
    assert main(["study", "--out", str(tmp_path / "s"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_summary_over_three_query_sets_pairs_every_set_and_its_gain():
    runs = {
        "base": {s: {"normal": _res(0.9, 0.8), "changed": _res(0.1 + s / 100, 0.1),
                     "occluded": _res(0.05, 0.05)} for s in (0, 1)},
        "esnet": {s: {"normal": _res(0.88, 0.8), "changed": _res(0.3 + s / 50, 0.2),
                      "occluded": _res(0.1, 0.05)} for s in (0, 1)},
    }
    summary = summarize(runs, query_sets=("normal", "changed", "occluded"),
                        labels={"esnet": "ES-Net"})
    diff = summary["differences"]["esnet"]
    assert diff["changed"]["rank1"]["values"] == pytest.approx([0.2, 0.21])
    assert diff["changed_gain"]["rank1"]["values"] == pytest.approx([0.22, 0.23])
    assert diff["occluded_gain"]["mAP"]["values"] == pytest.approx([0.0, 0.0])
    assert summary["query_sets"] == ["normal", "changed", "occluded"]
    summary["titles"] = {"changed": "changed upper", "occluded": "occluded upper"}
    table = format_summary(summary)
    assert ("| Model | Seeds | rank-1 (normal) | mAP (normal) | rank-1 (changed upper) | "
            "mAP (changed upper) | rank-1 (occluded upper) | mAP (occluded upper) |") in table
    assert "| ES-Net − Base | changed upper − normal | +22.5 ± 0.7 * [+22.0, +23.0] |" in table


MECHANISM_TINY = [s for s in TINY if not s.startswith("data.height") and
                  not s.startswith("data.width")] + ["data.height=48", "data.width=24",
                                                     "data.synth_ids=40"]


def test_a_tiny_mechanism_study_evaluates_three_query_sets_and_measures_targeting(tmp_path):
    from esreid.data.synthetic import part_boxes

    out = tmp_path / "mech"
    summary = run_study(out, models=["base", "esnet", "esnet_randmap"], seeds=[0],
                        settings=MECHANISM_TINY, design="mechanism")
    assert summary["design"] == "mechanism"
    assert summary["query_sets"] == ["normal", "changed", "occluded"]
    params = json.loads((out / "synthetic_changed" / "synthetic.json").read_text())["params"]
    assert params["dominant_cue"] == "upper" and params["change_queries"] == "upper"
    for key in ("base", "esnet", "esnet_randmap"):
        run = out / "runs" / f"{key}_seed0"
        for name, dataset in (("changed", "synthetic_changed"), ("occluded", "synthetic_occluded")):
            result = load_results(run / f"results_{name}.json")
            assert result["dataset"] == dataset and result["query_set"] == name
            assert summary["models"][key][name]["rank1"]["values"] == [result["metrics"]["rank1"]]
    assert load_config(out / "runs" / "esnet_randmap_seed0" / "config.yaml").erase.method == "randmap"
    # Targeting: ES-Net and its random-map control, not Base (it erases nothing).
    targeting = summary["targeting"]
    assert set(targeting["models"]) == {"esnet", "esnet_randmap"} and targeting["part"] == "upper"
    data = load_dataset("synthetic", out / "synthetic")
    by_pid = {}
    for r in data.train:
        by_pid.setdefault(r.pid, []).append(r)
    files = [r.path for pid in sorted(by_pid)[:16] for r in by_pid[pid][:2]]
    assert targeting["images"] == len(files)
    boxes = part_boxes(out / "synthetic", "upper", [p.split("/")[-1] for p in files])
    area = sum((b - t) * (r - lft) for t, b, lft, r in boxes.values()) / (len(files) * 48 * 24)
    assert targeting["chance"] == pytest.approx(area)
    for figures in targeting["models"].values():
        for key in ("inside_train", "inside_eval", "inside_random", "iou", "zero_maps"):
            assert 0.0 <= figures[key]["mean"] <= 1.0, key
    assert "Targeting: the share of the erased pixels inside the upper part's box" in (
        out / "study.md").read_text()
    # The targeting figure: the two charts over two rows of the first erasing run's examples
    # (8 images: 9 x 9 inches at 120 dpi); without examples only the charts (9 x 3.6).
    from PIL import Image

    from esreid.study import plot_targeting
    with Image.open(out / "targeting.png") as png:
        assert png.format == "PNG" and png.size == (1080, 1080)
    bare = plot_targeting(targeting, {"esnet": "ES-Net"}, tmp_path / "bare.png")
    with Image.open(bare) as png:
        assert png.size == (1080, 432)
    with pytest.raises(ConfigError, match="--design: 'other' is not one of occlusion, mechanism"):
        run_study(out, design="other")
