"""Where a decode step's time goes: an onnxruntime profile of greedy decoding at batch B, per op type.

    python -m benchmarks.profile_decode [--checkpoint DIR] [--quantize none,int8,int4] [--batches 1,16,64]
                                        [--new 64] [--threads 2]

For each variant and batch (B rows of 32-token prompts): the engine's own decode tok/s, onnxruntime's
time per session run (model_run), and the kernel time per op type summed over the decode steps (prefill
excluded), each MatMul family with the weight bytes it reads per step, the GB/s that implies (what bounds
batch 1) and its GFLOP/s (2 x B x weights per step: what bounds large batches; compare with
benchmarks.bandwidth's limit and the cores' peak). The profiled generation's wall time less the sum of its
session runs, per step, is the engine's own work (sampling, bindings, Python; profiling adds a little to
both).
"""

from __future__ import annotations

import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bandwidth import read_gb_s
from benchmarks.common import checkpoint, decode_tok_s, engine_parser, save_json

WEIGHT_OPS = ("MatMul", "FusedMatMul", "MatMulNBits", "Gemm")


def weight_sizes(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes of the constant inputs, weights multiplied per row) of each weight op, by node name, read
    from the exported graph (MatMulNBits: its K x N; the others: their largest constant input)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes, elems = {}, {}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        elems[init.name] = n
        sizes[init.name] = n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    nbytes, macs = {}, {}
    for node in model.graph.node:
        nbytes[node.name] = sum(sizes.get(i, 0) for i in node.input)
        attrs = {a.name: a.i for a in node.attribute}
        macs[node.name] = (attrs["K"] * attrs["N"] if node.op_type == "MatMulNBits"
                           else max((elems.get(i, 0) for i in node.input), default=0))
    return nbytes, macs


def profile(eng, quantize: str | None, batch: int, new: int) -> dict:
    import onnxruntime as ort

    prompts = [[(100 + 7 * b + j) % 50000 for j in range(32)] for b in range(batch)]
    decode = decode_tok_s(eng, prompts, new, runs=5 if batch < 16 else 3)
    # the same session options, with profiling, in place of the engine's session
    model = eng.model
    opts = model._opts
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "decode")
        sess = ort.InferenceSession(str(eng.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        opts.enable_profiling = False
        engine_sessions = model.session, model.step_session
        model.session = model.step_session = sess
        t = time.perf_counter()
        eng.generate_batch(prompts, max_new_tokens=new, ignore_eos=True)
        wall = time.perf_counter() - t
        model.session, model.step_session = engine_sessions
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [ev for ev in events if ev.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first is the prefill
    first_decode = decode_runs[0]["ts"] if decode_runs else float("inf")
    wb, wm = weight_sizes(eng.folder)
    by_op, bytes_op, macs_op = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in events:
        if ev.get("cat") != "Node" or not ev["name"].endswith("_kernel_time") or ev["ts"] < first_decode:
            continue
        node = ev["name"].removesuffix("_kernel_time")
        op = ev["args"].get("op_name", "?") + (" (lm_head)" if node.startswith("lm_head") else "")
        by_op[op] += ev["dur"]
        if ev["args"].get("op_name") in WEIGHT_OPS:
            bytes_op[op] += wb.get(node, 0)
            macs_op[op] += batch * wm.get(node, 0)
    steps = len(decode_runs)
    run_ms = statistics.median(ev["dur"] for ev in decode_runs) / 1e3 if steps else None
    ops = []
    for op, us in by_op.most_common():
        row = {"op": op, "ms_per_step": us / steps / 1e3, "share_of_kernels": us / sum(by_op.values())}
        if bytes_op[op]:
            row["weight_mb_per_step"] = bytes_op[op] / steps / 1e6
            row["gb_s"] = bytes_op[op] / (us / 1e6) / 1e9
            row["gflop_s"] = 2 * macs_op[op] / (us / 1e6) / 1e9
        ops.append(row)
    outside = (wall - sum(ev["dur"] for ev in runs) / 1e6) / max(steps, 1)  # same generation, profiled
    return {"quantize": quantize or "none", "batch": batch, "decode_tok_s": decode, "step_ms": 1e3 * batch / decode,
            "model_run_ms": run_ms, "engine_ms_outside_run": 1e3 * outside,
            "decode_steps_profiled": steps, "profiled_wall_s": wall, "ops": ops}


def main() -> None:
    ap = engine_parser(__doc__)
    ap.add_argument("--quantize", default="none,int8,int4")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    from gpt2_onnx import Engine

    ck = checkpoint(args.checkpoint)
    bandwidth = read_gb_s(512, args.threads, 7)
    variants = []
    for q in args.quantize.split(","):
        eng = Engine.load(str(ck), provider="cpu", threads=args.threads, quantize=None if q == "none" else q)
        variants += [profile(eng, None if q == "none" else q, int(b), args.new) for b in args.batches.split(",")]
    save_json(args.out, "profile_decode", {"command": "python -m benchmarks.profile_decode " + " ".join(
        f"--{k} {v}" for k, v in (("quantize", args.quantize), ("batches", args.batches), ("new", args.new),
                                  ("threads", args.threads))), "bandwidth": bandwidth, "variants": variants})
    lines = [f"Memory bandwidth limit {bandwidth['limit_gb_s']:.1f} GB/s (benchmarks.bandwidth).", ""]
    for v in variants:
        lines += [f"### {v['quantize']}, batch {v['batch']}: {v['decode_tok_s']:.1f} tok/s, step {v['step_ms']:.2f} "
                  f"ms, onnxruntime run {v['model_run_ms']:.2f} ms, engine outside the run "
                  f"{v['engine_ms_outside_run']:.2f} ms", "",
                  "| op | ms per step | share of kernel time | weight MB per step | GB/s | GFLOP/s |",
                  "|---|---|---|---|---|---|"]
        for r in v["ops"][:10]:
            weights = (f"{r['weight_mb_per_step']:.1f} | {r['gb_s']:.1f} | {r['gflop_s']:.1f}" if "gb_s" in r
                       else "- | - | -")
            lines.append(f"| {r['op']} | {r['ms_per_step']:.3f} | {r['share_of_kernels']:.1%} | {weights} |")
        lines.append("")
    (args.out / "profile_decode.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
