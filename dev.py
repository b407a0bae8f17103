#!/usr/bin/env python3
"""Set up a virtual environment in .venv and run esreid's demo or test suite in it.

    python3 dev.py demo      # install, then `esreid demo`
    python3 dev.py test      # install, then the whole test suite (what CI runs)
    python3 dev.py install   # only install

Needs nothing but Python >= 3.10 with venv and pip. The install is skipped when .venv is
already set up for the current pyproject.toml.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".esreid-installed"


def _run(cmd: list[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def install() -> None:
    """Create .venv (if needed) and install esreid with its dev extra (if not already)."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == want and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run([PY, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[dev]"])
    STAMP.write_text(want + "\n")


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py may run under an older python3
        print("esreid needs Python >= 3.10", file=sys.stderr)
        return 2
    if not argv or argv[0] not in ("demo", "test", "install"):
        print(__doc__, file=sys.stderr)
        return 2
    install()
    if argv[0] == "demo":
        # The demo writes runs/demo/ under the current directory.
        return subprocess.run([str(BIN / "esreid"), "demo", *argv[1:]]).returncode
    if argv[0] == "test":
        return subprocess.run([str(PY), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
