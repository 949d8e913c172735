"""One function per system: load a checkpoint, then time greedy generation on given ids.

Each runs in its own process (benchmarks/__main__.py spawns `python -m benchmarks.systems`).
Methodology, identical for every system: time to first token = wall time of generating 1 token
(prefill included); decode tok/s = (N - 1) / (time(N tokens) - time(1 token)); medians of runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path


def _time(fn, runs: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(gen, ids, new_tokens: int, runs: int) -> dict:
    """gen(ids, n) -> new token ids (list of lists for a batch)."""
    ttft, _ = _time(lambda: gen(ids, 1), runs)
    total, out = _time(lambda: gen(ids, new_tokens), runs)
    batch = len(ids)
    return {"ttft_s": ttft, "total_s": total,
            "decode_tok_s": batch * (new_tokens - 1) / max(total - ttft, 1e-9), "ids": out}


def ours(ck: Path, ids, new_tokens, runs, threads, options):
    from engine import Engine
    from export.cache import resolve_model

    folder = resolve_model(str(ck), quantize=options.get("quantize"))
    eng = Engine.load(folder, provider="cpu", threads=threads)

    def gen(batch, n):
        return [r.token_ids for r in eng.generate_batch(batch, max_new_tokens=n, ignore_eos=True)]

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    return res


def hf(ck: Path, ids, new_tokens, runs, threads, options):
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(ck, torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def gen(batch, n):
        with torch.no_grad():
            x = torch.tensor(batch)  # equal-length prompts
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False)[:, x.shape[1]:].tolist()

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = sum(f.stat().st_size for f in Path(ck).glob("*.safetensors"))
    return res


SYSTEMS = {"ours": ours, "ours-int8": ours, "ours-int4": ours, "hf-torch": hf}


def main() -> None:
    spec = json.loads(sys.argv[1])
    name = spec["system"]
    opts = {"quantize": {"ours-int8": "int8", "ours-int4": "int4"}.get(name)}
    try:
        res = SYSTEMS[name](Path(spec["checkpoint"]), spec["ids"], spec["new_tokens"], spec["runs"], spec["threads"], opts)
        res["status"] = "ok"
    except ImportError as e:
        res = {"status": f"skipped: {e}"}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
