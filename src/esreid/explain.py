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
from esreid.inference import ImageLike, ReIDModel, explanation_layer
from esreid.models.esnet import ESNet
from esreid.saliency import (
    RankPanel,
    cg_ram,
    denormalize,
    save_pair_figure,
    save_rank_list_figure,
    upsample_saliency,
)

log = logging.getLogger("esreid.explain")


def warn_if_flat(query_map: torch.Tensor | np.ndarray, gallery_map: torch.Tensor | np.ndarray,
                 query: object, gallery: object) -> None:
    """Warn when a CG-RAM map of a pair is zero everywhere.

    ReLU(sum phi*A) can vanish for a whole image (e.g. an untrained model); its overlay then
    shows nothing, which the user should hear about rather than read as "no salient part".
    """
    flat = [name for name, m in (("query", query_map), ("gallery", gallery_map))
            if not bool((m > 0).any())]
    if flat:
        log.warning("CG-RAM of %s is zero everywhere for the pair %s / %s: its overlay shows "
                    "no salient region", " and ".join(flat), query, gallery)


def save_rank_list(model: ReIDModel, query: ImageLike, matches: Sequence[tuple],
                   path: Path, title: str = "", threshold: float | None = None) -> Path:
    """Draw one query's rank list with CG-RAM overlays (see ``save_rank_list_figure``).

    ``matches`` are ``(gallery image, caption, correct or None)`` in rank order, optionally
    with a fourth item, the threshold's verdict (``same``, or None), whose ``threshold``
    the legend names. Each gallery overlay is its map for the (query, match) pair; the
    query's overlay is its map for the first match. Images are read with the one image
    reader (through the model).
    """
    q_image = denormalize(model.preprocess(query)[0], IMAGENET_MEAN, IMAGENET_STD)
    panels, query_map = [], None
    for image, caption, correct, *verdict in matches:
        q_map, g_map = model.explain(query, image)
        warn_if_flat(q_map, g_map, query, image)
        query_map = q_map if query_map is None else query_map
        g_image = denormalize(model.preprocess(image)[0], IMAGENET_MEAN, IMAGENET_STD)
        panels.append(RankPanel(g_image, g_map, caption, correct, verdict[0] if verdict else None))
    return save_rank_list_figure(path, q_image, query_map, panels, title=title,
                                 threshold=threshold)


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
            picks = protocol_matches(q, gallery, dist[qi], top_k)
            q_img = _load_images([q], cfg).to(device)
            for rank, gj in enumerate(picks, start=1):
                g = gallery[gj]
                g_img = _load_images([g], cfg).to(device)
                q_map, g_map = cg_ram(model, layer, q_img, g_img, return_gallery=True)
                warn_if_flat(q_map, g_map, q.path, g.path)
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


def protocol_matches(query: Record, gallery: Sequence[Record], distances: np.ndarray,
                     top_k: int) -> list[int]:
    """The ``top_k`` gallery indices of a query's ranking under the Market protocol (junk and
    same-identity same-camera images left out), ties broken by gallery index."""
    from esreid.metrics.ranking import MarketGallery

    protocol = MarketGallery(np.array([g.pid for g in gallery]), np.array([g.camid for g in gallery]))
    order = np.argsort(distances, kind="stable")
    return [int(j) for j in order[protocol.valid_mask(query.pid, query.camid)[order]][:top_k]]


def explain_queries(cfg: Config, checkpoint: Path, ckpt: dict | None = None, num_queries: int = 4,
                    top_k: int = 3, out_dir: Path = Path("explanations")) -> list[Path]:
    """Load a trained model, rank ``cfg``'s gallery for a few queries, and save one rank-list
    figure per query (``queryNN.png``) with CG-RAM overlays, distances and green/red frames
    for correct/wrong matches."""
    from esreid.engine.checkpoint import model_from_checkpoint
    from esreid.engine.data import load_data
    from esreid.engine.evaluate import embed_records
    from esreid.metrics import compute_distance
    from esreid.utils import resolve_device

    device = resolve_device(cfg.train.device)
    reid = ReIDModel(model_from_checkpoint(checkpoint, cfg, ckpt=ckpt), cfg, device=device,
                     source=str(checkpoint))
    data = load_data(cfg)
    idx = pick_queries(data.query, num_queries)
    queries = [data.query[i] for i in idx]
    gallery_features = embed_records(reid.model, data.gallery, cfg, device, "gallery")[0]
    query_features = embed_records(reid.model, queries, cfg, device, "query")[0]
    dist = compute_distance(query_features, gallery_features, metric=cfg.eval.metric)
    paths = []
    for qi, q in enumerate(queries):
        matches = []
        for rank, gj in enumerate(protocol_matches(q, data.gallery, dist[qi], top_k), start=1):
            g = data.gallery[gj]
            caption = f"#{rank}  d={dist[qi, gj]:.3f}\nid {g.original_pid} cam {g.camid + 1}"
            matches.append((g.path, caption, g.pid == q.pid))
        title = f"query id {q.original_pid} cam {q.camid + 1}: {Path(q.path).name}"
        paths.append(save_rank_list(reid, q.path, matches, Path(out_dir) / f"query{qi:02d}.png",
                                    title=title))
    return paths
