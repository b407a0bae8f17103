"""Time and memory of the evaluation code on benchmark-sized random inputs.

    python benchmarks/eval_speed.py [--sizes market msmt17 rerank rerank_msmt17 vehicleid]
                                    [--repeats 3]

Cases (each runs in its own child process so its peak RSS is its own):

* market    -- evaluate_rank on a random 3,368 x 15,913 float32 distance matrix (751 ids,
               6 cameras, 5% junk and 10% distractor gallery items). Target: < 2 s.
* msmt17    -- (a) evaluate_rank on a random 11,659 x 82,161 matrix (3,060 ids, 15 cameras):
               time and the extra peak beyond the 3.8 GB input (tracemalloc; numpy registers
               its buffers there); (b) evaluate_features on clustered random features of
               --dim dimensions, never holding the full matrix: time and peak RSS.
               Target: evaluate_features peak < 2 GB.
* rerank    -- k_reciprocal_rerank (k1=20, k2=6, lambda=0.3) on Market-sized clustered
               features of --dim dimensions: time, peak RSS and numpy peak (tracemalloc).
* rerank_msmt17 -- the same on MSMT17-sized clustered features (11,659 + 82,161 items):
               time and peak RSS, which includes the 3.8 GB float32 result. Not in the
               default set (minutes per run); no tracemalloc run, which would add one more.
* vehicleid -- evaluate_vehicleid, VehicleID Large: 2,400 identities, ~20,000 images of
               clustered random features, 10 draws: time and peak RSS.

Uniformly random distances are the worst case for evaluate_rank (every query's hardest
positive sits deep in the list, so whole rows get sorted); clustered features behave like a
trained model. Figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

CASES = ("market", "msmt17", "rerank", "rerank_msmt17", "vehicleid")
DEFAULT_CASES = ("market", "msmt17", "rerank", "vehicleid")
MB = 1024 * 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def labels(
    rng: np.random.Generator, nq: int, ng: int, num_ids: int, num_cams: int
) -> tuple[np.ndarray, ...]:
    """Market-like labels: ids 1..num_ids, 5% junk (-1) and 10% distractor (0) gallery items."""
    q_pids = rng.integers(1, num_ids + 1, size=nq)
    g_pids = rng.integers(1, num_ids + 1, size=ng)
    kind = rng.random(ng)
    g_pids[kind < 0.05] = -1
    g_pids[(kind >= 0.05) & (kind < 0.15)] = 0
    return q_pids, g_pids, rng.integers(0, num_cams, size=nq), rng.integers(0, num_cams, size=ng)


def clustered(
    rng: np.random.Generator, pids: np.ndarray, dim: int, noise: float = 1.5
) -> np.ndarray:
    """Float32 features: a random centre per identity plus Gaussian noise."""
    uniq, inverse = np.unique(pids, return_inverse=True)
    centres = rng.standard_normal((len(uniq), dim), dtype=np.float32)
    return centres[inverse] + noise * rng.standard_normal((len(pids), dim), dtype=np.float32)


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Run ``fn`` ``repeats`` times; return the wall times and the last result."""
    times, out = [], None
    for _ in range(repeats):
        out = None  # let the previous result go first, so peaks are those of one call
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def traced_peak_mb(fn: Callable[[], object]) -> float:
    """Peak of the memory tracemalloc sees allocated while ``fn`` runs, in MiB."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return (tracemalloc.get_traced_memory()[1] - base) / MB
    finally:
        tracemalloc.stop()


def _rank_case(name: str, seed: int, nq: int, ng: int, ids: int, cams: int, repeats: int,
               target: tuple[str, float] | None = None) -> dict:
    """evaluate_rank on a random nq x ng distance matrix held in memory."""
    from esreid.metrics import evaluate_rank

    rng = np.random.default_rng(seed)
    q_pids, g_pids, q_cams, g_cams = labels(rng, nq, ng, ids, cams)
    dist = rng.random((nq, ng), dtype=np.float32)
    times, res = timed(lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams), repeats)
    extra = traced_peak_mb(lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams))
    out = {
        "name": name,
        "times": times,
        "extra_peak_mb": extra,
        "input_mb": dist.nbytes / MB,
        "rss_mb": peak_rss_mb(),
        "metrics": res.to_dict(),
    }
    if target is not None:
        out["target"] = target
    return out


def case_market(repeats: int, dim: int) -> dict:
    """evaluate_rank on a Market-sized random distance matrix."""
    return _rank_case("market evaluate_rank (3,368 x 15,913, random)", 0, 3368, 15913, 751, 6,
                      repeats, target=("time", 2.0))


def case_msmt17_rank(repeats: int, dim: int) -> dict:
    """evaluate_rank on an MSMT17-sized random distance matrix held in memory."""
    return _rank_case("msmt17 evaluate_rank (11,659 x 82,161, random)", 1, 11659, 82161, 3060, 15,
                      repeats)


def case_msmt17_features(repeats: int, dim: int) -> dict:
    """evaluate_features on MSMT17-sized clustered features (no full distance matrix)."""
    from esreid.metrics import evaluate_features

    rng = np.random.default_rng(2)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 11659, 82161, 3060, 15)
    feats = clustered(rng, np.concatenate([q_pids, g_pids]), dim)
    qf, gf = feats[:11659], feats[11659:]
    times, res = timed(lambda: evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams), repeats)
    return {
        "name": f"msmt17 evaluate_features ({dim}-d clustered features)",
        "times": times,
        "input_mb": feats.nbytes / MB,
        "rss_mb": peak_rss_mb(),
        "target": ("rss", 2048.0),
        "metrics": res.to_dict(),
    }


def case_rerank(repeats: int, dim: int) -> dict:
    """k-reciprocal re-ranking on Market-sized clustered features."""
    from esreid.metrics import evaluate_rank, k_reciprocal_rerank

    rng = np.random.default_rng(3)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 3368, 15913, 751, 6)
    feats = clustered(rng, np.concatenate([q_pids, g_pids]), dim)
    qf, gf = feats[:3368], feats[3368:]
    times, dist = timed(lambda: k_reciprocal_rerank(qf, gf), repeats)
    extra = traced_peak_mb(lambda: k_reciprocal_rerank(qf, gf))
    return {
        "name": f"rerank k1=20 k2=6 (3,368 + 15,913, {dim}-d)",
        "times": times,
        "extra_peak_mb": extra,
        "rss_mb": peak_rss_mb(),
        "metrics": evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams).to_dict(),
    }


def case_rerank_msmt17(repeats: int, dim: int) -> dict:
    """k-reciprocal re-ranking on MSMT17-sized clustered features (the result alone is 3.8 GB)."""
    from esreid.metrics import evaluate_rank, k_reciprocal_rerank

    rng = np.random.default_rng(5)
    q_pids, g_pids, q_cams, g_cams = labels(rng, 11659, 82161, 3060, 15)
    feats = clustered(rng, np.concatenate([q_pids, g_pids]), dim)
    qf, gf = feats[:11659], feats[11659:]
    times, dist = timed(lambda: k_reciprocal_rerank(qf, gf), repeats)
    return {
        "name": f"rerank k1=20 k2=6 (11,659 + 82,161, {dim}-d)",
        "times": times,
        "input_mb": feats.nbytes / MB,
        "rss_mb": peak_rss_mb(),
        "metrics": evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams).to_dict(),
    }


def case_vehicleid(repeats: int, dim: int) -> dict:
    """VehicleID Large protocol: 2,400 identities, ~20,000 images, 10 draws."""
    from esreid.metrics import evaluate_vehicleid

    rng = np.random.default_rng(4)
    counts = 1 + rng.poisson(7.3, size=2400)
    pids = np.repeat(np.arange(2400), counts)
    feats = clustered(rng, pids, dim)
    times, res = timed(lambda: evaluate_vehicleid(feats, pids, num_draws=10), repeats)
    return {
        "name": f"vehicleid large, 10 draws ({len(pids)} images, {dim}-d)",
        "times": times,
        "rss_mb": peak_rss_mb(),
        "metrics": {k: v for k, v in res.items() if k != "draws"},
    }


WORKERS: dict[str, Callable[[int, int], dict]] = {
    "market": case_market,
    "msmt17_rank": case_msmt17_rank,
    "msmt17_features": case_msmt17_features,
    "rerank": case_rerank,
    "rerank_msmt17": case_rerank_msmt17,
    "vehicleid": case_vehicleid,
}
CASE_WORKERS = {
    "market": ["market"],
    "msmt17": ["msmt17_rank", "msmt17_features"],
    "rerank": ["rerank"],
    "rerank_msmt17": ["rerank_msmt17"],
    "vehicleid": ["vehicleid"],
}


def verdict(row: dict) -> str:
    """'target ...: met/MISSED' text for rows that carry a target."""
    if "target" not in row:
        return ""
    kind, limit = row["target"]
    if kind == "time":
        value, text = statistics.median(row["times"]), f"< {limit:g} s"
    else:
        value, text = row["rss_mb"], f"peak RSS < {limit / 1024:g} GB"
    return f"  target {text}: {'met' if value < limit else 'MISSED'}"


def report(row: dict) -> str:
    """One human-readable block for a finished case."""
    times = " ".join(f"{t:.2f}" for t in row["times"])
    lines = [f"{row['name']}", f"  median {statistics.median(row['times']):.2f} s  (runs: {times})"]
    mem = f"  peak RSS {row['rss_mb']:.0f} MiB"
    if "input_mb" in row:
        mem += f", input {row['input_mb']:.0f} MiB"
    if "extra_peak_mb" in row:
        mem += f", numpy peak beyond input (tracemalloc) {row['extra_peak_mb']:.0f} MiB"
    lines.append(mem)
    metrics = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["metrics"].items()
    )
    lines.append(f"  metrics: {metrics}")
    if verdict(row):
        lines.append(verdict(row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run each case in a child process and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median shown)")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension for feature cases")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.dim < 1:
        parser.error("--repeats and --dim must be positive")
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.repeats, args.dim)))
        return 0
    import torch

    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}, dim: {args.dim}\n")
    failed = 0
    for case in args.sizes:
        for worker in CASE_WORKERS[case]:
            cmd = [sys.executable, __file__, "--worker", worker, "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd + ["--dim", str(args.dim)], capture_output=True, text=True)
            if proc.returncode != 0:
                failed += 1
                print(f"{worker}: failed (exit {proc.returncode})\n{proc.stderr.strip()}\n")
                continue
            print(report(json.loads(proc.stdout.strip().splitlines()[-1])) + "\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
