"""Turning saliency maps into pictures: denormalisation, heat-map overlays, pair figures.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), never through pyplot,
so nothing opens a window and nothing global (pyplot's figure registry) is touched; this is
safe in servers and worker threads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from esreid.utils import atomic_write

__all__ = ["RankPanel", "denormalize", "overlay_heatmap", "pair_figure_size",
           "rank_list_legend", "save_pair_figure", "save_rank_list_figure"]

_PANEL_WIDTH_IN = 2.0
_LABEL_HEIGHT_IN = 0.3
_TITLE_HEIGHT_IN = 0.3
_DPI = 100


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``(x - mean) / std`` normalisation: [C, H, W] or [N, C, H, W] -> same shape in [0, 1].

    ``mean`` and ``std`` have one entry per channel; the result is clamped to [0, 1].
    """
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be [C, H, W] or [N, C, H, W], got {tuple(images.shape)}")
    channels = images.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"mean and std need {channels} entries (one per channel), got {len(mean)} and "
            f"{len(std)}"
        )
    shape = (channels, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def _image_to_float_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """Image as a float64 [H, W, 3] array in [0, 1]."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(
                f"a tensor image must be float [3, H, W] in [0, 1], got {image.dtype} "
                f"{tuple(image.shape)}"
            )
        return image.detach().cpu().double().clamp(0.0, 1.0).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an array image must be uint8 [H, W, 3], got {image.dtype} {image.shape}"
            )
        return image.astype(np.float64) / 255.0
    raise TypeError(f"image must be a torch.Tensor or numpy.ndarray, got {type(image).__name__}")


def _map_to_array(saliency: Tensor | np.ndarray) -> np.ndarray:
    """Saliency as a float64 [H, W] array clipped to [0, 1]."""
    if isinstance(saliency, Tensor):
        saliency = saliency.detach().cpu().double().numpy()
    saliency = np.asarray(saliency, dtype=np.float64)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be [H, W], got shape {saliency.shape}")
    if not np.isfinite(saliency).all():
        raise ValueError("saliency contains NaN or infinite values")
    return np.clip(saliency, 0.0, 1.0)


def overlay_heatmap(
    image: Tensor | np.ndarray, saliency: Tensor | np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend a jet-coloured saliency map over an image.

    Args:
        image: float tensor [3, H, W] in [0, 1], or uint8 array [H, W, 3].
        saliency: [H, W] map in [0, 1] (tensor or array; clipped to [0, 1]); resize maps to
            the image with ``upsample_saliency`` first.
        alpha: weight of the heat map, in [0, 1] (0: the image, 1: the heat map only).

    Returns:
        uint8 array [H, W, 3]: ``round(255 * ((1 - alpha) * image + alpha * jet(saliency)))``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _image_to_float_hwc(image)
    heat_map = _map_to_array(saliency)
    if heat_map.shape != rgb.shape[:2]:
        raise ValueError(
            f"saliency shape {heat_map.shape} does not match the image size {rgb.shape[:2]}"
        )
    heat = colormaps["jet"](heat_map)[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * heat
    return np.rint(blended * 255.0).clip(0, 255).astype(np.uint8)


def pair_figure_size(height: int, width: int, title: str = "") -> tuple[int, int]:
    """Pixel size (width, height) of the PNG that ``save_pair_figure`` writes for H x W images.

    Each of the 4 panels is 200 px wide and keeps the image's aspect ratio; a 30 px strip
    above holds the panel labels, plus another 30 px when there is a title.
    """
    fig_w, fig_h = _figure_inches(height, width, title)
    return round(fig_w * _DPI), round(fig_h * _DPI)


def _figure_inches(height: int, width: int, title: str) -> tuple[float, float]:
    panel_h = _PANEL_WIDTH_IN * height / width
    extra = _LABEL_HEIGHT_IN + (_TITLE_HEIGHT_IN if title else 0.0)
    return 4 * _PANEL_WIDTH_IN, panel_h + extra


def save_pair_figure(
    path: str | os.PathLike[str],
    query_image: Tensor | np.ndarray,
    gallery_image: Tensor | np.ndarray,
    query_map: Tensor | np.ndarray,
    gallery_map: Tensor | np.ndarray,
    title: str = "",
) -> None:
    """Save a 4-panel PNG: query, query overlay, gallery, gallery overlay.

    Args:
        path: destination ``.png`` file; its directory must exist. Written atomically
            (temporary file in the same directory, then ``os.replace``), so a failure never
            leaves a partial file at ``path``.
        query_image, gallery_image: float [3, H, W] in [0, 1] or uint8 [H, W, 3]; both the
            same size.
        query_map, gallery_map: [H, W] saliency in [0, 1] (see ``upsample_saliency``).
        title: optional figure title.

    The PNG's pixel size is ``pair_figure_size(H, W, title)``.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end with .png, got {str(path)!r}")
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"directory {str(directory)!r} for {str(path)!r} does not exist")
    query_rgb = _image_to_float_hwc(query_image)
    gallery_rgb = _image_to_float_hwc(gallery_image)
    if query_rgb.shape != gallery_rgb.shape:
        raise ValueError(
            f"query and gallery images must have the same size, got {query_rgb.shape[:2]} "
            f"and {gallery_rgb.shape[:2]}"
        )
    panels = [
        ("query", query_rgb),
        ("query saliency", overlay_heatmap(query_image, query_map) / 255.0),
        ("gallery", gallery_rgb),
        ("gallery saliency", overlay_heatmap(gallery_image, gallery_map) / 255.0),
    ]
    height, width = query_rgb.shape[:2]
    fig_w, fig_h = _figure_inches(height, width, title)
    figure = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    FigureCanvasAgg(figure)
    panel_top = 1.0 - (fig_h - _PANEL_WIDTH_IN * height / width) / fig_h
    for index, (label, picture) in enumerate(panels):
        axes = figure.add_axes((index / 4, 0.0, 0.25, panel_top))
        axes.imshow(picture, interpolation="nearest", aspect="auto")
        axes.set_axis_off()
        axes.text(0.5, 1.0, label, transform=axes.transAxes, ha="center", va="bottom", fontsize=8)
    if title:
        figure.suptitle(title, y=1.0, va="top", fontsize=10)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))


@dataclass
class RankPanel:
    """One gallery match in a rank-list figure: the image, its CG-RAM map [H, W] in [0, 1],
    a caption (e.g. rank and distance), whether its identity label is the query's
    (``correct``; None: unknown) and the threshold's verdict (``same``: distance at most
    the threshold; None: no threshold)."""

    image: Tensor | np.ndarray
    saliency: Tensor | np.ndarray
    caption: str
    correct: bool | None = None
    same: bool | None = None


_FRAME_COLORS = {True: "#1a9641", False: "#d7191c", None: "#bbbbbb"}
_QUERY_COLOR = "#2b83ba"
_FRAME_MEANING = {True: "frame: same label as the query", False: "frame: another label",
                  None: "frame: label unknown"}
_VERDICT_TEXT = {True: "same", False: "different"}
_LEGEND_HEIGHT_IN = 0.45
_VERDICT_HEIGHT_IN = 0.2


def rank_list_legend(matches: Sequence[RankPanel], threshold: float | None = None
                     ) -> list[tuple[str, str, str]]:
    """The legend entries of a rank-list figure, ``(kind, colour, text)`` with kind "frame"
    or "tag", for what its panels show: each frame colour used, and the verdict tags with
    the threshold they come from."""
    entries = [("frame", _FRAME_COLORS[c], _FRAME_MEANING[c])
               for c in (True, False, None) if any(m.correct is c for m in matches)]
    bound = "" if threshold is None else f" {threshold:.3f}"
    for verdict, sign in ((True, "\u2264"), (False, ">")):
        if any(m.same is verdict for m in matches):
            entries.append(("tag", _FRAME_COLORS[verdict],
                            f"{_VERDICT_TEXT[verdict]}: distance {sign} threshold{bound}"))
    return entries


def save_rank_list_figure(
    path: str | os.PathLike[str],
    query_image: Tensor | np.ndarray,
    query_map: Tensor | np.ndarray,
    matches: Sequence[RankPanel],
    title: str = "",
    query_caption: str = "query",
    threshold: float | None = None,
) -> Path:
    """Save one PNG row: the query, then its ranked gallery matches, each with its CG-RAM
    overlay and caption. Two things are shown for each match, and a legend under the row
    says which is which: the frame colour follows the identity label (green: the query's
    label, red: another label, grey: unknown), and a "same"/"different" tag under the image
    gives the verdict of the distance ``threshold`` (green / red; no tag without one).
    Images share one size (H x W); written atomically. Returns the path."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    if not matches:
        raise ValueError("a rank list needs at least one match")
    panels = [(query_caption, overlay_heatmap(query_image, query_map), _QUERY_COLOR, None)]
    panels += [(m.caption, overlay_heatmap(m.image, m.saliency), _FRAME_COLORS[m.correct], m.same)
               for m in matches]
    height, width = panels[0][1].shape[:2]
    if any(p[1].shape[:2] != (height, width) for p in panels):
        raise ValueError("the query and gallery images of a rank list must share one size")
    legend = rank_list_legend(matches, threshold)
    panel_w = 1.4
    panel_h = panel_w * height / width
    caption_h = 0.45
    verdict_h = _VERDICT_HEIGHT_IN if any(m.same is not None for m in matches) else 0.0
    title_h = _TITLE_HEIGHT_IN if title else 0.0
    legend_h = _LEGEND_HEIGHT_IN if legend else 0.0
    fig_w = panel_w * len(panels)
    fig_h = panel_h + verdict_h + caption_h + title_h + legend_h
    figure = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    FigureCanvasAgg(figure)
    bottom = (legend_h + caption_h + verdict_h) / fig_h
    for index, (caption, picture, color, verdict) in enumerate(panels):
        left = index / len(panels)
        axes = figure.add_axes((left + 0.04 / len(panels), bottom, 0.92 / len(panels),
                                panel_h / fig_h))
        axes.imshow(picture, interpolation="nearest", aspect="auto")
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(4 if color != _FRAME_COLORS[None] else 1)
        centre = left + 0.5 / len(panels)
        if verdict is not None:
            figure.text(centre, bottom - 0.06 / fig_h, _VERDICT_TEXT[verdict], ha="center",
                        va="top", fontsize=7, fontweight="bold", color=_FRAME_COLORS[verdict])
        figure.text(centre, bottom - verdict_h / fig_h - 0.02, caption, ha="center", va="top",
                    fontsize=7, wrap=True)
    if legend:
        handles = [Patch(facecolor="none", edgecolor=colour, linewidth=2.5, label=text)
                   if kind == "frame" else
                   Line2D([], [], linestyle="none", marker="s", markersize=6, color=colour,
                          label=text)
                   for kind, colour, text in legend]
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3),
                      fontsize=6, frameon=False, bbox_to_anchor=(0.5, 0.0),
                      handlelength=1.4, columnspacing=1.0)
    if title:
        figure.suptitle(title, y=1.0, va="top", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))
    return path
