"""Embedding a folder in shards, by one process or several (``torchrun``).

The images under a folder (:func:`esreid.search.scan_images`, sorted) are cut into shards of
``shard_size`` consecutive images (a multiple of the model's batch size, so every batch is
the one a single process would embed and the descriptors are the same). Under ``torchrun``
rank ``r`` of ``W`` embeds shards ``r, r + W, r + 2W, ...``: exact and disjoint, no image
twice, no padding. Each shard is written by the process that embedded it, atomically, to
``shard-NNNNN.npz`` in the output folder (descriptors float32 ``[n, D]``, the embedded paths,
labels, cameras, capture times, and the images that could not be read), beside
``manifest.json`` (the model, metric, dimension, shard size, the shards' names and image
counts, and a digest of the image list). A rerun skips the shards already written for the
same images and model, so an interrupted run goes on where it stopped. Read back in shard
order, the shards are exactly what one process embeds (:func:`read_shards`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esreid.search.gallery import Embedded, Embedder, Fields, _fields_for, _folder, embed_images
from esreid.search.gallery import scan_images as _scan

MANIFEST = "manifest.json"
FORMAT = "esreid-descriptor-shards"
#: Images per shard by default (rounded up to a multiple of the model's batch size).
DEFAULT_SHARD_SIZE = 1024


@dataclass
class ShardPlan:
    """Which images go into which shard, and which shards this process embeds."""

    folder: Path
    images: list[Path]
    fields: Fields
    skipped: list[tuple[str, str]]
    shard_size: int
    rank: int
    world_size: int

    @property
    def shards(self) -> int:
        """Number of shards."""
        return (len(self.images) + self.shard_size - 1) // self.shard_size

    def mine(self) -> list[int]:
        """The shards this process embeds."""
        return list(range(self.rank, self.shards, self.world_size))

    def span(self, shard: int) -> slice:
        """The images of ``shard``."""
        return slice(shard * self.shard_size, min((shard + 1) * self.shard_size,
                                                  len(self.images)))

    def digest(self) -> str:
        """SHA-256 of the image list (paths relative to the folder) and the shard size."""
        h = hashlib.sha256(f"{self.shard_size}\n".encode())
        for p in self.images:
            h.update(p.relative_to(self.folder).as_posix().encode() + b"\n")
        return h.hexdigest()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's ``RANK`` and
    ``WORLD_SIZE``; 0 and 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def plan(model: Embedder, images_dir: str | os.PathLike, labels_csv: str | os.PathLike | None,
         shard_size: int = DEFAULT_SHARD_SIZE, rank: int | None = None,
         world_size: int | None = None) -> ShardPlan:
    """The shards of the images under ``images_dir`` (see the module docstring)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size!r}")
    batch = max(1, int(getattr(model, "batch_size", 1)))
    shard_size = -(-shard_size // batch) * batch
    folder = _folder(images_dir).absolute()
    scan = _scan(folder)
    if not scan.images:
        raise ValueError(f"no images found under {folder}")
    r, w = rank_and_world()
    return ShardPlan(folder, scan.images, _fields_for(scan.images, folder, labels_csv),
                     scan.skipped, shard_size, r if rank is None else rank,
                     w if world_size is None else world_size)


def shard_name(shard: int) -> str:
    """The file of shard ``shard``."""
    return f"shard-{shard:05d}.npz"


def _manifest(p: ShardPlan, model: Embedder) -> dict[str, Any]:
    sizes = [p.span(s).stop - p.span(s).start for s in range(p.shards)]
    return {"format": FORMAT, "version": 1, "model_id": model.identity, "metric": model.metric,
            "dim": int(model.descriptor_dim), "folder": str(p.folder), "images": len(p.images),
            "shard_size": p.shard_size, "digest": p.digest(),
            "shards": [{"file": shard_name(s), "images": n} for s, n in enumerate(sizes)]}


def _atomic_bytes(path: Path, data: bytes) -> None:
    from esreid.utils import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _check_or_write_manifest(out: Path, want: dict[str, Any], rank: int) -> None:
    """The manifest of ``out``: written by rank 0 when absent; an existing one must describe
    the same images and model (otherwise the folder holds another run: refused)."""
    path = out / MANIFEST
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable shard manifest ({exc}); use another --out "
                             "or delete the folder") from exc
        for key in ("format", "model_id", "digest", "dim", "metric"):
            if have.get(key) != want[key]:
                raise ValueError(f"{path}: the folder holds shards of another run ({key} "
                                 f"{have.get(key)!r}, this run {want[key]!r}): use another "
                                 "--out, or delete the folder to embed again")
        return
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_bytes(path, json.dumps(want, indent=1).encode())


def _shard_done(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as z:
            return "features" in z.files and "meta" in z.files
    except (OSError, ValueError, EOFError):
        return False


def _write_shard(path: Path, done: Embedded) -> None:
    meta = {"paths": done.paths, "labels": done.labels, "cameras": done.cameras,
            "times": done.times, "failed": done.failed}
    buffer = io.BytesIO()
    np.savez(buffer, features=np.ascontiguousarray(done.features, dtype=np.float32),
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    _atomic_bytes(path, buffer.getvalue())


@dataclass
class ShardRun:
    """What :func:`embed_shards` did in this process: shards embedded, shards skipped (already
    written), images embedded and the seconds it took."""

    embedded: list[int]
    skipped: list[int]
    images: int
    seconds: float


def embed_shards(model: Embedder, p: ShardPlan, out: str | os.PathLike,
                 progress: bool = False) -> ShardRun:
    """Embed this process's shards of ``p`` into the folder ``out`` (see the module
    docstring); shards already there are skipped."""
    out = Path(os.path.expandvars(os.fspath(out))).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_manifest(out, _manifest(p, model), p.rank)
    t0 = time.perf_counter()
    run = ShardRun([], [], 0, 0.0)
    for shard in p.mine():
        path = out / shard_name(shard)
        if _shard_done(path):
            run.skipped.append(shard)
            continue
        span = p.span(shard)

        def pick(values: list | None, span: slice = span) -> list | None:
            return None if values is None else values[span]

        fields = Fields(p.fields.labels[span], pick(p.fields.cameras), pick(p.fields.times))
        done = embed_images(model, p.images[span], fields, progress)
        _write_shard(path, done)
        run.embedded.append(shard)
        run.images += len(done.paths)
    run.seconds = time.perf_counter() - t0
    return run


def read_shard(path: Path) -> Embedded:
    """One shard file as :class:`~esreid.search.gallery.Embedded` rows."""
    with np.load(path, allow_pickle=False) as z:
        features = z["features"]
        meta = json.loads(z["meta"].tobytes())
    return Embedded(features, meta["paths"], meta["labels"],
                    [tuple(f) for f in meta["failed"]], meta["cameras"], meta["times"])


def read_shards(out: str | os.PathLike) -> Iterator[Embedded]:
    """Every shard of the folder ``out``, in order (ValueError naming a missing one)."""
    out = Path(os.path.expandvars(os.fspath(out))).expanduser()
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not _shard_done(path):
            raise ValueError(f"{path}: shard missing or unreadable (run the embedding again "
                             "to finish it)")
        yield read_shard(path)


def join_shards(out: str | os.PathLike) -> Embedded:
    """All shards of ``out`` as one :class:`~esreid.search.gallery.Embedded` (in memory)."""
    parts = list(read_shards(out))
    if not parts:
        raise ValueError(f"{out}: no shards")

    def join(name: str) -> list | None:
        values = [getattr(part, name) for part in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    dim = parts[0].features.shape[1] if parts[0].features.ndim == 2 else 0
    features = np.concatenate([part.features.reshape(-1, dim) for part in parts])
    return Embedded(features, join("paths"), join("labels"),
                    [f for part in parts for f in part.failed], join("cameras"), join("times"))


def build_index_from_shards(model: Embedder, out: str | os.PathLike, kind: str,
                            threshold: float | None = None,
                            threshold_source: dict[str, Any] | None = None,
                            replace: bool = False, **settings: Any):
    """A new index of ``kind`` from the shard folder ``out``, added shard by shard in order
    (never all descriptors in memory for a backend that keeps them elsewhere); returns
    ``(index, failed)``."""
    from esreid.search.index import GalleryIndex

    index = GalleryIndex.create(model.identity, model.metric, int(model.descriptor_dim), kind,
                                replace=replace, **settings)
    index.set_threshold(threshold, threshold_source)
    failed: list[tuple[str, str]] = []
    for part in read_shards(out):
        if part.paths:
            part.add_to(index, model.identity)
        failed.extend(part.failed)
    return index, failed
