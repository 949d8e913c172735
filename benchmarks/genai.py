"""onnxruntime-genai as an anchor: our runtime against onnxruntime-genai running our `--format genai` export.

    python -m benchmarks.genai [--runs 3] [--threads 2] [--new 64] [--variants fp32,int4] [--checkpoint DIR]

The 124M shape (random init, GPT-2's BPE: benchmarks.common.checkpoint). The same weights for both: our
export (Engine.load(checkpoint, quantize=...)) and export_genai of the same checkpoint build one graph
(graph.build), the genai one with onnxruntime-genai's decoder I/O. The same prompts (32 random ids each,
no eos) at batch 1 and 8, greedy, exactly --new new tokens (ours: ignore_eos; onnxruntime-genai:
min_length = max_length), --threads intra-op threads for both (onnxruntime-genai: the decoder's
session_options.intra_op_num_threads, through og.Config.overlay). Both run in this one process, the
order alternating per repetition.

tokens/s = batch x new / wall time of one generate call (the 32-token prefill included), median of --runs.
Each timed call starts once other processes use under a quarter of the CPUs (waiting 120 s at most); the
share they used while it ran is recorded with it. The greedy ids of the two are compared row by row.
Then one profiled generation per system and batch: onnxruntime's model_run per decode step (the
kernels) and the wall time per step outside it (the runtime's own work: inputs, logits, search).
Results: benchmarks/results/genai.md and genai.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.anchors import CACHE
from benchmarks.common import RESULTS, checkpoint, machine, write_results
from benchmarks.inprocess import busy_s, code_state, proc_cpu_s, wait_quiet

HERE = Path(__file__).resolve().parents[1]
PROMPT_LEN, BATCHES, QUIET_S = 32, (1, 8), 120
QUIET, TRIES = 0.25, 3  # a call during which other processes took more of the CPUs is run again (TRIES calls at most)
QUANTIZE = {"fp32": None, "int4": "int4"}


def genai_export(ck: Path, variant: str) -> Path:
    """export_genai of ck, once per exporter version, into the benchmark cache."""
    from gpt2_onnx.export import EXPORTER_VERSION
    from gpt2_onnx.export.genai import export_genai

    out = CACHE / "genai" / f"{ck.name}-{variant}"
    stamp = out.with_name(out.name + ".version")
    if not (stamp.is_file() and stamp.read_text() == EXPORTER_VERSION and (out / "genai_config.json").is_file()):
        export_genai(str(ck), out, quantize=QUANTIZE[variant])
        stamp.write_text(EXPORTER_VERSION)
    return out


def og_model(folder: Path, threads: int, profile: str | None = None):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    options = {"intra_op_num_threads": threads, **({"enable_profiling": profile} if profile else {})}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def og_generate(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    import onnxruntime_genai as og

    S = len(prompts[0])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=S + new, min_length=S + new, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompts, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [gen.get_sequence(i)[S:].tolist() for i in range(len(prompts))]


def ours_generate(eng, prompts: list[list[int]], new: int) -> list[list[int]]:
    return [r.token_ids for r in eng.generate_batch(prompts, max_new_tokens=new, ignore_eos=True)]


def timed(fn, tries: int = TRIES) -> tuple[float, list, dict]:
    """fn() once the machine is quiet: its wall time, result, and the load around it. A call during which other
    processes used QUIET of the CPUs or more is made again (`tries` calls at most); the least disturbed one is kept."""
    made = []
    for _ in range(tries):
        load = wait_quiet(QUIET_S, QUIET)
        b0, own0, t = busy_s(), proc_cpu_s(None), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t
        other = max(0.0, busy_s() - b0 - (proc_cpu_s(None) - own0)) / (wall * (os.cpu_count() or 1))
        made.append((other, wall, out, {**load, "other_cpu_share": other, "loadavg": os.getloadavg()}))
        if other < QUIET:
            break
    other, wall, out, load = min(made, key=lambda x: x[0])
    return wall, out, {**load, "tries": len(made), "other_cpu_share_tries": [x[0] for x in made]}


def decode_profile(events: list[dict], wall: float) -> dict:
    """model_run per decode step (median) and the wall time per step outside session runs; events: a
    profile that begins with a warm-up generation of 2 tokens (2 runs), left out."""
    run_events = [ev for ev in events if ev.get("name") == "model_run"][2:]
    runs = [ev["dur"] / 1e3 for ev in run_events]
    steps = len(runs) - 1  # the first run is the prefill
    ops: dict[str, float] = {}  # kernel ms per decode step by op type
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and ev["ts"] >= run_events[1]["ts"]:
            op = ev["args"].get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + ev["dur"] / 1e3 / steps
    return {"model_run_ms": statistics.median(runs[1:]), "prefill_run_ms": runs[0], "steps": steps,
            "outside_ms_per_step": (1e3 * wall - sum(runs)) / max(steps, 1), "wall_s": wall,
            "kernel_ms_per_step": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def profile_ours(eng, prompts, new: int) -> dict:
    """One generation with onnxruntime's profiler on our session (same options: benchmarks.profile_decode)."""
    import onnxruntime as ort

    model, opts = eng.model, eng.model._opts
    saved = model.session, model.step_session
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "ours")
        sess = ort.InferenceSession(str(eng.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        opts.enable_profiling = False
        model.session = model.step_session = sess
        ours_generate(eng, prompts, 2)
        wall, _, load = timed(lambda: ours_generate(eng, prompts, new), tries=1)  # the profile holds one generation
        events = json.loads(Path(sess.end_profiling()).read_text())
    model.session, model.step_session = saved
    return {**decode_profile(events, wall), "load": load}


def profile_og(folder: Path, threads: int, prompts, new: int) -> dict:
    """One generation with the session profiler (session_options.enable_profiling), written when the model goes."""
    with tempfile.TemporaryDirectory() as tmp:
        model = og_model(folder, threads, profile=str(Path(tmp) / "og"))
        og_generate(model, prompts, 2)
        wall, _, load = timed(lambda: og_generate(model, prompts, new), tries=1)
        model = None  # the session ends: its profile is written
        gc.collect()
        (path,) = Path(tmp).glob("og*.json")
        events = json.loads(path.read_text())
    return {**decode_profile(events, wall), "load": load}


def compare(ours: list[list[int]], theirs: list[list[int]], eos: int) -> dict:
    """Rows equal up to the first eos in ours (ours goes on after an eos with ignore_eos; min_length masks it)."""
    ours = [x[:x.index(eos)] if eos in x else x for x in ours]
    theirs = [y[:len(x)] for x, y in zip(ours, theirs)]
    diverge = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ours, theirs)]
    return {"rows_equal": sum(x == y for x, y in zip(ours, theirs)), "rows": len(ours),
            "compared_tokens": [len(x) for x in ours], "first_difference": [d for d in diverge if d is not None]}


def variant(ck: Path, name: str, prompts, args) -> dict:
    from gpt2_onnx import Engine

    print(f"{name}: exporting / loading ...", file=sys.stderr, flush=True)
    eng = Engine.load(str(ck), provider="cpu", threads=args.threads, quantize=QUANTIZE[name])
    folder = genai_export(ck, name)
    og = og_model(folder, args.threads)
    systems = {"ours": lambda batch: ours_generate(eng, batch, args.new),
               "onnxruntime-genai": lambda batch: og_generate(og, batch, args.new)}
    res = {"ours_folder": str(eng.folder), "genai_folder": str(folder), "batches": {}}
    for b in BATCHES:
        batch = prompts[:b]
        for run in systems.values():  # warm-up
            run(batch)
        rows = {k: {"times_s": [], "load": []} for k in systems}
        for rep in range(args.runs):
            for who in (list(systems) if rep % 2 == 0 else list(systems)[::-1]):
                print(f"  {name} batch {b} run {rep + 1}: {who}", file=sys.stderr, flush=True)
                wall, ids, load = timed(lambda who=who, batch=batch: systems[who](batch))
                rows[who]["times_s"].append(wall)
                rows[who]["load"].append(load)
                rows[who]["ids"] = ids
        for row in rows.values():
            row["tok_s_runs"] = [b * args.new / t for t in row["times_s"]]
            row["tok_s"] = b * args.new / statistics.median(row["times_s"])
        res["batches"][str(b)] = {**rows, "ratio": rows["ours"]["tok_s"] / rows["onnxruntime-genai"]["tok_s"],
                                  "ids": compare(rows["ours"]["ids"], rows["onnxruntime-genai"]["ids"],
                                                 eng.config.eos_token_id)}
        print(f"  {name} batch {b}: ours / og {res['batches'][str(b)]['ratio']:.2f}x", file=sys.stderr, flush=True)
    og = None
    gc.collect()
    res["profile"] = {str(b): {"ours": profile_ours(eng, prompts[:b], args.new),
                               "onnxruntime-genai": profile_og(folder, args.threads, prompts[:b], args.new)}
                      for b in BATCHES}
    return res


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), {res['threads']} threads for "
             f"both, model {res['model']}, {res['versions']}, code {res['code']['commit'][:7]}"
             + (f" with uncommitted changes to {len(res['code']['uncommitted'])} files" if res["code"]["uncommitted"]
                else "") + ".",
             f"Greedy, {PROMPT_LEN}-token prompts, {res['new']} new tokens; tokens/s = batch x {res['new']} / wall "
             f"time of a generate call (prefill included), median of {res['runs']} runs (each run); best: the "
             "fastest run of each. Target: ours / genai >= 1.1x.", "",
             "| variant | batch | ours tok/s | onnxruntime-genai tok/s | ours / genai (median) | ours / genai (best) "
             "| greedy rows equal (up to eos) | other processes' CPU share (max) |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(row):
        return f"{row['tok_s']:.1f} ({' / '.join(f'{t:.1f}' for t in row['tok_s_runs'])})"

    for name, v in res["variants"].items():
        for b, r in v["batches"].items():
            share = max(ld["other_cpu_share"] for who in ("ours", "onnxruntime-genai") for ld in r[who]["load"])
            best = max(r["ours"]["tok_s_runs"]) / max(r["onnxruntime-genai"]["tok_s_runs"])
            lines.append(f"| {name} | {b} | {fmt(r['ours'])} | {fmt(r['onnxruntime-genai'])} | {r['ratio']:.2f}x | "
                         f"{best:.2f}x | {r['ids']['rows_equal']} of {r['ids']['rows']} | {100 * share:.0f}% |")
    lines += ["", "Profile (one generation each, onnxruntime's profiler on): model_run is the session run of a decode "
                  "step (the kernels, median over the steps), outside is the rest of a step (the runtime's own work: "
                  "inputs, logits, search, bindings); step = model_run + outside.", "",
              "| variant | batch | system | model_run ms / step | outside ms / step | step ms | prefill run ms | "
              "other processes' CPU share |", "|---|---|---|---|---|---|---|---|"]
    for name, v in res["variants"].items():
        for b, p in v["profile"].items():
            for who, r in p.items():
                lines.append(f"| {name} | {b} | {who} | {r['model_run_ms']:.2f} | {r['outside_ms_per_step']:.2f} | "
                             f"{r['model_run_ms'] + r['outside_ms_per_step']:.2f} | {r['prefill_run_ms']:.1f} | "
                             f"{100 * r['load']['other_cpu_share']:.0f}% |")
    lines += ["", "Why (from the profile): both systems run the same graph (graph.build's layers, weights and "
                  "kernels; only the I/O differs), so a decode step is the same onnxruntime kernels in both and a "
                  "runtime can only differ by its own work outside the session run:", ""]
    for name, v in res["variants"].items():
        for b, p in v["profile"].items():
            o, g = p["ours"], p["onnxruntime-genai"]
            step_o, step_g = o["model_run_ms"] + o["outside_ms_per_step"], g["model_run_ms"] + g["outside_ms_per_step"]
            ko, kg = o["kernel_ms_per_step"], g["kernel_ms_per_step"]
            op = max(set(ko) | set(kg), key=lambda k: abs(ko.get(k, 0) - kg.get(k, 0)))
            own_o, own_g = o["outside_ms_per_step"], g["outside_ms_per_step"]
            lines.append(f"- {name}, batch {b}: session run {o['model_run_ms']:.2f} ms (ours) vs "
                         f"{g['model_run_ms']:.2f} ms (genai), largest kernel difference {op} {ko.get(op, 0):.2f} vs "
                         f"{kg.get(op, 0):.2f} ms; own work {own_o:.2f} vs {own_g:.2f} ms ({100 * own_o / step_o:.1f}% "
                         f"and {100 * own_g / step_g:.1f}% of a step). Decode speed ours / genai "
                         f"{step_g / step_o:.2f}x; with no own work at all ours would reach "
                         f"{step_g / o['model_run_ms']:.2f}x.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--variants", default="fp32,int4")
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init 124M shape]")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the results [default: {RESULTS}]")
    args = ap.parse_args()
    import importlib.util
    from importlib.metadata import version

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise SystemExit("onnxruntime-genai is not installed: pip install onnxruntime-genai (it is in the test extra)")

    ck = checkpoint(args.checkpoint)
    config = json.loads((ck / "config.json").read_text())
    eos = config.get("eos_token_id", 50256)
    rng = np.random.default_rng(0)
    prompts = [[int(t) if t != eos else 0 for t in rng.integers(0, config["vocab_size"], PROMPT_LEN)]
               for _ in range(max(BATCHES))]
    res = {"command": "python -m benchmarks.genai " + " ".join(sys.argv[1:]), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "checkpoint": str(ck), "threads": args.threads,
           "model": f"{ck.name} ({config['n_layer']} layers, n_embd {config['n_embd']}, vocab {config['vocab_size']}"
                    + (", random init, GPT-2's BPE)" if args.checkpoint is None else ")"),
           "runs": args.runs, "new": args.new, "prompts": prompts, "code": code_state(HERE),
           "versions": f"onnxruntime {version('onnxruntime')}, onnxruntime-genai {version('onnxruntime-genai')}"}
    res["variants"] = {name: variant(ck, name, prompts, args) for name in args.variants.split(",")}
    write_results(args.out, "genai", res, markdown)


if __name__ == "__main__":
    main()
