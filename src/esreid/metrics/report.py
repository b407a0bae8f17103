"""Run results files (JSON) and a Markdown report comparing runs with the paper's tables.

A run's results JSON holds::

    {"run": str, "config": str, "dataset": str, "protocol": "market" | "vehicleid",
     "sizes": {"query": int, "gallery": int, ...}, "rerank": bool, "epoch": int,
     "metrics": {...}}

with market-protocol metrics ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` and
VehicleID metrics ``test_size``, ``rank1``, ``rank1_std``, ``rank5``, ``rank5_std``, ``mAP``,
all rates as fractions in [0, 1]. ``run``, ``dataset``, ``protocol`` and ``metrics`` are
required; other keys are optional and extra keys are kept.

The report puts runs that differ only in their seed on one row (mean ± std over the seeds,
with a Seeds column). It finds a run's config in the ``config.yaml`` of the folder that
holds its results file; a results file without one is always a row of its own.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from esreid.utils import atomic_write_text

RESULTS_NAME = "results.json"
PROTOCOLS = ("market", "vehicleid")

# Paper (ES-Net) rows, in percent. Sources: Tables I-VII (person), VIII (VehicleID), IX-X
# (VeRi-776). Where tables disagree (Table IV/V repeat ES-Net and Base+BESM with slightly
# different figures), the main-result tables (I, II, III) are used.
_PERSON_ROWS: dict[str, dict[str, tuple[float, float] | None]] = {
    # name: market1501 (rank-1, mAP), dukemtmc, msmt17
    "Base": {"market1501": (93.9, 83.2), "dukemtmc": (85.0, 72.1), "msmt17": (75.1, 47.2)},
    "Base+BESM": {"market1501": (94.3, 85.1), "dukemtmc": (85.7, 74.3), "msmt17": (76.4, 49.9)},
    "Base+BESM+GMP": {"market1501": (94.2, 84.4), "dukemtmc": (87.2, 75.3), "msmt17": (75.0, 48.5)},
    "Base+BESM+P-pooling": {
        "market1501": (94.6, 86.4),
        "dukemtmc": (88.2, 76.6),
        "msmt17": (78.0, 52.4),
    },
    "ESB (R=10%, P=0.3)": {
        "market1501": (95.2, 87.1),
        "dukemtmc": (88.6, 78.0),
        "msmt17": (79.2, 54.5),
    },
    "ESB (R=20%, P=0.5)": {
        "market1501": (94.6, 86.2),
        "dukemtmc": (86.9, 77.0),
        "msmt17": (76.3, 52.9),
    },
    "AIB": {"market1501": (94.4, 85.1), "dukemtmc": (85.9, 72.6), "msmt17": (75.4, 48.0)},
    "AIB+ESB (R=10%, P=0.3)": {
        "market1501": (95.7, 88.0),
        "dukemtmc": (89.1, 78.1),
        "msmt17": (81.0, 56.8),
    },
    "ES-Net": {"market1501": (95.7, 88.6), "dukemtmc": (89.2, 78.8), "msmt17": (80.9, 57.3)},
    "ES-Net (P-pooling in AIB and ESB)": {
        "market1501": (95.8, 88.3),
        "dukemtmc": (88.9, 79.3),
        "msmt17": (81.1, 57.3),
    },
    "Base+Random Erasing": {"market1501": (92.5, 82.9), "msmt17": (72.8, 48.1)},
    "Base+Grad-CAM Erasing": {"market1501": (94.1, 84.7), "msmt17": (74.6, 49.4)},
    "Base+Feature Dropping Branch": {"market1501": (93.7, 83.2), "msmt17": (73.1, 47.0)},
    "AGW": {"market1501": (95.1, 87.8), "dukemtmc": (89.0, 79.6), "msmt17": (68.3, 49.3)},
    "ES-Net* (on AGW)": {
        "market1501": (95.3, 89.1),
        "dukemtmc": (89.7, 80.2),
        "msmt17": (77.9, 55.6),
    },
}

# VeRi-776: (rank-1, rank-5, mAP), Tables IX and X.
_VERI_ROWS: dict[str, tuple[float, float, float]] = {
    "Base": (95.0, 97.6, 74.4),
    "Base+BESM": (95.9, 98.3, 76.5),
    "Base+BESM+P-pooling": (96.0, 98.1, 77.0),
    "ESB": (96.4, 98.2, 79.2),
    "ES-Net": (97.0, 98.5, 81.9),
}

# VehicleID: test size -> name -> (rank-1, rank-5), Table VIII.
_VEHICLEID_ROWS: dict[int, dict[str, tuple[float, float]]] = {
    800: {"Base": (79.1, 93.3), "ESB": (80.5, 94.7), "ES-Net": (83.6, 96.9)},
    1600: {"Base": (76.8, 88.6), "ESB": (77.6, 90.3), "ES-Net": (79.9, 93.5)},
    2400: {"Base": (73.4, 85.7), "ESB": (74.4, 87.4), "ES-Net": (76.9, 90.7)},
}
_VEHICLEID_SUBSETS = {800: "Small", 1600: "Medium", 2400: "Large"}

# The table each paper row is quoted from (shown in the report's Run column).
_PERSON_SOURCES = {
    "Base": "Table I",
    "Base+BESM": "Table III",
    "Base+BESM+GMP": "Table IV",
    "Base+BESM+P-pooling": "Table III",
    "ESB (R=10%, P=0.3)": "Table II",
    "ESB (R=20%, P=0.5)": "Table II",
    "AIB": "Table II",
    "AIB+ESB (R=10%, P=0.3)": "Table II",
    "ES-Net": "Table I",
    "ES-Net (P-pooling in AIB and ESB)": "Table VI",
    "Base+Random Erasing": "Table V",
    "Base+Grad-CAM Erasing": "Table V",
    "Base+Feature Dropping Branch": "Table V",
    "AGW": "Table VII",
    "ES-Net* (on AGW)": "Table VII",
}
_VERI_SOURCES = {
    "Base": "Table IX",
    "Base+BESM": "Table X",
    "Base+BESM+P-pooling": "Table X",
    "ESB": "Table IX",
    "ES-Net": "Table IX",
}

PRESET_TO_PAPER: dict[str, str] = {
    "base": "Base",
    "base_besm": "Base+BESM",
    "base_besm_gmp": "Base+BESM+GMP",
    "base_besm_ppool": "Base+BESM+P-pooling",
    "esb": "ESB",
    "aib": "AIB",
    "esnet": "ES-Net",
    "vehicle": "ES-Net",
    "esnet_r10p03": "AIB+ESB (R=10%, P=0.3)",
    "esnet_ppool_both": "ES-Net (P-pooling in AIB and ESB)",
    "base_random_erasing": "Base+Random Erasing",
    "base_gradcam_erasing": "Base+Grad-CAM Erasing",
    "base_feature_dropping": "Base+Feature Dropping Branch",
    "agw": "AGW",
    "esnet_agw": "ES-Net* (on AGW)",
}

_PERSON = ("market1501", "dukemtmc", "msmt17")
_DATASET_TITLES = {
    "market1501": "Market-1501",
    "dukemtmc": "DukeMTMC-reID",
    "msmt17": "MSMT17",
    "veri776": "VeRi-776",
    "vehicleid": "VehicleID",
}


def paper_name(config: str, dataset: str) -> str:
    """The paper's row name for a preset on a dataset (the preset name itself if unmapped).

    The ``esb`` preset (R=10%, P=0.3) maps to Table II's "ESB (R=10%, P=0.3)" row on the
    person datasets and to "ESB" on the vehicle ones.
    """
    name = PRESET_TO_PAPER.get(config, config)
    if name == "ESB" and dataset in _PERSON:
        return "ESB (R=10%, P=0.3)"
    return name


def check_results(results: Any, where: str) -> dict:
    """Validate a results dict against the schema; ValueError starting with ``where`` if not."""
    if not isinstance(results, dict):
        raise ValueError(f"{where}: results must be a JSON object, got {type(results).__name__}")
    for key in ("run", "dataset", "protocol", "metrics"):
        if key not in results:
            raise ValueError(f"{where}: missing required key {key!r}")
    for key in ("run", "dataset"):
        if not isinstance(results[key], str) or not results[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {results[key]!r}")
    if results["protocol"] not in PROTOCOLS:
        raise ValueError(
            f"{where}: protocol must be one of {', '.join(PROTOCOLS)}, got {results['protocol']!r}"
        )
    metrics = results["metrics"]
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}: 'metrics' must be an object, got {type(metrics).__name__}")
    needed = ("rank1", "mAP") if results["protocol"] == "market" else ("rank1", "rank5")
    for key in needed:
        if key not in metrics:
            raise ValueError(
                f"{where}: metrics lack {key!r} (required for the {results['protocol']} protocol)"
            )
    for key, value in metrics.items():
        if key.startswith("rank") or key.startswith("mAP") or key.startswith("mINP"):
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, bool
            )
            if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{where}: metrics[{key!r}] must be a fraction in [0, 1], got {value!r}"
                )
    if "test_size" in metrics:
        size = metrics["test_size"]
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(
                f"{where}: metrics['test_size'] must be a positive integer, got {size!r}"
            )
    return results


def _json_default(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"value of type {type(obj).__name__} is not JSON serialisable")


def _results_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/results.json`` when ``path`` is a directory."""
    p = Path(path).expanduser()
    return p / RESULTS_NAME if p.is_dir() else p


def write_results(path: str | os.PathLike, results: dict) -> None:
    """Validate ``results`` and write it as JSON to ``path`` (a file, or a run directory that
    gets ``results.json``), atomically with :func:`esreid.utils.atomic_write_text`.

    Numpy scalars and arrays are converted; raises ValueError naming the path on bad content
    and :class:`esreid.utils.DiskFullError` when the disk is full.
    """
    target = _results_file(path)
    check_results(results, str(target))
    try:
        text = json.dumps(results, indent=2, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{target}: results cannot be written as JSON ({exc})") from exc
    atomic_write_text(target, text + "\n")


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON: ``path`` is the file or a run directory holding
    ``results.json``. Raises FileNotFoundError or ValueError naming the path."""
    p = Path(path).expanduser()
    target = _results_file(p)
    if not target.is_file():
        if p.is_dir():
            raise FileNotFoundError(f"no {RESULTS_NAME} in run directory {p}")
        raise FileNotFoundError(f"results file not found: {p}")
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{target}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{target}: not a UTF-8 text file ({exc.reason})") from exc
    return check_results(data, str(target))


def _pct(value: Any) -> str:
    """A fraction as a percentage with one decimal, or '-' when absent."""
    return "-" if value is None else f"{100.0 * float(value):.1f}"


def _pct_std(mean: Any, std: Any) -> str:
    """Percentage with an optional '± std' (both fractions)."""
    return _pct(mean) if std is None else f"{_pct(mean)} ± {_pct(std)}"


def _paper_cell(value: float | None) -> str:
    """A paper figure (already in percent) with one decimal, or '-'."""
    return "-" if value is None else f"{value:.1f}"


def _run_label(res: dict) -> str:
    """Run column text: the run name plus epoch and re-ranking notes."""
    notes = []
    if isinstance(res.get("epoch"), int) and not isinstance(res.get("epoch"), bool):
        notes.append(f"epoch {res['epoch']}")
    if res.get("rerank"):
        notes.append("re-ranked")
    return res["run"] + (f" ({', '.join(notes)})" if notes else "")


def _group_key(res: dict) -> tuple[str, str, int | None]:
    """(dataset, protocol, VehicleID test size or None) a run is reported under."""
    if res["protocol"] == "vehicleid":
        return res["dataset"], "vehicleid", res["metrics"].get("test_size")
    return res["dataset"], "market", None


def _title(dataset: str, test_size: int | None) -> str:
    """Section heading for a dataset group."""
    title = _DATASET_TITLES.get(dataset, dataset)
    if test_size is None:
        return title
    subset = _VEHICLEID_SUBSETS.get(test_size)
    return f"{title} ({subset}, {test_size})" if subset else f"{title} (test size {test_size})"


# Config keys that never make two runs different experiments, besides the seed: where
# things are and how a run is kept (config.RESUME_FREE_KEYS, less optim.epochs and the preset
# name, which do change the experiment).
def _bookkeeping_keys() -> frozenset[str]:
    """Keys ignored when deciding whether two runs are seeds of one experiment."""
    from esreid.config import RESUME_FREE_KEYS

    return (RESUME_FREE_KEYS - {"optim.epochs", "name"}) | {"train.seed"}


def _run_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The flattened ``config.yaml`` beside a results file (or in a run directory), or None
    when there is none or it cannot be read."""
    target = _results_file(path)
    try:
        data = yaml.safe_load((target.parent / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    from esreid.config import flatten_config

    return flatten_config(data) if isinstance(data, dict) else None


def _experiment_key(res: dict, config: dict[str, Any] | None, path: Path) -> tuple:
    """Runs with equal keys are seeds of one experiment: same config apart from the seed and
    bookkeeping, same evaluation (epoch, re-ranking, protocol and test size)."""
    if config is None:
        return ("alone", str(path))
    skip = _bookkeeping_keys()
    settings = json.dumps(
        {k: v for k, v in sorted(config.items()) if k not in skip}, sort_keys=True, default=str
    )
    return ("config", settings, res.get("epoch"), bool(res.get("rerank")))


def _aggregate(runs: list[dict]) -> dict:
    """One results dict standing for several seeds: metrics are means, ``<metric>_std``
    the sample standard deviations (n - 1) over the runs."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    metrics: dict[str, Any] = {}
    for key, value in first["metrics"].items():
        values = [r["metrics"].get(key) for r in runs]
        if key.endswith("_std") or not all(isinstance(v, (int, float)) for v in values):
            continue
        if key == "test_size":
            metrics[key] = value
            continue
        metrics[key] = float(np.mean(values))
        metrics[f"{key}_std"] = float(np.std(values, ddof=1))
    names = ", ".join(r["run"] for r in runs)
    return {
        **first,
        "run": names,
        "metrics": metrics,
        "seeds": len(runs),
        "seed_values": [r.get("_seed") for r in runs],
    }


def _seeds_cell(res: dict) -> str:
    """The Seeds column: the number of runs, and of distinct seeds when fewer."""
    n = int(res.get("seeds", 1))
    distinct = {s for s in res.get("seed_values", []) if s is not None}
    if n > 1 and distinct and len(distinct) < n:
        return f"{len(distinct)} ({n} runs)"
    return str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines: two left-aligned text columns, the rest right-aligned."""
    align = [":--" if i < 2 else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _section(dataset: str, test_size: int | None, runs: list[dict], with_paper: bool) -> list[str]:
    """Heading and table for one dataset group: the runs, then the paper's rows.

    ``runs`` are results dicts, each possibly standing for several seeds (see
    :func:`_aggregate`); when one does, a Seeds column follows the Run column.
    """
    header, rows = _section_rows(dataset, test_size, runs, with_paper)
    if any(int(r.get("seeds", 1)) > 1 for r in runs):
        header.insert(2, "Seeds")
        for i, row in enumerate(rows):
            # The runs' rows come first, then the paper's.
            row.insert(2, _seeds_cell(runs[i]) if i < len(runs) else "-")
    return [f"## {_title(dataset, test_size)}", ""] + _table(header, rows) + [""]


def _section_rows(
    dataset: str, test_size: int | None, runs: list[dict], with_paper: bool
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`_section`'s table, without the Seeds column."""
    if runs[0]["protocol"] == "vehicleid":
        header = ["Method", "Run", "rank-1", "rank-5"]
        rows = [
            [
                paper_name(str(r.get("config", "")), dataset) or "-",
                _run_label(r),
                _pct_std(r["metrics"].get("rank1"), r["metrics"].get("rank1_std")),
                _pct_std(r["metrics"].get("rank5"), r["metrics"].get("rank5_std")),
            ]
            for r in runs
        ]
        if with_paper and dataset == "vehicleid":
            for name, (r1, r5) in _VEHICLEID_ROWS.get(test_size, {}).items():
                rows.append([f"{name} (paper)", "Table VIII", _paper_cell(r1), _paper_cell(r5)])
    elif dataset == "veri776":
        header = ["Method", "Run", "rank-1", "rank-5", "mAP"]
        keys = ("rank1", "rank5", "mAP")
        rows = [
            [paper_name(str(r.get("config", "")), dataset) or "-", _run_label(r)]
            + [_pct_std(r["metrics"].get(k), r["metrics"].get(f"{k}_std")) for k in keys]
            for r in runs
        ]
        if with_paper:
            for name, values in _VERI_ROWS.items():
                rows.append(
                    [f"{name} (paper)", _VERI_SOURCES[name]] + [_paper_cell(v) for v in values]
                )
    else:
        header = ["Method", "Run", "rank-1", "mAP", "rank-5", "mINP"]
        keys = ("rank1", "mAP", "rank5", "mINP")
        rows = [
            [paper_name(str(r.get("config", "")), dataset) or "-", _run_label(r)]
            + [_pct_std(r["metrics"].get(k), r["metrics"].get(f"{k}_std")) for k in keys]
            for r in runs
        ]
        if with_paper and dataset in _PERSON:
            for name, per_dataset in _PERSON_ROWS.items():
                if per_dataset.get(dataset) is not None:
                    r1, m_ap = per_dataset[dataset]
                    rows.append(
                        [f"{name} (paper)", _PERSON_SOURCES[name], _paper_cell(r1)]
                        + [_paper_cell(m_ap), "-", "-"]
                    )
    return header, rows


def build_report(paths: Iterable[str | os.PathLike], with_paper: bool = True) -> str:
    """Markdown report comparing runs, one section per dataset (and VehicleID test size).

    Takes results files or run directories; returns the report text. Columns follow the
    paper's tables (person: rank-1, mAP, plus rank-5 and mINP; VeRi-776: rank-1, rank-5,
    mAP; VehicleID: rank-1, rank-5 with ± std over draws), values in percent with one
    decimal, '-' where a figure is missing. Runs whose ``config.yaml`` (beside the results
    file) is the same apart from ``train.seed``, the run name and bookkeeping keys, and that
    were evaluated at the same epoch with the same re-ranking, share one row: the runs'
    names, a Seeds column (the number of runs), and each figure as mean ± sample std over
    them (for VehicleID the std is then over seeds, not draws). With ``with_paper`` each
    section ends with the paper's published rows for that dataset, marked "(paper)".
    """
    paths = list(paths)
    if not paths:
        raise ValueError("build_report needs at least one results file or run directory")
    groups: dict[tuple[str, str, int | None], dict[tuple, list[dict]]] = {}
    for p in paths:
        res = load_results(p)
        config = _run_config(p)
        res["_seed"] = None if config is None else config.get("train.seed")
        experiments = groups.setdefault(_group_key(res), {})
        experiments.setdefault(_experiment_key(res, config, Path(p)), []).append(res)
    known = list(_DATASET_TITLES)

    def order(key: tuple[str, str, int | None]) -> tuple[int, str, str, int]:
        dataset, protocol, size = key
        rank = known.index(dataset) if dataset in known else len(known)
        return rank, dataset, protocol, size or 0

    lines = ["# Results", ""]
    for key in sorted(groups, key=order):
        runs = [_aggregate(members) for members in groups[key].values()]
        lines += _section(key[0], key[2], runs, with_paper)
    return "\n".join(lines).rstrip() + "\n"
