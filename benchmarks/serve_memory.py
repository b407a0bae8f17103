"""Peak and settled memory of `esreid serve` under a burst of large uploads (issue 20, case 9;
not a test).

    python benchmarks/serve_memory.py [--runs 3] [--clients 20] [--side 6000] [--src DIR]

Builds a tiny untrained ResNet-18 checkpoint (128x64 input), a gallery of random 128x64
images and its index, and a simple 6000x6000 RGB PNG (about 120 KB on disk, 36 M pixels
decoded). Each run starts a fresh `esreid serve` (a real uvicorn process on 127.0.0.1),
warms it with one small search, then sends ``--clients`` concurrent searches of the large
PNG (no token needed) and reads the server's /proc status: RSS before the burst, its peak
during the burst (VmHWM, reset just before with clear_refs) and RSS 3 s after the last
answer. Prints one JSON line per run and the medians.

``--src`` runs the server from another source tree (e.g. an older commit exported with
``git archive <commit> src | tar -x -C /tmp/old``, then ``--src /tmp/old/src``), so the
same script measures before and after a change. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MB = 1024 * 1024


def status_mb(pid: int, field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of process ``pid``, in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Restart the peak-RSS count of ``pid`` at its current RSS (Linux clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def prepare(root: Path, gallery_size: int, side: int) -> tuple[Path, Path, bytes, bytes]:
    """Checkpoint, gallery folder, the large PNG's bytes and a small query's bytes."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from esreid.config import load_config
    from esreid.engine.checkpoint import save_checkpoint
    from esreid.models.esnet import build_model

    torch.manual_seed(0)
    cfg = load_config("esnet", ["model.backbone=resnet18", "model.pretrained=none",
                                "data.height=128", "data.width=64", "eval.batch_size=32"])
    model = build_model(cfg.model, 10, cfg.erase)
    ckpt = root / "model.pt"
    save_checkpoint({"model": model.state_dict(), "num_classes": 10, "config": cfg.to_dict()}, ckpt)
    rng = np.random.default_rng(0)
    gallery = root / "gallery"
    for i in range(gallery_size):
        folder = gallery / f"id{i % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    big = Image.new("RGB", (side, side), (120, 130, 140))
    draw = ImageDraw.Draw(big)
    for x in range(0, side, 400):  # a few flat bands: tiny on disk, 36 M pixels decoded
        draw.rectangle((x, x, x + 300, side - 1), fill=(x % 255, 80, 200 - x % 200))
    buffer = io.BytesIO()
    big.save(buffer, format="PNG", optimize=True)
    small = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(small, format="PNG")
    return ckpt, gallery, buffer.getvalue(), small.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_image(url: str, data: bytes, name: str) -> int:
    """POST ``data`` as the multipart field ``image``; returns the HTTP status."""
    boundary = "esreidbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def one_run(index: Path, env: dict, big: bytes, small: bytes, clients: int, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "esreid.cli", "serve", "--index", str(index),
                                 "--host", "127.0.0.1", "--port", str(port),
                                 "--max-upload-mb", "20"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.2)
        assert post_image(url + "/api/search?k=5", small, "warm.png") == 200
        time.sleep(1.0)
        before = status_mb(proc.pid, "VmRSS")
        reset_peak(proc.pid)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
            codes = list(pool.map(lambda _: post_image(url + "/api/search?k=5", big, "big.png"),
                                  range(clients)))
        burst_s = time.perf_counter() - start
        peak = status_mb(proc.pid, "VmHWM")
        time.sleep(3.0)
        after = status_mb(proc.pid, "VmRSS")
        return {"before_mb": round(before), "peak_mb": round(peak), "after_mb": round(after),
                "burst_s": round(burst_s, 1), "statuses": sorted(set(codes)),
                "answered": codes.count(200)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    """Prepare once, then measure ``--runs`` fresh servers; print each run and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--gallery", type=int, default=200)
    parser.add_argument("--src", help="source tree the server runs from (default: installed esreid)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt, gallery, big, small = prepare(root, args.gallery, args.side)
        index = root / "g.index"
        subprocess.run([sys.executable, "-m", "esreid.cli", "index", "build", "--checkpoint",
                        str(ckpt), "--images", str(gallery), "--out", str(index),
                        "--threshold", "0.3"], env=env, check=True, capture_output=True)
        runs = []
        for i in range(args.runs):
            result = one_run(index, env, big, small, args.clients, root / f"serve{i}.log")
            print(json.dumps({"run": i, **result}), flush=True)
            runs.append(result)
    summary = {key: statistics.median(r[key] for r in runs)
               for key in ("before_mb", "peak_mb", "after_mb", "burst_s")}
    print(json.dumps({"median_of": len(runs), "clients": args.clients,
                      "image": f"{args.side}x{args.side} PNG, {len(big) / 1024:.0f} KiB",
                      "src": args.src or "installed", **summary}))


if __name__ == "__main__":
    main()
