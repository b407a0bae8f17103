"""Distributed training: real ``torchrun`` launches of two Gloo processes on CPU.

Each launch is bounded (at most LIMIT_S seconds) and uses ``--standalone`` (a rendezvous on
the loopback interface only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ddp_step_worker import make_trainer

from esreid.cli import main as cli_main
from esreid.data.synthetic import generate_synthetic
from esreid.engine.distributed import DistContext, shard

LIMIT_S = 240
WORKER = Path(__file__).with_name("ddp_step_worker.py")
TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "optim.warmup_epochs=1", "optim.milestones=[1]",
    "optim.iters_per_epoch=4", "train.progress=false", "train.tensorboard=false",
    "eval.batch_size=16",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "synthetic"
    generate_synthetic(root, num_ids=12, height=32, width=16, seed=0, progress=False)
    return root


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=nproc ARGS`` and return it finished."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {LIMIT_S} s: {' '.join(cmd)}")


def train(out: Path, synth_root: Path, name: str, *settings: str,
          flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun ... -m esreid train`` of the tiny ES-Net; fails the test if it fails."""
    proc = torchrun("-m", "esreid", "train", "--config", "esnet", *flags, "--set", *TINY,
                    f"data.root={synth_root}", f"train.output_dir={out}",
                    f"train.run_name={name}", *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture
def one_thread():
    """torchrun's workers compute with one thread each; the reference must too, since
    BESM's top-R selection turns last-bit differences of multi-threaded kernels into other
    erased pixels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_step_of_two_ranks_equals_the_single_process_step_on_their_batches(
        tmp_path, synth_root, one_thread):
    proc = torchrun(str(WORKER), str(tmp_path), str(synth_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in ("bn_eval_id_only", "train_mode"):
        r0, r1 = (_load(tmp_path / f"{case}_rank{r}.pt") for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        # Each rank trained on 2 whole identities x 2 images; no identity on both ranks.
        assert len(r0["pids"]) == len(r1["pids"]) == 4
        assert not set(r0["pids"].tolist()) & set(r1["pids"].tolist())
        # DDP averaged the gradients, so both ranks took exactly the same step.
        assert r0["grads"].keys() == r1["grads"].keys() and r0["grads"]
        for name in r0["params"]:
            assert torch.equal(r0["params"][name], r1["params"][name]), name
        for name in r0["grads"]:
            assert torch.equal(r0["grads"][name], r1["grads"][name]), name
        assert r0["loss"] == r1["loss"]

        images = torch.cat([r0["images"], r1["images"]])
        pids = torch.cat([r0["pids"], r1["pids"]])
        ref = make_trainer(case, str(synth_root), tmp_path / f"ref_{case}")
        ref.loader.sampler.set_epoch(0)
        # The ranks' batches are, in rank order, the single-process batch.
        single_images, single_pids, *_ = next(iter(ref.loader))
        assert torch.equal(single_images, images) and torch.equal(single_pids, pids)
        if case == "bn_eval_id_only":
            # With BatchNorm in eval mode and the per-sample ID loss, the 2-rank step is the
            # single-process step on the whole batch.
            ref.train_step(images, pids)
        else:
            # In training mode each rank's BatchNorm normalises with its own batch's
            # statistics and batch-hard mining looks within the rank: the 2-rank step is
            # the single-process step accumulated over the two local batches.
            ref.model.train()
            ref.optimizer.zero_grad(set_to_none=True)
            for half in (slice(0, 4), slice(4, 8)):
                loss, _, _ = ref.objective(images[half], pids[half], ref.generator)
                (loss / 2).backward()
        ref_grads = {n: p.grad for n, p in ref.model.named_parameters() if p.grad is not None}
        assert ref_grads.keys() == r0["grads"].keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(r0["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"{case}: gradient of {name}")
        # (Parameters after the step are not compared with the reference: Adam's first step
        # moves each weight by about lr * sign(grad), so a gradient of 1e-9 that differs in
        # its last bits can move a weight by lr either way.)
        if case == "train_mode":
            # What differs: the single-process step on the whole batch of 8 (shared
            # BatchNorm statistics, mining over all 4 identities) is another step.
            whole = make_trainer(case, str(synth_root), tmp_path / "whole")
            whole.model.train()
            loss, _, _ = whole.objective(images, pids, whole.generator)
            loss.backward()
            trunk = "trunk.layer1.0.conv1.weight"
            assert not torch.allclose(whole.model.get_parameter(trunk).grad,
                                      r0["grads"][trunk], rtol=1e-3, atol=1e-5)


def test_two_processes_train_write_once_evaluate_everything_and_resume(tmp_path, synth_root):
    full = train(tmp_path, synth_root, "full", "optim.epochs=2")
    run = tmp_path / "full"
    assert "results:" in full.stdout
    # Only rank 0 wrote: one line per event in the log, one record per epoch in metrics,
    # and the checkpoint rotation saw each epoch once (prev.pt = epoch 1, last.pt = epoch 2).
    log_text = (run / "log.txt").read_text()
    assert log_text.count("run folder") == 1 and log_text.count("epoch 2/2") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "eval"]
    assert all(r["world_size"] == 2 for r in records)
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "log.txt", "metrics.jsonl", "results.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "prev.pt"]
    last, prev = _load(run / "checkpoints" / "last.pt"), _load(run / "checkpoints" / "prev.pt")
    assert (prev["epoch"], last["epoch"]) == (1, 2)
    assert last["world_size"] == 2 and len(last["ranks"]) == 2
    # The ranks erase with generators of their own, and the checkpoint keeps both.
    assert not torch.equal(last["ranks"][0]["generator"], last["ranks"][1]["generator"])
    # Each epoch covers the data once in total: 4 global batches of 8 images.
    assert records[0]["images_per_s"] * records[0]["seconds"] == pytest.approx(32)

    # The gathered evaluation equals the single-process evaluation of the same weights.
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["sizes"]["query"] == 16 and results["sizes"]["gallery"] == 69
    assert cli_main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                     "--out", str(tmp_path / "single.json")]) == 0
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["sizes"] == results["sizes"]
    for key, value in single["metrics"].items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6), key

    # Stopped after epoch 1, then resumed under torchrun: the same model as the run above.
    train(tmp_path, synth_root, "split", "optim.epochs=1", flags=("--no-eval",))
    resumed = train(tmp_path, synth_root, "split", "optim.epochs=2",
                    flags=("--resume", "auto"))
    assert "resumed from" in (tmp_path / "split" / "log.txt").read_text()
    assert "results:" in resumed.stdout
    split = _load(tmp_path / "split" / "checkpoints" / "last.pt")
    for name, value in last["model"].items():
        assert torch.equal(split["model"][name], value), name
    split_results = json.loads((tmp_path / "split" / "results.json").read_text())
    assert split_results["metrics"] == results["metrics"]


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_shards_cover_the_items_once_in_order(n, world):
    parts = [list(range(n))[shard(DistContext(rank=r, world_size=world), n)]
             for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started (its children with RANK set)."""
    out = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_resumes(tmp_path, synth_root):
    run = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "esreid", "train", "--config", "esnet", "--no-eval", "--set", *TINY,
           f"data.root={synth_root}", f"train.output_dir={tmp_path}", "train.run_name=stopped",
           "optim.epochs=40", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + LIMIT_S
        # Wait until rank 0 logged its first epoch, then signal rank 1 only.
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0  # torchrun reports the stopped workers
    # Rank 0, which got no signal, agreed to stop, saved and said where (one line).
    assert err.count("esreid train: stopped by SIGTERM") == 1, err[-3000:]
    ckpt = _load(run / "checkpoints" / "last.pt")
    assert 1 <= ckpt["epoch"] < 40 and len(ckpt["ranks"]) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, ckpt["epoch"] + 1))

    # Resumed under torchrun (and told to finish one epoch later: optim.epochs may change).
    end = ckpt["epoch"] + 1
    train(tmp_path, synth_root, "stopped", f"optim.epochs={end}",
          flags=("--resume", "auto", "--no-eval"))
    done = _load(run / "checkpoints" / "last.pt")
    assert (done["epoch"], done["iteration"]) == (end, 0)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "train"] == list(range(1, end + 1))
