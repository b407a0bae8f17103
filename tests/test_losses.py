"""Losses checked against brute-force computations written out in the tests."""

from __future__ import annotations

import math

import pytest
import torch

from esreid.losses import (
    CrossEntropyLabelSmooth,
    TripletLoss,
    batch_hard_triplet_loss,
    cross_entropy_label_smooth,
    hard_mining,
    pairwise_euclidean,
)


def _hand_smoothed_ce(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> float:
    """Smoothed cross-entropy with explicit loops: q = (1-eps)*onehot + eps/C."""
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        for k in range(c):
            q = (1.0 - eps) * (1.0 if k == int(targets[i]) else 0.0) + eps / c
            total -= q * (row[k] - log_z)
    return total / n


def _brute_triplet(feats: torch.Tensor, pids: list[int], margin: float | None) -> float:
    """Batch-hard triplet by enumerating every (anchor, positive, negative) triple."""
    n = feats.shape[0]

    def d(i: int, j: int) -> float:
        return math.sqrt(
            sum((float(a) - float(b)) ** 2 for a, b in zip(feats[i], feats[j], strict=True))
        )

    losses = []
    for a in range(n):
        hardest = None
        for p in range(n):
            if p == a or pids[p] != pids[a]:
                continue
            for q in range(n):
                if pids[q] == pids[a]:
                    continue
                gap = d(a, p) - d(a, q)
                hardest = gap if hardest is None else max(hardest, gap)
        if hardest is None:
            continue
        if margin is None:
            losses.append(math.log1p(math.exp(hardest)))
        else:
            losses.append(max(0.0, hardest + margin))
    return sum(losses) / len(losses)


def test_label_smoothing_matches_hand_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 3
    targets = torch.tensor([0, 6, 3, 3, 1])
    for eps in (0.0, 0.1, 0.5):
        got = cross_entropy_label_smooth(logits, targets, eps).item()
        assert got == pytest.approx(_hand_smoothed_ce(logits, targets, eps), rel=1e-10)
    module = CrossEntropyLabelSmooth(0.1)
    assert module(logits, targets).item() == pytest.approx(
        _hand_smoothed_ce(logits, targets, 0.1), rel=1e-10
    )


def test_label_smoothing_uniform_logits_equals_log_c() -> None:
    # With equal logits every class has probability 1/C, so the loss is log C for any eps.
    logits = torch.zeros(3, 4)
    targets = torch.tensor([0, 1, 2])
    assert cross_entropy_label_smooth(logits, targets, 0.3).item() == pytest.approx(math.log(4))


def test_label_smoothing_errors() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(
        ValueError, match=r"targets must lie in \[0, 2\] for 3 classes, got values in \[0, 3\]"
    ):
        cross_entropy_label_smooth(logits, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\), got 1.0"):
        cross_entropy_label_smooth(logits, torch.tensor([0, 1]), epsilon=1.0)
    with pytest.raises(ValueError, match=r"logits must be \[N, C\], got shape \(6,\)"):
        cross_entropy_label_smooth(torch.zeros(6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"expected a 1-D tensor of 2 labels, got shape \(3,\)"):
        cross_entropy_label_smooth(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(
        ValueError, match="labels must be an integer tensor, got dtype torch.float32"
    ):
        cross_entropy_label_smooth(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"CrossEntropyLabelSmooth: epsilon must be in \[0, 1\), got -0.1"
    ):
        CrossEntropyLabelSmooth(-0.1)


def test_pairwise_euclidean_matches_cdist_and_has_finite_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    dist = pairwise_euclidean(x)
    off_diag = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(dist[off_diag], torch.cdist(x, x)[off_diag])
    torch.testing.assert_close(dist.diagonal(), torch.full((6,), 1e-6, dtype=torch.float64))

    dup = torch.ones(3, 4, requires_grad=True)
    pairwise_euclidean(dup).sum().backward()
    assert dup.grad is not None and torch.isfinite(dup.grad).all()


def test_hard_mining_picks_extremes_and_flags_missing() -> None:
    dist = torch.tensor(
        [
            [0.0, 2.0, 5.0, 1.0, 9.0],
            [2.0, 0.0, 3.0, 4.0, 8.0],
            [5.0, 3.0, 0.0, 6.0, 7.0],
            [1.0, 4.0, 6.0, 0.0, 0.5],
            [9.0, 8.0, 7.0, 0.5, 0.0],
        ]
    )
    pids = torch.tensor([0, 0, 0, 1, 2])
    dist_ap, dist_an = hard_mining(dist, pids)
    # Anchor 0: positives {1: 2, 2: 5} -> 5; negatives {3: 1, 4: 9} -> 1.
    torch.testing.assert_close(dist_ap[:3], torch.tensor([5.0, 3.0, 5.0]))
    torch.testing.assert_close(dist_an, torch.tensor([1.0, 4.0, 6.0, 0.5, 0.5]))
    # Identities 1 and 2 have a single sample: no positive other than the anchor itself.
    assert dist_ap[3] == float("-inf") and dist_ap[4] == float("-inf")


@pytest.mark.parametrize("margin", [0.3, 0.0, 2.0, None])
def test_triplet_matches_brute_force(margin: float | None) -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    # Identity 9 has one sample: it is excluded as an anchor but still serves as a negative.
    pids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 9]
    got = batch_hard_triplet_loss(feats, torch.tensor(pids), margin).item()
    assert got == pytest.approx(_brute_triplet(feats, pids, margin), rel=1e-9)
    assert TripletLoss(margin)(feats, torch.tensor(pids)).item() == pytest.approx(got, rel=1e-12)


def test_triplet_hinge_inactive_for_separated_clusters_and_linear_for_large_margin() -> None:
    feats = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.1]], dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(feats, pids, margin=0.3).item() == 0.0
    # d_ap = 0.1 for every anchor; the nearest negative is at 10 (anchor 0), 9.9 (anchors 1
    # and 2) and hypot(9.9, 0.1) (anchor 3).
    d_an = [10.0, 9.9, 9.9, math.hypot(9.9, 0.1)]
    expected = sum(0.1 - d + 20.0 for d in d_an) / 4
    got = batch_hard_triplet_loss(feats, pids, margin=20.0).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_soft_margin_value() -> None:
    # Two identities on a line: anchors see d_ap = 1 and d_an = 3 or 1 respectively.
    feats = torch.tensor([[0.0], [1.0], [2.0], [4.0]], dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1])
    # anchor0: ap=1, an=2; anchor1: ap=1, an=1; anchor2: ap=2, an=1; anchor3: ap=2, an=3
    gaps = [1 - 2, 1 - 1, 2 - 1, 2 - 3]
    expected = sum(math.log1p(math.exp(g)) for g in gaps) / 4
    assert batch_hard_triplet_loss(feats, pids, margin=None).item() == pytest.approx(
        expected, rel=1e-9
    )


def test_triplet_gradient_finite_with_duplicate_features() -> None:
    feats = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    loss = batch_hard_triplet_loss(feats, pids, margin=0.3)
    loss.backward()
    assert torch.isfinite(loss)
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert feats.grad.abs().sum() > 0
    soft = feats.detach().clone().requires_grad_(True)
    batch_hard_triplet_loss(soft, pids, margin=None).backward()
    assert soft.grad is not None and torch.isfinite(soft.grad).all()


def test_triplet_gradient_ignores_far_singleton_identity() -> None:
    # Identity 7 has one sample far from the rest: it is never an anchor and never the
    # hardest negative, so it must receive exactly zero (not NaN) gradient.
    feats = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 2.5], [50.0, 50.0]], requires_grad=True
    )
    batch_hard_triplet_loss(feats, torch.tensor([0, 0, 1, 1, 7]), margin=5.0).backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    assert torch.equal(feats.grad[4], torch.zeros(2))
    assert feats.grad[:4].abs().sum() > 0


def test_triplet_errors() -> None:
    with pytest.raises(ValueError, match=r"no anchor has both a positive .* pids = \[0, 1, 2\]"):
        batch_hard_triplet_loss(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"no anchor has both .* pids = \[5, 5\]"):
        batch_hard_triplet_loss(torch.randn(2, 2), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match=r"features must be \[N, D\], got shape \(2, 2, 2\)"):
        batch_hard_triplet_loss(torch.randn(2, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"pids: expected a 1-D tensor of 3 labels, got shape \(2,\)"
    ):
        batch_hard_triplet_loss(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="margin must be >= 0 or None, got -1"):
        TripletLoss(margin=-1)
    with pytest.raises(ValueError, match=r"dist must be square \[N, N\], got shape \(2, 3\)"):
        hard_mining(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_distances_and_id_loss_stay_float32_under_autocast() -> None:
    """|a|^2 + |b|^2 - 2ab in bf16 would cancel to garbage for close features; under autocast
    the distances and the label-smoothed CE are computed as without it."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, generator=gen) * 10
    x = base + 0.01 * torch.randn(8, 64, generator=gen)  # close rows: large norms, small gaps
    logits = torch.randn(8, 5, generator=gen)
    targets = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    plain = pairwise_euclidean(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = pairwise_euclidean(x)
        mixed_triplet = batch_hard_triplet_loss(x, pids)
        mixed_ce = cross_entropy_label_smooth(logits.to(torch.bfloat16), targets)
        assert (x @ x.t()).dtype == torch.bfloat16  # autocast is on for a plain matmul
    assert mixed.dtype == mixed_ce.dtype == torch.float32
    assert torch.equal(mixed, plain)
    assert torch.equal(mixed_triplet, batch_hard_triplet_loss(x, pids))
    assert torch.equal(mixed_ce, cross_entropy_label_smooth(logits.to(torch.bfloat16).float(), targets))
