"""Prefix KV reuse: time to first token for a 400-token prefix + 20-token query, reused vs recomputed.

    python -m benchmarks.prefix [--checkpoint DIR] [--runs 5]
"""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.common import engine_parser, load_engine, save_json


def main() -> None:
    ap = engine_parser(__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    eng = load_engine(args)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, eng.config.vocab_size, 400).tolist()
    queries = [rng.integers(0, eng.config.vocab_size, 20).tolist() for _ in range(args.runs + 1)]
    pre = eng.prefill(prefix)
    full, reused, same = [], [], True
    for q in queries:
        a = eng.generate(prefix + q, max_new_tokens=8, ignore_eos=True)
        b = eng.generate(q, prefix=pre, max_new_tokens=8, ignore_eos=True)
        full.append(a.time_to_first_token)
        reused.append(b.time_to_first_token)
        same &= a.token_ids == b.token_ids
    out = {"prefix_tokens": 400, "query_tokens": 20, "runs": args.runs,
           "ttft_ms_recomputed": 1e3 * statistics.median(full[1:]),
           "ttft_ms_prefix_reused": 1e3 * statistics.median(reused[1:]), "identical_ids": same}
    out["speedup"] = out["ttft_ms_recomputed"] / out["ttft_ms_prefix_reused"]
    save_json(args.out, "prefix", out)


if __name__ == "__main__":
    main()
