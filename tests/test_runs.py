"""Run folders through the CLI: never silently overwritten or mixed, resumed from their own
config, finished runs left alone, evaluation results beside (not over) results.json."""

import json
import os
import shutil

import pytest
import torch
import yaml
from fixture_trees import write_market1501

from esreid.cli import main
from esreid.data import load_dataset
from esreid.data.synthetic import generate_synthetic

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "optim.milestones=[1]",
    "optim.iters_per_epoch=2", "train.progress=false", "eval.batch_size=64",
    "train.checkpoint_every=1",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, num_ids=12, height=32, width=16, seed=0, progress=False)
    return root


def _train(tmp_path, synth_root, *extra, flags=()):
    return main(["train", "--config", "esnet", *flags, "--set", *TINY, f"data.root={synth_root}",
                 f"train.output_dir={tmp_path}", *extra])


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synth_root):
    """A tiny finished run (2 epochs, evaluated), copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs")
    assert _train(out, synth_root, "train.run_name=done") == 0
    return out / "done"


def _copy_run(finished_run, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(finished_run, run)
    return run


def test_train_into_an_existing_run_refuses_and_changes_nothing(finished_run, tmp_path,
                                                                synth_root, capsys):
    run = _copy_run(finished_run, tmp_path)
    before = _snapshot(run)
    # An invalid config is refused before anything is written (the reproduction).
    assert _train(tmp_path, synth_root, "train.run_name=done", "loss.label_smooth=2") == 2
    assert "loss.label_smooth" in capsys.readouterr().err
    assert _snapshot(run) == before
    # A valid config is refused too: the folder holds a run.
    assert _train(tmp_path, synth_root, "train.run_name=done", "loss.label_smooth=0.2") == 2
    err = capsys.readouterr().err
    assert f"run folder {run} already holds a run" in err
    assert "--resume auto" in err and "train.run_name=NEW" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-2].startswith("esreid train: error: run folder")
    assert _snapshot(run) == before


def test_overwrite_clears_the_whole_folder_first(finished_run, tmp_path, synth_root):
    run = _copy_run(finished_run, tmp_path)
    (run / "stray_note.txt").write_text("from the old run")
    assert _train(tmp_path, synth_root, "train.run_name=done", "loss.label_smooth=0.2",
                  flags=["--overwrite"]) == 0
    assert not (run / "stray_note.txt").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"]["label_smooth"] == 0.2
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["config"]["loss"]["label_smooth"] == 0.2
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 2]  # two train records and one eval record, nothing older


def test_resume_auto_uses_the_runs_own_config(finished_run, tmp_path, synth_root, capsys):
    """The README's `esreid train --config esnet --resume auto` on a run trained with --set:
    only the keys that locate the folder are given, the rest comes from config.yaml."""
    run = _copy_run(finished_run, tmp_path)
    saved = (run / "config.yaml").read_text()
    code = main(["train", "--config", "esnet", "--resume", "auto", "--set",
                 f"train.output_dir={tmp_path}", "train.run_name=done", "optim.epochs=3"])
    assert code == 0, capsys.readouterr().err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["name"] == "synthetic" and cfg["model"]["backbone"] == "resnet10"
    assert cfg["optim"]["epochs"] == 3
    assert yaml.safe_load(saved)["optim"]["epochs"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    change = [r for r in records if r["type"] == "config_change"]
    assert len(change) == 1 and change[0]["epoch"] == 2 and change[0]["forced"] is False
    # The run was copied elsewhere: its new location is saved but is not a change of the run.
    assert change[0]["changes"] == {"optim.epochs": [2, 3]}
    assert cfg["train"]["output_dir"] == str(tmp_path)
    assert [r["epoch"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert json.loads((run / "results.json").read_text())["epoch"] == 3


def test_resume_with_an_experiment_change_needs_force(finished_run, tmp_path, synth_root, capsys):
    run = _copy_run(finished_run, tmp_path)
    before = _snapshot(run)
    args = ["train", "--resume", str(run), "--set", "erase.ratio=0.3", "optim.epochs=3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "erase.ratio: 0.2 -> 0.3" in err and "--force" in err
    assert "optim.epochs" not in err.split("--force")[0]  # a free key is not a reason to refuse
    assert _snapshot(run) == before
    assert main([*args, "--force"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    change = next(r for r in records if r["type"] == "config_change")
    assert change["forced"] is True
    assert change["changes"] == {"erase.ratio": [0.2, 0.3], "optim.epochs": [2, 3]}


def test_resuming_a_finished_run_is_a_no_op(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path)
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished" in (run / "log.txt").read_text().splitlines()[-1]
    after = _snapshot(run)
    assert after.pop("log.txt") != before.pop("log.txt")
    assert after == before  # the final eval record is not written twice, nothing is retrained


def test_resume_falls_back_to_prev_when_last_is_truncated(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    stale = run / "checkpoints" / ".last.pt.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", str(run)]) == 0
    log_text = (run / "log.txt").read_text()
    assert f"not an esreid checkpoint: {last}" in log_text
    assert f"resuming from the previous checkpoint {run / 'checkpoints' / 'prev.pt'}" in log_text
    assert "resumed from" in log_text and "at epoch 1" in log_text
    assert not stale.exists()
    assert torch.load(last, weights_only=False)["epoch"] == 2


def test_resume_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--resume", "auto"]) == 2
    assert "--resume auto finds the run folder from --config" in capsys.readouterr().err
    assert main(["train", "--config", "esnet", "--resume", "auto",
                 "--set", f"train.output_dir={tmp_path}"]) == 2
    assert f"nothing to resume: {tmp_path / 'esnet'} holds no run" in capsys.readouterr().err
    loose = tmp_path / "loose.pt"
    loose.write_bytes(b"x")
    assert main(["train", "--resume", str(loose)]) == 2
    assert "is not inside a run folder" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such run folder or checkpoint" in capsys.readouterr().err


def test_evaluate_never_overwrites_the_runs_results(finished_run, tmp_path, synth_root, capsys):
    run = _copy_run(finished_run, tmp_path)
    results = (run / "results.json").read_bytes()
    ckpt = run / "checkpoints" / "last.pt"
    # --checkpoint alone: the config comes from the checkpoint.
    assert main(["evaluate", "--checkpoint", str(ckpt), "--set", f"data.root={synth_root}"]) == 0
    assert f"results: {run / 'results_synthetic.json'}" in capsys.readouterr().out
    assert (run / "results.json").read_bytes() == results
    first = json.loads((run / "results_synthetic.json").read_text())
    assert first["metrics"] == pytest.approx(json.loads(results)["metrics"], abs=1e-6)
    assert first["epoch"] == 2 and first["checkpoint"] == str(ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--set", "eval.rerank=true"]) == 0
    assert (run / "results_synthetic_rerank.json").is_file()
    settings = json.loads((run / "results_synthetic_rerank.json").read_text())["rerank_settings"]
    assert (settings["k1"], settings["k2"], settings["lambda"]) == (20, 6, 0.3)
    assert (run / "results.json").read_bytes() == results
    # A checkpoint outside a run folder: results beside it, not in its grandparent.
    elsewhere = tmp_path / "shared" / "models"
    elsewhere.mkdir(parents=True)
    shutil.copy(ckpt, elsewhere / "model.pt")
    assert main(["evaluate", "--checkpoint", str(elsewhere / "model.pt")]) == 0
    assert (elsewhere / "results_synthetic.json").is_file()
    assert not (tmp_path / "shared" / "results.json").exists()


@pytest.mark.parametrize("kind", ["folder", "random", "empty"])
def test_files_that_are_not_checkpoints(tmp_path, capsys, kind):
    path = tmp_path / "model.pt"
    if kind == "folder":
        path.mkdir()
        reason = "it is a folder"
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
        reason = "truncated or not a PyTorch file"
    else:
        path.write_bytes(b"")
        reason = "empty file"
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()[0]
    assert err.startswith(f"esreid evaluate: error: not an esreid checkpoint: {path} ({reason}")


def test_written_files_follow_the_umask(tmp_path, synth_root):
    old = os.umask(0o022)
    try:
        assert _train(tmp_path, synth_root, "train.run_name=modes", "optim.epochs=1") == 0
    finally:
        os.umask(old)
    run = tmp_path / "modes"
    for name in ("config.yaml", "results.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert oct((run / name).stat().st_mode & 0o777) == oct(0o644), name
    assert oct((run / "checkpoints").stat().st_mode & 0o777) == oct(0o755)


def test_output_dir_with_home_and_variables(tmp_path, synth_root, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RUNS_NAME", "myruns")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "esnet", "--no-eval", "--set", *TINY, "optim.epochs=1",
                 f"data.root={synth_root}", "train.output_dir=~/$RUNS_NAME"]) == 0
    assert (tmp_path / "home" / "myruns" / "esnet" / "checkpoints" / "last.pt").is_file()
    assert not (tmp_path / "~").exists()


def test_query_and_gallery_without_shared_identity_fail_before_training(tmp_path, capsys):
    bench = write_market1501(tmp_path)
    for image in (bench / "query").iterdir():  # give every query an identity the gallery lacks
        image.rename(image.with_name("9999" + image.name[4:]))
    out = tmp_path / "runs"
    assert main(["train", "--config", "base", "--set", *TINY, "data.name=market1501",
                 "data.ids_per_batch=2", "data.check_stats=false", f"data.root={tmp_path}",
                 f"train.output_dir={out}"]) == 2
    assert "query and gallery share no identity" in capsys.readouterr().err
    assert not out.exists()  # nothing was written


def test_sweep_checks_every_value_before_training(tmp_path, synth_root, capsys):
    assert main(["sweep", "--config", "esnet", "--param", "erase.ratio", "--values", "0.1", "7",
                 "--set", *TINY, f"data.root={synth_root}", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "--values 7" in err and "erase.ratio" in err
    assert not any(tmp_path.iterdir())


def test_explain_writes_into_the_run_folder(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path)
    assert main(["explain", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                 "--queries", "1"]) == 0
    assert [p.name for p in (run / "explanations").iterdir()] == ["query00.png"]


def _broken_copy(synth_root, tmp_path):
    from fixture_trees import break_image

    root = tmp_path / "synthetic"
    shutil.copytree(synth_root, root)
    train = sorted((root / "bounding_box_train").glob("*.jpg"))[3]
    gallery = [p for p in sorted((root / "bounding_box_test").glob("*.jpg"))
               if not p.name.startswith(("-1", "0000"))][5]  # an identity's image, not junk
    return root, break_image(train, "truncated"), break_image(gallery, "empty")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_stops_the_run_with_one_line(synth_root, tmp_path, capsys, workers):
    root, train_image, _ = _broken_copy(synth_root, tmp_path)
    assert main(["train", "--config", "esnet", "--set", *TINY, f"data.root={root}",
                 f"data.num_workers={workers}", f"train.output_dir={tmp_path / 'runs'}",
                 "optim.iters_per_epoch=100"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Original" not in err
    lines = err.strip().splitlines()
    assert lines[-2].startswith(f"esreid train: error: cannot read image {train_image}: ")
    assert lines[-1] == "(set ESREID_DEBUG=1 for the traceback)"


def test_skipped_images_are_counted_in_metrics_and_results(synth_root, tmp_path):
    root, train_image, gallery_image = _broken_copy(synth_root, tmp_path)
    assert main(["train", "--config", "esnet", "--set", *TINY, f"data.root={root}",
                 "data.on_bad_image=skip", f"train.output_dir={tmp_path / 'runs'}",
                 "train.run_name=skip", "optim.iters_per_epoch=100"]) == 0
    run = tmp_path / "runs" / "skip"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records if r["type"] == "train"] == [1, 1]
    results = json.loads((run / "results.json").read_text())
    assert results["skipped_images"] == {"train": 1, "test": 1, "test_paths": [str(gallery_image)]}
    assert results["sizes"]["gallery"] == len(load_dataset("synthetic", root).gallery) - 1
    log_text = (run / "log.txt").read_text()
    assert log_text.count(f"skipped unreadable image {train_image}") == 1  # once, not per epoch
    assert log_text.count(f"skipped unreadable image {gallery_image}") == 1


def test_check_stats_key_silences_the_published_statistics_warning(tmp_path, recwarn):
    from esreid.config import load_config
    from esreid.engine.data import load_data

    write_market1501(tmp_path)
    load_data(load_config("esnet", ["data.name=market1501", f"data.root={tmp_path}"]))
    assert any("data.check_stats=false" in str(w.message) for w in recwarn)
    recwarn.clear()
    load_data(load_config("esnet", ["data.name=market1501", f"data.root={tmp_path}",
                                    "data.check_stats=false"]))
    assert not [w for w in recwarn if "published" in str(w.message)]


def test_a_forced_change_that_does_not_fit_the_checkpoint_changes_nothing(finished_run, tmp_path, capsys):
    run = _copy_run(finished_run, tmp_path)
    before = _snapshot(run)
    assert main(["train", "--resume", str(run), "--force", "--set", "model.backbone=resnet18",
                 "optim.epochs=3"]) == 2
    assert "does not fit the configured model" in capsys.readouterr().err
    after = _snapshot(run)
    after.pop("log.txt", None)
    before.pop("log.txt", None)
    assert after == before
