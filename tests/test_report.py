"""Results files and the Markdown comparison report."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from esreid.metrics import build_report, load_results, write_results
from esreid.utils import DiskFullError


def market_run(name, config, rank1, mAP, rank5=0.97, mINP=0.5, dataset="market1501", **extra):
    """A market-protocol results dict."""
    return {
        "run": name,
        "config": config,
        "dataset": dataset,
        "protocol": "market",
        "sizes": {"query": 3368, "gallery": 15913},
        "rerank": False,
        "epoch": 120,
        "metrics": {"rank1": rank1, "rank5": rank5, "rank10": 0.99, "mAP": mAP, "mINP": mINP},
        **extra,
    }


def table_row(report, first_cells):
    """The cells of the report's table row that starts with ``first_cells``."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first_cells)] == first_cells:
            return cells
    raise AssertionError(f"no row starting with {first_cells} in:\n{report}")


def section(report, title):
    """The text of one '## title' section."""
    start = report.index(f"## {title}\n")
    end = report.find("\n## ", start + 1)
    return report[start : end if end != -1 else len(report)]


def test_round_trip_and_atomic_write(tmp_path):
    res = market_run("r1", "esnet", np.float32(0.957), np.float64(0.886))
    res["sizes"]["query"] = np.int64(3368)
    (tmp_path / "run1").mkdir()
    write_results(tmp_path / "run1", res)  # a run directory gets results.json
    loaded = load_results(tmp_path / "run1")
    assert loaded["metrics"]["rank1"] == pytest.approx(0.957, abs=1e-7)
    assert loaded["sizes"]["query"] == 3368
    assert load_results(tmp_path / "run1" / "results.json") == loaded
    # Only the final file remains: the temporary was renamed, not left behind.
    assert [p.name for p in (tmp_path / "run1").iterdir()] == ["results.json"]


def test_report_person_rows_and_columns(tmp_path):
    write_results(
        tmp_path / "a.json", market_run("esnet_m", "esnet", 0.9571, 0.8864, 0.9812, 0.6543)
    )
    write_results(tmp_path / "b.json", market_run("base_m", "base", 0.93849, 0.82951, mINP=0.51049))
    report = build_report([tmp_path / "a.json", tmp_path / "b.json"])
    header = table_row(report, ["Method", "Run"])
    assert header == ["Method", "Run", "rank-1", "mAP", "rank-5", "mINP"]
    assert table_row(report, ["ES-Net", "esnet_m (epoch 120)"])[2:] == [
        "95.7",
        "88.6",
        "98.1",
        "65.4",
    ]
    assert table_row(report, ["Base", "base_m (epoch 120)"])[2:] == ["93.8", "83.0", "97.0", "51.0"]
    # Paper rows for Market-1501 follow, marked (paper), from Tables I-III.
    assert table_row(report, ["ES-Net (paper)"]) == [
        "ES-Net (paper)",
        "Table I",
        "95.7",
        "88.6",
        "-",
        "-",
    ]
    assert table_row(report, ["Base+BESM+GMP (paper)"])[2:4] == ["94.2", "84.4"]
    assert table_row(report, ["ESB (R=20%, P=0.5) (paper)"])[2:4] == ["94.6", "86.2"]
    assert (
        report.index("| ES-Net | esnet_m")
        < report.index("| Base | base_m")
        < report.index("(paper)")
    )
    without = build_report([tmp_path / "a.json"], with_paper=False)
    assert "(paper)" not in without and "esnet_m" in without


def test_report_groups_by_dataset_with_dataset_specific_paper_rows(tmp_path):
    write_results(
        tmp_path / "duke.json", market_run("d", "esb", 0.88, 0.77, dataset="dukemtmc", rerank=True)
    )
    write_results(
        tmp_path / "msmt.json", market_run("m", "base_random_erasing", 0.7, 0.45, dataset="msmt17")
    )
    veri = market_run("v", "vehicle", 0.9701, 0.8188, rank5=0.9849, dataset="veri776")
    write_results(tmp_path / "veri.json", veri)
    vid = {
        "run": "vid",
        "config": "vehicle",
        "dataset": "vehicleid",
        "protocol": "vehicleid",
        "sizes": {"test": 19777},
        "rerank": False,
        "epoch": 60,
        "metrics": {
            "test_size": 2400,
            "rank1": 0.7712,
            "rank1_std": 0.0043,
            "rank5": 0.9061,
            "rank5_std": 0.0021,
            "mAP": 0.82,
        },
    }
    write_results(tmp_path / "vid.json", vid)
    paths = [tmp_path / n for n in ("vid.json", "veri.json", "msmt.json", "duke.json")]
    report = build_report(paths)
    titles = [line for line in report.splitlines() if line.startswith("## ")]
    assert titles == ["## DukeMTMC-reID", "## MSMT17", "## VeRi-776", "## VehicleID (Large, 2400)"]

    duke = section(report, "DukeMTMC-reID")
    assert table_row(duke, ["ESB (R=10%, P=0.3)", "d (epoch 120, re-ranked)"])[2:4] == [
        "88.0",
        "77.0",
    ]
    assert table_row(duke, ["ES-Net (paper)"])[2:4] == ["89.2", "78.8"]
    assert "Base+Random Erasing (paper)" not in duke  # Table V has no DukeMTMC column

    msmt = section(report, "MSMT17")
    assert table_row(msmt, ["Base+Random Erasing", "m (epoch 120)"])[2:4] == ["70.0", "45.0"]
    assert table_row(msmt, ["Base+Random Erasing (paper)"])[2:4] == ["72.8", "48.1"]
    assert table_row(msmt, ["AIB+ESB (R=10%, P=0.3) (paper)"])[2:4] == ["81.0", "56.8"]

    veri_sec = section(report, "VeRi-776")
    assert table_row(veri_sec, ["Method", "Run"]) == ["Method", "Run", "rank-1", "rank-5", "mAP"]
    assert table_row(veri_sec, ["ES-Net", "v (epoch 120)"])[2:] == ["97.0", "98.5", "81.9"]
    assert table_row(veri_sec, ["ESB (paper)"])[2:] == ["96.4", "98.2", "79.2"]

    vsec = section(report, "VehicleID (Large, 2400)")
    assert table_row(vsec, ["Method", "Run"]) == ["Method", "Run", "rank-1", "rank-5"]
    assert table_row(vsec, ["ES-Net", "vid (epoch 60)"])[2:] == ["77.1 ± 0.4", "90.6 ± 0.2"]
    assert table_row(vsec, ["ES-Net (paper)"])[2:] == ["76.9", "90.7"]
    assert table_row(vsec, ["Base (paper)"])[2:] == ["73.4", "85.7"]
    assert "83.6" not in vsec  # the Small-subset figures belong to another section


def test_missing_and_malformed_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"results file not found: {missing}")):
        load_results(missing)
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no results.json in run directory {tmp_path}")
    ):
        load_results(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"run": "x", ')
    with pytest.raises(ValueError, match=re.escape(f"{bad}: malformed JSON (") + ".*line 1"):
        load_results(bad)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: malformed JSON")):
        build_report([bad])


def test_schema_errors(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"run": "x", "dataset": "market1501", "protocol": "market"}))
    with pytest.raises(ValueError, match=re.escape(f"{p}: missing required key 'metrics'")):
        load_results(p)
    res = market_run("x", "base", 95.7, 0.88)  # a percentage where a fraction belongs
    with pytest.raises(
        ValueError, match=r"metrics\['rank1'\] must be a fraction in \[0, 1\], got 95.7"
    ):
        write_results(tmp_path / "w.json", res)
    assert not (tmp_path / "w.json").exists()
    res = market_run("x", "base", 0.9, 0.8)
    res["protocol"] = "cuhk"
    with pytest.raises(ValueError, match="protocol must be one of market, vehicleid, got 'cuhk'"):
        write_results(tmp_path / "w.json", res)
    with pytest.raises(ValueError, match="at least one results file"):
        build_report([])


def test_write_results_uses_the_shared_atomic_write(tmp_path, monkeypatch):
    # The results file gets the umask's mode like any other file of a run (not mkstemp's 0600).
    previous = os.umask(0o022)
    try:
        write_results(tmp_path, market_run("r1", "esnet", 0.9, 0.8))
    finally:
        os.umask(previous)
    target = tmp_path / "results.json"
    assert target.stat().st_mode & 0o777 == 0o644

    # A full disk is reported in one line and leaves the previous results in place.
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(DiskFullError) as err:
        write_results(tmp_path, market_run("r2", "esnet", 0.95, 0.85))
    assert str(err.value) == (
        f"no space left on device while writing {target}; the previous {target} is intact"
    )
    monkeypatch.undo()
    assert load_results(tmp_path)["run"] == "r1"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_table_vii_rows_sit_next_to_the_agw_presets(tmp_path):
    write_results(tmp_path / "a.json", market_run("agw_m", "agw", 0.951, 0.878))
    write_results(tmp_path / "b.json", market_run("esnet_agw_m", "esnet_agw", 0.953, 0.891,
                                                 dataset="msmt17"))
    report = build_report([tmp_path / "a.json", tmp_path / "b.json"])
    market, msmt = section(report, "Market-1501"), section(report, "MSMT17")
    assert table_row(market, ["AGW", "agw_m (epoch 120)"])[2:4] == ["95.1", "87.8"]
    assert table_row(market, ["AGW (paper)"])[:4] == ["AGW (paper)", "Table VII", "95.1", "87.8"]
    assert table_row(market, ["ES-Net* (on AGW) (paper)"])[2:4] == ["95.3", "89.1"]
    assert table_row(msmt, ["ES-Net* (on AGW)", "esnet_agw_m (epoch 120)"])[2:4] == ["95.3", "89.1"]
    assert table_row(msmt, ["ES-Net* (on AGW) (paper)"])[2:4] == ["77.9", "55.6"]
    assert table_row(msmt, ["AGW (paper)"])[2:4] == ["68.3", "49.3"]


def seed_run(folder, preset, seed, rank1, mAP, overrides=(), **extra):
    """A hand-made run folder: the config.yaml a run of ``preset`` with ``train.seed=seed``
    writes, and its results.json."""
    from esreid.config import load_config, save_config

    folder.mkdir(parents=True)
    cfg = load_config(preset, [f"train.seed={seed}", f"train.run_name={folder.name}",
                               f"train.output_dir={folder.parent}", *overrides])
    save_config(cfg, folder / "config.yaml")
    write_results(folder, market_run(folder.name, preset, rank1, mAP, **extra))
    return folder


def test_report_puts_the_seeds_of_one_experiment_on_one_row(tmp_path):
    runs = [
        seed_run(tmp_path / "base_s0", "base", 0, 0.90, 0.80, mINP=0.50),
        seed_run(tmp_path / "base_s1", "base", 1, 0.92, 0.81, mINP=0.52),
        # Where the data lives and how the run is kept do not make another experiment.
        seed_run(tmp_path / "base_s2", "base", 2, 0.94, 0.85, mINP=0.54,
                 overrides=["data.root=/elsewhere", "data.num_workers=8",
                            "train.checkpoint_every=5"]),
        seed_run(tmp_path / "esnet_s0", "esnet", 0, 0.95, 0.88),
        # Another schedule is another experiment, even with the same preset.
        seed_run(tmp_path / "base_long", "base", 0, 0.96, 0.90, overrides=["optim.epochs=200"]),
    ]
    loose = tmp_path / "loose.json"  # no config.yaml beside it: a row of its own
    write_results(loose, market_run("loose", "base", 0.5, 0.4))
    report = build_report([*runs, loose])
    assert table_row(report, ["Method", "Run"]) == [
        "Method", "Run", "Seeds", "rank-1", "mAP", "rank-5", "mINP"]
    # Sample std (n - 1): rank-1 90/92/94 -> 2.0; mAP 80/81/85 -> sqrt(7) = 2.6.
    assert table_row(report, ["Base", "base_s0, base_s1, base_s2 (epoch 120)"])[2:] == [
        "3", "92.0 ± 2.0", "82.0 ± 2.6", "97.0 ± 0.0", "52.0 ± 2.0"]
    assert table_row(report, ["ES-Net", "esnet_s0 (epoch 120)"])[2:] == [
        "1", "95.0", "88.0", "97.0", "50.0"]
    assert table_row(report, ["Base", "base_long (epoch 120)"])[2:4] == ["1", "96.0"]
    assert table_row(report, ["Base", "loose (epoch 120)"])[2:4] == ["1", "50.0"]
    assert table_row(report, ["ES-Net (paper)"])[2:4] == ["-", "95.7"]
    # The group's row stands where its first run was given.
    assert report.index("base_s0, base_s1") < report.index("esnet_s0") < report.index("loose")


def test_report_has_no_seeds_column_without_repeated_seeds(tmp_path):
    runs = [seed_run(tmp_path / "base_s0", "base", 0, 0.90, 0.80),
            seed_run(tmp_path / "esnet_s0", "esnet", 0, 0.95, 0.88)]
    report = build_report(runs, with_paper=False)
    assert table_row(report, ["Method", "Run"]) == [
        "Method", "Run", "rank-1", "mAP", "rank-5", "mINP"]
    assert table_row(report, ["Base", "base_s0 (epoch 120)"])[2:4] == ["90.0", "80.0"]


def test_report_says_when_grouped_runs_repeat_a_seed_and_keeps_evaluations_apart(tmp_path):
    runs = [seed_run(tmp_path / "a", "esnet", 3, 0.90, 0.80),
            seed_run(tmp_path / "b", "esnet", 3, 0.92, 0.82),
            seed_run(tmp_path / "c", "esnet", 4, 0.94, 0.84, rerank=True)]
    # Another evaluation of a run's checkpoint (a results file beside its config.yaml).
    write_results(tmp_path / "c" / "results_occluded.json",
                  market_run("c", "esnet", 0.5, 0.4, dataset="synthetic_occluded"))
    report = build_report([*runs, tmp_path / "c" / "results_occluded.json"], with_paper=False)
    assert table_row(report, ["ES-Net", "a, b (epoch 120)"])[2:4] == ["1 (2 runs)", "91.0 ± 1.4"]
    # Re-ranked results are another evaluation: not averaged with the others.
    assert table_row(report, ["ES-Net", "c (epoch 120, re-ranked)"])[2:4] == ["1", "94.0"]
    occluded = section(report, "synthetic_occluded")
    assert table_row(occluded, ["ES-Net", "c (epoch 120)"])[2:] == ["50.0", "40.0", "97.0", "50.0"]


def test_report_of_vehicleid_seeds_gives_the_std_over_seeds(tmp_path):
    from esreid.config import load_config, save_config

    paths = []
    for seed, rank1 in ((0, 0.80), (1, 0.84)):
        folder = tmp_path / f"v{seed}"
        folder.mkdir()
        save_config(load_config("vehicle", [f"train.seed={seed}"]), folder / "config.yaml")
        write_results(folder, {
            "run": folder.name, "config": "vehicle", "dataset": "vehicleid",
            "protocol": "vehicleid", "epoch": 60,
            "metrics": {"test_size": 800, "rank1": rank1, "rank1_std": 0.01, "rank5": 0.95,
                        "rank5_std": 0.005, "mAP": 0.85}})
        paths.append(folder)
    report = build_report(paths, with_paper=False)
    assert table_row(report, ["ES-Net", "v0, v1 (epoch 60)"])[2:] == [
        "2", "82.0 ± 2.8", "95.0 ± 0.0"]
