"""The gallery service in process (FastAPI's test client): search, explain, gallery images,
additions with a token, and a clear 4xx for every kind of bad input."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixture_trees import break_image
from PIL import Image
from test_cli_use import _checkpoint, _image

from esreid.cli import main
from esreid.inference import ReIDModel
from esreid.metrics import compute_distance
from esreid.serve import create_app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(3)
    ckpt = _checkpoint(root / "run" / "checkpoints" / "last.pt", 0)
    gallery = root / "gallery"
    for person in ("ann", "ben", "cy"):
        for i in range(2):
            _image(gallery / person / f"{i}.png", rng)
    index = root / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(index), "--threshold", "0.2"]) == 0
    query = _image(root / "query.png", rng)
    return root, ckpt, index, query


def _png(path):
    return ("q.png", path.read_bytes(), "image/png")


@pytest.fixture
def client(served, tmp_path):
    root, ckpt, index, _ = served
    copy = tmp_path / "g.index"
    copy.write_bytes(index.read_bytes())
    with TestClient(create_app(copy, token="s3cret", max_upload_bytes=200_000)) as c:
        yield c


def test_search_ranks_like_the_model(client, served):
    root, ckpt, index, query = served
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "gallery_size": 6}
    r = client.post("/api/search?k=3", files={"image": _png(query)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold"] == 0.2 and [m["rank"] for m in body["matches"]] == [1, 2, 3]
    model = ReIDModel.from_checkpoint(ckpt)
    paths = sorted(str(p) for p in (root / "gallery").rglob("*.png"))
    dist = compute_distance(model.embed([query]), model.embed(paths), metric="cosine")[0]
    assert [m["path"] for m in body["matches"]] == [paths[j] for j in np.argsort(dist, kind="stable")[:3]]
    first = body["matches"][0]
    assert first["image_url"] == f"/api/gallery/{first['id']}/image"
    image = client.get(first["image_url"])
    assert image.status_code == 200 and image.content == open(first["path"], "rb").read()


def test_explain_returns_two_png_overlays(client, served):
    query = served[3]
    r = client.post("/api/explain", files={"image": _png(query)}, data={"gallery_id": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    for key in ("query", "gallery"):
        assert body[key].startswith("data:image/png;base64,")
    assert body["same"] is (body["distance"] <= 0.2)


def test_adding_needs_the_token_and_is_saved(client, served, tmp_path):
    query = served[3]
    files = [("image", _png(query)), ("image", _png(query))]
    assert client.post("/api/gallery", files=files).status_code == 401
    wrong = client.post("/api/gallery", files=files, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    ok = client.post("/api/gallery", files=files, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["gallery_size"] == 8 and [a["id"] for a in ok.json()["added"]] == [6, 7]
    assert client.get("/healthz").json()["gallery_size"] == 8
    from esreid.search import GalleryIndex

    assert GalleryIndex.load(tmp_path / "g.index").count == 8  # written to the index file
    top = client.post("/api/search?k=1", files={"image": _png(query)}).json()["matches"][0]
    assert top["id"] in (6, 7) and top["distance"] == pytest.approx(0.0, abs=1e-5)


def test_read_only_without_a_token(served, tmp_path):
    copy = tmp_path / "g.index"
    copy.write_bytes(served[2].read_bytes())
    with TestClient(create_app(copy)) as c:
        r = c.post("/api/gallery", files={"image": _png(served[3])},
                   headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and "read-only" in r.json()["error"]


def _bomb() -> bytes:
    """A 1x1 PNG whose header declares 50000 x 50000 pixels (2.5 G pixels if decoded)."""
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", 50000, 50000)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_hostile_input_gets_a_4xx_and_the_server_stays_up(client, served, tmp_path):
    query = served[3]
    truncated = break_image(tmp_path / "t.jpg", "truncated").read_bytes()
    cases = [
        ({"image": ("e.png", b"", "image/png")}, 400, "empty"),
        ({"image": ("x.png", b"definitely not an image", "image/png")}, 400, "not a readable image"),
        ({"image": ("t.jpg", truncated, "image/jpeg")}, 400, "not a readable image"),
        ({"image": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")}, 413, "over the limit"),
        ({"image": ("bomb.png", _bomb(), "image/png")}, 400, "pixels"),
        ({"image": ("../../etc/passwd", b"root:x:0:0", "text/plain")}, 400, "passwd: not a readable"),
        ({}, 400, "image"),
    ]
    for files, status, fragment in cases:
        r = client.post("/api/search", files=files)
        assert r.status_code == status, (fragment, r.text)
        assert fragment in r.json()["error"] and "\n" not in r.json()["error"]
    for bad_k in ("0", "1000", "abc"):
        assert client.post(f"/api/search?k={bad_k}", files={"image": _png(query)}).status_code == 400
    for bad_id in ("99", "-1", "..%2F..%2Fetc%2Fpasswd", "1.5"):
        r = client.get(f"/api/gallery/{bad_id}/image")
        assert r.status_code in (400, 404) and "error" in r.json()
    r = client.post("/api/explain", files={"image": _png(query)}, data={"gallery_id": "99"})
    assert r.status_code == 404
    r = client.post("/api/explain", files={"image": _png(query)}, data={"gallery_id": "../x"})
    assert r.status_code == 400
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.post("/api/search", files={"image": _png(query)}).status_code == 200
