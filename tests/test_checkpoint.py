"""engine/checkpoint.py: the run-folder layout, reading checkpoints with clear errors, the
last/prev rotation, falling back to prev.pt, and a full disk while saving."""

import logging
import os

import pytest
import torch

from esreid.config import load_config
from esreid.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    RunFolder,
    config_from_checkpoint,
    evaluation_results_path,
    explanations_dir,
    find_resume_checkpoint,
    model_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from esreid.models.esnet import build_model
from esreid.utils import DiskFullError

TINY = ["model.backbone=resnet10", "model.pretrained=none", "data.height=32", "data.width=16"]


def _model_checkpoint(path, preset="esnet", keep_previous=None, **extra):
    cfg = load_config(preset, TINY)
    model = build_model(cfg.model, 5, cfg.erase)
    save_checkpoint({"model": model.state_dict(), "num_classes": 5, "config": cfg.to_dict(),
                     **extra}, path, keep_previous)
    return cfg, model


def test_round_trip_builds_the_same_model_from_the_checkpoint_alone(tmp_path):
    cfg, model = _model_checkpoint(tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["format"] == CHECKPOINT_FORMAT and "esreid_version" in ckpt
    assert config_from_checkpoint(ckpt, tmp_path / "m.pt") == cfg
    rebuilt = model_from_checkpoint(tmp_path / "m.pt").eval()
    x = torch.randn(2, 3, 32, 16)
    assert torch.equal(rebuilt(x), model.eval()(x))
    changed = config_from_checkpoint(ckpt, tmp_path / "m.pt", ["eval.flip=false"])
    assert changed.eval.flip is False and changed.model == cfg.model


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    _model_checkpoint(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="does not fit the configured model.*another --config"):
        model_from_checkpoint(tmp_path / "m.pt", load_config("base", TINY))


@pytest.mark.parametrize("kind, reason", [
    ("folder", "it is a folder"),
    ("empty", "empty file"),
    ("random", "truncated or not a PyTorch file"),
    ("truncated", "truncated or not a PyTorch file"),
    ("other_pickle", "no 'model' entry"),
])
def test_files_that_are_not_checkpoints_name_the_file_and_the_reason(tmp_path, kind, reason):
    path = tmp_path / "x.pt"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(2048))
    elif kind == "truncated":
        _model_checkpoint(path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"not an esreid checkpoint: {path} ({reason}")
    assert "\n" not in message


def test_missing_checkpoint_and_newer_format(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")
    torch.save({"model": {}, "format": CHECKPOINT_FORMAT + 1, "esreid_version": "9.0"},
               tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=r"written by esreid 9.0 in format 2.*upgrade esreid"):
        read_checkpoint(tmp_path / "new.pt")
    torch.save({"model": {}, "esreid_version": "0.1.0"}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="does not record num_classes"):
        model_from_checkpoint(tmp_path / "old.pt", load_config("esnet", TINY))


def test_saving_keeps_the_previous_checkpoint(tmp_path):
    folder = RunFolder(tmp_path / "run")
    for step in (1, 2, 3):
        save_checkpoint({"model": {}, "step": step}, folder.last, keep_previous=folder.prev)
    assert read_checkpoint(folder.last)["step"] == 3
    assert read_checkpoint(folder.prev)["step"] == 2
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["last.pt", "prev.pt"]


def test_resume_falls_back_to_prev_with_a_warning_naming_both(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    save_checkpoint({"model": {}, "step": 1}, folder.last, keep_previous=folder.prev)
    save_checkpoint({"model": {}, "step": 2}, folder.last, keep_previous=folder.prev)
    path, ckpt = find_resume_checkpoint(folder)
    assert (path, ckpt["step"]) == (folder.last, 2)

    folder.last.write_bytes(folder.last.read_bytes()[:100])
    logger = logging.getLogger("esreid")
    logger.addHandler(caplog.handler)
    try:
        path, ckpt = find_resume_checkpoint(folder)
    finally:
        logger.removeHandler(caplog.handler)
    assert (path, ckpt["step"]) == (folder.prev, 1)
    assert f"not an esreid checkpoint: {folder.last}" in caplog.text
    assert f"resuming from the previous checkpoint {folder.prev}" in caplog.text

    folder.last.unlink()  # killed between the two renames of a save
    assert find_resume_checkpoint(folder)[0] == folder.prev
    folder.prev.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{folder.prev} \\(empty file\\)"):
        find_resume_checkpoint(folder)
    folder.prev.unlink()
    with pytest.raises(CheckpointError, match="has no checkpoint to resume from"):
        find_resume_checkpoint(folder)


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_filesystem):
    folder = RunFolder(tiny_filesystem / "run")
    save_checkpoint({"model": {"w": torch.ones(3)}}, folder.last, keep_previous=folder.prev)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint({"model": {"w": torch.zeros(512, 1024)}}, folder.last,
                        keep_previous=folder.prev)
    assert str(err.value) == (f"no space left on device while writing {folder.last}; "
                              f"the previous {folder.last} is intact")
    assert torch.equal(read_checkpoint(folder.last)["model"]["w"], torch.ones(3))
    assert not folder.prev.exists()  # the rotation happens only after a complete write
    assert [p.name for p in folder.checkpoints.iterdir()] == ["last.pt"]


def test_where_evaluate_and_explain_write(tmp_path):
    run = RunFolder(tmp_path / "runs" / "esnet")
    run.checkpoints.mkdir(parents=True)
    run.config.write_text("name: esnet\n")
    assert RunFolder.of_checkpoint(run.last) == run
    assert evaluation_results_path(run.last, "market1501", False) == run.path / "results_market1501.json"
    assert evaluation_results_path(run.last, "msmt17", True) == run.path / "results_msmt17_rerank.json"
    assert explanations_dir(run.last) == run.path / "explanations"
    loose = tmp_path / "models" / "checkpoints" / "m.pt"  # "checkpoints" but no run around it
    assert RunFolder.of_checkpoint(loose) is None
    assert evaluation_results_path(loose, "dukemtmc", False) == loose.parent / "results_dukemtmc.json"
    assert explanations_dir(loose) == loose.parent / "explanations"


def test_run_folder_contents_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = RunFolder("~/runs/x")
    assert folder.path == tmp_path / "runs" / "x" and folder.contents() == []
    folder.path.mkdir(parents=True)
    (folder.path / "log.txt").write_text("a log alone is not a run")
    assert folder.contents() == []
    folder.config.write_text("name: x\n")
    folder.checkpoints.mkdir()
    folder.last.write_bytes(b"x")
    assert folder.contents() == ["config.yaml", "checkpoints/last.pt"]
    folder.clear()
    assert not folder.path.exists()
