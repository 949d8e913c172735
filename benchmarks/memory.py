"""Resident memory over a long generation: it must stay flat (no per-step allocation that grows).

    python -m benchmarks.memory [--checkpoint DIR] [--tokens 1000]
"""

from __future__ import annotations

from pathlib import Path

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
    samples = []
    for step in eng.stream([1, 2, 3], max_new_tokens=args.tokens, ignore_eos=True):
        if step.index % 100 == 0 or step.finish_reason:
            samples.append((step.index + 1, round(rss_mb(), 1)))
    after_warm = [m for i, m in samples if i > 100]
    growth = max(after_warm) - min(after_warm)
    out = {"tokens": args.tokens, "rss_mb_by_token": samples, "growth_after_100_tokens_mb": growth}
    save_json(args.out, "memory", out)


if __name__ == "__main__":
    main()
