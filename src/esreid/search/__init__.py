"""Search a gallery of images with a trained model.

```python
from esreid import ReIDModel
from esreid.search import GalleryIndex, build_index

model = ReIDModel.from_checkpoint("runs/esnet/checkpoints/last.pt")
index, failed = build_index(model, "gallery/")       # sub-folder names become labels
index.save("gallery.esidx")
matches = GalleryIndex.load("gallery.esidx").search(model.embed("query.jpg"), top_k=5,
                                                    model_id=model.identity)
```

Exact search (``kind="flat"``) ranks exactly as evaluation does; see :mod:`.index` for the
file format, stored paths and how several processes share one index file, and :mod:`.exact`
for how faiss's float32 results are made exact. ``add_to_index_file`` adds a folder to an
index file safely while other processes write it too.
"""

from esreid.search.gallery import (
    IMAGE_EXTENSIONS,
    ImageScan,
    add_to_index,
    add_to_index_file,
    build_index,
    embed_images,
    labels_from_csv,
    labels_from_folders,
    list_images,
    scan_images,
    threshold_from_results,
)
from esreid.search.index import (
    DEFAULT_WAIT_SECONDS,
    FORMAT_VERSION,
    KINDS,
    GalleryIndex,
    IndexFileError,
    IndexMismatchError,
    Match,
    file_signature,
    index_lock,
    recall_at_k,
    update_index_file,
)

__all__ = [
    "DEFAULT_WAIT_SECONDS", "FORMAT_VERSION", "IMAGE_EXTENSIONS", "KINDS", "GalleryIndex",
    "ImageScan", "IndexFileError", "IndexMismatchError", "Match", "add_to_index",
    "add_to_index_file", "build_index", "embed_images", "file_signature", "index_lock",
    "labels_from_csv", "labels_from_folders", "list_images", "recall_at_k", "scan_images",
    "threshold_from_results", "update_index_file",
]
