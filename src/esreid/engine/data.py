"""The data a config describes: load its dataset and check it can train and evaluate."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from esreid.config import Config, ConfigError
from esreid.data import PUBLISHED_STATS, load_dataset
from esreid.data.records import ReIDData

log = logging.getLogger("esreid.data")


def load_data(cfg: Config) -> ReIDData:
    """Load ``cfg.data.name`` from ``cfg.data.root`` and return its splits.

    For the synthetic benchmark, ``data.root`` may be the benchmark or its parent; when
    neither holds one, it is generated into ``data.root`` (saying so).
    """
    return _load(cfg.data.name, Path(cfg.data.root).expanduser(), cfg, generate=True)


def cross_domain(cfg: Config) -> bool:
    """Whether the config evaluates on another dataset (or copy) than it trains on."""
    return bool(cfg.eval.dataset or cfg.eval.root)


def load_eval_data(cfg: Config, train_data: ReIDData | None = None) -> ReIDData:
    """The dataset whose query and gallery the config evaluates on: ``eval.dataset`` at
    ``eval.root`` (each defaulting to ``data.name`` / ``data.root``) for cross-domain
    testing, else the training dataset (``train_data`` when given, so it is not loaded
    twice). An evaluation benchmark is never generated: a missing one is an error."""
    if not cross_domain(cfg):
        return train_data if train_data is not None else load_data(cfg)
    name = cfg.eval.dataset or cfg.data.name
    root = Path(cfg.eval.root or cfg.data.root).expanduser()
    return _load(name, root, cfg, generate=False)


def _load(name: str, root: Path, cfg: Config, generate: bool) -> ReIDData:
    if name == "synthetic":
        from esreid.data.synthetic import ensure_synthetic, resolve_synthetic_root

        found = resolve_synthetic_root(root)
        if found is None and not generate:
            raise ConfigError(f"config key eval.root: no synthetic benchmark at {root} "
                              "(write one with `esreid synth --out DIR --seed N`)")
        root = found if found is not None else ensure_synthetic(
            root, num_ids=cfg.data.synth_ids, seed=cfg.data.synth_seed)
    options: dict[str, Any] = {}
    if name == "vehicleid":
        options["test_size"] = cfg.data.test_size
    if name == "custom" and cfg.data.cam_pattern:
        options["cam_pattern"] = cfg.data.cam_pattern
    if name in PUBLISHED_STATS:
        options["check_stats"] = cfg.data.check_stats
    return load_dataset(name, root, **options)


def check_data(data: ReIDData, cfg: Config, training: bool = True) -> None:
    """Refuse data that cannot give a meaningful run, before any work is done.

    Errors (ConfigError naming the setting): an empty training split, fewer training
    identities than ``data.ids_per_batch``, a Market-protocol test split whose query and
    gallery share no identity (every query would have no match). Warning: every training
    identity has a single image (the triplet loss and BESM's easiest positive need two).
    """
    d = cfg.data
    if training:
        if not data.train:
            raise ConfigError(f"dataset {data.name} at {d.root}: the training split is empty")
        counts = Counter(r.pid for r in data.train)
        if len(counts) < d.ids_per_batch:
            raise ConfigError(
                f"data.ids_per_batch={d.ids_per_batch} but dataset {data.name} has only "
                f"{len(counts)} training identities: lower data.ids_per_batch")
        if max(counts.values()) < 2 and (cfg.loss.triplet or cfg.erase.method == "besm"):
            log.warning("dataset %s: every training identity has a single image; the triplet "
                        "loss and BESM's easiest positive need two images of an identity, so "
                        "each batch repeats images to make pairs", data.name)
    if data.protocol != "vehicleid":
        if not data.query or not data.gallery:
            raise ConfigError(f"dataset {data.name} at {d.root}: the query or gallery split is empty")
        shared = {r.pid for r in data.query} & {r.pid for r in data.gallery if r.pid >= 0}
        if not shared:
            raise ConfigError(
                f"dataset {data.name} at {d.root}: query and gallery share no identity, so no "
                "query has a true match (are the query/ and gallery/ folders from one dataset?)")
