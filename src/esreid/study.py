"""``esreid study``: does ES-Net learn more? Models x seeds on the synthetic benchmark.

A study is a :class:`StudyDesign`: the models (a preset plus overrides, each over the first
seeds of the study), the query sets every model is evaluated on (variants of the same test
set: the ordinary queries and, evaluation only, queries with a body part covered or re-drawn,
see ``docs/synthetic.md``), the training settings and the benchmark options. Two designs:

- ``occlusion`` (the default): Base, ESB and ES-Net on the ordinary benchmark, normal and
  occluded queries (docs/experiments.md, "the first study");
- ``mechanism``: the benchmark with a dominant but unreliable cue (every training identity
  tells itself apart by its upper garment, which each query wears in another colour), Base
  and ES-Net over 3 seeds and two controls over 2 (ES-Net erasing random maps of BESM's area,
  ES-Net with GAP in the ESB), on normal, changed-upper and occluded-upper queries, plus how
  well BESM's erasing targets the dominant part.

Every model is trained with the same backbone, image size, budget and seeds. The summary
gives mean ± std over seeds and the paired differences to Base per seed (same seed, same
benchmark, same batches).

Layout of ``<out>``::

    synthetic/ synthetic_<set>/       the benchmarks (generated once, then reused)
    runs/<model>_seed<S>/             ordinary run folders: results.json (ordinary queries)
                                      and results_<set>.json (each other query set)
    study.json  study.md  study.png   the summary, its table and its figure

A run whose results are there is not trained again; an interrupted one is resumed from its
last checkpoint, so the command can simply be started again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esreid import __version__
from esreid.config import Config, ConfigError, diff_configs, experiment_changes, load_config
from esreid.data import load_dataset
from esreid.data.loader import read_rgb
from esreid.data.records import ReIDData
from esreid.data.synthetic import ensure_synthetic
from esreid.engine.checkpoint import RunFolder
from esreid.engine.evaluate import evaluate_model
from esreid.engine.trainer import Trainer
from esreid.metrics import load_results, write_results
from esreid.saliency.erasing import besm_erase
from esreid.utils import atomic_write_json, atomic_write_text, setup_run_logging

log = logging.getLogger("esreid.study")

#: Presets the study compares by default, with their labels.
MODEL_LABELS = {"base": "Base", "esb": "ESB", "esnet": "ES-Net"}
DEFAULT_MODELS = ("base", "esb", "esnet")
DEFAULT_SEEDS = (0, 1, 2)
#: The two query sets of the occlusion design.
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

#: The mechanism design's settings (docs/experiments.md, "the mechanism study"): a ResNet-10
#: from scratch at 96x48, so that layer4's map has 6x3 cells, and a budget chosen from a pilot
#: of Base alone, before any ES-Net run, so that Base nearly fits its training set.
MECHANISM_SETTINGS = [
    "model.backbone=resnet10",
    "model.pretrained=none",
    "data.name=synthetic",
    "data.synth_ids=200",
    "data.height=96",
    "data.width=48",
    "data.ids_per_batch=8",
    "data.num_instances=4",
    "data.num_workers=1",
    "optim.epochs=20",
    "optim.iters_per_epoch=30",
    "optim.lr=3.5e-4",
    "optim.warmup_epochs=1",
    "optim.milestones=[16]",
    "train.checkpoint_every=1",
    "train.progress=false",
    "train.tensorboard=false",
    "eval.batch_size=256",
]

# Keys the study sets itself for every run.
_STUDY_KEYS = ("train.seed", "train.run_name", "train.output_dir", "data.root", "data.name")


@dataclass(frozen=True)
class StudyModel:
    """One model of a study: a preset with overrides, trained on the first ``max_seeds`` of
    the study's seeds (all when None). ``key`` names its run folders (``<key>_seed<S>``)."""

    key: str
    label: str
    preset: str
    overrides: tuple[str, ...] = ()
    max_seeds: int | None = None


@dataclass(frozen=True)
class QuerySet:
    """A query set: the test set with the queries generated with ``options`` (none for the
    ordinary queries). Its benchmark is ``synthetic_<name>`` and its results
    ``results_<name>.json``; the gallery is the ordinary one, byte for byte."""

    name: str
    title: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyDesign:
    """What a study compares: models, query sets (the first is the ordinary one), training
    settings and the options of every benchmark it generates."""

    name: str
    models: tuple[StudyModel, ...]
    query_sets: tuple[QuerySet, ...]
    settings: tuple[str, ...]
    benchmark: dict[str, Any] = field(default_factory=dict)
    reference: str = "base"
    #: The part whose erasing the targeting measurement checks (None: not measured).
    target_part: str | None = None

    def model(self, key: str) -> StudyModel:
        """The design's model ``key``, or the plain preset of that name."""
        for m in self.models:
            if m.key == key:
                return m
        return StudyModel(key, MODEL_LABELS.get(key, key), key)


DESIGNS: dict[str, StudyDesign] = {
    "occlusion": StudyDesign(
        name="occlusion",
        models=tuple(StudyModel(k, MODEL_LABELS[k], k) for k in DEFAULT_MODELS),
        query_sets=(QuerySet("normal", "normal"),
                    QuerySet("occluded", "occluded", {"occlude_queries": "all"})),
        settings=tuple(STUDY_SETTINGS),
    ),
    "mechanism": StudyDesign(
        name="mechanism",
        models=(StudyModel("base", "Base", "base"),
                StudyModel("esnet", "ES-Net", "esnet"),
                StudyModel("esnet_randmap", "ES-Net, random maps", "esnet",
                           ("erase.method=randmap",), max_seeds=2),
                StudyModel("esnet_gap", "ES-Net, GAP in the ESB", "esnet",
                           ("model.esb_pool=gap",), max_seeds=2)),
        query_sets=(QuerySet("normal", "normal"),
                    QuerySet("changed", "changed upper", {"change_queries": "upper"}),
                    QuerySet("occluded", "occluded upper", {"occlude_queries": "upper"})),
        settings=tuple(MECHANISM_SETTINGS),
        benchmark={"dominant_cue": "upper"},
        target_part="upper",
    ),
}


def _results_name(query_set: str) -> str:
    return "results.json" if query_set == "normal" else f"results_{query_set}.json"


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


def _configs(out_dir: Path, models: Sequence[StudyModel], seeds: Sequence[int],
             settings: Sequence[str]) -> dict[tuple[str, int], Config]:
    """The config of every run, loaded (and so validated) before anything is trained."""
    cfgs = {}
    # Seed by seed, so that a study stopped early already holds complete paired comparisons.
    for i, seed in enumerate(seeds):
        for model in models:
            if model.max_seeds is not None and i >= model.max_seeds:
                continue
            overrides = [*settings, *model.overrides, f"data.root={out_dir / 'synthetic'}",
                         f"train.output_dir={out_dir / 'runs'}", f"train.seed={seed}",
                         f"train.run_name={model.key}_seed{seed}"]
            cfgs[model.key, seed] = load_config(model.preset, overrides)
    first = next(iter(cfgs.values())).data
    for (key, _), cfg in cfgs.items():
        if (cfg.data.height, cfg.data.width) != (first.height, first.width):
            raise ConfigError(f"--models {key}: its image size differs from the others'; "
                              "the study compares models at one size")
    return cfgs


def _benchmarks(out_dir: Path, cfg: Config, design: StudyDesign) -> dict[str, Path]:
    """Every query set's benchmark (same ids, seed, size and options; the first is the one
    the models train on)."""
    params = {"num_ids": cfg.data.synth_ids, "seed": cfg.data.synth_seed,
              "height": cfg.data.height, "width": cfg.data.width, **design.benchmark}
    roots = {}
    for qs in design.query_sets:
        folder = out_dir / ("synthetic" if qs.name == "normal" else f"synthetic_{qs.name}")
        roots[qs.name] = ensure_synthetic(folder, **params, **qs.options)
    return roots


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


def evaluate_query_set(model: torch.nn.Module, cfg: Config, data: ReIDData, root: Path,
                       run_dir: Path, epoch: int, query_set: str,
                       device: torch.device | str = "cpu",
                       gallery_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on query set ``query_set`` (benchmark ``data`` at ``root``) and write
    ``run_dir/results_<query_set>.json``.

    ``gallery_features``: the gallery descriptors from the evaluation on the ordinary queries
    (the benchmarks share the gallery byte for byte), so only the queries are embedded. The
    results say ``dataset: synthetic_<query_set>`` so that reports keep them apart.
    """
    with torch.no_grad():
        result = evaluate_model(model, data, cfg, device, gallery_features=gallery_features)
    result.update(dataset=f"synthetic_{query_set}", query_set=query_set, epoch=epoch,
                  data_root=str(root), run_dir=str(run_dir))
    write_results(Path(run_dir) / _results_name(query_set), result)
    log.info("%s on %s queries: rank-1 %.1f%%, mAP %.1f%%", result["run"], query_set,
             100 * result["metrics"]["rank1"], 100 * result["metrics"]["mAP"])
    return result


def evaluate_occluded(model: torch.nn.Module, cfg: Config, occluded_data: ReIDData,
                      occluded_root: Path, run_dir: Path, epoch: int,
                      device: torch.device | str = "cpu",
                      gallery_features: torch.Tensor | None = None) -> dict[str, Any]:
    """:func:`evaluate_query_set` for the occluded queries (``results_occluded.json``)."""
    return evaluate_query_set(model, cfg, occluded_data, occluded_root, run_dir, epoch,
                              "occluded", device, gallery_features)


def _run_one(cfg: Config, datasets: dict[str, ReIDData],
             roots: dict[str, Path]) -> tuple[Trainer, dict[str, Any]]:
    """Train (or resume, or skip) one run and evaluate it on every query set."""
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
    trainer = Trainer(cfg, data=datasets["normal"], resume=resume)
    feats: dict[str, torch.Tensor] = {}
    results = {"normal": trainer.finished_results()}
    if results["normal"] is None:
        trainer.fit(evaluate=False)
        results["normal"] = trainer.evaluate_and_save(features_out=feats)
    for name, data in datasets.items():
        if name == "normal":
            continue
        path = folder.path / _results_name(name)
        result = load_results(path) if path.is_file() else None
        if result is not None and result.get("epoch") != trainer.epoch:
            result = None  # written before the run trained further
        if result is None:
            result = evaluate_query_set(trainer.model, cfg, data, roots[name], folder.path,
                                        trainer.epoch, name, trainer.device,
                                        gallery_features=feats.get("gallery"))
        results[name] = result
    records = _train_records(folder)
    last = records[-1] if records else {}
    return trainer, {**results, "run_dir": str(folder.path),
                     "train_seconds": sum(float(r.get("seconds", 0.0)) for r in records),
                     "last_epoch": {k: last[k] for k in DIAGNOSTIC_KEYS if k in last}}


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (n - 1; 0 for one value), standard error and the values."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"values": [float(v) for v in arr], "mean": float(arr.mean()), "std": std,
            "stderr": std / math.sqrt(len(arr)), "n": len(arr)}


def _reliable(stats: dict[str, Any]) -> dict[str, Any]:
    stats["reliable"] = stats["n"] > 1 and abs(stats["mean"]) > 2 * stats["stderr"]
    return stats


def summarize(runs: dict[str, dict[int, dict[str, Any]]], reference: str = "base",
              query_sets: Sequence[str] = QUERY_SETS,
              labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Aggregate per-seed results into the study's summary.

    ``runs[model][seed]`` holds ``{query_set: results}`` for every name of ``query_sets``
    (the first is the ordinary one). Returns ``models`` (per model, query set and metric:
    values per seed, mean, std, stderr) and, when ``reference`` is among the models,
    ``differences``: per other model, query set and metric, the paired difference
    model - reference for each seed both have, its mean, std and standard error, ``reliable``
    (|mean| > 2 standard errors, with 2+ seeds), plus ``<set>_gain`` for every other set:
    (model - reference on that set) - (model - reference on the ordinary queries).
    ``diagnostics`` holds, per model, the means over seeds of the last epoch's
    :data:`DIAGNOSTIC_KEYS` found in ``runs[model][seed]["last_epoch"]`` (when present).
    """
    labels = labels or {}
    query_sets = list(query_sets)
    models: dict[str, Any] = {}
    for key, per_seed in runs.items():
        seeds = sorted(per_seed)
        models[key] = {"label": labels.get(key, MODEL_LABELS.get(key, key)), "seeds": seeds}
        for qs in query_sets:
            models[key][qs] = {m: _mean_std([per_seed[s][qs]["metrics"][m] for s in seeds])
                               for m in METRICS}
    diagnostics = {}
    for key, per_seed in runs.items():
        last = [r.get("last_epoch", {}) for r in per_seed.values()]
        keys = [k for k in DIAGNOSTIC_KEYS if all(k in d for d in last) and last]
        if keys:
            diagnostics[key] = {k: float(np.mean([d[k] for d in last])) for k in keys}
    summary: dict[str, Any] = {"models": models, "reference": reference, "differences": {},
                               "diagnostics": diagnostics, "query_sets": query_sets}
    if reference not in runs:
        return summary
    ordinary = query_sets[0]
    for key, per_seed in runs.items():
        if key == reference:
            continue
        seeds = sorted(set(per_seed) & set(runs[reference]))
        if not seeds:
            continue
        diff: dict[str, Any] = {"seeds": seeds}

        def delta(qs: str, m: str, s: int, p: dict = per_seed) -> float:
            return p[s][qs]["metrics"][m] - runs[reference][s][qs]["metrics"][m]

        for qs in query_sets:
            diff[qs] = {m: _reliable(_mean_std([delta(qs, m, s) for s in seeds]))
                        for m in METRICS}
        for qs in query_sets[1:]:
            diff[f"{qs}_gain"] = {
                m: _reliable(_mean_std([delta(qs, m, s) - delta(ordinary, m, s) for s in seeds]))
                for m in METRICS}
        summary["differences"][key] = diff
    return summary


def _pm(stats: dict[str, Any], signed: bool = False) -> str:
    """``mean ± std`` in percentage points, one decimal."""
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.1f} ± {100 * stats['std']:.1f}"


def _per_seed(stats: dict[str, Any]) -> str:
    """The per-seed values in percentage points, signed."""
    return ", ".join(f"{100 * v:+.1f}" for v in stats["values"])


def format_summary(summary: dict[str, Any], titles: dict[str, str] | None = None) -> str:
    """The summary as Markdown: one table of mean ± std per model, one of paired differences,
    the last epoch's diagnostics and, when measured, the targeting of the erasing."""
    query_sets = summary.get("query_sets", list(QUERY_SETS))
    titles = {**{qs: qs for qs in query_sets}, **(titles or summary.get("titles") or {})}
    header = " | ".join(f"{_METRIC_TITLES[m]} ({titles[qs]})" for qs in query_sets
                        for m in METRICS)
    lines = [f"| Model | Seeds | {header} |",
             "| :-- | --: |" + " --: |" * (len(query_sets) * len(METRICS))]
    for model in summary["models"].values():
        cells = [_pm(model[qs][m]) for qs in query_sets for m in METRICS]
        lines.append(f"| {model['label']} | {len(model['seeds'])} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        ref = summary["models"][summary["reference"]]["label"]
        lines += ["", f"Paired differences to {ref} (same seed), percentage points: mean ± std "
                  "over seeds [per seed]; * marks |mean| > 2 standard errors.", "",
                  "| Difference | Query set | rank-1 | mAP |", "| :-- | :-- | --: | --: |"]
        for key, diff in summary["differences"].items():
            name = f"{summary['models'][key]['label']} − {ref}"
            rows = [(titles[qs], diff[qs]) for qs in query_sets]
            rows += [(f"{titles[qs]} − {titles[query_sets[0]]}", diff[f"{qs}_gain"])
                     for qs in query_sets[1:]]
            for title, stats in rows:
                cells = [f"{_pm(stats[m], signed=True)}{' *' if stats[m]['reliable'] else ''} "
                         f"[{_per_seed(stats[m])}]" for m in METRICS]
                lines.append(f"| {name} | {title} | " + " | ".join(cells) + " |")
    diagnostics = summary.get("diagnostics") or {}
    keys = [k for k in DIAGNOSTIC_KEYS if any(k in d for d in diagnostics.values())]
    if keys:
        lines += ["", "Last training epoch, mean over seeds: loss terms per branch, the "
                  "over-erasing diagnostic (loss of the last batch, clean and with every image "
                  "erased), the fractions of images erased, of maps without contrast (not "
                  "erased) and of pixels erased, P-pooling's l.", "",
                  "| Model | " + " | ".join(keys) + " |", "| :-- |" + " --: |" * len(keys)]
        for key, values in diagnostics.items():
            cells = [f"{values[k]:.3f}" if k in values else "-" for k in keys]
            label = summary["models"][key]["label"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    targeting = summary.get("targeting")
    if targeting:
        part = targeting["part"]
        lines += ["", f"Targeting: the share of the erased pixels inside the {part} part's box "
                  f"on clean training images ({targeting['images']} per run; chance = the box's "
                  f"share of the image, {100 * targeting['chance']:.1f}%), mean over seeds, "
                  "with the ESB's CG-RAM maps as training computes them (BatchNorm in training "
                  "mode) and in eval mode, with uniform random maps of the same resolution, and "
                  "the IoU of the train- and eval-mode masks.", "",
                  f"| Model | in {part} (train mode) | in {part} (eval mode) | random maps | "
                  "train/eval IoU | maps without contrast |",
                  "| :-- | --: | --: | --: | --: | --: |"]
        for key, t in targeting["models"].items():
            label = summary["models"][key]["label"]
            lines.append(f"| {label} | {_pm(t['inside_train'])} | {_pm(t['inside_eval'])} | "
                         f"{_pm(t['inside_random'])} | "
                         f"{t['iou']['mean']:.3f} ± {t['iou']['std']:.3f} | "
                         f"{_pm(t['zero_maps'])} |")
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart: per metric a panel, per model a group of bars (one per query set), mean
    over seeds with ± std error bars and each seed as a dot; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    query_sets = summary.get("query_sets", list(QUERY_SETS))
    titles = {**{qs: qs for qs in query_sets}, **(summary.get("titles") or {})}
    models = list(summary["models"].values())
    fig, axes = plt.subplots(1, len(METRICS), figsize=(max(4.2, 1.6 * len(models) + 1.5)
                                                       * len(METRICS), 3.8), squeeze=False)
    width = 0.8 / len(query_sets)
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, metric in zip(axes[0], METRICS, strict=True):
        x = np.arange(len(models))
        for k, qs in enumerate(query_sets):
            pos = x + (k - (len(query_sets) - 1) / 2) * width
            means = [100 * m[qs][metric]["mean"] for m in models]
            stds = [100 * m[qs][metric]["std"] for m in models]
            ax.bar(pos, means, width, yerr=stds, capsize=3, color=palette[k % len(palette)],
                   label=f"{titles[qs]} queries", edgecolor="black", linewidth=0.5)
            for p, m in zip(pos, models, strict=True):
                values = [100 * v for v in m[qs][metric]["values"]]
                ax.plot([p] * len(values), values, "o", color="black", markersize=3, zorder=3)
        ax.set_xticks(x)
        ax.set_xticklabels([m["label"].replace(", ", ",\n") for m in models], fontsize=8)
        ax.set_ylabel(f"{_METRIC_TITLES[metric]} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(_METRIC_TITLES[metric])
    seeds = sorted({len(m["seeds"]) for m in models})
    fig.suptitle(f"Synthetic benchmark, mean ± std over {'/'.join(map(str, seeds))} seeds "
                 "(dots: seeds)", fontsize=10)
    # One legend for both panels, between the title and the axes: inside an axis it would
    # cover a bar whichever corner it took (the normal-query bars reach the top).
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.93),
               ncol=len(query_sets), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: Clean training images the targeting measurement looks at per run (whole identities).
TARGETING_IDS = 16
#: Training images the targeting figure shows (of the design's first erasing run).
TARGETING_EXAMPLES = 8


def _erased_mask(images: torch.Tensor, maps: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, H, W] bool: the pixels BESM erases from ``maps`` (every image selected; a map
    without contrast erases nothing)."""
    sentinel = 1e4  # no normalised pixel comes near it
    erased, _ = besm_erase(images, maps, ratio, 1.0, sentinel)
    return (erased == sentinel).all(dim=1)


def measure_targeting(trainer: Trainer, root: Path, part: str,
                      num_ids: int = TARGETING_IDS, examples: int = 0) -> dict[str, Any]:
    """How well BESM's erasing hits ``part`` on clean training images of a trained run.

    The first ``num_ids`` training identities with ``data.num_instances`` images each, at the
    model's size without augmentation, in batches of the run's J x K. For each image the
    ESB's CG-RAM maps (Eq. 5, easiest positive in its batch) with the BatchNorm layers in
    training mode, as training computes them (on a copy, so no running statistic changes),
    and in eval mode; the run's ratio R erased from each. Returns ``inside_train`` /
    ``inside_eval`` (share of the erased pixels inside the part's box), ``inside_random``
    (the same for uniform random maps of the same resolution), ``chance`` (the box's share of
    the image), ``iou`` (train- vs eval-mode masks, over images either erases), ``zero_maps``
    (share of training-mode maps without contrast) and ``images``. With ``examples`` > 0 it
    also returns ``examples``: the first that many images (uint8 HWC), their part boxes and
    their train- and eval-mode masks, for :func:`plot_targeting`.
    """
    from esreid.data.synthetic import part_boxes
    from esreid.data.transforms import build_transforms

    cfg = trainer.cfg
    ratio = float(trainer.model.eraser.diagnostic_ratio)
    k = cfg.data.num_instances
    by_pid: dict[int, list] = {}
    for record in trainer.data.train:
        by_pid.setdefault(record.pid, []).append(record)
    records = [r for pid in sorted(by_pid)[:num_ids] for r in by_pid[pid][:k]
               if len(by_pid[pid]) >= k]
    boxes = part_boxes(root, part, [Path(r.path).name for r in records])
    transform = build_transforms(cfg.data.height, cfg.data.width, is_train=False)
    images = torch.stack([transform(read_rgb(r.path)) for r in records])
    pids = torch.tensor([r.pid for r in records])
    height, width = images.shape[-2:]
    inside = torch.zeros(len(records), height, width, dtype=torch.bool)
    for i, r in enumerate(records):
        top, bottom, left, right = boxes[Path(r.path).name]
        inside[i, top:bottom, left:right] = True
    train_model = copy.deepcopy(trainer.model).cpu().train()
    eval_model = copy.deepcopy(trainer.model).cpu().eval()
    gen = torch.Generator().manual_seed(0)
    batch = cfg.data.ids_per_batch * k
    masks: dict[str, list[torch.Tensor]] = {"train": [], "eval": [], "random": []}
    zero = []
    for start in range(0, len(records), batch):
        x, y = images[start:start + batch], pids[start:start + batch]
        train_maps = train_model.saliency_maps(x, y)
        flat = train_maps.flatten(1)
        zero.append(flat.amax(1) <= flat.amin(1))
        masks["train"].append(_erased_mask(x, train_maps, ratio))
        masks["eval"].append(_erased_mask(x, eval_model.saliency_maps(x, y), ratio))
        random_maps = torch.rand(train_maps.shape, generator=gen)
        masks["random"].append(_erased_mask(x, random_maps, ratio))
    m = {name: torch.cat(parts) for name, parts in masks.items()}

    def share(mask: torch.Tensor) -> float:
        return float((mask & inside).sum() / mask.sum().clamp_min(1))

    union = (m["train"] | m["eval"]).flatten(1).sum(1)
    both = union > 0
    iou = ((m["train"] & m["eval"]).flatten(1).sum(1)[both] / union[both]).float()
    out: dict[str, Any] = {
        "inside_train": share(m["train"]), "inside_eval": share(m["eval"]),
        "inside_random": share(m["random"]), "chance": float(inside.float().mean()),
        "iou": float(iou.mean()) if len(iou) else float("nan"),
        "zero_maps": float(torch.cat(zero).float().mean()), "images": len(records)}
    if examples > 0:
        # One image per identity, so that the figure shows different people.
        rows = list(range(0, len(records), k))[:examples]
        out["examples"] = {
            "images": [np.asarray(read_rgb(records[i].path).resize((width, height)))
                       for i in rows],
            "boxes": [boxes[Path(records[i].path).name] for i in rows],
            "train": [m["train"][i].numpy() for i in rows],
            "eval": [m["eval"][i].numpy() for i in rows], "run": cfg.train.run_name}
    return out


def plot_targeting(targeting: dict[str, Any], labels: dict[str, str], path: Path,
                   examples: dict[str, Any] | None = None) -> Path:
    """The targeting figure, as PNG: per model the share of BESM's erased pixels inside the
    part's box (training-mode and eval-mode maps, random maps; chance as a line) and the IoU
    of the training- and eval-mode masks; with ``examples`` (from :func:`measure_targeting`)
    a row of training images with the box and what each mode erases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keys = list(targeting["models"])
    n_ex = len(examples["images"]) if examples else 0
    fig = plt.figure(figsize=(max(9.0, 1.1 * n_ex), 9.0 if n_ex else 3.6), layout="constrained")
    charts, strip = fig.subfigures(2, 1, height_ratios=[1.0, 1.5]) if n_ex else (fig, None)
    share_ax, iou_ax = charts.subplots(1, 2)
    x = np.arange(len(keys))
    width = 0.27
    series = (("inside_train", "CG-RAM, training mode", "#4c72b0"),
              ("inside_eval", "CG-RAM, eval mode", "#8172b3"),
              ("inside_random", "random maps", "#bbbbbb"))
    for j, (name, title, colour) in enumerate(series):
        stats = [targeting["models"][k][name] for k in keys]
        share_ax.bar(x + (j - 1) * width, [100 * s["mean"] for s in stats], width,
                     yerr=[100 * s["std"] for s in stats], capsize=3, color=colour,
                     edgecolor="black", linewidth=0.5, label=title)
    share_ax.axhline(100 * targeting["chance"], color="#c44e52", linestyle="--",
                     label=f"chance ({100 * targeting['chance']:.1f}%)")
    share_ax.set_ylabel(f"erased pixels inside the {targeting['part']} box (%)")
    share_ax.set_ylim(0, 100)
    share_ax.legend(fontsize=7, loc="upper right")
    iou = [targeting["models"][k]["iou"] for k in keys]
    iou_ax.bar(x, [s["mean"] for s in iou], 0.5, yerr=[s["std"] for s in iou], capsize=3,
               color="#55a868", edgecolor="black", linewidth=0.5)
    iou_ax.set_ylim(0, 1)
    iou_ax.set_ylabel("IoU, training- vs eval-mode mask")
    for ax in (share_ax, iou_ax):
        ax.set_xticks(x)
        ax.set_xticklabels([labels.get(k, k).replace(", ", ",\n") for k in keys], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    share_ax.set_title("Where BESM erases (clean training images)", fontsize=9)
    iou_ax.set_title("Do training and eval mode erase the same pixels?", fontsize=9)
    axes = strip.subplots(2, n_ex, squeeze=False) if n_ex else np.empty((2, 0))
    for row, (mode, title) in enumerate((("train", "training mode"), ("eval", "eval mode"))):
        for i, ax in enumerate(axes[row]):
            image = examples["images"][i].astype(np.float32) / 255.0
            mask = examples[mode][i]
            image[mask] = 0.15 * image[mask] + 0.85 * np.array([0.15, 0.3, 1.0])
            ax.imshow(image)
            y0, y1, x0, x1 = examples["boxes"][i]
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="#ff3030", linewidth=1.2, linestyle="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
    if n_ex:
        strip.suptitle(f"{examples['run']}: what BESM erases (blue) from its maps in each mode; "
                       f"dashed: the {targeting['part']} box", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _summarize_targeting(per_model: dict[str, list[dict[str, float]]], part: str
                         ) -> dict[str, Any]:
    """Mean ± std over seeds of each targeting figure, per model."""
    keys = ("inside_train", "inside_eval", "inside_random", "iou", "zero_maps")
    first = next(iter(per_model.values()))[0]
    return {"part": part, "chance": first["chance"], "images": first["images"],
            "models": {key: {k: _mean_std([run[k] for run in runs]) for k in keys}
                       for key, runs in per_model.items()}}


def run_study(out_dir: Path = Path("runs/study"), models: Sequence[str] | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, settings: Sequence[str] | None = None,
              design: str | StudyDesign = "occlusion") -> dict[str, Any]:
    """Train and evaluate every (model, seed) of ``design``, then write and return the summary.

    ``models``: keys of the design's models (or plain preset names) to run; default all of
    them. ``settings`` are ``section.key=value`` overrides applied after the design's
    settings (``train.seed``, ``train.run_name``, ``train.output_dir``, ``data.root`` and
    ``data.name`` are the study's own and refused). Finished runs are reused, interrupted ones
    resumed. Writes ``study.json`` (the summary with every run's numbers), ``study.md`` and
    ``study.png`` into ``out_dir`` and prints the table.
    """
    start = time.time()
    if isinstance(design, str):
        if design not in DESIGNS:
            raise ConfigError(f"--design: {design!r} is not one of {', '.join(DESIGNS)}")
        design = DESIGNS[design]
    out_dir = Path(out_dir).expanduser()
    keys = [m.key for m in design.models] if models is None else list(models)
    seeds = list(seeds)
    extra = list(settings or [])
    _check_arguments(keys, seeds, extra)
    chosen = [design.model(k) for k in keys]
    all_settings = list(design.settings) + extra
    cfgs = _configs(out_dir, chosen, seeds, all_settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_run_logging(out_dir)
    roots = _benchmarks(out_dir, next(iter(cfgs.values())), design)
    datasets = {name: load_dataset("synthetic", root) for name, root in roots.items()}
    data = datasets["normal"]
    shared = [(r.pid, r.camid, Path(r.path).name) for r in data.gallery]
    for name, other in datasets.items():
        if [(r.pid, r.camid, Path(r.path).name) for r in other.gallery] != shared:
            raise RuntimeError(f"{roots[name]} and {roots['normal']} do not share their "
                               "gallery; delete both and start again")

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    targeting: dict[str, list[dict[str, float]]] = {}
    examples = None  # the first erasing run's example masks, for the targeting figure
    for (key, seed), cfg in cfgs.items():
        log.info("study: %s, seed %d", key, seed)
        trainer, result = _run_one(cfg, datasets, roots)
        runs.setdefault(key, {})[seed] = result
        if design.target_part and getattr(trainer.model.eraser, "ratio", None) is not None:
            wanted = TARGETING_EXAMPLES if examples is None else 0
            measured = measure_targeting(trainer, roots["normal"], design.target_part,
                                         examples=wanted)
            examples = measured.pop("examples", examples)
            targeting.setdefault(key, []).append(measured)

    labels = {m.key: m.label for m in chosen}
    query_sets = [qs.name for qs in design.query_sets]
    summary = summarize(runs, design.reference, query_sets, labels)
    summary["titles"] = {qs.name: qs.title for qs in design.query_sets}
    if targeting:
        summary["targeting"] = _summarize_targeting(targeting, design.target_part)
    summary.update({
        "design": design.name,
        "esreid_version": __version__,
        "settings": all_settings,
        "benchmark": {**{name: str(root) for name, root in roots.items()},
                      "options": design.benchmark,
                      "train_images": len(data.train), "train_ids": data.num_train_pids,
                      "query": len(data.query), "gallery": len(data.gallery)},
        "runs": {key: {str(seed): {"run_dir": r["run_dir"],
                                   "train_seconds": round(r["train_seconds"], 1),
                                   **{qs: r[qs]["metrics"] for qs in query_sets},
                                   "last_epoch": r["last_epoch"]}
                       for seed, r in per_seed.items()}
                 for key, per_seed in runs.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": round(time.time() - start, 1),
    })
    table = format_summary(summary)
    atomic_write_json(out_dir / "study.json", summary)
    atomic_write_text(out_dir / "study.md", table)
    plot_summary(summary, out_dir / "study.png")
    written = [out_dir / "study.json", out_dir / "study.md", out_dir / "study.png"]
    if targeting:
        written.append(plot_targeting(summary["targeting"], labels, out_dir / "targeting.png",
                                      examples))
    others = ", ".join(qs.title for qs in design.query_sets[1:])
    print()
    print(f"esreid study ({design.name}): {len(chosen)} models x up to {len(seeds)} seeds on the "
          f"synthetic benchmark ({len(data.train)} train images of {data.num_train_pids} ids; "
          f"{len(data.query)} queries, also evaluated as {others})")
    print(table)
    print("summary: " + ", ".join(str(p) for p in written))
    return summary
