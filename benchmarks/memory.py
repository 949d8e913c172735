"""Resident memory over long generations: it must stay flat (no per-step allocation that grows).

    python -m benchmarks.memory [--checkpoint DIR] [--tokens 1000]

Two generations of --tokens each, one after the other, resident memory every 100 tokens. The first
touches the KV buffer's pages as it writes them (the OS backs an allocation on first write), so it
grows by about the KV bytes it writes (reported beside it). Each generation allocates its own KV
buffer, so the second grows the same way from where the first's was freed: how far its peak exceeds
the first's is what a leak would show.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import engine_parser, load_engine, save_json


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = engine_parser(__doc__)
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args()
    eng = load_engine(args)
    cfg = eng.config
    kv_per_token = cfg.n_layer * 2 * cfg.n_head * cfg.kv_head_size * np.dtype(cfg.np_dtype).itemsize
    runs = []
    for _ in range(2):
        samples = []
        for step in eng.stream([1, 2, 3], max_new_tokens=args.tokens, ignore_eos=True):
            if step.index % 100 == 0 or step.finish_reason:
                samples.append((step.index + 1, round(rss_mb(), 1)))
        runs.append(samples)
    first, second = runs
    out = {"tokens": args.tokens, "rss_mb_by_token": first, "second_run_rss_mb_by_token": second,
           "first_run_growth_mb": first[-1][1] - first[0][1],
           "kv_bytes_written_mb": kv_per_token * (args.tokens + 3) / 2**20,
           "second_run_peak_over_first_mb": max(m for _, m in second) - max(m for _, m in first)}
    save_json(args.out, "memory", out)


if __name__ == "__main__":
    main()
