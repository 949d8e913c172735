"""LoRA adapters at run time (export --lora-slots): decode speed with adapters vs the plain base export, and memory.

    python -m benchmarks.lora [--runs 5] [--threads 2] [--new 64] [--clients 16] [--slots 4] [--rank 8]
                              [--quiet-s 10] [--checkpoint DIR] [--work DIR] [--out DIR] [--name lora]

The 124M GPT-2 shape (benchmarks.common.checkpoint, random init) exported twice into --work: plain, and with
--slots LoRA slots of rank --rank. --slots peft adapters of rank --rank on all four projections (c_attn, attn
c_proj, c_fc, mlp c_proj; get_peft_model with random lora_A / lora_B) are saved there and loaded with
Engine.load_lora. Systems, interleaved within each of --runs repetitions (the order rotates), medians:

  steps       the decode step alone (DecodeStep, as the core runs it; 40 positions cached, rows held so that
              they stay there): ms per step, 30 steps per repetition, at batch 1 and at --clients rows, of plain,
              slots-base (every row on slot 0) and slots-lora (batch 1: adapter 0; --clients rows: row i on
              adapter i % (slots + 1), 0 = the base).
  batch 1     greedy decode tok/s = (new - 1) / (time of generate(max_new_tokens=new) - time of max_new_tokens=1),
              of: plain (the plain export), slots-base (the slots export, no adapter: slot 0), slots-lora (the
              slots export with adapter 1).
  concurrent  --clients requests of --new tokens submitted at once to an AsyncEngine(max_batch=--clients,
              buffer=--new + 1: no row waits for its reader):
              plain (all on the plain export), slots-mixed (request i on adapter i % (slots + 1), 0 = the base:
              every adapter and the base in each step), slots-base (all on the base, slots export);
              completion tokens / wall time.
  memory      bytes of the LoRA stacks (all slots, allocated at load), resident memory (VmRSS) added by loading
              the slots export and its adapters vs the plain export, and that of one merged export (export
              --adapter, loaded and run once), whose files and resident memory a merged export per adapter
              repeats --slots times.

Targets (the issue): slots-lora >= 0.9x plain at batch 1; slots-mixed >= 0.85x plain at --clients requests.
Before each timed repetition the run waits (up to --quiet-s seconds) until other processes use under a quarter
of the CPUs; everything runs in this one process, so compare only the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, checkpoint, exported_bytes, machine, write_results
from benchmarks.inprocess import code_state, wait_quiet

HERE = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO: The quick brown fox jumps over the lazy dog, and"
TARGETS = {"batch1": 0.9, "concurrent": 0.85}


def rss() -> int:
    """Resident bytes of this process (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def make_adapters(ck: Path, work: Path, n: int, rank: int) -> list[Path]:
    """n peft LoRA adapters of rank `rank` on c_attn, c_proj (attn and mlp) and c_fc, random weights, saved once."""
    folders = [work / f"adapter-{k}" for k in range(n)]
    if all((f / "adapter_config.json").is_file() for f in folders):
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    for k, folder in enumerate(folders):
        torch.manual_seed(k)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(ck),
                               LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["c_attn", "c_proj", "c_fc"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(0.02 * torch.randn_like(p))
        model.save_pretrained(folder)
    return folders


def export_once(ck: Path, out: Path, **options) -> Path:
    """ck exported into out once per exporter version."""
    from gpt2_onnx.export import EXPORTER_VERSION, export_model

    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("exporter_version") == EXPORTER_VERSION:
        return out
    return export_model(str(ck), out, **options)


def batch1(engines: dict, runs: int, new: int, quiet_s: float) -> dict:
    """{system: [tok/s per repetition]}; engines: {system: (Engine, adapter or None)}, interleaved, rotated."""
    out = {name: [] for name in engines}
    names = list(engines)
    for rep in range(runs):
        wait_quiet(quiet_s)
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            eng, adapter = engines[name]

            def timed(n: int) -> float:
                t = time.perf_counter()
                eng.generate(PROMPT, max_new_tokens=n, ignore_eos=True, adapter=adapter)
                return time.perf_counter() - t

            t_new = statistics.median(timed(new) for _ in range(2))
            t_one = statistics.median(timed(1) for _ in range(3))
            out[name].append((new - 1) / (t_new - t_one))
    return out


def steps(models: dict, rows: int, runs: int, quiet_s: float) -> dict:
    """{system: [ms per decode step per repetition]}; models: {system: (Model, slots (rows,) or None)}."""
    import numpy as np

    from gpt2_onnx.model import DecodeStep

    decoders = {}
    for name, (model, lora) in models.items():
        cache = model.new_cache(rows, 128)
        decoders[name] = (DecodeStep(model, cache), cache, {} if lora is None else {"lora": lora})
    tokens, hold, none = np.full(rows, 5), np.ones(rows, bool), np.zeros(0, np.int64)
    out = {name: [] for name in models}
    names = list(models)
    for rep in range(runs):
        wait_quiet(quiet_s)
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            step, cache, more = decoders[name]
            cache.lengths[:] = 40
            step(tokens, none, hold=hold, **more)  # warm
            t = time.perf_counter()
            for _ in range(30):
                step(tokens, none, hold=hold, **more)
            out[name].append((time.perf_counter() - t) / 30 * 1000)
    return out


def concurrent(llms: dict, clients: int, runs: int, new: int, quiet_s: float) -> dict:
    """{system: [tok/s per repetition]}; llms: {system: (AsyncEngine, [adapter of request i])}."""
    from gpt2_onnx import GenerationOptions

    opts = GenerationOptions(max_new_tokens=new, ignore_eos=True)
    out = {name: [] for name in llms}
    names = list(llms)
    for rep in range(runs):
        wait_quiet(quiet_s)
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            llm, adapters = llms[name]
            t = time.perf_counter()
            requests = [llm.submit(f"{PROMPT} {i}", opts, adapter=adapters[i]) for i in range(clients)]
            tokens = sum(len(r.result()[0].token_ids) for r in requests)
            out[name].append(tokens / (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init 124M shape]")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "gpt2-onnx-bench" / "lora",
                    help="folder for the exports and adapters (made once)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--quiet-s", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="lora")
    args = ap.parse_args()

    import onnxruntime as ort

    from gpt2_onnx import AsyncEngine, Engine

    ck = checkpoint(args.checkpoint)
    work = args.work / f"slots{args.slots}-r{args.rank}"
    work.mkdir(parents=True, exist_ok=True)
    folders = make_adapters(ck, work, args.slots, args.rank)
    plain_dir = export_once(ck, work / "plain")
    slots_dir = export_once(ck, work / "slots", lora_slots=args.slots, max_lora_rank=args.rank)
    merged_dir = export_once(ck, work / "merged-0", adapter=folders[0])

    memory = {"rss_start": rss()}
    plain = Engine.load(plain_dir, provider="cpu", threads=args.threads)
    plain.generate(PROMPT, max_new_tokens=4)
    memory["plain_rss"] = rss() - memory["rss_start"]
    before = rss()
    slots = Engine.load(slots_dir, provider="cpu", threads=args.threads)
    slots.generate(PROMPT, max_new_tokens=4)
    memory["slots_rss"] = rss() - before
    before = rss()
    adapters = [slots.load_lora(f, name=f.name) for f in folders]
    slots.generate(PROMPT, max_new_tokens=4, adapter=adapters[0])
    memory["load_lora_rss"] = rss() - before
    memory["lora_stacks_bytes"] = slots.model.lora.nbytes
    before = rss()
    merged = Engine.load(merged_dir, provider="cpu", threads=args.threads)
    merged.generate(PROMPT, max_new_tokens=4)
    memory["merged_rss"] = rss() - before
    memory["export_bytes"] = {"plain": exported_bytes(plain_dir), "slots": exported_bytes(slots_dir),
                              "merged": exported_bytes(merged_dir)}
    same = merged.generate(PROMPT, max_new_tokens=24).token_ids == \
        slots.generate(PROMPT, max_new_tokens=24, adapter=adapters[0]).token_ids
    del merged

    import numpy as np

    slot_of = np.array([0 if a is None else a.slot for a in
                        [None if i % (args.slots + 1) == 0 else adapters[i % (args.slots + 1) - 1]
                         for i in range(args.clients)]])
    step_ms = {f"batch {rows}": steps({"plain": (plain.model, None), "slots-base": (slots.model, np.zeros(rows, int)),
                                       "slots-lora": (slots.model, np.full(1, adapters[0].slot) if rows == 1 else
                                                      slot_of)}, rows, args.runs, args.quiet_s)
               for rows in (1, args.clients)}
    b1 = batch1({"plain": (plain, None), "slots-base": (slots, None), "slots-lora": (slots, adapters[0])},
                args.runs, args.new, args.quiet_s)
    mixed = [None if i % (args.slots + 1) == 0 else adapters[i % (args.slots + 1) - 1] for i in range(args.clients)]
    # buffer: every Step of a request may wait unread (they are read one request after the other), so no row is held
    opts = dict(max_batch=args.clients, prefix_cache_mb=0, buffer=args.new + 1)
    llms = {"plain": (AsyncEngine(plain, **opts), [None] * args.clients),
            "slots-mixed": (AsyncEngine(slots, **opts), mixed),
            "slots-base": (AsyncEngine(slots, **opts), [None] * args.clients)}
    conc = concurrent(llms, args.clients, args.runs, args.new, args.quiet_s)
    for llm, _ in llms.values():
        llm.shutdown()

    res = {"command": "python -m benchmarks.lora " + " ".join(sys.argv[1:]), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "code": code_state(HERE), "onnxruntime": ort.__version__,
           "threads": args.threads, "runs": args.runs, "new": args.new, "clients": args.clients, "slots": args.slots,
           "rank": args.rank, "checkpoint": str(ck), "merged_equals_runtime_greedy": same, "memory": memory,
           "steps": step_ms, "batch1": b1, "concurrent": conc}
    write_results(args.out, args.name, res, markdown)


def markdown(res: dict) -> str:
    m, code, mem, K = res["machine"], res["code"], res["memory"], res["slots"]
    med = {kind: {k: statistics.median(v) for k, v in res[kind].items()} for kind in ("batch1", "concurrent")}
    mb = lambda b: f"{b / 2**20:.1f} MB"  # noqa: E731
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), onnxruntime {res['onnxruntime']} "
             f"on {res['threads']} threads, code {code['commit'][:7]}"
             + (f" with uncommitted changes to {len(code['uncommitted'])} files" if code["uncommitted"] else "") + ".",
             "", f"124M GPT-2 shape (random init), {K} LoRA slots of rank {res['rank']} on all four projections; "
             f"{K} peft adapters of rank {res['rank']} on c_attn, c_proj, c_fc. {res['new']} new tokens, greedy. "
             f"Tokens/s: median of {res['runs']} interleaved repetitions (each in brackets). Adapter 0 at run time "
             f"and merged at export: greedy ids equal: {res['merged_equals_runtime_greedy']}.", "",
             "| | system | tok/s | vs plain | target |", "|---|---|---|---|---|"]
    for kind, label in (("batch1", "batch 1"), ("concurrent", f"{res['clients']} concurrent requests")):
        for name, runs in res[kind].items():
            ratio = med[kind][name] / med[kind]["plain"]
            target = TARGETS[kind] if name in ("slots-lora", "slots-mixed") else None
            verdict = "" if target is None else f">= {target}x: {'met' if ratio >= target else 'NOT met'}"
            lines.append(f"| {label} | {name} | {med[kind][name]:.1f} ({' / '.join(f'{x:.1f}' for x in runs)}) | "
                         f"**{ratio:.3f}x** | {verdict} |")
    lines += ["", "Decode step alone (DecodeStep, ms per step; median of the repetitions, each in brackets):", "",
              "| rows | system | ms / step | plain / it (speed vs plain) |", "|---|---|---|---|"]
    for rows, r in res["steps"].items():
        base = statistics.median(r["plain"])
        for name, runs in r.items():
            ms = statistics.median(runs)
            lines.append(f"| {rows} | {name} | {ms:.2f} ({' / '.join(f'{x:.1f}' for x in runs)}) | "
                         f"**{base / ms:.3f}x** |")
    lines += ["", "Systems: plain = the plain export (no LoRA path); slots-base = the slots export, every row on "
              "slot 0 (no adapter); slots-lora = the slots export with adapter 0; slots-mixed = request i on adapter "
              f"i % {K + 1} (0 = the base), so each step mixes every adapter and the base.", "",
              "Memory (resident = VmRSS added, after loading and one generate):", "",
              "| | bytes |", "|---|---|",
              f"| LoRA stacks of the slots export ({K} slots + slot 0, allocated at load) | "
              f"{mb(mem['lora_stacks_bytes'])} |",
              f"| resident: plain export loaded | {mb(mem['plain_rss'])} |",
              f"| resident: slots export loaded | {mb(mem['slots_rss'])} |",
              f"| resident: {K} adapters loaded into it (load_lora) | {mb(mem['load_lora_rss'])} |",
              f"| resident: one merged export loaded (export --adapter) | {mb(mem['merged_rss'])} |",
              f"| {K} merged exports: resident ({K} x the one measured) | {mb(K * mem['merged_rss'])} |",
              f"| files: plain / slots / one merged export | {mb(mem['export_bytes']['plain'])} / "
              f"{mb(mem['export_bytes']['slots'])} / {mb(mem['export_bytes']['merged'])} |",
              f"| files: {K} merged exports | {mb(K * mem['export_bytes']['merged'])} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
