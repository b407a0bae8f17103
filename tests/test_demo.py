"""The demo end to end (quick mode), the plots of a run folder and the report of runs."""

import contextlib
import io
import json

import pytest

from esreid.cli import main
from esreid.demo import run_demo
from esreid.metrics import load_results
from esreid.plot import plot_run, read_metrics

TINY = ["data.height=32", "data.width=16", "data.synth_ids=12", "data.ids_per_batch=4",
        "data.num_instances=2", "eval.batch_size=64", "train.progress=false"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run_demo(out, quick=True, num_explained=2, extra_settings=TINY)
    return out, summary, printed.getvalue()


def test_demo_writes_both_models(demo, capsys):
    out, summary, _ = demo
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["models"]) == {"base", "esnet"}
    for name in ("base", "esnet"):
        metrics = saved["models"][name]["metrics"]
        assert metrics == summary["models"][name]["metrics"]
        assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["rank1"] <= metrics["rank5"] <= 1.0
        # Each model's own run folder holds the same numbers.
        assert load_results(out / name)["metrics"] == pytest.approx(metrics)
        assert len(saved["heatmaps"][name]) == 2
        for png in saved["heatmaps"][name]:
            assert png.endswith(".png") and (out / "heatmaps").joinpath(png.split("/")[-1]).is_file()
    assert saved["benchmark"]["train_ids"] == 6  # half of 12 synthetic identities
    assert saved["quick"] is True
    assert saved["seeds"] == [0]


def test_demo_table_says_it_rests_on_one_seed(demo):
    _, _, printed = demo
    lines = printed.splitlines()
    note = lines.index(next(line for line in lines if line.startswith("1 seed")))
    assert lines[note] == ("1 seed (train.seed=0): one run per model, so a gap of a few points "
                           "may be seed-to-seed noise; `esreid study` measures it over several "
                           "seeds (docs/experiments.md)")
    assert lines[note + 1] == "normal queries:"
    assert lines[note + 2].startswith("model ") and "rank-1" in lines[note + 2]
    occluded = lines.index("occluded queries (the same queries, one body part of each covered):")
    assert lines[occluded + 1] == lines[note + 2]  # the same table layout
    assert lines[occluded + 3].startswith("Base (Bag of Tricks)")
    assert lines[occluded + 4].startswith("ES-Net")


def test_demo_evaluates_both_models_on_the_occluded_queries(demo):
    out, summary, printed = demo
    saved = json.loads((out / "results.json").read_text())
    manifest = json.loads((out / "synthetic_occluded" / "synthetic.json").read_text())
    assert manifest["params"]["occlude_queries"] == ["head", "upper", "lower", "shoes"]
    for name in ("base", "esnet"):
        occluded = saved["models"][name]["occluded"]
        assert occluded["dataset"] == "synthetic_occluded"
        assert occluded["sizes"] == saved["models"][name]["sizes"]  # same queries and gallery
        assert load_results(out / name / "results_occluded.json")["metrics"] == pytest.approx(
            occluded["metrics"])
        m = occluded["metrics"]
        assert f"{100 * m['rank1']:6.1f}% {100 * m['rank5']:6.1f}%" in printed.split(
            "occluded queries")[1]


def test_plot_and_report_of_demo_runs(demo, capsys):
    out, _, _ = demo
    paths = plot_run(out / "esnet")
    names = {p.name for p in paths}
    assert {"loss.png", "lr.png", "erasing_diagnostic.png", "ppool_l.png", "eval.png"} <= names
    assert all(p.stat().st_size > 1000 for p in paths)
    # Base has no P-pooling, so no l panel.
    assert "ppool_l.png" not in {p.name for p in plot_run(out / "base")}
    records = read_metrics(out / "esnet")
    assert any(r["type"] == "train" and "erased_loss" in r for r in records)

    assert main(["report", str(out / "base"), str(out / "esnet")]) == 0
    report = capsys.readouterr().out
    for label, name in (("Base", "base"), ("ES-Net", "esnet")):
        m = load_results(out / name)["metrics"]
        row = (f"| {label} | {name} (epoch 1) | {100 * m['rank1']:.1f} | {100 * m['mAP']:.1f} | "
               f"{100 * m['rank5']:.1f} | {100 * m['mINP']:.1f} |")
        assert row in report
    assert "(paper)" not in report  # the paper has no rows for the synthetic benchmark


def test_plot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "epoch": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        plot_run(tmp_path)
