"""The real `esreid serve` process on 127.0.0.1: a bounded burst of concurrent searches (with
an addition in the middle) and a batch of hostile requests; every answer is checked and the
process must still be alive and healthy afterwards."""

import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fixture_trees import break_image
from serve_process import running_server
from test_cli_use import _checkpoint, _image
from test_serve import _bomb

from esreid.cli import main

TOKEN = "burst-token"


@pytest.fixture
def server(tmp_path):
    rng = np.random.default_rng(5)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", 0)
    for person in ("ann", "ben", "cy", "dee"):
        for i in range(3):
            _image(tmp_path / "gallery" / person / f"{i}.png", rng)
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp_path / "gallery"),
                 "--out", str(index), "--threshold", "0.2"]) == 0
    with running_server(index, tmp_path / "serve.log", "--token", TOKEN,
                        "--max-upload-mb", "0.5") as (proc, url, _):
        yield url, proc, tmp_path, rng


def test_concurrent_searches_and_hostile_requests(server):
    url, proc, tmp_path, rng = server
    queries = [_image(tmp_path / f"q{i}.png", rng).read_bytes() for i in range(4)]
    expected = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for i, data in enumerate(queries):
            r = client.post("/api/search?k=5", files={"image": ("q.png", data, "image/png")})
            assert r.status_code == 200, r.text
            expected[i] = [m["path"] for m in r.json()["matches"]]

        def search(i: int) -> tuple[int, float, list[str]]:
            start = time.perf_counter()
            r = client.post("/api/search?k=5", files={"image": ("q.png", queries[i % 4], "image/png")})
            assert r.status_code == 200, r.text
            return i, time.perf_counter() - start, [m["path"] for m in r.json()["matches"]]

        def add() -> dict:
            extra = _image(tmp_path / "new.png", np.random.default_rng(9)).read_bytes()
            r = client.post("/api/gallery", files={"image": ("new.png", extra, "image/png")},
                            headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
            return r.json()

        n = 48  # bounded burst: 48 searches over 8 connections, one addition in the middle
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(search, i) for i in range(n // 2)]
            added = pool.submit(add)
            futures += [pool.submit(search, i) for i in range(n // 2, n)]
            results = [f.result(timeout=120) for f in futures]
            assert added.result(timeout=120)["gallery_size"] == 13
        latencies = sorted(t for _, t, _ in results)
        for i, _, paths in results:
            # A search after the addition may rank the new image; the others keep their order.
            kept = [p for p in paths if ".uploads" not in p]
            assert len(kept) >= len(paths) - 1 and kept == expected[i % 4][:len(kept)]
        figures = {"searches": n, "connections": 8,
                   "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
                   "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1)}
        print("concurrent search latency:", json.dumps(figures))

        truncated = break_image(tmp_path / "t.jpg", "truncated").read_bytes()
        png = queries[0]
        hostile = [
            ("empty upload", "POST", "/api/search", {"files": {"image": ("e.png", b"", "image/png")}}, 400),
            ("not an image", "POST", "/api/search", {"files": {"image": ("x.png", b"GIF89a?", "image/png")}}, 400),
            ("truncated JPEG", "POST", "/api/search", {"files": {"image": ("t.jpg", truncated, "image/jpeg")}}, 400),
            ("over 0.5 MiB", "POST", "/api/search", {"files": {"image": ("b.png", b"\0" * 600_000, "image/png")}}, 413),
            ("decompression bomb", "POST", "/api/search", {"files": {"image": ("bomb.png", _bomb(), "image/png")}}, 400),
            ("traversal file name", "POST", "/api/search", {"files": {"image": ("../../../etc/shadow", b"x", "image/png")}}, 400),
            ("no file field", "POST", "/api/search", {"data": {"other": "1"}}, 400),
            ("not multipart", "POST", "/api/search", {"content": b"{}", "headers": {"content-type": "application/json"}}, 400),
            ("k = 0", "POST", "/api/search?k=0", {"files": {"image": ("q.png", png, "image/png")}}, 400),
            ("k = 10^9", "POST", "/api/search?k=1000000000", {"files": {"image": ("q.png", png, "image/png")}}, 400),
            ("unknown id", "GET", "/api/gallery/999/image", {}, 404),
            ("negative id", "GET", "/api/gallery/-1/image", {}, 404),
            ("traversal id", "GET", "/api/gallery/..%2F..%2Fetc%2Fpasswd/image", {}, 404),
            ("text id", "GET", "/api/gallery/abc/image", {}, 400),
            ("explain unknown id", "POST", "/api/explain", {"files": {"image": ("q.png", png, "image/png")}, "data": {"gallery_id": "77"}}, 404),
            ("explain traversal id", "POST", "/api/explain", {"files": {"image": ("q.png", png, "image/png")}, "data": {"gallery_id": "../../x"}}, 400),
            ("add without token", "POST", "/api/gallery", {"files": {"image": ("q.png", png, "image/png")}}, 401),
            ("add with wrong token", "POST", "/api/gallery", {"files": {"image": ("q.png", png, "image/png")}, "headers": {"Authorization": "Bearer guess"}}, 401),
            ("add a non-image", "POST", "/api/gallery", {"files": {"image": ("x.png", b"nope", "image/png")}, "headers": {"Authorization": f"Bearer {TOKEN}"}}, 400),
            ("unknown route", "GET", "/etc/passwd", {}, 404),
        ]
        answers = []
        for name, method, path, kwargs, status in hostile:
            r = client.request(method, path, **kwargs)
            answers.append((name, r.status_code))
            assert r.status_code == status, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert isinstance(error, str) and error and "\n" not in error, name
        print("hostile requests:", json.dumps(answers))
        assert proc.poll() is None  # still running
        assert client.get("/healthz").json() == {"status": "ok", "gallery_size": 13}


# -- issue 20: the server shares its index file with other processes --------------------------

def _png_bytes(path):
    return (path.name, path.read_bytes(), "image/png")


def test_the_server_and_a_cli_writer_keep_every_entry(tmp_path):
    """Case 2: `esreid index add` runs while the server adds over HTTP. The CLI has read the
    index and embedded when the server saves an addition; it then saves its own, and the
    server's next addition comes after it: nothing is lost either way, and the server
    answers with what the file holds."""
    import os
    import subprocess
    import sys

    from rendezvous_cli import __file__ as helper

    from esreid.search import GalleryIndex

    rng = np.random.default_rng(21)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", 0)
    base = [_image(tmp_path / "gallery" / p / f"{i}.png", rng) for p in ("ann", "ben") for i in range(2)]
    cli_images = [_image(tmp_path / "cli" / "cy" / f"{i}.png", rng) for i in range(3)]
    uploads = [_image(tmp_path / f"upload{i}.png", rng) for i in range(2)]
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp_path / "gallery"),
                 "--out", str(index)]) == 0
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESREID_TEST_HOOK": "embed_files",
           "ESREID_TEST_PARTIES": "2", "ESREID_TEST_RENDEZVOUS": str(rendezvous)}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_server(index, tmp_path / "serve.log", "--token", TOKEN) as (proc, url, health), \
            httpx.Client(base_url=url, timeout=60) as client:
        assert health["gallery_size"] == 4
        cli = subprocess.Popen([sys.executable, helper, "index", "add", str(index), "--images",
                                str(tmp_path / "cli")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
        try:
            deadline = time.monotonic() + 180
            while not any(p.name.startswith("arrived-") for p in rendezvous.iterdir()):
                assert cli.poll() is None, cli.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "the CLI did not get to its write"
                time.sleep(0.1)
            # The CLI holds its snapshot of 4 images; the server adds a fifth meanwhile.
            r = client.post("/api/gallery", headers=auth, data={"label": "hugo"},
                            files={"image": _png_bytes(uploads[0])})
            assert r.status_code == 200, r.text
            assert r.json()["gallery_size"] == 5
            (rendezvous / "arrived-test").touch()
            out, err = cli.communicate(timeout=180)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(timeout=30)
        assert cli.returncode == 0, err[-2000:]
        assert "added 3 images (0 files skipped), 8 in all" in out
        # The server serves what the CLI wrote (it re-reads a file changed on disk).
        assert client.get("/healthz").json() == {"status": "ok", "gallery_size": 8}
        r = client.post("/api/search?k=1", files={"image": _png_bytes(cli_images[1])})
        best = r.json()["matches"][0]
        assert best["path"] == str(cli_images[1]) and best["label"] == "cy"
        assert best["distance"] == pytest.approx(0.0, abs=1e-5)
        # And its next addition goes on top of the CLI's.
        r = client.post("/api/gallery", headers=auth, files={"image": _png_bytes(uploads[1])})
        assert r.status_code == 200 and r.json()["gallery_size"] == 9
        final = GalleryIndex.load(index)
        for i in range(final.count):
            assert client.get(f"/api/gallery/{i}/image").status_code == 200
        assert proc.poll() is None
    assert final.count == 9
    files = [final.file_path(i) for i in range(final.count)]
    assert files[:4] == [str(p) for p in base]
    assert files[5:8] == [str(p) for p in cli_images]
    assert final.labels == ["ann", "ann", "ben", "ben", "hugo", "cy", "cy", "cy", None]
    # The uploads are stored under the index's uploads folder, relative to the index.
    assert [final.paths[i] for i in (4, 8)] == [f"g.index.uploads/{Path(files[i]).name}"
                                                for i in (4, 8)]
    from esreid.inference import ReIDModel

    model = ReIDModel.from_checkpoint(ckpt)
    np.testing.assert_allclose(final.features[:8], model.embed(files[:8]), atol=1e-5)


def test_uploads_are_found_from_any_directory_and_after_a_move(tmp_path, monkeypatch, capsys):
    """Case 5: a server started with a relative --index from one directory stores uploads
    relative to the index file; a server started from another directory, after the index
    and its uploads folder moved together, shows them and explains them, and so does
    `esreid search --explain`."""
    import shutil

    rng = np.random.default_rng(22)
    ckpt = _checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", 0)
    for person in ("ann", "ben"):
        for i in range(2):
            _image(tmp_path / "gallery" / person / f"{i}.png", rng)
    site = tmp_path / "site"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp_path / "gallery"),
                 "--out", str(site / "g.index")]) == 0
    here = tmp_path / "here"
    here.mkdir()
    upload = _image(tmp_path / "visitor.png", rng)
    with running_server(Path("../site/g.index"), tmp_path / "a.log", "--token", TOKEN,
                        cwd=here) as (_, url, _health), httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/api/gallery", headers={"Authorization": f"Bearer {TOKEN}"},
                   data={"label": "vic"}, files={"image": _png_bytes(upload)})
        assert r.status_code == 200, r.text
        (added,) = r.json()["added"]
        assert added["id"] == 4 and Path(added["path"]).parent == site / "g.index.uploads"
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("g.index", "g.index.uploads"):
        shutil.move(site / name, moved / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with running_server(moved / "g.index", tmp_path / "b.log", cwd=elsewhere) as (_, url, health), \
            httpx.Client(base_url=url, timeout=60) as c:
        assert health["gallery_size"] == 5
        r = c.get("/api/gallery/4/image")
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        r = c.post("/api/explain", files={"image": _png_bytes(upload)}, data={"gallery_id": "4"})
        assert r.status_code == 200, r.text
        assert r.json()["distance"] == pytest.approx(0.0, abs=1e-5)
        r = c.post("/api/search?k=1", files={"image": _png_bytes(upload)})
        best = r.json()["matches"][0]
        assert best["id"] == 4 and best["label"] == "vic"
        assert best["path"] == str(moved / "g.index.uploads" / Path(added["path"]).name)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["search", "--index", str(moved / "g.index"), str(upload), "--top-k", "2",
                 "--explain", "why"]) == 0
    assert (elsewhere / "why" / "query00_visitor.png").is_file()


def test_serve_on_a_busy_port_fails_before_saying_it_serves(tmp_path):
    import socket
    import subprocess
    import sys

    rng = np.random.default_rng(23)
    ckpt = _checkpoint(tmp_path / "last.pt", 0)
    for i in range(2):
        _image(tmp_path / "gallery" / "ann" / f"{i}.png", rng)
    index = tmp_path / "g.index"
    assert main(["index", "build", "--checkpoint", str(ckpt), "--images", str(tmp_path / "gallery"),
                 "--out", str(index)]) == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "esreid.cli", "serve", "--index", str(index),
                               "--host", "127.0.0.1", "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "serving" not in done.stdout
    assert done.stderr.splitlines()[0] == (
        f"esreid serve: error: cannot listen on 127.0.0.1:{port}: Address already in use: "
        "another program is using the port (choose another with --port)")
