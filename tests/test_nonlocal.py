"""The non-local block against its formula, written out with einsum in float64."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from esreid.models import NonLocal


def _map(seed: int, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _make_nontrivial(block: NonLocal, seed: int) -> None:
    """Give the output BatchNorm non-zero affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    bn = block.W[1]
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=gen))
        bn.bias.copy_(torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _reference(x: torch.Tensor, p: dict[str, torch.Tensor], training: bool,
               running: tuple[torch.Tensor, torch.Tensor], bn_eps: float) -> torch.Tensor:
    """z = BN(W y) + x, y_i = sum_j (theta_i . phi_j / P) g_j, from the parameters ``p``."""
    n, c, h, w = x.shape
    xs = x.reshape(n, c, h * w)  # [N, C, P]

    def conv1x1(name: str, inp: torch.Tensor) -> torch.Tensor:
        weight = p[f"{name}.weight"][:, :, 0, 0]
        return torch.einsum("kc,ncp->nkp", weight, inp) + p[f"{name}.bias"][None, :, None]

    theta, phi, g = conv1x1("theta", xs), conv1x1("phi", xs), conv1x1("g", xs)
    f = torch.einsum("nki,nkj->nij", theta, phi) / (h * w)  # [N, P, P], no softmax
    y = torch.einsum("nij,nkj->nki", f, g)  # [N, C', P]
    wy = conv1x1("W.0", y)  # [N, C, P]
    if training:
        mean = wy.mean(dim=(0, 2))
        var = wy.var(dim=(0, 2), unbiased=False)
    else:
        mean, var = running
    normed = (wy - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn_eps)
    bn = normed * p["W.1.weight"][None, :, None] + p["W.1.bias"][None, :, None]
    return (bn + xs).reshape(n, c, h, w)


@pytest.mark.parametrize("inner_channels", [None, 1])
def test_fresh_block_is_exactly_the_identity(inner_channels):
    block = NonLocal(16, inner_channels=inner_channels)
    x = _map(0, (3, 16, 5, 4), dtype=torch.float32) * 10
    for training in (True, False):
        block.train(training)
        out = block(x)
        assert torch.equal(out, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(block(x), x)


# (4, 5): 20 positions > C' = 8 (theta (phi g^T) order); (2, 3): 6 <= 8 ((theta^T phi) g^T).
@pytest.mark.parametrize("hw", [(4, 5), (2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_values_and_gradients_match_the_formula_float64(hw, training):
    block = NonLocal(16).double()
    assert block.inner_channels == 8
    _make_nontrivial(block, seed=1)
    block.train(training)
    bn = block.W[1]
    running = (bn.running_mean.clone(), bn.running_var.clone())
    x = _map(2, (3, 16, *hw)).requires_grad_()
    params = dict(block.named_parameters())

    out = block(x)
    expected = _reference(x, params, training, running, bn.eps)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, x)  # the non-local term is really there

    # Gradients of a random projection of the output, block vs reference.
    probe = _map(3, out.shape)
    inputs = (x, *params.values())
    got = torch.autograd.grad((out * probe).sum(), inputs)
    want = torch.autograd.grad((expected * probe).sum(), inputs)
    for name, a, b in zip(["x", *params], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("hw", [(3, 3), (1, 2)])
def test_gradcheck_wrt_input_and_parameters(hw):
    block = NonLocal(6, reduction=2).double()
    _make_nontrivial(block, seed=4)
    names = [name for name, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in block.named_parameters())
    x = _map(5, (2, 6, *hw)).requires_grad_()

    def run(inp, *ps):
        return functional_call(block, dict(zip(names, ps, strict=True)), (inp,))

    for training in (True, False):
        block.train(training)
        assert torch.autograd.gradcheck(run, (x, *params))


def test_shapes_for_the_published_width_and_reduction_two():
    published = NonLocal(64, inner_channels=1)
    assert published.inner_channels == 1
    assert published.theta.weight.shape == (1, 64, 1, 1)
    assert published.W[0].weight.shape == (64, 1, 1, 1)
    paper = NonLocal(64)
    assert paper.inner_channels == 32
    assert paper.g.weight.shape == (32, 64, 1, 1)
    assert NonLocal(64, reduction=4).inner_channels == 16
    assert NonLocal(5, reduction=2).inner_channels == 2
    x = _map(6, (2, 64, 6, 3), dtype=torch.float32)
    for block in (published, paper):
        _make_nontrivial(block, seed=7)
        out = block(x)
        assert out.shape == x.shape
        out.sum().backward()
        assert all(p.grad is not None for p in block.parameters())
    assert "in_channels=64, inner_channels=1" in repr(published)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "in_channels must be a positive integer, got 0"),
        ({"in_channels": 8, "reduction": 0}, "reduction must be a positive integer, got 0"),
        ({"in_channels": 8, "reduction": 16}, "reduction 16 exceeds in_channels 8"),
        ({"in_channels": 8, "inner_channels": 0}, "inner_channels must be a positive integer"),
        ({"in_channels": True}, "in_channels must be a positive integer, got True"),
        ({"in_channels": 8.0}, "in_channels must be a positive integer, got 8.0"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NonLocal(**kwargs)


def test_rejects_wrong_input():
    block = NonLocal(8)
    with pytest.raises(ValueError, match=r"expected a feature map \[N, 8, H, W\], got shape \(2, 4, 3, 3\)"):
        block(torch.ones(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"got shape \(2, 8\)"):
        block(torch.ones(2, 8))
