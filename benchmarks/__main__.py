"""python -m benchmarks: run each system in its own process on the same ids; write JSON + markdown.

    python -m benchmarks --systems ours,hf-torch --prompt 32 --new 64 --batch 1 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, checkpoint, machine
from benchmarks.systems import SYSTEMS

HERE = Path(__file__).resolve().parents[1]  # the repository root


def python_for(name: str) -> str:
    """The interpreter a system runs in: optimum has an environment of its own (its pins)."""
    if name != "optimum":
        return sys.executable
    from benchmarks.anchors import Unavailable, optimum_python

    try:
        return str(optimum_python())
    except Unavailable:
        return sys.executable  # systems.py then reports why optimum cannot run


def run_system(name: str, ck: Path, ids, new_tokens: int, runs: int, threads: int) -> dict:
    """Time one system in a fresh process (runs 0: only build its artifacts, export or conversion).

    llama.cpp's fast path (extra buffer types: repacked/AMX weights) is tried first; if that process
    crashes, the run is repeated without them and the result says so.
    """
    attempts = [{}, {"extra_bufts": False}] if name.startswith("llama.cpp") else [{}]
    crashes = []
    for options in attempts:
        spec = json.dumps({"system": name, "checkpoint": str(ck), "ids": ids, "new_tokens": new_tokens,
                           "runs": runs, "threads": threads, "options": options})
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        p = subprocess.run([python_for(name), "-m", "benchmarks.systems", spec], capture_output=True, text=True,
                           env=env, cwd=HERE)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
                if crashes:
                    res["note"] = "; ".join(crashes)
                return res
        why = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit code {p.returncode}"
        crashes.append(f"with {options or 'default options'}: crashed ({why})")
    return {"status": "failed: " + "; ".join(crashes)}


def run_case(systems: list[str], ck: Path, batch: int, prompt: int, new: int, runs: int, threads: int) -> dict:
    """Every system on the same ids; adds agreement with ours and the ratio to HF torch."""
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, (batch, prompt)).tolist()
    rows = {}
    for name in systems:
        print(f"running {name} batch {batch} prompt {prompt} new {new} ...", file=sys.stderr, flush=True)
        rows[name] = run_system(name, ck, ids, new, runs, threads)
    ref = rows.get("ours", {}).get("ids")
    for r in rows.values():
        r["ids_agree_with_ours"] = (r.get("ids") == ref) if ref is not None and "ids" in r else None
        r.pop("ids", None)
    return rows


def table(reps: list[dict], title: str, bandwidth: float | None) -> str:
    """One row per system: each repetition's decode tok/s, and (first repetition) the rest."""
    rows = reps[0]
    base = rows.get("hf-torch", {}).get("decode_tok_s")
    lines = [title, "", "| system | decode tok/s" + " / ".join([""] + [f"rep {i + 1}" for i in range(len(reps))])
             + " | x HF torch | x bandwidth limit | time to first token ms | peak RSS MB | model MB | ids agree |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')} | | | | | | |")
            continue
        rates = " / ".join(f"{rep[name]['decode_tok_s']:.1f}" if rep[name].get("status") == "ok" else "-"
                           for rep in reps)
        ratio = f"{r['decode_tok_s'] / base:.2f}" if base else "-"
        limit = f"{r['decode_tok_s'] * r['model_bytes'] / (bandwidth * 1e9):.2f}" if bandwidth and r.get("model_bytes") \
            else "-"
        note = f" ({r['note']})" if r.get("note") else ""
        lines.append(f"| {name}{note} | {rates} | {ratio} | {limit} | {r['ttft_s'] * 1e3:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('model_bytes', 0) / 1e6:.0f} | {r['ids_agree_with_ours']} |")
    return "\n".join(lines) + "\n"


def plot(cases: list[dict], path: Path) -> None:
    """tok/s vs context length (batch 1) and vs batch size (short context), one line per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    systems = sorted({s for c in cases for s in c["systems"]})
    for s in systems:
        ctx = [(c["prompt"] + c["new"], c["systems"][s]["decode_tok_s"]) for c in cases
               if c["batch"] == 1 and c["systems"].get(s, {}).get("status") == "ok"]
        bat = [(c["batch"], c["systems"][s]["decode_tok_s"]) for c in cases
               if c["prompt"] == cases[0]["prompt"] and c["systems"].get(s, {}).get("status") == "ok"]
        if len(ctx) > 1:
            a.plot(*zip(*sorted(ctx)), marker="o", label=s)
        if len(bat) > 1:
            b.plot(*zip(*sorted(bat)), marker="o", label=s)
    a.set(xlabel="context length at the end (prompt + new)", ylabel="decode tok/s", title="batch 1")
    b.set(xlabel="batch size", ylabel="decode tok/s (all rows)", title="short context")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="ours,hf-torch",
                    help="comma-separated, from: " + ", ".join(SYSTEMS) + " [default: ours,hf-torch]")
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true",
                    help="also batch 1 at prompt 512 + 256 new, and batches 2, 4, 8 (systems that batch); plot")
    ap.add_argument("--name", default=None, help="results file stem")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions of every case in this run (order reversed "
                                                           "each time), each the median of --runs")
    add_out(ap)
    args = ap.parse_args()
    unknown = [s for s in args.systems.split(",") if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")

    ck = checkpoint(args.checkpoint)
    systems = args.systems.split(",")
    grid = [(args.batch, args.prompt, args.new)]
    if args.sweep:
        grid += [(1, 512, 256)] + [(b, args.prompt, args.new) for b in (2, 4, 8)]
    for name in systems:  # exports and conversions first, so a timed process's peak RSS is the runtime's alone
        print(f"preparing {name} ...", file=sys.stderr, flush=True)
        run_system(name, ck, [[0]], 1, 0, args.threads)
    bw = subprocess.run([sys.executable, "-c", "from benchmarks.bandwidth import read_gb_s; import json; "
                         f"print(json.dumps(read_gb_s(512, {args.threads}, 7)))"], capture_output=True, text=True,
                        cwd=HERE)
    measured = json.loads(bw.stdout) if bw.returncode == 0 else None
    bandwidth = measured["limit_gb_s"] if measured else None
    cases, md = [], []
    for batch, prompt, new in grid:
        names = systems if batch == 1 else [s for s in systems if not s.startswith("llama.cpp")]
        reps = [run_case(names if k % 2 == 0 else names[::-1], ck, batch, prompt, new, args.runs, args.threads)
                for k in range(args.repeat)]
        reps = [{n: rep[n] for n in names} for rep in reps]  # the same row order in every repetition
        cases.append({"batch": batch, "prompt": prompt, "new": new, "systems": reps[0], "repetitions": reps})
        md.append(table(reps, f"### batch {batch}, prompt {prompt}, {new} new greedy tokens", bandwidth))
    m = machine()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": m["cpu"], "cpu_flags": m["flags"],
            "cpus": m["cpus"], "checkpoint": str(ck), "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
            "bandwidth": measured or bw.stderr[-500:],
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "checkpoint"}}
    stem = args.name or ("cpu-sweep" if args.sweep else f"cpu-b{args.batch}-p{args.prompt}-n{args.new}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=2) + "\n")
    limit = (f" Memory bandwidth {bandwidth:.1f} GB/s (benchmarks.bandwidth: the faster of a {args.threads}-thread read "
             "and a GEMV over 512 MB); x bandwidth limit = decode tok/s x model bytes / bandwidth.") if bandwidth else ""
    head = (f"`{meta['command']}` on {meta['machine']} ({meta['cpus']} CPUs; {' '.join(m['flags'])}), {args.threads} threads, "
            f"median of {args.runs} runs per repetition, {meta['date']}. Decode tok/s counts all rows of a batch."
            f"{limit}\n\n")
    (args.out / f"{stem}.md").write_text(head + "\n".join(md))
    if args.sweep:
        plot(cases, args.out / f"{stem}.png")
    print(head + "\n".join(md))


if __name__ == "__main__":
    main()
