"""Tests of the embedded synthetic benchmark (esreid.data.synthetic)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esreid.data import load_dataset, synthetic
from esreid.data.synthetic import (
    CLOTH_COLORS,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PART_ATTRIBUTES,
    ensure_synthetic,
    generate_synthetic,
    render_image,
    resolve_synthetic_root,
    sample_cameras,
    sample_identities,
)

MARKET_RE = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
SPLITS = ("bounding_box_train", "bounding_box_test", "query")
SMALL = {"num_ids": 12, "num_cams": 4, "height": 32, "width": 16, "seed": 3}


def _parse(folder: Path) -> list[tuple[str, int, int]]:
    """(name, pid, cam) of every file in a split folder; fails on a non-Market name."""
    out = []
    for path in sorted(folder.iterdir()):
        match = MARKET_RE.match(path.name)
        assert match, f"not a Market-1501 name: {path.name}"
        out.append((path.name, int(match.group(1)), int(match.group(2))))
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "small"
    summary = generate_synthetic(out, progress=False, **SMALL)
    return out, summary


def test_layout_and_market_names(small):
    out, summary = small
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLITS, MANIFEST_NAME])
    names = []
    for split in SPLITS:
        for name, _pid, cam in _parse(out / split):
            assert 1 <= cam <= SMALL["num_cams"]
            names.append(name)
    assert len(names) == len(set(names)) == summary["counts"]["total"]
    assert summary["cameras"] == [1, 2, 3, 4]


def test_counts_match_summary(small):
    out, summary = small
    counts = summary["counts"]
    assert len(_parse(out / "bounding_box_train")) == counts["train"]
    assert len(_parse(out / "query")) == counts["query"]
    gallery = _parse(out / "bounding_box_test")
    assert len(gallery) == counts["gallery"]
    assert (
        sum(pid == -1 for _, pid, _ in gallery) == counts["gallery_junk"] == SMALL["num_ids"] // 2
    )
    assert (
        sum(pid == 0 for _, pid, _ in gallery) == counts["gallery_distractors"] == SMALL["num_ids"]
    )
    assert counts["train"] + counts["query"] + counts["gallery"] == counts["total"]


def test_train_and_test_identities_are_disjoint_halves(small):
    out, summary = small
    train = {pid for _, pid, _ in _parse(out / "bounding_box_train")}
    test = {pid for split in ("query", "bounding_box_test") for _, pid, _ in _parse(out / split)}
    test -= {-1, 0}
    assert train == set(summary["ids"]["train"])
    assert test == set(summary["ids"]["test"])
    assert not train & test
    assert len(train) == len(test) == SMALL["num_ids"] // 2


def test_every_query_has_a_gallery_match_in_another_camera(small):
    out, _ = small
    gallery_cams = defaultdict(set)
    for _, pid, cam in _parse(out / "bounding_box_test"):
        gallery_cams[pid].add(cam)
    queries = _parse(out / "query")
    assert queries
    for name, pid, cam in queries:
        assert gallery_cams[pid] - {cam}, f"{name} has no cross-camera gallery match"
    per_camera = defaultdict(int)
    for _, pid, cam in queries:
        per_camera[(pid, cam)] += 1
    assert max(per_camera.values()) == 1


def test_junk_and_distractors_only_in_gallery(small):
    out, _ = small
    for split in ("bounding_box_train", "query"):
        assert all(pid > 0 for _, pid, _ in _parse(out / split))
    gallery_pids = {pid for _, pid, _ in _parse(out / "bounding_box_test")}
    assert {-1, 0} <= gallery_pids
    assert any(p.name.startswith("-1_c") for p in (out / "bounding_box_test").iterdir())


def test_images_are_jpegs_of_the_requested_size(small):
    out, _ = small
    for split in SPLITS:
        for path in (out / split).iterdir():
            with Image.open(path) as image:
                assert image.format == "JPEG"
                assert image.mode == "RGB"
                assert image.size == (SMALL["width"], SMALL["height"])


def test_manifest_records_version_params_and_identities(small):
    out, summary = small
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["version"] == GENERATOR_VERSION == summary["version"]
    assert manifest["params"] == summary["params"]
    assert manifest["params"]["num_ids"] == 12 and manifest["params"]["seed"] == 3
    assert manifest["params"]["num_distractors"] == 12 and manifest["params"]["num_junk"] == 6
    assert [s["pid"] for s in manifest["identities"]] == list(range(1, 13))
    assert len(manifest["camera_styles"]) == SMALL["num_cams"]
    assert manifest["counts"] == summary["counts"]


def test_same_seed_gives_identical_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    generate_synthetic(again, progress=False, **SMALL)
    for split in SPLITS:
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(p.name for p in (again / split).iterdir())
        for name in names[:: max(1, len(names) // 5)]:
            assert (out / split / name).read_bytes() == (again / split / name).read_bytes()
    assert (out / MANIFEST_NAME).read_text() == (again / MANIFEST_NAME).read_text()

    other = tmp_path / "other"
    generate_synthetic(other, progress=False, **{**SMALL, "seed": 4})
    listing = sorted(p.name for p in (out / "bounding_box_train").iterdir())
    other_listing = sorted(p.name for p in (other / "bounding_box_train").iterdir())
    assert listing != other_listing


def test_ensure_caches_then_regenerates_on_parameter_change(tmp_path, caplog):
    out = tmp_path / "data" / "synth"
    params = {**SMALL, "num_ids": 6}
    with caplog.at_level(logging.INFO, logger="esreid.data"):
        assert ensure_synthetic(out, progress=False, **params) == out
    assert any("wrote" in r.message for r in caplog.records)
    manifest = out / MANIFEST_NAME
    some_image = next((out / "bounding_box_train").iterdir())
    stamps = (manifest.stat().st_mtime_ns, some_image.stat().st_mtime_ns, some_image.stat().st_ino)

    assert ensure_synthetic(out, progress=False, **params) == out
    assert (
        manifest.stat().st_mtime_ns,
        some_image.stat().st_mtime_ns,
        some_image.stat().st_ino,
    ) == stamps

    ensure_synthetic(out, progress=False, **{**params, "seed": 9})
    assert json.loads(manifest.read_text())["params"]["seed"] == 9
    # Only the final folder is left beside it: no temporary or old copies.
    assert [p.name for p in out.parent.iterdir()] == ["synth"]


def test_ensure_regenerates_an_incomplete_folder(tmp_path):
    out = tmp_path / "synth"
    params = {**SMALL, "num_ids": 4}
    ensure_synthetic(out, progress=False, **params)
    victim = next((out / "query").iterdir())
    victim.unlink()
    ensure_synthetic(out, progress=False, **params)
    assert victim.exists()


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        generate_synthetic(foreign, progress=False, **SMALL)
    with pytest.raises(FileExistsError, match="synthetic.json"):
        ensure_synthetic(foreign, progress=False, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        generate_synthetic(a_file, progress=False, **SMALL)


def test_an_existing_empty_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    summary = generate_synthetic(out, progress=False, **{**SMALL, "num_ids": 4})
    assert (out / MANIFEST_NAME).is_file()
    assert len(list((out / "bounding_box_train").iterdir())) == summary["counts"]["train"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_ids": 1}, "num_ids"),
        ({"num_cams": 10}, "num_cams"),
        ({"height": 4}, "height"),
        ({"width": 2.5}, "width"),
        ({"seed": -1}, "seed"),
        ({"family_size": 0}, "family_size"),
        ({"family_fraction": 1.5}, "family_fraction"),
        ({"occlusion_prob": -0.1}, "occlusion_prob"),
        ({"num_junk": -3}, "num_junk"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
    ],
)
def test_bad_parameters_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_synthetic(tmp_path / "x", progress=False, **{**SMALL, **kwargs})
    assert not list(tmp_path.iterdir())


def test_ensure_rejects_unknown_parameters(tmp_path):
    with pytest.raises(TypeError, match="num_people"):
        ensure_synthetic(tmp_path / "x", num_people=3)


def _rgb_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(CLOTH_COLORS[a], CLOTH_COLORS[b])))


def test_family_members_differ_in_exactly_one_part():
    specs = sample_identities(120, np.random.default_rng(0), family_size=4, family_fraction=1.0)
    assert [s.pid for s in specs] == list(range(1, 121))
    assert len({tuple(s.parts().values()) for s in specs}) == 120
    families = defaultdict(list)
    for spec in specs:
        families[spec.family].append(spec)
    assert all(len(members) == 4 for members in families.values())
    varied = set()
    for members in families.values():
        attr = members[0].varies
        varied.add(attr)
        for a, b in itertools.combinations(members, 2):
            diff = [k for k in PART_ATTRIBUTES if getattr(a, k) != getattr(b, k)]
            assert diff == [attr]
            va, vb = getattr(a, attr), getattr(b, attr)
            if attr not in ("hair_color", "logo_shape") and va is not None and vb is not None:
                assert _rgb_distance(va, vb) >= 110
    assert len(varied) >= 5


def test_family_fraction_mixes_families_and_singletons():
    specs = sample_identities(100, np.random.default_rng(1), family_size=4, family_fraction=0.5)
    sizes = defaultdict(int)
    for spec in specs:
        sizes[spec.family] += 1
    assert sum(n for n in sizes.values() if n > 1) == 50
    assert all(s.varies is None for s in specs if sizes[s.family] == 1)
    first_half = {s.family for s in specs[:50] if sizes[s.family] > 1}
    second_half = {s.family for s in specs[50:] if sizes[s.family] > 1}
    assert first_half and second_half
    none = sample_identities(10, np.random.default_rng(1), family_size=4, family_fraction=0.0)
    assert len({s.family for s in none}) == 10


def test_every_varied_part_is_visible_in_the_image():
    base = sample_identities(1, np.random.default_rng(5), family_size=1)[0]
    base = replace(
        base,
        upper_color="blue",
        upper_pattern="logo",
        pattern_color="white",
        logo_shape="circle",
        bag_side="left",
        bag_color="red",
        hat_color="green",
        backpack_color="yellow",
        shoe_color="black",
        hair_color="black",
        lower_color="grey",
        lower_type="trousers",
    )
    changes = {
        "shoe_color": "white",
        "bag_color": "sky",
        "hat_color": None,
        "backpack_color": "purple",
        "pattern_color": "orange",
        "logo_shape": "triangle",
        "hair_color": "blond",
        "lower_color": "pink",
    }
    camera = sample_cameras(1, np.random.default_rng(0))[0]

    def draw(spec, seed):
        return render_image(spec, camera, np.random.default_rng(seed), 128, 64, 0.0)

    for attr, value in changes.items():
        other = replace(base, **{attr: value})
        differing = [not np.array_equal(draw(base, s), draw(other, s)) for s in range(4)]
        # The logo is on the front only; every other part shows from both sides.
        assert any(differing) if attr in ("pattern_color", "logo_shape") else all(differing), attr
    first = draw(base, 0)
    assert first.shape == (128, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, draw(base, 0))


# ----------------------------------------------------------------------------- folders and modes

TINY = {**SMALL, "num_ids": 4}


@pytest.fixture()
def umask():
    """Set the process umask for one test (``umask(0o077)``); restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def _modes(out: Path) -> tuple[set[int], set[int]]:
    """Permission bits of every folder (out included) and of every file under ``out``."""
    dirs = {stat.S_IMODE(out.stat().st_mode)}
    files = set()
    for path in out.rglob("*"):
        (dirs if path.is_dir() else files).add(stat.S_IMODE(path.stat().st_mode))
    return dirs, files


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_new_folders_and_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "new" / "synth"
    generate_synthetic(out, progress=False, **TINY)
    assert _modes(out) == ({0o777 & ~mask}, {0o666 & ~mask})
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o777 & ~mask


def test_an_existing_empty_folder_keeps_its_own_mode(tmp_path, umask):
    umask(0o077)
    out = tmp_path / "empty"
    out.mkdir()
    out.chmod(0o755)
    summary = generate_synthetic(out, progress=False, **TINY)
    assert (out / MANIFEST_NAME).is_file()
    assert len(list((out / "bounding_box_train").iterdir())) == summary["counts"]["train"]
    dirs, files = _modes(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert dirs == {0o755, 0o700} and files == {0o600}
    # Regenerating a generated folder also keeps the folder's mode.
    out.chmod(0o750)
    ensure_synthetic(out, progress=False, **{**TINY, "seed": 8})
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert json.loads((out / MANIFEST_NAME).read_text())["params"]["seed"] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_a_folder_filled_during_generation_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "target"
    out.mkdir()
    real_summary = synthetic._summary

    def summary_while_user_writes(*args):
        (out / "notes.txt").write_text("written meanwhile")
        return real_summary(*args)

    monkeypatch.setattr(synthetic, "_summary", summary_while_user_writes)
    with pytest.raises(FileExistsError, match=re.escape(f"out_dir {out} is a non-empty folder")):
        generate_synthetic(out, progress=False, **TINY)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


def _interrupted_generation(out: Path) -> Path:
    """Run a generation in another process, kill it while it writes; return its work folder."""
    code = (
        "import sys; from esreid.data.synthetic import generate_synthetic; "
        "generate_synthetic(sys.argv[1], num_ids=400, height=64, width=32, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(out)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            work = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
            if work and any((work[0] / "bounding_box_train").glob("*.jpg")):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the generation never started writing")
    finally:
        child.kill()
        child.wait()
    assert not out.exists()
    return work[0]


def test_work_folders_of_an_interrupted_generation_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "synth"
    stale = _interrupted_generation(out)
    # The same name pattern for a process that is alive (this one) and for a foreign, fresh
    # folder of unknown origin: possibly in use, so both are left alone.
    live = stale.with_name(re.sub(r"-\d+-([0-9a-f]{8})$", rf"-{os.getpid()}-\1", stale.name))
    live.mkdir()
    unknown = tmp_path / f".{out.name}.tmp-k2x_9a"
    unknown.mkdir()
    old_unknown = tmp_path / f".{out.name}.old-zz1"
    old_unknown.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old_unknown, (two_days_ago, two_days_ago))
    other = tmp_path / ".other.tmp-host-1-0123abcd"
    other.mkdir()

    generate_synthetic(out, progress=False, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["synth", live.name, unknown.name, other.name]
    )


def test_refusal_names_the_folder_and_keeps_it(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "bounding_box_train").mkdir()
    (foreign / "bounding_box_train" / "0001_c1s1_000001_00.jpg").write_bytes(b"mine")
    for call in (generate_synthetic, ensure_synthetic):
        with pytest.raises(FileExistsError) as err:
            call(foreign, progress=False, **TINY)
        assert str(err.value).startswith(f"out_dir {foreign} is a non-empty folder without a ")
    assert (foreign / "bounding_box_train" / "0001_c1s1_000001_00.jpg").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# ----------------------------------------------------------------------------- data roots


def test_ensure_says_once_that_it_generates_and_where(tmp_path, caplog):
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="esreid.data"):
        ensure_synthetic(out, progress=False, **TINY)
    lines = [r.getMessage() for r in caplog.records if "generating" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("generating the synthetic benchmark (")
    assert lines[0].endswith(f"identities, seed 3) in {out}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="esreid.data"):
        ensure_synthetic(out, progress=False, **TINY)
    assert not [r for r in caplog.records if "generating" in r.getMessage()]


def test_ensure_prints_the_line_when_logging_would_not_show_it(tmp_path, capsys, monkeypatch):
    logger = logging.getLogger("esreid.data")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [])
    ensure_synthetic(tmp_path / "data", progress=True, **TINY)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "generating" in line]
    assert len(lines) == 1 and lines[0].endswith(f"in {tmp_path / 'data'}")


def test_resolve_synthetic_root_accepts_the_folder_or_its_parent(tmp_path):
    root = tmp_path / "data"
    assert resolve_synthetic_root(root) is None
    root.mkdir()
    (root / "market1501").mkdir()
    assert resolve_synthetic_root(root) is None
    generate_synthetic(root / "synthetic", progress=False, **TINY)
    assert resolve_synthetic_root(root) == root / "synthetic"
    assert resolve_synthetic_root(root / "synthetic") == root / "synthetic"
    assert resolve_synthetic_root(str(root)) == root / "synthetic"
    # load_dataset reads the same two forms.
    assert len(load_dataset("synthetic", root).train) == len(
        load_dataset("synthetic", root / "synthetic").train
    )
    # A synthetic.json this generator did not write is no benchmark.
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_NAME).write_text(json.dumps({"generator": "someone else"}))
    assert resolve_synthetic_root(other) is None


# ----------------------------------------------------------------------------- occluded queries

OCCLUDED = {**SMALL, "height": 64, "width": 32}


@pytest.fixture(scope="module")
def occluded_pair(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("occluded")
    generate_synthetic(base / "clean", progress=False, **OCCLUDED)
    generate_synthetic(base / "occluded", progress=False, occlude_queries="all", **OCCLUDED)
    return base / "clean", base / "occluded"


def test_occluded_queries_change_only_the_query_images(occluded_pair):
    clean, occluded = occluded_pair
    for split in ("bounding_box_train", "bounding_box_test"):
        names = sorted(p.name for p in (clean / split).iterdir())
        assert names == sorted(p.name for p in (occluded / split).iterdir())
        for name in names:
            assert (clean / split / name).read_bytes() == (occluded / split / name).read_bytes()
    queries = sorted(p.name for p in (clean / "query").iterdir())
    assert queries == sorted(p.name for p in (occluded / "query").iterdir())
    for name in queries:
        assert (clean / "query" / name).read_bytes() != (occluded / "query" / name).read_bytes()

    before = json.loads((clean / MANIFEST_NAME).read_text())
    after = json.loads((occluded / MANIFEST_NAME).read_text())
    assert after["params"].pop("occlude_queries") == ["head", "upper", "lower", "shoes"]
    assert "occlude_queries" not in before["params"]  # the ordinary manifest is unchanged
    records = after.pop("occluded_queries")
    parts = after.pop("occluded_parts")
    assert after == before
    assert sorted(r["file"] for r in records) == queries
    assert sum(parts.values()) == len(queries)
    assert {r["part"] for r in records} <= set(synthetic.OCCLUDABLE_PARTS)
    assert len({r["part"] for r in records}) > 1  # drawn per query, not one for all
    pid_cam = {name: (pid, cam) for name, pid, cam in _parse(occluded / "query")}
    assert all(pid_cam[r["file"]] == (r["pid"], r["cam"]) for r in records)
    # Loaded as a benchmark like any other: same records, same labels.
    assert [(r.pid, r.camid) for r in load_dataset("synthetic", occluded).query] == [
        (r.pid, r.camid) for r in load_dataset("synthetic", clean).query
    ]


def test_an_occluded_query_differs_from_its_clean_version_in_the_part_region(occluded_pair):
    clean, occluded = occluded_pair
    records = json.loads((occluded / MANIFEST_NAME).read_text())["occluded_queries"]
    for r in records:
        a = np.asarray(Image.open(clean / "query" / r["file"]), dtype=np.float64)
        b = np.asarray(Image.open(occluded / "query" / r["file"]), dtype=np.float64)
        diff = np.abs(a - b).mean(axis=2)
        box = r["box"]
        inside = np.zeros(diff.shape, bool)
        inside[box["top"] : box["bottom"], box["left"] : box["right"]] = True
        # Blur carries the change up to 4 px out of the box; JPEG then re-encodes each 16x16
        # block (4:2:0 colour) it reaches, and the decoder's colour upsampling reads 2 px
        # further. Everything beyond that is the clean image, bit for bit.
        t, b = (box["top"] - 4) // 16 * 16 - 2, -(-(box["bottom"] + 4) // 16) * 16 + 2
        left, right = (box["left"] - 4) // 16 * 16 - 2, -(-(box["right"] + 4) // 16) * 16 + 2
        near = np.zeros(diff.shape, bool)
        near[max(0, t) : b, max(0, left) : right] = True
        assert inside.any()
        assert not diff[~near].any(), r
        assert diff[inside].mean() > 10 * max(diff[~inside].mean(), 0.5), r


def test_the_part_patch_leaves_every_other_pixel_unchanged():
    # Before JPEG the image is the clean one exactly, except within the blur's reach of the box.
    specs = sample_identities(6, np.random.default_rng(0))
    cams = sample_cameras(3, np.random.default_rng(1))
    rows, cols = np.arange(128)[:, None], np.arange(64)[None, :]
    for i in range(12):
        spec, cam = specs[i % 6], cams[i % 3]
        clean, no_box = synthetic._render(spec, cam, np.random.default_rng([5, i]), 128, 64, 0.15)
        assert no_box is None
        for part in synthetic.OCCLUDABLE_PARTS:
            occ, (top, bottom, left, right) = synthetic._render(
                spec, cam, np.random.default_rng([5, i]), 128, 64, 0.15,
                (part, np.random.default_rng([6, i])),
            )
            changed = np.abs(clean.astype(int) - occ.astype(int)).max(axis=2) > 0
            reach = np.maximum(
                np.maximum(top - rows, rows - (bottom - 1)),
                np.maximum(left - cols, cols - (right - 1)),
            )
            assert not changed[reach > 4].any(), (i, part)
            assert changed[top:bottom, left:right].mean() > 0.5, (i, part)


def test_occluded_queries_are_deterministic_and_can_be_restricted(occluded_pair, tmp_path):
    _, occluded = occluded_pair
    again = tmp_path / "again"
    generate_synthetic(again, progress=False, occlude_queries=["upper", "head", "lower", "shoes"],
                       **OCCLUDED)
    for path in sorted((occluded / "query").iterdir()):
        assert path.read_bytes() == (again / "query" / path.name).read_bytes()
    assert (occluded / MANIFEST_NAME).read_text() == (again / MANIFEST_NAME).read_text()

    shoes = tmp_path / "shoes"
    summary = generate_synthetic(shoes, progress=False, occlude_queries="shoes", **OCCLUDED)
    assert summary["params"]["occlude_queries"] == ["shoes"]
    records = json.loads((shoes / MANIFEST_NAME).read_text())["occluded_queries"]
    assert {r["part"] for r in records} == {"shoes"}
    # ensure_synthetic tells the variants apart: asking for the clean one regenerates.
    ensure_synthetic(shoes, progress=False, **OCCLUDED)
    assert "occlude_queries" not in json.loads((shoes / MANIFEST_NAME).read_text())["params"]


@pytest.mark.parametrize("value", ["arm", "", "head,arm", ["head", 3], 1, True])
def test_a_bad_occlude_queries_value_is_named(tmp_path, value):
    with pytest.raises(ValueError, match="occlude_queries must be 'all' or parts among head, "
                                         "upper, lower, shoes"):
        generate_synthetic(tmp_path / "x", progress=False, occlude_queries=value, **SMALL)
    assert not list(tmp_path.iterdir())


def test_synth_command_writes_the_occluded_variant_and_names_a_bad_value(tmp_path, capsys):
    from esreid.cli import main

    args = ["synth", "--ids", "6", "--cams", "3", "--height", "32", "--width", "16"]
    assert main([*args, "--out", str(tmp_path / "o"), "--occlude-queries"]) == 0
    manifest = json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())
    assert manifest["params"]["occlude_queries"] == list(synthetic.OCCLUDABLE_PARTS)
    assert len(manifest["occluded_queries"]) == manifest["counts"]["query"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--occlude-queries", "knees"]) == 2
    err = capsys.readouterr().err
    assert "--occlude-queries must be 'all' or parts among head, upper, lower, shoes" in err
    assert "'knees'" in err and not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- dominant cue

CUE = {**SMALL, "num_ids": 24, "height": 64, "width": 32}
PARTS = synthetic.OCCLUDABLE_PARTS


@pytest.fixture(scope="module")
def cue_trees(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per part: the dominant-cue benchmark and the same with that part changed in queries."""
    base = tmp_path_factory.mktemp("cue")
    trees = {}
    for part in PARTS:
        plain, changed = base / part, base / f"{part}_changed"
        generate_synthetic(plain, progress=False, dominant_cue=part, **CUE)
        generate_synthetic(changed, progress=False, dominant_cue=part, change_queries=part, **CUE)
        trees[part] = plain, changed
    return trees


def _identities(root):
    return json.loads((root / MANIFEST_NAME).read_text())["identities"]


@pytest.mark.parametrize("part", PARTS)
def test_every_identity_has_a_look_of_the_dominant_part_no_other_has(cue_trees, part):
    identities = _identities(cue_trees[part][0])
    looks = [tuple(i[a] for a in synthetic.PART_OF[part]) for i in identities]
    assert len(set(looks)) == len(looks) == CUE["num_ids"]
    colors = {i[a] for i in identities for a in synthetic._CHANGED_COLORS[part]} - {None}
    assert colors <= set(synthetic.CUE_COLORS)
    # Every other part comes from its small palette, so only combinations tell people apart.
    for attr, palette in synthetic.SMALL_PALETTES.items():
        if attr not in synthetic.PART_OF[part]:
            assert {i[attr] for i in identities} <= set(palette), attr
    assert all(i["bag_side"] is None and i["backpack_color"] is None for i in identities)
    assert all(i["varies"] is None for i in identities)  # no families
    # The distractors wear looks of the cue that no identity has.
    manifest = json.loads((cue_trees[part][0] / MANIFEST_NAME).read_text())
    assert manifest["params"]["dominant_cue"] == part
    assert manifest["counts"]["gallery_distractors"] == CUE["num_ids"]


def test_the_cue_looks_are_distinct_and_their_colours_far_apart():
    for part in PARTS:
        looks = synthetic.cue_combinations(part)
        assert len({tuple(sorted(x.items(), key=str)) for x in looks}) == len(looks)
    assert len(synthetic.cue_combinations("upper")) == 14 + 3 * 91
    colors = list(synthetic.CUE_COLORS.values())
    assert min(synthetic.delta_e(a, b) for i, a in enumerate(colors) for b in colors[i + 1:]) \
        >= synthetic.MIN_CHANGE_DELTA_E
    with pytest.raises(ValueError, match="dominant_cue must be one of head, upper, lower, shoes"):
        synthetic.cue_combinations("arm")


def test_delta_e_against_a_hand_computation():
    # sRGB white is L* = 100, a* = b* = 0; black is L* = 0.
    assert synthetic.delta_e((255, 255, 255), (0, 0, 0)) == pytest.approx(100.0, abs=0.05)
    # Pure red: L* 53.24, a* 80.09, b* 67.20 (CIE, D65).
    assert synthetic.delta_e((255, 0, 0), (0, 0, 0)) == pytest.approx(
        (53.24**2 + 80.09**2 + 67.20**2) ** 0.5, abs=0.2)


def test_no_colour_of_the_variant_reads_as_the_erase_value():
    """Erased pixels are 0 after normalisation, the mean colour: no garment, hair or skin
    colour the dominant-cue variant draws may lie near it, or an erased part would read as a
    garment of that colour."""
    mean = synthetic.ERASE_MEAN_RGB
    assert mean == pytest.approx(tuple(255 * m for m in (0.485, 0.456, 0.406)))
    palettes = {"hair_color": synthetic.HAIR_COLORS, "skin": synthetic.SKIN_TONES}
    used = list(synthetic.CUE_COLORS.values())
    for attr, values in synthetic.SMALL_PALETTES.items():
        for v in values:
            if isinstance(v, str) and (attr.endswith("color") or attr == "skin"):
                used.append(palettes.get(attr, synthetic.CLOTH_COLORS)[v])
    assert min(synthetic.delta_e(c, mean) for c in used) >= synthetic.MIN_ERASE_DELTA_E
    # The ordinary benchmark's grey is that close (kept: its bytes must not change).
    assert synthetic.delta_e(synthetic.CLOTH_COLORS["grey"], mean) < 15


@pytest.mark.parametrize("part", PARTS)
def test_changed_queries_change_only_the_queries_and_record_the_change(cue_trees, part):
    plain, changed = cue_trees[part]
    for split in ("bounding_box_train", "bounding_box_test"):
        names = sorted(p.name for p in (plain / split).iterdir())
        assert names == sorted(p.name for p in (changed / split).iterdir())
        assert all((plain / split / n).read_bytes() == (changed / split / n).read_bytes()
                   for n in names)
    before = json.loads((plain / MANIFEST_NAME).read_text())
    after = json.loads((changed / MANIFEST_NAME).read_text())
    assert after["params"].pop("change_queries") == part
    records = after.pop("changed_queries")
    assert after == before
    queries = sorted(p.name for p in (plain / "query").iterdir())
    assert sorted(r["file"] for r in records) == queries
    identities = {i["pid"]: i for i in before["identities"]}
    hidden = 0
    for r in records:
        assert r["part"] == part and r["from"]
        assert r["from"] == {a: identities[r["pid"]][a] for a in r["from"]}
        for attr, new in r["to"].items():
            old = synthetic.CUE_COLORS[r["from"][attr]]
            assert synthetic.delta_e(synthetic.CUE_COLORS[new], old) >= \
                synthetic.MIN_CHANGE_DELTA_E
        a = np.asarray(Image.open(plain / "query" / r["file"]), dtype=np.float64)
        b = np.asarray(Image.open(changed / "query" / r["file"]), dtype=np.float64)
        diff = np.abs(a - b).mean(axis=2)
        (top, bottom, left, right), = synthetic.part_boxes(plain, part, [r["file"]]).values()
        inside = np.zeros(diff.shape, bool)
        inside[top:bottom, left:right] = True
        if not diff.any():
            hidden += 1  # the part is out of the frame or behind an occluder here
            continue
        # The part changed; beyond its region (blur, then JPEG blocks) the image did not.
        assert diff[inside].mean() > 5 * max(diff[~inside].mean(), 0.5), r
    assert hidden <= 0.25 * len(records)
    assert len({tuple(r["to"].values()) for r in records}) > 1  # drawn per query


def test_changed_queries_work_on_the_ordinary_benchmark_too(tmp_path):
    for part in PARTS:
        out = tmp_path / part
        generate_synthetic(out, progress=False, change_queries=part, **SMALL)
        records = json.loads((out / MANIFEST_NAME).read_text())["changed_queries"]
        palette = synthetic.HAIR_COLORS
        for r in records:
            for attr, new in r["to"].items():
                pal = palette if attr == "hair_color" else synthetic.CLOTH_COLORS
                assert new in pal and synthetic.delta_e(pal[new], pal[r["from"][attr]]) >= \
                    synthetic.MIN_CHANGE_DELTA_E


def test_part_boxes_are_the_boxes_the_occluded_variant_covers(occluded_pair):
    _, occluded = occluded_pair
    records = json.loads((occluded / MANIFEST_NAME).read_text())["occluded_queries"]
    for r in records[:10]:
        (top, bottom, left, right), = synthetic.part_boxes(occluded, r["part"],
                                                           [r["file"]]).values()
        box = r["box"]
        # The patch grows each edge of the part's region by up to 3% of the body box.
        assert box["top"] <= top and box["left"] <= left
        assert box["bottom"] >= bottom and box["right"] >= right
        assert bottom - top >= box["bottom"] - box["top"] - 4  # by the growth and rounding
    with pytest.raises(ValueError, match="no image named nope.jpg"):
        synthetic.part_boxes(occluded, "upper", ["nope.jpg"])
    with pytest.raises(ValueError, match="part must be one of head, upper, lower, shoes"):
        synthetic.part_boxes(occluded, "arm")


def test_bad_cue_options_are_named(tmp_path, capsys):
    with pytest.raises(ValueError, match="dominant_cue must be one of head, upper, lower, "
                                         "shoes, got 'arm'"):
        generate_synthetic(tmp_path / "x", progress=False, dominant_cue="arm", **SMALL)
    with pytest.raises(ValueError, match="change_queries must be one of head, upper, lower, "
                                         "shoes, got 'legs'"):
        generate_synthetic(tmp_path / "x", progress=False, change_queries="legs", **SMALL)
    with pytest.raises(ValueError, match=r"num_ids must be at most 196 with dominant_cue=shoes "
                                         r"\(196 distinct looks, 0 of them for distractors\), "
                                         r"got 300"):
        generate_synthetic(tmp_path / "x", progress=False, dominant_cue="shoes", num_ids=300)
    from esreid.cli import main

    args = ["synth", "--ids", "12", "--cams", "3", "--height", "32", "--width", "16"]
    assert main([*args, "--out", str(tmp_path / "c"), "--dominant-cue", "upper",
                 "--change-queries", "upper"]) == 0
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["params"]["dominant_cue"] == manifest["params"]["change_queries"] == "upper"
    assert len(manifest["changed_queries"]) == manifest["counts"]["query"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--dominant-cue", "knees"]) == 2
    assert "--dominant-cue must be one of head, upper, lower, shoes" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # ensure_synthetic tells the variants apart.
    ensure_synthetic(tmp_path / "c", progress=False, num_ids=12, num_cams=3, height=32, width=16,
                     dominant_cue="upper")
    assert "change_queries" not in json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())["params"]
