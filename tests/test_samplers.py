"""PKSampler: batch structure, replacement for small identities, determinism, errors."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest

from esreid.data.samplers import EpochIndex, PKSampler

# Identity -> number of images: 10 has 1, 11 has 3 (< K = 4), 12 has 4, 13 has 7, 14 has 9,
# 15 has 8. Indices are interleaved so identity order differs from index order.
_COUNTS = {12: 4, 10: 1, 14: 9, 11: 3, 15: 8, 13: 7}


def _pids() -> list[int]:
    pids: list[int] = []
    remaining = dict(_COUNTS)
    while any(remaining.values()):
        for pid in list(remaining):
            if remaining[pid]:
                pids.append(pid)
                remaining[pid] -= 1
    return pids


def _batches(sampler: PKSampler) -> list[list[int]]:
    flat = list(sampler)
    assert len(flat) % sampler.batch_size == 0
    return [flat[i : i + sampler.batch_size] for i in range(0, len(flat), sampler.batch_size)]


def _expected_chunks(k: int) -> int:
    """Chunks per epoch: floor(n / K) per identity, or one for identities with n < K."""
    return sum(n // k if n >= k else 1 for n in _COUNTS.values())


def test_every_batch_has_j_distinct_pids_of_k_images() -> None:
    pids = _pids()
    for epoch in range(5):
        sampler = PKSampler(pids, num_instances=4, batch_size=12, seed=3)
        sampler.set_epoch(epoch)
        batches = _batches(sampler)
        assert batches
        for batch in batches:
            groups = [batch[i : i + 4] for i in range(0, 12, 4)]
            group_pids = [{pids[i] for i in g} for g in groups]
            assert all(len(s) == 1 for s in group_pids)
            assert len(set().union(*group_pids)) == 3


def test_chunks_without_repeats_unless_identity_is_small() -> None:
    pids = _pids()
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=0)
    seen: Counter[int] = Counter()
    seen_indices: set[int] = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for batch in _batches(sampler):
            seen_indices.update(batch)
            for start in range(0, 8, 4):
                chunk = batch[start : start + 4]
                pid = pids[chunk[0]]
                members = {i for i, p in enumerate(pids) if p == pid}
                assert set(chunk) <= members
                if _COUNTS[pid] >= 4:
                    assert len(set(chunk)) == 4
                else:
                    # Every image of a small identity appears, padded by repeats to K.
                    assert set(chunk) == members
                seen[pid] += 1
    assert seen[10] > 0 and seen[11] > 0
    # The dropped partial chunks change with the epoch, so over epochs every image is used.
    assert seen_indices == set(range(len(pids)))


def test_one_image_identity_is_repeated_k_times() -> None:
    pids = [0, 1, 1, 1, 2, 2]
    sampler = PKSampler(pids, num_instances=3, batch_size=9, seed=1)
    flat = list(sampler)
    # Every identity yields exactly one chunk (3 // 3 = 1; 1 and 2 images are padded to 3).
    assert len(flat) == 9
    chunks = [flat[i : i + 3] for i in range(0, 9, 3)]
    assert [0, 0, 0] in chunks


def test_epoch_uses_every_chunk_when_counts_allow() -> None:
    # Every identity yields exactly one chunk (4, 5 -> 1 + 1 dropped, 7 -> 1 + 3 dropped,
    # 2 -> padded), and J = 2 divides the 4 chunks, so no chunk is left over.
    pids = [0] * 4 + [1] * 5 + [2] * 7 + [3] * 2
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=5)
    for epoch in range(10):
        sampler.set_epoch(epoch)
        flat = list(sampler)
        assert len(flat) == 16
        assert Counter(pids[i] for i in flat) == {0: 4, 1: 4, 2: 4, 3: 4}


def test_determinism_and_epoch_dependence() -> None:
    pids = _pids()
    a = PKSampler(pids, num_instances=4, batch_size=8, seed=7)
    b = PKSampler(pids, num_instances=4, batch_size=8, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    a.set_epoch(0)
    assert list(a) != epoch1
    assert list(PKSampler(pids, num_instances=4, batch_size=8, seed=8)) != list(a)
    # Iterating twice without set_epoch repeats the order (DistributedSampler convention).
    assert list(a) == list(a)


def test_len_matches_iteration() -> None:
    pids = _pids()
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=0)
    for epoch in range(8):
        sampler.set_epoch(epoch)
        n = len(sampler)
        assert n == len(list(sampler))
        assert n % 8 == 0
        assert n <= _expected_chunks(4) * 4
    # J = 1 uses every chunk, so the length is known in closed form.
    single = PKSampler(pids, num_instances=4, batch_size=4, seed=0)
    assert len(single) == _expected_chunks(4) * 4


def test_items_are_indices_tagged_with_epoch_and_position() -> None:
    pids = _pids()
    sampler = PKSampler(pids, num_instances=4, batch_size=8, seed=2)
    plain = list(sampler)
    sampler.set_epoch(3)
    items = list(sampler)
    assert all(type(item) is EpochIndex for item in items)
    assert [item.epoch for item in items] == [3] * len(items)
    assert [item.position for item in items] == list(range(len(items)))
    # Tags come from the epoch at the start of the iteration, even if it changes midway.
    stream = iter(sampler)
    first = next(stream)
    sampler.set_epoch(0)
    assert {item.epoch for item in stream} == {first.epoch} == {3}
    assert list(sampler) == plain
    # They behave as the bare index: equal, same hash, usable as a list index.
    item = items[5]
    assert item == int(item) and hash(item) == hash(int(item))
    assert pids[item] == pids[int(item)]
    assert repr(item) == f"EpochIndex({int(item)}, epoch=3, position=5)"


def test_tagged_index_survives_pickling() -> None:
    # DataLoader workers receive the sampler's items pickled.
    item = EpochIndex(17, epoch=4, position=9)
    back = pickle.loads(pickle.dumps(item))
    assert type(back) is EpochIndex
    assert (int(back), back.epoch, back.position) == (17, 4, 9)


def test_errors_name_the_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"batch_size \(10\) must be a positive multiple of num_instances \(4\)"
    ):
        PKSampler([0, 1, 2], num_instances=4, batch_size=10)
    with pytest.raises(
        ValueError,
        match="batch_size 16 / num_instances 4 needs 4 identities per batch, "
        "but the data has only 3 identities",
    ):
        PKSampler([0, 0, 1, 1, 2, 2], num_instances=4, batch_size=16)
    with pytest.raises(ValueError, match="num_instances must be >= 1, got 0"):
        PKSampler([0, 1], num_instances=0, batch_size=4)
    with pytest.raises(ValueError, match="only 0 identities"):
        PKSampler([], num_instances=2, batch_size=4)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        PKSampler([0, 1], num_instances=1, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -2"):
        PKSampler([0, 1], num_instances=1, batch_size=2).set_epoch(-2)


def test_start_skips_whole_batches_and_keeps_positions():
    pids = [i // 5 for i in range(40)]
    sampler = PKSampler(pids, num_instances=2, batch_size=4, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sampler.epoch_length() == len(full) == len(sampler)
    sampler.set_epoch(2, start=8)
    rest = list(sampler)
    assert len(sampler) == len(full) - 8 == len(rest)
    # Same indices and the same (epoch, position) tags as the tail of the full epoch.
    assert [(int(i), i.epoch, i.position) for i in rest] == [
        (int(i), i.epoch, i.position) for i in full[8:]]
    assert sampler.epoch_length() == len(full)
    sampler.set_epoch(3)
    assert sampler.start == 0


@pytest.mark.parametrize("start", [-4, 3])
def test_start_must_be_a_multiple_of_the_batch(start):
    sampler = PKSampler([0, 0, 1, 1], num_instances=2, batch_size=4)
    with pytest.raises(ValueError, match="start must be a non-negative multiple of batch_size"):
        sampler.set_epoch(0, start=start)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch_into_whole_identities(world):
    pids = [i // 6 for i in range(6 * 30)]  # 30 identities x 6 images
    k, batch = 2, 16  # J = 8 identities per global batch
    single = PKSampler(pids, num_instances=k, batch_size=batch, seed=7)
    ranks = [PKSampler(pids, num_instances=k, batch_size=batch, seed=7, num_replicas=world,
                       rank=r) for r in range(world)]
    for epoch in (0, 3):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        full = list(single)
        local = batch // world
        streams = [list(s) for s in ranks]
        for s, stream in zip(ranks, streams, strict=True):
            assert s.local_batch_size == local
            assert len(s) == s.epoch_length() == len(full) // world == len(stream)
            assert s.num_batches() == single.num_batches() == len(full) // batch
        for b in range(len(full) // batch):
            parts = [stream[b * local:(b + 1) * local] for stream in streams]
            # The ranks' local batches, in rank order, are the single-process batch, with its
            # positions (so augmentation does not depend on the number of processes).
            joined = [(int(i), i.epoch, i.position) for part in parts for i in part]
            assert joined == [(int(i), i.epoch, i.position) for i in full[b * batch:(b + 1) * batch]]
            ids = [{pids[i] for i in part} for part in parts]
            assert all(len(group) == batch // k // world for group in ids)  # whole identities
            assert all(Counter(pids[i] for i in part) == dict.fromkeys(group, k)
                       for part, group in zip(parts, ids, strict=True))
            assert len(set().union(*ids)) == sum(map(len, ids))  # no identity on two ranks


def test_ranks_resume_mid_epoch_at_the_same_global_batch():
    pids = [i // 4 for i in range(4 * 12)]
    full = PKSampler(pids, num_instances=2, batch_size=8, seed=1, num_replicas=2, rank=1)
    full.set_epoch(1)
    stream = list(full)
    full.set_epoch(1, start=16)  # two global batches done
    assert list(full) == stream[8:]


def test_distributed_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"the 3 identities of a batch \(batch_size 6 / "
                                         r"num_instances 2\) must split evenly between 2"):
        PKSampler([0, 0, 1, 1, 2, 2], num_instances=2, batch_size=6, num_replicas=2)
    with pytest.raises(ValueError, match="got rank 2 of 2"):
        PKSampler([0, 0, 1, 1], num_instances=2, batch_size=4, num_replicas=2, rank=2)


def test_defaults_are_k4_batch64_seed0() -> None:
    """The documented defaults: 16 identities x 4 images, seed 0."""
    pids = [i // 6 for i in range(6 * 40)]
    default = PKSampler(pids)
    assert (default.num_instances, default.batch_size, default.num_pids_per_batch) == (4, 64, 16)
    assert list(default) == list(PKSampler(pids, num_instances=4, batch_size=64, seed=0))


def test_one_image_batches_are_allowed() -> None:
    sampler = PKSampler([0, 1, 2], num_instances=1, batch_size=1)
    assert sorted(int(i) for i in sampler) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"batch_size \(0\) must be a positive multiple"):
        PKSampler([0, 1, 2], num_instances=1, batch_size=0)


def test_start_past_the_end_yields_nothing() -> None:
    sampler = PKSampler([i // 2 for i in range(8)], num_instances=2, batch_size=4)
    n = len(sampler)
    sampler.set_epoch(0, start=n + 4)
    assert len(sampler) == 0 and list(sampler) == []
    assert sampler.epoch_length() == n


def test_lengths_are_ints() -> None:
    """``num_batches`` and ``epoch_length`` feed ``range`` and progress bars: plain ints."""
    sampler = PKSampler(_pids(), num_instances=2, batch_size=4, num_replicas=2, rank=1)
    assert type(sampler.num_batches()) is int and type(sampler.epoch_length()) is int
    assert sampler.num_batches() * 2 == sampler.epoch_length() == len(sampler)


def test_epoch_order_is_drawn_once_per_epoch(monkeypatch) -> None:
    """len(), epoch_length(), num_batches() and iteration share one draw of the epoch's order
    (the trainer calls all of them every epoch; each draw shuffles every identity)."""
    import numpy as np

    from esreid.data import samplers

    draws = []
    real = np.random.default_rng
    monkeypatch.setattr(samplers.np.random, "default_rng",
                        lambda *a, **k: draws.append(a) or real(*a, **k))
    sampler = PKSampler(_pids(), num_instances=2, batch_size=4, seed=5)
    first = (len(sampler), sampler.epoch_length(), sampler.num_batches(), list(sampler))
    assert len(draws) == 1
    sampler.set_epoch(1)
    len(sampler), list(sampler)
    assert len(draws) == 2
    sampler.set_epoch(0)
    assert list(sampler) == first[3] and len(draws) == 3
