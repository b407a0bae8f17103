"""The gallery index file: one zip archive, members stored uncompressed, written atomically.

Members, in this order: ``esreid-index.json`` (the metadata: ``{"format":
"esreid-gallery-index", "version", "model_id", "metric", "dim", "count", "kind",
"backend" (the backend's own settings, e.g. ``nlist``/``nprobe`` or Qdrant's ``store`` and
``collection``), "max_norm", "threshold", "threshold_source", "created", "updated",
"esreid_version", "model_path"}``), then, for the backends that keep their gallery in the
file, one JSON list per item field (``paths.json``, ``labels.json``, ``cameras.json``,
``times.json``, ``ids.json``), ``features.npy`` (float32 ``[count, dim]``) and whatever the
backend adds (``faiss.index`` for ivf). A backend that keeps its gallery elsewhere (Qdrant)
writes the metadata alone. The zip's CRC-32s catch damaged members.

Version 1 (before cameras, capture times, ids and ``backend``) is still read: its items have
no camera or time, and their ids are derived from path and descriptor when loaded.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "esreid-gallery-index"
FORMAT_VERSION = 2

META_MEMBER = "esreid-index.json"
PATHS_MEMBER = "paths.json"
LABELS_MEMBER = "labels.json"
CAMERAS_MEMBER = "cameras.json"
TIMES_MEMBER = "times.json"
IDS_MEMBER = "ids.json"
FEATURES_MEMBER = "features.npy"
_WRITE_BLOCK_BYTES = 64 << 20


class IndexFileError(ValueError):
    """A file that is not a gallery index, or a damaged one. One line naming the file."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def json_member(zf: zipfile.ZipFile, name: str) -> Any:
    """A JSON member of the archive; ValueError naming the member when it is not JSON."""
    try:
        return json.loads(zf.read(name))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: malformed JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name}: not UTF-8 ({exc.reason})") from exc


def write_features(f: Any, blocks: list[np.ndarray], count: int, dim: int) -> None:
    """Write float32 ``[count, dim]`` in ``.npy`` format to the binary stream ``f`` from the
    row blocks that make it up, without joining them."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (count, dim)}
    np.lib.format.write_array_header_1_0(f, header)
    for block in blocks:
        data = memoryview(np.ascontiguousarray(block, dtype="<f4")).cast("B")
        for start in range(0, len(data), _WRITE_BLOCK_BYTES):
            f.write(data[start:start + _WRITE_BLOCK_BYTES])


def read_features(zf: zipfile.ZipFile) -> np.ndarray:
    """The ``features.npy`` member (no pickles)."""
    with zf.open(FEATURES_MEMBER) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


#: A member the archive gets: its name and a function writing its bytes to a binary stream.
Member = tuple[str, Callable[[Any], None]]


def json_writer(value: Any) -> Callable[[Any], None]:
    """A member writer for a JSON value."""
    return lambda f: f.write(json.dumps(value, allow_nan=False).encode())


def write_archive(path: Path, meta: dict[str, Any], members: list[Member]) -> None:
    """Write the index file at ``path`` atomically: the metadata first (its local header then
    opens every index, which is how a damaged index is told from a foreign file)."""
    # Imported here: esreid.utils imports torch, which loading and searching never need.
    from esreid.utils import atomic_write

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(META_MEMBER, json.dumps(meta, indent=1, allow_nan=False))
            for name, writer in members:
                with zf.open(name, "w", force_zip64=True) as f:
                    writer(f)

    atomic_write(path, write)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the index file at ``path`` without reading anything else. Raises
    :class:`IndexFileError` for a file that is not an index, OSError when it cannot be read."""
    path = Path(os.path.expandvars(os.fspath(path))).expanduser()
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json_member(zf, META_MEMBER)
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as exc:
        raise IndexFileError(f"{path}: not a readable gallery index ({one_line(exc)})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise IndexFileError(f"{path}: not an esreid gallery index")
    return meta


def signature_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime) of a stat result: a save by another process renames a
    new file into place, which changes the inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_signature(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime) of the file at ``path``, or None when there is none."""
    try:
        return signature_of(os.stat(path))
    except OSError:
        return None
