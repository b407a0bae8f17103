"""Start the real `esreid serve` as a child process on 127.0.0.1 for a test, and stop it."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(index: Path, log: Path, *extra: str, timeout: float = 90.0,
                   cwd: Path | None = None):
    """``esreid serve --index INDEX`` on a free port, started in ``cwd`` (default: this
    process's working directory; ``index`` may be relative to it): yields ``(process, url,
    health)`` once ``/healthz`` answers (polled every 0.2 s for at most ``timeout`` s), and
    terminates the process afterwards (killing it if it does not stop within 20 s)."""
    url_port = free_port()
    url = f"http://127.0.0.1:{url_port}"
    # Output goes to a file: a pipe nobody reads could fill up and stall the server.
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "esreid.cli", "serve", "--index", str(index),
             "--host", "127.0.0.1", "--port", str(url_port), *extra],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
            cwd=cwd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"esreid serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2.0) as r:
                    health = json.load(r)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"esreid serve did not answer {url}/healthz within {timeout:.0f} s")
            time.sleep(0.2)
        yield proc, url, health
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
