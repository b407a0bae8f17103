"""Writers of tiny benchmark trees with the real file naming and list formats.

Each writer creates the benchmark under ``parent`` (using its official archive folder name
unless told otherwise) and returns the benchmark folder. Images are valid 8x16 JPEGs (the image
reader refuses anything under 8 pixels a side) so other tests can also feed the trees to the
image pipeline. The exact contents are documented next to
each writer because tests assert the resulting counts.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable
from pathlib import Path


@functools.cache
def _jpeg_bytes() -> bytes:
    """Bytes of one 8x16 (width x height) grey JPEG, encoded once."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 16), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_images(folder: Path, names: Iterable[str]) -> None:
    """Write a tiny JPEG at ``folder / name`` for each name, creating folders as needed."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg_bytes())


def write_market1501(parent: Path, folder_name: str = "Market-1501-v15.09.15") -> Path:
    """Market-1501 tree.

    train: pids 2, 7, 10 with two images each (cameras c1,c2 / c3,c6 / c1,c5) -> 3 ids, 6 images.
    query: pids 1 (c1) and 3 (c2) -> 2 ids, 2 images.
    gallery: pid 1 (c2, c1), pid 3 (c4), distractors 0000 (c1, c3), junk -1 (c1, c5)
    -> without junk 3 ids / 5 images, with junk 4 ids / 7 images. Thumbs.db in two folders.
    """
    base = parent / folder_name
    write_images(
        base / "bounding_box_train",
        [
            "0002_c1s1_000451_03.jpg",
            "0002_c2s1_000301_01.jpg",
            "0007_c3s3_077419_03.jpg",
            "0007_c6s4_002202_01.jpg",
            "0010_c1s1_001051_02.jpg",
            "0010_c5s1_013276_01.jpg",
        ],
    )
    write_images(base / "query", ["0001_c1s1_001051_00.jpg", "0003_c2s1_000226_00.jpg"])
    write_images(
        base / "bounding_box_test",
        [
            "0001_c2s1_000301_02.jpg",
            "0001_c1s1_001101_01.jpg",
            "0003_c4s2_018230_04.jpg",
            "0000_c1s1_000151_01.jpg",
            "0000_c3s1_081467_04.jpg",
            "-1_c1s1_000401_03.jpg",
            "-1_c5s1_000200_02.jpg",
        ],
    )
    (base / "bounding_box_train" / "Thumbs.db").write_bytes(b"\0")
    (base / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    return base


def write_dukemtmc(parent: Path, folder_name: str = "DukeMTMC-reID") -> Path:
    """DukeMTMC-reID tree.

    train: pids 1 (c2, c6), 5 (c1, c3, c3), 8 (c8) -> 3 ids, 6 images.
    query: pids 2 (c1), 4 (c5) -> 2 ids, 2 images.
    gallery: pids 2 (c2), 4 (c6, c7), 9 (c7, gallery-only distractor) -> 3 ids, 4 images.
    """
    base = parent / folder_name
    write_images(
        base / "bounding_box_train",
        [
            "0001_c2_f0046182.jpg",
            "0001_c6_f0061200.jpg",
            "0005_c1_f0044440.jpg",
            "0005_c3_f0068970.jpg",
            "0005_c3_f0069001.jpg",
            "0008_c8_f0170000.jpg",
        ],
    )
    write_images(base / "query", ["0002_c1_f0043019.jpg", "0004_c5_f0102384.jpg"])
    write_images(
        base / "bounding_box_test",
        [
            "0002_c2_f0044990.jpg",
            "0004_c6_f0110032.jpg",
            "0004_c7_f0120011.jpg",
            "0009_c7_f0140200.jpg",
        ],
    )
    return base


# MSMT17 lists: (relative path, pid). Cameras are the third field of the names (1-based).
MSMT_TRAIN = [
    ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
    ("0000/0000_001_05_0303morning_0036_1.jpg", 0),
    ("0001/0001_000_12_0303noon_0120_0.jpg", 1),
]
MSMT_VAL = [
    ("0001/0001_002_15_0303afternoon_0400_1.jpg", 1),
    ("0002/0002_000_03_0303morning_0500_0.jpg", 2),
]
MSMT_QUERY = [
    ("0000/0000_000_07_0303morning_0100_0.jpg", 0),
    ("0001/0001_000_02_0303noon_0200_0.jpg", 1),
]
MSMT_GALLERY = [
    ("0000/0000_001_09_0303morning_0101_0.jpg", 0),
    ("0000/0000_002_07_0303noon_0102_1.jpg", 0),
    ("0001/0001_001_14_0303afternoon_0201_0.jpg", 1),
    ("0002/0002_000_04_0303morning_0300_0.jpg", 2),
]


def write_msmt17(parent: Path, version: str = "V1", folder_name: str | None = None) -> Path:
    """MSMT17 tree, V1 (train/, test/) or V2 (mask_train_v2/, mask_test_v2/), in MSMT17_{version}.

    train list: pids 0 (2 images), 1 (1); val list: pids 1, 2 -> train+val 3 ids / 5 images,
    train alone 2 ids / 3 images. query: pids 0, 1 (2 images); gallery: pids 0 (2), 1, 2
    -> 3 ids / 4 images. Test pids restart at 0 as in the real lists.
    """
    if version not in ("V1", "V2"):
        raise ValueError(f"version must be V1 or V2, got {version!r}")
    base = parent / (folder_name or f"MSMT17_{version}")
    train_dir, test_dir = (
        ("train", "test") if version == "V1" else ("mask_train_v2", "mask_test_v2")
    )
    for list_name, folder, rows in [
        ("list_train.txt", train_dir, MSMT_TRAIN),
        ("list_val.txt", train_dir, MSMT_VAL),
        ("list_query.txt", test_dir, MSMT_QUERY),
        ("list_gallery.txt", test_dir, MSMT_GALLERY),
    ]:
        write_images(base / folder, [rel for rel, _ in rows])
        base.mkdir(parents=True, exist_ok=True)
        (base / list_name).write_text("".join(f"{rel} {pid}\n" for rel, pid in rows))
    return base


VERI_TRAIN = [
    "0001_c001_00016450_0.jpg",
    "0001_c002_00017100_0.jpg",
    "0001_c002_00017200_1.jpg",
    "0004_c010_00070000_0.jpg",
    "0004_c020_00071000_0.jpg",
]
VERI_QUERY = ["0002_c002_00030600_0.jpg", "0005_c011_00086500_1.jpg"]
VERI_TEST = ["0002_c003_00030800_0.jpg", "0002_c002_00030600_0.jpg", "0005_c015_00090000_0.jpg"]


def write_veri776(parent: Path, with_name_lists: bool = True, folder_name: str = "VeRi") -> Path:
    """VeRi-776 tree; ``with_name_lists`` also writes name_train/query/test.txt.

    train: pids 1 (c001, c002 x2), 4 (c010, c020) -> 2 ids, 5 images.
    query: pids 2 (c002), 5 (c011) -> 2 ids, 2 images.
    test (gallery): pid 2 (c003, c002), 5 (c015) -> 2 ids, 3 images.
    """
    base = parent / folder_name
    for folder, list_name, names in [
        ("image_train", "name_train.txt", VERI_TRAIN),
        ("image_query", "name_query.txt", VERI_QUERY),
        ("image_test", "name_test.txt", VERI_TEST),
    ]:
        write_images(base / folder, names)
        if with_name_lists:
            (base / list_name).write_text("".join(f"{name}\n" for name in names))
    return base


# VehicleID lists: (image_id, vehicle_id). Vehicles 0003 (train) and 0005, 0008 (test) have a
# single image.
VEHICLEID_TRAIN = [
    ("0000001", "0001"),
    ("0000002", "0001"),
    ("0000010", "0003"),
    ("0000020", "0004"),
    ("0000021", "0004"),
]
VEHICLEID_TEST_800 = [
    ("0004198", "0002"),
    ("0004199", "0002"),
    ("0004200", "0002"),
    ("0005000", "0005"),
    ("0006000", "0006"),
    ("0006001", "0006"),
]
VEHICLEID_TEST_1600 = VEHICLEID_TEST_800 + [("0007000", "0007"), ("0007001", "0007")]
VEHICLEID_TEST_2400 = VEHICLEID_TEST_1600 + [("0008000", "0008")]


def write_vehicleid(parent: Path, folder_name: str = "VehicleID_V1.0") -> Path:
    """VehicleID tree: image/{image_id}.jpg and train_test_split/ lists ``image_id vehicle_id``.

    train: 3 vehicles / 5 images; test_list_800: 3 vehicles / 6 images; test_list_1600:
    4 / 8; test_list_2400: 5 / 9.
    """
    base = parent / folder_name
    rows = VEHICLEID_TRAIN + VEHICLEID_TEST_2400
    write_images(base / "image", [f"{image_id}.jpg" for image_id, _ in rows])
    split = base / "train_test_split"
    split.mkdir(parents=True)
    for list_name, lines in [
        ("train_list.txt", VEHICLEID_TRAIN),
        ("test_list_800.txt", VEHICLEID_TEST_800),
        ("test_list_1600.txt", VEHICLEID_TEST_1600),
        ("test_list_2400.txt", VEHICLEID_TEST_2400),
    ]:
        (split / list_name).write_text("".join(f"{image_id} {vid}\n" for image_id, vid in lines))
    return base


def write_custom_folders(parent: Path, split_layout: bool, folder_name: str = "mydata") -> Path:
    """Custom identity-folder tree with camera numbers in the names (``..._cam{n}_...``).

    Flat (``split_layout=False``): alice (cam1, cam2), bob (cam2), 10 (cam1), 2 (cam3, nested
    in a sub-folder) -> 4 identities, 6 images, all training.
    Split: train alice (2) and bob (1); query carol (cam1); gallery carol (cam2), dave (cam1).
    """
    base = parent / folder_name
    if split_layout:
        write_images(
            base / "train", ["alice/a_cam1_001.jpg", "alice/a_cam2_002.jpg", "bob/b_cam2_001.png"]
        )
        write_images(base / "query", ["carol/c_cam1_001.jpg"])
        write_images(base / "gallery", ["carol/c_cam2_002.jpg", "dave/d_cam1_001.jpeg"])
    else:
        write_images(
            base,
            [
                "alice/a_cam1_001.jpg",
                "alice/a_cam2_002.jpg",
                "bob/b_cam2_001.png",
                "10/x_cam1_001.jpg",
                "2/day1/y_cam3_001.jpg",
                "2/day1/y_cam3_002.jpg",
            ],
        )
        (base / "alice" / "Thumbs.db").write_bytes(b"\0")
    return base


def write_custom_csv(parent: Path, header: bool, name: str = "data.csv") -> Path:
    """Custom CSV with relative and absolute paths, with or without a header.

    train (split omitted or "train"): pids 5 (2 images, cams 0 and 1), 9 (1) -> 2 ids, 3 images.
    query: pid 5 cam 2; gallery: pid 5 cam 3, pid -1 (junk) cam 0, pid 7 cam 1.
    """
    write_images(parent / "imgs", [f"{i}.jpg" for i in range(7)])
    absolute = parent / "imgs" / "6.jpg"
    lines = [
        "imgs/0.jpg,5,0",
        "imgs/1.jpg,5,1,train",
        "imgs/2.jpg,9,0,",
        "imgs/3.jpg,5,2,query",
        "imgs/4.jpg,5,3,gallery",
        "imgs/5.jpg,-1,0,gallery",
        f"{absolute},7,1,gallery",
    ]
    if header:
        lines.insert(0, "path,pid,camid,split")
    csv_path = parent / name
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def break_image(path: Path, how: str = "empty") -> Path:
    """Make the image at ``path`` unreadable, as interrupted copies and downloads leave them.

    ``how``: ``"empty"`` (a 0-byte file) or ``"truncated"`` (the first half of a valid JPEG,
    so the header parses and decoding fails). Returns ``path``.
    """
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        data = _jpeg_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        raise ValueError(f"break_image: how must be 'empty' or 'truncated', got {how!r}")
    return path
