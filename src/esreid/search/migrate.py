"""Moving an index's gallery to another backend (``esreid index migrate``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from esreid.search.index import GalleryIndex

#: Items copied per batch (descriptors of one batch in memory at a time from the new side).
MIGRATE_BATCH = 4096
#: Stored descriptors searched in both indexes afterwards, as a check.
CHECK_QUERIES = 8


def migrate(source: GalleryIndex, kind: str, out: str | os.PathLike, replace: bool = False,
            **settings: Any) -> GalleryIndex:
    """A copy of ``source`` searched by backend ``kind`` (with ``settings``), saved to
    ``out``: the same model, metric, threshold, model path and creation time, every item
    with its id, label, camera and capture time, in the same order. Paths relative to the
    old file's folder stay relative when ``out`` is in the same folder and become absolute
    otherwise. Afterwards a few stored descriptors are searched in both, and a difference
    raises RuntimeError (the new file is then not written)."""
    out = Path(os.path.expandvars(os.fspath(out))).expanduser().absolute()
    new = GalleryIndex.create(source.model_id, source.metric, source.dim, kind,
                              replace=replace, **settings)
    new.set_threshold(source.threshold, source.threshold_source)
    new.model_path, new.created = source.model_path, source.created
    same_folder = source.source is not None and source.source.parent == out.parent
    items = source.backend.all_items()
    features = source.features
    for start in range(0, len(items), MIGRATE_BATCH):
        chunk = items[start:start + MIGRATE_BATCH]
        paths = [it.path if same_folder else source.resolve_path(it.path) for it in chunk]
        new.add(features[start:start + len(chunk)], paths, [it.label for it in chunk],
                model_id=source.model_id, cameras=[it.camera for it in chunk],
                times=[it.time for it in chunk], ids=[it.id for it in chunk])
    if new.count != source.count:
        raise RuntimeError(f"migrating {source.source}: {source.count} items, but the new "
                           f"index holds {new.count} (duplicate ids?)")
    if source.count:
        picks = np.linspace(0, source.count - 1, min(CHECK_QUERIES, source.count)).astype(int)
        q = features[picks]
        k = min(10, source.count)
        a, b = source.search_arrays(q, k), new.search_arrays(q, k)
        if source.backend.exact and new.backend.exact and not (
                np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
            raise RuntimeError(f"migrating {source.source}: the {kind} index ranks stored "
                               "descriptors differently from the old one; nothing was written")
    new.source = source.source if same_folder else None
    new.save(out)
    return new
