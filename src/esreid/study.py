"""``esreid study``: does ES-Net learn more? Base, ESB and ES-Net over several seeds.

Every model is trained with the same backbone, image size, budget and seeds on the embedded
synthetic benchmark, then evaluated twice: on the ordinary queries and on the occluded-query
variant of the same test set (each query has one body part covered, see
``docs/synthetic.md``), evaluation only. The summary gives mean ± std over seeds and the
paired differences to Base per seed (same seed, same benchmark, same batches).

Layout of ``<out>``::

    synthetic/ synthetic_occluded/    the two benchmarks (generated once, then reused)
    runs/<preset>_seed<S>/            ordinary run folders: results.json (ordinary queries)
                                      and results_occluded.json (occluded queries)
    study.json  study.md  study.png   the summary, its table and its figure

A run whose results are there is not trained again; an interrupted one is resumed from its
last checkpoint, so the command can simply be started again.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esreid import __version__
from esreid.config import Config, ConfigError, diff_configs, experiment_changes, load_config
from esreid.data import load_dataset
from esreid.data.records import ReIDData
from esreid.data.synthetic import ensure_synthetic
from esreid.engine.checkpoint import RunFolder
from esreid.engine.evaluate import evaluate_model
from esreid.engine.trainer import Trainer
from esreid.metrics import load_results, write_results
from esreid.utils import atomic_write_json, atomic_write_text, setup_run_logging

log = logging.getLogger("esreid.study")

#: Presets the study compares by default, with their labels.
MODEL_LABELS = {"base": "Base", "esb": "ESB", "esnet": "ES-Net"}
DEFAULT_MODELS = ("base", "esb", "esnet")
DEFAULT_SEEDS = (0, 1, 2)
#: The two query sets every model is evaluated on.
QUERY_SETS = ("normal", "occluded")
OCCLUDED_RESULTS = "results_occluded.json"
#: The metrics the summary reports.
METRICS = ("rank1", "mAP")
_METRIC_TITLES = {"rank1": "rank-1", "mAP": "mAP"}

# The study's deviations from the paper presets, so that 3 models x 3 seeds fit about 40
# minutes of a shared 2-core CPU: a ResNet-10 from scratch at 64x32, 288 steps per run
# (docs/experiments.md gives the timings and what this budget can and cannot show).
STUDY_SETTINGS = [
    "model.backbone=resnet10",
    "model.pretrained=none",
    "data.name=synthetic",
    "data.synth_ids=300",
    "data.height=64",
    "data.width=32",
    "data.ids_per_batch=8",
    "data.num_instances=4",
    "data.num_workers=1",
    "optim.epochs=8",
    "optim.iters_per_epoch=36",
    "optim.lr=3.5e-4",
    "optim.warmup_epochs=1",
    "optim.milestones=[6]",
    "train.checkpoint_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "eval.batch_size=256",
]

# Keys the study sets itself for every run.
_STUDY_KEYS = ("train.seed", "train.run_name", "train.output_dir", "data.root", "data.name")


def _check_arguments(models: Sequence[str], seeds: Sequence[int], settings: Sequence[str]) -> None:
    """Refuse arguments that would not give a study, naming the option."""
    if not models:
        raise ConfigError("--models: name at least one preset, e.g. base esb esnet")
    if len(set(models)) != len(models):
        raise ConfigError(f"--models: each preset once, got {' '.join(models)}")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed (3 or more for a spread)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"--seeds must be non-negative integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: each seed once, got {list(seeds)}")
    for item in settings:
        key = item.split("=", 1)[0].strip()
        if key in _STUDY_KEYS:
            raise ConfigError(f"--set {key}: the study sets it for every run (seeds with "
                              "--seeds, folders with --out); leave it out")


def _configs(out_dir: Path, models: Sequence[str], seeds: Sequence[int],
             settings: Sequence[str]) -> dict[tuple[str, int], Config]:
    """The config of every run, loaded (and so validated) before anything is trained."""
    cfgs = {}
    # Seed by seed, so that a study stopped early already holds complete paired comparisons.
    for seed in seeds:
        for preset in models:
            overrides = [*settings, f"data.root={out_dir / 'synthetic'}",
                         f"train.output_dir={out_dir / 'runs'}", f"train.seed={seed}",
                         f"train.run_name={preset}_seed{seed}"]
            cfgs[preset, seed] = load_config(preset, overrides)
    first = next(iter(cfgs.values())).data
    for (preset, _), cfg in cfgs.items():
        if (cfg.data.height, cfg.data.width) != (first.height, first.width):
            raise ConfigError(f"--models {preset}: its image size differs from the others'; "
                              "the study compares models at one size")
    return cfgs


def _benchmarks(out_dir: Path, cfg: Config) -> tuple[Path, Path]:
    """The ordinary benchmark and its occluded-query variant (same ids, seed and size)."""
    params = {"num_ids": cfg.data.synth_ids, "seed": cfg.data.synth_seed,
              "height": cfg.data.height, "width": cfg.data.width}
    clean = ensure_synthetic(out_dir / "synthetic", **params)
    occluded = ensure_synthetic(out_dir / "synthetic_occluded", occlude_queries="all", **params)
    return clean, occluded


#: Keys of a run's last training record that the summary reports: the loss terms of each
#: branch, the over-erasing diagnostic (Fig. 3), the fraction of images erased, P-pooling's l.
DIAGNOSTIC_KEYS = ("id_aib", "triplet_aib", "id_esb", "triplet_esb", "clean_loss",
                   "erased_loss", "erased_frac", "zero_map_frac", "erased_pixel_frac",
                   "ppool_l_esb")


def _train_records(folder: RunFolder) -> list[dict[str, Any]]:
    """The run's ``train`` records from metrics.jsonl, in order (resumed segments included)."""
    records = []
    if folder.metrics.is_file():
        for line in folder.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("type") == "train":
                records.append(record)
    return records


def evaluate_occluded(model: torch.nn.Module, cfg: Config, occluded_data: ReIDData,
                      occluded_root: Path, run_dir: Path, epoch: int,
                      device: torch.device | str = "cpu",
                      gallery_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on the occluded-query variant and write ``run_dir/results_occluded.json``.

    ``gallery_features``: the gallery descriptors from the evaluation on the ordinary queries
    (the two benchmarks share the gallery byte for byte), so only the queries are embedded.
    The results say ``dataset: synthetic_occluded`` so that reports keep them apart.
    """
    with torch.no_grad():
        result = evaluate_model(model, occluded_data, cfg, device,
                                gallery_features=gallery_features)
    result.update(dataset="synthetic_occluded", query_set="occluded", epoch=epoch,
                  data_root=str(occluded_root), run_dir=str(run_dir))
    write_results(Path(run_dir) / OCCLUDED_RESULTS, result)
    log.info("%s on occluded queries: rank-1 %.1f%%, mAP %.1f%%", result["run"],
             100 * result["metrics"]["rank1"], 100 * result["metrics"]["mAP"])
    return result


def _run_one(cfg: Config, data: ReIDData, occluded_data: ReIDData,
             occluded_root: Path) -> dict[str, Any]:
    """Train (or resume, or skip) one run and evaluate it on both query sets."""
    folder = RunFolder(Path(cfg.train.output_dir) / cfg.train.run_name)
    resume = "auto" if folder.contents() else None
    if resume and folder.config.is_file():
        changes = diff_configs(load_config(folder.config), cfg)
        changed = [k for k in experiment_changes(changes)
                   if k not in ("train.output_dir", "train.run_name")]
        if changed:
            raise ConfigError(
                f"{folder.path} holds a run with other settings than this study's ("
                + ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in changed)
                + "): use another --out, or delete that run folder")
    trainer = Trainer(cfg, data=data, resume=resume)
    feats: dict[str, torch.Tensor] = {}
    normal = trainer.finished_results()
    if normal is None:
        trainer.fit(evaluate=False)
        normal = trainer.evaluate_and_save(features_out=feats)
    occluded_path = folder.path / OCCLUDED_RESULTS
    occluded = None
    if occluded_path.is_file():
        occluded = load_results(occluded_path)
        if occluded.get("epoch") != trainer.epoch:
            occluded = None  # written before the run trained further
    if occluded is None:
        occluded = evaluate_occluded(trainer.model, cfg, occluded_data, occluded_root,
                                     folder.path, trainer.epoch, trainer.device,
                                     gallery_features=feats.get("gallery"))
    records = _train_records(folder)
    last = records[-1] if records else {}
    return {"normal": normal, "occluded": occluded, "run_dir": str(folder.path),
            "train_seconds": sum(float(r.get("seconds", 0.0)) for r in records),
            "last_epoch": {k: last[k] for k in DIAGNOSTIC_KEYS if k in last}}


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (n - 1; 0 for one value), standard error and the values."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"values": [float(v) for v in arr], "mean": float(arr.mean()), "std": std,
            "stderr": std / math.sqrt(len(arr)), "n": len(arr)}


def summarize(runs: dict[str, dict[int, dict[str, Any]]], reference: str = "base") -> dict[str, Any]:
    """Aggregate per-seed results into the study's summary.

    ``runs[preset][seed]`` holds ``{"normal": results, "occluded": results}``. Returns
    ``models`` (per preset, query set and metric: values per seed, mean, std, stderr) and,
    when ``reference`` is among the presets, ``differences``: per other preset, query set and
    metric, the paired difference preset - reference for each seed both have, its mean, std
    and standard error, ``reliable`` (|mean| > 2 standard errors, with 2+ seeds), plus
    ``occlusion_gain``: (preset - reference on occluded) - (preset - reference on normal).
    ``diagnostics`` holds, per preset, the means over seeds of the last epoch's
    :data:`DIAGNOSTIC_KEYS` found in ``runs[preset][seed]["last_epoch"]`` (when present).
    """
    models: dict[str, Any] = {}
    for preset, per_seed in runs.items():
        seeds = sorted(per_seed)
        models[preset] = {"label": MODEL_LABELS.get(preset, preset), "seeds": seeds}
        for qs in QUERY_SETS:
            models[preset][qs] = {m: _mean_std([per_seed[s][qs]["metrics"][m] for s in seeds])
                                  for m in METRICS}
    diagnostics = {}
    for preset, per_seed in runs.items():
        last = [r.get("last_epoch", {}) for r in per_seed.values()]
        keys = [k for k in DIAGNOSTIC_KEYS if all(k in d for d in last) and last]
        if keys:
            diagnostics[preset] = {k: float(np.mean([d[k] for d in last])) for k in keys}
    summary: dict[str, Any] = {"models": models, "reference": reference, "differences": {},
                               "diagnostics": diagnostics}
    if reference not in runs:
        return summary
    for preset, per_seed in runs.items():
        if preset == reference:
            continue
        seeds = sorted(set(per_seed) & set(runs[reference]))
        if not seeds:
            continue
        diff: dict[str, Any] = {"seeds": seeds}

        def delta(qs: str, m: str, s: int, p: dict = per_seed) -> float:
            return p[s][qs]["metrics"][m] - runs[reference][s][qs]["metrics"][m]

        for qs in QUERY_SETS:
            diff[qs] = {}
            for m in METRICS:
                stats = _mean_std([delta(qs, m, s) for s in seeds])
                stats["reliable"] = len(seeds) > 1 and abs(stats["mean"]) > 2 * stats["stderr"]
                diff[qs][m] = stats
        diff["occlusion_gain"] = {}
        for m in METRICS:
            stats = _mean_std([delta("occluded", m, s) - delta("normal", m, s) for s in seeds])
            stats["reliable"] = len(seeds) > 1 and abs(stats["mean"]) > 2 * stats["stderr"]
            diff["occlusion_gain"][m] = stats
        summary["differences"][preset] = diff
    return summary


def _pm(stats: dict[str, Any], signed: bool = False) -> str:
    """``mean ± std`` in percentage points, one decimal."""
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['std']:.1f}"


def _per_seed(stats: dict[str, Any]) -> str:
    """The per-seed values in percentage points, signed."""
    return ", ".join(f"{100 * v:+.1f}" for v in stats["values"])


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown: one table of mean ± std per model, one of paired differences."""
    lines = ["| Model | Seeds | rank-1 (normal) | mAP (normal) | rank-1 (occluded) | "
             "mAP (occluded) |", "| :-- | --: | --: | --: | --: | --: |"]
    for model in summary["models"].values():
        cells = [_pm(model[qs][m]) for qs in QUERY_SETS for m in METRICS]
        lines.append(f"| {model['label']} | {len(model['seeds'])} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        ref = summary["models"][summary["reference"]]["label"]
        lines += ["", f"Paired differences to {ref} (same seed), percentage points: mean ± std "
                  "over seeds [per seed]; * marks |mean| > 2 standard errors.", "",
                  "| Difference | Query set | rank-1 | mAP |", "| :-- | :-- | --: | --: |"]
        for preset, diff in summary["differences"].items():
            name = f"{summary['models'][preset]['label']} − {ref}"
            rows = [(qs, diff[qs]) for qs in QUERY_SETS]
            rows.append(("occluded − normal", diff["occlusion_gain"]))
            for qs, stats in rows:
                cells = [f"{_pm(stats[m], signed=True)}{' *' if stats[m]['reliable'] else ''} "
                         f"[{_per_seed(stats[m])}]" for m in METRICS]
                lines.append(f"| {name} | {qs} | " + " | ".join(cells) + " |")
    diagnostics = summary.get("diagnostics") or {}
    keys = [k for k in DIAGNOSTIC_KEYS if any(k in d for d in diagnostics.values())]
    if keys:
        lines += ["", "Last training epoch, mean over seeds: loss terms per branch, the "
                  "over-erasing diagnostic (loss of the last batch, clean and with every image "
                  "erased), the fraction of images erased, P-pooling's l.", "",
                  "| Model | " + " | ".join(keys) + " |", "| :-- |" + " --: |" * len(keys)]
        for preset, values in diagnostics.items():
            cells = [f"{values[k]:.3f}" if k in values else "-" for k in keys]
            label = summary["models"][preset]["label"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart: per metric a panel, per model a pair of bars (normal, occluded queries),
    mean over seeds with ± std error bars and each seed as a dot; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary["models"].values())
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), squeeze=False)
    width = 0.38
    colors = {"normal": "#4c72b0", "occluded": "#dd8452"}
    for ax, metric in zip(axes[0], METRICS, strict=True):
        x = np.arange(len(models))
        for k, qs in enumerate(QUERY_SETS):
            pos = x + (k - 0.5) * width
            means = [100 * m[qs][metric]["mean"] for m in models]
            stds = [100 * m[qs][metric]["std"] for m in models]
            ax.bar(pos, means, width, yerr=stds, capsize=4, color=colors[qs],
                   label=f"{qs} queries", edgecolor="black", linewidth=0.5)
            for p, m in zip(pos, models, strict=True):
                values = [100 * v for v in m[qs][metric]["values"]]
                ax.plot([p] * len(values), values, "o", color="black", markersize=3, zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels([m["label"] for m in models])
        ax.set_ylabel(f"{_METRIC_TITLES[metric]} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(_METRIC_TITLES[metric])
    seeds = sorted({len(m["seeds"]) for m in models})
    fig.suptitle(f"Synthetic benchmark, mean ± std over {'/'.join(map(str, seeds))} seeds "
                 "(dots: seeds)", fontsize=10)
    axes[0][0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_study(out_dir: Path = Path("runs/study"), models: Sequence[str] = DEFAULT_MODELS,
              seeds: Sequence[int] = DEFAULT_SEEDS,
              settings: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate every (model, seed), then write and return the summary.

    ``settings`` are ``section.key=value`` overrides applied after :data:`STUDY_SETTINGS`
    (``train.seed``, ``train.run_name``, ``train.output_dir``, ``data.root`` and
    ``data.name`` are the study's own and refused). Finished runs are reused, interrupted ones
    resumed. Writes ``study.json`` (the summary with every run's numbers), ``study.md`` and
    ``study.png`` into ``out_dir`` and prints the table.
    """
    start = time.time()
    out_dir = Path(out_dir).expanduser()
    models, seeds = list(models), list(seeds)
    extra = list(settings or [])
    _check_arguments(models, seeds, extra)
    all_settings = STUDY_SETTINGS + extra
    cfgs = _configs(out_dir, models, seeds, all_settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_run_logging(out_dir)
    clean_root, occluded_root = _benchmarks(out_dir, next(iter(cfgs.values())))
    data = load_dataset("synthetic", clean_root)
    occluded_data = load_dataset("synthetic", occluded_root)
    if [(r.pid, r.camid, Path(r.path).name) for r in data.gallery] != [
            (r.pid, r.camid, Path(r.path).name) for r in occluded_data.gallery]:
        raise RuntimeError(f"{occluded_root} and {clean_root} do not share their gallery; "
                           "delete both and start again")

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for (preset, seed), cfg in cfgs.items():
        log.info("study: %s, seed %d", preset, seed)
        runs.setdefault(preset, {})[seed] = _run_one(cfg, data, occluded_data, occluded_root)

    summary = summarize(runs)
    summary.update({
        "esreid_version": __version__,
        "settings": all_settings,
        "benchmark": {"normal": str(clean_root), "occluded": str(occluded_root),
                      "train_images": len(data.train), "train_ids": data.num_train_pids,
                      "query": len(data.query), "gallery": len(data.gallery)},
        "runs": {preset: {str(seed): {"run_dir": r["run_dir"],
                                      "train_seconds": round(r["train_seconds"], 1),
                                      "normal": r["normal"]["metrics"],
                                      "occluded": r["occluded"]["metrics"],
                                      "last_epoch": r["last_epoch"]}
                          for seed, r in per_seed.items()}
                 for preset, per_seed in runs.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": round(time.time() - start, 1),
    })
    table = format_summary(summary)
    atomic_write_json(out_dir / "study.json", summary)
    atomic_write_text(out_dir / "study.md", table)
    plot_summary(summary, out_dir / "study.png")
    print()
    print(f"esreid study: {len(models)} models x {len(seeds)} seeds on the synthetic benchmark "
          f"({len(data.train)} train images of {data.num_train_pids} ids; {len(data.query)} "
          f"queries, each also with one body part occluded)")
    print(table)
    print(f"summary: {out_dir / 'study.json'}, {out_dir / 'study.md'}, {out_dir / 'study.png'}")
    return summary
