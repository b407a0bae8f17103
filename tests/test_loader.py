"""Transforms, ImageDataset and the train/test loaders on tiny generated JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from esreid.data.loader import (
    ImageDataset,
    ImageReadError,
    build_test_loader,
    build_train_loader,
    read_rgb,
)
from esreid.data.records import Record
from esreid.data.samplers import EpochIndex, PKSampler
from esreid.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

_MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
_STD = torch.tensor(IMAGENET_STD)[:, None, None]


def _gradient_image(h: int = 16, w: int = 8, seed: int = 0) -> Image.Image:
    """An asymmetric RGB image (so flips and crops are visible)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _normalised(image: Image.Image) -> torch.Tensor:
    """Reference normalisation by hand: (pixel / 255 - mean) / std, as [3, H, W]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return (arr / 255.0 - _MEAN) / _STD


@pytest.fixture()
def records(tmp_path: Path) -> list[Record]:
    """3 identities x 4 JPEGs of 16x8, colours varying by identity and image."""
    out = []
    for pid in range(3):
        for j in range(4):
            path = tmp_path / f"{pid:04d}_c{j % 2}_{j}.jpg"
            _gradient_image(seed=10 * pid + j).save(path, quality=95)
            out.append(Record(path=str(path), pid=pid, camid=j % 2))
    return out


# ---------------------------------------------------------------- transforms


def test_eval_transform_normalises_exactly() -> None:
    image = _gradient_image()
    out = build_transforms(16, 8, is_train=False)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 8)
    assert type(out) is torch.Tensor
    # Same size: resize is the identity, so the output is the hand-normalised pixels.
    torch.testing.assert_close(out, _normalised(image), atol=1e-6, rtol=0)


def test_eval_transform_resizes_bilinear() -> None:
    # A solid colour stays solid under any interpolation; the size must be exact.
    image = Image.new("RGB", (20, 50), (255, 0, 128))
    out = build_transforms(32, 12, is_train=False)(image)
    assert out.shape == (3, 32, 12)
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / (
        torch.tensor(IMAGENET_STD)
    )
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 32, 12), atol=1e-5, rtol=0)


def test_train_transform_flip_probability_extremes() -> None:
    image = _gradient_image()
    ref = _normalised(image)
    torch.testing.assert_close(build_transforms(16, 8, True, flip_prob=1.0)(image), ref.flip(-1))
    torch.testing.assert_close(build_transforms(16, 8, True, flip_prob=0.0)(image), ref)


def test_train_transform_pad_crop_is_a_window_of_the_padded_image() -> None:
    image = _gradient_image()
    pad = 2
    black = (0.0 - _MEAN) / _STD
    padded = black.expand(3, 16 + 2 * pad, 8 + 2 * pad).clone()
    padded[:, pad:-pad, pad:-pad] = _normalised(image)
    transform = build_transforms(16, 8, True, flip_prob=0.0, pad=pad)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(30):
        out = transform(image)
        assert out.shape == (3, 16, 8)
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(out, padded[:, dy : dy + 16, dx : dx + 8], atol=1e-6)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 1


def test_transform_argument_errors() -> None:
    with pytest.raises(
        ValueError, match="height and width must be positive, got height=0, width=8"
    ):
        build_transforms(0, 8, is_train=False)
    with pytest.raises(ValueError, match="flip_prob must be in \\[0, 1\\], got 1.5"):
        build_transforms(16, 8, is_train=True, flip_prob=1.5)
    with pytest.raises(ValueError, match="pad must be >= 0, got -1"):
        build_transforms(16, 8, is_train=True, pad=-1)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        build_transforms(16, 8, is_train=False, mean=(0.5,))
    with pytest.raises(ValueError, match=r"std values must be positive, got \(1.0, 0.0, 1.0\)"):
        build_transforms(16, 8, is_train=False, std=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------- dataset


def test_dataset_items_and_rgb_conversion(tmp_path: Path, records: list[Record]) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (8, 16), 100).save(gray)
    recs = [*records, Record(path=str(gray), pid=7, camid=3)]
    dataset = ImageDataset(recs, build_transforms(16, 8, is_train=False))
    assert len(dataset) == 13
    image, pid, camid, index = dataset[12]
    assert (pid, camid, index) == (7, 3, 12)
    assert image.shape == (3, 16, 8)
    expected = (100 / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected, atol=1e-6, rtol=0)
    raw, *_ = ImageDataset(recs, None)[12]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB"


def test_corrupt_image_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "0001_c1_broken.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    dataset = ImageDataset([Record(path=str(bad), pid=0, camid=0)], None)
    with pytest.raises(ImageReadError, match=f"cannot read image {bad}: cannot identify image"):
        dataset[0]


def test_truncated_image_error_names_file(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    _gradient_image(64, 64).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=f"cannot read image {cut}: (?i:.*truncated)"):
        read_rgb(str(cut))


def test_missing_image_error_names_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "0002_c1_x.jpg"
    dataset = ImageDataset([Record(path=str(missing), pid=0, camid=0)], None)
    with pytest.raises(ImageReadError, match=f"cannot read image {missing}: file not found"):
        dataset[0]
    assert issubclass(ImageReadError, OSError)


# ---------------------------------------------------------------- loaders


def _collect(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [tuple(batch) for batch in loader]


def test_train_loader_pk_batches(records: list[Record]) -> None:
    loader = build_train_loader(records, 16, 8, batch_size=6, num_instances=2, num_workers=0)
    assert isinstance(loader.sampler, PKSampler)
    batches = _collect(loader)
    # 3 identities x 2 chunks of 2 and J = 3: each batch takes one chunk of every identity.
    assert len(batches) == len(loader) == 2
    seen = []
    for images, pids, camids, indices in batches:
        assert images.shape == (6, 3, 16, 8) and images.dtype == torch.float32
        assert pids.dtype == torch.int64 and camids.dtype == torch.int64
        chunks = pids.view(3, 2)
        assert (chunks[:, 0] == chunks[:, 1]).all()
        assert sorted(chunks[:, 0].tolist()) == [0, 1, 2]
        for i, idx in enumerate(indices.tolist()):
            assert records[idx].pid == pids[i] and records[idx].camid == camids[i]
        seen += indices.tolist()
    assert sorted(seen) == list(range(12))


def test_train_loader_normalisation_and_augmentation(records: list[Record]) -> None:
    loader = build_train_loader(
        records, 16, 8, batch_size=4, num_instances=2, num_workers=0, flip_prob=1.0
    )
    images, _, _, indices = next(iter(loader))
    for image, idx in zip(images, indices.tolist(), strict=True):
        decoded = Image.open(records[idx].path).convert("RGB")
        torch.testing.assert_close(image, _normalised(decoded).flip(-1), atol=1e-6, rtol=0)


def _run_epochs(records: list[Record], num_workers: int, seed: int) -> list[list[torch.Tensor]]:
    loader = build_train_loader(
        records, 16, 8, batch_size=4, num_instances=2, num_workers=num_workers, seed=seed, pad=2
    )
    epochs = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        epochs.append([torch.cat([b[0].flatten(), b[3].float()]) for b in loader])
    return epochs


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def test_train_loader_deterministic_with_seed(records: list[Record]) -> None:
    torch.manual_seed(123)
    first = _run_epochs(records, num_workers=0, seed=5)
    global_after = torch.rand(1)
    torch.manual_seed(999)  # the global generator must not matter
    second = _run_epochs(records, num_workers=0, seed=5)
    assert _same(first, second)
    assert not _same([first[0]], [first[1]])
    assert not _same(first, _run_epochs(records, num_workers=0, seed=6))
    # Augmentation ran on a forked, per-sample-seeded generator, not the global one.
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), global_after)


def _augmenting_loader(records: list[Record], num_workers: int) -> DataLoader:
    """Random flip and pad/crop both active, so any change of augmentation shows."""
    return build_train_loader(
        records,
        16,
        8,
        batch_size=4,
        num_instances=2,
        num_workers=num_workers,
        seed=3,
        flip_prob=0.5,
        pad=2,
    )


def _epoch(loader: DataLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images [N, 3, H, W] and indices [N] of one epoch, in batch order."""
    loader.sampler.set_epoch(epoch)
    batches = _collect(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[3] for b in batches])


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_batches_depend_only_on_seed_and_epoch(
    records: list[Record], num_workers: int
) -> None:
    # Reference: a fresh single-process loader jumping straight to epoch 1 (a resumed run).
    torch.manual_seed(0)
    ref_images, ref_indices = _epoch(_augmenting_loader(records, 0), 1)
    # The augmentation is really active: some images differ from their plain eval view.
    plain = build_transforms(16, 8, is_train=False)
    unaugmented = torch.stack([plain(read_rgb(records[i].path)) for i in ref_indices.tolist()])
    assert not torch.equal(ref_images, unaugmented)

    # An uninterrupted run: the (persistent, when num_workers > 0) workers already ran
    # epoch 0, and the global generator is in another state.
    loader = _augmenting_loader(records, num_workers)
    torch.manual_seed(1)
    _epoch(loader, 0)
    torch.manual_seed(2)
    images, indices = _epoch(loader, 1)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(images, ref_images)

    # A fresh loader with this worker count resumed at epoch 1 sees the same batches.
    torch.manual_seed(3)
    images, indices = _epoch(_augmenting_loader(records, num_workers), 1)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(images, ref_images)


def test_epochs_differ_in_augmentation_of_the_same_index(records: list[Record]) -> None:
    loader = _augmenting_loader(records, 0)
    views: dict[int, list[torch.Tensor]] = {}
    for epoch in range(2):
        images, indices = _epoch(loader, epoch)
        for image, idx in zip(images, indices.tolist(), strict=True):
            views.setdefault(idx, []).append(image)
    # Indices drawn in both epochs (each epoch drops some partial chunks).
    both = [v for v in views.values() if len(v) == 2]
    assert len(both) >= 4
    assert any(not torch.equal(a, b) for a, b in both)


def test_dataset_augmentation_is_keyed_not_stateful(records: list[Record]) -> None:
    transform = build_transforms(16, 8, is_train=True, flip_prob=0.5, pad=2)
    dataset = ImageDataset(records, transform, seed=4)
    # The same key gives the same image whatever was loaded in between.
    first = dataset[EpochIndex(5, epoch=2, position=7)][0]
    for i in range(len(records)):
        dataset[i]
    assert torch.equal(dataset[EpochIndex(5, epoch=2, position=7)][0], first)
    assert torch.equal(dataset[3][0], dataset[3][0])
    # Changing the epoch, the position (an index repeated within one epoch) or the seed
    # changes the draw: over 12 keys a flip/25-crop augmentation cannot stay constant.
    by_epoch = [dataset[EpochIndex(5, e, 7)][0] for e in range(12)]
    by_position = [dataset[EpochIndex(5, 2, p)][0] for p in range(12)]
    by_seed = [ImageDataset(records, transform, seed=s)[EpochIndex(5, 2, 7)][0] for s in range(12)]
    for views in (by_epoch, by_position, by_seed):
        assert any(not torch.equal(v, views[0]) for v in views[1:])
    # The returned index is a plain, non-negative int whatever the key.
    for key in (EpochIndex(5, 2, 7), 5, -7):
        index = dataset[key][3]
        assert type(index) is int and index == 5
    with pytest.raises(IndexError):
        dataset[12]
    with pytest.raises(ValueError, match="ImageDataset: seed must be >= 0, got -1"):
        ImageDataset(records, transform, seed=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_global_rng_untouched(
    records: list[Record], num_workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.manual_seed would also reseed CUDA generators, which fork_rng(devices=[]) does not
    # restore; the per-sample seeding must stay on the CPU generator.
    loader = _augmenting_loader(records, num_workers)
    torch.manual_seed(77)
    state = torch.get_rng_state()
    cuda_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    for epoch in range(2):
        _epoch(loader, epoch)
    assert torch.equal(torch.get_rng_state(), state)
    assert cuda_seeds == []


def test_test_loader_keeps_order_and_last_batch(records: list[Record]) -> None:
    loader = build_test_loader(records, 16, 8, batch_size=5, num_workers=0)
    batches = _collect(loader)
    assert [len(b[3]) for b in batches] == [5, 5, 2]
    indices = torch.cat([b[3] for b in batches])
    assert indices.tolist() == list(range(12))
    pids = torch.cat([b[1] for b in batches])
    assert pids.tolist() == [r.pid for r in records]
    first = Image.open(records[0].path).convert("RGB")
    torch.testing.assert_close(batches[0][0][0], _normalised(first), atol=1e-6, rtol=0)


def test_loader_argument_errors(records: list[Record]) -> None:
    with pytest.raises(ValueError, match="build_train_loader: records is empty"):
        build_train_loader([], 16, 8)
    with pytest.raises(ValueError, match="build_test_loader: num_workers must be >= 0, got -1"):
        build_test_loader(records, 16, 8, num_workers=-1)
    with pytest.raises(ValueError, match="needs 4 identities per batch, but the data has only 3"):
        build_train_loader(records, 16, 8, batch_size=8, num_instances=2, num_workers=0)
