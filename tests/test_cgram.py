"""Tests for CG-RAM (pairs and training batches), Grad-CAM and saliency upsampling."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from esreid.saliency import (
    batch_cg_ram,
    cg_ram,
    cosine_score,
    easiest_positive,
    grad_cam_batch,
    upsample_saliency,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyEmbed(nn.Module):
    """images [N, 3, H, W] -> 1x1 conv (the CG-RAM layer) -> GAP -> linear -> [N, 5]."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = _gen(seed)
        self.layer = nn.Conv2d(3, 4, kernel_size=1).to(dtype)
        self.fc = nn.Linear(4, 5).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(x).mean(dim=(2, 3)))


def _cosine_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Closed form dcos(a, b)/da = b / (|a||b|) - cos * a / |a|^2, rows of [N, D]."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    cos = (a * b).sum(1, keepdim=True) / (na * nb)
    return b / (na * nb) - cos * a / na**2


def _hand_pair_maps(model: TinyEmbed, q: torch.Tensor, g: torch.Tensor):
    """CG-RAM of TinyEmbed by hand: dS/dA^k_ij = (W^T dS/df)_k / (h w), the same at every ij."""
    with torch.no_grad():
        a_q, a_g = model.layer(q), model.layer(g)
        f_q, f_g = model.fc(a_q.mean((2, 3))), model.fc(a_g.mean((2, 3)))
        hw = a_q.shape[2] * a_q.shape[3]
        w = model.fc.weight  # [D, C]
        phi_q = (_cosine_grad(f_q, f_g) @ w / hw)[:, :, None, None]
        phi_g = (_cosine_grad(f_g, f_q) @ w / hw)[:, :, None, None]
        return torch.relu((phi_q * a_q).sum(1)), torch.relu((phi_g * a_g).sum(1))


def _pair_images(n: int = 3, seed: int = 1):
    g = _gen(seed)
    shape = (n, 3, 4, 3)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )


def test_cosine_score_matches_definition():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(cosine_score(a, b), torch.tensor([24.0 / 25.0, -1.0, 0.0]))


def test_cg_ram_matches_closed_form():
    model = TinyEmbed()
    q, g = _pair_images()
    maps_q, maps_g = cg_ram(model, model.layer, q, g, return_gallery=True)
    hand_q, hand_g = _hand_pair_maps(model, q, g)
    assert maps_q.shape == (3, 4, 3)
    assert (hand_q > 0).any() and (hand_g > 0).any()  # the comparison is not vacuous
    torch.testing.assert_close(maps_q, hand_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maps_g, hand_g, rtol=1e-10, atol=1e-12)
    only_query = cg_ram(model, model.layer, q, g)
    torch.testing.assert_close(only_query, hand_q, rtol=1e-10, atol=1e-12)
    assert not only_query.requires_grad


def test_cg_ram_pairs_are_independent():
    model = TinyEmbed()
    q, g = _pair_images(n=3)
    full = cg_ram(model, model.layer, q, g)
    single = cg_ram(model, model.layer, q[1:2], g[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-12, atol=1e-14)


def test_cg_ram_leaves_parameter_grads_untouched():
    model = TinyEmbed()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    q, g = _pair_images()
    cg_ram(model, model.layer, q, g)
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    assert model.fc.bias.grad is None
    assert model.layer.weight.grad is None
    assert model.layer.bias.grad is None


def test_cg_ram_on_frozen_model_under_no_grad():
    model = TinyEmbed()
    model.requires_grad_(False)
    q, g = _pair_images()
    with torch.no_grad():
        maps = cg_ram(model, model.layer, q, g)
    torch.testing.assert_close(maps, _hand_pair_maps(model, q, g)[0], rtol=1e-10, atol=1e-12)


class BnEmbed(nn.Module):
    """conv -> BN -> ReLU(inplace) -> dropout -> GAP -> linear: exercises modes and in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.drop(self.relu(self.bn(self.conv(x))))
        return self.fc(a.mean(dim=(2, 3)))


def test_cg_ram_runs_in_eval_mode_and_restores_modes():
    model = BnEmbed()
    g = _gen(2)
    q, gal = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    model.train()
    model.drop.eval()  # a mixed state must come back exactly
    stats = model.bn.running_mean.clone()
    in_train = cg_ram(model, model.bn, q, gal)  # the BN output is then modified in place
    assert model.training and model.bn.training and not model.drop.training
    assert torch.equal(model.bn.running_mean, stats)
    model.eval()
    in_eval = cg_ram(model, model.bn, q, gal)
    assert not model.training and not model.bn.training
    torch.testing.assert_close(in_train, in_eval)
    assert in_eval.shape == (2, 5, 4)
    assert (in_eval > 0).any()


def test_cg_ram_removes_hook_and_restores_mode_on_error():
    class BadEmbed(TinyEmbed):
        def forward(self, x):
            return super().forward(x)[:, :, None]  # [N, D, 1] is not a descriptor

    model = BadEmbed()
    model.train()
    q, g = _pair_images()
    with pytest.raises(ValueError, match=r"embed must return descriptors \[N=6, D\]"):
        cg_ram(model, model.layer, q, g)
    assert len(model.layer._forward_hooks) == 0
    assert model.training


def test_cg_ram_removes_hook_after_success():
    model = TinyEmbed()
    q, g = _pair_images()
    cg_ram(model, model.layer, q, g)
    assert len(model.layer._forward_hooks) == 0


def test_cg_ram_input_errors():
    model = TinyEmbed()
    q, g = _pair_images()
    with pytest.raises(ValueError, match="layer must be a submodule of embed"):
        cg_ram(model, nn.Conv2d(3, 4, 1), q, g)
    with pytest.raises(ValueError, match=r"gallery_images must have the same shape"):
        cg_ram(model, model.layer, q, g[:2])
    with pytest.raises(ValueError, match=r"query_images must be \[N, 3, H, W\]"):
        cg_ram(model, model.layer, q[0], g[0])

    class Twice(TinyEmbed):
        def forward(self, x):
            self.layer(x)
            return super().forward(x)

    twice = Twice()
    with pytest.raises(ValueError, match="layer must run exactly once .* it ran 2 times"):
        cg_ram(twice, twice.layer, q, g)


def test_upsample_saliency_bilinear_and_normalisation():
    maps = torch.tensor([[[0.0, 4.0]], [[2.0, 2.0]]])  # [2, 1, 2]
    raw = upsample_saliency(maps, (1, 4), normalize=False)
    # align_corners=False samples the source at x = -0.25, 0.25, 0.75, 1.25 (edges clamp).
    torch.testing.assert_close(raw, torch.tensor([[[0.0, 1.0, 3.0, 4.0]], [[2.0] * 4]]))
    normed = upsample_saliency(maps, (1, 4))
    torch.testing.assert_close(normed, torch.tensor([[[0.0, 0.25, 0.75, 1.0]], [[0.0] * 4]]))
    with pytest.raises(ValueError, match=r"maps must be \[N, h, w\]"):
        upsample_saliency(maps[0], (2, 2))


def test_easiest_positive_hand_built():
    features = torch.tensor([[0.0], [1.0], [3.0], [10.0], [10.5], [7.0]])
    pids = torch.tensor([0, 0, 0, 1, 1, 2])
    assert easiest_positive(features, pids).tolist() == [1, 0, 1, 4, 3, -1]


def test_easiest_positive_ties_and_loners():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]])
    assert easiest_positive(features, torch.tensor([0, 0, 0, 1])).tolist() == [1, 0, 0, -1]
    assert easiest_positive(features, torch.tensor([0, 1, 2, 3])).tolist() == [-1] * 4


def test_easiest_positive_input_errors():
    with pytest.raises(ValueError, match=r"pids must be \[N=2\], got shape \(3,\)"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="pids must be an integer tensor"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(2))


def _linear_head(seed: int = 3, c: int = 4, d: int = 3) -> nn.Module:
    g = _gen(seed)
    fc = nn.Linear(c, d).double()
    with torch.no_grad():
        fc.weight.copy_(torch.randn(d, c, generator=g, dtype=torch.float64))
        fc.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


def test_batch_cg_ram_matches_closed_form_eq5():
    head = _linear_head()
    fc = head[2]
    a = torch.rand(5, 4, 3, 2, generator=_gen(4), dtype=torch.float64)
    pids = torch.tensor([0, 0, 0, 1, 1])
    maps = batch_cg_ram(head, a, pids)
    with torch.no_grad():
        f = head(a)
        partner = easiest_positive(f, pids)
        # dS_batch/df_j: every pair (i, p(i)) adds w_i * dS_i/df_i to i and w_i * dS_i/df_p to p.
        dsdf = torch.zeros_like(f)
        for i, p in enumerate(partner.tolist()):
            weight = torch.exp(cosine_score(f[i : i + 1], f[p : p + 1]))
            dsdf[i] += weight[0] * _cosine_grad(f[i : i + 1], f[p : p + 1])[0]
            dsdf[p] += weight[0] * _cosine_grad(f[p : p + 1], f[i : i + 1])[0]
        phi = (dsdf @ fc.weight / 6.0)[:, :, None, None]
        expected = torch.relu((phi * a).sum(1))
    assert (expected > 0).any()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_batch_cg_ram_gradient_reaches_the_positive():
    """Sample 1 is the easiest positive of samples 0 and 2; sample 2 is nobody's positive."""
    fc = nn.Linear(3, 3).double()
    with torch.no_grad():
        fc.weight.copy_(torch.eye(3))
        fc.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    means = torch.tensor([[1.0, 0.1, 0.5], [1.0, 0.2, 0.45], [1.0, 0.6, 0.1]], dtype=torch.float64)
    # Zero-mean spatial pattern: descriptors (and so the pairs) depend only on `means`.
    pattern = torch.tensor([[0.3, -0.1], [-0.3, 0.1]], dtype=torch.float64)
    a = means[:, :, None, None] + pattern * torch.tensor([1.0, -2.0, 0.5]).double()[:, None, None]
    pids = torch.tensor([7, 7, 7])
    partner = easiest_positive(head(a), pids)
    assert partner.tolist() == [1, 0, 1]
    maps = batch_cg_ram(head, a, pids)

    # The same Eq. 5 with the positives detached: only the anchor side gets gradient.
    leaf = a.clone().requires_grad_()
    f = head(leaf)
    s = cosine_score(f, f[partner].detach())
    (anchor_only,) = torch.autograd.grad((torch.exp(s).detach() * s).sum(), leaf)
    anchor_maps = torch.relu((anchor_only * a).sum(1))
    assert (maps[1] > 0).any()
    assert not torch.allclose(maps[1], anchor_maps[1])  # pairs (0, 1) and (2, 1) reach it
    torch.testing.assert_close(maps[2], anchor_maps[2], rtol=1e-12, atol=1e-15)


def test_batch_cg_ram_matches_direct_autograd_on_nonlinear_head():
    torch.manual_seed(0)
    head = (
        nn.Sequential(
            nn.Conv2d(4, 6, 1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.BatchNorm1d(6),
            nn.Linear(6, 3),
        )
        .double()
        .eval()
    )
    a = torch.rand(6, 4, 3, 3, generator=_gen(7), dtype=torch.float64)
    pids = torch.tensor([0, 1, 0, 1, 2, 0])
    maps = batch_cg_ram(head, a, pids)

    leaf = a.clone().requires_grad_()
    f = head(leaf)
    partner = easiest_positive(f.detach(), pids)
    anchors = torch.tensor([0, 1, 2, 3, 5])
    s = torch.nn.functional.cosine_similarity(f[anchors], f[partner[anchors]], dim=1)
    (grad,) = torch.autograd.grad((torch.exp(s.detach()) * s).sum(), leaf)
    torch.testing.assert_close(maps, torch.relu((grad * a).sum(1)), rtol=1e-10, atol=1e-12)
    assert torch.equal(maps[4], torch.zeros(3, 3))  # pid 2 is alone: no pair, zero map


def test_batch_cg_ram_leaves_head_grads_and_input_untouched():
    head = _linear_head()
    fc = head[2]
    fc.weight.grad = torch.ones_like(fc.weight)
    a = torch.rand(4, 4, 2, 2, generator=_gen(8), dtype=torch.float64)
    before = a.clone()
    with torch.no_grad():
        maps = batch_cg_ram(head, a, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(fc.weight.grad, torch.ones_like(fc.weight))
    assert fc.bias.grad is None
    assert torch.equal(a, before)
    assert not a.requires_grad and not maps.requires_grad


def test_batch_cg_ram_without_any_pair_is_zero():
    a = torch.rand(3, 4, 2, 2, generator=_gen(9), dtype=torch.float64)
    maps = batch_cg_ram(_linear_head(), a, torch.tensor([0, 1, 2]))
    assert torch.equal(maps, torch.zeros(3, 2, 2, dtype=torch.float64))


def test_batch_cg_ram_input_errors():
    a = torch.rand(3, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pids must be \[N=3\]"):
        batch_cg_ram(_linear_head(), a, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"feature_map must be \[N, C, h, w\]"):
        batch_cg_ram(_linear_head(), a[0], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"head must return descriptors \[N=3, D\]"):
        batch_cg_ram(lambda x: x.mean((2, 3))[:2], a, torch.tensor([0, 0, 1]))


def test_grad_cam_batch_matches_closed_form_on_linear_head():
    head = _linear_head(seed=10, c=4, d=5)
    fc = head[2]
    a = torch.rand(3, 4, 3, 2, generator=_gen(11), dtype=torch.float64)
    targets = torch.tensor([4, 0, 2])
    maps = grad_cam_batch(head, a, targets)
    with torch.no_grad():
        prob = torch.softmax(head(a), dim=1)
        onehot = torch.nn.functional.one_hot(targets, 5).double()
        # d log p_t / dA^k_ij = ((onehot - p) W)_k / (h w) at every ij, so alpha is that value.
        alpha = ((onehot - prob) @ fc.weight / 6.0)[:, :, None, None]
        expected = torch.relu((alpha * a).sum(1))
    assert (expected > 0).any()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    assert fc.weight.grad is None


def test_grad_cam_batch_target_errors():
    head = _linear_head(c=4, d=5)
    a = torch.rand(2, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 5\), got values 0..5"):
        grad_cam_batch(head, a, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="targets must be an integer tensor"):
        grad_cam_batch(head, a, torch.tensor([0.0, 1.0]))


def test_batch_cg_ram_and_grad_cam_compute_in_float32_under_autocast():
    """Under bf16 autocast the saliency is computed exactly as without it: the head (a
    linear layer autocast would run in bf16) is evaluated in float32 on a float32 copy of a
    (here bf16) feature map."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    a = torch.rand(6, 8, 4, 2).to(torch.bfloat16)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    plain = batch_cg_ram(head, a, pids)
    plain_cam = grad_cam_batch(head, a, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = batch_cg_ram(head, a, pids)
        mixed_cam = grad_cam_batch(head, a, pids)
    assert plain.dtype == mixed.dtype == mixed_cam.dtype == torch.float32
    assert (plain > 0).any() and (plain_cam > 0).any()
    assert torch.equal(mixed, plain) and torch.equal(mixed_cam, plain_cam)


# --- exact error messages, dtypes and edge cases (mutation testing, issue 13) ---------------


class _LayerThen(nn.Module):
    """images -> `layer` -> `rest` -> [N, D]; `layer` is any module under test."""

    def __init__(self, layer: nn.Module, rest) -> None:
        super().__init__()
        self.layer = layer
        self.rest = rest

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.layer(x))


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_cg_ram_error_messages_are_exact():
    model = TinyEmbed()
    q, g = _pair_images()
    with pytest.raises(
        ValueError, match=r"^query_images must be \[N, 3, H, W\], got shape \(3, 4, 3\)$"
    ):
        cg_ram(model, model.layer, q[0], g[0])
    with pytest.raises(
        ValueError,
        match=r"^gallery_images must have the same shape as query_images \(3, 3, 4, 3\) "
        r"\(N pairs\), got \(2, 3, 4, 3\)$",
    ):
        cg_ram(model, model.layer, q, g[:2])
    with pytest.raises(ValueError, match=r"^layer must be a submodule of embed$"):
        cg_ram(model, nn.Conv2d(3, 4, 1), q, g)

    class Twice(TinyEmbed):
        def forward(self, x):
            self.layer(x)
            return super().forward(x)

    twice = Twice()
    with pytest.raises(
        ValueError, match=r"^layer must run exactly once in embed's forward, it ran 2 times$"
    ):
        cg_ram(twice, twice.layer, q, g)

    class Missing(TinyEmbed):
        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)).repeat(1, 2)[:, :4])

    missing = Missing()
    with pytest.raises(
        ValueError, match=r"^layer must run exactly once in embed's forward, it ran 0 times$"
    ):
        cg_ram(missing, missing.layer, q, g)

    class Short(TinyEmbed):
        def forward(self, x):
            return super().forward(x)[1:]  # 2-D, but one row short

    short = Short()
    with pytest.raises(
        ValueError, match=r"^embed must return descriptors \[N=6, D\], got shape \(5, 5\)$"
    ):
        cg_ram(short, short.layer, q, g)

    class Flat(TinyEmbed):
        def forward(self, x):
            return super().forward(x)[:, :, None]

    flat = Flat()
    with pytest.raises(
        ValueError, match=r"^embed must return descriptors \[N=6, D\], got shape \(6, 5, 1\)$"
    ):
        cg_ram(flat, flat.layer, q, g)


def test_cg_ram_layer_output_errors():
    q, g = _pair_images()
    fc = nn.Linear(3, 2).double()
    pair = _LayerThen(_Lambda(lambda x: (x, x)), lambda t: fc(t[0].mean((2, 3))))
    with pytest.raises(
        TypeError, match=r"^layer must output a single tensor for CG-RAM, got tuple$"
    ):
        cg_ram(pair, pair.layer, q, g)
    three_d = _LayerThen(nn.Flatten(2), lambda t: fc(t.mean(2)))
    with pytest.raises(
        ValueError, match=r"^layer output must be \[N, C, h, w\], got shape \(6, 3, 12\)$"
    ):
        cg_ram(three_d, three_d.layer, q, g)
    integer = _LayerThen(_Lambda(lambda x: x.long()), lambda t: fc(t.double().mean((2, 3))))
    with pytest.raises(
        ValueError, match=r"^layer output must be a floating-point tensor, got torch.int64$"
    ):
        cg_ram(integer, integer.layer, q, g)
    # The layer runs once, but the descriptors do not depend on its output.
    const = torch.randn(6, 2, generator=_gen(16), dtype=torch.float64, requires_grad=True)
    ignored = _LayerThen(nn.Identity(), lambda t: const * 1.0)
    with pytest.raises(
        ValueError,
        match=r"^the cosine score does not depend on the feature map, no saliency exists$",
    ):
        cg_ram(ignored, ignored.layer, q, g)


def test_cg_ram_returns_query_maps_by_default_and_keeps_float64():
    model = TinyEmbed()
    q, g = _pair_images(n=2)
    maps = cg_ram(model, model.layer, q, g)
    assert isinstance(maps, torch.Tensor) and maps.shape == (2, 4, 3)
    assert maps.dtype == torch.float64
    # A float32 model and images give float32 maps (A's dtype).
    model32 = TinyEmbed(dtype=torch.float32)
    maps32 = cg_ram(model32, model32.layer, q.float(), g.float())
    assert maps32.dtype == torch.float32
    torch.testing.assert_close(maps32, _hand_pair_maps(model32, q.float(), g.float())[0])


def test_batch_cg_ram_error_messages_are_exact():
    a = torch.rand(3, 4, 2, 2, dtype=torch.float64)
    calls = []

    def head(x):
        calls.append(1)
        return x.mean((2, 3))

    with pytest.raises(ValueError, match=r"^pids must be \[N=3\], got shape \(2,\)$"):
        batch_cg_ram(head, a, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^pids must be \[N=3\], got shape \(3, 1\)$"):
        batch_cg_ram(head, a, torch.tensor([[0], [0], [1]]))
    assert calls == []  # the labels are checked before the head runs
    with pytest.raises(
        ValueError, match=r"^feature_map must be \[N, C, h, w\], got shape \(4, 2, 2\)$"
    ):
        batch_cg_ram(head, a[0], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"^feature_map must be a floating-point tensor, got torch.int64$"
    ):
        batch_cg_ram(head, a.long(), torch.tensor([0, 0, 1]))
    with pytest.raises(
        ValueError, match=r"^head must return descriptors \[N=3, D\], got shape \(2, 4\)$"
    ):
        batch_cg_ram(lambda x: x.mean((2, 3))[:2], a, torch.tensor([0, 0, 1]))
    with pytest.raises(
        ValueError, match=r"^head must return descriptors \[N=3, D\], got shape \(3, 4, 1\)$"
    ):
        batch_cg_ram(lambda x: x.mean((2, 3))[:, :, None], a, torch.tensor([0, 0, 1]))
    const = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    const.requires_grad_(True)
    with pytest.raises(
        ValueError,
        match=r"^the batch score does not depend on the feature map, no saliency exists$",
    ):
        batch_cg_ram(lambda x: const * 1.0, a, torch.tensor([0, 0, 1]))


def test_batch_cg_ram_no_pair_maps_keep_dtype_and_shape():
    a = torch.rand(3, 4, 5, 2, generator=_gen(9), dtype=torch.float64)
    maps = batch_cg_ram(_linear_head(), a, torch.tensor([0, 1, 2]))
    assert maps.dtype == torch.float64 and maps.shape == (3, 5, 2)
    assert torch.equal(maps, torch.zeros(3, 5, 2, dtype=torch.float64))
    assert not maps.requires_grad


def test_batch_cg_ram_pairs_with_sample_zero_as_positive():
    """Sample 0 is the easiest positive of sample 1 (index 0 is a valid partner)."""
    head = _linear_head()
    a = torch.rand(2, 4, 3, 2, generator=_gen(12), dtype=torch.float64)
    pids = torch.tensor([5, 5])
    maps = batch_cg_ram(head, a, pids)
    leaf = a.clone().requires_grad_()
    f = head(leaf)
    s = cosine_score(f, f[[1, 0]])  # pairs (0, 1) and (1, 0)
    (grad,) = torch.autograd.grad((torch.exp(s.detach()) * s).sum(), leaf)
    expected = torch.relu((grad * a).sum(1))
    assert (expected[0] > 0).any() and (expected[1] > 0).any()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_grad_cam_batch_matches_direct_autograd_on_nonlinear_head():
    """A head whose gradient varies over space: alpha is the spatial mean over h and w."""
    torch.manual_seed(1)
    head = nn.Sequential(
        nn.Conv2d(4, 5, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(5, 6)
    ).double()
    a = torch.rand(3, 4, 3, 5, generator=_gen(13), dtype=torch.float64)
    targets = torch.tensor([5, 0, 2])
    maps = grad_cam_batch(head, a, targets)
    leaf = a.clone().requires_grad_()
    log_p = torch.log_softmax(head(leaf), dim=1)[torch.arange(3), targets].sum()
    (grad,) = torch.autograd.grad(log_p, leaf)
    assert not torch.allclose(grad, grad.mean(3, keepdim=True))  # not constant along w
    assert not torch.allclose(grad, grad.mean(2, keepdim=True))  # nor along h
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    expected = torch.relu((alpha * a).sum(1))
    assert (expected > 0).any()
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    assert maps.dtype == torch.float64 and not maps.requires_grad


def test_grad_cam_batch_error_messages_are_exact():
    head = _linear_head(c=4, d=5)
    a = torch.rand(2, 4, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^targets must be \[N=2\], got shape \(3,\)$"):
        grad_cam_batch(head, a, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^targets must be \[N=2\], got shape \(2, 1\)$"):
        grad_cam_batch(head, a, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"^targets must be an integer tensor, got torch.float32$"):
        grad_cam_batch(head, a, torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"^feature_map must be \[N, C, h, w\], got shape \(4, 2, 2\)$"
    ):
        grad_cam_batch(head, a[0], torch.tensor([0, 1, 2, 3]))
    with pytest.raises(
        ValueError, match=r"^feature_map must be a floating-point tensor, got torch.int64$"
    ):
        grad_cam_batch(head, a.long(), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"^logits_fn must return logits \[N=2, K\], got shape \(1, 5\)$"
    ):
        grad_cam_batch(lambda x: head(x)[:1], a, torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"^logits_fn must return logits \[N=2, K\], got shape \(2, 5, 1\)$"
    ):
        grad_cam_batch(lambda x: head(x)[:, :, None], a, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^targets must lie in \[0, 5\), got values -1..3$"):
        grad_cam_batch(head, a, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match=r"^targets must lie in \[0, 5\), got values 0..5$"):
        grad_cam_batch(head, a, torch.tensor([0, 5]))
    const = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(
        ValueError,
        match=r"^the class log-probability does not depend on the feature map, "
        r"no saliency exists$",
    ):
        grad_cam_batch(lambda x: const * 1.0, a, torch.tensor([0, 1]))


def test_grad_cam_batch_accepts_the_first_and_last_class():
    head = _linear_head(seed=14, c=4, d=3)
    a = torch.rand(2, 4, 2, 2, generator=_gen(15), dtype=torch.float64)
    with torch.no_grad():
        prob = torch.softmax(head(a), dim=1)
        onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
        alpha = ((onehot - prob) @ head[2].weight / 4.0)[:, :, None, None]
    expected = torch.relu((alpha * a).sum(1))
    # Any integer dtype (gather itself takes only int32 and int64 indices).
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        maps = grad_cam_batch(head, a, torch.tensor([0, 2], dtype=dtype))
        torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def test_easiest_positive_error_messages_are_exact():
    with pytest.raises(ValueError, match=r"^features must be \[N, D\], got shape \(2, 3, 1\)$"):
        easiest_positive(torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^pids must be \[N=2\], got shape \(3,\)$"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^pids must be \[N=2\], got shape \(2, 1\)$"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^pids must be an integer tensor, got torch.float32$"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"^pids must be an integer tensor, got torch.complex64$"):
        easiest_positive(torch.zeros(2, 3), torch.zeros(2, dtype=torch.complex64))


def test_easiest_positive_is_exact_for_large_near_identical_batches():
    """More than 25 rows far from the origin: an mm-based distance (|x|^2 + |y|^2 - 2xy in
    float32) would lose the 0.01-scale gaps; the direct difference keeps them."""
    n = 30
    i = torch.arange(n, dtype=torch.float32)
    features = torch.stack([1000 + 0.01 * i * i, torch.full((n,), -1000.0)], dim=1)
    got = easiest_positive(features, torch.zeros(n, dtype=torch.long))
    # Gaps grow with i, so the nearest other row of i > 0 is i - 1 (and of 0 it is 1).
    assert got.tolist() == [1] + list(range(n - 1))
    assert got.dtype == torch.int64


def test_upsample_saliency_error_messages_are_exact():
    maps = torch.rand(2, 3, 3)
    with pytest.raises(ValueError, match=r"^maps must be \[N, h, w\], got shape \(3, 3\)$"):
        upsample_saliency(maps[0], (2, 2))
    for size in [(0, 4), (4, 0), (2, 2, 2), (4,)]:
        with pytest.raises(
            ValueError,
            match=rf"^size must be \(H, W\) with positive entries, got {re.escape(str(size))}$",
        ):
            upsample_saliency(maps, size)
    assert upsample_saliency(maps, (1, 1)).shape == (2, 1, 1)  # the smallest valid size


def test_upsample_saliency_dtypes_and_default_normalisation():
    maps = torch.tensor([[[0.0, 0.5]], [[0.25, 0.25]]], dtype=torch.float64)  # span 0.5 < 1
    normed = upsample_saliency(maps, (1, 4))  # normalize is the default
    assert normed.dtype == torch.float64
    expected = torch.tensor([[[0.0, 0.25, 0.75, 1.0]], [[0.0] * 4]], dtype=torch.float64)
    torch.testing.assert_close(normed, expected)
    raw = upsample_saliency(maps, (1, 4), normalize=False)
    assert raw.dtype == torch.float64
    torch.testing.assert_close(raw, expected * 0.5 + torch.tensor([[[0.0]], [[0.25]]]).double())
    # Integer maps become float32; a shifted map is scaled from its own minimum.
    ints = torch.tensor([[[3, 7]]])
    up = upsample_saliency(ints, (2, 4))
    assert up.dtype == torch.float32
    torch.testing.assert_close(up, torch.tensor([[[0.0, 0.25, 0.75, 1.0]] * 2]))
    raw_ints = upsample_saliency(ints, (1, 2), normalize=False)
    assert raw_ints.dtype == torch.float32 and raw_ints.tolist() == [[[3.0, 7.0]]]


@pytest.mark.cuda
def test_batch_saliency_on_cuda_with_labels_on_the_cpu():
    """Feature maps and heads on the GPU, labels on the CPU: the labels follow the
    descriptors, and every map (also the all-zero one) is on the feature map's device."""
    a_cpu = torch.rand(5, 4, 3, 2, generator=_gen(40), dtype=torch.float64)
    a = a_cpu.cuda()
    pids = torch.tensor([0, 0, 0, 1, 1])
    maps = batch_cg_ram(_linear_head().cuda(), a, pids)
    assert maps.device == a.device
    torch.testing.assert_close(maps.cpu(), batch_cg_ram(_linear_head(), a_cpu, pids))
    zero = batch_cg_ram(_linear_head().cuda(), a, torch.tensor([0, 1, 2, 3, 4]))
    assert zero.device == a.device and zero.dtype == torch.float64 and not zero.any()
    features = torch.rand(5, 3, generator=_gen(41))
    partner = easiest_positive(features.cuda(), pids)
    assert partner.device == a.device
    assert partner.tolist() == easiest_positive(features, pids).tolist()
    targets = torch.tensor([4, 0, 2, 1, 3])
    cam = grad_cam_batch(_linear_head(seed=10, d=5).cuda(), a, targets)
    assert cam.device == a.device
    torch.testing.assert_close(
        cam.cpu(), grad_cam_batch(_linear_head(seed=10, d=5), a_cpu, targets)
    )


def test_batch_cg_ram_and_grad_cam_switch_autocast_off_in_float32():
    """Float32 maps equal a float32 autograd reference to float32 precision: the head is
    not run under (CPU, bf16) autocast, which would change them at the 1e-3 level."""
    torch.manual_seed(2)
    head = nn.Sequential(nn.Conv2d(6, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    a = torch.rand(4, 6, 3, 3, generator=_gen(17))
    pids = torch.tensor([0, 0, 1, 1])
    maps = batch_cg_ram(head, a, pids)
    cam = grad_cam_batch(head, a, pids)
    leaf = a.clone().requires_grad_()
    f = head(leaf)
    s = cosine_score(f, f[[1, 0, 3, 2]])
    (grad,) = torch.autograd.grad((torch.exp(s.detach()) * s).sum(), leaf)
    expected = torch.relu((grad * a).sum(1))
    log_p = torch.log_softmax(head(leaf), dim=1)[torch.arange(4), pids].sum()
    (cam_grad,) = torch.autograd.grad(log_p, leaf)
    expected_cam = torch.relu((cam_grad.mean((2, 3), keepdim=True) * a).sum(1))
    assert maps.dtype == cam.dtype == torch.float32
    assert (expected > 0).any() and (expected_cam > 0).any()
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cam, expected_cam, rtol=1e-5, atol=1e-6)
