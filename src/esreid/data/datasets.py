"""Loaders for the paper's re-ID benchmarks and for custom data, all returning ``ReIDData``.

Each benchmark has one small loader function; they share the helpers below for finding the
benchmark folder, parsing file names and list files, relabelling training identities and
comparing split sizes with the published statistics. ``load_dataset`` is the one entry point
that dispatches on a benchmark name. Loaders only look at file names: images are never opened.
"""

from __future__ import annotations

import csv
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from esreid.data.records import Record, ReIDData

logger = logging.getLogger("esreid.data")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
VEHICLEID_TEST_SIZES = (800, 1600, 2400)
SPLITS = ("train", "query", "gallery")

# (identities, images) per split as published with each benchmark. Market's gallery counts the
# distractor id 0; with junk kept, -1 counts as one more identity. VehicleID's test counts are
# those of the released list files, which differ slightly from the numbers in its paper.
PUBLISHED_STATS: dict[str, dict[str, tuple[int, int]]] = {
    "market1501": {
        "train": (751, 12_936),
        "query": (750, 3_368),
        "gallery": (751, 15_913),
        "gallery_with_junk": (752, 19_732),
    },
    "dukemtmc": {"train": (702, 16_522), "query": (702, 2_228), "gallery": (1_110, 17_661)},
    "msmt17": {
        "train": (1_041, 32_621),
        "train_without_val": (1_041, 30_248),
        "query": (3_060, 11_659),
        "gallery": (3_060, 82_161),
    },
    "veri776": {"train": (576, 37_778), "query": (200, 1_678), "gallery": (200, 11_579)},
    "vehicleid": {
        "train": (13_164, 113_346),
        "test_800": (800, 6_493),
        "test_1600": (1_600, 13_377),
        "test_2400": (2_400, 19_777),
    },
}

# A parsed image before relabelling: path, identity as written, 0-based camera.
Entry = tuple[Path, int, int]

_MARKET_NAMES = ("Market-1501-v15.09.15", "market1501", "Market-1501")
_MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
_DUKE_NAMES = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid")
_MSMT_NAMES = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17")
_MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
_VERI_NAMES = ("VeRi", "VeRi-776", "veri776", "VeRi_with_plate")
_VERI_FOLDERS = ("image_train", "image_query", "image_test")
_VEHICLEID_NAMES = ("VehicleID_V1.0", "VehicleID", "vehicleid")

_MARKET_RE = re.compile(r"(-1|\d+)_c(\d+)s\d+_\d+_\d+")
_DUKE_RE = re.compile(r"(\d+)_c(\d+)_f\d+")
_MSMT_RE = re.compile(r"\d+_\d+_(\d+)_.+")
_VERI_RE = re.compile(r"(\d+)_c(\d+)_\d+_\d+")
_INT_RE = re.compile(r"-?\d+", re.ASCII)


# --------------------------------------------------------------------------- shared helpers


def _expand(root: str | os.PathLike[str]) -> Path:
    """Turn a user-given root (str or Path, ``~`` allowed) into a Path."""
    return Path(os.path.expanduser(os.fspath(root)))


def _find_benchmark(
    root: Path, aliases: Sequence[str], markers: Sequence[str], title: str, layout: str
) -> Path:
    """Return the benchmark folder: ``root`` itself or its sub-folder with an archive name.

    ``root`` is the benchmark folder when it holds any of ``markers``; otherwise the first
    sub-folder whose name matches one of ``aliases`` (case-insensitively) is taken, so that a
    half-extracted archive still gets an error naming the exact missing piece inside it.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"{title}: dataset root '{root}' does not exist or is not a folder")
    if any((root / marker).exists() for marker in markers):
        return root
    children = {child.name.lower(): child for child in sorted(root.iterdir()) if child.is_dir()}
    for alias in aliases:
        if alias.lower() in children:
            return children[alias.lower()]
    raise FileNotFoundError(
        f"{title} not found in '{root}': expected {layout} either directly in it or in a "
        f"sub-folder named one of {', '.join(aliases)}"
    )


def _require(path: Path, title: str, layout: str) -> Path:
    """Return ``path`` if it exists (a list file for ``.txt``, else a folder), else raise
    FileNotFoundError naming it and the expected layout."""
    is_list = path.suffix == ".txt"
    if not (path.is_file() if is_list else path.is_dir()):
        kind = "list file" if is_list else "folder"
        raise FileNotFoundError(f"{title}: missing {kind} '{path}'; expected layout: {layout}")
    return path


def _is_image(path: Path) -> bool:
    """True for file names with an image suffix (.jpg, .jpeg, .png, any case)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def _list_images(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name; other files are ignored."""
    # scandir's entry types avoid one stat call per file on 100k-image folders.
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file() and _is_image(Path(e.name))]
    return [folder / name for name in sorted(names)]


def _match_name(path: Path, pattern: re.Pattern[str], expected: str) -> re.Match[str]:
    """Match ``pattern`` against the file's stem, or raise ValueError naming the file."""
    match = pattern.fullmatch(path.stem)
    if match is None:
        raise ValueError(f"cannot parse file name '{path}': expected {expected}")
    return match


def _camera(value: str, path: Path) -> int:
    """Convert a 1-based camera number from a file name into a 0-based camid."""
    cam = int(value) - 1
    if cam < 0:
        raise ValueError(
            f"camera number {value} in '{path}' is invalid: cameras are numbered from 1"
        )
    return cam


def _read_list(list_path: Path, fields: int, fmt: str) -> list[tuple[int, list[str]]]:
    """Read a whitespace-separated list file into (line number, fields), skipping blank lines.

    Raises ValueError naming the file and line when a line has the wrong number of fields.
    """
    rows = []
    with open(list_path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != fields:
                raise ValueError(
                    f"{list_path}, line {lineno}: expected '{fmt}', got {line.strip()!r}"
                )
            rows.append((lineno, parts))
    return rows


def _list_int(value: str, list_path: Path, lineno: int, what: str) -> int:
    """Parse an integer field of a list file, or raise ValueError naming file and line."""
    if _INT_RE.fullmatch(value) is None:
        raise ValueError(f"{list_path}, line {lineno}: {what} {value!r} is not an integer")
    return int(value)


def _listed_image(folder: Path, name: str, list_path: Path, lineno: int) -> Path:
    """Resolve a file named in a list; raise if it is missing or not an image file."""
    path = folder / name
    if not _is_image(path):
        raise ValueError(f"{list_path}, line {lineno}: '{name}' is not a .jpg/.jpeg/.png image")
    if not path.is_file():
        raise FileNotFoundError(f"{list_path}, line {lineno}: listed image '{path}' does not exist")
    return path


def _relabel(entries: Iterable[Entry]) -> list[Record]:
    """Records with identities relabelled 0..N-1 in sorted order of the original ids."""
    entries = list(entries)
    new_id = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in entries}))}
    return [Record(str(path), new_id[pid], cam, orig_pid=pid) for path, pid, cam in entries]


def _keep_ids(entries: Iterable[Entry]) -> list[Record]:
    """Records that keep the original identities (query and gallery splits)."""
    return [Record(str(path), pid, cam, orig_pid=pid) for path, pid, cam in entries]


def _counts(records: Sequence[Record]) -> tuple[int, int, int]:
    """(identities, images, cameras) of one split."""
    return len({r.pid for r in records}), len(records), len({r.camid for r in records})


def _outside_stacklevel() -> int:
    """The warnings stacklevel of the first caller outside this module (the user's call)."""
    frame, level = inspect.currentframe(), 0
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _check_stats(
    dataset: str, found: dict[str, Sequence[Record]], published: dict[str, tuple[int, int]]
) -> None:
    """Warn (UserWarning) per split whose identity/image counts differ from the published ones."""
    for split, (ids, images) in published.items():
        got_ids, got_images, _ = _counts(found[split])
        if (got_ids, got_images) != (ids, images):
            warnings.warn(
                f"{dataset} {split}: found {got_ids:,} identities / {got_images:,} images, "
                f"published {ids:,} / {images:,} (incomplete or modified copy? set "
                f"data.check_stats=false in the config, or pass check_stats=False to "
                f"load_dataset to silence)",
                UserWarning,
                stacklevel=_outside_stacklevel(),
            )


def _finish(data: ReIDData) -> ReIDData:
    """Log the summary table of a freshly loaded dataset and return it."""
    logger.info("loaded dataset\n%s", format_summary(data))
    return data


def format_summary(data: ReIDData) -> str:
    """Return a small text table of identities, images and cameras per split of ``data``.

    VehicleID's full test set (``extra["test"]``) gets its own row; images dropped at load
    time (``extra["dropped_junk"]``) are reported below the table.
    """
    rows = [("train", data.train), ("query", data.query), ("gallery", data.gallery)]
    if "test" in data.extra:
        rows.append(("test", data.extra["test"]))
    lines = [
        f"{data.name} (protocol: {data.protocol})",
        f"  {'split':<8} {'identities':>10} {'images':>8} {'cameras':>8}",
    ]
    for split, records in rows:
        ids, images, cams = _counts(records)
        lines.append(f"  {split:<8} {ids:>10,} {images:>8,} {cams:>8,}")
    dropped = {split: n for split, n in data.extra.get("dropped_junk", {}).items() if n}
    if dropped:
        parts = ", ".join(f"{split} {n:,}" for split, n in dropped.items())
        lines.append(f"  dropped junk images (pid -1): {parts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- Market-1501 layout


def _assemble(
    name: str,
    train: Sequence[Entry],
    query: Sequence[Entry],
    gallery: Sequence[Entry],
    published: dict[str, tuple[int, int]] | None,
    extra: dict | None = None,
) -> ReIDData:
    """Market-protocol ReIDData from parsed entries: relabel train, keep test ids, compare
    the split sizes with ``published`` (when given) and log the summary."""
    data = ReIDData(
        name=name,
        train=_relabel(train),
        query=_keep_ids(query),
        gallery=_keep_ids(gallery),
        protocol="market",
        extra=extra or {},
    )
    if published is not None:
        _check_stats(
            name, {"train": data.train, "query": data.query, "gallery": data.gallery}, published
        )
    return _finish(data)


def _scan_folder(folder: Path, pattern: re.Pattern[str], expected: str) -> list[Entry]:
    """Parse every image of a flat folder whose names start ``{pid}_c{cam}``."""
    entries = []
    for path in _list_images(folder):
        match = _match_name(path, pattern, expected)
        entries.append((path, int(match.group(1)), _camera(match.group(2), path)))
    return entries


def _load_market_layout(
    root: Path,
    *,
    name: str,
    aliases: Sequence[str],
    keep_junk: bool,
    published: dict[str, tuple[int, int]] | None,
) -> ReIDData:
    """Load a Market-1501-style tree (train, query, gallery folders of parseable names).

    Junk (pid -1) is dropped from train and query, and from the gallery unless ``keep_junk``;
    the distractor id 0 is only valid in the gallery.
    """
    title = "Market-1501" if name == "market1501" else name
    layout = "bounding_box_train/, query/ and bounding_box_test/ with images named like 0002_c1s1_000451_03.jpg"
    base = _find_benchmark(root, aliases, _MARKET_FOLDERS, title, layout)
    expected = "{pid}_c{camera}s{sequence}_{frame}_{index}.jpg, e.g. 0002_c1s1_000451_03.jpg"
    splits: dict[str, list[Entry]] = {}
    for split, folder in zip(SPLITS, _MARKET_FOLDERS, strict=True):
        splits[split] = _scan_folder(_require(base / folder, title, layout), _MARKET_RE, expected)

    dropped = {}
    for split, entries in splits.items():
        for path, pid, _ in entries:
            if pid == 0 and split != "gallery":
                raise ValueError(
                    f"distractor image '{path}' (pid 0000) found in the {split} split: "
                    f"distractors are only valid in bounding_box_test/"
                )
        keep = split == "gallery" and keep_junk
        dropped[split] = 0 if keep else sum(1 for _, pid, _ in entries if pid == -1)
        if not keep:
            splits[split] = [e for e in entries if e[1] != -1]

    return _assemble(name, splits["train"], splits["query"], splits["gallery"], published,
                     extra={"dropped_junk": dropped})


def load_market1501(
    root: str | os.PathLike[str], *, keep_junk: bool = False, check_stats: bool = True
) -> ReIDData:
    """Load Market-1501 from ``root`` (the benchmark folder or its parent); returns ReIDData.

    Junk images (pid -1) are dropped from every split unless ``keep_junk`` keeps them in the
    gallery (where the evaluator ignores them); distractors (pid 0) stay in the gallery as
    negatives. ``check_stats`` warns when split sizes differ from the published ones.
    """
    stats = PUBLISHED_STATS["market1501"]
    published = {
        "train": stats["train"],
        "query": stats["query"],
        "gallery": stats["gallery_with_junk" if keep_junk else "gallery"],
    }
    return _load_market_layout(
        _expand(root),
        name="market1501",
        aliases=_MARKET_NAMES,
        keep_junk=keep_junk,
        published=published if check_stats else None,
    )


def load_synthetic(root: str | os.PathLike[str], *, keep_junk: bool = False) -> ReIDData:
    """Load the embedded synthetic benchmark (Market-1501 layout and names) from ``root``.

    ``root`` is the generated folder itself, or its parent holding it as ``synthetic`` or under
    a Market-1501 archive name. There are no published statistics to compare with.
    """
    return _load_market_layout(
        _expand(root),
        name="synthetic",
        aliases=("synthetic", *_MARKET_NAMES),
        keep_junk=keep_junk,
        published=None,
    )


def load_dukemtmc(root: str | os.PathLike[str], *, check_stats: bool = True) -> ReIDData:
    """Load DukeMTMC-reID from ``root`` (the benchmark folder or its parent); returns ReIDData.

    Same folders as Market-1501 with names like ``0001_c2_f0046182.jpg``; gallery-only
    identities are the benchmark's distractors and keep their ids.
    """
    title = "DukeMTMC-reID"
    layout = "bounding_box_train/, query/ and bounding_box_test/ with images named like 0001_c2_f0046182.jpg"
    base = _find_benchmark(_expand(root), _DUKE_NAMES, _MARKET_FOLDERS, title, layout)
    expected = "{pid}_c{camera}_f{frame}.jpg, e.g. 0001_c2_f0046182.jpg"
    entries = {
        split: _scan_folder(_require(base / folder, title, layout), _DUKE_RE, expected)
        for split, folder in zip(SPLITS, _MARKET_FOLDERS, strict=True)
    }
    published = PUBLISHED_STATS["dukemtmc"] if check_stats else None
    return _assemble("dukemtmc", entries["train"], entries["query"], entries["gallery"], published)


# --------------------------------------------------------------------------- list-file benchmarks


def _msmt_list(list_path: Path, folder: Path) -> list[Entry]:
    """Read an MSMT17 list (``relative/path.jpg pid``); cameras come from the file names."""
    entries = []
    expected = "{pid}_{index}_{camera}_{date}{time}_{frame}_{n}.jpg, e.g. 0000_000_01_0303morning_0015_0.jpg"
    for lineno, (rel, pid) in _read_list(list_path, 2, "relative/path.jpg pid"):
        path = _listed_image(folder, rel, list_path, lineno)
        match = _match_name(path, _MSMT_RE, expected)
        entries.append(
            (path, _list_int(pid, list_path, lineno, "pid"), _camera(match.group(1), path))
        )
    return entries


def load_msmt17(
    root: str | os.PathLike[str], *, combine_val: bool = True, check_stats: bool = True
) -> ReIDData:
    """Load MSMT17 (V1 ``train/ test/`` or V2 ``mask_train_v2/ mask_test_v2/``); returns ReIDData.

    Splits come from ``list_{train,val,query,gallery}.txt``; ``combine_val`` merges the
    validation list into training, the standard protocol. Pids are those of the lists.
    """
    title = "MSMT17"
    layout = (
        "train/ and test/ (V1) or mask_train_v2/ and mask_test_v2/ (V2), plus "
        "list_train.txt, list_val.txt, list_query.txt and list_gallery.txt"
    )
    markers = ("list_train.txt", "train", "test", "mask_train_v2", "mask_test_v2")
    base = _find_benchmark(_expand(root), _MSMT_NAMES, markers, title, layout)
    is_v2 = (base / "mask_train_v2").is_dir() or (base / "mask_test_v2").is_dir()
    train_dir, test_dir = ("mask_train_v2", "mask_test_v2") if is_v2 else ("train", "test")
    train_folder = _require(base / train_dir, title, layout)
    test_folder = _require(base / test_dir, title, layout)
    lists = {name: _require(base / name, title, layout) for name in _MSMT_LISTS}

    train = _msmt_list(lists["list_train.txt"], train_folder)
    if combine_val:
        train += _msmt_list(lists["list_val.txt"], train_folder)
    published = None
    if check_stats:
        stats = PUBLISHED_STATS["msmt17"]
        published = {
            "train": stats["train" if combine_val else "train_without_val"],
            "query": stats["query"],
            "gallery": stats["gallery"],
        }
    return _assemble(
        "msmt17",
        train,
        _msmt_list(lists["list_query.txt"], test_folder),
        _msmt_list(lists["list_gallery.txt"], test_folder),
        published,
        extra={"version": "V2" if is_v2 else "V1"},
    )


def _veri_split(base: Path, folder: str, list_name: str, title: str, layout: str) -> list[Entry]:
    """One VeRi split: the files named in ``name_*.txt`` if present, else the folder's images."""
    image_folder = _require(base / folder, title, layout)
    list_path = base / list_name
    expected = "{pid}_c{camera}_{timestamp}_{n}.jpg, e.g. 0001_c001_00016450_0.jpg"
    if not list_path.is_file():
        return _scan_folder(image_folder, _VERI_RE, expected)
    entries = []
    for lineno, (name,) in _read_list(list_path, 1, "file name"):
        path = _listed_image(image_folder, name, list_path, lineno)
        match = _match_name(path, _VERI_RE, expected)
        entries.append((path, int(match.group(1)), _camera(match.group(2), path)))
    return entries


def load_veri776(root: str | os.PathLike[str], *, check_stats: bool = True) -> ReIDData:
    """Load VeRi-776 from ``root`` (the benchmark folder or its parent); returns ReIDData.

    ``image_train/``, ``image_query/`` and ``image_test/`` (the gallery) hold images named like
    ``0001_c001_00016450_0.jpg``; ``name_train.txt``/``name_query.txt``/``name_test.txt``, where
    present, are the authoritative file lists. Evaluated with the Market protocol.
    """
    title = "VeRi-776"
    layout = (
        "image_train/, image_query/ and image_test/ with images named like "
        "0001_c001_00016450_0.jpg, optionally name_train.txt, name_query.txt, name_test.txt"
    )
    base = _find_benchmark(
        _expand(root), _VERI_NAMES, (*_VERI_FOLDERS, "name_train.txt"), title, layout
    )
    lists = ("name_train.txt", "name_query.txt", "name_test.txt")
    entries = {
        split: _veri_split(base, folder, list_name, title, layout)
        for split, folder, list_name in zip(SPLITS, _VERI_FOLDERS, lists, strict=True)
    }
    published = PUBLISHED_STATS["veri776"] if check_stats else None
    return _assemble("veri776", entries["train"], entries["query"], entries["gallery"], published)


def _vehicleid_list(list_path: Path, image_folder: Path) -> list[Entry]:
    """Read a VehicleID split list (``image_id vehicle_id``) into entries with camera 0."""
    entries = []
    for lineno, (image_id, vehicle_id) in _read_list(list_path, 2, "image_id vehicle_id"):
        path = _listed_image(image_folder, f"{image_id}.jpg", list_path, lineno)
        entries.append((path, _list_int(vehicle_id, list_path, lineno, "vehicle_id"), 0))
    return entries


def load_vehicleid(
    root: str | os.PathLike[str], *, test_size: int = 800, seed: int = 0, check_stats: bool = True
) -> ReIDData:
    """Load VehicleID with the test list of ``test_size`` vehicles (800, 1600 or 2400).

    ``query``/``gallery`` hold draw ``seed`` of the protocol (one gallery image per vehicle,
    the rest queries); ``extra["test"]`` holds the whole test list so other draws can be made.
    All cameras are 0; the protocol is "vehicleid".
    """
    if test_size not in VEHICLEID_TEST_SIZES:
        raise ValueError(f"VehicleID test_size must be one of 800, 1600, 2400, got {test_size!r}")
    # Imported here so that esreid.data stays importable without the metrics package's deps.
    import numpy as np

    from esreid.metrics.vehicleid import vehicleid_draw

    title = "VehicleID"
    layout = (
        f"image/ with {{image_id}}.jpg and train_test_split/ holding train_list.txt and "
        f"test_list_{test_size}.txt (lines 'image_id vehicle_id')"
    )
    base = _find_benchmark(
        _expand(root), _VEHICLEID_NAMES, ("image", "train_test_split"), title, layout
    )
    image_folder = _require(base / "image", title, layout)
    split_folder = _require(base / "train_test_split", title, layout)
    train = _vehicleid_list(_require(split_folder / "train_list.txt", title, layout), image_folder)
    test_list = _require(split_folder / f"test_list_{test_size}.txt", title, layout)
    test = _keep_ids(_vehicleid_list(test_list, image_folder))

    in_gallery = vehicleid_draw(np.array([r.pid for r in test], dtype=np.int64), seed)
    data = ReIDData(
        name="vehicleid",
        train=_relabel(train),
        query=[r for r, g in zip(test, in_gallery, strict=True) if not g],
        gallery=[r for r, g in zip(test, in_gallery, strict=True) if g],
        protocol="vehicleid",
        extra={"test": test, "test_size": test_size, "seed": seed},
    )
    if check_stats:
        stats = PUBLISHED_STATS["vehicleid"]
        _check_stats(
            "vehicleid",
            {"train": data.train, "test": test},
            {"train": stats["train"], "test": stats[f"test_{test_size}"]},
        )
    return _finish(data)


# --------------------------------------------------------------------------- custom data


def _natural_key(name: str) -> tuple[int, int, str]:
    """Sort key putting integer-like names first, in numeric order, then the rest by string."""
    return (0, int(name), name) if _INT_RE.fullmatch(name) else (1, 0, name)


def _identity_folders(folder: Path) -> list[tuple[str, Path]]:
    """(identity name, image path) for images under each identity sub-folder of ``folder``.

    Images may sit in nested folders inside an identity folder; an image directly in
    ``folder`` has no identity and is an error. Hidden folders are skipped.
    """
    items = []
    for child in sorted(folder.iterdir()):
        if child.is_file() and _is_image(child):
            raise ValueError(f"image '{child}' is not inside an identity sub-folder of '{folder}'")
        if child.is_dir() and not child.name.startswith("."):
            items += [
                (child.name, p) for p in sorted(child.rglob("*")) if p.is_file() and _is_image(p)
            ]
    return items


def _custom_folder(root: Path, cam_pattern: str | None) -> ReIDData:
    """Load a folder of identity sub-folders, optionally split into train/, query/, gallery/."""
    pattern = None
    if cam_pattern is not None:
        try:
            pattern = re.compile(cam_pattern)
        except re.error as err:
            raise ValueError(
                f"cam_pattern '{cam_pattern}' is not a valid regular expression: {err}"
            ) from err
        if pattern.groups != 1:
            raise ValueError(
                f"cam_pattern '{cam_pattern}' must have exactly one group (the camera), "
                f"it has {pattern.groups}"
            )

    present = [split for split in SPLITS if (root / split).is_dir()]
    if present:
        for child in sorted(root.iterdir()):
            if child.is_file() and _is_image(child):
                raise ValueError(
                    f"image '{child}' is outside train/, query/ and gallery/ in '{root}'"
                )
            if child.is_dir() and child.name not in SPLITS and not child.name.startswith("."):
                raise ValueError(
                    f"unexpected folder '{child}': a custom dataset split into "
                    f"train/, query/ and gallery/ may hold nothing else"
                )
        raw = {
            split: _identity_folders(root / split) if split in present else [] for split in SPLITS
        }
    else:
        raw = {"train": _identity_folders(root), "query": [], "gallery": []}
    if not any(raw.values()):
        raise ValueError(
            f"no images found in '{root}': expected identity sub-folders of "
            f".jpg/.jpeg/.png images, directly or under train/, query/, gallery/"
        )

    def camera_name(path: Path) -> str:
        if pattern is None:
            return "0"
        match = pattern.search(path.name)
        if match is None or match.group(1) is None:
            raise ValueError(f"cam_pattern '{cam_pattern}' does not match file name '{path}'")
        return match.group(1)

    cameras = {split: [camera_name(path) for _, path in items] for split, items in raw.items()}
    id_names = sorted({name for items in raw.values() for name, _ in items}, key=_natural_key)
    cam_names = sorted({c for names in cameras.values() for c in names}, key=_natural_key)
    pid_of = {name: i for i, name in enumerate(id_names)}
    cam_of = {name: i for i, name in enumerate(cam_names)}
    entries = {
        split: [
            (path, pid_of[name], cam_of[cam])
            for (name, path), cam in zip(items, cameras[split], strict=True)
        ]
        for split, items in raw.items()
    }
    return ReIDData(
        name="custom",
        train=_relabel(entries["train"]),
        query=_keep_ids(entries["query"]),
        gallery=_keep_ids(entries["gallery"]),
        protocol="market",
        extra={"identity_names": id_names, "camera_names": cam_names},
    )


_CSV_FORMAT = "path,pid,camid[,split]"
_CSV_HEADERS = (["path", "pid", "camid"], ["path", "pid", "camid", "split"])


def _is_csv_header(cells: Sequence[str]) -> bool:
    """True when the first row of a custom CSV is a header: it names one of the columns, or
    has no integer at all (every data row has an integer pid and camid)."""
    names = {cell.lower() for cell in cells}
    if names & {"path", "pid", "camid", "split"}:
        return True
    return not any(_INT_RE.fullmatch(cell) for cell in cells)


def _check_csv_header(csv_path: Path, cells: Sequence[str]) -> None:
    """Raise ValueError (one line naming the file, the missing columns and the columns the
    header has) unless the header reads ``path,pid,camid[,split]``."""
    names = [cell.lower() for cell in cells]
    if names in _CSV_HEADERS:
        return
    has = ", ".join(cell or "(empty)" for cell in cells)
    missing = [name for name in _CSV_HEADERS[0] if name not in names]
    if missing:
        raise ValueError(
            f"{csv_path}: the header has no {', '.join(missing)} column"
            f"{'s' if len(missing) > 1 else ''}; its columns are {has} (expected {_CSV_FORMAT})"
        )
    raise ValueError(
        f"{csv_path}: the header's columns are {has}; expected exactly {_CSV_FORMAT}, "
        f"in this order"
    )


def _custom_csv(csv_path: Path) -> ReIDData:
    """Load a ``path,pid,camid[,split]`` CSV; relative paths are relative to its folder."""
    entries: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    first = True
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
        for lineno, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if first:
                first = False
                if _is_csv_header(cells):
                    _check_csv_header(csv_path, cells)
                    continue
            where = f"{csv_path}, line {lineno}"
            if len(cells) not in (3, 4):
                raise ValueError(
                    f"{where}: expected 'path,pid,camid[,split]', got {len(cells)} fields"
                )
            path_text, pid_text, cam_text = cells[:3]
            split = (cells[3] if len(cells) == 4 else "").lower() or "train"
            if split not in SPLITS:
                raise ValueError(f"{where}: split {cells[3]!r} must be train, query or gallery")
            if _INT_RE.fullmatch(pid_text) is None:
                raise ValueError(f"{where}: pid {pid_text!r} is not an integer")
            if _INT_RE.fullmatch(cam_text) is None or int(cam_text) < 0:
                raise ValueError(
                    f"{where}: camid {cam_text!r} is not a non-negative integer "
                    f"(a header row must read path,pid,camid[,split])"
                )
            pid = int(pid_text)
            if pid < 0 and split != "gallery":
                raise ValueError(f"{where}: pid {pid} (junk) is only valid in the gallery")
            path = csv_path.parent / os.path.expanduser(path_text)
            if not _is_image(path):
                raise ValueError(f"{where}: '{path_text}' is not a .jpg/.jpeg/.png image")
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image '{path}' does not exist")
            entries[split].append((path, pid, int(cam_text)))
    if not any(entries.values()):
        raise ValueError(f"{csv_path}: no rows; expected lines 'path,pid,camid[,split]'")
    return ReIDData(
        name="custom",
        train=_relabel(entries["train"]),
        query=_keep_ids(entries["query"]),
        gallery=_keep_ids(entries["gallery"]),
        protocol="market",
    )


def load_custom(root: str | os.PathLike[str], *, cam_pattern: str | None = None) -> ReIDData:
    """Load user data from a folder of identity sub-folders or from a CSV file.

    A folder holds one sub-folder per identity (all training), or ``train/``, ``query/`` and
    ``gallery/`` each holding identity sub-folders; identity names are numbered in sorted order
    (``extra["identity_names"][pid]`` gives the name back) and ``cam_pattern``, a regex with
    one group searched in each file name, gives the camera (default: camera 0 for all). A
    ``.csv`` file has lines ``path,pid,camid[,split]`` with an optional header.
    """
    path = _expand(root)
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise ValueError(f"custom dataset '{path}' is a file but not a .csv file")
        if cam_pattern is not None:
            raise ValueError(
                f"cam_pattern does not apply to the CSV file '{path}': its camid column "
                f"gives the cameras"
            )
        return _finish(_custom_csv(path))
    if not path.is_dir():
        raise FileNotFoundError(
            f"custom dataset '{path}' does not exist: give a folder of identity "
            f"sub-folders or a path,pid,camid[,split] CSV file"
        )
    return _finish(_custom_folder(path, cam_pattern))


# --------------------------------------------------------------------------- entry point


_LOADERS: dict[str, Callable[..., ReIDData]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "veri776": load_veri776,
    "vehicleid": load_vehicleid,
    "custom": load_custom,
    "synthetic": load_synthetic,
}

#: The dataset names :func:`load_dataset` accepts.
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike[str], **options: object) -> ReIDData:
    """Load benchmark ``name`` from ``root`` with the loader's keyword ``options``.

    Names: :data:`DATASET_NAMES` (market1501, dukemtmc, msmt17, veri776, vehicleid, custom,
    synthetic). Raises ValueError for an unknown name and TypeError for an option the loader
    does not take.
    """
    loaders = _LOADERS
    loader = loaders.get(name.lower())
    if loader is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(loaders)}")
    valid = [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name.lower()!r}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return loader(root, **options)
