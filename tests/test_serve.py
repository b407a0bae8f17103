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


# -- issue 20 -----------------------------------------------------------------------------------

def test_an_upright_copy_of_a_phone_photo_matches_it(client, served, tmp_path):
    """Case 6: a query stored sideways with an EXIF orientation is embedded upright, so the
    gallery image it was taken from ranks first at distance 0."""
    root, ckpt, index, _ = served
    upright = Image.open(root / "gallery" / "ben" / "1.png").convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    buffer = io.BytesIO()
    sideways.save(buffer, format="PNG", exif=exif)
    r = client.post("/api/search?k=2", files={"image": ("phone.png", buffer.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    best = r.json()["matches"][0]
    assert best["path"] == str(root / "gallery" / "ben" / "1.png") and best["label"] == "ben"
    assert best["distance"] == pytest.approx(0.0, abs=1e-5) and best["same"] is True


def test_a_too_small_upload_is_refused(client):
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tiny, format="PNG")
    r = client.post("/api/search", files={"image": ("dot.png", tiny.getvalue(), "image/png")})
    assert r.status_code == 400
    assert r.json()["error"] == ("dot.png: 1x1 pixels is below the minimum of 8 pixels on each "
                                 "side (too small to be a person or vehicle crop)")


def test_bad_uploads_name_the_file_never_a_python_object(client):
    r = client.post("/api/search", files={"image": ("cat.gif", b"GIF89a?", "image/gif")})
    assert r.status_code == 400
    assert r.json()["error"] == ("cat.gif: not a readable image (cannot identify image format "
                                 "(not an image, or a format Pillow cannot read))")
    assert "BytesIO" not in r.text and " at 0x" not in r.text


def test_explaining_a_gallery_image_whose_file_is_gone_is_a_404(served, tmp_path):
    root, ckpt, index, query = served
    gallery = tmp_path / "gallery"
    for i in range(2):
        _image(gallery / "zed" / f"{i}.png", np.random.default_rng(i))
    copy = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(gallery),
                 "--out", str(copy)]) == 0
    (gallery / "zed" / "1.png").unlink()
    with TestClient(create_app(copy)) as c:
        r = c.post("/api/explain", files={"image": _png(query)}, data={"gallery_id": "1"})
        assert r.status_code == 404
        assert r.json()["error"] == ("gallery image 1 is no longer on disk (its file was moved "
                                     "or deleted)")
        assert c.get("/api/gallery/1/image").status_code == 404
        assert c.post("/api/explain", files={"image": _png(query)},
                      data={"gallery_id": "0"}).status_code == 200


def test_images_added_over_http_carry_labels(client, served, tmp_path):
    from esreid.search import GalleryIndex

    root, ckpt, index, query = served
    auth = {"Authorization": "Bearer s3cret"}
    extra = [_image(tmp_path / f"x{i}.png", np.random.default_rng(20 + i)) for i in range(3)]
    r = client.post("/api/gallery", headers=auth, data={"label": "dana"},
                    files=[("image", _png(extra[0])), ("image", _png(extra[1]))])
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()["added"]] == ["dana", "dana"]
    r = client.post("/api/gallery", headers=auth, data={"label": ["eli", " fay "]},
                    files=[("image", _png(extra[2])), ("image", _png(query))])
    assert r.status_code == 200, r.text
    assert [a["label"] for a in r.json()["added"]] == ["eli", "fay"]
    saved = GalleryIndex.load(client.app.state.service.path)
    assert saved.labels[-4:] == ["dana", "dana", "eli", "fay"]
    r = client.post("/api/search?k=1", files={"image": _png(extra[2])})
    assert r.json()["matches"][0]["label"] == "eli"
    for labels, fragment in [(["a", "b", "c"], "got 3 labels for 2 images"),
                             ([" "], "a label must not be empty"),
                             (["a\nb"], "control characters"),
                             (["x" * 201], "201 characters, over the limit of 200")]:
        r = client.post("/api/gallery", headers=auth, data={"label": labels},
                        files=[("image", _png(extra[0])), ("image", _png(extra[1]))])
        assert r.status_code == 400 and fragment in r.json()["error"], (labels, r.text)
    assert GalleryIndex.load(client.app.state.service.path).count == saved.count


def test_every_entry_point_reads_the_same_pixels(tmp_path):
    """Loaders, ReIDModel (path, PIL image, array) and the server's upload decoding all give
    one tensor for an EXIF-rotated 16-bit image."""
    import torch

    from esreid.config import load_config
    from esreid.data.loader import read_rgb
    from esreid.serve.app import decode_upload

    values = (np.random.default_rng(1).integers(0, 65536, size=(16, 40))).astype(np.uint16)
    path = tmp_path / "odd.png"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(values).save(path, exif=exif)
    cfg = load_config("esnet", ["model.backbone=resnet10", "model.pretrained=none",
                                "data.height=32", "data.width=16"])
    model = ReIDModel(None, cfg, identity="x")
    from_path = model.preprocess(str(path))
    with Image.open(path) as opened:
        from_pil = model.preprocess(opened)
    upload = decode_upload(path.read_bytes(), "odd.png", 1 << 20, target=model.input_size)
    from_upload = model.preprocess(upload)
    from_loader = model.preprocess(read_rgb(str(path)))
    for other in (from_pil, from_upload, from_loader):
        torch.testing.assert_close(other, from_path, rtol=0, atol=0)
    # And the picture is the upright, scaled one.
    expected = np.rot90(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), 1)
    assert np.array_equal(np.asarray(read_rgb(str(path)))[..., 0], expected)
