"""The non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018) as AGW uses it.

For a feature map ``x`` [N, C, H, W] with ``P = HW`` positions, three 1x1 convolutions
``theta``, ``phi`` and ``g`` (C -> C') give, at every position ``i``, vectors ``theta_i``,
``phi_i`` and ``g_i``. The pairwise function is the dot product (Wang et al.'s "dot product"
instantiation: no softmax) normalised by the number of positions,
``f_ij = theta_i . phi_j / P``, and ``y_i = sum_j f_ij g_j``. A 1x1 convolution (C' -> C)
followed by a BatchNorm maps ``y`` back, and the block adds its input:
``z = BN(W y) + x``. The BatchNorm's weight and bias start at 0, so a freshly built block
is the identity and can be inserted into a pretrained network without changing it.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["NonLocal"]


def _positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive int (not a bool), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"NonLocal: {name} must be a positive integer, got {value!r}")
    return value


class NonLocal(nn.Module):
    """Non-local block ``z = BN(W(f g(x))) + x`` with ``f = theta(x)^T phi(x) / HW``.

    Args:
        in_channels: channels C of the input and the output.
        reduction: the inner width is ``C' = in_channels // reduction`` (at least 1 is
            required); ignored when ``inner_channels`` is given.
        inner_channels: C' directly. The published AGW code ends up with C' = 1 whatever
            the input width (an integer-division slip computes the reduction ratio divided
            by itself); pass 1 to reproduce it.

    ``theta``, ``phi``, ``g`` and the output convolution ``W[0]`` are 1x1 convolutions with
    bias and PyTorch's default initialisation; ``W[1]`` is the BatchNorm2d(C) whose weight
    and bias are initialised to 0, which makes the block start as the identity.
    """

    def __init__(
        self, in_channels: int, reduction: int = 2, inner_channels: int | None = None
    ) -> None:
        super().__init__()
        in_channels = _positive_int("in_channels", in_channels)
        if inner_channels is None:
            reduction = _positive_int("reduction", reduction)
            if reduction > in_channels:
                raise ValueError(
                    f"NonLocal: reduction {reduction} exceeds in_channels {in_channels}, "
                    "which would leave an inner width of 0; pass inner_channels to set it"
                )
            inner_channels = in_channels // reduction
        else:
            inner_channels = _positive_int("inner_channels", inner_channels)
        self.in_channels = in_channels
        self.inner_channels = inner_channels
        self.theta = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.g = nn.Conv2d(in_channels, inner_channels, kernel_size=1)
        self.W = nn.Sequential(
            nn.Conv2d(inner_channels, in_channels, kernel_size=1), nn.BatchNorm2d(in_channels)
        )
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x + BN(W y)`` for ``x`` [N, C, H, W]; the output has ``x``'s shape."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocal: expected a feature map [N, {self.in_channels}, H, W], "
                f"got shape {tuple(x.shape)}"
            )
        n, _, h, w = x.shape
        positions = h * w
        # Scaling theta (C' x P values) is cheaper than scaling f (P x P), and under fp16
        # autocast it keeps the products below at the size of a mean instead of a sum.
        theta = self.theta(x).flatten(2) / positions  # [N, C', P]
        phi = self.phi(x).flatten(2)  # [N, C', P]
        g = self.g(x).flatten(2)  # [N, C', P]
        # Without a softmax the block is linear in f, so y = theta^T (phi g^T) as well as
        # (theta^T phi) g^T: the first costs P C'^2, the second P^2 C'; take the cheaper.
        if positions <= self.inner_channels:
            f = theta.transpose(1, 2) @ phi  # [N, P, P]: f[i, j] = theta_i . phi_j / P
            y = (f @ g.transpose(1, 2)).transpose(1, 2)  # [N, C', P]
        else:
            y = (phi @ g.transpose(1, 2)).transpose(1, 2) @ theta  # [N, C', P]
        y = y.reshape(n, self.inner_channels, h, w)
        return self.W(y) + x

    def extra_repr(self) -> str:
        """Show the widths when the module is printed."""
        return f"in_channels={self.in_channels}, inner_channels={self.inner_channels}"
