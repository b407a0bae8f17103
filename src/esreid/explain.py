"""Explanations of rankings: CG-RAM heat maps of a query and its top gallery matches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from esreid.config import Config
from esreid.data.loader import read_rgb
from esreid.data.records import Record
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms
from esreid.inference import explanation_layer
from esreid.models.esnet import ESNet
from esreid.saliency import cg_ram, denormalize, save_pair_figure, upsample_saliency

log = logging.getLogger("esreid.explain")


def _load_images(records: Sequence[Record], cfg: Config) -> torch.Tensor:
    tf = build_transforms(cfg.data.height, cfg.data.width, is_train=False)
    return torch.stack([tf(read_rgb(r.path)) for r in records])


def explain_pairs(
    model: ESNet,
    cfg: Config,
    queries: Sequence[Record],
    gallery: Sequence[Record],
    gallery_features: torch.Tensor,
    query_features: torch.Tensor,
    out_dir: Path,
    top_k: int = 1,
    prefix: str = "",
    metric: str | None = None,
) -> list[Path]:
    """Save a CG-RAM figure for each query and each of its ``top_k`` gallery matches.

    ``query_features``/``gallery_features`` are the descriptors used for ranking (the matches
    are found by ``metric`` distance, default the config's). Each PNG shows the query, its
    heat map, the gallery image and its heat map, titled with ids, rank and whether the match
    is correct. Returns the written paths.
    """
    from esreid.metrics import compute_distance

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = compute_distance(query_features, gallery_features, metric=metric or cfg.eval.metric)
    device = next(model.parameters()).device
    layer = explanation_layer(model)
    was_training = model.training
    model.eval()
    paths = []
    try:
        for qi, q in enumerate(queries):
            # The Market protocol ignores same-camera matches of the same identity.
            valid = [j for j in np.argsort(dist[qi], kind="stable")
                     if not (gallery[j].pid == q.pid and gallery[j].camid == q.camid)
                     and gallery[j].pid != -1]
            picks = valid[:top_k]
            q_img = _load_images([q], cfg).to(device)
            for rank, gj in enumerate(picks, start=1):
                g = gallery[gj]
                g_img = _load_images([g], cfg).to(device)
                q_map, g_map = cg_ram(model, layer, q_img, g_img, return_gallery=True)
                flat = [name for name, m in (("query", q_map), ("gallery", g_map))
                        if not bool((m > 0).any())]
                if flat:
                    # ReLU(sum phi*A) can vanish for a whole image (e.g. an untrained model);
                    # the overlay then shows nothing, which the user should hear about.
                    log.warning("CG-RAM of %s is zero everywhere for the pair %s / %s: its "
                                "overlay shows no salient region", " and ".join(flat), q.path, g.path)
                size = q_img.shape[-2:]
                q_map = upsample_saliency(q_map, size)[0]
                g_map = upsample_saliency(g_map, size)[0]
                ok = "correct" if g.pid == q.pid else "WRONG"
                title = (f"query id {q.original_pid} cam {q.camid + 1} | rank {rank}: id "
                         f"{g.original_pid} cam {g.camid + 1} ({ok}, d={dist[qi, gj]:.3f})")
                path = out_dir / f"{prefix}query{qi:02d}_rank{rank}.png"
                save_pair_figure(path, denormalize(q_img, IMAGENET_MEAN, IMAGENET_STD)[0],
                                 denormalize(g_img, IMAGENET_MEAN, IMAGENET_STD)[0],
                                 q_map.cpu(), g_map.cpu(), title=title)
                paths.append(path)
    finally:
        model.train(was_training)
    return paths


def pick_queries(queries: Sequence[Record], n: int) -> list[int]:
    """``n`` query indices spread evenly over the query list (deterministic)."""
    if n <= 0 or not queries:
        return []
    return sorted({int(i) for i in np.linspace(0, len(queries) - 1, num=min(n, len(queries)))})


def explain_queries(cfg: Config, checkpoint: Path, ckpt: dict | None = None, num_queries: int = 4,
                    top_k: int = 1, out_dir: Path = Path("explanations")) -> list[Path]:
    """Load a trained model, rank the gallery of ``cfg``'s dataset for a few queries and save
    CG-RAM figures of each query and its ``top_k`` matches into ``out_dir``."""
    from esreid.engine.checkpoint import model_from_checkpoint
    from esreid.engine.data import load_data
    from esreid.engine.evaluate import embed_records
    from esreid.utils import resolve_device

    device = resolve_device(cfg.train.device)
    model = model_from_checkpoint(checkpoint, cfg, ckpt=ckpt).to(device)
    data = load_data(cfg)
    idx = pick_queries(data.query, num_queries)
    queries = [data.query[i] for i in idx]
    gallery_features = embed_records(model, data.gallery, cfg, device, "gallery")[0]
    query_features = embed_records(model, queries, cfg, device, "query")[0]
    return explain_pairs(model, cfg, queries, data.gallery, gallery_features, query_features,
                         out_dir, top_k=top_k)
