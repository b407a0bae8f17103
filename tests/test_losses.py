"""Losses checked against brute-force computations written out in the tests."""

from __future__ import annotations

import math

import pytest
import torch

from esreid.losses import (
    CrossEntropyLabelSmooth,
    TripletLoss,
    WeightedRegularizedTripletLoss,
    batch_hard_triplet_loss,
    cross_entropy_label_smooth,
    hard_mining,
    pairwise_euclidean,
    weighted_regularized_triplet_loss,
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


# --- Weighted regularization triplet (AGW) ------------------------------------------------


def _wrt_reference(feats: torch.Tensor, pids: list[int], published: bool = False) -> torch.Tensor:
    """The weighted regularization triplet written out per anchor, in float64 torch scalars.

    D_ij = sqrt(max(|f_i - f_j|^2, 1e-12)); P(i) = same pid (i included), N(i) = other pids;
    d_p = sum_P exp(D) D / sum_P exp(D), d_n = sum_N exp(-D) D / sum_N exp(-D);
    loss = mean_i log(1 + exp(d_p - d_n)). ``published``: the weights are
    exp(e_j - s) / (sum exp(e_k - s) + 1e-6) with s the row maximum of e_j * [j in set]
    (entries outside the set count as 0).
    """
    n = feats.shape[0]
    dist = [
        [torch.sqrt(torch.clamp(((feats[i] - feats[j]) ** 2).sum(), min=1e-12)) for j in range(n)]
        for i in range(n)
    ]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        weighted = []
        for sign, members in (
            (1.0, [j for j in range(n) if pids[j] == pids[i]]),
            (-1.0, [j for j in range(n) if pids[j] != pids[i]]),
        ):
            if published:
                shift = max(sign * dist[i][j] if j in members else torch.zeros(()) for j in range(n))
                terms = [torch.exp(sign * dist[i][j] - shift) for j in members]
                z = sum(terms) + 1e-6
            else:
                terms = [torch.exp(sign * dist[i][j]) for j in members]
                z = sum(terms)
            weighted.append(sum(t / z * dist[i][j] for t, j in zip(terms, members, strict=True)))
        d_p, d_n = weighted
        total = total + torch.log1p(torch.exp(d_p - d_n))
    return total / n


@pytest.mark.parametrize("published", [False, True])
def test_weighted_triplet_values_and_gradients_match_the_formula(published: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(9, 5, generator=gen, dtype=torch.float64) * 1.5
    # Identity 7 has a single sample: its only positive is itself (d_p = 1e-6), and it
    # still counts as an anchor.
    pids = [0, 0, 0, 1, 1, 2, 2, 2, 7]
    x = feats.clone().requires_grad_()
    got = weighted_regularized_triplet_loss(x, torch.tensor(pids), published_quirks=published)
    (grad,) = torch.autograd.grad(got, x)
    ref_x = feats.clone().requires_grad_()
    expected = _wrt_reference(ref_x, pids, published)
    (expected_grad,) = torch.autograd.grad(expected, ref_x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    module = WeightedRegularizedTripletLoss(published_quirks=published)
    assert torch.equal(module(feats, torch.tensor(pids)), got.detach())
    assert f"published_quirks={published}" in repr(module)


@pytest.mark.parametrize("published", [False, True])
def test_weighted_triplet_gradcheck(published: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(
        lambda f: weighted_regularized_triplet_loss(f, pids, published_quirks=published), (feats,)
    )


def test_weighted_triplet_hand_example() -> None:
    # Points 0, 1, 3, 5 on a line, identities {0, 1} and {3, 5}; each anchor's own distance
    # is 1e-6 (pairwise_euclidean's clamp) and it is one of its positives.
    e = math.exp
    s = 1e-6

    def avg(pairs):  # sum w d / sum w over (weight, distance) pairs
        return sum(w * d for w, d in pairs) / sum(w for w, _ in pairs)

    d_p = [
        avg([(e(s), s), (e(1), 1)]),  # anchor 0: itself, 1 at distance 1
        avg([(e(s), s), (e(1), 1)]),  # anchor 1: itself, 0 at distance 1
        avg([(e(s), s), (e(2), 2)]),  # anchor 3: itself, 5 at distance 2
        avg([(e(s), s), (e(2), 2)]),  # anchor 5: itself, 3 at distance 2
    ]
    d_n = [
        avg([(e(-3), 3), (e(-5), 5)]),  # anchor 0: negatives 3 and 5
        avg([(e(-2), 2), (e(-4), 4)]),  # anchor 1
        avg([(e(-3), 3), (e(-2), 2)]),  # anchor 3: negatives 0 and 1
        avg([(e(-5), 5), (e(-4), 4)]),  # anchor 5
    ]
    expected = sum(math.log1p(e(p - q)) for p, q in zip(d_p, d_n, strict=True)) / 4
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0]], dtype=torch.float64)
    got = weighted_regularized_triplet_loss(feats, torch.tensor([0, 0, 1, 1]))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # By hand: the four terms are 0.07834, 0.20007, 0.47131 and 0.07834.
    assert expected == pytest.approx(0.20701, abs=1e-5)


def test_weighted_triplet_is_invariant_to_sample_order() -> None:
    gen = torch.Generator().manual_seed(6)
    feats = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    pids = torch.tensor([3, 3, 1, 1, 1, 8, 8, 3])
    perm = torch.randperm(8, generator=gen)
    x = feats.clone().requires_grad_()
    loss = weighted_regularized_triplet_loss(x, pids)
    loss.backward()
    xp = feats[perm].clone().requires_grad_()
    loss_p = weighted_regularized_triplet_loss(xp, pids[perm])
    loss_p.backward()
    torch.testing.assert_close(loss_p, loss, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(xp.grad, x.grad[perm], rtol=1e-11, atol=1e-14)


def test_weighted_triplet_far_apart_features_stay_finite() -> None:
    # Distances in the thousands: exp(D) overflows every float type unless the row maximum
    # is subtracted. The weights are then one-hot (or an even split for the tie of anchor
    # 3000, whose negatives are both 2000 away), so by hand, with softplus(t) = t here:
    # anchor 0:    d_p = 3000, d_n = 1000 -> 2000
    # anchor 3000: d_p = 3000, d_n = 2000 -> 1000
    # anchor 1000: d_p = 4000, d_n = 1000 -> 3000
    # anchor 5000: d_p = 4000, d_n = 2000 -> 2000          mean: 2000
    feats = torch.tensor([[0.0], [3000.0], [1000.0], [5000.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    loss = weighted_regularized_triplet_loss(feats, pids)
    loss.backward()
    assert loss.item() == pytest.approx(2000.0, rel=1e-6)
    # The per-anchor terms are x1 - x2, x1 - x0 - (x3 - x2) / 2, x3 - 2 x2 + x0 and x1 - x2.
    torch.testing.assert_close(feats.grad, torch.tensor([[0.0], [0.75], [-0.875], [0.125]]))
    # The published weights subtract nothing for the negatives: every exp(-D) underflows,
    # d_n collapses to 0 and the loss is the mean d_p, (3000 + 3000 + 4000 + 4000) / 4.
    published = weighted_regularized_triplet_loss(feats, pids, published_quirks=True)
    assert published.item() == pytest.approx(3500.0, rel=1e-6)


def test_weighted_triplet_published_weights_agree_at_small_distances_only() -> None:
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(8, 4, generator=gen, dtype=torch.float64) * 0.5
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    ours = weighted_regularized_triplet_loss(feats, pids)
    theirs = weighted_regularized_triplet_loss(feats, pids, published_quirks=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0.0)
    # Scaled so that the nearest negatives are about 20 away, the 1e-6 in the published
    # denominator outweighs sum exp(-D): the negatives' weights nearly vanish.
    far = feats * (20.0 / pairwise_euclidean(feats)[pids[:, None] != pids[None, :]].min())
    assert weighted_regularized_triplet_loss(far, pids, published_quirks=True) > 1.5 * (
        weighted_regularized_triplet_loss(far, pids)
    )


def test_weighted_triplet_same_under_autocast() -> None:
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(1, 32, generator=gen) * 10
    x = base + 0.05 * torch.randn(8, 32, generator=gen)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    plain = weighted_regularized_triplet_loss(x, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = weighted_regularized_triplet_loss(x, pids)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


def test_weighted_triplet_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"no anchor has a negative \(a sample of another identity\) in the batch; "
        r"pids = \[4, 4, 4\]",
    ):
        weighted_regularized_triplet_loss(torch.randn(3, 2), torch.tensor([4, 4, 4]))
    with pytest.raises(ValueError, match=r"features must be \[N, D\], got shape \(3,\)"):
        weighted_regularized_triplet_loss(torch.randn(3), torch.tensor([0, 1, 1]))
    with pytest.raises(
        ValueError, match=r"pids: expected a 1-D tensor of 3 labels, got shape \(2,\)"
    ):
        WeightedRegularizedTripletLoss()(torch.randn(3, 2), torch.tensor([0, 1]))


# --- Defaults, module forms, precision and exact error messages ----------------------------


def test_label_smoothing_defaults_to_0_1_and_the_module_uses_its_epsilon() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 2
    targets = torch.tensor([5, 0, 2, 2])
    hand = {eps: _hand_smoothed_ce(logits, targets, eps) for eps in (0.0, 0.1, 0.4)}
    assert hand[0.1] != pytest.approx(hand[0.0], rel=1e-3)  # the smoothing shows
    assert cross_entropy_label_smooth(logits, targets).item() == pytest.approx(hand[0.1], rel=1e-10)
    default = CrossEntropyLabelSmooth()
    assert default.epsilon == 0.1 and repr(default) == "CrossEntropyLabelSmooth(epsilon=0.1)"
    assert default(logits, targets).item() == pytest.approx(hand[0.1], rel=1e-10)
    for eps in (0.0, 0.4):
        assert CrossEntropyLabelSmooth(eps)(logits, targets).item() == pytest.approx(
            hand[eps], rel=1e-10
        )
    with pytest.raises(
        ValueError, match=r"^CrossEntropyLabelSmooth: epsilon must be in \[0, 1\), got 1.0$"
    ):
        CrossEntropyLabelSmooth(1.0)


def test_label_smoothing_one_sample_and_half_precision_logits() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    targets = torch.tensor([2])
    got = cross_entropy_label_smooth(logits, targets, 0.2).item()
    assert got == pytest.approx(_hand_smoothed_ce(logits, targets, 0.2), rel=1e-12)
    # Half-precision logits (outside autocast too) are promoted: float32 result, the same
    # value as from the same logits in float32.
    half = torch.tensor([[1.5, -0.25, 3.0], [0.5, 0.75, -1.0]], dtype=torch.bfloat16)
    t = torch.tensor([0, 2])
    out = cross_entropy_label_smooth(half, t)
    assert out.dtype == torch.float32
    assert torch.equal(out, cross_entropy_label_smooth(half.float(), t))


def test_label_smoothing_error_messages_exactly() -> None:
    logits = torch.zeros(2, 3)
    cases = [
        ((torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
         r"cross_entropy_label_smooth: empty batch \(N = 0\)"),
        ((logits, torch.tensor([-1, 1])),
         r"cross_entropy_label_smooth: targets must lie in \[0, 2\] for 3 classes, "
         r"got values in \[-1, 1\]"),
        ((logits, torch.tensor([0, 3])),
         r"cross_entropy_label_smooth: targets must lie in \[0, 2\] for 3 classes, "
         r"got values in \[0, 3\]"),
        ((logits, torch.tensor([0, 1, 2])),
         r"cross_entropy_label_smooth: targets: expected a 1-D tensor of 2 labels, "
         r"got shape \(3,\)"),
        ((logits, torch.tensor([[0], [1]])),
         r"cross_entropy_label_smooth: targets: expected a 1-D tensor of 2 labels, "
         r"got shape \(2, 1\)"),
        ((logits, torch.tensor([True, False])),
         r"cross_entropy_label_smooth: targets: labels must be an integer tensor, "
         r"got dtype torch.bool"),
        ((logits, torch.tensor([0.0, 1.0])),
         r"cross_entropy_label_smooth: targets: labels must be an integer tensor, "
         r"got dtype torch.float32"),
        ((torch.zeros(6), torch.tensor([0, 1])),
         r"cross_entropy_label_smooth: logits must be \[N, C\], got shape \(6,\)"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=f"^{message}$"):
            cross_entropy_label_smooth(*args)
    for eps in (1.0, -0.1):
        with pytest.raises(
            ValueError, match=rf"^cross_entropy_label_smooth: epsilon must be in \[0, 1\), got {eps}$"
        ):
            cross_entropy_label_smooth(logits, torch.tensor([0, 1]), epsilon=eps)


def test_pairwise_euclidean_promotes_half_precision_and_names_itself() -> None:
    gen = torch.Generator().manual_seed(10)
    x = (torch.randn(5, 3, generator=gen) * 4).to(torch.bfloat16)
    got = pairwise_euclidean(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, pairwise_euclidean(x.float()))
    with pytest.raises(ValueError, match=r"^pairwise_euclidean: x must be \[N, D\], got shape \(3,\)$"):
        pairwise_euclidean(torch.zeros(3))


def test_hard_mining_error_messages_exactly() -> None:
    with pytest.raises(ValueError, match=r"^hard_mining: dist must be square \[N, N\], got shape \(2, 3\)$"):
        hard_mining(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^hard_mining: dist must be square \[N, N\], got shape \(2,\)$"):
        hard_mining(torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"^hard_mining: pids: expected a 1-D tensor of 2 labels, got shape \(3,\)$"
    ):
        hard_mining(torch.zeros(2, 2), torch.tensor([0, 1, 1]))


def test_triplet_defaults_to_margin_0_3() -> None:
    gen = torch.Generator().manual_seed(11)
    feats = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    pids = [0, 0, 1, 1, 2, 2, 3, 3]
    expected = _brute_triplet(feats, pids, 0.3)
    assert expected != pytest.approx(_brute_triplet(feats, pids, 1.3), rel=1e-3)
    assert batch_hard_triplet_loss(feats, torch.tensor(pids)).item() == pytest.approx(expected, rel=1e-9)
    module = TripletLoss()
    assert module.margin == 0.3 and repr(module) == "TripletLoss(margin=0.3)"
    assert module(feats, torch.tensor(pids)).item() == pytest.approx(expected, rel=1e-9)
    assert repr(TripletLoss(None)) == "TripletLoss(margin=None)"


def test_triplet_error_messages_exactly() -> None:
    with pytest.raises(
        ValueError, match=r"^batch_hard_triplet_loss: margin must be >= 0 or None, got -0.5$"
    ):
        batch_hard_triplet_loss(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), margin=-0.5)
    with pytest.raises(ValueError, match=r"^TripletLoss: margin must be >= 0 or None, got -1$"):
        TripletLoss(margin=-1)
    with pytest.raises(
        ValueError,
        match=r"^batch_hard_triplet_loss: pids: expected a 1-D tensor of 3 labels, got shape \(2,\)$",
    ):
        batch_hard_triplet_loss(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError,
        match=r"^batch_hard_triplet_loss: features must be \[N, D\], got shape \(2, 2, 2\)$",
    ):
        batch_hard_triplet_loss(torch.randn(2, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError,
        match=r"^batch_hard_triplet_loss: no anchor has both a positive \(another sample of its "
        r"identity\) and a negative in the batch; pids = \[0, 1, 2\]$",
    ):
        batch_hard_triplet_loss(torch.randn(3, 2), torch.tensor([0, 1, 2]))


def test_weighted_triplet_module_defaults_to_the_formula_and_error_messages_exactly() -> None:
    gen = torch.Generator().manual_seed(12)
    feats = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    pids = [0, 0, 1, 1, 2, 2]
    formula = _wrt_reference(feats, pids, published=False)
    published = _wrt_reference(feats, pids, published=True)
    assert abs(float(formula - published)) > 1e-9  # the two forms differ visibly here
    module = WeightedRegularizedTripletLoss()
    assert module.published_quirks is False
    assert repr(module) == "WeightedRegularizedTripletLoss(published_quirks=False)"
    torch.testing.assert_close(module(feats, torch.tensor(pids)), formula, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(weighted_regularized_triplet_loss(feats, torch.tensor(pids)),
                               formula, rtol=1e-12, atol=0.0)
    truthy = WeightedRegularizedTripletLoss(published_quirks=1)
    assert truthy.published_quirks is True
    torch.testing.assert_close(truthy(feats, torch.tensor(pids)), published, rtol=1e-12, atol=0.0)
    name = "weighted_regularized_triplet_loss"
    with pytest.raises(ValueError, match=rf"^{name}: features must be \[N, D\], got shape \(3,\)$"):
        weighted_regularized_triplet_loss(torch.randn(3), torch.tensor([0, 1, 1]))
    with pytest.raises(
        ValueError, match=rf"^{name}: pids: expected a 1-D tensor of 3 labels, got shape \(2,\)$"
    ):
        weighted_regularized_triplet_loss(torch.randn(3, 2), torch.tensor([0, 1]))
    with pytest.raises(
        ValueError,
        match=rf"^{name}: no anchor has a negative \(a sample of another identity\) in the batch; "
        r"pids = \[4, 4, 4\]$",
    ):
        weighted_regularized_triplet_loss(torch.randn(3, 2), torch.tensor([4, 4, 4]))


@pytest.mark.cuda
def test_hard_mining_and_the_triplet_losses_on_cuda() -> None:
    # Every mask hard_mining builds must live on the distances' device.
    gen = torch.Generator().manual_seed(13)
    feats = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    dist = pairwise_euclidean(feats)
    want_ap, want_an = hard_mining(dist, pids)
    got_ap, got_an = hard_mining(dist.cuda(), pids.cuda())
    assert got_ap.is_cuda and got_an.is_cuda
    torch.testing.assert_close(got_ap.cpu(), want_ap)
    torch.testing.assert_close(got_an.cpu(), want_an)
    for loss in (batch_hard_triplet_loss, weighted_regularized_triplet_loss):
        torch.testing.assert_close(loss(feats.cuda(), pids.cuda()).cpu(), loss(feats, pids))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_label_smoothing_accepts_every_integer_target_dtype(dtype) -> None:
    """Any integer targets give the int64 result (F.cross_entropy alone refuses int32)."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    targets = torch.tensor([0, 2])
    expected = cross_entropy_label_smooth(logits, targets, epsilon=0.2)
    assert torch.equal(cross_entropy_label_smooth(logits, targets.to(dtype), epsilon=0.2), expected)
