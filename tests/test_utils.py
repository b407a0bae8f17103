"""Atomic writes: crash safety, durability, file modes, a full disk, stale temporary files."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from esreid import utils
from esreid.utils import (
    TEMP_FILE_PATTERN,
    DiskFullError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    clean_stale_temp,
)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "a\n")
    atomic_write_json(tmp_path / "b.json", {"b": 1})
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "c.pt")
    atomic_write(tmp_path / "d.bin", lambda tmp: Path(tmp).write_bytes(b"d"))
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "a.txt": expected, "b.json": expected, "c.pt": expected, "d.bin": expected,
    }


def test_reading_the_umask_leaves_it_unchanged(umask):
    umask(0o027)
    assert utils._umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_contents_round_trip(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "héllo\n")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == "héllo\n".encode()
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    atomic_torch_save({"w": torch.arange(3.0)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt")["w"], torch.arange(3.0))


@pytest.mark.parametrize("previous", [True, False])
def test_crash_mid_write_keeps_the_previous_file(tmp_path, previous):
    target = tmp_path / "checkpoint.pt"
    if previous:
        target.write_text("old contents")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("new cont")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, half_then_crash)
    if previous:
        assert target.read_text() == "old contents"
        assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_temp_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)),
                                                     real_replace(a, b))[1])
    atomic_write_text(tmp_path / "a.txt", "data")
    inode = (tmp_path / "a.txt").stat().st_ino
    assert events[:2] == [("fsync", inode), ("replace", inode)]


def test_temp_file_name_matches_the_shared_pattern(tmp_path):
    seen = []
    atomic_write(tmp_path / "results.json", lambda tmp: seen.append(Path(tmp)))
    (tmp,) = seen
    assert tmp.parent == tmp_path
    match = TEMP_FILE_PATTERN.fullmatch(tmp.name)
    assert match and match["target"] == "results.json"


def full_disk_writer(tmp):
    with open(tmp, "w") as f:
        f.write("partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_message_with_a_previous_file(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    with pytest.raises(OSError) as err:
        atomic_write(target, full_disk_writer)
    assert isinstance(err.value, DiskFullError) and err.value.errno == errno.ENOSPC
    assert str(err.value) == (
        f"no space left on device while writing {target}; the previous {target} is intact"
    )
    assert target.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_disk_full_message_without_a_previous_file(tmp_path):
    target = tmp_path / "config.yaml"
    with pytest.raises(DiskFullError) as err:
        atomic_write(target, full_disk_writer)
    assert str(err.value) == f"no space left on device while writing {target}; nothing was written"
    assert "\n" not in str(err.value)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_text(p, "text"),
    lambda p: atomic_write_json(p, {"a": 1}),
])
def test_disk_full_text_and_json(tmp_path, monkeypatch, write):
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    target = tmp_path / "metrics.json"
    target.write_text("{}\n")
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(DiskFullError) as err:
        write(target)
    assert str(err.value) == (
        f"no space left on device while writing {target}; the previous {target} is intact"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.mark.parametrize(
    "message", [TORCH_FULL, "[enforce fail at inline_container.cc:778] . file write failed"]
)
def test_torch_write_failure_on_a_full_disk_is_translated(tmp_path, monkeypatch, message):
    # torch's C++ writer can fail without an OSError behind it; the free space confirms.
    def torch_fails(obj, f, *args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", torch_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**6, used=10**6, free=0))
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(DiskFullError) as err:
        atomic_torch_save({"w": torch.ones(1)}, target)
    assert str(err.value) == f"no space left on device while writing {target}; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_torch_write_failure_with_free_space_is_not_called_disk_full(tmp_path, monkeypatch):
    def torch_fails(obj, f, *args, **kwargs):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(torch, "save", torch_fails)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: SimpleNamespace(total=10**12, used=10**9, free=10**11))
    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "checkpoint.pt")
    assert not isinstance(err.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_error_pickles():
    err = pickle.loads(pickle.dumps(DiskFullError("no space left on device while writing x")))
    assert str(err) == "no space left on device while writing x" and err.errno == errno.ENOSPC


def test_real_full_disk(tiny_filesystem):
    ckpt = tiny_filesystem / "checkpoint.pt"
    atomic_torch_save({"w": torch.ones(3)}, ckpt)
    big = {"w": torch.zeros(512, 1024)}  # 2 MiB of float32 on a 1 MiB file system
    with pytest.raises(DiskFullError) as err:
        atomic_torch_save(big, ckpt)
    assert str(err.value) == (
        f"no space left on device while writing {ckpt}; the previous {ckpt} is intact"
    )
    assert torch.equal(torch.load(ckpt)["w"], torch.ones(3))

    new = tiny_filesystem / "new.pt"
    with pytest.raises(DiskFullError, match="nothing was written$"):
        atomic_torch_save(big, new)
    text = tiny_filesystem / "log.txt"
    with pytest.raises(DiskFullError) as err:
        atomic_write_text(text, "x" * (2 << 20))
    assert str(err.value) == f"no space left on device while writing {text}; nothing was written"
    with pytest.raises(DiskFullError, match="the previous .*checkpoint.pt is intact$"):
        atomic_write_json(ckpt, ["x" * (2 << 20)])
    # The partial temporary files were removed, so the space is free again.
    assert [p.name for p in tiny_filesystem.iterdir()] == ["checkpoint.pt"]
    assert shutil.disk_usage(tiny_filesystem).free > 900 * 1024


def interrupted_write(folder: Path, name: str) -> None:
    """Run an atomic write in a forked child that dies half-way, as a killed run would."""
    pid = os.fork()
    if pid == 0:
        try:
            def die(tmp):
                with open(tmp, "w") as f:
                    f.write("half")
                os._exit(0)  # no cleanup code runs, as with SIGKILL or a power cut

            atomic_write(folder / name, die)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_clean_stale_temp_removes_only_leftovers(tmp_path):
    (tmp_path / "checkpoint.pt").write_text("good")
    interrupted_write(tmp_path, "checkpoint.pt")
    interrupted_write(tmp_path, "config.yaml")
    stale = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert len(stale) == 2
    keep = [".checkpoint.pt.tmp", "notes.tmp", "a.abcdefgh.tmp", ".x.abcdefg.tmp",
            ".x.ABCDEFGH.tmp", ".hidden", ".x.abcdefgh.tmp.bak"]
    for name in keep:
        (tmp_path / name).write_text("user file")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # a folder, not a file
    (tmp_path / ".link.abcdefgh.tmp").symlink_to(tmp_path / "checkpoint.pt")
    (tmp_path / "sub").mkdir()
    interrupted_write(tmp_path / "sub", "metrics.jsonl")  # not in the folder itself

    removed = clean_stale_temp(tmp_path)

    assert removed == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        keep + ["checkpoint.pt", ".dir.abcdefgh.tmp", ".link.abcdefgh.tmp", "sub"]
    )
    assert (tmp_path / "checkpoint.pt").read_text() == "good"
    assert len(list((tmp_path / "sub").iterdir())) == 1
    assert clean_stale_temp(tmp_path) == []
    assert clean_stale_temp(tmp_path / "missing") == []
