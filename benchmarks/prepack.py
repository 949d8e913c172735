"""Prepacked weights mapped from the per-machine file against prepacked on the heap: memory, decode speed, cold start.

    python -m benchmarks.prepack [--checkpoint DIR] [--quantize none,int8,int4] [--batches 1,8] [--reps 3]

writes benchmarks/results/prepack_file.{json,md} (prepack.json is this module's earlier comparison of heap
prepacking with none: `--cases heap,unpacked --quantize none`). The variants are exported into the cache as
Engine.load would (the 124M-shape random-init checkpoint unless --checkpoint).

Each case is a process of its own (peak RSS is per process), interleaved case by case over --reps rounds;
medians are reported. Cases, per model variant (exported once into the cache):
  heap    GPT2_ONNX_PREPACKED=0: onnxruntime prepacks each MatMul weight into an MLAS layout on the heap
          at every load (the engine before prepacked files; also what a read-only export folder gets);
  first   the export's prepacked/ folder removed first: this load saves the prepacked model file;
  mapped  a later load: the prepacked copies are mapped from <export>/prepacked/<key>/model.onnx.data;
  unpacked (with --cases) session.disable_prepacking: MLAS reads the mapped original weights unpacked.
Reported: cold start (process start to the first token of a 32-token prompt; files in the page cache),
load (Engine.load), peak RSS (VmHWM) and its anonymous / file-backed parts after generating, and greedy
decode tok/s at each batch (prompt 32, 33 new tokens, benchmarks.common.decode_tok_s with --runs).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.common import add_out, checkpoint, decode_tok_s, machine, write_results

CASES = ("heap", "first", "mapped")


def child(folder: str, case: str, threads: int, batches: list[int], runs: int, started: float) -> dict:
    import onnxruntime as ort

    if case == "unpacked":
        real = ort.InferenceSession

        def session(path, opts=None, *a, **k):
            if opts is not None:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            return real(path, opts, *a, **k)

        ort.InferenceSession = session
    from gpt2_onnx import Engine

    t = time.time()
    eng = Engine.load(folder, provider="cpu", threads=threads)
    loaded = time.time()
    next(iter(eng.stream([(100 + j) % 50000 for j in range(32)], max_new_tokens=1)))
    out = {"case": case, "cold_start_s": time.time() - started, "load_s": loaded - t,
           "prepacked": eng.model.prepacked is not None}
    for batch in batches:
        ids = [[(100 + 7 * i + j) % 50000 for j in range(32)] for i in range(batch)]
        out[f"batch{batch}_tok_s"] = decode_tok_s(eng, ids, 33, runs=runs)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    for key, name in (("VmHWM", "peak_rss_mb"), ("RssAnon", "anon_mb"), ("RssFile", "file_mb")):
        out[name] = int(status[key].split()[0]) / 1024
    return out


def markdown(r: dict) -> str:
    cols = ["cold_start_s", "load_s", "peak_rss_mb", "anon_mb", "file_mb"] + [f"batch{b}_tok_s" for b in r["batches"]]
    lines = [f"# Prepacked weights: heap vs mapped file ({r['machine']['cpu']}, {r['threads']} threads)", "",
             f"`{r['command']}`; medians of {r['reps']} interleaved rounds, one process per case.", "",
             "| quantize | case | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for q, cases in r["medians"].items():
        for case, m in cases.items():
            lines.append(f"| {q} | {case} | " + " | ".join(f"{m[c]:.2f}" if c.endswith("_s") else f"{m[c]:.1f}"
                                                          for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, case, threads, batches, runs, started = sys.argv[2:8]
        print(json.dumps(child(folder, case, int(threads), [int(b) for b in batches.split(",")], int(runs),
                               float(started))))
        return
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="none,int8,int4")
    ap.add_argument("--cases", default=",".join(CASES), help="heap, first, mapped, unpacked")
    ap.add_argument("--batches", default="1,8", help="batch sizes to time")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--runs", type=int, default=3, help="timed generations per measurement")
    ap.add_argument("--name", default="prepack_file", help="results file stem")
    add_out(ap)
    args = ap.parse_args()
    from gpt2_onnx.model import PREPACKED
    from gpt2_onnx.resolve import resolve

    ck = str(checkpoint(args.checkpoint))
    quants, cases = args.quantize.split(","), args.cases.split(",")
    folders = {q: resolve(ck, quantize=None if q == "none" else q) for q in quants}  # exported once
    rows = []
    for rep in range(args.reps):
        for q in quants:
            for case in cases:
                if case == "first":
                    shutil.rmtree(folders[q] / PREPACKED, ignore_errors=True)
                env = {**os.environ, "GPT2_ONNX_PREPACKED": "0" if case in ("heap", "unpacked") else "1"}
                started = time.time()
                res = subprocess.run([sys.executable, "-m", "benchmarks.prepack", "--child", str(folders[q]), case,
                                      str(args.threads), args.batches, str(args.runs), repr(started)],
                                     capture_output=True, text=True, env=env)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                rows.append({"quantize": q, "rep": rep, **json.loads(res.stdout.strip().splitlines()[-1])})
                print(rows[-1], file=sys.stderr, flush=True)
    medians = {q: {c: {k: statistics.median(r[k] for r in rows if r["quantize"] == q and r["case"] == c)
                       for k in rows[0] if isinstance(rows[0][k], float)} for c in cases} for q in quants}
    write_results(args.out, args.name, {"command": "python -m benchmarks.prepack " + " ".join(sys.argv[1:]),
                                        "threads": args.threads, "reps": args.reps,
                                        "batches": [int(b) for b in args.batches.split(",")], "medians": medians,
                                        "rows": rows, "machine": machine()}, markdown)


if __name__ == "__main__":
    main()
