"""Saliency for re-identification: CG-RAM maps, salient/random erasing and visualisation."""

from esreid.saliency.cgram import (
    batch_cg_ram,
    cg_ram,
    cosine_score,
    easiest_positive,
    grad_cam_batch,
    upsample_saliency,
)
from esreid.saliency.erasing import BatchFeatureDrop, batch_feature_drop, besm_erase, random_erase
from esreid.saliency.visualize import (
    RankPanel,
    denormalize,
    overlay_heatmap,
    pair_figure_size,
    save_pair_figure,
    save_rank_list_figure,
)

__all__ = [
    "BatchFeatureDrop",
    "RankPanel",
    "batch_cg_ram",
    "batch_feature_drop",
    "besm_erase",
    "cg_ram",
    "cosine_score",
    "denormalize",
    "easiest_positive",
    "grad_cam_batch",
    "overlay_heatmap",
    "pair_figure_size",
    "random_erase",
    "save_pair_figure",
    "save_rank_list_figure",
    "upsample_saliency",
]
