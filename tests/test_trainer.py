"""Training loop: schedule in the loop, checkpoint/resume, a tiny end-to-end run, the CLI."""

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from fixture_trees import write_market1501

from esreid.cli import main
from esreid.config import load_config
from esreid.data import load_dataset
from esreid.data.synthetic import generate_synthetic
from esreid.engine.checkpoint import CheckpointError, model_from_checkpoint
from esreid.engine.evaluate import camera_filter_labels
from esreid.engine.trainer import Trainer

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "optim.milestones=[1]",
    "optim.iters_per_epoch=2", "train.progress=false", "eval.batch_size=64",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, num_ids=12, height=32, width=16, seed=0, progress=False)
    return root


def _cfg(tmp_path, synth_root, preset="esnet", extra=()):
    return load_config(preset, TINY + [f"data.root={synth_root}", f"train.output_dir={tmp_path}",
                                       *extra])


def test_lr_follows_warmup_and_decay_in_the_loop(tmp_path, synth_root):
    trainer = Trainer(_cfg(tmp_path, synth_root))
    assert trainer.lr_at(0.5) == pytest.approx(3.5e-4 * 0.5)
    assert trainer.lr_at(1.0) == pytest.approx(3.5e-5)  # warm-up done, first decay at epoch 1
    trainer.train_epoch()
    # The last step of epoch 1 ran at epoch progress 1.0.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3.5e-5)


def test_resume_gives_the_same_next_step(tmp_path, synth_root):
    cfg = _cfg(tmp_path, synth_root, extra=["data.flip_prob=0.5", "data.pad=2"])
    first = Trainer(cfg, run_dir=tmp_path / "a")
    first.train_epoch()
    ckpt = first.save_checkpoint()
    continued = first.train_epoch().step_losses

    second = Trainer(cfg, run_dir=tmp_path / "b")
    second.load_checkpoint(ckpt)
    assert second.epoch == 1
    resumed = second.train_epoch().step_losses
    assert resumed == pytest.approx(continued, rel=1e-5, abs=1e-6)
    for p1, p2 in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.allclose(p1, p2, atol=1e-6)


def test_end_to_end_train_and_evaluate(tmp_path, synth_root):
    cfg = _cfg(tmp_path, synth_root, extra=["train.run_name=e2e"])
    result = Trainer(cfg).fit()
    run = tmp_path / "e2e"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    saved = json.loads((run / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"])
    m = saved["metrics"]
    assert 0.0 <= m["mINP"] <= m["mAP"] <= 1.0 and 0.0 <= m["rank1"] <= m["rank5"] <= 1.0
    # Verification: TPR at each FPR, and the distance threshold of that operating point,
    # equal to a direct tpr_at_fpr of the same descriptors.
    from esreid.engine.evaluate import VERIFICATION_FPRS, embed_records
    from esreid.metrics import compute_distance, tpr_at_fpr

    assert [v["fpr"] for v in saved["verification"]] == list(VERIFICATION_FPRS)
    assert m["TPR@FPR=0.0001"] <= m["TPR@FPR=0.001"] <= m["TPR@FPR=0.01"]
    trained = model_from_checkpoint(run / "checkpoints" / "last.pt")
    data = load_dataset("synthetic", synth_root)
    qf, qp, qc = embed_records(trained, data.query, cfg, "cpu")
    gf, gp, gc = embed_records(trained, data.gallery, cfg, "cpu")
    direct = tpr_at_fpr(compute_distance(qf, gf, metric="cosine"), qp, gp, qc, gc,
                        fprs=VERIFICATION_FPRS)
    for entry in saved["verification"]:
        tpr, threshold = direct[entry["fpr"]]
        assert entry["tpr"] == pytest.approx(tpr) and entry["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert saved["sizes"]["query"] == len(data.query)
    assert saved["sizes"]["gallery"] == len(data.gallery)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["type"] == "train"]
    assert [x["epoch"] for x in train_lines] == [1, 2]
    assert all("erased_loss" in x and "ppool_l_esb" in x and x["ppool_l_esb"] >= 1 for x in train_lines)
    # The saliency path per epoch: maps without contrast (not erased) and erased pixels,
    # means over the epoch's steps, consistent with the images erased (R = 0.2).
    for x in train_lines:
        assert 0.0 <= x["zero_map_frac"] <= 1.0 and x["saliency_nonfinite"] == 0.0
        assert x["erased_pixel_frac"] == pytest.approx(x["erased_frac"] * 0.2, abs=0.01)
    assert lines[-1]["type"] == "eval"

    # The checkpoint evaluates to the same numbers through the CLI.
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--config", "esnet", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                 "--out", str(out), "--set", *TINY, f"data.root={synth_root}"])
    assert code == 0
    assert json.loads(out.read_text())["metrics"] == pytest.approx(m, abs=1e-6)

    # CG-RAM explanations of the trained model's rankings.
    code = main(["explain", "--config", "esnet", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                 "--queries", "2", "--top-k", "2", "--out", str(tmp_path / "explain"),
                 "--set", *TINY, f"data.root={synth_root}"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "explain").iterdir()) == ["query00.png", "query01.png"]


def test_single_camera_data_is_evaluated_without_camera_filter():
    q, g = np.zeros(3, dtype=int), np.zeros(5, dtype=int)
    q2, g2 = camera_filter_labels(q, g)
    assert set(q2) == {0} and set(g2) == {1}
    q, g = np.array([0, 1]), np.array([1, 0, 0])
    q2, g2 = camera_filter_labels(q, g)
    assert q2 is q and g2 is g


def test_wrong_checkpoint_is_a_clear_error(tmp_path, synth_root):
    cfg = _cfg(tmp_path, synth_root, extra=["train.run_name=one"])
    trainer = Trainer(cfg)
    ckpt = trainer.save_checkpoint()
    base_cfg = _cfg(tmp_path, synth_root, preset="base")
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        model_from_checkpoint(ckpt, base_cfg)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        model_from_checkpoint(tmp_path / "missing.pt", cfg)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--config", "base", "--set", "optim.lrr=1"]) == 2
    assert "unknown config key optim.lrr" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["train", "--config", "base", "--set", *TINY, "data.name=market1501",
                 f"data.root={missing}", f"train.output_dir={tmp_path}"]) == 2
    assert str(missing) in capsys.readouterr().err
    bench = write_market1501(tmp_path)
    (bench / "query" / "0001_c1_bad.jpg").write_bytes(b"")
    assert main(["train", "--config", "base", "--set", *TINY, "data.name=market1501",
                 f"data.root={tmp_path}", f"train.output_dir={tmp_path}"]) == 2
    assert "0001_c1_bad.jpg" in capsys.readouterr().err


def test_cli_help_everywhere(capsys):
    for cmd in ([], ["train"], ["evaluate"], ["synth"], ["demo"], ["plot"], ["report"],
                ["sweep"], ["explain"], ["export"], ["index"], ["index", "build"],
                ["index", "add"], ["index", "info"], ["search"], ["serve"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: esreid" in capsys.readouterr().out


def test_sweep_trains_one_run_per_value(tmp_path, synth_root, capsys):
    code = main(["sweep", "--config", "esnet", "--param", "erase.ratio", "--values", "0.1", "0.3",
                 "--set", *TINY, "optim.epochs=1", "optim.iters_per_epoch=1",
                 f"data.root={synth_root}", f"train.output_dir={tmp_path}"])
    assert code == 0
    for value in ("0.1", "0.3"):
        run = tmp_path / f"esnet_ratio{value}"
        assert yaml.safe_load((run / "config.yaml").read_text())["erase"]["ratio"] == float(value)
        assert json.loads((run / "results.json").read_text())["config"] == "esnet"
    assert "esnet_ratio0.1" in capsys.readouterr().out


def test_custom_data_through_the_config(tmp_path):
    from fixture_trees import write_custom_folders

    from esreid.engine.data import load_data

    root = write_custom_folders(tmp_path, split_layout=True)
    cfg = load_config("esnet", ["data.name=custom", f"data.root={root}",
                                r"data.cam_pattern=_cam(\d+)_"])
    data = load_data(cfg)
    assert [r.camid for r in data.query] == [0]
    assert sorted(r.camid for r in data.gallery) == [0, 1]  # dave cam1 -> 0, carol cam2 -> 1
    assert data.num_train_pids == 2


def test_resumed_and_rerun_runs_do_not_repeat_epochs_in_the_log(tmp_path, synth_root):
    cfg = _cfg(tmp_path, synth_root, extra=["train.run_name=again", "train.checkpoint_every=1"])
    Trainer(cfg).fit(evaluate=False)
    log_path = tmp_path / "again" / "metrics.jsonl"
    epochs = [json.loads(x)["epoch"] for x in log_path.read_text().splitlines()]
    assert epochs == [1, 2]
    # Resume from the epoch-1 state (prev.pt): epoch 2 is trained again and logged once.
    trainer = Trainer(cfg, resume=tmp_path / "again" / "checkpoints" / "prev.pt")
    assert trainer.epoch == 1
    trainer.fit(evaluate=False)
    epochs = [json.loads(x)["epoch"] for x in log_path.read_text().splitlines()]
    assert epochs == [1, 2]
    # A new run under the same name (overwrite) starts a new log.
    Trainer(cfg, overwrite=True).fit(evaluate=False)
    epochs = [json.loads(x)["epoch"] for x in log_path.read_text().splitlines()]
    assert epochs == [1, 2]


def test_presets_command_lists_every_preset(capsys):
    from esreid.config import list_presets

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    esnet = next(line for line in lines if line.startswith("esnet "))
    assert "AIB(gap) + ESB(ppool) ID+triplet erase=besm(R=0.2,P=0.5) 384x128 120ep" in esnet


def test_optimizer_keeps_p_pooling_exponent_out_of_weight_decay(tmp_path, synth_root):
    trainer = Trainer(_cfg(tmp_path, synth_root, extra=["train.run_name=wd"]))
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert [p is trainer.model.esb.pool.raw_l for p in no_decay["params"]] == [True]


def test_single_image_identities_warn_before_training(tmp_path, caplog):
    from fixture_trees import write_custom_folders

    from esreid.engine.data import check_data, load_data

    root = write_custom_folders(tmp_path, split_layout=True)
    cfg = load_config("esnet", ["data.name=custom", f"data.root={root}", "data.ids_per_batch=2",
                                r"data.cam_pattern=_cam(\d+)_"])
    data = load_data(cfg)
    data.train = [r for i, r in enumerate(data.train)
                  if r.pid not in {x.pid for x in data.train[:i]}]  # one image per identity
    logger = logging.getLogger("esreid")
    logger.addHandler(caplog.handler)
    try:
        check_data(data, cfg)
    finally:
        logger.removeHandler(caplog.handler)
    assert "every training identity has a single image" in caplog.text


def test_explain_warns_when_a_cg_ram_map_is_flat(tmp_path, synth_root, caplog, monkeypatch):
    import esreid.explain as explain

    cfg = _cfg(tmp_path, synth_root, extra=["train.run_name=flat"])
    trainer = Trainer(cfg)
    data = trainer.data
    feats = torch.randn(len(data.gallery), 8)

    def flat_query(model, layer, q, g, return_gallery=False):
        return torch.zeros(1, 2, 1), torch.ones(1, 2, 1)

    monkeypatch.setattr(explain, "cg_ram", flat_query)
    logger = logging.getLogger("esreid")
    logger.addHandler(caplog.handler)
    try:
        paths = explain.explain_pairs(trainer.model, cfg, data.query[:1], data.gallery, feats,
                                      feats[:1], tmp_path / "figs")
    finally:
        logger.removeHandler(caplog.handler)
    assert len(paths) == 1 and paths[0].is_file()
    assert "CG-RAM of query is zero everywhere" in caplog.text
    assert data.query[0].path in caplog.text
