"""Saliency pictures: denormalisation, heat-map overlays, pair figures and rank lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from esreid.saliency import (
    RankPanel,
    denormalize,
    overlay_heatmap,
    pair_figure_size,
    save_pair_figure,
    save_rank_list_figure,
    upsample_saliency,
)
from esreid.saliency.visualize import rank_list_legend


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_denormalize_inverts_normalisation_and_clamps():
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.25, 2.0]
    x = torch.tensor([[[0.0]], [[1.0]], [[0.25]]])  # [3, 1, 1]
    torch.testing.assert_close(denormalize(x, mean, std), torch.tensor([[[0.5]], [[0.5]], [[0.5]]]))
    batch = torch.full((2, 3, 1, 1), 10.0)
    assert torch.equal(denormalize(batch, mean, std), torch.ones(2, 3, 1, 1))
    with pytest.raises(ValueError, match="mean and std need 3 entries"):
        denormalize(x, [0.5], [0.5])


def test_overlay_heatmap_blends_with_jet():
    image = np.full((2, 3, 3), 200, dtype=np.uint8)
    saliency = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert np.array_equal(overlay_heatmap(image, saliency, alpha=0.0), image)
    heat = overlay_heatmap(image, saliency, alpha=1.0)
    # jet(0) = (0, 0, 0.5) and jet(1) = (0.5, 0, 0): dark blue and dark red.
    assert heat.dtype == np.uint8 and heat.shape == (2, 3, 3)
    assert heat[0, 0].tolist() == [0, 0, 128] and heat[0, 1].tolist() == [128, 0, 0]
    half = overlay_heatmap(torch.ones(3, 2, 3), saliency, alpha=0.5)
    assert half[0, 0].tolist() == [128, 128, 191]  # 0.5 * 255 + 0.5 * (0, 0, 127.5)
    with pytest.raises(ValueError, match=r"saliency shape \(3, 2\) does not match"):
        overlay_heatmap(image, saliency.T)
    with pytest.raises(ValueError, match=r"a tensor image must be float \[3, H, W\]"):
        overlay_heatmap(torch.ones(2, 3, 3), saliency)


def test_save_pair_figure_writes_png_atomically(tmp_path):
    g = _gen(20)
    height, width = 32, 16
    query, gallery = (
        torch.rand(3, height, width, generator=g),
        torch.rand(3, height, width, generator=g),
    )
    maps = upsample_saliency(torch.rand(2, 4, 2, generator=g), (height, width))
    target = tmp_path / "pair.png"
    target.write_bytes(b"old")  # an existing file is replaced
    save_pair_figure(target, query, gallery, maps[0], maps[1], title="rank 1")
    with Image.open(target) as png:
        assert png.format == "PNG"
        assert png.size == pair_figure_size(height, width, "rank 1") == (800, 460)
    assert [p.name for p in tmp_path.iterdir()] == ["pair.png"]
    save_pair_figure(tmp_path / "plain.png", query, gallery, maps[0], maps[1])
    with Image.open(tmp_path / "plain.png") as png:
        assert png.size == pair_figure_size(height, width) == (800, 430)


def test_save_pair_figure_errors_leave_nothing(tmp_path):
    image, heat = torch.rand(3, 4, 4), torch.rand(4, 4)
    with pytest.raises(ValueError, match="path must end with .png"):
        save_pair_figure(tmp_path / "x.jpg", image, image, heat, heat)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_pair_figure(tmp_path / "missing" / "x.png", image, image, heat, heat)
    with pytest.raises(ValueError, match="saliency contains NaN"):
        save_pair_figure(tmp_path / "x.png", image, image, heat, torch.full((4, 4), float("nan")))
    assert list(tmp_path.iterdir()) == []


def test_save_pair_figure_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    image, heat = torch.rand(3, 4, 4), torch.rand(4, 4)
    with pytest.raises(OSError, match="disk full"):
        save_pair_figure(tmp_path / "x.png", image, image, heat, heat)
    assert list(tmp_path.iterdir()) == []


def test_rank_list_figure_frames_correct_and_wrong_matches(tmp_path):
    g = _gen(3)
    h, w = 64, 32
    image = torch.rand(3, h, w, generator=g)
    heat = torch.zeros(h, w)
    panels = [RankPanel(image, heat, "#1", True), RankPanel(image, heat, "#2", False),
              RankPanel(image, heat, "#3", None)]
    path = save_rank_list_figure(tmp_path / "q.png", image, heat, panels, title="query 1")
    with Image.open(path) as png:
        assert png.format == "PNG"
        # 4 panels of 1.4 in (query + 3 matches) at 100 dpi; image, caption, title and
        # legend strips (no verdict strip: no panel has a verdict).
        assert png.size == (4 * 140, round((1.4 * h / w + 0.45 + 0.3 + 0.45) * 100))
        rgb = np.asarray(png.convert("RGB"))
    # Frames: sample the left edge of each panel, half-way down.
    y = round(0.3 * 100 + 1.4 * h / w * 100 / 2)

    def edge(i):
        x0 = round(i * 140 + 0.04 * 140) + 1
        return rgb[y, x0 - 2:x0 + 3].reshape(-1, 3)
    assert any(tuple(px) == (0x1a, 0x96, 0x41) for px in edge(1))  # green: correct
    assert any(tuple(px) == (0xd7, 0x19, 0x1c) for px in edge(2))  # red: wrong
    assert not any(tuple(px) in ((0x1a, 0x96, 0x41), (0xd7, 0x19, 0x1c)) for px in edge(3))
    assert rank_list_legend(panels) == [
        ("frame", "#1a9641", "frame: same label as the query"),
        ("frame", "#d7191c", "frame: another label"),
        ("frame", "#bbbbbb", "frame: label unknown")]
    with pytest.raises(ValueError, match="at least one match"):
        save_rank_list_figure(tmp_path / "none.png", image, heat, [])
    small = RankPanel(torch.rand(3, 8, 4), torch.zeros(8, 4), "x")
    with pytest.raises(ValueError, match="share one size"):
        save_rank_list_figure(tmp_path / "mixed.png", image, heat, [small])


def test_rank_list_figure_shows_label_and_threshold_verdict_with_a_legend(tmp_path):
    """Issue 20: the frame follows the label, a tag gives the threshold's verdict, and the
    legend says which is which (esreid search --explain knows the verdict; the frame stays
    grey when the query has no label)."""
    h, w = 64, 32
    image = torch.rand(3, h, w, generator=_gen(4))
    heat = torch.zeros(h, w)
    panels = [RankPanel(image, heat, "#1", None, True), RankPanel(image, heat, "#2", True, False),
              RankPanel(image, heat, "#3", None, None)]
    legend = rank_list_legend(panels, threshold=0.35)
    assert legend == [("frame", "#1a9641", "frame: same label as the query"),
                      ("frame", "#bbbbbb", "frame: label unknown"),
                      ("tag", "#1a9641", "same: distance \u2264 threshold 0.350"),
                      ("tag", "#d7191c", "different: distance > threshold 0.350")]
    path = save_rank_list_figure(tmp_path / "v.png", image, heat, panels, threshold=0.35)
    with Image.open(path) as png:
        # Image, verdict, caption and legend strips; no title.
        assert png.size == (4 * 140, round((1.4 * h / w + 0.2 + 0.45 + 0.45) * 100))
        rgb = np.asarray(png.convert("RGB")).astype(int)
    panel_bottom = round(1.4 * h / w * 100)
    verdict_strip = rgb[panel_bottom + 4:panel_bottom + 20]  # below the 4 px frames

    def reddish(block):
        return ((block[..., 0] > 150) & (block[..., 1] < 90) & (block[..., 2] < 90)).sum()

    def greenish(block):
        return ((block[..., 1] > 110) & (block[..., 0] < 90) & (block[..., 2] < 110)).sum()
    # Panel 1 (index 1) says "same" in green, panel 2 "different" in red, panel 3 nothing.
    assert greenish(verdict_strip[:, 140:280]) > 0 and reddish(verdict_strip[:, 140:280]) == 0
    assert reddish(verdict_strip[:, 280:420]) > 0 and greenish(verdict_strip[:, 280:420]) == 0
    assert greenish(verdict_strip[:, 420:]) == 0 and reddish(verdict_strip[:, 420:]) == 0
    legend_strip = rgb[-45:]
    assert greenish(legend_strip) > 0 and reddish(legend_strip) > 0  # the tag markers
