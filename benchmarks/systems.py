"""One function per system: load a checkpoint, then time greedy generation on given ids.

Each runs in its own process (benchmarks/__main__.py spawns `python -m benchmarks.systems`); a first process
with runs 0 builds its artifacts (export, conversion) and times nothing, so peak RSS is the runtime's alone.
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

from benchmarks.anchors import Unavailable


def _time(fn, runs: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure(gen, ids, new_tokens: int, runs: int) -> dict:
    """gen(ids, n) -> new token ids (list of lists for a batch); runs 0 times nothing."""
    if not runs:
        return {}
    ttft, _ = _time(lambda: gen(ids, 1), runs)
    total, out = _time(lambda: gen(ids, new_tokens), runs)
    batch = len(ids)
    if total <= ttft:  # the machine was too busy for the difference to mean anything
        raise Unavailable(f"generating {new_tokens} tokens took no longer than 1 ({total:.3f} s vs {ttft:.3f} s): "
                          "the machine is too busy to time this; rerun with more --runs on a quiet machine")
    return {"ttft_s": ttft, "total_s": total, "decode_tok_s": batch * (new_tokens - 1) / (total - ttft), "ids": out}


def ours(ck: Path, ids, new_tokens, runs, threads, options):
    from benchmarks.common import exported_bytes
    from gpt2_onnx import Engine

    eng = Engine.load(str(ck), provider="cpu", threads=threads, quantize=options.get("quantize"))
    folder = eng.folder

    def gen(batch, n):
        return [r.token_ids for r in eng.generate_batch(batch, max_new_tokens=n, ignore_eos=True)]

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = exported_bytes(folder)
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


def _work(ck: Path, name: str) -> Path:
    d = Path(ck) / "anchors" / name
    d.parent.mkdir(parents=True, exist_ok=True)
    return d


def ct2(ck: Path, ids, new_tokens, runs, threads, options):
    import ctranslate2

    compute = options["compute_type"]
    out = _work(ck, "ct2-" + compute)
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(ck)).convert(str(out), quantization=None if compute == "float32" else compute,
                                               force=True)
    vocab = json.loads((out / "vocabulary.json").read_text())
    index = {t: i for i, t in enumerate(vocab)}
    gen_ = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=threads)

    def gen(batch, n):
        res = gen_.generate_batch([[vocab[t] for t in row] for row in batch], max_length=n, sampling_topk=1,
                                  min_length=n, include_prompt_in_result=False, end_token=[])
        return [[index[t] for t in r.sequences[0]] for r in res]

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = (out / "model.bin").stat().st_size
    return res


def llama(ck: Path, ids, new_tokens, runs, threads, options):
    import llama_cpp

    from benchmarks.anchors import gguf

    path = gguf(Path(ck), options["qtype"])  # llama.cpp's own converter and quantizer
    if len(ids) != 1:
        raise Unavailable("llama-cpp-python's Llama runs one sequence at a time; batch > 1 not measured")
    if not options.get("extra_bufts", True):  # the CPU "extra buffer types" (AMX/repacked weights) off
        bindings = llama_cpp.llama_cpp  # Llama() reads its default model params from the ctypes bindings
        defaults = bindings.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = no_extra_bufts
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids[0]) + new_tokens + 8, n_threads=threads, n_batch=512,
                          verbose=False)

    def gen(batch, n):
        llm.reset()
        out = []
        for tok in llm.generate(batch[0], top_k=1, temp=0.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return [out]

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = path.stat().st_size
    res["extra_bufts"] = options.get("extra_bufts", True)
    return res


def optimum(ck: Path, ids, new_tokens, runs, threads, options):
    """optimum's ORTModelForCausalLM on `optimum-cli export onnx`'s output (run in optimum's own environment)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from benchmarks.anchors import optimum_export

    out = optimum_export(Path(ck))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(str(out), session_options=so)
    model.generation_config.eos_token_id = None

    def gen(batch, n):
        x = torch.tensor(batch)
        return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)[:, x.shape[1]:].tolist()

    res = measure(gen, ids, new_tokens, runs)
    res["model_bytes"] = sum(f.stat().st_size for f in out.glob("*.onnx*"))
    return res


def genai(ck: Path, ids, new_tokens, runs, threads, options):
    """onnxruntime-genai (its own Python package, as its users run it) on `gpt2-onnx export --format genai`'s
    folder of the same checkpoint (fp32 or int4), `threads` intra-op threads through its config."""
    from benchmarks.genai import genai_export, og_generate, og_model

    folder = genai_export(Path(ck), options["variant"])
    model = og_model(folder, threads)
    res = measure(lambda batch, n: og_generate(model, batch, n), ids, new_tokens, runs)
    res["model_bytes"] = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    return res


SYSTEMS = {"ours": ours, "ours-int8": ours, "ours-int4": ours, "hf-torch": hf, "optimum": optimum,
           "ct2-float32": ct2, "ct2-int8": ct2, "llama.cpp-f32": llama, "llama.cpp-q8_0": llama,
           "llama.cpp-q4_0": llama, "genai-fp32": genai, "genai-int4": genai}


def main() -> None:
    spec = json.loads(sys.argv[1])
    name = spec["system"]
    opts = {"quantize": {"ours-int8": "int8", "ours-int4": "int4"}.get(name),
            "compute_type": name.removeprefix("ct2-"), "qtype": name.removeprefix("llama.cpp-"),
            "variant": name.removeprefix("genai-")}
    opts.update(spec.get("options", {}))
    try:
        res = SYSTEMS[name](Path(spec["checkpoint"]), spec["ids"], spec["new_tokens"], spec["runs"], spec["threads"], opts)
        res["status"] = "ok"
    except (ImportError, Unavailable) as e:  # an anchor that cannot run here: reported with the reason, not fatal
        res = {"status": f"skipped ({e})"}
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
