"""Run the real ``esreid`` command (``esreid.cli.main``) in a child process, with one change:
the method named by ``ESREID_TEST_HOOK`` waits at a rendezvous when it returns (the first
time), until ``ESREID_TEST_PARTIES`` parties (processes, or the test itself) have arrived in
the folder ``ESREID_TEST_RENDEZVOUS`` (each arrival is a file ``arrived-<pid>``).

Hooks: ``embed_files`` (``ReIDModel.embed_files``: an index writer has read the index and
embedded its images, and has not written yet) and ``save_checkpoint``
(``Trainer.save_checkpoint``: a training run is under way, its first checkpoint written).
The rendezvous makes the processes of a test overlap at the worst moment every time;
without it, whether they overlap would be a matter of timing, and a test could pass on code
that is wrong.

    ESREID_TEST_HOOK=embed_files ... python tests/rendezvous_cli.py index add g.index --images more/
"""

import os
import sys
import time
from pathlib import Path

#: A party that has not arrived by then is taken as dead: the waiting process gives up.
TIMEOUT_S = 120.0


def _rendezvous() -> None:
    where = Path(os.environ["ESREID_TEST_RENDEZVOUS"])
    parties = int(os.environ["ESREID_TEST_PARTIES"])
    (where / f"arrived-{os.getpid()}").touch()
    deadline = time.monotonic() + TIMEOUT_S
    while sum(1 for p in where.iterdir() if p.name.startswith("arrived-")) < parties:
        if time.monotonic() > deadline:
            raise SystemExit(f"rendezvous: fewer than {parties} parties within {TIMEOUT_S} s")
        time.sleep(0.05)


def _install() -> None:
    hook = os.environ["ESREID_TEST_HOOK"]
    if hook == "embed_files":
        from esreid.inference import ReIDModel as owner
    elif hook == "save_checkpoint":
        from esreid.engine.trainer import Trainer as owner
    else:
        raise SystemExit(f"unknown ESREID_TEST_HOOK {hook!r}")
    original = getattr(owner, hook)
    done = []

    def hooked(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not done:
            done.append(True)
            _rendezvous()
        return result

    setattr(owner, hook, hooked)


if __name__ == "__main__":
    _install()
    from esreid.cli import main

    sys.exit(main(sys.argv[1:]))
