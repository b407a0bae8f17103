"""Evaluation: distances, Market-protocol ranking metrics (CMC, mAP, mINP), verification
TPR at fixed FPR, k-reciprocal re-ranking, the VehicleID protocol, and results files with a
Markdown report."""

from esreid.metrics.distance import compute_distance
from esreid.metrics.ranking import RankResult, evaluate_features, evaluate_rank
from esreid.metrics.report import build_report, load_results, write_results
from esreid.metrics.rerank import k_reciprocal_rerank
from esreid.metrics.vehicleid import evaluate_vehicleid, vehicleid_draw
from esreid.metrics.verification import NoPairsError, tpr_at_fpr, tpr_at_fpr_features

__all__ = [
    "RankResult",
    "build_report",
    "compute_distance",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_vehicleid",
    "k_reciprocal_rerank",
    "load_results",
    "NoPairsError",
    "tpr_at_fpr",
    "tpr_at_fpr_features",
    "vehicleid_draw",
    "write_results",
]
