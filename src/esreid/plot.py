"""Draw a run's metrics log (``metrics.jsonl``) to PNG files."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esreid.utils import atomic_write


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (one dict per line)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder written by `esreid train`?")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
    return records


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("type") == kind and key in r:
            xs.append(r["epoch"])
            ys.append(r[key])
    return xs, ys


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw loss, learning rate, the over-erasing diagnostic, P-pooling ``l`` and evaluation
    metrics of a run to ``out_dir`` (default ``run_dir/plots``); returns the PNG paths.

    Panels with no data in the log (e.g. ``l`` for a GAP-only model) are left out.
    """
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    train_keys = sorted({k for r in records if r.get("type") == "train" for k in r})
    written = []

    panels = [
        ("loss.png", "training loss", "train",
         ["loss"] + [k for k in train_keys if k.startswith(("id_", "triplet_"))]),
        ("lr.png", "learning rate", "train", ["lr"]),
        ("erasing_diagnostic.png", "loss of the erased batch (Fig. 3)", "train",
         ["erased_loss", "clean_loss"]),
        ("ppool_l.png", "P-pooling l", "train", [k for k in train_keys if k.startswith("ppool_l")]),
        ("eval.png", "evaluation", "eval", ["rank1", "rank5", "mAP", "mINP"]),
    ]
    for name, title, kind, keys in panels:
        lines = [(k, *_series(records, kind, k)) for k in keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        for key, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(f"{Path(run_dir).name}: {title}")
        if name == "lr.png":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / name))
    if not written:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train or eval records to plot")
    return written
