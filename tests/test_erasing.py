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
    saliency = torch.ones(1, 3, 4)
    saliency[0, 2, 3] = 0.0  # contrast, so the map ranks; 11 tied positions above it
    out, _ = besm_erase(images, saliency, ratio=5 / 12, prob=1.0)
    expected = torch.zeros(12, dtype=torch.bool)
    expected[:5] = True
    assert torch.equal((out[0, 0] == 0).flatten(), expected)


def test_besm_leaves_images_whose_map_has_no_contrast():
    """An all-zero (or constant) map ranks no pixel above another: no salient part to erase,
    and the tie-break would otherwise erase the top rows of every such image."""
    images = _images(4, 2, 6, 4)
    saliency = torch.rand(4, 3, 2, generator=_gen(40))
    saliency[1] = 0.0
    saliency[3] = 0.7
    g = _gen(41)
    out, flags = besm_erase(images, saliency, ratio=0.25, prob=1.0, generator=g)
    assert flags.tolist() == [True, False, True, False]
    assert torch.equal(out[1], images[1]) and torch.equal(out[3], images[3])
    assert not torch.equal(out[0], images[0])
    # One selection draw per image, as before: later draws of the run do not shift.
    ref = _gen(41)
    torch.rand(4, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("value, expected", [
    ("mean", torch.zeros(2)),
    (0.25, torch.full((2,), 0.25)),
    ("-1.5", torch.full((2,), -1.5)),
])
def test_besm_fills_with_a_constant(value, expected):
    images = _images(1, 2, 2, 2)
    saliency = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])
    out, _ = besm_erase(images, saliency, ratio=0.25, prob=1.0, value=value)
    assert torch.equal(out[0, :, 0, 0], expected)
    assert torch.equal(out[0, :, 1:], images[0, :, 1:])


def test_besm_fills_black_or_noise():
    from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    images = _images(2, 3, 4, 4)
    saliency = torch.zeros(2, 4, 4)
    saliency[:, 0, :2] = 1.0  # two pixels
    out, _ = besm_erase(images, saliency, ratio=2 / 16, prob=1.0, value="zero")
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(out[:, :, 0, 0], black.expand(2, 3))
    assert torch.allclose(out[:, :, 0, 1], black.expand(2, 3))
    g = _gen(42)
    out, _ = besm_erase(images, saliency, ratio=2 / 16, prob=1.0, value="random", generator=g)
    ref = _gen(42)
    torch.rand(2, generator=ref)  # the selection draws come first
    noise = torch.randn(2, 3, 4, 4, generator=ref)
    assert torch.equal(out[:, :, 0, :2], noise[:, :, 0, :2])
    assert torch.equal(out[:, :, 1:], images[:, :, 1:])
    assert torch.equal(g.get_state(), ref.get_state())
    with pytest.raises(ValueError, match="value must be a number or one of mean, zero, random, "
                                         "got 'grey'"):
        besm_erase(images, saliency, ratio=0.1, prob=1.0, value="grey")
    with pytest.raises(ValueError, match="value 'zero' \\(black\\) needs RGB images, got 2"):
        besm_erase(images[:, :2], saliency, ratio=0.1, prob=1.0, value="zero")


def test_random_erase_fills_with_the_named_values():
    images = _images(3, 3, 8, 8)
    means, _ = random_erase(images, prob=1.0, value="mean", generator=_gen(43))
    zeros, _ = random_erase(images, prob=1.0, value=0.0, generator=_gen(43))
    assert torch.equal(means, zeros)
    noise, _ = random_erase(images, prob=1.0, value="random", generator=_gen(43))
    legacy, _ = random_erase(images, prob=1.0, value=None, generator=_gen(43))
    assert torch.equal(noise, legacy)
    black, flags = random_erase(images, prob=1.0, value="zero", generator=_gen(43))
    assert flags.all()
    changed = (black != images).any(1)
    assert torch.equal(changed, (zeros != images).any(1))
    assert torch.allclose(black[0, :, changed[0]].mean(1),
                          torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


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


# --- exact draws, boundaries, defaults and error messages (mutation testing, issue 13) -----


def _reference_random_erase(images, prob, area, aspect, value, generator):
    """Random Erasing as its docstring defines it, drawing in the documented order: per image
    one selection draw; per attempt (at most 10) the area and aspect draws; for a fitting
    rectangle its top, its left and (value None) the standard normal fill."""
    n, c, height, width = images.shape
    out, flags = images.clone(), torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if torch.rand(1, generator=generator).item() >= prob:
            continue
        for _ in range(10):
            u_area, u_aspect = torch.rand(2, generator=generator).tolist()
            target = (area[0] + (area[1] - area[0]) * u_area) * height * width
            log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
            r = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
            h, w = round(math.sqrt(target * r)), round(math.sqrt(target / r))
            if 1 <= h <= height and 1 <= w <= width:
                top = int(torch.randint(height - h + 1, (1,), generator=generator))
                left = int(torch.randint(width - w + 1, (1,), generator=generator))
                fill = value if value is not None else torch.randn((c, h, w), generator=generator)
                out[i, :, top : top + h, left : left + w] = fill
                flags[i] = True
                break
    return out, flags


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        # The defaults: P = 0.5, area (0.02, 0.4), aspect (0.3, 3.33), value 0.
        ({}, (12, 2, 16, 8)),
        # Tall, asymmetric aspect range: a swapped h and w or a wrong log-uniform range shows.
        ({"prob": 1.0, "area": (0.05, 0.2), "aspect": (2.0, 4.0)}, (12, 1, 30, 12)),
        # Large areas: many attempts do not fit, so the attempt loop and its draws matter.
        ({"prob": 0.8, "area": (0.5, 1.0), "aspect": (0.3, 3.33)}, (12, 1, 9, 7)),
        ({"prob": 1.0, "value": None, "area": (0.1, 0.3)}, (6, 3, 10, 10)),
        ({"prob": 0.7, "value": -2.5, "aspect": (0.4, 0.8)}, (8, 2, 12, 20)),
    ],
)
def test_random_erase_equals_its_definition_draw_for_draw(kwargs, shape):
    images = _images(*shape, seed=21)
    g, g_ref = _gen(22), _gen(22)
    erased, was_erased = random_erase(images, generator=g, **kwargs)
    full = {"prob": 0.5, "area": (0.02, 0.4), "aspect": (0.3, 3.33), "value": 0.0, **kwargs}
    expected, flags = _reference_random_erase(images, generator=g_ref, **full)
    assert 0 < int(flags.sum())  # something is erased
    assert was_erased.dtype == torch.bool
    assert torch.equal(was_erased, flags)
    assert torch.equal(erased, expected)
    assert torch.equal(g.get_state(), g_ref.get_state())  # the same number of draws


def test_random_erase_default_probability_and_value():
    draws = 2000
    images = _images(draws, 1, 6, 6)
    erased, was_erased = random_erase(images, generator=_gen(23))
    sigma = math.sqrt(draws * 0.25)
    assert abs(int(was_erased.sum()) - draws * 0.5) <= 3 * sigma
    changed = erased != images
    assert torch.equal(changed.flatten(1).any(1), was_erased)
    assert (erased[changed] == 0.0).all()  # filled with the default value 0


def test_random_erase_selection_is_strict():
    """An image is kept when its draw u >= prob: a draw equal to prob keeps it."""
    u = torch.rand(1, generator=_gen(24)).item()
    images = _images(1, 1, 8, 8)
    out, flags = random_erase(images, prob=u, area=(0.1, 0.2), generator=_gen(24))
    assert not flags.any() and torch.equal(out, images)
    next_up = math.nextafter(u, 1.0)
    out, flags = random_erase(images, prob=next_up, area=(0.1, 0.2), generator=_gen(24))
    assert flags.all() and not torch.equal(out, images)


def test_random_erase_thin_and_full_extent_rectangles():
    # One-pixel-high rectangles (h = 1) are allowed ...
    rows = _images(4, 1, 1, 20)
    out, flags = random_erase(
        rows, prob=1.0, area=(0.1, 0.2), aspect=(0.2, 0.25), generator=_gen(25)
    )
    assert flags.all() and (out == 0).any()
    # ... and so are one-pixel-wide ones (w = 1).
    cols = _images(4, 1, 20, 1)
    out, flags = random_erase(
        cols, prob=1.0, area=(0.1, 0.2), aspect=(4.0, 5.0), generator=_gen(25)
    )
    assert flags.all() and (out == 0).any()
    # A rectangle as high as the image (h = H = 2) ...
    low = _images(3, 1, 2, 20)
    out, flags = random_erase(low, prob=1.0, area=(0.1, 0.1), aspect=(1.0, 1.0), generator=_gen(26))
    assert flags.all()
    for i in range(3):
        assert _rectangle(out[i, 0] == 0) == (2, 2)
    # ... or as wide as the image (w = W = 2).
    narrow = _images(3, 1, 20, 2)
    out, flags = random_erase(
        narrow, prob=1.0, area=(0.1, 0.1), aspect=(1.0, 1.0), generator=_gen(26)
    )
    assert flags.all()
    for i in range(3):
        assert _rectangle(out[i, 0] == 0) == (2, 2)


def test_random_erase_leaves_an_image_when_no_attempt_fits():
    # h = round(sqrt(S r)) >= 6 > H = 4 on every attempt, while w (about 2) would fit.
    images = _images(3, 1, 4, 4)
    g = _gen(27)
    out, flags = random_erase(images, prob=1.0, area=(0.9, 1.0), aspect=(3.0, 3.33), generator=g)
    assert not flags.any() and torch.equal(out, images)
    # One selection draw and ten attempts of two draws per image, nothing else.
    g_ref = _gen(27)
    torch.rand(3 * (1 + 10 * 2), generator=g_ref)
    assert torch.equal(g.get_state(), g_ref.get_state())


def test_random_erase_without_a_generator():
    torch.manual_seed(28)
    out, flags = random_erase(_images(4, 2, 8, 8), prob=1.0)
    assert flags.all() and (out == 0).any()
    torch.manual_seed(28)
    noise, flags = random_erase(_images(4, 2, 8, 8), prob=1.0, value=None)
    assert flags.all() and (noise < 1.0).any()
    torch.manual_seed(28)
    again, _ = random_erase(_images(4, 2, 8, 8), prob=1.0, value=None)
    assert torch.equal(again, noise)  # drawn from torch's global generator


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prob": 2.0}, r"^prob must be a number in \[0, 1\], got 2.0$"),
        ({"prob": "0.5"}, r"^prob must be a number in \[0, 1\], got '0.5'$"),
        (
            {"area": (0.0, 0.4)},
            r"^area must be \(min, max\) with 0 < min <= max <= 1, got \(0.0, 0.4\)$",
        ),
        (
            {"area": (0.5, 0.4)},
            r"^area must be \(min, max\) with 0 < min <= max <= 1, got \(0.5, 0.4\)$",
        ),
        (
            {"area": (0.1, 1.5)},
            r"^area must be \(min, max\) with 0 < min <= max <= 1, got \(0.1, 1.5\)$",
        ),
        (
            {"aspect": (3.0, 0.3)},
            r"^aspect must be \(min, max\) with 0 < min <= max, got \(3.0, 0.3\)$",
        ),
        (
            {"aspect": (0.0, 1.0)},
            r"^aspect must be \(min, max\) with 0 < min <= max, got \(0.0, 1.0\)$",
        ),
        (
            {"images": torch.rand(2, 4, 4)},
            r"^images must be \[N, C, H, W\], got shape \(2, 4, 4\)$",
        ),
    ],
)
def test_random_erase_error_messages_are_exact(kwargs, message):
    args = {"images": _images(1, 1, 4, 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        random_erase(**args)


def test_random_erase_accepts_the_bounds_of_its_ranges():
    images = _images(20, 1, 10, 10)
    for area, aspect in [
        ((0.3, 0.3), (1.0, 1.0)),
        ((0.5, 1.0), (0.5, 2.0)),
        ((1.0, 1.0), (1.0, 1.0)),
    ]:
        out, flags = random_erase(images, prob=1.0, area=area, aspect=aspect, generator=_gen(29))
        assert flags.any()
    # area (1, 1) with aspect 1 is the whole image.
    assert torch.equal(out, torch.zeros_like(images))


def test_besm_selection_is_strict():
    """Algorithm 1 erases when P' < P: a draw equal to P keeps the image."""
    u = torch.rand(4, generator=_gen(30))
    prob = float(u[1])
    images = _images(4, 1, 4, 4)
    _, flags = besm_erase(images, torch.rand(4, 2, 2), ratio=0.25, prob=prob, generator=_gen(30))
    assert torch.equal(flags, u < prob)
    assert not flags[1]


def test_besm_erases_a_single_pixel():
    images = _images(2, 2, 2, 3)
    saliency = torch.tensor(
        [[[0.1, 0.2, 0.3], [0.9, 0.4, 0.0]], [[5.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    )
    out, flags = besm_erase(images, saliency, ratio=0.2, prob=1.0)  # round(1.2) = 1 pixel
    assert flags.all()
    zero = out == 0
    assert zero.sum() == 2 * 2  # one pixel of each image, in both channels
    assert zero[0, :, 1, 0].all() and zero[1, :, 0, 0].all()


def test_besm_ties_in_a_large_map_follow_row_major_order():
    """64 positions: torch's default (unstable) sort would not keep equal values in order."""
    images = _images(3, 1, 8, 8)
    saliency = torch.zeros(3, 8, 8)
    saliency[:, 5, 6] = 1.0
    saliency[:, 7, 1] = 2.0
    out, flags = besm_erase(images, saliency, ratio=20 / 64, prob=1.0)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[:18] = True  # the 18 lowest row-major zeros after the two salient pixels
    expected[5 * 8 + 6] = expected[7 * 8 + 1] = True
    for i in range(3):
        assert torch.equal((out[i, 0] == 0).flatten(), expected)


def test_besm_single_selected_image_among_several():
    images = _images(4, 2, 4, 4)
    saliency = torch.rand(4, 2, 2, generator=_gen(31))
    g = _gen(32)
    u = torch.rand(4, generator=_gen(32))
    prob = float(u.min()) + 1e-7  # exactly one image drawn below P
    out, flags = besm_erase(images, saliency, ratio=0.25, prob=prob, generator=g)
    assert int(flags.sum()) == 1
    i = int(flags.nonzero())
    expected = _reference_mask(saliency[i : i + 1], (4, 4), 4)[0]
    assert torch.equal(out[i, 0] == 0, expected) and torch.equal(out[i, 1] == 0, expected)
    assert torch.equal(out[~flags], images[~flags])


def test_besm_default_fill_is_zero_and_value_is_used():
    images = _images(2, 3, 4, 4)
    saliency = torch.rand(2, 4, 4, generator=_gen(33))
    out, _ = besm_erase(images, saliency, ratio=0.5, prob=1.0)
    changed = out != images
    assert int(changed.sum()) == 2 * 3 * 8 and (out[changed] == 0).all()
    filled, _ = besm_erase(images, saliency, ratio=0.5, prob=1.0, value=7.0)
    assert torch.equal(filled != images, changed) and (filled[changed] == 7.0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.5}, r"^ratio must be a number in \[0, 1\], got 1.5$"),
        ({"ratio": "0.2"}, r"^ratio must be a number in \[0, 1\], got '0.2'$"),
        ({"prob": -0.1}, r"^prob must be a number in \[0, 1\], got -0.1$"),
        ({"prob": 1.01}, r"^prob must be a number in \[0, 1\], got 1.01$"),
        (
            {"saliency": torch.rand(3, 2, 2)},
            r"^saliency has 3 maps but images has 2 images; N must match$",
        ),
        ({"saliency": torch.rand(2, 4)}, r"^saliency must be \[N, h, w\], got shape \(2, 4\)$"),
        (
            {"saliency": torch.rand(2, 1, 2, 2)},
            r"^saliency must be \[N, h, w\], got shape \(2, 1, 2, 2\)$",
        ),
        (
            {"images": torch.rand(2, 4, 4)},
            r"^images must be \[N, C, H, W\], got shape \(2, 4, 4\)$",
        ),
        (
            {"saliency": torch.tensor([[[0.0, float("inf")]], [[0.0, 1.0]]])},
            r"^saliency contains NaN or infinite values$",
        ),
        (
            {"saliency": torch.full((2, 2, 2), float("nan"))},
            r"^saliency contains NaN or infinite values$",
        ),
    ],
)
def test_besm_error_messages_are_exact(kwargs, message):
    args = {
        "images": _images(2, 1, 4, 4),
        "saliency": torch.rand(2, 2, 2),
        "ratio": 0.2,
        "prob": 0.5,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        besm_erase(**args)


def _reference_drop(x, block_h, block_w, generator):
    """Batch DropBlock by hand: the top row, then the left column, each uniform."""
    _, _, h, w = x.shape
    top = int(torch.randint(h - block_h + 1, (1,), generator=generator))
    left = int(torch.randint(w - block_w + 1, (1,), generator=generator))
    out = x.clone()
    out[:, :, top : top + block_h, left : left + block_w] = 0
    return out


@pytest.mark.parametrize(
    ("ratios", "block"),
    [
        ((0.3, 1.0), (3, 7)),
        ((0.5, 0.5), (5, 4)),
        ((0.01, 0.2), (1, 1)),
        ((1.0, 0.6), (10, 4)),
        ((0.04, 0.01), (1, 1)),
    ],
)
def test_batch_feature_drop_equals_its_definition(ratios, block):
    x = _images(3, 2, 10, 7, seed=34)
    for seed in range(6):
        g, g_ref = _gen(seed), _gen(seed)
        out = batch_feature_drop(x, *ratios, generator=g)
        assert torch.equal(out, _reference_drop(x, *block, g_ref))
        assert torch.equal(g.get_state(), g_ref.get_state())


def test_batch_feature_drop_covers_every_column():
    x = _images(1, 1, 4, 10)
    lefts = set()
    for seed in range(60):
        zero = batch_feature_drop(x, 1.0, 0.3, generator=_gen(seed))[0, 0] == 0
        assert _rectangle(zero) == (4, 3)
        lefts.add(int(zero[0].nonzero()[0]))
    assert lefts == set(range(8))


def test_batch_feature_drop_keeps_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = _images(2, 2, 6, 4).to(dtype)
        out = batch_feature_drop(x, generator=_gen(35))
        assert out.dtype == dtype
        assert int((out == 0).sum()) == 2 * 2 * 2 * 4  # round(6 * 0.3) = 2 full rows


def test_batch_feature_drop_without_a_generator():
    x = _images(2, 1, 10, 4)
    torch.manual_seed(36)
    first = batch_feature_drop(x)
    torch.manual_seed(36)
    assert torch.equal(batch_feature_drop(x), first)
    assert int((first == 0).sum()) == 2 * 3 * 4


def test_batch_feature_drop_error_messages_are_exact():
    x = _images(2, 1, 4, 4)
    with pytest.raises(
        ValueError, match=r"^feature_map must be \[N, C, H, W\], got shape \(1, 4, 4\)$"
    ):
        batch_feature_drop(x[0])
    with pytest.raises(ValueError, match=r"^height_ratio must be a number in \(0, 1\], got 0$"):
        batch_feature_drop(x, height_ratio=0)
    with pytest.raises(ValueError, match=r"^height_ratio must be a number in \(0, 1\], got 1.2$"):
        batch_feature_drop(x, height_ratio=1.2)
    with pytest.raises(ValueError, match=r"^width_ratio must be a number in \(0, 1\], got 1.5$"):
        batch_feature_drop(x, width_ratio=1.5)
    with pytest.raises(ValueError, match=r"^width_ratio must be a number in \(0, 1\], got '1'$"):
        batch_feature_drop(x, width_ratio="1")
    with pytest.raises(ValueError, match=r"^height_ratio must be a number in \(0, 1\], got None$"):
        batch_feature_drop(x, height_ratio=None)


def test_batch_feature_drop_module_defaults_and_draws():
    layer = BatchFeatureDrop()
    assert (layer.height_ratio, layer.width_ratio, layer.generator) == (0.3, 1.0, None)
    assert repr(layer) == "BatchFeatureDrop(height_ratio=0.3, width_ratio=1.0)"
    x = _images(2, 2, 10, 6)
    seeded = BatchFeatureDrop(0.2, 0.5, generator=_gen(37))
    reference = _gen(37)
    for _ in range(3):  # the module's own generator advances from call to call
        assert torch.equal(seeded(x), batch_feature_drop(x, 0.2, 0.5, generator=reference))
    torch.manual_seed(38)
    unseeded = layer(x)
    torch.manual_seed(38)
    assert torch.equal(unseeded, batch_feature_drop(x))
    with pytest.raises(ValueError, match=r"^width_ratio must be a number in \(0, 1\], got 0.0$"):
        BatchFeatureDrop(width_ratio=0.0)
    with pytest.raises(ValueError, match=r"^height_ratio must be a number in \(0, 1\], got 2$"):
        BatchFeatureDrop(height_ratio=2)


@pytest.mark.cuda
def test_draws_follow_the_generator_and_results_the_data():
    """Random numbers are drawn on the generator's device, results are on the data's device:
    CPU data with a CUDA generator, and CUDA data with a CPU generator."""
    images = _images(6, 2, 8, 8)
    saliency = torch.rand(6, 4, 4, generator=_gen(50))
    cuda_g = torch.Generator(device="cuda").manual_seed(0)
    erased, flags = besm_erase(images, saliency, 0.25, 0.5, generator=cuda_g)
    assert erased.device == flags.device == images.device
    erased, flags = random_erase(images, prob=1.0, value=None, generator=cuda_g)
    assert erased.device == flags.device == images.device and flags.all()
    assert batch_feature_drop(images, generator=cuda_g).device == images.device

    gpu = images.cuda()
    erased, flags = besm_erase(gpu, saliency, 0.25, 0.5, generator=_gen(51))
    cpu_erased, cpu_flags = besm_erase(images, saliency, 0.25, 0.5, generator=_gen(51))
    assert erased.device == flags.device == gpu.device
    assert torch.equal(erased.cpu(), cpu_erased) and torch.equal(flags.cpu(), cpu_flags)
    erased, flags = random_erase(gpu, prob=0.5, value=None, generator=_gen(52))
    cpu_erased, cpu_flags = random_erase(images, prob=0.5, value=None, generator=_gen(52))
    assert erased.device == flags.device == gpu.device
    assert torch.equal(erased.cpu(), cpu_erased) and torch.equal(flags.cpu(), cpu_flags)
    dropped = batch_feature_drop(gpu, generator=_gen(53))
    assert dropped.device == gpu.device
    assert torch.equal(dropped.cpu(), batch_feature_drop(images, generator=_gen(53)))
