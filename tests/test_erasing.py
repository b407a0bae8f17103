"""Tests for BESM (Algorithm 1), Random Erasing and Batch DropBlock."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from esreid.saliency import BatchFeatureDrop, batch_feature_drop, besm_erase, random_erase


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Values in [1, 2): never equal to the erase value 0."""
    return torch.rand(n, c, h, w, generator=_gen(seed)) + 1.0


def _reference_mask(saliency: torch.Tensor, size: tuple[int, int], count: int) -> torch.Tensor:
    """[N, H, W] bool: the `count` largest positions of the bilinearly resized maps."""
    resized = F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)
    flat = resized.flatten(1)
    top = torch.topk(flat, count, dim=1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).view(-1, *size)


def test_besm_erases_exactly_the_top_positions_of_selected_images():
    images = _images(8, 3, 8, 6)
    original = images.clone()
    saliency = torch.rand(8, 4, 3, generator=_gen(1))
    erased, was_erased = besm_erase(images, saliency, ratio=0.25, prob=0.5, generator=_gen(2))
    assert torch.equal(images, original)  # not modified in place
    assert was_erased.dtype == torch.bool and was_erased.shape == (8,)
    assert 0 < int(was_erased.sum()) < 8  # both branches are exercised with this seed
    count = round(0.25 * 8 * 6)
    expected = _reference_mask(saliency, (8, 6), count)
    for i in range(8):
        zero = erased[i] == 0.0
        if was_erased[i]:
            assert torch.equal(zero[0], expected[i])
            assert int(zero[0].sum()) == count
            assert torch.equal(zero, zero[:1].expand_as(zero))  # every channel of a pixel
            assert torch.equal(erased[i][~zero], images[i][~zero])
        else:
            assert torch.equal(erased[i], images[i])


def test_besm_selection_frequency_matches_prob():
    draws, prob = 4000, 0.3
    images = _images(draws, 1, 2, 2)
    saliency = torch.rand(draws, 2, 2, generator=_gen(3))
    erased, was_erased = besm_erase(images, saliency, ratio=0.5, prob=prob, generator=_gen(0))
    hits = int(was_erased.sum())
    sigma = math.sqrt(draws * prob * (1 - prob))
    assert abs(hits - draws * prob) <= 3 * sigma
    changed = (erased != images).flatten(1).any(dim=1)
    assert torch.equal(changed, was_erased)


def test_besm_selection_uses_one_draw_per_image():
    erased, was_erased = besm_erase(
        _images(5, 1, 2, 2), torch.rand(5, 2, 2), ratio=0.5, prob=0.6, generator=_gen(5)
    )
    assert torch.equal(was_erased, torch.rand(5, generator=_gen(5)) < 0.6)


def test_besm_no_op_and_full_cases():
    images = _images(4, 2, 4, 4)
    saliency = torch.rand(4, 2, 2, generator=_gen(6))
    out, flags = besm_erase(images, saliency, ratio=0.0, prob=1.0, generator=_gen(7))
    assert torch.equal(out, images) and not flags.any()
    assert out.data_ptr() != images.data_ptr()
    out, flags = besm_erase(images, saliency, ratio=0.5, prob=0.0, generator=_gen(7))
    assert torch.equal(out, images) and not flags.any()
    out, flags = besm_erase(images, saliency, ratio=0.5, prob=1.0, generator=_gen(7))
    assert flags.all()
    assert torch.equal((out == 0).flatten(1).sum(1), torch.full((4,), 2 * 8))
    out, _ = besm_erase(images, saliency, ratio=1.0, prob=1.0, value=-1.5)
    assert torch.equal(out, torch.full_like(images, -1.5))


def test_besm_ties_prefer_lower_row_major_positions():
    images = _images(1, 1, 3, 4)
    out, _ = besm_erase(images, torch.ones(1, 2, 2), ratio=5 / 12, prob=1.0)
    expected = torch.zeros(12, dtype=torch.bool)
    expected[:5] = True
    assert torch.equal((out[0, 0] == 0).flatten(), expected)


def test_besm_count_uses_python_round():
    images = _images(1, 1, 1, 5)
    # 0.3 * 5 = 1.5 rounds to 2 (half to even); 0.5 * 5 = 2.5 rounds to 2 as well.
    for ratio in (0.3, 0.5):
        out, _ = besm_erase(images, torch.rand(1, 1, 5), ratio=ratio, prob=1.0)
        assert int((out == 0).sum()) == 2


def test_besm_is_deterministic_with_a_seeded_generator():
    images = _images(16, 3, 6, 6)
    saliency = torch.rand(16, 3, 3, generator=_gen(8))
    first = besm_erase(images, saliency, 0.3, 0.5, generator=_gen(9))
    second = besm_erase(images, saliency, 0.3, 0.5, generator=_gen(9))
    other = besm_erase(images, saliency, 0.3, 0.5, generator=_gen(10))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, r"ratio must be a number in \[0, 1\], got 1.5"),
        ({"prob": -0.1}, r"prob must be a number in \[0, 1\], got -0.1"),
        ({"ratio": float("nan")}, r"ratio must be a number in \[0, 1\], got nan"),
        ({"saliency": torch.rand(3, 2, 2)}, "saliency has 3 maps but images has 2 images"),
        ({"saliency": torch.rand(2, 4)}, r"saliency must be \[N, h, w\]"),
        ({"images": torch.rand(2, 4, 4)}, r"images must be \[N, C, H, W\]"),
        ({"saliency": torch.full((2, 2, 2), float("nan"))}, "saliency contains NaN"),
    ],
)
def test_besm_rejects_bad_input(kwargs, message):
    args = {
        "images": _images(2, 1, 4, 4),
        "saliency": torch.rand(2, 2, 2),
        "ratio": 0.2,
        "prob": 0.5,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        besm_erase(**args)


def _rectangle(mask: torch.Tensor) -> tuple[int, int]:
    """Height and width of the rectangle that `mask` [H, W] must be; fails otherwise."""
    rows, cols = mask.any(dim=1), mask.any(dim=0)
    assert torch.equal(mask, rows[:, None] & cols[None, :])
    h, w = int(rows.sum()), int(cols.sum())
    row_idx, col_idx = rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)
    assert int(row_idx[-1] - row_idx[0]) + 1 == h and int(col_idx[-1] - col_idx[0]) + 1 == w
    return h, w


def test_random_erase_rectangles_respect_area_and_aspect_bounds():
    height, width = 24, 20
    images = _images(300, 2, height, width)
    area, aspect = (0.05, 0.3), (0.5, 2.0)
    erased, was_erased = random_erase(
        images, prob=1.0, area=area, aspect=aspect, generator=_gen(11)
    )
    assert was_erased.all()
    total = height * width
    for i in range(300):
        zero = erased[i] == 0.0
        assert torch.equal(zero, zero[:1].expand_as(zero))
        h, w = _rectangle(zero[0])
        # h = round(sqrt(S r)), w = round(sqrt(S / r)) bound the target area S and ratio r:
        assert area[0] * total <= (h + 0.5) * (w + 0.5)
        assert (h - 0.5) * (w - 0.5) <= area[1] * total
        assert aspect[0] <= (h + 0.5) / (w - 0.5) and (h - 0.5) / (w + 0.5) <= aspect[1]
        assert torch.equal(erased[i][~zero], images[i][~zero])


def test_random_erase_frequency_and_determinism():
    draws, prob = 2000, 0.4
    images = _images(draws, 1, 8, 8)
    erased, was_erased = random_erase(images, prob=prob, generator=_gen(12))
    sigma = math.sqrt(draws * prob * (1 - prob))
    assert abs(int(was_erased.sum()) - draws * prob) <= 3 * sigma
    assert torch.equal((erased != images).flatten(1).any(1), was_erased)
    again, flags = random_erase(images, prob=prob, generator=_gen(12))
    assert torch.equal(again, erased) and torch.equal(flags, was_erased)


def test_random_erase_noise_fill():
    images = _images(4, 3, 16, 16)
    erased, was_erased = random_erase(images, prob=1.0, value=None, generator=_gen(13))
    assert was_erased.all()
    changed = erased != images
    for i in range(4):
        region = erased[i][changed[i]]
        assert region.numel() > 0 and (region < 1.0).any()  # noise, not the [1, 2) image
        assert region.std() > 0.5  # per-pixel standard normal values, not a constant


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prob": 2.0}, r"prob must be a number in \[0, 1\], got 2.0"),
        ({"area": (0.0, 0.4)}, r"area must be \(min, max\) with 0 < min <= max <= 1"),
        ({"area": (0.5, 0.4)}, r"area must be \(min, max\) with 0 < min <= max <= 1"),
        ({"aspect": (3.0, 0.3)}, r"aspect must be \(min, max\) with 0 < min <= max"),
    ],
)
def test_random_erase_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_erase(_images(1, 1, 4, 4), **kwargs)


def test_batch_feature_drop_zeros_one_shared_block():
    x = _images(4, 3, 10, 6)
    out = batch_feature_drop(x, height_ratio=0.3, width_ratio=0.5, generator=_gen(14))
    zero = out == 0
    assert torch.equal(zero, zero[:1, :1].expand_as(zero))  # same block for all samples
    assert _rectangle(zero[0, 0]) == (3, 3)  # round(10 * 0.3), round(6 * 0.5)
    assert torch.equal(out[~zero], x[~zero])


def test_batch_feature_drop_default_full_width_and_gradient():
    x = _images(2, 2, 8, 5).requires_grad_()
    out = batch_feature_drop(x, generator=_gen(15))
    zero = out.detach()[0, 0] == 0
    assert _rectangle(zero) == (2, 5)  # round(8 * 0.3) = 2 rows, all 5 columns
    out.sum().backward()
    assert torch.equal(x.grad[0, 0], (~zero).float())


def test_batch_feature_drop_is_seeded_and_covers_positions():
    x = _images(1, 1, 10, 4)
    tops = set()
    for seed in range(40):
        a = batch_feature_drop(x, 0.3, generator=_gen(seed))
        b = batch_feature_drop(x, 0.3, generator=_gen(seed))
        assert torch.equal(a, b)
        tops.add(int((a[0, 0, :, 0] == 0).nonzero()[0]))
    assert tops == set(range(8))  # every start row of a 3-row block in 10 rows


def test_batch_feature_drop_module_train_and_eval():
    layer = BatchFeatureDrop(0.5, 1.0, generator=_gen(16))
    x = _images(2, 2, 4, 4)
    assert int((layer(x) == 0).sum()) == 2 * 2 * 2 * 4
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match=r"height_ratio must be a number in \(0, 1\], got 0"):
        BatchFeatureDrop(height_ratio=0)
    with pytest.raises(ValueError, match=r"width_ratio must be a number in \(0, 1\], got 1.5"):
        batch_feature_drop(x, width_ratio=1.5)
