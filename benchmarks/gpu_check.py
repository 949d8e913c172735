"""The prepared GPU check: parity and speed on a CUDA machine in one short run (also runs on CPU to test it).

    python -m benchmarks.gpu_check --out OUT_DIR                                  # on the GPU machine
    python -m benchmarks.gpu_check --provider cpu --smoke --out /tmp/gpu-smoke   # anywhere, to test the script

Needs onnxruntime-gpu, torch and transformers there (fastapi, uvicorn and httpx for the HTTP part;
without them that part is recorded as skipped). Exports a random-init GPT2Config() (124M shape) in
fp32 / fp16 / int4, checks parity on the provider (fp32 logits vs torch on the same device; fp16: no
NaN, logits atol 0.2, greedy agreement), then times decode tok/s and time to first token at batch 1
and 8, short (32+64) and long (512+256) context, and HF torch eager on the same device. The server
path: the continuous-batching core with 64 mixed requests on 16 KV rows (throughput, greedy answers
equal to solo runs), the same through the HTTP server, and the Memcpy nodes onnxruntime's profile
records per decode step (the KV pool and greedy rows' logits must not cross to the host). Writes
gpu_check.json / .md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to test the script itself")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import onnxruntime as ort
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.common import make_checkpoint
    from benchmarks.systems import measure
    from gpt2_onnx import Engine
    from gpt2_onnx.export import export_model

    dev = "cuda" if args.provider == "cuda" and torch.cuda.is_available() else "cpu"
    shape = dict(n_layer=2, n_embd=128, n_head=4, n_positions=1024) if args.smoke else {}
    cfg = GPT2Config(**shape)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"))
    ck = work / "hf"
    if not (ck / "config.json").is_file():
        make_checkpoint(ck, tokenizer="ids", **shape)
    ref_model = GPT2LMHeadModel.from_pretrained(ck).eval().to(dev)
    ref_model.generation_config.eos_token_id = None
    report = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor(),
              "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip() if dev == "cuda" else None,
              "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
              "torch": torch.__version__, "parity": {}, "timings": []}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, 64).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
        ref_ids = ref_model.generate(torch.tensor([ids], device=dev), max_new_tokens=32, do_sample=False,
                                     pad_token_id=0)[0, 64:].tolist()
    engines = {}
    configs = [("fp32", {}, False), ("fp16", {"dtype": "float16"}, False), ("int4", {"quantize": "int4"}, False)]
    if args.provider == "cuda":
        configs.append(("fp16", {"dtype": "float16"}, True))
    for name, kw, graph in configs:
        folder = work / name
        if not (folder / "manifest.json").is_file():
            export_model(str(ck), folder, **kw)
        try:
            eng = Engine.load(folder, provider=args.provider, cuda_graph=graph)
        except ValueError as e:
            report["parity"][name + "+graph" * graph] = {"error": str(e)}
            continue
        name += "+cuda_graph" * graph
        engines[name] = eng
        cache = eng.model.new_cache(1, 64)
        got = eng.model.forward(np.array([ids]), np.array([64]), cache, np.arange(64)[None])[0]
        gen = eng.generate(ids, max_new_tokens=32, ignore_eos=True).token_ids
        report["parity"][name] = {
            "providers": eng.model.session.get_providers(), "max_abs_logit_diff": float(np.abs(got - ref).max()),
            "nan": bool(np.isnan(got).any()),
            "greedy_agreement": float(np.mean([a == b for a, b in zip(gen, ref_ids)])), "greedy_equal": gen == ref_ids}
        print(name, report["parity"][name], flush=True)

    cases = [(1, 32, 64), (8, 32, 64), (1, 512, 256), (8, 512, 256)]
    if args.smoke:
        cases = [(1, 32, 16), (8, 32, 16)]
    for batch, plen, new in cases:
        prompts = rng.integers(0, cfg.vocab_size, (batch, plen)).tolist()
        for name, eng in engines.items():
            def gen(rows, n, eng=eng):
                return [r.token_ids for r in eng.generate_batch(rows, max_new_tokens=n, ignore_eos=True)]

            try:
                m = measure(gen, prompts, new, args.runs)
            except Exception as e:  # record and go on: one failing config must not lose the others
                report["timings"].append({"system": f"ours-{name}", "batch": batch, "error": str(e)[:300]})
                continue
            row = {"system": f"ours-{name}", "batch": batch, "prompt": plen, "new": new, "ttft_ms": m["ttft_s"] * 1e3,
                   "decode_tok_s": m["decode_tok_s"]}
            report["timings"].append(row)
            print(row, flush=True)
        def hf(rows, n):
            x = torch.tensor(rows, device=dev)
            with torch.no_grad():
                out = ref_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, pad_token_id=0)[:, x.shape[1]:].tolist()  # .tolist() syncs
            return out

        try:
            m = measure(hf, prompts, new, args.runs)
        except Exception as e:  # as for ours: a timing refused (a busy machine) must not lose the other parts
            report["timings"].append({"system": "hf-torch-eager", "batch": batch, "error": str(e)[:300]})
            continue
        row = {"system": "hf-torch-eager", "batch": batch, "prompt": plen, "new": new, "ttft_ms": m["ttft_s"] * 1e3,
               "decode_tok_s": m["decode_tok_s"]}
        report["timings"].append(row)
        print(row, flush=True)

    base = engines.get("fp16") or engines.get("fp32")
    for part, fn in (("server_core", server_core), ("memcpy_profile", memcpy_profile), ("server_http", server_http)):
        try:
            report[part] = fn(base, cfg.vocab_size, smoke=args.smoke)
        except Exception as e:  # recorded, not fatal: the other parts still count
            report[part] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(part, report[part], flush=True)

    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"GPU check: {report['gpu']} driver {report['driver']}, onnxruntime {report['onnxruntime']}", "",
             "| config | providers | max abs logit diff vs torch | NaN | greedy agreement |", "|---|---|---|---|---|"]
    for k, p in report["parity"].items():
        if "error" in p:
            lines.append(f"| {k} | error: {p['error']} | | | |")
            continue
        lines.append(f"| {k} | {p['providers'][0]} | {p['max_abs_logit_diff']:.2e} | {p['nan']} | {p['greedy_agreement']:.2f} |")
    lines += ["", "| system | batch | prompt+new | decode tok/s | TTFT ms |", "|---|---|---|---|---|"]
    for r in report["timings"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['batch']} | error: {r['error'][:80]} | | |")
            continue
        lines.append(f"| {r['system']} | {r['batch']} | {r['prompt']}+{r['new']} | {r['decode_tok_s']:.0f} | {r['ttft_ms']:.1f} |")
    for part in ("server_core", "memcpy_profile", "server_http"):
        lines += ["", f"{part}: " + json.dumps(report.get(part))]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mixed_requests(engine, vocab: int, n: int):
    """n sequences with mixed prompt lengths and budgets, a quarter of them sampled (seeded)."""
    from gpt2_onnx import GenerationOptions

    rng = np.random.default_rng(7)
    seqs = []
    for i in range(n):
        opts = GenerationOptions(max_new_tokens=16 + 8 * (i % 5), ignore_eos=True,
                                 **({"temperature": 0.8, "seed": i} if i % 4 == 3 else {}))
        seqs += engine.sequences([rng.integers(0, vocab, 8 + 13 * (i % 7)).tolist()], opts)
    return seqs


def server_core(engine, vocab: int, smoke: bool = False) -> dict:
    """The server's continuous batching (Core) on 16 KV rows: 64 mixed sequences joining and leaving."""
    import time

    from gpt2_onnx.core import Core

    seqs = _mixed_requests(engine, vocab, 16 if smoke else 64)
    core = Core(engine.model, slots=16, max_length=engine.config.n_positions, prefix_cache_bytes=256 << 20)
    t = time.perf_counter()
    core.submit(seqs)
    while core.busy:
        core.step()
    wall = time.perf_counter() - t
    greedy = [s for s in seqs if s.options.greedy]
    same = all(s.tokens == engine.generate(s.context, max_new_tokens=s.options.max_new_tokens,
                                           ignore_eos=True).token_ids for s in greedy[:8])
    return {"sequences": len(seqs), "tok_s": sum(len(s.tokens) for s in seqs) / wall, "steps": core.steps,
            "greedy_equal_solo": same, "kv_row_copies": engine.model.transfers["kv_rows"],
            "pool_host_reads": core.pool.host_reads}


def memcpy_profile(engine, vocab: int, smoke: bool = False) -> dict:
    """Memcpy nodes per decode step in an onnxruntime profile: greedy rows only, then with sampled rows."""
    import onnxruntime as ort

    from gpt2_onnx.model import PROVIDERS

    m = engine.model
    opts = m._opts
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check")) / "ort_profile")
    sess = ort.InferenceSession(str(engine.folder / "model.onnx"), opts, providers=[PROVIDERS[m.provider]])
    opts.enable_profiling = False
    saved = m.session, m.step_session
    m.session = m.step_session = sess
    try:
        ids = np.random.default_rng(3).integers(0, vocab, (4, 24)).tolist()
        engine.generate_batch(ids, max_new_tokens=33, ignore_eos=True)  # 1 prefill + 32 decode steps
        engine.generate_batch(ids, max_new_tokens=33, ignore_eos=True, temperature=0.7, seed=0)
    finally:
        m.session, m.step_session = saved
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    copies = [e for e in events if e.get("cat") == "Node" and "Memcpy" in e.get("name", "")]
    return {"model_runs": len(runs), "memcpy_node_events": len(copies),
            "memcpy_nodes": sorted({e["name"] for e in copies}), "memcpy_per_run": len(copies) / max(len(runs), 1)}


def server_http(engine, vocab: int, smoke: bool = False) -> dict:
    """The HTTP server in this process on 127.0.0.1: completion tokens/s at 1, 16 and 64 clients."""
    import socket
    import threading
    import time

    import uvicorn

    from benchmarks.server_load import load
    from gpt2_onnx.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, max_batch=16), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out = {}
    try:
        rng = np.random.default_rng(0)
        for clients in (1, 16) if smoke else (1, 16, 64):
            jobs = [rng.integers(0, vocab - 1, 32).tolist() for _ in range(clients * 2)]
            r = load(f"http://127.0.0.1:{port}", clients, jobs, 16 if smoke else 64)
            out[f"{clients}_clients_tok_s"] = r["tok_s"]
    finally:
        server.should_exit = True
        thread.join(30)
    return out


if __name__ == "__main__":
    main()
