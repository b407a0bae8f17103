"""``esreid demo``: Base vs ES-Net on the embedded synthetic benchmark, on a CPU, in minutes.

Both models use the same small backbone, image size, budget and seed. Each is evaluated on
the ordinary queries and, evaluation only, on the occluded-query variant of the same test set
(one body part of every query covered). The demo writes ``<out>/results.json`` with both
tables, one run folder per model (config, metrics log, checkpoint, results on both query sets,
plots) and CG-RAM heat maps of a few query / top-match pairs.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from esreid import __version__
from esreid.config import load_config
from esreid.data import load_dataset
from esreid.data.synthetic import ensure_synthetic
from esreid.engine.trainer import Trainer
from esreid.explain import explain_pairs, pick_queries
from esreid.plot import plot_run
from esreid.study import evaluate_occluded
from esreid.utils import atomic_write_json, setup_run_logging

log = logging.getLogger("esreid.demo")

MODELS = (("base", "Base (Bag of Tricks)"), ("esnet", "ES-Net"))

# The demo's deviations from the paper's presets, so that it fits a few CPU minutes.
DEMO_SETTINGS = [
    "model.backbone=resnet18",
    "model.pretrained=none",
    "data.name=synthetic",
    "data.height=128",
    "data.width=64",
    "data.ids_per_batch=8",
    "data.num_instances=4",
    "data.num_workers=1",
    "optim.epochs=8",
    "optim.lr=3.5e-4",
    "optim.warmup_epochs=1",
    "optim.milestones=[6]",
    "train.checkpoint_every=0",
    "eval.batch_size=256",
]

QUICK_SETTINGS = [
    "model.backbone=resnet10",
    "data.height=64",
    "data.width=32",
    "optim.epochs=1",
    "optim.iters_per_epoch=3",
    "optim.milestones=[]",
    "optim.warmup_epochs=0",
    "data.num_workers=0",
    "data.synth_ids=24",
]


def _table(rows: list[tuple[str, dict[str, float]]]) -> str:
    head = f"{'model':24s} {'rank-1':>7s} {'rank-5':>7s} {'mAP':>7s} {'mINP':>7s}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:24s} {100 * m['rank1']:6.1f}% {100 * m['rank5']:6.1f}% "
                     f"{100 * m['mAP']:6.1f}% {100 * m['mINP']:6.1f}%")
    return "\n".join(lines)


def _seed_note(seeds: list[int]) -> str:
    """The line above the table saying how many seeds its figures rest on."""
    if len(seeds) == 1:
        return (f"1 seed (train.seed={seeds[0]}): one run per model, so a gap of a few points "
                "may be seed-to-seed noise; `esreid study` measures it over several seeds "
                "(docs/experiments.md)")
    return f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


def run_demo(out_dir: Path = Path("runs/demo"), quick: bool = False,
             num_explained: int = 4, extra_settings: list[str] | None = None) -> dict[str, Any]:
    """Generate (or reuse) the synthetic benchmark and its occluded-query variant, train Base
    and ES-Net, evaluate both on both query sets, print the two tables, save heat maps;
    returns what ``results.json`` holds.

    ``quick`` shrinks everything (tiny backbone, a few iterations) for smoke tests; its
    numbers mean nothing. ``extra_settings`` are further ``section.key=value`` overrides.
    """
    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_run_logging(out_dir)
    settings = DEMO_SETTINGS + (QUICK_SETTINGS if quick else []) + list(extra_settings or [])
    settings = settings + [f"data.root={out_dir / 'synthetic'}", f"train.output_dir={out_dir}"]

    base_cfg = load_config("base", settings)
    log.info("esreid demo: synthetic benchmark in %s", base_cfg.data.root)
    root = ensure_synthetic(Path(base_cfg.data.root), num_ids=base_cfg.data.synth_ids,
                            seed=base_cfg.data.synth_seed)
    data = load_dataset("synthetic", root)
    # The same benchmark with one body part of every query covered: evaluated, never trained
    # on. docs/experiments.md measured a reliable gap there over 3 seeds (ES-Net below Base).
    occluded_root = ensure_synthetic(out_dir / "synthetic_occluded",
                                     num_ids=base_cfg.data.synth_ids,
                                     seed=base_cfg.data.synth_seed, occlude_queries="all")
    occluded_data = load_dataset("synthetic", occluded_root)

    rows, occluded_rows, results = [], [], {}
    explained: dict[str, list[str]] = {}
    seed_set: set[int] = set()
    queries_idx = pick_queries(data.query, num_explained)
    for preset, label in MODELS:
        cfg = load_config(preset, settings)
        cfg.train.run_name = preset
        seed_set.add(cfg.train.seed)
        log.info("training %s (%s)", label, preset)
        trainer = Trainer(cfg, data=data, overwrite=True)  # the demo re-creates its own runs
        feats: dict[str, torch.Tensor] = {}
        t0 = time.time()
        trainer.fit(evaluate=False)
        train_s = time.time() - t0
        result = trainer.evaluate_and_save(features_out=feats)
        result["train_seconds"] = round(train_s, 1)
        plot_run(trainer.run_dir)
        queries = [data.query[i] for i in queries_idx]
        paths = explain_pairs(trainer.model, cfg, queries, data.gallery, feats["gallery"],
                              feats["query"][queries_idx], out_dir / "heatmaps", prefix=f"{preset}_")
        explained[preset] = [str(p) for p in paths]
        occluded = evaluate_occluded(trainer.model, cfg, occluded_data, occluded_root,
                                     trainer.run_dir, trainer.epoch, trainer.device,
                                     gallery_features=feats["gallery"])
        rows.append((label, result["metrics"]))
        occluded_rows.append((label, occluded["metrics"]))
        results[preset] = {"label": label, **result, "occluded": occluded}

    table = _table(rows)
    occluded_table = _table(occluded_rows)
    seeds = sorted(seed_set)
    seed_note = _seed_note(seeds)
    summary = {
        "esreid_version": __version__,
        "benchmark": {"name": "synthetic", "root": str(root), "train_images": len(data.train),
                      "train_ids": data.num_train_pids, "query": len(data.query),
                      "gallery": len(data.gallery), "occluded_root": str(occluded_root)},
        "settings": settings,
        "seeds": seeds,
        "quick": quick,
        "models": results,
        "heatmaps": explained,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out_dir / "results.json", summary)
    print()
    print(f"esreid demo: synthetic benchmark ({len(data.train)} train images of "
          f"{data.num_train_pids} ids; {len(data.query)} queries, {len(data.gallery)} gallery)")
    print(seed_note)
    print("normal queries:")
    print(table)
    print("occluded queries (the same queries, one body part of each covered):")
    print(occluded_table)
    winner = max(rows, key=lambda r: r[1]["mAP"])[0]
    print(f"best mAP: {winner}. chance rank-1 is about "
          f"{100 / max(1, len({r.pid for r in data.gallery})):.1f}%")
    print(f"results: {out_dir / 'results.json'}; heat maps: {out_dir / 'heatmaps'}; "
          f"total {summary['seconds']:.0f}s")
    return summary
