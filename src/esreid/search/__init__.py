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
file format and :mod:`.exact` for how faiss's float32 results are made exact.
"""

from esreid.search.gallery import (
    IMAGE_EXTENSIONS,
    add_to_index,
    build_index,
    labels_from_csv,
    labels_from_folders,
    list_images,
    threshold_from_results,
)
from esreid.search.index import (
    FORMAT_VERSION,
    KINDS,
    GalleryIndex,
    IndexFileError,
    IndexMismatchError,
    Match,
    recall_at_k,
)

__all__ = [
    "FORMAT_VERSION", "IMAGE_EXTENSIONS", "KINDS", "GalleryIndex", "IndexFileError",
    "IndexMismatchError", "Match", "add_to_index", "build_index", "labels_from_csv",
    "labels_from_folders", "list_images", "recall_at_k", "threshold_from_results",
]
