"""What onnxruntime's weight prepacking costs in memory and buys in speed, per model variant.

    python -m benchmarks.prepack [--checkpoint DIR] [--quantize none,int8,int4] [--batches 1,8] [--threads 2]

Each case runs in a process of its own (peak RSS is per process): the engine's session as it is, and
the same session options with `session.disable_prepacking` = 1. Reported: peak RSS, its anonymous
(heap) and file-backed (mmap'd weights) parts after generating, and decode tok/s at batch 1 and
--batches (prompt 32, 33 greedy tokens, median of 5). Prepacking copies each MatMul weight into a
layout of MLAS's; the mmap'd original is released unless another node reads it (the tied `wte`:
the embedding Gather reads it, the LM head's MatMul prepacks it).
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import checkpoint, decode_tok_s, engine_parser, save_json


def child(ck: str, quantize: str, prepack: bool, threads: int, batches: list[int]) -> dict:
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, opts=None, *a, **k):
        if opts is not None and not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return real(path, opts, *a, **k)

    ort.InferenceSession = session
    from gpt2_onnx import Engine

    eng = Engine.load(ck, provider="cpu", threads=threads, quantize=None if quantize == "none" else quantize)
    out = {"quantize": quantize, "prepack": prepack}
    for batch in batches:
        ids = [[(100 + 7 * i + j) % 50000 for j in range(32)] for i in range(batch)]
        out[f"batch{batch}_decode_tok_s"] = decode_tok_s(eng, ids, 33)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    for key, name in (("VmHWM", "peak_rss_mb"), ("RssAnon", "anon_mb"), ("RssFile", "file_mb")):
        out[name] = int(status[key].split()[0]) / 1024
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ck, quantize, prepack, threads, batches = sys.argv[2:7]
        print(json.dumps(child(ck, quantize, prepack == "1", int(threads), [int(b) for b in batches.split(",")])))
        return
    ap = engine_parser(__doc__)
    ap.add_argument("--quantize", default="none,int8,int4")
    ap.add_argument("--batches", default="1,8", help="batch sizes to time")
    ap.add_argument("--name", default="prepack", help="results file stem")
    args = ap.parse_args()
    ck = str(checkpoint(args.checkpoint))
    rows = []
    for q in args.quantize.split(","):
        for prepack in ("1", "0"):
            res = subprocess.run([sys.executable, "-m", "benchmarks.prepack", "--child", ck, q, prepack,
                                  str(args.threads), args.batches], capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    save_json(args.out, args.name, {"command": "python -m benchmarks.prepack " + " ".join(sys.argv[1:]),
                                    "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
