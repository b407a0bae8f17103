"""Time and peak memory of tpr_at_fpr_features at MSMT17 size (not a test).

    python benchmarks/verification_memory.py [--nq 11659] [--ng 82161] [--dim 256]
                                             [--repeats 3] [--chunk-size 256]

Builds MSMT17-like labels (3,060 ids, 15 cameras, 5% junk and 10% distractor gallery items)
and clustered random features (see eval_speed.py), then runs tpr_at_fpr_features with the
default targets (1e-4, 1e-3, 1e-2) and cosine distance in a child process per run, so each
peak RSS is that run's own. The full 11,659 x 82,161 matrix would be 958M pairs (3.8 GB as
float32); the function never holds it. Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from eval_speed import clustered, labels  # sibling script: same label and feature generator

MB = 1024 * 1024


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux clear_refs); False if refused.

    Without this the peak would be that of building the random features, not of the call.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """One timed call in this process; returns time, RSS before and peak RSS, and results."""
    import torch

    from esreid.metrics import tpr_at_fpr_features

    rng = np.random.default_rng(args.seed)
    q_pids, g_pids, q_cams, g_cams = labels(rng, args.nq, args.ng, 3060, 15)
    feats = clustered(rng, np.concatenate([q_pids, g_pids]), args.dim)
    qf, gf = feats[: args.nq], feats[args.nq :]
    del feats
    gc.collect()
    rss_before = rss_mb("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    res = tpr_at_fpr_features(qf, gf, q_pids, g_pids, q_cams, g_cams, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "peak_rss_mb": rss_mb("VmHWM"),
        "peak_is_call_only": reset,
        "input_mb": (qf.nbytes + gf.nbytes) / MB,
        "threads": torch.get_num_threads(),
        "result": {str(f): list(v) for f, v in res.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run ``--repeats`` child processes and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nq", type=int, default=11659)
    parser.add_argument("--ng", type=int, default=82161)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.nq, args.ng, args.dim, args.repeats, args.chunk_size) < 1:
        parser.error("sizes, --repeats and --chunk-size must be positive")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    pairs = args.nq * args.ng
    print(
        f"tpr_at_fpr_features: {args.nq:,} queries x {args.ng:,} gallery = {pairs / 1e6:,.0f}M "
        f"pairs ({pairs * 4 / MB:,.0f} MiB as a float32 matrix), {args.dim}-d, cosine, "
        f"chunk_size {args.chunk_size}"
    )
    cmd = [sys.executable, __file__, "--worker"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker"
    ]
    runs = []
    for _ in range(args.repeats):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"run failed (exit {proc.returncode})\n{proc.stderr.strip()}")
            return 1
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    times = [r["seconds"] for r in runs]
    print(f"torch threads: {runs[0]['threads']}")
    print(
        f"time: median {statistics.median(times):.1f} s (runs: "
        f"{' '.join(f'{t:.1f}' for t in times)})"
    )
    print(
        f"peak RSS: median {statistics.median(r['peak_rss_mb'] for r in runs):.0f} MiB "
        f"(RSS before the call {runs[0]['rss_before_mb']:.0f} MiB, of which features "
        f"{runs[0]['input_mb']:.0f} MiB)"
    )
    if not runs[0]["peak_is_call_only"]:
        print("  (could not reset the peak counter: peak includes building the features)")
    for f, (tpr, thr) in runs[0]["result"].items():
        print(f"  FPR <= {float(f):g}: TPR {tpr:.4f} at threshold {thr:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
