"""esreid.locking.FileLock between real processes: a second holder is refused with one line
naming the first, a waiting one gets the lock when the first lets go, and a killed holder
never leaves a stale lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from esreid.locking import FileLock, LockBusyError, lock_path_for

HOLDER = """
import sys, time
from esreid.locking import FileLock
lock = FileLock(sys.argv[1], "thing").acquire(timeout=0)
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills this process)
lock.release()
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    path = tmp_path / ".x.lock"
    proc = _holder(path)
    try:
        with pytest.raises(LockBusyError) as err:
            FileLock(path, "index x").acquire(timeout=0)
        message = str(err.value)
        assert message.startswith("index x is in use by another esreid process (held by pid "
                                  f"{proc.pid} on ")
        assert "\n" not in message
        told = []
        start = time.monotonic()
        with pytest.raises(LockBusyError):
            FileLock(path, "index x").acquire(timeout=0.3, on_wait=told.append)
        assert time.monotonic() - start >= 0.3
        assert told == [f"waiting for index x: held by {path.read_text().strip()}"]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    lock = FileLock(path, "index x").acquire(timeout=0)
    assert lock.held and f"pid {os.getpid()} " in path.read_text()
    lock.release()
    assert path.exists()  # lock files stay (deleting them would let two holders in)


def test_a_waiting_writer_gets_the_lock_when_the_holder_lets_go(tmp_path):
    path = tmp_path / ".x.lock"
    proc = _holder(path)
    try:
        proc.stdin.close()  # the holder releases and exits while we wait
        lock = FileLock(path, "x").acquire(timeout=60)
        assert lock.held
        lock.release()
    finally:
        proc.wait(timeout=30)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / ".x.lock"
    proc = _holder(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with FileLock(path, "x") as lock:
        assert lock.held


def test_holders_in_one_process_share_the_lock(tmp_path):
    path = tmp_path / ".x.lock"
    first = FileLock(path, "x").acquire(timeout=0)
    second = FileLock(path, "x").acquire(timeout=0)
    first.release()
    # Still held by `second`: another process is refused.
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "in use by another esreid process" in probe.stderr
    second.release()
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr


def test_lock_files_sit_beside_their_target(tmp_path):
    target = tmp_path / "runs" / "esnet"
    assert lock_path_for(target) == tmp_path.resolve() / "runs" / ".esnet.lock"
    link = tmp_path / "alias"
    link.symlink_to(tmp_path / "runs", target_is_directory=True)
    assert lock_path_for(link / "esnet") == lock_path_for(target)  # one lock per real path
