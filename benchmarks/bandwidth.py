"""The memory-bandwidth limit of decoding: how fast this machine reads weight bytes.

    python -m benchmarks.bandwidth [--mb 512] [--threads 2] [--runs 7]

Two plain reads of a float32 buffer larger than the caches, each the median of --runs: numpy
summing --threads slices in parallel threads (numpy releases the GIL in the reduction), and a
matrix-vector product x @ W (numpy's BLAS, the access pattern of a decode step). The faster one is
the limit; tokens/s at that limit = bandwidth / the bytes a decode step must read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.common import add_out, save_json


def read_gb_s(mb: int, threads: int, runs: int) -> dict:
    n = mb * (1 << 20) // 4
    buf = np.random.default_rng(0).random(n, dtype=np.float32)
    parts = np.array_split(buf, threads)
    w = buf[: (n // 4096) * 4096].reshape(-1, 4096)  # (rows, 4096)
    x = np.ones(w.shape[0], np.float32)

    def timed(fn) -> float:
        fn()  # warm
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return buf.nbytes / statistics.median(times) / 1e9

    with ThreadPoolExecutor(threads) as pool:
        summed = timed(lambda: list(pool.map(np.sum, parts)))
    gemv = timed(lambda: x @ w)
    return {"buffer_mb": mb, "threads": threads, "runs": runs, "threaded_sum_gb_s": summed, "gemv_gb_s": gemv,
            "limit_gb_s": max(summed, gemv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    add_out(ap)
    args = ap.parse_args()
    save_json(args.out, "bandwidth", read_gb_s(args.mb, args.threads, args.runs))


if __name__ == "__main__":
    main()
