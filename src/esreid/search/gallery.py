"""Building a gallery index from a folder of images: finding the images, their identity
labels (sub-folder names or a CSV), embedding them, and the verification threshold an
evaluation's results file recommends."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from esreid.search.index import (
    DEFAULT_KIND,
    DEFAULT_WAIT_SECONDS,
    GalleryIndex,
    IndexMismatchError,
    update_index_file,
)
from esreid.search.items import check_camera, parse_time

logger = logging.getLogger("esreid")

#: File name endings (compared case-insensitively) taken as images without looking inside.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff",
                              ".gif", ".ppm", ".pgm"})


class Embedder(Protocol):
    """What building an index needs of a model (:class:`esreid.inference.ReIDModel` is one)."""

    identity: str
    metric: str

    @property
    def descriptor_dim(self) -> int:
        """Length of a descriptor."""
        ...

    def embed_files(self, paths: Sequence[str | os.PathLike], progress: bool | None = None
                    ) -> tuple[Any, list[str], list[tuple[str, str]]]:
        """``(features [M, D], embedded paths, [(path, reason)] of unreadable ones)``."""
        ...


def _folder(path: str | os.PathLike) -> Path:
    folder = Path(os.path.expandvars(os.fspath(path))).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    return folder


@dataclass
class ImageScan:
    """What :func:`scan_images` found under a folder: the ``images`` (sorted) and the
    ``skipped`` files with the reason, ``(path, reason)``: dangling symbolic links, and files
    that are neither named nor shaped like an image."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _looks_like_an_image(path: Path) -> bool:
    """Whether Pillow recognises the file's header (reads a few bytes, decodes nothing)."""
    try:
        with Image.open(path) as probe:
            return bool(probe.format)
    except Exception:  # any file at all may be probed: every failure means "not an image"
        return False


def scan_images(folder: str | os.PathLike) -> ImageScan:
    """Every image file under ``folder``, recursively, sorted by path components, and the
    files left out with their reason.

    A file whose name ends in one of :data:`IMAGE_EXTENSIONS` (any case) is an image
    (decoding problems are found when it is read); any other file, without an extension
    too, is an image when its header is one Pillow knows. Names may hold spaces or any
    Unicode. Symbolic links to files are followed; a dangling link is reported, never taken
    silently; links to folders are not followed (they could make a cycle). A sub-folder
    that cannot be read is logged and skipped.
    """
    root = _folder(folder)

    def unreadable(err: OSError) -> None:
        logger.warning("skipping unreadable folder %s: %s", err.filename, err.strerror)

    scan = ImageScan()
    for dirpath, _, filenames in os.walk(root, onerror=unreadable):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.exists():
                target = os.readlink(path) if path.is_symlink() else "?"
                scan.skipped.append((str(path), f"dangling symbolic link to {target}"))
                continue
            if not path.is_file():
                scan.skipped.append((str(path), "not a regular file"))
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS or _looks_like_an_image(path):
                scan.images.append(path)
            else:
                scan.skipped.append((str(path), "not an image file"))
    scan.images.sort(key=lambda p: p.relative_to(root).parts)
    scan.skipped.sort()
    return scan


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The images :func:`scan_images` finds under ``folder`` (without the skipped files)."""
    return scan_images(folder).images


def labels_from_folders(paths: Iterable[str | os.PathLike], root: str | os.PathLike
                        ) -> list[str | None]:
    """Each image's label: its folder relative to ``root`` ("alice", or "cam1/alice" deeper
    down, always with "/"), or None for images directly in ``root``."""
    root_path = Path(root)
    labels = []
    for p in paths:
        try:
            rel = Path(p).parent.relative_to(root_path)
        except ValueError as exc:
            raise ValueError(f"image {p} is not under {root_path}") from exc
        labels.append(rel.as_posix() if rel.parts else None)
    return labels


def labels_from_csv(csv_path: str | os.PathLike) -> dict[str, str]:
    """``{path: label}`` from a CSV with a header row naming columns ``path`` and ``label``
    (others are ignored). Paths are as written (relative ones are relative to the image
    folder). Raises ValueError naming the CSV, the line and the problem: a missing column,
    a row with too few fields, an empty path or label, one path given two labels."""
    path = Path(os.path.expandvars(os.fspath(csv_path))).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV not found: {path}")
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty file; expected a header row 'path,label'")
            names = [h.strip().lower() for h in header]
            missing = [c for c in ("path", "label") if c not in names]
            if missing:
                raise ValueError(f"{path} line 1: the header lacks column(s) "
                                 f"{', '.join(missing)}; expected a header row 'path,label', "
                                 f"got {','.join(header)!r}")
            col_path, col_label = names.index("path"), names.index("label")
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) <= max(col_path, col_label):
                    raise ValueError(f"{path} line {line}: {len(row)} field(s), expected at "
                                     f"least {max(col_path, col_label) + 1} (path,label)")
                image, label = row[col_path].strip(), row[col_label].strip()
                if not image:
                    raise ValueError(f"{path} line {line}: empty path")
                if not label:
                    raise ValueError(f"{path} line {line}: empty label for {image!r}")
                if image in labels and labels[image] != label:
                    raise ValueError(f"{path} line {line}: {image!r} is labelled {label!r} "
                                     f"but line {first_line[image]} labels it {labels[image]!r}")
                labels.setdefault(image, label)
                first_line.setdefault(image, line)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from exc
    return labels


def fields_from_csv(csv_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{path: {"camera": ..., "time": ...}}`` from the optional ``camera`` and ``time``
    columns of a labels CSV (see :func:`labels_from_csv`; a time is ISO 8601 or seconds since
    the epoch, an empty cell is none); ``{}`` when it has neither column. ValueError naming
    the CSV, the line and the field for a time that cannot be read."""
    path = Path(os.path.expandvars(os.fspath(csv_path))).expanduser()
    out: dict[str, dict[str, Any]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        names = [h.strip().lower() for h in next(reader, None) or []]
        if "camera" not in names and "time" not in names:
            return {}
        col_path = names.index("path")
        cols = {name: names.index(name) for name in ("camera", "time") if name in names}
        for row in reader:
            if not row or all(not cell.strip() for cell in row) or len(row) <= col_path:
                continue
            fields: dict[str, Any] = {}
            for name, col in cols.items():
                cell = row[col].strip() if col < len(row) else ""
                where = f"{path} line {reader.line_num}, {name}"
                fields[name] = (parse_time(cell, where) if name == "time"
                                else check_camera(cell or None, where))
            out[row[col_path].strip()] = fields
    return out


@dataclass
class Fields:
    """Labels, cameras and capture times of some images (None where unknown; ``cameras``
    None altogether: from the file names)."""

    labels: list[str | None]
    cameras: list[str | None] | None
    times: list[float | None] | None


def _match_csv(table: dict[str, Any], images: list[Path], folder: Path,
               labels_csv: str | os.PathLike) -> dict[str, Any]:
    """The CSV's rows by image path (as listed), refusing rows naming no image."""
    by_path = {os.path.normpath(p): p for p in map(str, images)}
    found: dict[str, Any] = {}
    unknown = []
    for name, value in table.items():
        key = os.path.normpath(name if os.path.isabs(name) else os.path.join(folder, name))
        if key in by_path:
            found[by_path[key]] = value
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise ValueError(f"{labels_csv}: {len(unknown)} image(s) not found under {folder}: "
                         f"{shown}")
    return found


def _fields_for(images: list[Path], folder: Path, labels_csv: str | os.PathLike | None
                ) -> Fields:
    """Labels of ``images`` from the CSV (images it does not name get None) or folders, and
    cameras and times from the CSV's camera and time columns when it has them."""
    if labels_csv is None:
        return Fields(labels_from_folders(images, folder), None, None)
    labels = _match_csv(labels_from_csv(labels_csv), images, folder, labels_csv)
    extras = _match_csv(fields_from_csv(labels_csv), images, folder, labels_csv)
    cameras = times = None
    if extras:
        first = next(iter(extras.values()))
        if "camera" in first:
            cameras = [extras.get(str(p), {}).get("camera") for p in images]
        if "time" in first:
            times = [extras.get(str(p), {}).get("time") for p in images]
    return Fields([labels.get(str(p)) for p in images], cameras, times)


def _check_model(index: GalleryIndex, model: Embedder) -> None:
    index.check_model(model.identity, "the new images")
    if model.metric != index.metric or int(model.descriptor_dim) != index.dim:
        raise IndexMismatchError(
            f"{index._where()} holds {index.dim}-d {index.metric} descriptors, but the model "
            f"makes {model.descriptor_dim}-d {model.metric} ones")


@dataclass
class Embedded:
    """Descriptors of some images, ready to be added to an index (see :func:`embed_images`)."""

    features: Any
    paths: list[str]
    labels: list[str | None]
    failed: list[tuple[str, str]]
    cameras: list[str | None] | None = None
    times: list[float | None] | None = None

    def subset(self, keep: list[int]) -> Embedded:
        """The rows ``keep`` only."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in keep]

        return Embedded(self.features[keep], [self.paths[i] for i in keep],
                        [self.labels[i] for i in keep], self.failed, pick(self.cameras),
                        pick(self.times))

    def add_to(self, index: GalleryIndex, model_id: str) -> int:
        """Add these rows to ``index``; returns how many were new."""
        return index.add(self.features, self.paths, self.labels, model_id=model_id,
                         cameras=self.cameras, times=self.times)


def embed_images(model: Embedder, images: list[Path], labels: list[str | None] | Fields,
                 progress: bool) -> Embedded:
    """Embed ``images``; those that cannot be read are returned in ``failed`` (each once,
    with its reason; reporting them is the caller's job). ``labels`` may be a
    :class:`Fields` with cameras and times too."""
    fields = labels if isinstance(labels, Fields) else Fields(list(labels), None, None)
    features, kept, failed = model.embed_files(images, progress=progress)
    where = {str(p): i for i, p in enumerate(images)}
    rows = [where[str(p)] for p in kept]

    def pick(values: list | None) -> list | None:
        return None if values is None else [values[i] for i in rows]

    return Embedded(features, [str(p) for p in kept], pick(fields.labels), list(failed),
                    pick(fields.cameras), pick(fields.times))


def _embed_into(index: GalleryIndex, model: Embedder, images: list[Path],
                fields: Fields, progress: bool) -> list[tuple[str, str]]:
    done = embed_images(model, images, fields, progress)
    done.add_to(index, model.identity)
    return done.failed


def build_index(model: Embedder, images_dir: str | os.PathLike,
                labels_csv: str | os.PathLike | None = None, kind: str = DEFAULT_KIND,
                threshold: float | None = None, threshold_source: dict[str, Any] | None = None,
                progress: bool = True, replace: bool = False, embedded: Embedded | None = None,
                **settings: Any) -> tuple[GalleryIndex, list[tuple[str, str]]]:
    """Embed every image under ``images_dir`` (see :func:`list_images`) with ``model`` into
    a new index; returns ``(index, failed)``, ``failed`` listing ``(path, reason)`` for the
    images that could not be read (skipped, never fatal).

    ``failed`` also lists the files under the folder that were left out without being read
    (dangling links, files that are not images; see :func:`scan_images`). Paths are stored
    absolute. Labels come from ``labels_csv`` (see :func:`labels_from_csv`; its optional
    ``camera`` and ``time`` columns give those, else cameras come from dataset-style file
    names) or else from sub-folder names (:func:`labels_from_folders`). ``settings``
    configure the backend (``nlist``, ``nprobe`` for ivf; ``store``, ``collection`` for
    qdrant; ``replace`` lets it empty an existing collection). ``embedded``: descriptors
    already made (a sharded build), used instead of embedding.
    """
    folder = _folder(images_dir).absolute()
    scan = scan_images(folder)
    if not scan.images:
        raise ValueError(f"no images found under {folder} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case, and any file "
                         "an image format recognises)")
    fields = _fields_for(scan.images, folder, labels_csv)
    done = embedded if embedded is not None else embed_images(model, scan.images, fields,
                                                              progress)
    index = GalleryIndex.create(model.identity, model.metric, int(model.descriptor_dim), kind,
                                replace=replace, **settings)
    index.set_threshold(threshold, threshold_source)
    done.add_to(index, model.identity)
    return index, scan.skipped + done.failed


def _new_images(index: GalleryIndex, images_dir: str | os.PathLike,
                labels_csv: str | os.PathLike | None) -> tuple[list[Path], Fields,
                                                             list[tuple[str, str]]]:
    """The images under ``images_dir`` that ``index`` does not hold, their fields, and the
    files skipped by the scan."""
    folder = _folder(images_dir).absolute()
    scan = scan_images(folder)
    fields = _fields_for(scan.images, folder, labels_csv)
    held = _held_paths(index)
    keep = [i for i, p in enumerate(scan.images) if os.path.normpath(p) not in held]
    if len(keep) < len(scan.images):
        logger.info("%d image(s) under %s are already in the index",
                    len(scan.images) - len(keep), folder)

    def pick(values: list | None) -> list | None:
        return None if values is None else [values[i] for i in keep]

    return ([scan.images[i] for i in keep],
            Fields(pick(fields.labels), pick(fields.cameras), pick(fields.times)), scan.skipped)


def _held_paths(index: GalleryIndex) -> set[str]:
    return {os.path.normpath(index.resolve_path(p)) for p in index.paths}


def add_to_index(index: GalleryIndex, model: Embedder, images_dir: str | os.PathLike,
                 labels_csv: str | os.PathLike | None = None, progress: bool = True
                 ) -> list[tuple[str, str]]:
    """Embed the images under ``images_dir`` that ``index`` does not hold yet and add them
    (in memory); returns the ``(path, reason)`` of the files left out (unreadable images,
    dangling links, non-images). The model must be the one that built the index
    (:class:`IndexMismatchError` otherwise). :func:`add_to_index_file` does the same to an
    index file that other processes may be writing."""
    _check_model(index, model)
    images, fields, skipped = _new_images(index, images_dir, labels_csv)
    if not images:
        return skipped
    return skipped + _embed_into(index, model, images, fields, progress)


def add_to_index_file(path: str | os.PathLike | GalleryIndex, model: Embedder,
                      images_dir: str | os.PathLike,
                      labels_csv: str | os.PathLike | None = None, progress: bool = True,
                      timeout: float | None = DEFAULT_WAIT_SECONDS,
                      on_wait: Callable[[str], None] | None = None
                      ) -> tuple[GalleryIndex, int, list[tuple[str, str]]]:
    """Add the images under ``images_dir`` to the index file at ``path``, safely while other
    processes (another ``esreid index add``, ``esreid serve``) write it too.

    The images the file does not hold are embedded first, without the lock; then, holding
    the index's lock, the file is read as it is now, the images another writer added
    meanwhile are dropped, the rest is added and the file saved (see
    :func:`esreid.search.update_index_file`; ``timeout`` and ``on_wait`` are its). ``path``
    may also be an index just loaded from the file, which then is not read again unless
    another process changed it. Returns ``(index as saved, images added, files left out
    with their reason)``.
    """
    snapshot = path if isinstance(path, GalleryIndex) else GalleryIndex.load(path)
    if snapshot.source is None:
        raise ValueError("add_to_index_file needs an index that was loaded from a file")
    path = snapshot.source
    _check_model(snapshot, model)
    images, fields, skipped = _new_images(snapshot, images_dir, labels_csv)
    done = embed_images(model, images, fields, progress) if images else None

    def add(index: GalleryIndex) -> int:
        _check_model(index, model)  # the file may have been rebuilt by another model
        if done is None or not done.paths:
            return 0
        held = _held_paths(index)
        keep = [i for i, p in enumerate(done.paths) if os.path.normpath(p) not in held]
        # Ids (content and path) make the addition idempotent for the rest as well.
        return done.subset(keep).add_to(index, model.identity) if keep else 0

    if done is None or not done.paths:
        return snapshot, 0, skipped + (done.failed if done else [])
    index, added = update_index_file(path, add, base=snapshot, timeout=timeout, on_wait=on_wait)
    return index, added, skipped + done.failed


#: The results file a run folder holds (esreid.metrics.report.RESULTS_NAME; not imported
#: from there because esreid.metrics loads torch).
RESULTS_NAME = "results.json"


def _results_file(path: str | os.PathLike) -> Path:
    given = Path(os.path.expandvars(os.fspath(path))).expanduser()
    if given.is_dir():
        target = given / RESULTS_NAME
        if not target.is_file():
            raise FileNotFoundError(f"no {RESULTS_NAME} in run folder {given}")
        return target
    if not given.is_file():
        raise FileNotFoundError(f"results file not found: {given}")
    return given


def _read_results(where: Path) -> dict[str, Any]:
    try:
        results = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: malformed JSON ({exc.msg} at line {exc.lineno}, column "
                         f"{exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not a UTF-8 text file ({exc.reason})") from exc
    if not isinstance(results, dict):
        raise ValueError(f"{where}: not an esreid results file (a JSON object is expected)")
    return results


def threshold_from_results(path: str | os.PathLike, fpr: float, metric: str
                           ) -> tuple[float, dict[str, Any]]:
    """The verification threshold at false-positive rate ``fpr`` from an esreid results
    file (or a run folder holding ``results.json``): ``(threshold, source)`` where
    ``source`` is ``{"fpr", "tpr", "from", "run", "dataset"}``.

    Raises ValueError naming the file when it has no verification section (re-run
    ``esreid evaluate``), when its distance metric is not ``metric``, when its thresholds
    are for re-ranked distances, or when no entry has this fpr (the message lists those
    available).
    """
    where = _results_file(path)
    results = _read_results(where)
    entries = results.get("verification")
    if not entries:
        raise ValueError(f"{where}: no verification section (thresholds at fixed false-positive "
                         "rates); re-run `esreid evaluate` on this run to compute them")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{where}: 'verification' must be a list of "
                         "{\"fpr\", \"tpr\", \"threshold\"} objects")
    used = results.get("metric")
    if used is None:
        raise ValueError(f"{where}: does not say which distance metric its thresholds use; "
                         "re-run `esreid evaluate` to rewrite it")
    if used != metric:
        raise ValueError(f"{where}: its thresholds are {used} distances but the index uses "
                         f"{metric}; evaluate with eval.metric={metric}")
    if results.get("rerank"):
        raise ValueError(f"{where}: its thresholds are for re-ranked distances, which index "
                         "search does not use; take them from the results without re-ranking")
    fpr = float(fpr)
    available = []
    for entry in entries:
        value = entry.get("fpr")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{where}: verification entry {entry!r} has no numeric fpr")
        available.append(value)
        if math.isclose(value, fpr, rel_tol=1e-9, abs_tol=0.0):
            threshold = entry.get("threshold")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                    or not math.isfinite(threshold):
                raise ValueError(f"{where}: the threshold at fpr {value:g} is {threshold!r}, "
                                 "not a finite number")
            source = {"fpr": value, "tpr": entry.get("tpr"), "from": str(where),
                      "run": results.get("run"), "dataset": results.get("dataset")}
            return float(threshold), source
    listed = ", ".join(f"{v:g}" for v in available)
    raise ValueError(f"{where}: no verification threshold at fpr {fpr:g}; available: {listed}")
