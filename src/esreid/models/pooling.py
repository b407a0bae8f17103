"""Global pooling layers: average (GAP), max (GMP), ES-Net's learnable P-pooling (Eq. 6) and
GeM, the generalized mean of Radenovic et al. (AGW's pooling).

All layers map a feature map ``[N, C, H, W]`` to a descriptor ``[N, C]``.

P-pooling computes, per channel ``k``, ``F^k = sum_a a^l / sum_a a^(l-1)``: a weighted mean of
the activations with weights ``a^(l-1)``, equal to GAP at ``l = 1`` and tending to GMP as
``l -> inf``. It is evaluated in log space,
``F = exp(logsumexp(l * log a) - logsumexp((l - 1) * log a))``, after clamping ``a`` to a small
``eps`` so that exact zeros (post-ReLU) have a finite logarithm; neither sum is ever formed in
linear space, so nothing overflows or underflows even for ``l = 100`` and activations of 50.

GeM computes, per channel, ``(mean_a a^p)^(1/p)``: GAP at ``p = 1``, tending to GMP as
``p -> inf``. It is evaluated in log space too, ``exp((logsumexp(p * log a) - log HW) / p)``,
after the same clamp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GeM", "GlobalAvgPool", "GlobalMaxPool", "PPooling", "build_pooling", "gem_pool", "p_pool"]


def _check_feature_map(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"pooling input must be a feature map [N, C, H, W], got shape {tuple(x.shape)}"
        )


class GlobalAvgPool(nn.Module):
    """Global average pooling: ``[N, C, H, W] -> [N, C]`` (mean over the spatial positions)."""

    def forward(self, x: Tensor) -> Tensor:
        """Return the spatial mean of ``x`` [N, C, H, W] as [N, C]."""
        _check_feature_map(x)
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """Global max pooling: ``[N, C, H, W] -> [N, C]`` (max over the spatial positions)."""

    def forward(self, x: Tensor) -> Tensor:
        """Return the spatial maximum of ``x`` [N, C, H, W] as [N, C]."""
        _check_feature_map(x)
        return x.amax(dim=(2, 3))


def p_pool(x: Tensor, exponent: Tensor | float, eps: float = 1e-6) -> Tensor:
    """P-pooling (Eq. 6) of a feature map for a given exponent.

    Args:
        x: feature map [N, C, H, W], expected non-negative (post-ReLU); values below ``eps``
            (including exact zeros and any negatives) are clamped to ``eps``.
        exponent: the paper's ``l``, a scalar or a tensor of shape [] or [C] (one per
            channel). It is applied as given; keeping ``l >= 1`` is the caller's job
            (``PPooling`` does it).
        eps: clamp floor, > 0.

    Returns:
        [N, C] descriptor ``sum a^l / sum a^(l-1)`` per channel, in ``x``'s dtype. Autograd
        through ``exponent`` gives exactly Eq. 7 (evaluated on the clamped activations).
    """
    _check_feature_map(x)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    # Half-precision logs lose too many digits for large l; compute in at least float32.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    log_a = x.to(compute_dtype).clamp_min(eps).log().flatten(2)  # [N, C, HW]
    l_t = torch.as_tensor(exponent, dtype=compute_dtype, device=x.device)
    if l_t.dim() == 1:
        if l_t.shape[0] != x.shape[1]:
            raise ValueError(
                f"per-channel exponent has {l_t.shape[0]} entries but the input has {x.shape[1]} channels"
            )
        l_t = l_t.view(1, -1, 1)
    elif l_t.dim() != 0:
        raise ValueError(f"exponent must be a scalar or a [C] tensor, got shape {tuple(l_t.shape)}")
    log_num = torch.logsumexp(l_t * log_a, dim=-1)
    log_den = torch.logsumexp((l_t - 1.0) * log_a, dim=-1)
    return torch.exp(log_num - log_den).to(x.dtype)


class PPooling(nn.Module):
    """Learnable P-pooling (ES-Net Eq. 6) mapping [N, C, H, W] to [N, C].

    Parametrisation (keeps ``l >= 1`` without clamping, so the gradient never vanishes):
    the stored parameter is ``raw_l`` and

    * ``l = 1 + softplus(raw_l)`` when ``max_l`` is None (unbounded above);
    * ``l = 1 + (max_l - 1) * sigmoid(raw_l)`` when ``max_l`` is given (``1 < l < max_l``).

    By the chain rule ``dF/d raw_l = (Eq. 7) * dl/d raw_l``; the gradient with respect to the
    tensor ``l`` itself is exactly Eq. 7. ``l = 1`` (plain GAP) is the limit ``raw_l -> -inf``,
    so ``init_l`` must be strictly greater than 1 (use ``GlobalAvgPool`` for plain averaging).

    Args:
        init_l: initial exponent, > 1 (and < ``max_l`` when given).
        num_channels: if given, learn one exponent per channel (``l`` has shape [C]);
            otherwise one scalar shared by all channels (``l`` has shape []).
        eps: activations are clamped to at least ``eps`` before taking logs.
        max_l: optional upper bound on ``l`` (> ``init_l``).
    """

    def __init__(
        self,
        init_l: float = 3.0,
        num_channels: int | None = None,
        eps: float = 1e-6,
        max_l: float | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(init_l) and init_l > 1.0):
            raise ValueError(
                f"init_l must be a finite number > 1 (l = 1 is GAP, the limit of the "
                f"parametrisation; use GlobalAvgPool), got {init_l}"
            )
        if max_l is not None and not (math.isfinite(max_l) and max_l > init_l):
            raise ValueError(f"max_l must be finite and > init_l = {init_l}, got {max_l}")
        if num_channels is not None and num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.max_l = None if max_l is None else float(max_l)
        self.num_channels = num_channels
        raw = self._inverse(float(init_l))
        shape = () if num_channels is None else (num_channels,)
        self.raw_l = nn.Parameter(torch.full(shape, raw, dtype=torch.float32))

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: the exponent, which decay would pull
        towards a value of its parametrisation rather than towards "no change"."""
        return {"raw_l"}

    def _inverse(self, exponent: float) -> float:
        """Return the ``raw_l`` value whose exponent ``l`` is ``exponent``."""
        y = exponent - 1.0
        if self.max_l is None:
            # Stable inverse softplus: log(expm1(y)) = y + log(1 - exp(-y)).
            return y + math.log(-math.expm1(-y))
        s = y / (self.max_l - 1.0)
        return math.log(s) - math.log1p(-s)

    @property
    def l(self) -> Tensor:  # noqa: E743 - the paper's name for the exponent
        """Current exponent: tensor of shape [] (shared) or [C] (per channel), always >= 1.

        It is attached to the autograd graph; call ``.detach()`` / ``.tolist()`` to log it.
        """
        if self.max_l is None:
            return 1.0 + F.softplus(self.raw_l)
        return 1.0 + (self.max_l - 1.0) * torch.sigmoid(self.raw_l)

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``x`` [N, C, H, W] into [N, C] with the current exponent."""
        _check_feature_map(x)
        if self.num_channels is not None and x.shape[1] != self.num_channels:
            raise ValueError(
                f"PPooling was built for {self.num_channels} channels, got input with "
                f"{x.shape[1]} channels"
            )
        return p_pool(x, self.l, self.eps)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``print(module)``."""
        per = "shared" if self.num_channels is None else f"per-channel({self.num_channels})"
        return f"l={per}, eps={self.eps}, max_l={self.max_l}"


def gem_pool(x: Tensor, p: Tensor | float, eps: float = 1e-6) -> Tensor:
    """Generalized-mean (GeM) pooling of a feature map for a given exponent ``p``.

    Args:
        x: feature map [N, C, H, W], expected non-negative (post-ReLU); values below ``eps``
            (including exact zeros and any negatives) are clamped to ``eps`` and get no
            gradient.
        p: the exponent, a Python number or a tensor of shape [] (learnable in ``GeM``).
            ``p = 1`` is GAP, large ``p`` approaches GMP. ``p = 0`` (the geometric-mean limit)
            is outside the formula: a number 0 raises, a tensor is not checked (that would
            synchronise with the device on every call) and gives non-finite values.
        eps: clamp floor, > 0.

    Returns:
        [N, C] descriptor ``(mean_{hw} clamp(x, eps)^p)^(1/p)`` in ``x``'s dtype.
    """
    _check_feature_map(x)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not isinstance(p, Tensor) and not (math.isfinite(p) and p != 0):
        raise ValueError(f"GeM exponent p must be finite and non-zero, got {p}")
    # As in p_pool: half-precision logs and powers lose too many digits, so compute in at
    # least float32; log space keeps a^p from overflowing when p or the activations grow.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    log_a = x.to(compute_dtype).clamp_min(eps).log().flatten(2)  # [N, C, HW]
    p_t = torch.as_tensor(p, dtype=compute_dtype, device=x.device)
    if p_t.dim() != 0:
        raise ValueError(f"GeM exponent p must be a scalar, got shape {tuple(p_t.shape)}")
    log_mean = torch.logsumexp(p_t * log_a, dim=-1) - math.log(log_a.shape[-1])
    return torch.exp(log_mean / p_t).to(x.dtype)


class GeM(nn.Module):
    """Generalized-mean pooling with a learnable scalar exponent ``p``: [N, C, H, W] -> [N, C].

    The parameter ``p`` is stored as is (initialised to ``init_p``), as in AGW's
    "GeneralizedMeanPoolingP"; see :func:`gem_pool` for the formula and the clamp.

    Weight decay: by default ``p`` is declared in :meth:`no_weight_decay`. Decay would pull
    ``p`` towards 0, the geometric mean, a point that means nothing for the method (the
    same reason P-pooling's exponent is not decayed); ``p`` chooses how the pooling weighs
    large activations, it is not a weight whose size regularisation should limit. The
    published AGW code does decay it (it sits in the default parameter group); ``decay_p=True``
    reproduces that by declaring nothing.

    Args:
        init_p: initial exponent, finite and > 0 (AGW: 3).
        eps: activations are clamped to at least ``eps`` before the power.
        decay_p: leave ``p`` to weight decay (the published AGW behaviour).
    """

    def __init__(self, init_p: float = 3.0, eps: float = 1e-6, decay_p: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(init_p) and init_p > 0):
            raise ValueError(f"init_p must be a finite number > 0, got {init_p}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.decay_p = bool(decay_p)
        self.p = nn.Parameter(torch.tensor(float(init_p), dtype=torch.float32))

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay: ``{"p"}`` unless ``decay_p``."""
        return set() if self.decay_p else {"p"}

    def forward(self, x: Tensor) -> Tensor:
        """Pool ``x`` [N, C, H, W] into [N, C] with the current exponent."""
        return gem_pool(x, self.p, self.eps)

    def extra_repr(self) -> str:
        """Summarise the configuration for ``print(module)``."""
        return f"p={float(self.p.detach()):.4f}, eps={self.eps}, decay_p={self.decay_p}"


_POOLINGS: dict[str, type[nn.Module]] = {
    "gap": GlobalAvgPool,
    "gmp": GlobalMaxPool,
    "ppool": PPooling,
    "gem": GeM,
}
_CONFIGURABLE = (PPooling, GeM)


def build_pooling(name: str, **kwargs: object) -> nn.Module:
    """Build a pooling layer by name: ``"gap"``, ``"gmp"``, ``"ppool"`` or ``"gem"``.

    ``kwargs`` go to the constructor (only ``PPooling`` and ``GeM`` take any, e.g.
    ``build_pooling("gem", init_p=3.0)``). Returns the module;
    an unknown name raises ``ValueError`` listing the valid names.
    """
    if name not in _POOLINGS:
        valid = ", ".join(sorted(_POOLINGS))
        raise ValueError(f"unknown pooling {name!r}; valid names: {valid}")
    cls = _POOLINGS[name]
    if kwargs and cls not in _CONFIGURABLE:
        raise ValueError(f"pooling {name!r} takes no options, got {sorted(kwargs)}")
    return cls(**kwargs)
