"""Benchmark and custom-data loaders: counts, ids, cameras, layouts, statistics and errors."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from fixture_trees import (
    write_custom_csv,
    write_custom_folders,
    write_dukemtmc,
    write_images,
    write_market1501,
    write_msmt17,
    write_vehicleid,
    write_veri776,
)

from esreid.data import (
    Record,
    format_summary,
    load_custom,
    load_dataset,
    load_market1501,
    load_vehicleid,
)
from esreid.metrics.vehicleid import vehicleid_draw


def _names(records) -> list[str]:
    return [Path(r.path).name for r in records]


def _headlines(record) -> list[str]:
    """The statistics warnings' messages up to their parenthesised hint."""
    return [str(w.message).split(" (")[0] for w in record]


# --------------------------------------------------------------------------- Market-1501


def test_market_counts_relabelled_train_and_original_test_ids(tmp_path):
    write_market1501(tmp_path)
    data = load_dataset("market1501", tmp_path, check_stats=False)

    assert data.name == "market1501" and data.protocol == "market"
    assert [r.pid for r in data.train] == [0, 0, 1, 1, 2, 2]
    assert [r.orig_pid for r in data.train] == [2, 2, 7, 7, 10, 10]
    assert [r.camid for r in data.train] == [0, 1, 2, 5, 0, 4]  # c1 c2 c3 c6 c1 c5
    assert data.num_train_pids == 3
    assert [(r.pid, r.camid) for r in data.query] == [(1, 0), (3, 1)]
    assert all(r.orig_pid == r.pid for r in [*data.query, *data.gallery])
    # Junk (-1) dropped, distractors (0) kept as gallery negatives; Thumbs.db ignored.
    assert sorted(r.pid for r in data.gallery) == [0, 0, 1, 1, 3]
    assert data.extra["dropped_junk"] == {"train": 0, "query": 0, "gallery": 2}
    assert all(Path(r.path).is_file() and r.path.endswith(".jpg") for r in data.gallery)


def test_market_keep_junk_keeps_minus_one_in_gallery_only(tmp_path):
    base = write_market1501(tmp_path)
    write_images(base / "bounding_box_train", ["-1_c2s1_000100_01.jpg"])
    data = load_market1501(base, keep_junk=True, check_stats=False)

    assert sorted(r.pid for r in data.gallery) == [-1, -1, 0, 0, 1, 1, 3]
    assert [r.orig_pid for r in data.gallery if r.pid == -1] == [-1, -1]
    assert len(data.train) == 6  # junk never enters training
    assert data.extra["dropped_junk"] == {"train": 1, "query": 0, "gallery": 0}


def test_market_junk_in_train_is_dropped_and_reported(tmp_path):
    base = write_market1501(tmp_path)
    write_images(base / "bounding_box_train", ["-1_c2s1_000100_01.jpg", "-1_c3s1_000100_01.jpg"])
    data = load_market1501(base, check_stats=False)

    assert len(data.train) == 6
    assert "dropped junk images (pid -1): train 2, gallery 2" in format_summary(data)


def test_market_distractor_in_train_is_an_error(tmp_path):
    base = write_market1501(tmp_path)
    write_images(base / "bounding_box_train", ["0000_c1s1_000151_01.jpg"])
    bad = base / "bounding_box_train" / "0000_c1s1_000151_01.jpg"
    with pytest.raises(
        ValueError, match=re.escape(f"distractor image '{bad}' (pid 0000) found in the train split")
    ):
        load_market1501(base, check_stats=False)


def test_market_published_statistics_warn_per_split(tmp_path):
    write_market1501(tmp_path)
    with pytest.warns(UserWarning) as record:
        load_dataset("market1501", tmp_path)
    assert _headlines(record) == [
        "market1501 train: found 3 identities / 6 images, published 751 / 12,936",
        "market1501 query: found 2 identities / 2 images, published 750 / 3,368",
        "market1501 gallery: found 3 identities / 5 images, published 751 / 15,913",
    ]
    assert str(record[0].message).endswith("pass check_stats=False to load_dataset to silence)")

    with pytest.warns(UserWarning) as record:
        load_dataset("market1501", tmp_path, keep_junk=True)
    assert str(record[2].message).startswith(
        "market1501 gallery: found 4 identities / 7 images, published 752 / 19,732"
    )


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("market1501", write_market1501),
        ("dukemtmc", write_dukemtmc),
        ("msmt17", write_msmt17),
        ("veri776", write_veri776),
        ("vehicleid", write_vehicleid),
    ],
)
def test_the_option_the_statistics_warning_names_silences_it(tmp_path, name, write):
    write(tmp_path)
    with pytest.warns(UserWarning) as record:
        load_dataset(name, tmp_path)
    hint = re.search(r"pass (\w+)=(\w+) to load_dataset to silence\)$", str(record[0].message))
    assert "set data.check_stats=false in the config" in str(record[0].message)
    assert hint is not None, str(record[0].message)
    option = {hint.group(1): {"False": False, "True": True}[hint.group(2)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(name, tmp_path, **option)


@pytest.mark.parametrize(
    "folder_name", ["Market-1501-v15.09.15", "market1501", "Market-1501", "MARKET1501"]
)
def test_market_root_is_benchmark_folder_or_its_parent(tmp_path, folder_name):
    base = write_market1501(tmp_path, folder_name)
    from_parent = load_market1501(tmp_path, check_stats=False)
    from_base = load_market1501(str(base), check_stats=False)
    assert _names(from_parent.gallery) == _names(from_base.gallery)
    assert len(from_parent.train) == 6
    assert from_parent.train[0].path.startswith(str(base))


def test_root_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_market1501(tmp_path / "datasets")
    data = load_dataset("market1501", "~/datasets", check_stats=False)
    assert len(data.query) == 2
    assert data.query[0].path.startswith(str(tmp_path / "datasets" / "Market-1501-v15.09.15"))


def test_market_unparsable_name_names_the_file(tmp_path):
    base = write_market1501(tmp_path)
    write_images(base / "query", ["0001_c1_000451.jpg"])
    bad = base / "query" / "0001_c1_000451.jpg"
    with pytest.raises(ValueError, match=re.escape(f"cannot parse file name '{bad}'")):
        load_market1501(base, check_stats=False)


def test_market_camera_zero_is_an_error(tmp_path):
    base = write_market1501(tmp_path)
    write_images(base / "query", ["0001_c0s1_000451_00.jpg"])
    with pytest.raises(
        ValueError, match=r"camera number 0 in '.*0001_c0s1_000451_00\.jpg' is invalid"
    ):
        load_market1501(base, check_stats=False)


def test_market_missing_folder_names_the_path(tmp_path):
    base = write_market1501(tmp_path)
    shutil.rmtree(base / "query")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"Market-1501: missing folder '{base / 'query'}'")
    ):
        load_market1501(tmp_path, check_stats=False)


def test_missing_root_and_unrecognised_root(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"dataset root '{tmp_path / 'nope'}' does not exist")
    ):
        load_market1501(tmp_path / "nope")
    (tmp_path / "something_else").mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"Market-1501 not found in '{tmp_path}': expected bounding_box_train/, query/ and "
            f"bounding_box_test/"
        ),
    ) as err:
        load_market1501(tmp_path)
    assert "Market-1501-v15.09.15, market1501, Market-1501" in str(err.value)


def test_synthetic_uses_market_layout_without_statistics(tmp_path):
    write_market1501(tmp_path, "synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_dataset("synthetic", tmp_path)
    assert data.name == "synthetic" and data.protocol == "market"
    assert (len(data.train), len(data.query), len(data.gallery)) == (6, 2, 5)
    with pytest.raises(TypeError, match="check_stats"):
        load_dataset("synthetic", tmp_path, check_stats=False)


# --------------------------------------------------------------------------- DukeMTMC-reID


@pytest.mark.parametrize("folder_name", ["DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid"])
def test_duke_counts_cameras_and_layouts(tmp_path, folder_name):
    base = write_dukemtmc(tmp_path, folder_name)
    for root in (tmp_path, base):
        data = load_dataset("dukemtmc", root, check_stats=False)
        assert [r.pid for r in data.train] == [0, 0, 1, 1, 1, 2]
        assert [r.orig_pid for r in data.train] == [1, 1, 5, 5, 5, 8]
        assert [r.camid for r in data.train] == [1, 5, 0, 2, 2, 7]
        assert [(r.pid, r.camid) for r in data.query] == [(2, 0), (4, 4)]
        assert [(r.pid, r.camid) for r in data.gallery] == [(2, 1), (4, 5), (4, 6), (9, 6)]


def test_duke_statistics_warning_and_bad_name(tmp_path):
    base = write_dukemtmc(tmp_path)
    with pytest.warns(UserWarning) as record:
        load_dataset("dukemtmc", base)
    assert _headlines(record) == [
        "dukemtmc train: found 3 identities / 6 images, published 702 / 16,522",
        "dukemtmc query: found 2 identities / 2 images, published 702 / 2,228",
        "dukemtmc gallery: found 3 identities / 4 images, published 1,110 / 17,661",
    ]
    write_images(base / "bounding_box_test", ["0002_c2s1_000301_02.jpg"])
    with pytest.raises(
        ValueError,
        match=r"cannot parse file name '.*0002_c2s1_000301_02\.jpg': expected \{pid\}_c\{camera\}_f\{frame\}",
    ):
        load_dataset("dukemtmc", base, check_stats=False)


# --------------------------------------------------------------------------- MSMT17


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_msmt_v1_and_v2_lists_cameras_and_val_merge(tmp_path, version):
    base = write_msmt17(tmp_path, version)
    data = load_dataset("msmt17", tmp_path, check_stats=False)
    image_dir = "train" if version == "V1" else "mask_train_v2"

    assert data.extra["version"] == version
    assert [r.pid for r in data.train] == [0, 0, 1, 1, 2]
    assert [r.camid for r in data.train] == [0, 4, 11, 14, 2]  # fields 01 05 12 15 03
    assert data.train[3].path == str(
        base / image_dir / "0001" / "0001_002_15_0303afternoon_0400_1.jpg"
    )
    assert [(r.pid, r.camid) for r in data.query] == [(0, 6), (1, 1)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(0, 8), (0, 6), (1, 13), (2, 3)]

    train_only = load_dataset("msmt17", base, combine_val=False, check_stats=False)
    assert [r.orig_pid for r in train_only.train] == [0, 0, 1]


def test_msmt_statistics_warning_depends_on_combine_val(tmp_path):
    write_msmt17(tmp_path)
    with pytest.warns(UserWarning) as record:
        load_dataset("msmt17", tmp_path)
    assert _headlines(record) == [
        "msmt17 train: found 3 identities / 5 images, published 1,041 / 32,621",
        "msmt17 query: found 2 identities / 2 images, published 3,060 / 11,659",
        "msmt17 gallery: found 3 identities / 4 images, published 3,060 / 82,161",
    ]
    with pytest.warns(UserWarning) as record:
        load_dataset("msmt17", tmp_path, combine_val=False)
    assert (
        _headlines(record)[0]
        == "msmt17 train: found 2 identities / 3 images, published 1,041 / 30,248"
    )


def test_msmt_missing_list_file(tmp_path):
    base = write_msmt17(tmp_path, "V2")
    (base / "list_val.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"MSMT17: missing list file '{base / 'list_val.txt'}'")
    ):
        load_dataset("msmt17", tmp_path, check_stats=False)


def test_msmt_bad_list_lines_name_file_and_line(tmp_path):
    base = write_msmt17(tmp_path)
    query_list = base / "list_query.txt"
    query_list.write_text(
        "0000/0000_000_07_0303morning_0100_0.jpg 0\n\n0001/0001_000_02_0303noon_0200_0.jpg\n"
    )
    with pytest.raises(
        ValueError, match=re.escape(f"{query_list}, line 3: expected 'relative/path.jpg pid'")
    ):
        load_dataset("msmt17", base, check_stats=False)

    query_list.write_text("0000/0000_000_07_0303morning_0100_0.jpg zero\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{query_list}, line 1: pid 'zero' is not an integer")
    ):
        load_dataset("msmt17", base, check_stats=False)

    query_list.write_text("0000/0000_000_07_0303morning_0100_0.jpg 0\n0000/missing.jpg 0\n")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"{query_list}, line 2: listed image '{base / 'test' / '0000' / 'missing.jpg'}' does not exist"
        ),
    ):
        load_dataset("msmt17", base, check_stats=False)


# --------------------------------------------------------------------------- VeRi-776


@pytest.mark.parametrize("with_lists", [True, False])
def test_veri_with_and_without_name_lists(tmp_path, with_lists):
    base = write_veri776(tmp_path, with_name_lists=with_lists)
    # Not in name_train.txt: the lists, when present, decide what belongs to a split.
    write_images(base / "image_train", ["0009_c004_00050000_0.jpg"])
    (base / "image_query" / "Thumbs.db").write_bytes(b"\0")
    data = load_dataset("veri776", tmp_path, check_stats=False)

    expected_train = [0, 0, 0, 1, 1] if with_lists else [0, 0, 0, 1, 1, 2]
    assert [r.pid for r in data.train] == expected_train
    assert [r.camid for r in data.train][:5] == [0, 1, 1, 9, 19]  # c001 c002 c002 c010 c020
    assert [(r.pid, r.camid) for r in data.query] == [(2, 1), (5, 10)]
    assert sorted((r.pid, r.camid) for r in data.gallery) == [(2, 1), (2, 2), (5, 14)]
    assert data.protocol == "market"


def test_veri_listed_file_missing_and_statistics(tmp_path):
    base = write_veri776(tmp_path, folder_name="VeRi_with_plate")
    with pytest.warns(UserWarning) as record:
        load_dataset("veri776", tmp_path)
    assert _headlines(record) == [
        "veri776 train: found 2 identities / 5 images, published 576 / 37,778",
        "veri776 query: found 2 identities / 2 images, published 200 / 1,678",
        "veri776 gallery: found 2 identities / 3 images, published 200 / 11,579",
    ]
    (base / "image_test" / "0005_c015_00090000_0.jpg").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"{base / 'name_test.txt'}, line 3: listed image '{base / 'image_test' / '0005_c015_00090000_0.jpg'}'"
        ),
    ):
        load_dataset("veri776", tmp_path, check_stats=False)


# --------------------------------------------------------------------------- VehicleID


@pytest.mark.parametrize("test_size,n_ids,n_images", [(800, 3, 6), (1600, 4, 8), (2400, 5, 9)])
def test_vehicleid_test_sizes_and_draw(tmp_path, test_size, n_ids, n_images):
    write_vehicleid(tmp_path)
    data = load_dataset("vehicleid", tmp_path, test_size=test_size, check_stats=False)
    test = data.extra["test"]

    assert data.protocol == "vehicleid"
    assert [r.pid for r in data.train] == [0, 0, 1, 2, 2]
    assert [r.orig_pid for r in data.train] == [1, 1, 3, 4, 4]
    assert (len({r.pid for r in test}), len(test)) == (n_ids, n_images)
    assert all(r.camid == 0 for r in [*data.train, *test])
    # Draw 0: one gallery image per vehicle, the rest are queries, matching the protocol helper.
    mask = vehicleid_draw(np.array([r.pid for r in test]), 0)
    assert data.gallery == [r for r, g in zip(test, mask, strict=True) if g]
    assert data.query == [r for r, g in zip(test, mask, strict=True) if not g]
    assert sorted(r.pid for r in data.gallery) == sorted({r.pid for r in test})
    assert 5 not in {r.pid for r in data.query}  # vehicle 0005 has a single image


def test_vehicleid_seed_picks_the_draw(tmp_path):
    base = write_vehicleid(tmp_path)
    data = load_vehicleid(base, seed=7, check_stats=False)
    mask = vehicleid_draw(np.array([r.pid for r in data.extra["test"]]), 7)
    assert _names(data.gallery) == [
        Path(r.path).name for r, g in zip(data.extra["test"], mask, strict=True) if g
    ]
    assert data.extra["seed"] == 7 and data.extra["test_size"] == 800


def test_vehicleid_errors_and_statistics(tmp_path):
    base = write_vehicleid(tmp_path, "VehicleID")
    with pytest.raises(
        ValueError, match=re.escape("VehicleID test_size must be one of 800, 1600, 2400, got 1000")
    ):
        load_dataset("vehicleid", tmp_path, test_size=1000)
    with pytest.warns(UserWarning) as record:
        load_dataset("vehicleid", tmp_path, test_size=1600)
    assert _headlines(record) == [
        "vehicleid train: found 3 identities / 5 images, published 13,164 / 113,346",
        "vehicleid test: found 4 identities / 8 images, published 1,600 / 13,377",
    ]
    (base / "train_test_split" / "test_list_2400.txt").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"VehicleID: missing list file '{base / 'train_test_split' / 'test_list_2400.txt'}'"
        ),
    ):
        load_dataset("vehicleid", base, test_size=2400, check_stats=False)
    (base / "train_test_split" / "train_list.txt").write_text("0000001 0001\n0000002 car\n")
    with pytest.raises(
        ValueError, match=re.escape("train_list.txt, line 2: vehicle_id 'car' is not an integer")
    ):
        load_dataset("vehicleid", base, check_stats=False)


# --------------------------------------------------------------------------- custom data


def test_custom_flat_folder_with_camera_pattern(tmp_path):
    root = write_custom_folders(tmp_path, split_layout=False)
    data = load_dataset("custom", root, cam_pattern=r"_cam(\d+)_")

    assert data.extra["identity_names"] == ["2", "10", "alice", "bob"]
    assert data.extra["camera_names"] == ["1", "2", "3"]
    by_name = {Path(r.path).name: (r.pid, r.camid) for r in data.train}
    assert by_name == {
        "y_cam3_001.jpg": (0, 2),
        "y_cam3_002.jpg": (0, 2),
        "x_cam1_001.jpg": (1, 0),
        "a_cam1_001.jpg": (2, 0),
        "a_cam2_002.jpg": (2, 1),
        "b_cam2_001.png": (3, 1),
    }
    assert data.query == [] and data.gallery == []

    no_cams = load_custom(root)
    assert {r.camid for r in no_cams.train} == {0}


def test_custom_split_folders_share_identity_numbers(tmp_path):
    root = write_custom_folders(tmp_path, split_layout=True)
    data = load_custom(root, cam_pattern=r"cam(\d)")

    assert data.extra["identity_names"] == ["alice", "bob", "carol", "dave"]
    assert [(r.pid, r.orig_pid) for r in data.train] == [(0, 0), (0, 0), (1, 1)]
    assert [(r.pid, r.camid) for r in data.query] == [(2, 0)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(2, 1), (3, 0)]


def test_custom_folder_errors(tmp_path):
    root = write_custom_folders(tmp_path, split_layout=False)
    with pytest.raises(
        ValueError, match=re.escape(r"cam_pattern 'c(\d)(\d)' must have exactly one group")
    ):
        load_custom(root, cam_pattern=r"c(\d)(\d)")
    with pytest.raises(
        ValueError, match=re.escape("cam_pattern 'cam(' is not a valid regular expression")
    ):
        load_custom(root, cam_pattern="cam(")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cam_pattern 'camera(\\d)' does not match file name '{root / '10' / 'x_cam1_001.jpg'}'"
        ),
    ):
        load_custom(root, cam_pattern=r"camera(\d)")
    write_images(root, ["loose.jpg"])
    with pytest.raises(
        ValueError,
        match=re.escape(f"image '{root / 'loose.jpg'}' is not inside an identity sub-folder"),
    ):
        load_custom(root)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"no images found in '{tmp_path / 'empty'}'")):
        load_custom(tmp_path / "empty")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"custom dataset '{tmp_path / 'nope'}' does not exist")
    ):
        load_custom(tmp_path / "nope")

    split_root = write_custom_folders(tmp_path, split_layout=True, folder_name="split")
    (split_root / "val").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"unexpected folder '{split_root / 'val'}'")):
        load_custom(split_root)


@pytest.mark.parametrize("header", [True, False])
def test_custom_csv_with_and_without_header(tmp_path, header):
    csv_path = write_custom_csv(tmp_path, header)
    data = load_dataset("custom", str(csv_path))

    assert [(r.pid, r.orig_pid, r.camid) for r in data.train] == [(0, 5, 0), (0, 5, 1), (1, 9, 0)]
    assert data.train[0].path == str(tmp_path / "imgs" / "0.jpg")
    assert [(r.pid, r.camid) for r in data.query] == [(5, 2)]
    assert [(r.pid, r.camid) for r in data.gallery] == [(5, 3), (-1, 0), (7, 1)]
    assert data.gallery[2].path == str(tmp_path / "imgs" / "6.jpg")


@pytest.mark.parametrize(
    "row,message",
    [
        ("imgs/0.jpg,5", "line 3: expected 'path,pid,camid[,split]', got 2 fields"),
        ("imgs/0.jpg,bob,0", "line 3: pid 'bob' is not an integer"),
        ("imgs/0.jpg,5,-2", "line 3: camid '-2' is not a non-negative integer"),
        ("imgs/0.jpg,5,0,test", "line 3: split 'test' must be train, query or gallery"),
        ("imgs/0.jpg,-1,0,train", "line 3: pid -1 (junk) is only valid in the gallery"),
        ("imgs/0.txt,5,0", "line 3: 'imgs/0.txt' is not a .jpg/.jpeg/.png image"),
    ],
)
def test_custom_csv_bad_rows_name_file_and_line(tmp_path, row, message):
    write_images(tmp_path / "imgs", ["0.jpg"])
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(f"path,pid,camid\nimgs/0.jpg,5,0\n{row}\n")
    with pytest.raises(ValueError, match=re.escape(f"{csv_path}, {message}")):
        load_custom(csv_path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("path,pid,split", "the header has no camid column; its columns are path, pid, split"),
        ("Path,id,cam", "the header has no pid, camid columns; its columns are Path, id, cam"),
        ("image,id,camera", "the header has no path, pid, camid columns; its columns are "
                            "image, id, camera"),
    ],
)
def test_custom_csv_header_missing_columns_is_one_line(tmp_path, header, message):
    write_images(tmp_path / "imgs", ["0.jpg"])
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(f"{header}\nimgs/0.jpg,5,0\n")
    with pytest.raises(ValueError) as err:
        load_custom(csv_path)
    assert str(err.value) == f"{csv_path}: {message} (expected path,pid,camid[,split])"


@pytest.mark.parametrize("header", ["path,camid,pid", "path,pid,camid,notes", "path,pid,pid,camid"])
def test_custom_csv_header_columns_in_another_order_are_refused(tmp_path, header):
    write_images(tmp_path / "imgs", ["0.jpg"])
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(f"\n{header}\nimgs/0.jpg,5,0\n")
    columns = header.replace(",", ", ")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{csv_path}: the header's columns are {columns}; expected exactly "
            "path,pid,camid[,split], in this order"
        ),
    ):
        load_custom(csv_path)


def test_custom_csv_header_is_case_insensitive(tmp_path):
    write_images(tmp_path / "imgs", ["0.jpg", "1.jpg"])
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("Path, PID, CamID, Split\nimgs/0.jpg,5,0\nimgs/1.jpg,5,1,query\n")
    data = load_custom(csv_path)
    assert [(r.orig_pid, r.camid) for r in data.train] == [(5, 0)]
    assert [(r.pid, r.camid) for r in data.query] == [(5, 1)]


def test_custom_csv_missing_image_and_misused_options(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("imgs/none.jpg,1,0\n")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"{csv_path}, line 1: image '{tmp_path / 'imgs' / 'none.jpg'}' does not exist"
        ),
    ):
        load_custom(csv_path)
    with pytest.raises(ValueError, match="cam_pattern does not apply to the CSV file"):
        load_custom(csv_path, cam_pattern=r"(\d)")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .csv file"):
        load_custom(tmp_path / "list.txt")


# --------------------------------------------------------------------------- entry point


def test_unknown_dataset_name_lists_valid_names(tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unknown dataset 'cuhk03'; valid names: market1501, dukemtmc, msmt17, veri776, "
            "vehicleid, custom, synthetic"
        ),
    ):
        load_dataset("cuhk03", tmp_path)


def test_unknown_option_is_named(tmp_path):
    write_market1501(tmp_path)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "unknown option(s) test_size for dataset 'market1501'; valid options: keep_junk, check_stats"
        ),
    ):
        load_dataset("market1501", tmp_path, test_size=800)


def test_format_summary_table_and_logging(tmp_path, caplog):
    write_market1501(tmp_path)
    with caplog.at_level(logging.INFO, logger="esreid.data"):
        data = load_dataset("Market1501", tmp_path, check_stats=False)
    expected = "\n".join(
        [
            "market1501 (protocol: market)",
            "  split    identities   images  cameras",
            "  train             3        6        5",
            "  query             2        2        2",
            "  gallery           3        5        4",
            "  dropped junk images (pid -1): gallery 2",
        ]
    )
    assert format_summary(data) == expected
    assert expected in caplog.text
    assert isinstance(data.train[0], Record)


def test_data_package_imports_without_torch():
    code = "import sys, esreid.data; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_custom_csv_header_with_byte_order_mark(tmp_path):
    write_images(tmp_path / "imgs", ["0.jpg"])
    csv_path = tmp_path / "excel.csv"
    csv_path.write_bytes("\ufeffpath,pid,camid\nimgs/0.jpg,3,0\n".encode())
    data = load_custom(csv_path)
    assert [(r.pid, r.orig_pid, r.camid) for r in data.train] == [(0, 3, 0)]
