"""Structured output (a JSON Schema through llguidance): what a constraint costs in tokens/s, per token, per schema.

    python -m benchmarks.structured [--models bundled,124m] [--runs 3] [--threads 2] [--clients 16]
                                    [--modes greedy,sampled] [--checkpoint DIR] [--out DIR] [--name structured]

Models: the bundled model (Engine.load()) and the 124M GPT-2 shape with GPT-2's own BPE (random init,
benchmarks.common.checkpoint: made once, exported once into the cache), onnxruntime on --threads threads.
The constrained runs use SCHEMA, a nested schema (an object with a title and an array of at least 40
objects: bounded integers, strings with maxLength, enums, booleans, a nested array of enums) that no
output can complete in 128 tokens, so that constrained (json_schema=SCHEMA) and unconstrained
(ignore_eos=True) runs both make exactly --new tokens (checked: every run's token count is recorded).
Modes: greedy, and sampled (temperature 0.8, seed 0; seed i for server request i).

  batch 1     engine.generate(PROMPT) constrained vs unconstrained, interleaved (A B B A ...), --runs
              repetitions; tok/s = new tokens / wall time. A repetition of a fast model makes as many calls
              as fill --min-rep-s seconds (`calls` in the results).
  server      create_app(engine, max_batch=16) served by uvicorn on loopback in a thread of this process;
              --clients requests at once (httpx, one thread each), POST /v1/completions with
              "structured_outputs": {"json": SCHEMA} vs "ignore_eos": true; completion tokens / wall time;
              interleaved, --runs repetitions (rounds per repetition as above).
  mask time   the constrained outputs (batch 1, and 16 prompts from generate_batch) replayed through a fresh
              engine.grammars.constraint(compiled): per token the time of Constraint.allowed() (llguidance's
              mask + unpacking it), of the unpacking alone (the same np.unpackbits on its bits) and of
              advance(token); median and p99 in microseconds; every replayed token is checked to be allowed.
  hidden      gpt2_onnx.core.prefetch and gpt2_onnx.core.process wrapped with timers (the whole run, both
              kinds of run alike) and llguidance's batch executor behind prefetch replaced by a timing proxy:
              per decode step with constrained rows, the helper thread's mask time, the graph's time beside it,
              the time the core still waits for the masks after the graph, the submit, process() alone, and
              "after": from the end of the wait to the end of process() (the core unpacking each row's mask,
              then process() applying them); hidden = the share of the helper's mask time not waited for;
              critical = mean submit + wait + after per step, also as a share of (it + the graph).
  compile     engine.grammars.compile(GenerationOptions(json_schema=...)) of SCHEMAS (llguidance's grammar, its
              validation, a start matcher and its first mask): the first compile in the process, cold again
              (cache cleared; median of --compile-runs) and cached; a row's matcher
              (engine.grammars.constraint(compiled): a copy of the start matcher) and its first mask;
              llguidance's tokenizer build (the engine's first engine.grammars.tokenizer, and fresh Grammars).

Before each timed repetition the run waits (up to --quiet-s seconds) until other processes use under a
quarter of the CPUs. Targets (the issue): constrained tok/s >= 0.9x unconstrained at batch 1 and at 16 concurrent requests.
Machine load is recorded around each measurement (other processes' share of the CPUs); this benchmark runs
everything in one process, so compare only numbers of one run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, checkpoint, machine, write_results
from benchmarks.inprocess import busy_s, code_state, proc_cpu_s

HERE = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO {i}: The quick brown fox"
TARGET = 0.9
SAMPLED = {"temperature": 0.8, "seed": 0}

ITEM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
    "name": {"type": "string", "maxLength": 10},
    "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["id", "name", "kind", "tags", "ok"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 16},
    "count": {"type": "integer", "minimum": 1, "maximum": 100},
    "items": {"type": "array", "minItems": 40, "maxItems": 60, "items": ITEM}},
    "required": ["title", "count", "items"], "additionalProperties": False}

SCHEMAS = {
    "simple": {"type": "object", "properties": {"name": {"type": "string"},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                         "zip": {"type": "string", "maxLength": 10}},
                        "required": ["street", "city"]},
            "contacts": {"type": "array", "items": {"type": "object", "properties": {
                "type": {"enum": ["email", "phone"]}, "value": {"type": "string"}}, "required": ["type", "value"]}}},
            "required": ["name", "address"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8}},
        "required": ["person"]},
    "enum-heavy": {"type": "object", "properties": {
        **{f"field{i}": {"enum": [f"value_{i}_{j}" for j in range(30)]} for i in range(20)},
        "country": {"enum": [f"Country {chr(65 + j // 26)}{chr(65 + j % 26)}" for j in range(200)]}},
        "required": [f"field{i}" for i in range(20)] + ["country"], "additionalProperties": False},
    "patterns": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "date": {"type": "string", "format": "date"},
        "email": {"type": "string", "format": "email"},
        "uuid": {"type": "string", "format": "uuid"},
        "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,15}$"},
        "color": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"}},
        "required": ["code", "date", "email", "uuid", "phone", "color"], "additionalProperties": False},
    "benchmark (SCHEMA)": SCHEMA,
}


# ---- instrumentation: prefetch, its executor and process, timed per decode step ---------------------------------
class Probe:
    """Per-step timings of the core's mask work, filed under the current phase."""

    def __init__(self):
        self.phase = "other"
        self.steps: dict[str, list[dict]] = {}
        self.process_s: dict[str, list[float]] = {}
        self.after_s: dict[str, list[float]] = {}  # from the end of a step's wait to the end of its process()
        self.wait_end: float | None = None
        self.helper_s: list[float] = []  # the helper thread's llguidance time of each prefetch, in order
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.steps, self.process_s, self.after_s, self.wait_end = {}, {}, {}, None

    def install(self) -> None:
        import llguidance
        from gpt2_onnx import constraints, core

        probe, real_prefetch, real_process = self, core.prefetch, core.process

        class TimedExecutor:  # llguidance's LLExecutor, timing its batched mask computation
            def __init__(self):
                self.real = llguidance.LLExecutor()

            def unsafe_compute_mask_ptr(self, *a, **kw):
                t = time.perf_counter()
                try:
                    return self.real.unsafe_compute_mask_ptr(*a, **kw)
                finally:
                    with probe.lock:
                        probe.helper_s.append(time.perf_counter() - t)

        if not constraints._helper:  # what prefetch makes on first use, with the executor timed
            constraints._helper.extend([ThreadPoolExecutor(1, thread_name_prefix="gpt2-onnx-masks"), TimedExecutor()])

        def prefetch(rows):
            n = sum(c.bits is None for c in rows)
            t0 = time.perf_counter()
            with probe.lock:
                helper_before = len(probe.helper_s)
            wait = real_prefetch(rows)
            t1 = time.perf_counter()
            if not n:
                return wait

            def timed_wait():
                t2 = time.perf_counter()
                wait()
                t3 = time.perf_counter()
                probe.wait_end = t3
                with probe.lock:
                    helper = probe.helper_s[helper_before] if len(probe.helper_s) > helper_before else None
                    probe.steps.setdefault(probe.phase, []).append(
                        {"rows": n, "submit_s": t1 - t0, "graph_s": t2 - t1, "wait_s": t3 - t2, "helper_s": helper})

            return timed_wait

        def process(*a, **kw):
            t = time.perf_counter()
            try:
                return real_process(*a, **kw)
            finally:
                t1 = time.perf_counter()
                with probe.lock:
                    probe.process_s.setdefault(probe.phase, []).append(t1 - t)
                    if probe.wait_end is not None:
                        probe.after_s.setdefault(probe.phase, []).append(t1 - probe.wait_end)
                    probe.wait_end = None

        core.prefetch, core.process = prefetch, process

    def summary(self, phase: str) -> dict | None:
        steps = self.steps.get(phase)
        if not steps:
            return None
        out = {"steps": len(steps), "rows": stats([s["rows"] for s in steps], 1)}
        for k in ("submit_s", "graph_s", "wait_s", "helper_s"):
            out[k.replace("_s", "_us")] = stats([s[k] for s in steps if s[k] is not None], 1e6)
        helper = sum(s["helper_s"] or 0 for s in steps)
        # the part of the helper's mask time the core waited for (a wait beyond it is the thread's wake-up)
        exposed = sum(min(s["wait_s"], s["helper_s"]) for s in steps if s["helper_s"] is not None)
        out["helper_hidden_share"] = 1 - exposed / helper if helper else None
        process, after = self.process_s.get(phase, []), self.after_s.get(phase, [])
        out["process_us"] = stats(process, 1e6)
        out["after_wait_us"] = stats(after, 1e6)
        # the mask work's mean cost on the core's path per step: submitting, waiting, then unpacking the masks
        # (the core's allowed() loop) and applying them (process())
        crit = float(np.mean([s["submit_s"] + s["wait_s"] for s in steps])) + (float(np.mean(after)) if after else 0)
        graph = float(np.mean([s["graph_s"] for s in steps]))
        out["critical_mean_us"] = crit * 1e6
        out["critical_share_of_step"] = crit / (crit + graph)
        return out


PROBE = Probe()


def stats(xs, scale: float = 1.0) -> dict | None:
    """Median, p99, mean, max of xs (times scale), and their count."""
    if not xs:
        return None
    a = np.asarray(xs, float) * scale
    return {"median": float(np.median(a)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "max": float(a.max()), "n": int(a.size)}


def order(kinds: dict, rep: int) -> list[str]:
    """Constrained, unconstrained in even repetitions, the other way round in odd ones (A B B A ...)."""
    return list(kinds) if rep % 2 == 0 else list(kinds)[::-1]


def quiet(args) -> None:
    if args.quiet_s > 0:
        from benchmarks.inprocess import wait_quiet

        wait_quiet(args.quiet_s)


class Load:
    """Other processes' share of the CPUs while a measurement ran (this process's threads excluded)."""

    def __enter__(self):
        self.t, self.busy, self.own = time.time(), busy_s(), proc_cpu_s(None)
        return self

    def __exit__(self, *exc):
        wall = max(time.time() - self.t, 1e-9)
        other = busy_s() - self.busy - (proc_cpu_s(None) - self.own)
        self.share = max(0.0, other) / (wall * (os.cpu_count() or 1))


# ---- batch 1 ------------------------------------------------------------------------------------------------------
def batch1(eng, args, mode: str) -> dict:
    """engine.generate(PROMPT) constrained vs unconstrained, interleaved, --runs repetitions."""
    prompt = PROMPT.format(i=0)
    extra = SAMPLED if mode == "sampled" else {}
    kinds = {"constrained": {"json_schema": SCHEMA}, "unconstrained": {"ignore_eos": True}}

    def call(kind: str, n: int):
        return eng.generate(prompt, max_new_tokens=n, **kinds[kind], **extra)

    t = time.perf_counter()
    for kind in kinds:  # warm-up (the schema's compile is cached from here on)
        PROBE.phase = f"warm-up {mode} {kind}"
        call(kind, args.new)
    calls = max(1, math.ceil(args.min_rep_s / ((time.perf_counter() - t) / 2)))
    rows = {kind: {"times_s": [], "tok_s_runs": [], "new_tokens": [], "finish_reasons": set(), "other_cpu_share": []}
            for kind in kinds}
    for rep_ in range(args.runs):
        for kind in order(kinds, rep_):
            quiet(args)
            PROBE.phase = f"batch 1 {mode} {kind}"
            with Load() as load:
                t = time.perf_counter()
                res = [call(kind, args.new) for _ in range(calls)]
                wall = time.perf_counter() - t
            row = rows[kind]
            n = sum(len(r.token_ids) for r in res)
            row["times_s"].append(wall)
            row["tok_s_runs"].append(n / wall)
            row["new_tokens"] += [len(r.token_ids) for r in res]
            row["finish_reasons"] |= {r.finish_reason for r in res}
            row["other_cpu_share"].append(load.share)
            row["text"], row["token_ids"] = res[-1].text, list(res[-1].token_ids)
    for row in rows.values():
        row["tok_s"] = statistics.median(row["tok_s_runs"])
        row["finish_reasons"] = sorted(row["finish_reasons"])
        row["all_full_length"] = all(n == args.new for n in row["new_tokens"])
        row["new_tokens"] = sorted(set(row["new_tokens"]))
    a, b = rows["constrained"], rows["unconstrained"]
    return {"calls_per_run": calls, "rows": rows, "ratio": a["tok_s"] / b["tok_s"],
            "ratio_runs": [x / y for x, y in zip(a["tok_s_runs"], b["tok_s_runs"])],
            "hidden": {k: PROBE.summary(f"batch 1 {mode} {k}") for k in ("constrained",)},
            "process_unconstrained_us": stats(PROBE.process_s.get(f"batch 1 {mode} unconstrained", []), 1e6)}


# ---- server --------------------------------------------------------------------------------------------------------
class Server:
    """An app served by uvicorn in a thread on 127.0.0.1 (a free port) (the pattern of tests/helpers.py)."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def server(eng, args, modes: list[str]) -> dict:
    """--clients concurrent POST /v1/completions, constrained vs unconstrained, interleaved, per mode."""
    import httpx
    from gpt2_onnx.server import create_app

    srv = Server(create_app(eng, max_batch=args.max_batch))
    client = httpx.Client(timeout=1800, limits=httpx.Limits(max_connections=args.clients * 2))
    pool = ThreadPoolExecutor(args.clients)
    kinds = {"constrained": {"structured_outputs": {"json": SCHEMA}}, "unconstrained": {"ignore_eos": True}}

    def body(mode: str, kind: str, i: int, n: int) -> dict:
        sampling = {"temperature": SAMPLED["temperature"], "seed": i} if mode == "sampled" else {"temperature": 0}
        return {"prompt": PROMPT.format(i=i), "max_tokens": n, **sampling, **kinds[kind]}

    def one(b: dict) -> dict:
        r = client.post(srv.url + "/v1/completions", json=b)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        j = r.json()
        return {"tokens": j["usage"]["completion_tokens"], "finish": j["choices"][0]["finish_reason"],
                "text": j["choices"][0]["text"]}

    def round_(mode: str, kind: str, n: int) -> list[dict]:
        return list(pool.map(one, [body(mode, kind, i, n) for i in range(args.clients)]))

    out = {"url": srv.url, "max_batch": args.max_batch, "clients": args.clients}
    try:
        for mode in modes:
            t = time.perf_counter()
            for kind in kinds:
                PROBE.phase = f"warm-up server {mode} {kind}"
                round_(mode, kind, args.new)
            rounds = max(1, math.ceil(args.min_rep_s / ((time.perf_counter() - t) / 2)))
            rows = {k: {"times_s": [], "tok_s_runs": [], "completion_tokens": [], "finish_reasons": set(),
                        "other_cpu_share": []} for k in kinds}
            for rep_ in range(args.runs):
                for kind in order(kinds, rep_):
                    quiet(args)
                    PROBE.phase = f"server {mode} {kind}"
                    with Load() as load:
                        t = time.perf_counter()
                        res = [r for _ in range(rounds) for r in round_(mode, kind, args.new)]
                        wall = time.perf_counter() - t
                    row = rows[kind]
                    row["times_s"].append(wall)
                    row["tok_s_runs"].append(sum(r["tokens"] for r in res) / wall)
                    row["completion_tokens"] += [r["tokens"] for r in res]
                    row["finish_reasons"] |= {r["finish"] for r in res}
                    row["other_cpu_share"].append(load.share)
                    row["text"] = res[0]["text"]
            for row in rows.values():
                row["tok_s"] = statistics.median(row["tok_s_runs"])
                row["finish_reasons"] = sorted(row["finish_reasons"])
                row["all_full_length"] = all(n == args.new for n in row["completion_tokens"])
                row["completion_tokens"] = sorted(set(row["completion_tokens"]))
            a, b = rows["constrained"], rows["unconstrained"]
            out[mode] = {"rounds_per_run": rounds, "rows": rows, "ratio": a["tok_s"] / b["tok_s"],
                         "ratio_runs": [x / y for x, y in zip(a["tok_s_runs"], b["tok_s_runs"])],
                         "hidden": {"constrained": PROBE.summary(f"server {mode} constrained")}}
            print(f"  server {mode}: {a['tok_s']:.1f} vs {b['tok_s']:.1f} tok/s ({out[mode]['ratio']:.2f}x)",
                  file=sys.stderr, flush=True)
    finally:
        pool.shutdown()
        client.close()
        srv.stop()
    return out


# ---- mask time per token, by replaying the outputs ---------------------------------------------------------------
def replay(eng, compiled, outputs: list[list[int]]) -> dict:
    """Each output's tokens through a fresh constraint: allowed(), its unpacking alone, advance(token)."""
    allowed, unpack, advance, create = [], [], [], []
    refused = completed_early = 0
    for ids in outputs:
        t = time.perf_counter()
        c = eng.grammars.constraint(compiled)
        create.append(time.perf_counter() - t)
        for k, tok in enumerate(ids):
            t0 = time.perf_counter()
            mask = c.allowed()
            t1 = time.perf_counter()
            np.unpackbits(c.bits.view(np.uint8), bitorder="little")[: c.V].view(bool)  # what allowed() does after
            t2 = time.perf_counter()  # llguidance's mask
            refused += not mask[tok]
            done = c.advance(tok)
            t3 = time.perf_counter()
            allowed.append(t1 - t0)
            unpack.append(t2 - t1)
            advance.append(t3 - t2)
            completed_early += done and k < len(ids) - 1
    return {"outputs": len(outputs), "tokens": len(allowed), "allowed_us": stats(allowed, 1e6),
            "unpack_us": stats(unpack, 1e6), "advance_us": stats(advance, 1e6), "matcher_create_us": stats(create, 1e6),
            "tokens_not_allowed": refused, "completed_before_last_token": completed_early}


# ---- compile times -----------------------------------------------------------------------------------------------
def clear_cache(g) -> None:
    """Empty a Grammars' cache of compiled constraints (the next compile of each is cold)."""
    with g._lock:
        g._compiled.clear()
        g._sizes.clear()
        g._bytes = 0


def compile_times(eng, runs: int) -> dict:
    from gpt2_onnx import GenerationOptions
    from gpt2_onnx.constraints import Grammars

    g = eng.grammars
    out = {"tokenizer": {}, "schemas": {}}
    t = time.perf_counter()
    _ = g.tokenizer  # the engine's first: llguidance's tokenizer from the model's tokenizer.json
    out["tokenizer"]["first_s"] = time.perf_counter() - t
    fresh = []
    for _ in range(runs):
        t = time.perf_counter()
        _ = Grammars(g._source, g.V, g.eos).tokenizer
        fresh.append(time.perf_counter() - t)
    out["tokenizer"]["fresh_s"] = stats(fresh)
    for name, schema in SCHEMAS.items():
        opts = GenerationOptions(json_schema=schema)
        row: dict = {"schema_chars": len(opts.json_schema)}
        try:
            clear_cache(g)
            t = time.perf_counter()
            compiled = g.compile(opts)
            row["first_s"] = time.perf_counter() - t
            cold = []
            for _ in range(runs):
                clear_cache(g)
                t = time.perf_counter()
                g.compile(opts)
                cold.append(time.perf_counter() - t)
            row["cold_s"] = stats(cold)
            cached = []
            for _ in range(200):
                t = time.perf_counter()
                g.compile(opts)
                cached.append(time.perf_counter() - t)
            row["cached_us"] = stats(cached, 1e6)
            made = []
            for _ in range(50):
                t = time.perf_counter()
                g.constraint(compiled)
                made.append(time.perf_counter() - t)
            row["matcher_us"] = stats(made, 1e6)
            t = time.perf_counter()
            c = g.constraint(compiled)
            c.allowed()
            row["first_mask_us"] = (time.perf_counter() - t) * 1e6 - row["matcher_us"]["median"]
            row["cache_bytes"] = g._sizes.get(opts.constraint)  # schema + llguidance grammar text
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 (a schema llguidance refuses is recorded, the others still run)
            row["status"] = f"failed: {type(e).__name__}: {e}"
        out["schemas"][name] = row
    return out


# ---- one model ---------------------------------------------------------------------------------------------------
def run_model(args, name: str) -> dict:
    from gpt2_onnx import Engine

    PROBE.reset()  # phases are named alike for every model: each model's steps on their own
    src = None if name == "bundled" else str(checkpoint(args.checkpoint))
    print(f"{name}: loading ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    eng = Engine.load(src, provider="cpu", threads=args.threads)
    res = {"source": src or "bundled (models/tiny-shakespeare)", "exported_folder": str(eng.folder),
           "vocab_size": eng.config.vocab_size, "load_s": time.perf_counter() - t}
    print(f"{name}: compile times ...", file=sys.stderr, flush=True)
    res["compile"] = compile_times(eng, args.compile_runs)
    res["batch1"] = {}
    for mode in args.modes:
        print(f"{name}: batch 1 {mode} ...", file=sys.stderr, flush=True)
        res["batch1"][mode] = r = batch1(eng, args, mode)
        print(f"  {r['rows']['constrained']['tok_s']:.1f} vs {r['rows']['unconstrained']['tok_s']:.1f} tok/s "
              f"({r['ratio']:.2f}x)", file=sys.stderr, flush=True)
    print(f"{name}: {args.clients} concurrent server requests ...", file=sys.stderr, flush=True)
    res["server"] = server(eng, args, args.modes)
    print(f"{name}: mask replay ...", file=sys.stderr, flush=True)
    from gpt2_onnx import GenerationOptions

    compiled = eng.grammars.compile(GenerationOptions(json_schema=SCHEMA))
    PROBE.phase = "generate_batch 16 constrained"
    prompts = [PROMPT.format(i=i) for i in range(16)]
    t = time.perf_counter()
    batch = eng.generate_batch(prompts, max_new_tokens=args.new, json_schema=SCHEMA, **SAMPLED)
    res["generate_batch_16"] = {"wall_s": time.perf_counter() - t, "new_tokens": sorted({len(r.token_ids) for r in batch}),
                                "finish_reasons": sorted({r.finish_reason for r in batch}), **SAMPLED,
                                "hidden": PROBE.summary("generate_batch 16 constrained")}
    outputs = [r.token_ids for r in batch] + [res["batch1"][m]["rows"]["constrained"]["token_ids"] for m in args.modes]
    res["mask_replay"] = replay(eng, compiled, [list(o) for o in outputs])
    res["warm_up_hidden"] = {p: PROBE.summary(p) for p in PROBE.steps if p.startswith("warm-up")}
    return res


# ---- report ------------------------------------------------------------------------------------------------------
def us(s: dict | None) -> str:
    return f"{s['median']:.0f} / {s['p99']:.0f}" if s else "-"


def tok(row: dict) -> str:
    return f"{row['tok_s']:.1f} ({' / '.join(f'{x:.1f}' for x in row['tok_s_runs'])})"


def met(r: float) -> str:
    return f"**{r:.2f}x** ({'met' if r >= TARGET else 'NOT met'})"


def markdown(res: dict) -> str:
    m, code = res["machine"], res["code"]
    lines = [f"`{res['command']}`", "",
             f"{res['date']}, {m['cpu']} ({m['cpus']} CPUs; {' '.join(m['flags'])}), onnxruntime "
             f"{res['versions']['onnxruntime']} on {res['threads']} threads, llguidance {res['versions']['llguidance']}, "
             f"code {code['commit'][:7]}" + (f" with uncommitted changes to {len(code['uncommitted'])} files "
                                             f"(diff sha256 {code['diff_sha256'][:12]})" if code["uncommitted"] else "")
             + ".", "",
             (f"{res['new']} new tokens per output; constrained: json_schema = the benchmark schema (an object with "
             "an array of >= 40 objects: bounded integers, strings with maxLength, enums, booleans, a nested enum "
             "array; it cannot be completed in 128 tokens), unconstrained: ignore_eos. Tokens/s: median of "
             f"{res['runs']} interleaved repetitions (A B B A ...; each in brackets). Target: constrained >= {TARGET}x "
             f"unconstrained. Server: create_app(engine, max_batch={res['max_batch']}) in this process (uvicorn, "
             f"loopback), {res['clients']} requests at once (httpx), completion tokens / wall time. Greedy: "
             "temperature 0; sampled: temperature 0.8, seed 0 (server: seed i for request i). Sampled rows "
             "go through sampling.filter_logits: a stable sort of the whole vocabulary and a draw among the finite "
             "tokens; a constrained row's scores are mostly -inf (a cheaper sort, a draw among the few allowed), so "
             "the sampled ratios include that difference besides the constraint's cost."), ""]
    for name, r in res["models"].items():
        if "error" in r:
            lines += [f"### {name}", "", f"failed: {r['error']}", ""]
            continue
        lines += [f"### {name} ({r['source']}, vocab {r['vocab_size']})", "",
                  "| | mode | constrained tok/s | unconstrained tok/s | ratio | new tokens (c / u) |",
                  "|---|---|---|---|---|---|"]
        for mode, b in r["batch1"].items():
            c, u = b["rows"]["constrained"], b["rows"]["unconstrained"]
            lines.append(f"| batch 1 (generate, {b['calls_per_run']} call(s)/rep) | {mode} | {tok(c)} | {tok(u)} | "
                         f"{met(b['ratio'])} | {c['new_tokens']} / {u['new_tokens']} |")
        for mode in res["modes"]:
            s = r["server"].get(mode)
            if not s:
                continue
            c, u = s["rows"]["constrained"], s["rows"]["unconstrained"]
            lines.append(f"| {res['clients']} server requests ({s['rounds_per_run']} round(s)/rep) | {mode} | {tok(c)} "
                         f"| {tok(u)} | {met(s['ratio'])} | {c['completion_tokens']} / {u['completion_tokens']} |")
        rp = r["mask_replay"]
        lines += ["", (f"Mask time per token, replaying {rp['tokens']} tokens of {rp['outputs']} constrained outputs "
                      "through a fresh constraint (µs, median / p99): "
                      f"allowed() {us(rp['allowed_us'])} (of which unpacking the bits {us(rp['unpack_us'])}), "
                      f"advance(token) {us(rp['advance_us'])}; tokens not allowed by the replayed mask: "
                      f"{rp['tokens_not_allowed']}; outputs complete before their last token: "
                      f"{rp['completed_before_last_token']}."), "",
                  ("Critical path per decode step with constrained rows (µs, median / p99): the helper thread's "
                  "llguidance mask time, the graph beside it, the core's wait for the masks after the graph, "
                  "after: from the end of the wait to the end of process() (each row's mask unpacked, then applied "
                  "by process()); hidden: the share of the helper's mask time the core did not wait for; critical: "
                  "mean submit + wait + after per step, and its share of the step (it + graph)."), "",
                  ("| run | steps | rows/step | helper mask | graph | wait | submit | after | of it process() | hidden "
                  "| critical |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        hid = [(f"batch 1 {m}", r["batch1"][m]["hidden"]["constrained"]) for m in r["batch1"]]
        hid += [(f"server {m}", r["server"][m]["hidden"]["constrained"]) for m in res["modes"] if m in r["server"]]
        hid += [("generate_batch 16 sampled", r["generate_batch_16"]["hidden"])]
        for label, h in hid:
            if h:
                share = f"{100 * h['helper_hidden_share']:.0f}%" if h["helper_hidden_share"] is not None else "-"
                lines.append(f"| {label} | {h['steps']} | {h['rows']['median']:.0f} | {us(h['helper_us'])} | "
                             f"{us(h['graph_us'])} | {us(h['wait_us'])} | {us(h['submit_us'])} | "
                             f"{us(h.get('after_wait_us'))} | {us(h.get('process_us'))} | {share} | {h['critical_mean_us']:.0f} µs "
                             f"({100 * h['critical_share_of_step']:.1f}%) |")
        cm = r["compile"]
        lines += ["", (f"Compile (llguidance tokenizer build: engine's first {cm['tokenizer']['first_s'] * 1e3:.0f} ms, "
                      f"fresh {cm['tokenizer']['fresh_s']['median'] * 1e3:.0f} ms median):"), "",
                  ("| schema | chars | first compile ms | cold ms (median / p99) | cached µs | row's matcher µs "
                  "(median / p99) | row's first mask µs |"), "|---|---|---|---|---|---|---|"]
        for sname, s in cm["schemas"].items():
            if s["status"] != "ok":
                lines.append(f"| {sname} | {s['schema_chars']} | {s['status']} | | | | |")
                continue
            lines.append(f"| {sname} | {s['schema_chars']} | {s['first_s'] * 1e3:.1f} | {s['cold_s']['median'] * 1e3:.1f}"
                         f" / {s['cold_s']['p99'] * 1e3:.1f} | {s['cached_us']['median']:.1f} | {us(s['matcher_us'])}"
                         f" | {s['first_mask_us']:.0f} |")
        shares = [x for part in (r["batch1"].values(), [r["server"][m] for m in res["modes"] if m in r["server"]])
                  for b in part for row in b["rows"].values() for x in row["other_cpu_share"]]
        lines += ["", f"Other processes' share of the CPUs during the timed runs: max {100 * max(shares):.0f}%, "
                      f"median {100 * statistics.median(shares):.0f}%"
                  + (" (above 15% somewhere: timing noise likely)." if max(shares) > 0.15 else "."), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,124m", help="comma-separated: bundled, 124m")
    ap.add_argument("--runs", type=int, default=3, help="interleaved repetitions of each measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128, help="new tokens per output")
    ap.add_argument("--clients", type=int, default=16, help="concurrent server requests")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--modes", default="greedy,sampled", help="comma-separated: greedy, sampled")
    ap.add_argument("--min-rep-s", type=float, default=2.0, help="a repetition repeats its call to last this long")
    ap.add_argument("--quiet-s", type=float, default=20.0,
                    help="before each timed repetition, wait at most this long for the other processes to calm")
    ap.add_argument("--compile-runs", type=int, default=5)
    ap.add_argument("--checkpoint", default=None, help="HF folder for '124m' [default: random-init GPT2Config()]")
    ap.add_argument("--name", default="structured", help="results file stem [default: structured]")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the results [default: {RESULTS}]")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    import llguidance
    import onnxruntime

    PROBE.install()
    res = {"command": "python -m benchmarks.structured " + " ".join(sys.argv[1:]), "machine": machine(),
           "date": time.strftime("%Y-%m-%d %H:%M"), "code": code_state(HERE),
           "versions": {"llguidance": getattr(llguidance, "__version__", None) or _dist("llguidance"),
                        "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]},
           "threads": args.threads, "runs": args.runs, "new": args.new, "clients": args.clients,
           "max_batch": args.max_batch, "modes": args.modes, "prompt": PROMPT, "schema": SCHEMA, "schemas": SCHEMAS,
           "sampled": SAMPLED, "models": {}}
    for name in [m for m in args.models.split(",") if m]:
        try:
            res["models"][name] = run_model(args, name)
        except Exception as e:  # noqa: BLE001 (recorded; the other model still runs)
            import traceback

            traceback.print_exc()
            res["models"][name] = {"error": f"{type(e).__name__}: {e}"}
    write_results(args.out, args.name, res, markdown)
    failed = [n for n, r in res["models"].items() if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (results written)")


def _dist(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
