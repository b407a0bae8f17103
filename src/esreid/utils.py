"""Small shared helpers: atomic writes, seeding, device choice, run logging."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The temporary file of an atomic write of "<name>" is ".<name>.<8 random characters>.tmp" in
# the same folder: mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX) makes it, and
# clean_stale_temp removes exactly the names this pattern matches.
TEMP_SUFFIX = ".tmp"
TEMP_FILE_PATTERN = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))

# torch.save reports a failed write as a RuntimeError with one of these texts, not an OSError.
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")
# After a write failed for lack of space the disk has at most a few blocks left.
_FULL_DISK_FREE_BYTES = 1 << 20


class DiskFullError(OSError):
    """An atomic write failed for lack of space (errno ENOSPC); the message says whether the
    previous file is intact or nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        # OSError would prefix "[Errno 28]": the message alone is the one line users see.
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.message,)


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way is to set it and put it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path: str | Path) -> None:
    """Flush a file's data to the disk (a read-only descriptor suffices for fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort, some file systems refuse it."""
    try:
        _fsync_path(folder)
    except OSError:
        pass


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full."""
    stack, seen = [exc], set()
    while stack:
        err = stack.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        stack += [e for e in (err.__cause__, err.__context__) if e is not None]
    if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _TORCH_WRITE_FAILURES):
        # torch hides the OS error when it writes through its own stream: confirm with the
        # free space (checked while the partial temporary file still holds its blocks).
        try:
            return shutil.disk_usage(folder).free < _FULL_DISK_FREE_BYTES
        except OSError:
            return False
    return False


def atomic_write(path: Path, write: Callable[[str], None], keep_previous: Path | None = None) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    With ``keep_previous``, the file ``path`` held so far is renamed to ``keep_previous``
    just before the new one takes its place, so one complete version exists at every moment.

    A crash mid-write leaves the old file (or nothing), never a truncated one. The data is
    fsynced before the rename, and the file gets the mode the umask gives any new file
    (mkstemp alone would leave it 0600). When the disk is full, raises :class:`DiskFullError`
    ("no space left on device while writing <path>; the previous <path> is intact" or
    "...; nothing was written"). The temporary file matches :data:`TEMP_FILE_PATTERN`.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        write(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if keep_previous is not None and path.is_file():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as exc:
        disk_full = isinstance(exc, Exception) and _is_disk_full(exc, path.parent)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if disk_full:
            outcome = f"the previous {path} is intact" if path.exists() else "nothing was written"
            raise DiskFullError(
                f"no space left on device while writing {path}; {outcome}"
            ) from exc
        raise
    _fsync_dir(path.parent)


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove the temporary files interrupted atomic writes left in ``folder``; return them.

    Only regular files directly in ``folder`` whose name matches :data:`TEMP_FILE_PATTERN`
    are removed. Call it when no atomic write into ``folder`` is under way (a run starting
    or resuming), since a write in progress would lose its temporary file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    with os.scandir(folder) as entries:
        stale = sorted(
            (e for e in entries
             if TEMP_FILE_PATTERN.fullmatch(e.name) and e.is_file(follow_symlinks=False)),
            key=lambda e: e.name,
        )
    for entry in stale:
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(folder / entry.name)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write`, also for
    ``keep_previous``)."""

    def write(tmp: str) -> None:
        # Through a Python file object, a full disk surfaces as the OSError (ENOSPC) behind
        # torch's RuntimeError; given a path, torch's C++ stream would swallow it.
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    atomic_write(path, write, keep_previous)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG, for checkpoints."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda[:N]`` to a device; ``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available on this machine")
    return device


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time of each record, so a
    replaced stderr (a test's capture, a redirecting caller) never leaves it writing to a
    closed stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_run_logging(run_dir: Path, name: str = "esreid") -> logging.Logger:
    """Log INFO lines of the ``esreid`` loggers to ``run_dir/log.txt`` and to stderr."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    log_file = str(Path(run_dir) / "log.txt")
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
    for handler in list(logger.handlers):
        # One run folder at a time: a second run in the same process must not keep writing
        # into the first run's log.txt.
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.path.abspath(log_file):
            logger.removeHandler(handler)
            handler.close()
    if not any(getattr(h, "baseFilename", None) == os.path.abspath(log_file) for h in logger.handlers):
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if not any(type(h) is _StderrHandler for h in logger.handlers):
        sh = _StderrHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    logger.propagate = False
    return logger
