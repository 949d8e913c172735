"""Beam search against HF transformers and CTranslate2, and what the logits processors cost.

    python -m benchmarks.decoding [--runs 3] [--threads 2] [--skip-hf] [--skip-ct2] [--baseline DIR]
                                  [--model 124m|bundled] [--name decoding]

Beam search: num_beams 4, exactly 64 new tokens (min_new_tokens 64 masks eos), length_penalty 1, no
early stopping, the best beam returned, on the 124M shape (random init, GPT-2's BPE; `--model bundled`:
the small bundled model, a quick check of the harness). The same fixed prompts (32 random ids each) at
batch 1 and 8 go to each system, each in a process of its own with --threads threads:

  ours      Engine.load(checkpoint: its exported folder).generate_batch(prompts, num_beams=4, ...)
  hf-torch  GPT2LMHeadModel.generate(num_beams=4, do_sample=False, early_stopping=False, ...)
  ct2       ctranslate2.Generator.generate_batch(beam_size=4, ...), float32, on the model converted by
            CTranslate2's own TransformersConverter (from an environment of its own when CTranslate2
            is not installed here); one that cannot run is recorded with the reason

tokens/s = prompts x 64 / wall time of one call, median of --runs calls after a short warm-up call.
Every system's best beams are compared with HF's, row by row (token ids).

Processors: our engine in one process, 16 prompts x 64 new tokens (ignore_eos) as greedy, sampled
(temperature 0.8, top_p 0.95, seed 0) and sampled with presence_penalty 0.5, frequency_penalty 0.5 and
no_repeat_ngram_size 3, the runs of the three interleaved; target: penalties / sampled >= 0.85.
--baseline DIR (a `git worktree` of another commit) runs greedy and sampled with that checkout's code in
the same way; target: ours / baseline ~1.0.

Each process starts once the other processes use under a quarter of the CPUs (waiting 60 s at most); the
share of the CPUs they took while it ran is recorded beside its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks.anchors import CACHE, Unavailable, _run
from benchmarks.common import RESULTS, checkpoint, machine, write_results

HERE = Path(__file__).resolve().parents[1]
BEAMS, NEW, PROMPT_LEN, WARM = 4, 64, 32, 8
BATCHES = (1, 8)
PROC_PROMPTS = 16
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 0}
PROCESSORS = {"greedy": {}, "sampled": SAMPLED,
              "penalties": {**SAMPLED, "presence_penalty": 0.5, "frequency_penalty": 0.5, "no_repeat_ngram_size": 3}}


def timed(fn, runs: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def beam_rows(gen, prompts: list[list[int]], runs: int) -> dict:
    """gen(prompts, n) -> new ids per prompt (best beam); for batch 1 and 8: tokens/s, median of runs."""
    rows = {}
    for b in BATCHES:
        batch = prompts[:b]
        gen(batch, WARM)
        times, ids = timed(lambda batch=batch: gen(batch, NEW), runs)
        rows[str(b)] = {"tok_s": b * NEW / statistics.median(times), "tok_s_runs": [b * NEW / t for t in times],
                        "times_s": times, "ids": ids, "new_tokens": [len(r) for r in ids]}
    return rows


def beam_ours(ck: Path, prompts, runs: int, threads: int) -> dict:
    from gpt2_onnx import Engine

    eng = Engine.load(str(ck), provider="cpu", threads=threads)

    def gen(batch, n):
        return [r.token_ids for r in eng.generate_batch(batch, num_beams=BEAMS, max_new_tokens=n, min_new_tokens=n)]

    rows = beam_rows(gen, prompts, runs)
    for b, row in rows.items():  # the scores of the timed prompts, outside the timing
        res = eng.generate_batch(prompts[:int(b)], num_beams=BEAMS, max_new_tokens=NEW, min_new_tokens=NEW)
        row["scores"] = [getattr(r, "score", None) for r in res]
    return {"rows": rows, "exported_folder": str(eng.folder)}


def beam_hf(ck: Path, prompts, runs: int, threads: int) -> dict:
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(ck, dtype=torch.float32).eval()
    pad = model.config.eos_token_id if model.config.eos_token_id is not None else 0

    def gen(batch, n):
        x = torch.tensor(batch)  # equal-length prompts: no padding
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), num_beams=BEAMS, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, early_stopping=False, length_penalty=1.0,
                                 num_return_sequences=1, pad_token_id=pad)
        return out[:, x.shape[1]:].tolist()

    return {"rows": beam_rows(gen, prompts, runs), "version": f"transformers {transformers.__version__}, "
                                                              f"torch {torch.__version__}"}


def beam_ct2(ck: Path, prompts, runs: int, threads: int) -> dict:
    import ctranslate2

    out = CACHE / "ct2" / f"{Path(ck).resolve().name}-float32"
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(ck)).convert(str(out), quantization="float32", force=True)
    vocab = json.loads((out / "vocabulary.json").read_text())
    index = {t: i for i, t in enumerate(vocab)}
    generator = ctranslate2.Generator(str(out), device="cpu", compute_type="float32", intra_threads=threads)

    def gen(batch, n):
        res = generator.generate_batch([[vocab[t] for t in row] for row in batch], beam_size=BEAMS, max_length=n,
                                       min_length=n, length_penalty=1.0, include_prompt_in_result=False)
        return [[index[t] for t in r.sequences[0]] for r in res]

    return {"rows": beam_rows(gen, prompts, runs), "version": f"ctranslate2 {ctranslate2.__version__}",
            "converted_folder": str(out)}


def processors(ck: Path, prompts, runs: int, threads: int, names: list[str]) -> dict:
    """Our engine, 16 prompts x 64 new tokens for each of `names` (PROCESSORS); the runs interleaved."""
    import gpt2_onnx
    from gpt2_onnx import Engine

    eng = Engine.load(str(ck), provider="cpu", threads=threads)
    rows = {}

    def gen(name, n):
        return eng.generate_batch(prompts, max_new_tokens=n, ignore_eos=True, **PROCESSORS[name])

    for name in names:
        try:
            gen(name, WARM)
            rows[name] = {"times_s": []}
        except Exception as e:  # noqa: BLE001 (an option this code lacks: recorded, the other rows still run)
            rows[name] = {"status": f"failed: {type(e).__name__}: {e}"}
    for _ in range(runs):
        for name in [n for n in names if "times_s" in rows[n]]:
            times, res = timed(lambda name=name: gen(name, NEW), 1)
            rows[name]["times_s"] += times
            rows[name]["new_tokens"] = sum(len(r.token_ids) for r in res)
    for row in rows.values():
        if "times_s" in row:
            n = len(prompts) * NEW
            row.update(status="ok", tok_s=n / statistics.median(row["times_s"]),
                       tok_s_runs=[n / t for t in row["times_s"]])
    return {"rows": rows, "gpt2_onnx": gpt2_onnx.__file__, "exported_folder": str(eng.folder)}


WORKERS = {"ours": beam_ours, "hf-torch": beam_hf, "ct2": beam_ct2, "processors": processors}


def worker(spec: dict) -> None:
    """One system in this process; prints `RESULT <json>` (with status and the reason when it cannot run)."""
    args = [Path(spec["checkpoint"]), spec["prompts"], spec["runs"], spec["threads"]] + spec.get("extra", [])
    try:
        res = {**WORKERS[spec["system"]](*args), "status": "ok"}
    except (ImportError, Unavailable) as e:
        res = {"status": f"skipped ({type(e).__name__}: {e})"}
    except Exception as e:  # noqa: BLE001 (recorded with its reason)
        traceback.print_exc()
        res = {"status": f"failed: {type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(res))


def ct2_python() -> str:
    """This interpreter if it has CTranslate2, else a virtual environment with it (and this torch, transformers)."""
    import importlib.util

    if importlib.util.find_spec("ctranslate2"):
        return sys.executable
    venv = CACHE / "ct2-venv"
    python = venv / "bin" / "python"
    if (venv / "ok").is_file():
        return str(python)
    import torch
    import transformers

    _run([sys.executable, "-m", "venv", str(venv)], "creating the CTranslate2 environment")
    _run([str(python), "-m", "pip", "install", "-q", "ctranslate2>=4.5", f"transformers=={transformers.__version__}",
          f"torch=={torch.__version__.split('+')[0]}"], "installing ctranslate2 with this torch and transformers")
    (venv / "ok").write_text("installed\n")
    return str(python)


def spawn(spec: dict, python: str = sys.executable, env: dict | None = None) -> dict:
    """worker(spec) in a process of its own (python, env); its RESULT, or why it produced none."""
    from benchmarks.inprocess import busy_s, wait_quiet

    print(f"running {spec['system']} ...", file=sys.stderr, flush=True)
    env = dict(env or os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    load = {"wait_quiet": wait_quiet(60), "loadavg_before": os.getloadavg()}
    t, busy, child = time.time(), busy_s(), children_cpu_s()
    p = subprocess.run([python, "-m", "benchmarks.decoding", "worker", json.dumps(spec)], check=False,
                       capture_output=True, text=True, env=env, cwd=HERE)
    other = busy_s() - busy - (children_cpu_s() - child)  # CPU seconds of other processes meanwhile (this one idles)
    load |= {"loadavg_after": os.getloadavg(),
             "other_cpu_share": max(0.0, other) / ((time.time() - t) * (os.cpu_count() or 1))}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if res["status"] != "ok":
                print(f"  {spec['system']}: {res['status']}\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
            return {**res, "load": load}
    tail = p.stderr.strip().splitlines()[-3:] or [f"exit code {p.returncode}"]
    return {"status": f"failed: the process ended without a result ({' | '.join(tail)})", "load": load}


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def part_a(args, ck: Path, prompts) -> dict:
    systems = {"ours": sys.executable}
    if not args.skip_hf:
        systems["hf-torch"] = sys.executable
    if not args.skip_ct2:
        try:
            systems["ct2"] = ct2_python()
        except Unavailable as e:
            systems["ct2"] = f"skipped ({e})"
    out = {}
    for name, python in systems.items():
        spec = {"system": name, "checkpoint": str(ck), "prompts": prompts[:max(BATCHES)], "runs": args.runs,
                "threads": args.threads}
        out[name] = spawn(spec, python) if not python.startswith("skipped") else {"status": python}
    ref = out.get("hf-torch", {}).get("rows")
    for res in out.values():
        for b, row in res.get("rows", {}).items():
            row["rows_equal_to_hf"] = sum(x == y for x, y in zip(row["ids"], ref[b]["ids"])) if ref else None
    for name in ("hf-torch", "ct2"):
        for b in map(str, BATCHES):
            x, y = out["ours"].get("rows", {}).get(b), out.get(name, {}).get("rows", {}).get(b)
            out.setdefault("ratios", {})[f"ours / {name} @ batch {b}"] = x["tok_s"] / y["tok_s"] if x and y else None
    return out


def part_b(args, ck: Path, prompts) -> dict:
    spec = {"system": "processors", "checkpoint": str(ck), "prompts": prompts, "runs": args.runs,
            "threads": args.threads}
    out = {"ours": spawn({**spec, "extra": [list(PROCESSORS)]})}
    if args.baseline:
        from benchmarks.inprocess import code_state
        from benchmarks.server_load import checkout_env

        out["baseline"] = spawn({**spec, "extra": [["greedy", "sampled"]]}, env=checkout_env(Path(args.baseline)))
        out["baseline_commit"] = code_state(Path(args.baseline))["commit"]

    def tok_s(who: str, name: str) -> float | None:
        row = out.get(who, {}).get("rows", {}).get(name, {})
        return row.get("tok_s")

    ratios = {"penalties / sampled": (tok_s("ours", "penalties"), tok_s("ours", "sampled"))}
    if args.baseline:
        ratios |= {f"ours / baseline, {n}": (tok_s("ours", n), tok_s("baseline", n)) for n in ("greedy", "sampled")}
    out["ratios"] = {k: a / b if a and b else None for k, (a, b) in ratios.items()}
    return out


def fmt(row: dict | None, key: str = "tok_s") -> str:
    if not row or row.get("status", "ok") != "ok":
        return (row or {}).get("status", "-")
    return f"{row[key]:.1f} ({' / '.join(f'{t:.1f}' for t in row[key + '_runs'])})"


def ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def markdown(res: dict) -> str:
    m, a, b = res["machine"], res["beam_search"], res["processors"]
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), {res['threads']} threads "
             f"everywhere, model {res['model']}, code {res['code']['commit'][:7]}"
             + (f" with uncommitted changes to {len(res['code']['uncommitted'])} files" if res["code"]["uncommitted"]
                else "") + f". Tokens/s: median of {res['runs']} runs (each run).", "",
             f"### Beam search: {BEAMS} beams, {NEW} new tokens, {PROMPT_LEN}-token prompts", "",
             "| batch | system | tokens/s | ours / system | rows equal to HF |", "|---|---|---|---|---|"]
    for bs in map(str, BATCHES):
        for name in ("ours", "hf-torch", "ct2"):
            if name not in a:
                continue
            row = a[name].get("rows", {}).get(bs)
            eq = "(reference)" if name == "hf-torch" else f"{row['rows_equal_to_hf']} of {bs}" \
                if row and row["rows_equal_to_hf"] is not None else "-"
            rat = "" if name == "ours" else ratio(a["ratios"].get(f"ours / {name} @ batch {bs}"))
            lines.append(f"| {bs} | {name} | {fmt(row) if row else a[name]['status']} | {rat} | {eq} |")
    lines += ["", f"### Processors: our engine, {PROC_PROMPTS} prompts x {NEW} new tokens (ignore_eos)", "",
              "| options | new tokens/s | baseline | ours / baseline |", "|---|---|---|---|"]
    for name in PROCESSORS:
        base = b.get("baseline", {}).get("rows", {}).get(name) if "baseline" in b else None
        desc = {"greedy": "greedy", "sampled": "sampled: temperature 0.8, top_p 0.95, seed 0",
                "penalties": "sampled + presence 0.5, frequency 0.5, no_repeat_ngram 3"}[name]
        lines.append(f"| {desc} | {fmt(b['ours'].get('rows', {}).get(name) or b['ours'])} | "
                     f"{fmt(base) if base else '-'} | {ratio(b['ratios'].get(f'ours / baseline, {name}'))} |")
    pen = b["ratios"]["penalties / sampled"]
    lines += ["", f"penalties / sampled: {ratio(pen)} (target >= 0.85: "
                  f"{'met' if pen and pen >= 0.85 else 'not met' if pen else 'not measured'})"
              + (f"; baseline: {b['baseline_commit'][:7]} ({res['baseline']})." if "baseline" in b else "."), ""]
    procs = [(f"beam search {k}", v) for k, v in a.items() if "load" in v] + \
        [(f"processors {k}", v) for k, v in b.items() if isinstance(v, dict) and "load" in v]
    lines += ["Other processes' share of the CPUs while each process ran (its load and warm-up included): "
              + ", ".join(f"{k} {100 * v['load']['other_cpu_share']:.0f}%" for k, v in procs)
              + (" (above 15%: that process's numbers are suspect)."
                 if any(v["load"]["other_cpu_share"] > 0.15 for _, v in procs) else "."), ""]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        return worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ct2", action="store_true")
    ap.add_argument("--baseline", default=None, metavar="DIR", help="a checkout of another commit (git worktree)")
    ap.add_argument("--model", default="124m", choices=["124m", "bundled"])
    ap.add_argument("--checkpoint", default=None, help="HF folder for '124m' [default: random-init GPT2Config()]")
    ap.add_argument("--name", default="decoding", help="results file stem [default: decoding]")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the results [default: {RESULTS}]")
    args = ap.parse_args()
    import numpy as np

    from benchmarks.inprocess import code_state

    ck = checkpoint(args.checkpoint) if args.model == "124m" else HERE / "models" / "tiny-shakespeare"
    vocab = json.loads((ck / "config.json").read_text())["vocab_size"]
    prompts = np.random.default_rng(0).integers(0, vocab, (PROC_PROMPTS, PROMPT_LEN)).tolist()
    res = {"command": "python -m benchmarks.decoding " + " ".join(sys.argv[1:]), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "checkpoint": str(ck),
           "threads": args.threads, "runs": args.runs, "baseline": args.baseline, "code": code_state(HERE),
           "prompts": prompts}
    res["beam_search"] = part_a(args, ck, prompts)
    res["processors"] = part_b(args, ck, prompts)
    write_results(args.out, args.name, res, markdown)
    failed = [f"beam search: {res['beam_search']['ours']['status']}"] if res["beam_search"]["ours"]["status"] != "ok" \
        else []
    failed += [f"processors {k}: {v['status']}" for k, v in res["processors"]["ours"].get("rows", {}).items()
               if v["status"] != "ok"]
    if res["processors"]["ours"]["status"] != "ok":
        failed.append(f"processors: {res['processors']['ours']['status']}")
    if failed:
        raise SystemExit("our engine could not run all of it (results written):\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    main()
