"""Two real esreid processes writing the same file (issue 20): two `esreid index add` on one
index keep every entry (case 1), and a second `esreid train` into a run folder another one is
training into is refused (case 3). tests/rendezvous_cli.py makes the processes overlap at
the worst moment every time (see its docstring)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from test_cli_use import _checkpoint, _image

from esreid.cli import main
from esreid.data.synthetic import generate_synthetic
from esreid.search import GalleryIndex

HELPER = str(Path(__file__).with_name("rendezvous_cli.py"))
LIMIT_S = 240


def _env(rendezvous: Path, hook: str, parties: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ESREID_TEST_HOOK": hook,
            "ESREID_TEST_PARTIES": str(parties), "ESREID_TEST_RENDEZVOUS": str(rendezvous)}


def _arrived(rendezvous: Path) -> list[Path]:
    return [p for p in rendezvous.iterdir() if p.name.startswith("arrived-")]


def test_two_index_adds_at_once_keep_every_entry(tmp_path):
    rng = np.random.default_rng(11)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", 0)
    base = [_image(tmp_path / "gallery" / person / f"{i}.png", rng)
            for person in ("ann", "ben") for i in range(2)]
    added = {name: [_image(tmp_path / name / person / f"{i}.png", rng)
                    for person in people for i in range(3)]
             for name, people in (("more_a", ("cy",)), ("more_b", ("dee", "eve")))}
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images",
                 str(tmp_path / "gallery"), "--out", str(index)]) == 0
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = _env(rendezvous, "embed_files", parties=2)
    procs = {name: subprocess.Popen([sys.executable, HELPER, "index", "add", str(index),
                                     "--images", str(tmp_path / name)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
             for name in added}
    outputs = {name: p.communicate(timeout=LIMIT_S) for name, p in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][1][-2000:]
        assert f"added {len(added[name])} images" in outputs[name][0]
    assert len(_arrived(rendezvous)) == 2  # both had read and embedded before either wrote
    final = GalleryIndex.load(index)
    expected = [*base, *added["more_a"], *added["more_b"]]
    assert final.count == len(expected) == 13
    assert sorted(final.paths) == sorted(str(p) for p in expected)
    assert dict(zip(final.paths, final.labels, strict=True)) == {
        str(p): p.parent.name for p in expected}
    # Every entry's descriptor is its image's: nothing was mixed up on the way.
    from esreid.inference import ReIDModel

    model = ReIDModel.from_checkpoint(ckpt)
    np.testing.assert_allclose(final.features, model.embed(final.paths), atol=1e-5)


TINY = [
    "model.backbone=resnet10", "model.pretrained=none", "data.name=synthetic",
    "data.height=32", "data.width=16", "data.ids_per_batch=4", "data.num_instances=2",
    "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "optim.milestones=[1]",
    "optim.iters_per_epoch=2", "train.progress=false", "eval.batch_size=64",
    "train.checkpoint_every=1",
]


def test_a_second_trainer_into_a_busy_run_folder_is_refused(tmp_path):
    synth = tmp_path / "synthetic"
    generate_synthetic(synth, num_ids=12, height=32, width=16, seed=0, progress=False)
    out = tmp_path / "runs"
    args = ["train", "--config", "esnet", "--set", *TINY, f"data.root={synth}",
            f"train.output_dir={out}", "train.run_name=shared"]
    run = out / "shared"
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = _env(rendezvous, "save_checkpoint", parties=2)  # the trainer and this test
    first = subprocess.Popen([sys.executable, HELPER, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + LIMIT_S
        while not _arrived(rendezvous):  # the first trainer has saved its epoch-1 checkpoint
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first trainer did not reach its checkpoint"
            time.sleep(0.1)
        before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        plain_env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for flags in (["--resume", "auto"], ["--overwrite"]):
            second = subprocess.run([sys.executable, "-m", "esreid.cli", *args, *flags],
                                    capture_output=True, text=True, env=plain_env,
                                    timeout=LIMIT_S)
            assert second.returncode == 2, (flags, second.stderr[-2000:])
            lines = second.stderr.strip().splitlines()
            assert lines[-2].startswith(f"esreid train: error: run folder {run} is in use by "
                                        f"another esreid process (held by pid {first.pid} on ")
            assert "--set train.run_name=NEW" in lines[-2] and "Traceback" not in second.stderr
            # Nothing of the running trainer's folder was touched.
            assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        (rendezvous / "arrived-test").touch()
        stdout, stderr = first.communicate(timeout=LIMIT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)
    assert first.returncode == 0, stderr[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 2]  # one run's records, nothing interleaved
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["config"]["train"]["run_name"] == "shared"
    # Once the first trainer is done, the folder is free again: resuming a finished run
    # does nothing and says so.
    again = subprocess.run([sys.executable, "-m", "esreid.cli", *args, "--resume", "auto"],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           timeout=LIMIT_S)
    assert again.returncode == 0, again.stderr[-2000:]
