"""Query latency and memory of gallery search (esreid.search) on random ES-Net-sized descriptors.

    python benchmarks/search.py [--dim 4096] [--sizes 10000 100000] [--memory-gb 8]
                                [--queries 100] [--ivf-size 100000] [--threads N]

Cases, each in its own child process so its peak RSS is its own, at each ``--sizes`` and at
the largest gallery whose features plus faiss's copy fit in ``--memory-gb``
(``N = memory / (2 * dim * 4 bytes)``; 262,144 for 8 GiB at D = 4096):

* flat   -- ``GalleryIndex(kind="flat").search_arrays`` of one query at a time: faiss flat
            scan, exact float64 rescoring of the candidates, the exactness check.
* numpy  -- the same with ``kind="numpy"``: a BLAS matrix-vector scan of the features
            themselves instead of faiss (no second copy).
* brute  -- a bare numpy brute force for comparison, as evaluation ranks: a normalised
            gallery copy (cosine), one matrix-vector product per query, argpartition for the
            top 10 and a stable sort of those; no exactness check.
* ivf    -- ``kind="ivf"`` (faiss IndexIVFFlat, default nlist unless given) at ``--ivf-size``:
            build time, then latency and recall@10 against exact search for each
            ``--nprobe`` (default: nlist/16, nlist/8 and the index's default nlist/4).

"add" is the time spent adding the gallery (copies, normalising, faiss's copy, IVF
training), not generating it. Latency excludes embedding: queries are descriptors.
Top-10 for every case; p50/p99 over
``--queries`` single-query searches after 5 warm-up ones. "agrees" says whether the case
returned the same top-10 positions as the bare brute force; "widened" counts the queries
whose exactness check needed the second (range) pass.

Descriptors are clustered like a trained model's: identities of about 8 images, each image
its identity's centre (in a 64-d subspace) plus isotropic noise, so same-identity cosine
similarity is about 0.67 and different-identity about 0 +- 0.09; queries are fresh images of
gallery identities (each in the gallery about 8 times, Poisson-distributed). Figures depend on the machine and on what else runs on it.
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
        tops.append([int(v) for v in top])
    return times, tops


def summary(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def case_exact(kind: str, n: int, dim: int, nq: int, metric: str) -> dict:
    from esreid.search import GalleryIndex

    index = GalleryIndex.create("bench", metric, dim, kind)
    build = 0.0
    for chunk in gallery_chunks(n, dim):
        t0 = time.perf_counter()
        index.add(chunk, [""] * len(chunk))
        build += time.perf_counter() - t0
    widened = []
    within = index._within

    def counted(*args):
        widened.append(1)
        return within(*args)

    index._within = counted
    times, tops = latencies(lambda x: index.search_arrays(x, TOP_K)[0][0], queries(n, dim, nq))
    return {"build_s": build, **summary(times), "widened": len(widened), "tops": tops}


def case_brute(n: int, dim: int, nq: int, metric: str) -> dict:
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
        q = x[0]
        if metric == "cosine":
            d = 1.0 - gallery @ (q / max(float(np.linalg.norm(q)), 1e-12))
        else:
            d = np.sqrt(np.maximum(g_sq - 2.0 * (gallery @ q) + float(q @ q), 0.0))
        part = np.argpartition(d, TOP_K - 1)[:TOP_K]
        return part[np.lexsort((part, d[part]))]

    times, tops = latencies(search, queries(n, dim, nq))
    return {"build_s": build, **summary(times), "tops": tops}


def case_ivf(n: int, dim: int, nq: int, metric: str, nlist: int | None,
             nprobes: list[int] | None) -> dict:
    from esreid.search import GalleryIndex, recall_at_k
    from esreid.search.index import default_nlist

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
        times, _ = latencies(lambda x: index.search_arrays(x, TOP_K)[0][0], q)
        runs.append({"nprobe": nprobe, **summary(times), "recall": recall_at_k(index, q, TOP_K)})
    return {"build_s": build, "nlist": index.nlist, "runs": runs}


def run_case(args: argparse.Namespace, case: str, n: int) -> dict:
    """Run one case in a child process; returns its measurements (or an error)."""
    cmd = [sys.executable, __file__, "--child", case, str(n), "--dim", str(args.dim),
           "--queries", str(args.queries), "--threads", str(args.threads), "--metric", args.metric]
    if args.nlist:
        cmd += ["--nlist", str(args.nlist)]
    if args.nprobe:
        cmd += ["--nprobe", *map(str, args.nprobe)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def child(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    case, n = args.child[0], int(args.child[1])
    if case in ("flat", "numpy"):
        out = case_exact(case, n, args.dim, args.queries, args.metric)
    elif case == "brute":
        out = case_brute(n, args.dim, args.queries, args.metric)
    else:
        out = case_ivf(n, args.dim, args.queries, args.metric, args.nlist, args.nprobe)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=4096, help="descriptor length (ES-Net R50: 4096)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="GiB for features + faiss copy of the largest case (0: skip it)")
    parser.add_argument("--queries", type=int, default=100, help="timed single queries per case")
    parser.add_argument("--ivf-size", type=int, default=100_000, help="0: skip the ivf case")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, nargs="*", default=None)
    parser.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["flat", "numpy", "brute"],
                        help="exact cases to leave out")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    sizes = list(args.sizes)
    if args.memory_gb > 0:
        sizes.append(int(args.memory_gb * GIB // (2 * args.dim * 4)))
    print(f"dim {args.dim}, {args.metric}, top-{TOP_K}, {args.queries} single queries per case, "
          f"{args.threads} threads, {os.cpu_count()} cores", flush=True)
    cases = [c for c in ("flat", "numpy", "brute") if c not in args.skip]
    names = {"flat": "exact, kind=flat (faiss)", "numpy": "exact, kind=numpy (BLAS)",
             "brute": "bare numpy brute force"}
    rows = []
    for n in sizes:
        results = {}
        for case in cases:
            results[case] = run_case(args, case, n)
            shown = {k: v for k, v in results[case].items() if k != "tops"}
            print(f"  {case} {n}: {json.dumps(shown)}", flush=True)
        reference = results.get("brute", {}).get("tops")
        for case in cases:
            res = results[case]
            agree = "-" if reference is None or "tops" not in res or case == "brute" \
                else ("yes" if res["tops"] == reference else "NO")
            copies = 1 if case == "numpy" else 2
            rows.append((names[case], n, copies * n * args.dim * 4 / GIB, res, agree))
    if args.ivf_size > 0:
        ivf = run_case(args, "ivf", args.ivf_size)
        gb = 2 * args.ivf_size * args.dim * 4 / GIB
        print(f"  ivf {args.ivf_size}: {json.dumps(ivf)}", flush=True)
        for run in ivf.get("runs", [{"nprobe": "?"}]):
            label = f"approximate, kind=ivf (nlist {ivf.get('nlist')}, nprobe {run['nprobe']})"
            rows.append((label, args.ivf_size, gb, {**ivf, **run} if "error" not in ivf else ivf, "-"))

    print()
    print("| search | gallery | features (+ copy) | add | p50 | p99 | peak RSS | "
          "recall@10 | agrees | widened |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name, n, gb, res, agree in rows:
        if "error" in res:
            print(f"| {name} | {n:,} | {gb:.2f} GiB | {res['error']} | | | | | | |")
            continue
        recall = f"{res['recall']:.3f}" if "recall" in res else \
            ("1 (exact)" if name.startswith("exact") else "-")
        print(f"| {name} | {n:,} | {gb:.2f} GiB | {res['build_s']:.1f} s | {res['p50_ms']:.1f} ms"
              f" | {res['p99_ms']:.1f} ms | {res['peak_rss_mb'] / 1024:.2f} GiB | {recall} | "
              f"{agree} | {res.get('widened', '-')} |")


if __name__ == "__main__":
    main()
