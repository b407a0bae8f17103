"""The real `esreid serve` process on 127.0.0.1: a bounded burst of concurrent searches (with
an addition in the middle) and a batch of hostile requests; every answer is checked and the
process must still be alive and healthy afterwards."""

import concurrent.futures
import json
import time

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
