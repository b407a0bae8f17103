"""One writer at a time for files that several processes may write (a gallery index, a run
folder): an advisory ``flock`` on a lock file beside the target.

```python
with FileLock(".gallery.index.lock", "index gallery.index").acquire(timeout=60):
    ...  # read the index, change it, write it atomically
```

The lock file is a separate, stable file because the targets are replaced by rename (every
write is atomic): a lock on the target itself would stay on the old inode while a second
writer opened the new one. It is never deleted (deleting a lock file lets two processes hold
"the" lock on different inodes) and records its holder (pid, host, time) for the message a
second writer gets. The kernel drops the lock when the holder exits, however it exits, so a
crashed writer never leaves a stale lock behind.

Holders in one process share a lock (it is counted, and released when the last one goes):
the exclusion is between processes. Threads of one process coordinate with their own locks
(the server's, :func:`esreid.search.update_index_file`'s). Advisory: only esreid's writers
take it; readers never need it, because every write is a rename.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock", "LockBusyError", "lock_path_for"]

#: How often a waiting writer tries again.
POLL_SECONDS = 0.05


class LockBusyError(RuntimeError):
    """Another process holds the lock. One line naming what is locked and by whom."""


def lock_path_for(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` in the same folder, from the absolute,
    symlink-resolved path (two spellings of one file share one lock)."""
    target = Path(os.path.expandvars(os.fspath(target))).expanduser().resolve()
    return target.with_name(f".{target.name}.lock")


class _Held:
    """The open, locked file descriptor of one lock file in this process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 0


_HELD: dict[str, _Held] = {}
_REGISTRY = threading.Lock()


class FileLock:
    """An exclusive advisory lock on ``path`` (created when missing); ``what`` names the
    locked thing in messages (e.g. "run folder runs/esnet")."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        """Remember the lock file and its description; nothing is opened yet."""
        self.path = Path(path)
        self.what = what
        self._held = False

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._held

    def acquire(self, timeout: float | None = 0.0,
                on_wait: Callable[[str], None] | None = None) -> FileLock:
        """Take the lock; returns ``self`` (usable in a ``with`` block).

        ``timeout`` 0 refuses at once when another process holds it, ``None`` waits for
        as long as it takes, a number waits that many seconds at most. ``on_wait`` is
        called once, with a line saying who holds it, before waiting. Raises
        :class:`LockBusyError` (one line) when it cannot be had, OSError when the lock
        file cannot be created.
        """
        if self._held:
            return self
        key = str(self.path.absolute())
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        told = False
        while True:
            with _REGISTRY:
                held = _HELD.get(key)
                if held is not None:
                    held.count += 1
                    self._held = True
                    return self
                fd = self._try_lock()
                if fd is not None:
                    held = _HELD[key] = _Held(fd)
                    held.count = 1
                    self._held = True
                    self._write_holder(fd)
                    return self
            if deadline is not None and time.monotonic() >= deadline:
                raise LockBusyError(self._busy_message())
            if not told and on_wait is not None:
                on_wait(f"waiting for {self.what}: {self._holder_text()}")
                told = True
            time.sleep(POLL_SECONDS)

    def _try_lock(self) -> int | None:
        """The locked descriptor, or None when another process holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        if fcntl is None:
            return fd  # no advisory locks on this platform: one writer is the user's job
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _write_holder(fd: int) -> None:
        text = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{datetime.now().isoformat(timespec='seconds')}\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text, 0)
        except OSError:
            pass  # who holds it is only for messages

    def _holder_text(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return f"held by {text}" if text else "held by another process"

    def _busy_message(self) -> str:
        return f"{self.what} is in use by another esreid process ({self._holder_text()})"

    def release(self) -> None:
        """Give the lock up (the file stays); a no-op when not held."""
        if not self._held:
            return
        self._held = False
        key = str(self.path.absolute())
        with _REGISTRY:
            held = _HELD.get(key)
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                del _HELD[key]
                os.close(held.fd)  # closing the descriptor drops the flock

    def __enter__(self) -> FileLock:
        """Take the lock, refusing at once if it is busy (call :meth:`acquire` first to
        wait)."""
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        """Release the lock."""
        self.release()

    def __del__(self) -> None:
        """An object that is dropped while holding the lock releases it."""
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
