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

Exact search (the default ``kind="numpy"``, ``"flat"``, ``"qdrant"``) ranks exactly as
evaluation does; see :mod:`.index` for stored paths and how several processes share one
index file, :mod:`.fileformat` for the file, :mod:`.backends` for the search backends (one
module each, by name), :mod:`.exact` for how a float32 scan's results are made exact and
:mod:`.items` for item ids and search filters. ``add_to_index_file`` adds a folder to an
index file safely while other processes write it too.
"""

from esreid.search.backends import UnknownKindError, backend_class, kinds, register
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
    DEFAULT_KIND,
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
from esreid.search.items import Item, SearchFilter, item_id, parse_time

__all__ = [
    "DEFAULT_KIND", "DEFAULT_WAIT_SECONDS", "FORMAT_VERSION", "IMAGE_EXTENSIONS", "KINDS",
    "GalleryIndex", "ImageScan", "IndexFileError", "IndexMismatchError", "Item", "Match",
    "SearchFilter", "UnknownKindError", "add_to_index", "add_to_index_file", "backend_class",
    "build_index", "embed_images", "file_signature", "index_lock", "item_id", "kinds",
    "labels_from_csv", "labels_from_folders", "list_images", "parse_time", "recall_at_k",
    "register", "scan_images", "threshold_from_results", "update_index_file",
]
