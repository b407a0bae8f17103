"""Tests for GAP, GMP, P-pooling (ES-Net Eqs. 6-7) and GeM (generalized mean)."""

from __future__ import annotations

import math

import pytest
import torch

from esreid.models.pooling import (
    GeM,
    GlobalAvgPool,
    GlobalMaxPool,
    PPooling,
    build_pooling,
    gem_pool,
    p_pool,
)


def _post_relu(seed: int, shape=(2, 3, 4, 5), dtype=torch.float32) -> torch.Tensor:
    """ReLU of a normal sample: about half the entries are exact zeros."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g, dtype=dtype))


def _peaked(seed: int) -> torch.Tensor:
    """Post-ReLU map in [0, 1] with exact zeros and one peak of 2 per channel."""
    x = _post_relu(seed).clamp(max=1.0)
    x[:, :, 1, 2] = 2.0
    return x


def test_gap_and_gmp_values():
    x = torch.arange(24.0).view(1, 2, 3, 4)
    assert torch.equal(GlobalAvgPool()(x), torch.tensor([[5.5, 17.5]]))
    assert torch.equal(GlobalMaxPool()(x), torch.tensor([[11.0, 23.0]]))


def test_pooling_rejects_non_4d_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\], got shape \(2, 3\)"):
        GlobalAvgPool()(torch.ones(2, 3))


def test_p_pool_equals_gap_at_l_one_float64():
    x = _post_relu(0, dtype=torch.float64) + 0.1  # strictly positive: no eps bias
    torch.testing.assert_close(p_pool(x, 1.0), x.mean(dim=(2, 3)), rtol=1e-6, atol=0.0)


def test_p_pool_at_l_one_with_zeros_is_gap_up_to_eps():
    x = _post_relu(1)
    zero_fraction = (x == 0).float().mean(dim=(2, 3))
    # Zeros are clamped to eps, so GAP is shifted by exactly eps * (fraction of zeros).
    expected = x.mean(dim=(2, 3)) + 1e-6 * zero_fraction
    torch.testing.assert_close(p_pool(x, 1.0), expected, rtol=1e-6, atol=1e-7)


def test_module_at_l_one_equals_gap():
    pool = PPooling(num_channels=3)
    with torch.no_grad():
        pool.raw_l.fill_(-1e4)  # softplus underflows to exactly 0, so l == 1 exactly
    assert torch.equal(pool.l, torch.ones(3))
    x = _post_relu(2) + 0.1
    torch.testing.assert_close(pool(x), x.mean(dim=(2, 3)), rtol=1e-6, atol=0.0)


def test_large_l_approaches_gmp():
    x = _peaked(3)
    out = PPooling(init_l=100.0)(x)
    gmp = x.amax(dim=(2, 3))
    assert torch.all(out <= gmp * (1 + 1e-6))
    torch.testing.assert_close(out, gmp, rtol=1e-3, atol=0.0)


def test_large_l_large_values_and_zeros_are_finite():
    x = torch.zeros(2, 2, 3, 3)
    x[0, 0, 0, 0] = 50.0
    x[0, 1] = 50.0  # a constant channel: F must be 50
    x[1, 0, 2, 2] = 1e-3
    # x[1, 1] is all zeros: every entry clamps to eps, so F = eps
    pool = PPooling(init_l=100.0)
    out = pool(x.requires_grad_())
    assert torch.isfinite(out).all()
    expected = torch.tensor([[50.0, 50.0], [1e-3, 1e-6]])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=0.0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(pool.raw_l.grad).all()


def _eq7(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """Eq. 7 in float64 with explicit powers: dF/dl = F * (E_l[ln a] - E_{l-1}[ln a])."""
    a = x.flatten(2)
    s_l = (a**exponent).sum(-1)
    s_lm1 = (a ** (exponent - 1)).sum(-1)
    value = s_l / s_lm1
    first = (a**exponent * a.log()).sum(-1) / s_l
    second = (a ** (exponent - 1) * a.log()).sum(-1) / s_lm1
    return value * (first - second)


def test_gradient_wrt_l_is_eq7():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = x + 0.05
    exponent = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    out = p_pool(x, exponent)
    for n in range(2):
        for k in range(3):
            (grad,) = torch.autograd.grad(out[n, k], exponent, retain_graph=True)
            expected = _eq7(x[n : n + 1, k : k + 1], 3.7)[0, 0]
            torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0.0)


def test_module_gradient_is_eq7_through_the_parametrisation():
    x = torch.rand(1, 2, 3, 3, generator=torch.Generator().manual_seed(5)) + 0.05
    pool = PPooling(init_l=2.5, num_channels=2)
    pool(x).sum().backward()
    # dl/draw = sigmoid(raw) for l = 1 + softplus(raw).
    dl_draw = torch.sigmoid(pool.raw_l.detach())
    expected = _eq7(x.double(), 2.5).sum(0).float() * dl_draw
    torch.testing.assert_close(pool.raw_l.grad, expected, rtol=1e-4, atol=1e-6)


def test_init_l_is_reproduced_exactly_enough():
    assert PPooling(init_l=3.0).l.item() == pytest.approx(3.0, rel=1e-6)
    assert PPooling(init_l=40.0).l.item() == pytest.approx(40.0, rel=1e-6)
    bounded = PPooling(init_l=3.0, max_l=10.0)
    assert bounded.l.item() == pytest.approx(3.0, rel=1e-6)


def test_per_channel_shapes():
    pool = PPooling(init_l=2.0, num_channels=3)
    assert pool.raw_l.shape == (3,)
    assert pool.l.shape == (3,)
    assert PPooling().l.shape == ()
    assert pool(_post_relu(6)).shape == (2, 3)
    with torch.no_grad():
        pool.raw_l[1] = -1e4  # channel 1 becomes GAP, the others keep l = 2
    x = _post_relu(7) + 0.1
    out = pool(x)
    torch.testing.assert_close(out[:, 1], x[:, 1].mean(dim=(1, 2)), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(out[:, 0], p_pool(x[:, :1], 2.0)[:, 0], rtol=1e-6, atol=0.0)


def test_per_channel_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="built for 3 channels, got input with 4 channels"):
        PPooling(num_channels=3)(torch.ones(1, 4, 2, 2))


@pytest.mark.parametrize("max_l", [None, 5.0])
def test_l_stays_at_least_one_after_a_downward_step(max_l):
    pool = PPooling(init_l=1.5, max_l=max_l)
    optimiser = torch.optim.SGD(pool.parameters(), lr=1e6)
    pool.l.backward()  # d l / d raw > 0, so the step pushes l down hard
    optimiser.step()
    assert math.isfinite(pool.l.item())
    assert pool.l.item() >= 1.0
    assert pool.l.item() < 1.5


def test_max_l_bounds_l_from_above():
    pool = PPooling(init_l=3.0, max_l=5.0)
    optimiser = torch.optim.SGD(pool.parameters(), lr=1e6)
    (-pool.l).backward()
    optimiser.step()
    assert 3.0 < pool.l.item() <= 5.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_l": 1.0}, "init_l must be a finite number > 1"),
        ({"init_l": 3.0, "max_l": 2.0}, "max_l must be finite and > init_l = 3.0, got 2.0"),
        ({"num_channels": 0}, "num_channels must be a positive integer, got 0"),
        ({"eps": 0.0}, "eps must be > 0, got 0.0"),
    ],
)
def test_ppooling_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPooling(**kwargs)


def test_half_input_is_pooled_in_float32():
    x = _peaked(8)
    out = p_pool(x.half(), 60.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), p_pool(x, 60.0), rtol=1e-3, atol=0.0)


def test_build_pooling():
    assert isinstance(build_pooling("gap"), GlobalAvgPool)
    assert isinstance(build_pooling("gmp"), GlobalMaxPool)
    pool = build_pooling("ppool", init_l=4.0, num_channels=2)
    assert isinstance(pool, PPooling)
    assert pool.l.shape == (2,)
    gem = build_pooling("gem", init_p=4.0)
    assert isinstance(gem, GeM) and gem.p.item() == 4.0
    assert build_pooling("gem").p.item() == 3.0
    with pytest.raises(
        ValueError, match="unknown pooling 'avg'; valid names: gap, gem, gmp, ppool"
    ):
        build_pooling("avg")
    with pytest.raises(ValueError, match=r"pooling 'gap' takes no options, got \['init_l'\]"):
        build_pooling("gap", init_l=3.0)


# --- GeM: F = (mean_hw a^p)^(1/p), a = max(x, eps) ---------------------------------------


def _gem_reference(x: torch.Tensor, p: float, eps: float = 1e-6) -> tuple:
    """GeM, dF/dx and dF/dp written out in float64 with explicit powers.

    With a = max(x, eps), n = HW and F = (sum a^p / n)^(1/p):
    dF/dx_j = F^(1-p) a_j^(p-1) / n where x_j > eps (0 where clamped), and
    dF/dp = F / p * (sum a^p ln a / sum a^p - ln F).
    """
    x = x.double()
    a = torch.where(x > eps, x, torch.full_like(x, eps)).flatten(2)
    n = a.shape[-1]
    s_p = (a**p).sum(-1)
    value = (s_p / n) ** (1.0 / p)
    grad_x = value[..., None] ** (1.0 - p) * a ** (p - 1.0) / n
    grad_x = (grad_x * (x.flatten(2) > eps)).view_as(x)
    grad_p = value / p * ((a**p * a.log()).sum(-1) / s_p - value.log())
    return value, grad_x, grad_p


def test_gem_equals_gap_at_p_one():
    x = _post_relu(10, dtype=torch.float64) + 0.1  # above eps: the clamp changes nothing
    torch.testing.assert_close(gem_pool(x, 1.0), x.mean(dim=(2, 3)), rtol=1e-13, atol=0.0)
    pool = GeM(init_p=1.0)
    torch.testing.assert_close(pool(x.float()), x.float().mean(dim=(2, 3)), rtol=1e-6, atol=0.0)
    # At p = 1 every position weighs 1/HW, so the gradient with respect to x is GAP's.
    x = x.requires_grad_()
    gem_pool(x, 1.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1.0 / 20), rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("p", [0.5, 1.0, 3.0, 7.3])
def test_gem_values_and_gradients_match_the_formula_float64(p):
    x = _post_relu(11, dtype=torch.float64) * 3.0  # about half exact zeros, clamped to eps
    value, grad_x, grad_p = _gem_reference(x, p)
    for n in range(2):
        for k in range(3):
            xs = x.clone().requires_grad_()
            p_t = torch.tensor(p, dtype=torch.float64, requires_grad=True)
            out = gem_pool(xs, p_t)
            torch.testing.assert_close(out, value, rtol=1e-12, atol=0.0)
            gx, gp = torch.autograd.grad(out[n, k], (xs, p_t))
            expected_x = torch.zeros_like(x)
            expected_x[n, k] = grad_x[n, k]
            torch.testing.assert_close(gx, expected_x, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(gp, grad_p[n, k], rtol=1e-10, atol=1e-14)


def test_gem_gradcheck_float64():
    x = torch.rand(2, 2, 3, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x = (x + 0.05).requires_grad_()
    p = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gem_pool, (x, p))


def test_gem_module_gradient_wrt_p_and_x():
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(13)) + 0.05
    pool = GeM()
    xs = x.clone().requires_grad_()
    pool(xs).sum().backward()
    value, grad_x, grad_p = _gem_reference(x, 3.0)
    torch.testing.assert_close(pool.p.grad, grad_p.sum().float(), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(xs.grad, grad_x.float(), rtol=1e-4, atol=1e-7)


def test_gem_large_p_approaches_gmp():
    x = _peaked(14)
    gmp = x.amax(dim=(2, 3))
    for p in (50.0, 200.0):
        out = gem_pool(x, p)
        # One maximal position out of HW = 20 gives F >= max * (1/20)^(1/p); F <= max always.
        assert torch.all(out <= gmp * (1 + 1e-6))
        assert torch.all(out >= gmp * (1 / 20) ** (1 / p) * (1 - 1e-6))
    torch.testing.assert_close(gem_pool(x, 200.0), gmp, rtol=2e-2, atol=0.0)


def test_gem_large_p_large_activations_stay_finite():
    # 50^1000 overflows every float type; the log-space evaluation never forms it.
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0, 1, 1] = 50.0
    x[0, 1] = 50.0  # a constant channel: F = 50 for any p
    x = x.requires_grad_()
    out = gem_pool(x, torch.tensor(1000.0))
    assert torch.isfinite(out).all()
    expected = torch.tensor([[50.0 * (1 / 9) ** (1 / 1000), 50.0]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=0.0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gem_clamps_at_eps():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1] = -5.0  # negatives clamp to eps like zeros
    x[0, 2, 0, 0] = 4.0
    x = x.requires_grad_()
    out = gem_pool(x, 3.0, eps=1e-2)
    # Channels 0 and 1 are eps everywhere; channel 2 is ((4^3 + 3 eps^3) / 4)^(1/3).
    expected = torch.tensor([[1e-2, 1e-2, ((64 + 3e-6) / 4) ** (1 / 3)]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0.0)
    out.sum().backward()
    clamped = x.detach() < 1e-2
    assert torch.equal(x.grad[clamped], torch.zeros(int(clamped.sum())))
    assert x.grad[0, 2, 0, 0] > 0


def test_gem_parameter_and_weight_decay_declaration():
    from types import SimpleNamespace

    from esreid.engine.optim import build_optimizer

    pool = GeM()
    assert isinstance(pool.p, torch.nn.Parameter) and pool.p.shape == ()
    assert pool.p.item() == 3.0
    assert pool.no_weight_decay() == {"p"}
    assert GeM(decay_p=True).no_weight_decay() == set()
    cfg = SimpleNamespace(lr=1e-3, weight_decay=5e-4)
    decayed, not_decayed = build_optimizer(pool, cfg).param_groups
    assert decayed["params"] == [] and not_decayed["params"] == [pool.p]
    decayed, not_decayed = build_optimizer(GeM(decay_p=True), cfg).param_groups
    assert len(decayed["params"]) == 1 and not_decayed["params"] == []


def test_gem_half_input_and_autocast_compute_in_float32():
    x = _peaked(15)
    out = gem_pool(x.half(), 3.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), gem_pool(x, 3.0), rtol=1e-3, atol=0.0)
    pool = GeM()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pool(x)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, pool(x))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GeM(init_p=0.0), "init_p must be a finite number > 0, got 0.0"),
        (lambda: GeM(init_p=float("inf")), "init_p must be a finite number > 0, got inf"),
        (lambda: GeM(eps=0.0), "eps must be > 0, got 0.0"),
        (lambda: gem_pool(torch.ones(1, 1, 2, 2), 0.0), "p must be finite and non-zero, got 0.0"),
        (
            lambda: gem_pool(torch.ones(1, 2, 2, 2), torch.ones(2)),
            r"p must be a scalar, got shape \(2,\)",
        ),
        (lambda: GeM()(torch.ones(2, 3)), r"\[N, C, H, W\], got shape \(2, 3\)"),
    ],
)
def test_gem_rejects_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# --- mutation-testing additions (issue 13): exact values, defaults and messages ----------


def _eq6_reference(x: torch.Tensor, exponent, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 6 in float64 with explicit powers: F^k = sum a^l / sum a^(l-1), a = max(x, eps)."""
    a = x.double().clamp_min(eps).flatten(2)
    l_t = torch.as_tensor(exponent, dtype=torch.float64)
    if l_t.dim() == 1:
        l_t = l_t.view(1, -1, 1)
    return (a**l_t).sum(-1) / (a ** (l_t - 1.0)).sum(-1)


@pytest.mark.parametrize("exponent", [1.5, 3.7, 7.3])
def test_p_pool_matches_eq6_float64(exponent):
    # A Python-float exponent is used in full float64 precision with a float64 map (3.7 and
    # 7.3 are not float32 numbers), and exact zeros count as eps.
    x = _post_relu(20, shape=(2, 3, 4, 5), dtype=torch.float64) * 3.0
    out = p_pool(x, exponent)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    torch.testing.assert_close(out, _eq6_reference(x, exponent), rtol=1e-12, atol=0.0)


def test_p_pool_per_channel_exponent_matches_eq6_float64():
    x = _post_relu(21, shape=(2, 3, 4, 5), dtype=torch.float64) * 3.0
    exponent = torch.tensor([1.5, 3.7, 7.3], dtype=torch.float64)
    out = p_pool(x, exponent)
    torch.testing.assert_close(out, _eq6_reference(x, exponent), rtol=1e-12, atol=0.0)
    for k in range(3):
        torch.testing.assert_close(out[:, k], p_pool(x[:, k : k + 1], float(exponent[k]))[:, 0])


def test_p_pool_eps_is_the_clamp_floor():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 1, 0, 0] = 1.0
    # Channel 0: all eps, so F = eps. Channel 1 at l = 2: (1 + 3 eps^2) / (1 + 3 eps).
    eps = 0.25
    expected = torch.tensor([[eps, (1 + 3 * eps**2) / (1 + 3 * eps)]])
    torch.testing.assert_close(p_pool(x, 2.0, eps=eps), expected, rtol=1e-6, atol=0.0)
    # The default floor is 1e-6.
    torch.testing.assert_close(p_pool(torch.zeros(1, 1, 2, 2), 2.0), torch.tensor([[1e-6]]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: p_pool(torch.ones(1, 1, 2, 2), 2.0, eps=0.0), r"^eps must be > 0, got 0\.0$"),
        (lambda: p_pool(torch.ones(1, 1, 2, 2), 2.0, eps=-1.0), r"^eps must be > 0, got -1\.0$"),
        (
            lambda: p_pool(torch.ones(1, 3, 4, 5), torch.full((2,), 2.0)),
            r"^per-channel exponent has 2 entries but the input has 3 channels$",
        ),
        (
            lambda: p_pool(torch.ones(1, 3, 4, 5), torch.full((1, 3), 2.0)),
            r"^exponent must be a scalar or a \[C\] tensor, got shape \(1, 3\)$",
        ),
        (
            lambda: p_pool(torch.ones(2, 3), 2.0),
            r"^pooling input must be a feature map \[N, C, H, W\], got shape \(2, 3\)$",
        ),
    ],
    ids=["eps-zero", "eps-negative", "channel-count", "exponent-2d", "input-2d"],
)
def test_p_pool_rejects_bad_arguments_with_exact_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "pool",
    [GlobalAvgPool(), GlobalMaxPool(), PPooling(), GeM()],
    ids=["gap", "gmp", "ppool", "gem"],
)
def test_every_pooling_rejects_3d_and_5d_input_with_the_exact_message(pool):
    with pytest.raises(
        ValueError,
        match=r"^pooling input must be a feature map \[N, C, H, W\], got shape \(2, 3, 4\)$",
    ):
        pool(torch.ones(2, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"^pooling input must be a feature map \[N, C, H, W\], got shape \(1, 2, 3, 4, 5\)$",
    ):
        pool(torch.ones(1, 2, 3, 4, 5))


def test_ppooling_defaults_are_l_3_shared_and_eps_1e_6():
    pool = PPooling()
    assert pool.l.shape == ()
    assert pool.l.item() == pytest.approx(3.0, rel=1e-6)
    assert pool.max_l is None and pool.num_channels is None and pool.eps == 1e-6
    x = _post_relu(22) * 2.0
    torch.testing.assert_close(pool(x), _eq6_reference(x, 3.0).float(), rtol=1e-5, atol=0.0)
    # All-zero channel: every entry is clamped to the default eps.
    torch.testing.assert_close(pool(torch.zeros(1, 2, 2, 2)), torch.full((1, 2), 1e-6))


def test_ppooling_passes_its_eps_to_the_pooling():
    pool = PPooling(init_l=2.0, eps=0.25)
    x = torch.zeros(1, 2, 2, 2)
    x[0, 1, 0, 0] = 1.0
    expected = torch.tensor([[0.25, (1 + 3 * 0.25**2) / (1 + 3 * 0.25)]])
    torch.testing.assert_close(pool(x), expected, rtol=1e-5, atol=0.0)


def test_ppooling_accepts_a_single_channel():
    pool = PPooling(init_l=2.0, num_channels=1)
    assert pool.l.shape == (1,)
    x = _post_relu(23, shape=(2, 1, 3, 3)) + 0.1
    torch.testing.assert_close(pool(x), _eq6_reference(x, 2.0).float(), rtol=1e-5, atol=0.0)


def test_ppooling_bounded_l_values():
    # l = 1 + (max_l - 1) sigmoid(raw): init 3 of max 5 is raw = 0; raising raw by log 3
    # gives sigmoid = 3/4, so l = 4.
    pool = PPooling(init_l=3.0, max_l=5.0)
    assert pool.max_l == 5.0
    assert abs(pool.raw_l.item()) < 1e-6
    with torch.no_grad():
        pool.raw_l.add_(math.log(3.0))
    assert pool.l.item() == pytest.approx(4.0, rel=1e-6)
    assert PPooling(init_l=9.0, max_l=10.0).l.item() == pytest.approx(9.0, rel=1e-6)


def test_ppooling_exponent_is_kept_out_of_weight_decay():
    pool = PPooling(num_channels=2)
    assert pool.no_weight_decay() == {"raw_l"}
    assert {name for name, _ in pool.named_parameters()} == {"raw_l"}


def test_pooling_reprs():
    assert repr(PPooling()) == "PPooling(l=shared, eps=1e-06, max_l=None)"
    assert (
        repr(PPooling(num_channels=3, eps=0.5, max_l=5))
        == "PPooling(l=per-channel(3), eps=0.5, max_l=5.0)"
    )
    assert repr(GeM()) == "GeM(p=3.0000, eps=1e-06, decay_p=False)"
    assert repr(GeM(init_p=2.5, eps=0.5, decay_p=True)) == "GeM(p=2.5000, eps=0.5, decay_p=True)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"init_l": 1.0},
            r"^init_l must be a finite number > 1 \(l = 1 is GAP, the limit of the "
            r"parametrisation; use GlobalAvgPool\), got 1\.0$",
        ),
        ({"init_l": float("inf")}, r"^init_l must be a finite number > 1 .*, got inf$"),
        ({"init_l": float("nan")}, r"^init_l must be a finite number > 1 .*, got nan$"),
        ({"init_l": 3.0, "max_l": 3.0}, r"^max_l must be finite and > init_l = 3\.0, got 3\.0$"),
        (
            {"init_l": 3.0, "max_l": float("inf")},
            r"^max_l must be finite and > init_l = 3\.0, got inf$",
        ),
        ({"num_channels": 0}, r"^num_channels must be a positive integer, got 0$"),
        ({"eps": 0.0}, r"^eps must be > 0, got 0\.0$"),
        ({"eps": -1.0}, r"^eps must be > 0, got -1\.0$"),
    ],
    ids=[
        "init-l-one",
        "init-l-inf",
        "init-l-nan",
        "max-l-equal",
        "max-l-inf",
        "channels-zero",
        "eps-zero",
        "eps-negative",
    ],
)
def test_ppooling_rejects_bad_arguments_with_exact_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPooling(**kwargs)


def test_ppooling_channel_mismatch_message_is_exact():
    with pytest.raises(
        ValueError, match=r"^PPooling was built for 3 channels, got input with 4 channels$"
    ):
        PPooling(num_channels=3)(torch.ones(1, 4, 5, 6))


def test_gem_defaults_and_eps():
    # Default eps 1e-6: an all-zero channel pools to eps; a given eps reaches the pooling.
    torch.testing.assert_close(GeM()(torch.zeros(1, 2, 2, 2)), torch.full((1, 2), 1e-6))
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    expected = torch.tensor([[((1 + 3 * 0.25**3) / 4) ** (1 / 3)]])
    torch.testing.assert_close(GeM(eps=0.25)(x), expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(gem_pool(x, 3.0, eps=0.25), expected, rtol=1e-6, atol=0.0)
    assert GeM(eps=0.25).eps == 0.25


def test_gem_tensor_exponent_zero_is_not_checked():
    # Documented: a tensor p is not checked (no device synchronisation); p = 0 gives a
    # non-finite result instead of an error.
    out = gem_pool(torch.full((1, 1, 2, 2), 2.0), torch.tensor(0.0))
    assert not torch.isfinite(out).any()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: GeM(init_p=0.0), r"^init_p must be a finite number > 0, got 0\.0$"),
        (lambda: GeM(init_p=-1.0), r"^init_p must be a finite number > 0, got -1\.0$"),
        (lambda: GeM(init_p=float("inf")), r"^init_p must be a finite number > 0, got inf$"),
        (lambda: GeM(eps=0.0), r"^eps must be > 0, got 0\.0$"),
        (lambda: gem_pool(torch.ones(1, 1, 2, 2), 3.0, eps=0.0), r"^eps must be > 0, got 0\.0$"),
        (lambda: gem_pool(torch.ones(1, 1, 2, 2), 3.0, eps=-1.0), r"^eps must be > 0, got -1\.0$"),
        (
            lambda: gem_pool(torch.ones(1, 1, 2, 2), 0.0),
            r"^GeM exponent p must be finite and non-zero, got 0\.0$",
        ),
        (
            lambda: gem_pool(torch.ones(1, 1, 2, 2), float("inf")),
            r"^GeM exponent p must be finite and non-zero, got inf$",
        ),
        (
            lambda: gem_pool(torch.ones(1, 2, 2, 2), torch.ones(2)),
            r"^GeM exponent p must be a scalar, got shape \(2,\)$",
        ),
    ],
    ids=[
        "init-p-zero",
        "init-p-negative",
        "init-p-inf",
        "eps-zero",
        "pool-eps-zero",
        "pool-eps-negative",
        "p-zero",
        "p-inf",
        "p-vector",
    ],
)
def test_gem_rejects_bad_arguments_with_exact_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_build_pooling_messages_are_exact():
    with pytest.raises(
        ValueError, match=r"^unknown pooling 'avg'; valid names: gap, gem, gmp, ppool$"
    ):
        build_pooling("avg")
    with pytest.raises(
        ValueError, match=r"^pooling 'gmp' takes no options, got \['eps', 'init_l'\]$"
    ):
        build_pooling("gmp", init_l=3.0, eps=0.1)
    assert isinstance(build_pooling("ppool"), PPooling)
    assert build_pooling("gem", eps=0.5).eps == 0.5


@pytest.mark.cuda
def test_p_pool_moves_a_cpu_per_channel_exponent_to_the_input_device():
    x = _post_relu(24) + 0.1
    exponent = torch.tensor([1.5, 3.7, 7.3])  # on the CPU
    out = p_pool(x.cuda(), exponent)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), p_pool(x, exponent), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("p", [0.5, 3.7, 7.3])
def test_gem_python_float_exponent_is_used_in_float64(p):
    # 3.7 and 7.3 are not float32 numbers: a float64 map pools with the exponent as given.
    x = _post_relu(25, dtype=torch.float64) * 3.0
    value, _, _ = _gem_reference(x, p)
    out = gem_pool(x, p)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, value, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("pool_fn", [gem_pool, p_pool])
def test_half_input_is_pooled_in_float32_then_rounded_once(pool_fn):
    # Computing in float32 and rounding the result to float16 once gives exactly the float32
    # result rounded; computing in float16 would drift by several half-precision steps.
    x = (_post_relu(26, shape=(4, 8, 5, 5)) * 4.0).half()
    for exponent in (3.0, 11.0):
        out = pool_fn(x, exponent)
        assert out.dtype == torch.float16
        assert torch.equal(out, pool_fn(x.float(), exponent).half())
