"""Bottleneck adapters (the adapters library's seq_bn / double_seq_bn, run as graph nodes): decode tok/s vs the base.

    python -m benchmarks.bottleneck [--checkpoint DIR] [--threads 2] [--runs 31] [--new 16] [--batches 1,8]
                                    [--reduction 16] [--quiet-s 10] [--out DIR] [--name bottleneck]

The base is the 124M GPT-2 shape (real GPT2Config, random init: benchmarks.common.checkpoint) unless --checkpoint.
The adapters are written here in the adapters library's save_adapter format (adapter_config.json +
adapter.safetensors, seeded random weights, reduction factor --reduction): seq_bn (Pfeiffer: after the MLP of
every layer, relu) and double_seq_bn (Houlsby: after the attention and the MLP, swish). tests/test_bottleneck.py
proves that format and the graph against the library itself. Each system is exported afresh (by this code) and
loaded with provider cpu on --threads threads.

Decode tok/s of a repetition: batch * (new - 1) / (time(generate new tokens) - time(generate 1 token)), greedy,
ignore_eos, the same prompts for every system. Systems run interleaved (base, seq_bn, double_seq_bn, then the
reverse order, ...), --runs short repetitions, so that the load of other processes on a shared CPU falls on every
system alike; reported: the median per system and the ratio of medians, with the median of the per-repetition
ratios beside it. Target (the issue): seq_bn >= 0.95x the base. The CPU is shared and noisy:
compare only the numbers of one run. Besides, an onnxruntime profile of batch-1 decoding gives the adapter nodes'
share of the graph's kernel time per step, measured over the same steps and so robust to that load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, checkpoint, machine, write_results
from benchmarks.inprocess import code_state, wait_quiet

HERE = Path(__file__).resolve().parents[1]
TARGET = 0.95
ADAPTERS = {  # name: (BnConfig fields as save_adapter writes them, sites)
    "seq_bn": (dict(mh_adapter=False, output_adapter=True, non_linearity="relu", original_ln_before=True),
               ("output_adapters",)),
    "double_seq_bn": (dict(mh_adapter=True, output_adapter=True, non_linearity="swish", original_ln_before=False),
                      ("attention_adapters", "output_adapters")),
}


def write_adapter(folder: Path, kind: str, n_layer: int, n_embd: int, reduction: int, seed: int = 0) -> Path:
    """An adapter folder as the adapters library's model.save_adapter(folder, kind, use_safetensors=True) writes."""
    from safetensors.numpy import save_file

    fields, sites = ADAPTERS[kind]
    config = {"reduction_factor": reduction, "original_ln_after": True, "residual_before_ln": True, "ln_before": False,
              "ln_after": False, "scaling": 1.0, "is_parallel": False, "init_weights": "bert", "leave_out": [],
              "use_gating": False, "phm_layer": False, "inv_adapter": None, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"config": config, "hidden_size": n_embd, "model_type":
                                                            "gpt2", "name": kind, "version": "adapters.1.3.0"}))
    rng, d = np.random.default_rng(seed), n_embd // reduction
    tensors = {}
    for i in range(n_layer):
        for site in sites:
            p = f"transformer.h.{i}.{site}.adapters.{kind}"
            tensors |= {f"{p}.adapter_down.0.weight": rng.normal(0, 0.02, (d, n_embd)),
                        f"{p}.adapter_down.0.bias": rng.normal(0, 0.02, d),
                        f"{p}.adapter_up.weight": rng.normal(0, 0.02, (n_embd, d)),
                        f"{p}.adapter_up.bias": rng.normal(0, 0.02, n_embd)}
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(folder / "adapter.safetensors"))
    return folder


def decode_s(eng, ids: list[list[int]], new: int) -> tuple[float, float]:
    """(seconds for `new` tokens, seconds for 1 token) of one greedy generate_batch each."""
    times = []
    for n in (new, 1):
        t = time.perf_counter()
        eng.generate_batch(ids, max_new_tokens=n, ignore_eos=True)
        times.append(time.perf_counter() - t)
    return times[0], times[1]


def adapter_share(eng, new: int = 32) -> dict:
    """An onnxruntime profile of batch-1 greedy decoding: the adapter nodes' share of the kernel time per decode
    step (both summed over the same steps, so the share holds however loaded the machine is)."""
    import onnxruntime as ort

    model, opts = eng.model, eng.model._opts
    session, step_session = model.session, model.step_session
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "decode")
        sess = ort.InferenceSession(str(eng.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        opts.enable_profiling = False
        model.session = model.step_session = sess
        try:
            eng.generate(list(range(100, 116)), max_new_tokens=new, ignore_eos=True)
        finally:
            model.session, model.step_session = session, step_session
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [ev for ev in events if ev.get("name") == "model_run"][1:]  # decode steps: the first run is the prefill
    kernels = [ev for ev in events if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time")
               and ev["ts"] >= runs[0]["ts"]]
    total = sum(ev["dur"] for ev in kernels)
    adapter = sum(ev["dur"] for ev in kernels if "_adapter/" in ev["name"])
    return {"steps": len(runs), "kernel_ms_per_step": total / len(runs) / 1e3,
            "adapter_ms_per_step": adapter / len(runs) / 1e3, "adapter_share": adapter / total}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--reduction", type=int, default=16)
    ap.add_argument("--quiet-s", type=float, default=10.0, help="wait up to this long for a quiet CPU before a run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="bottleneck")
    args = ap.parse_args(argv)

    from gpt2_onnx import Engine
    from gpt2_onnx.export import export_model

    ck = checkpoint(args.checkpoint)
    hf = json.loads((ck / "config.json").read_text())
    n_layer, n_embd = hf.get("n_layer", 12), hf.get("n_embd", 768)
    work = Path.home() / ".cache" / "gpt2-onnx-bench" / "bottleneck" / f"{ck.name}-r{args.reduction}"
    systems = {}
    for kind in ["base", *ADAPTERS]:  # exported afresh: the graphs of this code, never an older cached export
        adapter = None if kind == "base" else write_adapter(work / kind, kind, n_layer, n_embd, args.reduction)
        out = export_model(str(ck), work / f"export-{kind}", adapter=adapter)
        systems[kind] = Engine.load(out, provider="cpu", threads=args.threads)
    result = {"command": "python -m benchmarks.bottleneck " + " ".join(argv or []), "machine": machine(),
              "code": code_state(HERE), "checkpoint": str(ck), "threads": args.threads, "new": args.new,
              "reduction": args.reduction, "runs": args.runs, "target": TARGET, "batches": {}}
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, 50000, (batch, 16)).tolist()
        for eng in systems.values():
            eng.generate_batch(ids, max_new_tokens=4, ignore_eos=True)  # warm-up
        tok_s: dict[str, list[float]] = {k: [] for k in systems}
        for rep in range(args.runs):
            if args.quiet_s > 0:
                wait_quiet(args.quiet_s)
            for name in list(systems)[:: 1 if rep % 2 == 0 else -1]:
                t_new, t_one = decode_s(systems[name], ids, args.new)
                tok_s[name].append(batch * (args.new - 1) / (t_new - t_one))
        med = {k: statistics.median(v) for k, v in tok_s.items()}
        result["batches"][str(batch)] = {
            "tok_s": tok_s, "median_tok_s": med,
            "ratio": {k: med[k] / med["base"] for k in ADAPTERS},
            "paired_ratio": {k: statistics.median(a / b for a, b in zip(tok_s[k], tok_s["base"])) for k in ADAPTERS}}
    result["profile"] = {k: adapter_share(systems[k]) for k in ADAPTERS}
    write_results(args.out, args.name, result, markdown)
    return result


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"`{r['command']}`", "",
             f"{m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), {r['threads']} threads, code {r['code']['commit'][:7]}"
             f"{' with uncommitted changes' if r['code']['uncommitted'] else ''}.", "",
             f"Decode tok/s of greedy generation ({r['new']} new tokens after a 16-token prompt, ignore_eos), base "
             f"{Path(r['checkpoint']).name} vs the same model with a bottleneck adapter of reduction factor "
             f"{r['reduction']} (seq_bn: after every MLP, relu; double_seq_bn: after every attention and MLP, swish) "
             f"run as graph nodes. Median of {r['runs']} interleaved repetitions (interquartile range in brackets); ratio "
             f"of medians, and the median of the per-repetition ratios. Target: seq_bn >= {r['target']}x the base.", "",
             "| batch | system | tok/s | ratio | paired ratio |", "|---|---|---|---|---|"]
    for batch, b in r["batches"].items():
        for name, med in b["median_tok_s"].items():
            q = np.percentile(b["tok_s"][name], [25, 75])
            reps = f"IQR {q[0]:.1f}-{q[1]:.1f}"
            if name == "base":
                lines.append(f"| {batch} | base | {med:.1f} ({reps}) | | |")
            else:
                ok = "met" if b["ratio"][name] >= r["target"] else "NOT met"
                lines.append(f"| {batch} | {name} | {med:.1f} ({reps}) | **{b['ratio'][name]:.3f}x**"
                             f"{f' ({ok})' if name == 'seq_bn' else ''} | {b['paired_ratio'][name]:.3f}x |")
    lines += ["", "onnxruntime profile of batch-1 decoding (the same steps, so robust to the machine's load): the "
              "adapter nodes' share of the graph's kernel time per decode step, and the tok/s ratio it implies.", "",
              "| system | kernel ms/step | adapter ms/step | adapter share | implied ratio |", "|---|---|---|---|---|"]
    for name, p in r["profile"].items():
        lines.append(f"| {name} | {p['kernel_ms_per_step']:.2f} | {p['adapter_ms_per_step']:.3f} | "
                     f"{100 * p['adapter_share']:.1f}% | {1 - p['adapter_share']:.3f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
