"""Real training processes interrupted by SIGTERM, SIGINT and kill -9, then resumed.

Each test starts ``python -m esreid.cli train`` as a child process on a tiny model and
waits for it with bounded polling (at most 120 s per process).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from esreid.data.synthetic import generate_synthetic

TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "optim.warmup_epochs=1", "optim.milestones=[1]", "train.progress=false",
    "eval.batch_size=64", "data.flip_prob=0.5", "data.pad=2",
]
LIMIT_S = 120


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, num_ids=12, height=32, width=16, seed=0, progress=False)
    return root


def _start(out, synth_root, run_name, *settings, flags=()):
    cmd = [sys.executable, "-m", "esreid.cli", "train", "--config", "esnet", *flags, "--set",
           *TINY, f"data.root={synth_root}", f"train.output_dir={out}",
           f"train.run_name={run_name}", *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"training process did not finish within {LIMIT_S} s")
    return proc.returncode, out, err


def _wait_for(predicate, proc, what):
    deadline = time.monotonic() + LIMIT_S
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (code {proc.returncode}) before {what}: "
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _training_started(run):
    log = run / "log.txt"
    return log.is_file() and "run folder" in log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signal(tmp_path, synth_root, signum):
    name = signal.Signals(signum).name.lower()
    run = tmp_path / name
    # checkpoint_every=0: only the signal makes a checkpoint before the end; one worker so
    # the workers' handling of the signal is exercised too.
    proc = _start(tmp_path, synth_root, name, "optim.epochs=50", "train.checkpoint_every=0",
                  "data.num_workers=1")
    _wait_for(lambda: _training_started(run), proc, "training started")
    time.sleep(0.5)
    proc.send_signal(signum)
    code, _, err = _finish(proc)
    assert code == 128 + signum, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith(f"esreid train: stopped by {signal.Signals(signum).name} at ")
    assert lines[-1].endswith(f"resume with: esreid train --resume {run}")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] < 50
    # The checkpoint holds the state after the step that was running (mid-epoch as a rule;
    # the end of an epoch when the signal came during its bookkeeping).
    if ckpt["iteration"]:
        where = f"epoch {ckpt['epoch'] + 1}, iteration {ckpt['iteration']}/{ckpt['iters_per_epoch']}"
    else:
        where = f"the end of epoch {ckpt['epoch']}"
    assert f"at {where}:" in lines[-1]
    # It resumes (one more epoch is enough to show it).
    resumed = subprocess.run([sys.executable, "-m", "esreid.cli", "train", "--resume", str(run),
                              "--no-eval", "--set", f"optim.epochs={ckpt['epoch'] + 1}"],
                             capture_output=True, text=True, timeout=LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] == ckpt["epoch"] + 1


def _final_state(run):
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return ckpt, [(r["epoch"], r["loss"]) for r in train if r["type"] == "train"]


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_kill_9_mid_epoch_then_resume_is_bitwise_equal(tmp_path, synth_root):
    settings = ["optim.epochs=2", "optim.iters_per_epoch=12", "train.checkpoint_every_iters=2",
                "data.num_workers=0"]
    reference = _start(tmp_path, synth_root, "reference", *settings, flags=["--no-eval"])
    assert _finish(reference)[0] == 0

    proc = _start(tmp_path, synth_root, "killed", *settings, flags=["--no-eval"])
    run = tmp_path / "killed"
    _wait_for(lambda: (run / "checkpoints" / "last.pt").is_file(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    assert _finish(proc)[0] == -signal.SIGKILL
    resume_from = run / "checkpoints" / "last.pt"
    if not resume_from.is_file():  # killed between the rotation and the rename
        resume_from = run / "checkpoints" / "prev.pt"
    saved = torch.load(resume_from, weights_only=False)
    assert (saved["epoch"], saved["iteration"]) < (2, 0)  # killed before the end

    resumed = subprocess.run([sys.executable, "-m", "esreid.cli", "train", "--resume", str(run),
                              "--no-eval"], capture_output=True, text=True, timeout=LIMIT_S,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    ref_ckpt, ref_losses = _final_state(tmp_path / "reference")
    got_ckpt, got_losses = _final_state(run)
    assert got_losses == ref_losses  # same per-epoch mean losses, to the last bit
    assert (got_ckpt["epoch"], got_ckpt["iteration"]) == (2, 0)
    for key in ("model", "optimizer", "generator", "rng"):
        _assert_same_tensors(ref_ckpt[key], got_ckpt[key], key)
