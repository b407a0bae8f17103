"""Evaluate a model on a dataset's query/gallery split with the dataset's protocol."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from esreid.config import Config
from esreid.data.loader import BadImageLog, build_test_loader
from esreid.data.records import ReIDData
from esreid.engine.distributed import DistContext, gather_to_main, shard
from esreid.engine.features import extract_features
from esreid.metrics import (
    NoPairsError,
    compute_distance,
    evaluate_features,
    evaluate_rank,
    evaluate_vehicleid,
    k_reciprocal_rerank,
    tpr_at_fpr,
    tpr_at_fpr_features,
)

#: False-positive rates at which evaluation reports the verification TPR and threshold.
VERIFICATION_FPRS = (1e-4, 1e-3, 1e-2)

log = logging.getLogger("esreid.eval")


def embed_records(model: nn.Module, records, cfg: Config, device: torch.device | str,
                  desc: str = "features", bad_images: BadImageLog | None = None,
                  ctx: DistContext | None = None):
    """Evaluation descriptors of ``records`` as the config says (size, flip, batch size).

    Returns ``(features [N, D], pids [N], camids [N])``; with ``data.on_bad_image=skip``
    unreadable images are left out (and added to ``bad_images``). In a distributed run
    (``ctx``) each process embeds its contiguous share and rank 0 receives all of them in
    the records' order; the other ranks get None.
    """
    if ctx is not None and ctx.distributed:
        part = list(records)[shard(ctx, len(records))]
        mine = BadImageLog()
        out = embed_records(model, part, cfg, device, desc, mine) if part else None
        parts = gather_to_main(ctx, (out, mine.paths))
        if parts is None:
            return None
        if bad_images is not None:
            for _, paths in parts:
                bad_images.update(paths)
        done = [p for p, _ in parts if p is not None]
        return (torch.cat([f for f, _, _ in done]), np.concatenate([p for _, p, _ in done]),
                np.concatenate([c for _, _, c in done]))
    loader = build_test_loader(records, cfg.data.height, cfg.data.width,
                               batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                               on_bad_image=cfg.data.on_bad_image)
    return extract_features(model, loader, device, flip=cfg.eval.flip,
                            progress=cfg.train.progress, desc=desc, bad_images=bad_images)


def camera_filter_labels(q_cams: np.ndarray, g_cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera ids to give the Market protocol.

    When every query and gallery image has the same camera (custom data without camera
    information), the protocol's "ignore same-camera matches" rule would ignore every true
    match; camera filtering is then switched off (with a warning) by giving queries and
    gallery different ids. Otherwise the ids are returned unchanged.
    """
    if len(q_cams) and len(np.unique(np.concatenate([q_cams, g_cams]))) == 1:
        log.warning("all query and gallery images share one camera: evaluating without the "
                    "same-camera filter of the Market protocol")
        return np.zeros_like(q_cams), np.ones_like(g_cams)
    return q_cams, g_cams


def evaluate_model(model: nn.Module, data: ReIDData, cfg: Config,
                   device: torch.device | str = "cpu",
                   features_out: dict[str, torch.Tensor] | None = None,
                   ctx: DistContext | None = None,
                   gallery_features: torch.Tensor | None = None) -> dict[str, Any] | None:
    """Embed the test images and score them with the dataset's protocol.

    Returns a results dict in the schema of :func:`esreid.metrics.write_results`
    (``protocol``, ``dataset``, ``sizes``, ``metrics`` with fractions in [0, 1], ...).
    Market protocol for Market/Duke/MSMT17/VeRi/custom/synthetic; VehicleID's 10-draw
    protocol when ``data.protocol == "vehicleid"``. When ``features_out`` is a dict, the
    query and gallery descriptors are stored in it (keys ``query``, ``gallery``) for reuse.
    In a distributed run (``ctx``) every process embeds a share of the images and rank 0
    scores the whole test set once; the other ranks return None. ``gallery_features``
    (Market protocol, single process) are descriptors of ``data.gallery`` this model already
    computed, e.g. ``features_out["gallery"]`` of an evaluation on another query set with
    the same gallery: the gallery is then not embedded again.
    """
    start = time.time()
    result: dict[str, Any] = {
        "run": cfg.train.run_name or cfg.name,
        "config": cfg.name,
        "dataset": data.name,
        "protocol": data.protocol,
        "rerank": bool(cfg.eval.rerank),
        # Which re-ranking made the figures (the reference conventions since this field).
        **({"rerank_settings": {"method": "k-reciprocal (Zhong et al. reference)",
                                "k1": cfg.eval.k1, "k2": cfg.eval.k2,
                                "lambda": cfg.eval.lambda_value}} if cfg.eval.rerank else {}),
        "metric": cfg.eval.metric,
        "flip": bool(cfg.eval.flip),
    }
    bad = BadImageLog()
    if data.protocol == "vehicleid":
        test = data.extra.get("test") or (list(data.query) + list(data.gallery))
        embedded = embed_records(model, test, cfg, device, "test", bad, ctx)
        if embedded is None:
            return None
        feats, pids, _ = embedded
        res = evaluate_vehicleid(feats.numpy(), pids, num_draws=cfg.eval.num_draws,
                                 seed=cfg.train.seed, metric=cfg.eval.metric)
        metrics = {k: float(res[k]) for k in
                   ("rank1", "rank1_std", "rank5", "rank5_std", "mAP") if k in res}
        metrics["test_size"] = int(data.extra.get("test_size", cfg.data.test_size))
        result["sizes"] = {"test": len(test), "identities": int(len(np.unique(pids))),
                           "draws": cfg.eval.num_draws}
    else:
        query = embed_records(model, data.query, cfg, device, "query", bad, ctx)
        if gallery_features is None:
            gallery = embed_records(model, data.gallery, cfg, device, "gallery", bad, ctx)
        else:
            gallery = _given_gallery(gallery_features, data, ctx)
        if query is None or gallery is None:
            return None
        (qf, q_pids, q_cams), (gf, g_pids, g_cams) = query, gallery
        if features_out is not None:
            features_out.update(query=qf, gallery=gf)
        q_cams, g_cams = camera_filter_labels(q_cams, g_cams)
        labels = (q_pids, g_pids, q_cams, g_cams)
        if cfg.eval.rerank:
            dist = k_reciprocal_rerank(qf.numpy(), gf.numpy(), k1=cfg.eval.k1, k2=cfg.eval.k2,
                                       lambda_value=cfg.eval.lambda_value, metric=cfg.eval.metric)
        elif len(qf) * len(gf) > 50_000_000:
            dist = None  # MSMT17-sized: never hold the whole distance matrix
        else:
            dist = compute_distance(qf, gf, metric=cfg.eval.metric)
        if dist is None:
            res = evaluate_features(qf.numpy(), gf.numpy(), *labels, metric=cfg.eval.metric)
        else:
            res = evaluate_rank(dist, *labels)
        try:
            if dist is None:
                verification = tpr_at_fpr_features(qf.numpy(), gf.numpy(), *labels,
                                                   metric=cfg.eval.metric, fprs=VERIFICATION_FPRS)
            else:
                verification = tpr_at_fpr(dist, *labels, fprs=VERIFICATION_FPRS)
        except NoPairsError as err:  # e.g. a gallery of the query identities only
            log.warning("no verification figures: %s", err)
            verification = {}
        metrics = res.to_dict()
        for fpr, (tpr, _) in verification.items():
            metrics[f"TPR@FPR={fpr:g}"] = tpr
        # Thresholds are distances under eval.metric (after re-ranking when it is on): a
        # pair is "same identity" when its distance <= threshold.
        result["verification"] = [{"fpr": fpr, "tpr": tpr, "threshold": threshold}
                                  for fpr, (tpr, threshold) in verification.items()]
        result["sizes"] = {"query": len(qf), "gallery": len(gf),
                           "query_ids": int(len(np.unique(q_pids))),
                           "gallery_ids": int(len(np.unique(g_pids)))}
    result["metrics"] = metrics
    if cfg.data.on_bad_image == "skip":
        result["skipped_images"] = {"test": bad.count, "test_paths": list(bad.paths)}
    result["seconds"] = round(time.time() - start, 2)
    return result


def _given_gallery(features: torch.Tensor, data: ReIDData, ctx: DistContext | None):
    """``(features, pids, camids)`` of a gallery embedded before; its rows must be the
    gallery records', in order (none skipped)."""
    if ctx is not None and ctx.distributed:
        raise ValueError("gallery_features: not supported in a distributed evaluation")
    if len(features) != len(data.gallery):
        raise ValueError(f"gallery_features: {len(features)} rows for the {len(data.gallery)} "
                         f"gallery images of {data.name} (were unreadable images skipped?)")
    return (features, np.array([r.pid for r in data.gallery]),
            np.array([r.camid for r in data.gallery]))


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line of the headline metrics as percentages."""
    keys = [k for k in ("rank1", "rank5", "rank10", "mAP", "mINP") if k in metrics]
    keys += [k for k in metrics if k.startswith("TPR@")]
    return "  ".join(f"{k}={100 * metrics[k]:.1f}%" for k in keys)
