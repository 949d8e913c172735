"""Load time of prompt-tuning and P-tuning adapters (Engine.load_prefix) on the 124M shape.

    python -m benchmarks.prompt_learning [--checkpoint DIR] [--runs 5] [--virtual 20] [--threads 2]

The checkpoint (default: the random-init 124M GPT2Config of benchmarks.common.checkpoint) is exported into
a temporary folder. peft (get_peft_model + save_pretrained, random trainable weights) writes four adapters
of --virtual tokens: P-tuning with an MLP and with an LSTM encoder (encoder_hidden_size n_embd), prompt
tuning, and prefix-tuning for comparison. One Engine times load_prefix of every adapter (reading it; for
prompt learning also opening embeds.onnx and one pass of the virtual tokens, of which the opening is
timed apart), --runs repetitions after one not counted, adapters interleaved in an order reversed every
other repetition (A B C D, D C B A, ...); medians. Also recorded: the Engine.load time, the process's RSS
(anonymous and file-backed) before the first load_prefix and after all of them (every Prefix kept), and
the greatest logit difference to PeftModel's forward pass (torch) on one 16-token prompt. For scale, the
same interleaving times Engine.prefill of --virtual real tokens (model.onnx, prepacked weights).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, checkpoint, machine, write_results
from benchmarks.inprocess import code_state

ROOT = Path(__file__).resolve().parent.parent
PREFILL = "reference: Engine.prefill of as many real tokens"


def rss_mb() -> dict:
    """This process's resident memory: anonymous (heap) and file-backed (mapped weights), MB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kb = lambda k: int(status[k].split()[0]) / 1024  # noqa: E731
    return {"anon": round(kb("RssAnon"), 1), "file": round(kb("RssFile"), 1)}


def make_adapters(ck: Path, out: Path, n_virtual: int) -> dict[str, Path]:
    import torch
    import transformers
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    base = transformers.GPT2LMHeadModel.from_pretrained(ck).eval()
    hidden = base.config.n_embd
    configs = {
        "p-tuning-mlp": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual,
                                            encoder_hidden_size=hidden),
        "p-tuning-lstm": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual,
                                             encoder_hidden_size=hidden, encoder_reparameterization_type="LSTM"),
        "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual),
        "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual),
    }
    folders = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        model = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(ck), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn_like(p))
        folders[name] = out / name
        model.save_pretrained(folders[name])
    return folders


def peft_difference(ck: Path, engine, folder: Path) -> float:
    """Greatest |logit difference| between the engine after the adapter and PeftModel's forward, 16 tokens."""
    import torch
    import transformers
    from peft import PeftModel

    ids = list(range(100, 1700, 100))
    pre = engine.load_prefix(folder)
    cache = engine.model.new_cache(1, pre.virtual + len(ids))
    engine.model.copy_kv(pre.cache, 0, cache, 0, pre.virtual)
    got = engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]
    peft = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(ck), folder).eval()
    with torch.no_grad():
        ref = peft(input_ids=torch.tensor([ids])).logits[0, -len(ids):].numpy()  # prompt tuning: virtual ones too
    return float(np.abs(got - ref).max())


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--virtual", type=int, default=20, help="num_virtual_tokens of every adapter")
    add_out(ap)
    args = ap.parse_args()
    import onnxruntime as ort

    from gpt2_onnx import Engine
    from gpt2_onnx.export import export_model
    from gpt2_onnx.model import Model

    ck = checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = export_model(str(ck), Path(tmp) / "onnx")
        export_s = time.perf_counter() - t
        adapters = make_adapters(ck, Path(tmp), args.virtual)
        names = list(adapters)
        t = time.perf_counter()
        engine = Engine.load(folder, provider="cpu", threads=args.threads)
        load_s = time.perf_counter() - t
        opens, real = [], Model._open_embeds

        def timed_open(self):
            t = time.perf_counter()
            session = real(self)
            opens.append(time.perf_counter() - t)
            return session

        Model._open_embeds = timed_open
        prefill = list(range(100, 100 + 50 * args.virtual, 50))
        load = {**{n: lambda n=n: engine.load_prefix(adapters[n]) for n in names},
                PREFILL: lambda: engine.prefill(prefill)}
        times, open_s, kept = {n: [] for n in load}, {n: [] for n in load}, []
        before = rss_mb()
        for rep in range(args.runs + 1):  # repetition 0 warms the page cache and is not counted
            for name in list(load) if rep % 2 else list(load)[::-1]:
                opens.clear()
                t = time.perf_counter()
                kept.append(load[name]())
                if rep:
                    times[name].append(time.perf_counter() - t)
                    open_s[name] += opens
        after = rss_mb()
        Model._open_embeds = real
        diff = {name: peft_difference(ck, engine, adapters[name]) for name in names}
        files = {f.name: f.stat().st_size for f in folder.iterdir()}
    ms = lambda xs: round(1e3 * statistics.median(xs), 1)  # noqa: E731
    result = {
        "command": "python -m benchmarks.prompt_learning " + " ".join(
            f"--{k} {v}" for k, v in (("runs", args.runs), ("virtual", args.virtual), ("threads", args.threads))),
        "machine": machine(), "onnxruntime": ort.__version__, "code": code_state(ROOT),
        "checkpoint": str(ck), "virtual_tokens": args.virtual, "runs": args.runs, "threads": args.threads,
        "export_s": round(export_s, 1), "files_bytes": files,
        "engine_load_ms": round(1e3 * load_s, 1),
        "load_prefix_ms": {n: ms(v) for n, v in times.items()},
        "load_prefix_runs_ms": {n: [round(1e3 * x, 1) for x in v] for n, v in times.items()},
        "open_embeds_ms": {n: ms(v) for n, v in open_s.items() if v},
        "rss_mb": {"before": before, "after": after, "prefixes_kept": len(kept)},
        "max_abs_logit_diff_vs_peft": diff,
    }
    write_results(args.out, "prompt_learning", result, markdown)


def markdown(r: dict) -> str:
    m, mem = r["machine"], r["rss_mb"]
    lines = [f"`{r['command']}`", "",
             f"{m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), onnxruntime {r['onnxruntime']} on {r['threads']} threads, code "
             f"{r['code']['commit'][:7]}{' with uncommitted changes' if r['code']['uncommitted'] else ''}; "
             f"checkpoint {r['checkpoint']} exported in {r['export_s']} s into a temporary folder: embeds.onnx "
             f"{r['files_bytes'].get('embeds.onnx', 0) / 1024:.0f} KB, its weights those of model.onnx.data "
             f"({r['files_bytes'].get('model.onnx.data', 0) / 2**20:.0f} MB).", "",
             f"Engine.load of the export: {r['engine_load_ms']} ms. Engine.load_prefix of an adapter of "
             f"{r['virtual_tokens']} virtual tokens, ms, median of {r['runs']} repetitions (adapters interleaved, "
             "order reversed every other repetition; each repetition in brackets); of it, opening embeds.onnx "
             "(each prompt-learning load opens it for its one pass, prepacking off, and closes it).", "",
             "| adapter | load_prefix ms | of it opening embeds.onnx ms | max abs logit diff vs PeftModel |",
             "|---|---|---|---|"]
    for n, v in r["load_prefix_ms"].items():
        diff = r["max_abs_logit_diff_vs_peft"].get(n)
        lines.append(f"| {n} | {v} ({r['load_prefix_runs_ms'][n]}) | {r['open_embeds_ms'].get(n, '-')} | "
                     f"{'-' if diff is None else f'{diff:.2e}'} |")
    lines += ["", f"Resident memory of the process before the first load_prefix and after all "
                  f"{mem['prefixes_kept']} (every Prefix kept): anonymous {mem['before']['anon']} -> "
                  f"{mem['after']['anon']} MB, file-backed {mem['before']['file']} -> {mem['after']['file']} MB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
