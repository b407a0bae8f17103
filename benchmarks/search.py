"""Query latency and memory of gallery search (esreid.search) on random ES-Net-sized descriptors.

    python benchmarks/search.py [--dim 4096] [--sizes 10000 100000] [--queries 100]
                                [--batches 10] [--batch 32] [--ivf-size 0] [--threads N]
                                [--cases flat numpy numpy-f32 qdrant brute]

Cases, each in its own child process so its peak RSS is its own, at each ``--sizes``:

* flat      -- ``kind="flat"``: faiss flat scan, exact float64 rescoring of the candidates,
               the exactness check.
* numpy     -- ``kind="numpy"``, the default, as it chooses its kernel (``scan="auto"``:
               the bfloat16 copy for cosine galleries of 20,000 or more, else float32 BLAS).
* numpy-f32 -- ``kind="numpy", scan="float32"``: the float32 BLAS scan of the features.
* qdrant    -- ``kind="qdrant"`` in qdrant-client's local mode, in memory (``:memory:``: a
               local folder persists every point with its own SQLite commit, about 60
               points/s here, so 100,000 points would take half an hour to add).
* brute     -- a bare numpy brute force for comparison, as evaluation ranks: a normalised
               gallery copy (cosine), one matrix product, argpartition for the top 10 and a
               stable sort of those; no exactness check.
* ivf       -- ``kind="ivf"`` at ``--ivf-size`` (0: skipped): latency and recall@10.

Single: p50/p99 over ``--queries`` one-query searches after 5 warm-up ones. Batched: p50/p99
of the wall time of ``--batches`` searches of ``--batch`` queries at once, and that time
divided by the batch size (per query). "add" is the time spent adding the gallery, not
generating it. Latency excludes embedding: queries are descriptors. Top-10 for every case.
"agrees" says whether the case returned the same top-10 positions as the bare brute force
for every single query; "widened" counts the single queries whose exactness check needed
the second (range) pass.

Descriptors are clustered like a trained model's: identities of about 8 images, each image
its identity's centre (in a 64-d subspace) plus isotropic noise, so same-identity cosine
similarity is about 0.67 and different-identity about 0 +- 0.09; queries are fresh images of
gallery identities (each in the gallery about 8 times, Poisson-distributed). Figures depend
on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

GIB = 1024 ** 3
LATENT = 64
IMAGES_PER_ID = 8
NOISE = 0.7
CHUNK = 4096
TOP_K = 10
WARMUP = 5


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mixing(dim: int) -> np.ndarray:
    """The fixed map from an identity's latent code to its centre."""
    rng = np.random.default_rng(1)
    return (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)


def gallery_chunks(n: int, dim: int, seed: int = 0):
    """Yield the gallery in float32 chunks of ``CHUNK`` rows (the same for every case)."""
    w = mixing(dim)
    n_ids = max(1, n // IMAGES_PER_ID)
    codes = np.random.default_rng([seed, 10**9]).standard_normal((n_ids, LATENT)).astype(np.float32)
    for start in range(0, n, CHUNK):
        rng = np.random.default_rng([seed, start])
        rows = min(CHUNK, n - start)
        x = codes[rng.integers(0, n_ids, rows)] @ w
        x += NOISE * rng.standard_normal((rows, dim), dtype=np.float32)
        yield x


def queries(n: int, dim: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` fresh images of random gallery identities."""
    w = mixing(dim)
    n_ids = max(1, n // IMAGES_PER_ID)
    codes = np.random.default_rng([seed, 10**9]).standard_normal((n_ids, LATENT)).astype(np.float32)
    rng = np.random.default_rng([seed, 7])
    x = codes[rng.integers(0, n_ids, count)] @ w
    return x + NOISE * rng.standard_normal((count, dim), dtype=np.float32)


def latencies(search, q: np.ndarray) -> tuple[list[float], list[list[int]]]:
    """Time ``search`` on each query alone; returns seconds and the top-k positions."""
    for i in range(min(WARMUP, len(q))):
        search(q[i:i + 1])
    times, tops = [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        top = search(q[i:i + 1])
        times.append(time.perf_counter() - t0)
        tops.append([int(v) for v in top[0]])
    return times, tops


def batch_latencies(search, q: np.ndarray, batches: int, size: int) -> list[float]:
    """Wall time of ``batches`` searches of ``size`` queries at once (after one warm-up)."""
    search(q[:size])
    times = []
    for b in range(batches):
        chunk = np.roll(q, -b * size, axis=0)[:size]
        t0 = time.perf_counter()
        search(chunk)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float], prefix: str = "") -> dict:
    ms = np.asarray(times) * 1000
    return {f"{prefix}p50_ms": float(np.percentile(ms, 50)),
            f"{prefix}p99_ms": float(np.percentile(ms, 99))}


def case_index(case: str, n: int, dim: int, nq: int, metric: str, batches: int,
               batch: int) -> dict:
    from esreid.search import GalleryIndex

    kind, settings = {"flat": ("flat", {}), "numpy": ("numpy", {}),
                      "numpy-f32": ("numpy", {"scan": "float32"}),
                      "qdrant": ("qdrant", {"store": ":memory:", "collection": "bench"})}[case]
    index = GalleryIndex.create("bench", metric, dim, kind, **settings)
    build = 0.0
    # Qdrant takes the gallery in pieces anyway; the in-memory kinds grow their blocks.
    for start, chunk in enumerate(gallery_chunks(n, dim)):
        t0 = time.perf_counter()
        first = start * CHUNK
        index.add(chunk, [f"{i}" for i in range(first, first + len(chunk))],
                  ids=[f"00000000-0000-4000-8000-{i:012d}" for i in range(first, first + len(chunk))])
        build += time.perf_counter() - t0
    backend = index.backend
    widened = []
    if hasattr(backend, "within"):
        within = backend.within

        def counted(*args):
            widened.append(1)
            return within(*args)

        backend.within = counted
    q = queries(n, dim, max(nq, batch))

    def search(x):
        return index.search_arrays(x, TOP_K)[0]

    times, tops = latencies(search, q[:nq])
    out = {"build_s": build, **summary(times), "widened": len(widened), "tops": tops,
           "kernel": getattr(backend, "kernel", None)}
    if batches:
        bt = batch_latencies(search, q, batches, batch)
        out.update(summary(bt, "batch_"))
        out.update(summary([t / batch for t in bt], "per_query_"))
    return out


def case_brute(n: int, dim: int, nq: int, metric: str, batches: int, batch: int) -> dict:
    feats = np.empty((n, dim), dtype=np.float32)
    start = 0
    for chunk in gallery_chunks(n, dim):
        feats[start:start + len(chunk)] = chunk
        start += len(chunk)
    t0 = time.perf_counter()
    if metric == "cosine":
        # compute_distance normalises the gallery on every call; a server would keep it.
        gallery = np.empty_like(feats)
        for s in range(0, n, CHUNK):
            block = feats[s:s + CHUNK]
            gallery[s:s + CHUNK] = block / np.maximum(np.linalg.norm(block, axis=1), 1e-12)[:, None]
    else:
        gallery = feats
        g_sq = np.einsum("ij,ij->i", feats, feats)
    build = time.perf_counter() - t0

    def search(x: np.ndarray) -> np.ndarray:
        if metric == "cosine":
            qn = x / np.maximum(np.linalg.norm(x, axis=1), 1e-12)[:, None]
            d = 1.0 - qn @ gallery.T
        else:
            d = np.sqrt(np.maximum(g_sq[None] - 2.0 * (x @ gallery.T)
                                   + np.einsum("ij,ij->i", x, x)[:, None], 0.0))
        part = np.argpartition(d, TOP_K - 1, axis=1)[:, :TOP_K]
        vals = np.take_along_axis(d, part, axis=1)
        return np.stack([p[np.lexsort((p, v))] for p, v in zip(part, vals, strict=True)])

    q = queries(n, dim, max(nq, batch))
    times, tops = latencies(search, q[:nq])
    out = {"build_s": build, **summary(times), "tops": tops}
    if batches:
        bt = batch_latencies(search, q, batches, batch)
        out.update(summary(bt, "batch_"))
        out.update(summary([t / batch for t in bt], "per_query_"))
    return out


def case_ivf(n: int, dim: int, nq: int, metric: str, nlist: int | None,
             nprobes: list[int] | None) -> dict:
    from esreid.search import GalleryIndex, recall_at_k
    from esreid.search.backends.faiss import default_nlist

    # The first batch added trains the lists: size them for the whole gallery.
    nlist = nlist or default_nlist(n)
    index = GalleryIndex.create("bench", metric, dim, "ivf", nlist=nlist)
    build = 0.0
    batch = max(CHUNK, 64 * nlist)
    pending = []
    for chunk in gallery_chunks(n, dim):
        pending.append(chunk)
        if sum(len(c) for c in pending) >= batch:
            t0 = time.perf_counter()
            index.add(np.concatenate(pending), [""] * sum(len(c) for c in pending))
            build += time.perf_counter() - t0
            pending = []
    if pending:
        t0 = time.perf_counter()
        index.add(np.concatenate(pending), [""] * sum(len(c) for c in pending))
        build += time.perf_counter() - t0
    q = queries(n, dim, nq)
    runs = []
    for nprobe in nprobes or [max(1, nlist // 16), max(1, nlist // 8), index.nprobe]:
        index.nprobe = nprobe
        times, _ = latencies(lambda x: index.search_arrays(x, TOP_K)[0], q)
        runs.append({"nprobe": nprobe, **summary(times), "recall": recall_at_k(index, q, TOP_K)})
    return {"build_s": build, "nlist": index.nlist, "runs": runs}


def run_case(args: argparse.Namespace, case: str, n: int) -> dict:
    """Run one case in a child process; returns its measurements (or an error)."""
    cmd = [sys.executable, __file__, "--child", case, str(n), "--dim", str(args.dim),
           "--queries", str(args.queries), "--threads", str(args.threads), "--metric", args.metric,
           "--batches", str(args.batches), "--batch", str(args.batch)]
    if args.nlist:
        cmd += ["--nlist", str(args.nlist)]
    if args.nprobe:
        cmd += ["--nprobe", *map(str, args.nprobe)]
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def child(args: argparse.Namespace) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    case, n = args.child[0], int(args.child[1])
    if case == "brute":
        out = case_brute(n, args.dim, args.queries, args.metric, args.batches, args.batch)
    elif case == "ivf":
        out = case_ivf(n, args.dim, args.queries, args.metric, args.nlist, args.nprobe)
    else:
        out = case_index(case, n, args.dim, args.queries, args.metric, args.batches, args.batch)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


NAMES = {"flat": "exact, kind=flat (faiss)", "numpy": "exact, kind=numpy (default: auto kernel)",
         "numpy-f32": "exact, kind=numpy scan=float32 (BLAS)",
         "qdrant": "exact, kind=qdrant (local mode, in memory)",
         "brute": "bare numpy brute force (no exactness check)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=4096, help="descriptor length (ES-Net R50: 4096)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100, help="timed single queries per case")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per case (0: none)")
    parser.add_argument("--batch", type=int, default=32, help="queries per batch")
    parser.add_argument("--ivf-size", type=int, default=0, help="0: skip the ivf case")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, nargs="*", default=None)
    parser.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cases", nargs="*", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    print(f"dim {args.dim}, {args.metric}, top-{TOP_K}, {args.queries} single queries and "
          f"{args.batches} batches of {args.batch} per case, {args.threads} threads, "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    for n in args.sizes:
        results = {}
        for case in args.cases:
            results[case] = run_case(args, case, n)
            shown = {k: v for k, v in results[case].items() if k != "tops"}
            print(f"  {case} {n}: {json.dumps(shown)}", flush=True)
        reference = results.get("brute", {}).get("tops")
        for case in args.cases:
            res = results[case]
            agree = "-" if reference is None or "tops" not in res or case == "brute" \
                else ("yes" if res["tops"] == reference else "NO")
            rows.append((NAMES[case], n, res, agree))
    if args.ivf_size > 0:
        ivf = run_case(args, "ivf", args.ivf_size)
        print(f"  ivf {args.ivf_size}: {json.dumps(ivf)}", flush=True)
        for run in ivf.get("runs", []):
            print(f"  ivf nprobe {run['nprobe']}: p50 {run['p50_ms']:.1f} ms, p99 "
                  f"{run['p99_ms']:.1f} ms, recall@10 {run['recall']:.3f}")

    print()
    print(f"| search | gallery | add | single p50 | single p99 | batch of {args.batch} p50 | "
          f"batch p99 | per query in a batch (p50) | peak RSS | agrees | widened |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, n, res, agree in rows:
        if "error" in res:
            print(f"| {name} | {n:,} | {res['error']} | | | | | | | | |")
            continue
        kernel = f" [{res['kernel']}]" if res.get("kernel") else ""
        batch = (f"{res['batch_p50_ms']:.1f} ms | {res['batch_p99_ms']:.1f} ms | "
                 f"{res['per_query_p50_ms']:.1f} ms") if "batch_p50_ms" in res else "- | - | -"
        print(f"| {name}{kernel} | {n:,} | {res['build_s']:.1f} s | {res['p50_ms']:.1f} ms | "
              f"{res['p99_ms']:.1f} ms | {batch} | {res['peak_rss_mb'] / 1024:.2f} GiB | "
              f"{agree} | {res.get('widened', '-')} |")


if __name__ == "__main__":
    main()
