"""Resident memory over a long generation: it must stay flat (no per-step allocation that grows).

    python -m benchmarks.memory [--checkpoint DIR] [--tokens 1000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.__main__ import make_checkpoint, save_json


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from engine import Engine
    from export.cache import resolve_model

    ck = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path.home() / ".cache" / "gpt2-onnx" / "bench-gpt2-124m")
    eng = Engine.load(resolve_model(str(ck)), provider="cpu", threads=args.threads)
    samples = []
    for step in eng.stream([1, 2, 3], max_new_tokens=args.tokens, ignore_eos=True):
        if step.index % 100 == 0 or step.finish_reason:
            samples.append((step.index + 1, round(rss_mb(), 1)))
    after_warm = [m for i, m in samples if i > 100]
    growth = max(after_warm) - min(after_warm)
    out = {"tokens": args.tokens, "rss_mb_by_token": samples, "growth_after_100_tokens_mb": growth}
    save_json("memory", out)


if __name__ == "__main__":
    main()
