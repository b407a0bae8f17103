"""Mutation testing of one core module with mutmut (issue 13; docs/testing.md).

    python benchmarks/mutation.py src/esreid/engine/schedule.py [--jobs 2] [--summary-only]
    python benchmarks/mutation.py --all [--summary-only]

Runs ``mutmut run 'esreid.engine.schedule.*'`` from the repository root (mutmut's settings
are ``[tool.mutmut]`` in pyproject.toml), then prints the module's killed / survived /
timeout / no-tests counts and its score, killed / (all checked mutants), and lists the
survivors by name (``mutmut show NAME`` prints a survivor's diff). ``--summary-only`` skips
the run and reads the results of the last one from ``mutants/``. ``--all`` does this for
every file of ``only_mutate``, one after another, and ends with a table of all of them.
``--alive-only`` re-tests only the mutants the last results do not mark killed (after adding
tests for survivors: a test added to the suite cannot revive a killed mutant, so this gives
the same verdicts as a complete run in a fraction of the time).

Naming the module's mutants makes mutmut re-test every one of them, so the counts always
describe the current code and tests, never a cached verdict. The first run of a session also
traces the selected tests once (``mutants/mutmut-stats.json``) to learn which tests reach
which function; later runs reuse that and trace only new tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).parent / "mutmut"


def module_glob(path: str) -> str:
    """mutmut's name pattern for every mutant of the file ``path`` (src/ and .py dropped)."""
    rel = Path(path)
    if rel.suffix != ".py":
        raise SystemExit(f"{path}: expected a .py file under src/")
    parts = rel.with_suffix("").parts
    if parts and parts[0] == "src":
        parts = parts[1:]
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) + ".*"


def statuses(path: str) -> dict[str, str]:
    """Every mutant of ``path`` and its status, from mutmut's results file for that module."""
    from mutmut.stats import status_by_exit_code

    meta = ROOT / "mutants" / (path + ".meta")
    if not meta.is_file():
        raise SystemExit(f"no results for {path} ({meta} is missing): run without --summary-only")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def summarise(by_name: dict[str, str]) -> tuple[Counter, float | None]:
    """Counts by status and the score: killed over every mutant that was checked.

    Timeouts are counted as survivors rather than kills, so a slow mutant never inflates the
    score; mutants no selected test reaches ("no tests") count as survivors too, since no
    test would stop that mistake.
    """
    counts = Counter(by_name.values())
    checked = sum(n for status, n in counts.items() if status not in ("not checked", "skipped"))
    score = counts["killed"] / checked if checked else None
    return counts, score


def configured_modules() -> list[str]:
    """The files mutmut mutates: ``only_mutate`` of ``[tool.mutmut]`` in pyproject.toml."""
    import tomllib

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(settings["only_mutate"])


def report(path: str) -> tuple[Counter, float | None]:
    """Print one module's counts, score and the mutants not killed; return counts and score."""
    by_name = statuses(path)
    counts, score = summarise(by_name)
    print(f"\n{path}: {len(by_name)} mutants")
    for status in ("killed", "survived", "timeout", "no tests", "suspicious", "segfault",
                   "not checked"):
        print(f"  {status:12s} {counts.get(status, 0)}")
    others = {s: n for s, n in counts.items() if s not in (
        "killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked")}
    for status, n in sorted(others.items()):
        print(f"  {status:12s} {n}")
    print(f"  score        {'n/a' if score is None else f'{100 * score:.1f}%'}"
          " (killed / checked)")
    alive = sorted(name for name, status in by_name.items() if status != "killed")
    if alive:
        print("not killed:")
        for name in alive:
            print(f"  {name}  [{by_name[name]}]")
    return counts, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?",
                        help="source file, e.g. src/esreid/engine/schedule.py")
    parser.add_argument("--all", action="store_true",
                        help="every file of only_mutate in pyproject.toml, then a table")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--alive-only", action="store_true",
                        help="re-test only the mutants not killed in the last results")
    parser.add_argument("--summary-only", action="store_true",
                        help="only summarise the last run's results")
    args = parser.parse_args(argv)
    if args.all == (args.module is not None):
        parser.error("give one module or --all")
    # mutmut reads its settings from ./pyproject.toml and keeps its results in ./mutants.
    os.chdir(ROOT)
    paths = configured_modules() if args.all else [str(Path(args.module))]
    rows = []
    for path in paths:
        if not args.summary_only:
            # One torch thread per mutant worker: --jobs workers already share the cores.
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            names = [module_glob(path)]
            if args.alive_only:
                names = sorted(n for n, st in statuses(path).items() if st != "killed")
            if not names:
                print(f"{path}: every mutant is already killed")
            done = subprocess.run([str(MUTMUT), "run", "--max-children", str(args.jobs), *names],
                                  cwd=ROOT, env=env) if names else subprocess.CompletedProcess([], 0)
            if done.returncode != 0:
                print(f"mutmut run of {path} exited with {done.returncode}", file=sys.stderr)
                return done.returncode
        counts, score = report(path)
        rows.append((path, counts, score))
    if len(rows) > 1:
        print("\n| module | mutants | killed | survived | other | score |")
        print("|---|---|---|---|---|---|")
        for path, counts, score in rows:
            total = sum(counts.values())
            other = total - counts["killed"] - counts["survived"]
            shown = "n/a" if score is None else f"{100 * score:.1f}%"
            print(f"| `{path}` | {total} | {counts['killed']} | {counts['survived']} | {other} "
                  f"| {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
