"""Why ES-Net is (not) ahead in the mechanism study: its branches and its erasing, per run.

    python benchmarks/mechanism_diagnostics.py runs/mechanism

Reads a finished ``esreid study --design mechanism`` folder and writes
``mechanism_diagnostics.json`` beside its summary, and prints one line per run:

- ``branches``: rank-1/mAP on every query set (normal, changed upper, occluded upper) of the
  whole descriptor and, for two-branch models, of its AIB half and of its ESB half. If BESM
  made the ESB learn the other parts, the ESB half is the one that holds up on changed-upper
  queries;
- ``erasing_control`` (ES-Net runs): the ESB's loss on 8 clean training batches, with the
  top 20% CG-RAM pixels erased, with 20% erased by random maps and with the least salient 20%
  erased (benchmarks/study_diagnostics.py's check): a saliency map that points at what the
  ESB uses costs clearly more to erase than a random one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from esreid.config import load_config
from esreid.data import load_dataset
from esreid.engine.checkpoint import model_from_checkpoint
from esreid.engine.evaluate import embed_records
from esreid.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_diagnostics import _batches, _erasing_control, _scores  # noqa: E402

QUERY_SETS = {"normal": "synthetic", "changed": "synthetic_changed",
              "occluded": "synthetic_occluded"}


def _branches(model, cfg, sets: dict) -> dict:
    """Scores of the whole descriptor and of each branch's half on every query set."""
    normal = sets["normal"]
    with torch.no_grad():
        gallery = embed_records(model, normal.gallery, cfg, "cpu")[0]
        queries = {k: embed_records(model, d.query, cfg, "cpu")[0] for k, d in sets.items()}
    halves = {"all": slice(None)}
    if len(model.branches()) == 2:
        d = model.aib.neck.bn.num_features  # the descriptor is [AIB | ESB]
        halves.update(aib=slice(0, d), esb=slice(d, None))
    return {name: {k: _scores(queries[k][:, s], gallery[:, s], sets[k].query, normal.gallery)
                   for k in sets}
            for name, s in halves.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the checks on a finished mechanism study; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="folder of a finished mechanism study")
    args = parser.parse_args(argv)
    runs = sorted((args.study / "runs").glob("*_seed*"))
    missing = [v for v in QUERY_SETS.values() if not (args.study / v).is_dir()]
    if not runs or missing:
        print(f"{args.study} holds no finished mechanism study (runs/*_seed*, "
              f"{', '.join(QUERY_SETS.values())})", file=sys.stderr)
        return 2
    sets = {k: load_dataset("synthetic", args.study / v) for k, v in QUERY_SETS.items()}
    report: dict = {"branches": {}, "erasing_control": {}}
    for run in runs:
        if not (run / "results.json").is_file():
            continue
        cfg = load_config(run / "config.yaml")
        model = model_from_checkpoint(run / "checkpoints" / "last.pt", cfg).eval()
        report["branches"][run.name] = _branches(model, cfg, sets)
        print(run.name, json.dumps(report["branches"][run.name]), flush=True)
        if run.name.startswith("esnet"):
            control = _batches(sets["normal"], cfg, 8, seed=11)
            generator = torch.Generator().manual_seed(5)
            report["erasing_control"][run.name] = _erasing_control(model, cfg, control,
                                                                   generator)
            print(run.name, json.dumps(report["erasing_control"][run.name]), flush=True)
    out = args.study / "mechanism_diagnostics.json"
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
