"""The one generation core: the library and the server give identical answers, failures stay local,
cancellation frees rows, rows stay packed, no host round trips, and the prefix cache changes nothing
but speed. Servers run on loopback, bounded in requests and time."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn")

from gpt2_onnx import Engine, GenerationOptions, Generator  # noqa: E402
from gpt2_onnx import prefix_cache as prefix_cache_module, sequence as sequence_module  # noqa: E402
from gpt2_onnx.core import Core  # noqa: E402
from gpt2_onnx.prefix_cache import PrefixCache  # noqa: E402
from gpt2_onnx.server import create_app  # noqa: E402
from helpers import Server, post  # noqa: E402

REASON = {"eos": "stop", "stop": "stop", "length": "length"}


@pytest.fixture(scope="module")
def served(tiny):
    _, engine, _, _ = tiny
    s = Server(create_app(engine, model_id="tiny", max_batch=8, prefix_cache_mb=64))
    yield s, engine
    s.stop()


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def stop_on_last_token(engine, prompt):
    """(n, stop, result of n tokens): a stop string whose first occurrence ends with the n-th new token."""
    prev = engine.generate(prompt, max_new_tokens=5, ignore_eos=True)
    for n in range(6, 40):
        full = engine.generate(prompt, max_new_tokens=n, ignore_eos=True)
        if len(full.text) > len(prev.text):  # the n-th token adds text
            for k in range(1, len(full.text) + 1):
                if full.text.find(full.text[-k:]) == len(full.text) - k:
                    return n, full.text[-k:], full
        prev = full
    pytest.skip("no stop string that completes on the last token")


# ---- the library and the server answer alike --------------------------------------------------
def test_server_equals_generate_batch(served):
    s, engine = served
    n_stop, stop, _ = stop_on_last_token(engine, "the lazy")
    cases = [
        (dict(prompt=["the quick", [5, 6, 7]], max_tokens=20, temperature=0),
         dict(max_new_tokens=20)),
        (dict(prompt=["to be", "the lazy"], max_tokens=12, temperature=0.9, top_k=50, seed=4, n=2),
         dict(max_new_tokens=12, temperature=0.9, top_k=50, seed=4, n=2)),
        (dict(prompt=["to be", [9, 9]], max_tokens=10, temperature=1.3, top_p=0.9, repetition_penalty=1.5, seed=11),
         dict(max_new_tokens=10, temperature=1.3, top_p=0.9, repetition_penalty=1.5, seed=11)),
        (dict(prompt="the lazy", max_tokens=n_stop, temperature=0, stop=[stop]), dict(max_new_tokens=n_stop, stop=[stop])),
    ]
    for body, opts in cases:
        prompts = body["prompt"] if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], (str, list)) \
            else [body["prompt"]]
        want = engine.generate_batch(prompts, **opts)
        for stream in (False, True):
            if stream:
                with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                    texts, reasons = ["" for _ in want], [None for _ in want]
                    for line in r.iter_lines():
                        for c in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
                            texts[c["index"]] += c["text"]
                            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
                got = list(zip(texts, reasons))
            else:
                r = post(s.url, body)
                assert r.status_code == 200, r.text
                got = [(c["text"], c["finish_reason"]) for c in r.json()["choices"]]
                assert r.json()["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
            assert got == [(w.text, REASON[w.finish_reason]) for w in want], (body, stream)
    assert want[0].finish_reason == "stop"  # the stop string completed on the last allowed token


def test_stop_completing_on_the_last_token_is_stop(tiny):
    _, engine, _, _ = tiny
    n, stop, full = stop_on_last_token(engine, "the quick")
    r = engine.generate("the quick", max_new_tokens=n, ignore_eos=True, stop=stop)
    assert (r.finish_reason, r.text, r.token_ids) == ("stop", full.text[: -len(stop)], full.token_ids)


def test_eos_and_ids_and_logprobs_through_the_servers_core(tiny):
    """Token ids, eos and logprobs of sequences in the server's own core, batched with HTTP traffic."""
    _, engine, _, _ = tiny
    first = engine.generate([1, 2], max_new_tokens=1).token_ids[0]
    eos_engine = Engine(engine.folder, dataclasses.replace(engine.config, eos_token_id=first), engine.model,
                        engine.tokenizer)
    app = create_app(eos_engine, model_id="t", max_batch=4)
    s = Server(app)
    try:
        opts = [GenerationOptions(max_new_tokens=8), GenerationOptions(max_new_tokens=9, logprobs=0),
                GenerationOptions(max_new_tokens=7, temperature=0.8, seed=2, logprobs=0, n=2)]
        prompts = [[1, 2], [3, 4, 5], "the quick"]
        with ThreadPoolExecutor(4) as pool:  # other clients batch with these sequences
            others = [pool.submit(post, s.url, {"prompt": "to be", "max_tokens": 12, "temperature": 0}) for _ in range(4)]
            requests = [app.state.llm.submit([p], o) for p, o in zip(prompts, opts)]
            assert all(f.result().status_code == 200 for f in others)
        for r in requests:
            r.result()
        seqs = [q for r in requests for q in r.sequences]
        got = iter(seqs)
        for p, o in zip(prompts, opts):
            for w in eos_engine.generate_batch([p], **{f.name: getattr(o, f.name) for f in dataclasses.fields(o)}):
                q = next(got)
                assert (q.tokens, q.finish_reason) == (w.token_ids, w.finish_reason)
                if o.logprobs is not None:
                    np.testing.assert_allclose(q.logprobs, w.logprobs, atol=1e-5, rtol=0)
        assert seqs[0].finish_reason == "eos" and seqs[0].tokens == [first]
        r = post(s.url, {"prompt": [1, 2], "max_tokens": 8, "temperature": 0}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    finally:
        s.stop()


def test_tiny_temperatures_decode_greedily_everywhere(served):
    s, engine = served
    greedy = engine.generate("the quick", max_new_tokens=10)
    for t in (1e-320, 1e-6):
        assert engine.generate("the quick", max_new_tokens=10, temperature=t, seed=1).token_ids == greedy.token_ids
        r = post(s.url, {"prompt": "the quick", "max_tokens": 10, "temperature": t})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy.text


# ---- failures stay local ------------------------------------------------------------------------
def test_a_poisoned_request_fails_alone(served, monkeypatch):
    s, engine = served
    real = sequence_module.choose

    def poisoned(logits, p, rng, seen=None):
        if p.temperature == 1.2345:
            raise FloatingPointError("injected failure")
        return real(logits, p, rng, seen)

    monkeypatch.setattr(sequence_module, "choose", poisoned)
    bodies = [{"prompt": f"to be {i}", "max_tokens": 15, "temperature": 0} for i in range(7)]
    bodies.insert(3, {"prompt": "poison", "max_tokens": 15, "temperature": 1.2345})
    want = [engine.generate(b["prompt"], max_new_tokens=15).text for b in bodies if b["temperature"] == 0]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda b: post(s.url, b), bodies))
    bad = rs.pop(3)
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert "injected failure" in bad.json()["error"]["message"]
    assert [r.status_code for r in rs] == [200] * 7
    assert [r.json()["choices"][0]["text"] for r in rs] == want
    with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                      json={"prompt": "poison", "max_tokens": 5, "temperature": 1.2345, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data:")]
    assert '"error"' in lines[-1] and "injected failure" in lines[-1]
    assert httpx.get(s.url + "/health").json()["active"] == 0


def test_a_row_failing_mid_request_is_the_requests_500_not_its_cancelled_siblings_503(served, monkeypatch):
    s, engine = served
    real, calls = sequence_module.choose, []

    def poisoned(logits, p, rng, seen=None):
        calls.append(1)
        if p.temperature == 1.2345 and len(calls) == 11:  # row 2 fails at its 3rd token
            raise FloatingPointError("injected failure")
        return real(logits, p, rng, seen)

    monkeypatch.setattr(sequence_module, "choose", poisoned)
    r = post(s.url, {"prompt": ["a b", "c d", "e f", "g h"], "max_tokens": 30, "temperature": 1.2345, "seed": 1})
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"], r.json()
    assert httpx.get(s.url + "/health").json()["active"] == 0


def test_a_failing_callback_ends_only_its_sequence(tiny):
    _, engine, _, _ = tiny
    opts = GenerationOptions(max_new_tokens=6)
    seqs = engine.sequences([[1, 2], [3, 4], [5, 6]], opts)

    def boom(step):
        if step.index == 2:
            raise RuntimeError("callback broke")

    seqs[1].on_step = boom
    core = Core(engine.model, slots=3, max_length=16)
    core.submit(seqs)
    while core.busy:
        core.step()
    assert seqs[1].finish_reason == "error" and "callback broke" in str(seqs[1].error)
    assert [q.tokens for q in (seqs[0], seqs[2])] == [engine.generate(p, max_new_tokens=6).token_ids
                                                       for p in ([1, 2], [5, 6])]


# ---- cancellation -------------------------------------------------------------------------------
def test_non_streaming_disconnect_frees_rows_and_counts_499(served, monkeypatch):
    s, _ = served
    from gpt2_onnx.model import DecodeStep

    real = DecodeStep.__call__

    def slow(self, *a, **kw):  # 20 ms a step, so the request is still running when the client leaves
        time.sleep(0.02)
        return real(self, *a, **kw)

    monkeypatch.setattr(DecodeStep, "__call__", slow)
    before = metric(s.url, 'gpt2onnx_requests_total{status="499"}')
    with pytest.raises(httpx.ReadTimeout):
        post(s.url, {"prompt": "x", "max_tokens": 100, "n": 8, "temperature": 1.0}, timeout=0.5)
    t = time.time()
    while httpx.get(s.url + "/health").json()["active"]:
        assert time.time() - t < 2, "rows not freed after the client left"
        time.sleep(0.01)
    steps = metric(s.url, "gpt2onnx_decode_steps_total")
    assert metric(s.url, 'gpt2onnx_requests_total{status="499"}') == before + 1
    time.sleep(0.2)
    assert metric(s.url, "gpt2onnx_decode_steps_total") == steps  # nothing runs for the departed client


# ---- one core, packed rows, no host round trips --------------------------------------------------
def test_every_model_run_of_generation_comes_from_the_core_step(served):
    s, engine = served
    assert importlib.util.find_spec("gpt2_onnx.scheduler") is None  # the server's old second loop is gone
    callers = []
    session = engine.model.session
    real = session.run_with_iobinding

    def spy(*a, **kw):
        callers.append([(f.filename.replace("\\", "/"), f.name) for f in traceback.extract_stack()])
        return real(*a, **kw)

    session.run_with_iobinding = spy
    try:
        engine.generate("the quick", max_new_tokens=4)
        list(engine.stream("to be", max_new_tokens=4, temperature=0.7, seed=0))
        engine.generate_batch(["a", "b"], n=2, max_new_tokens=4, temperature=1.0, seed=1)
        gen = Generator(engine, [[1, 2, 3]], GenerationOptions(max_new_tokens=3))
        while not gen.is_done():
            gen.generate_next_token()
        assert post(s.url, {"prompt": "x", "max_tokens": 4, "temperature": 0}).status_code == 200
    finally:
        del session.run_with_iobinding
    assert len(callers) >= 5 * 3
    for stack in callers:
        assert any(f.endswith("engine/core.py") and name in ("_prefill", "_prefill_after", "_decode") for f, name in stack), stack[-4:]


def test_rows_stay_packed_and_each_step_runs_only_live_rows(tiny):
    _, engine, _, _ = tiny
    prompts = [[i + 1, i + 2, i + 3][: 1 + i % 3] for i in range(6)]
    lengths = [3, 11, 5, 8, 2, 9]
    seqs = [q for p, m in zip(prompts, lengths) for q in engine.sequences([p], GenerationOptions(max_new_tokens=m))]
    core = Core(engine.model, slots=4, max_length=32)
    batch_sizes = []
    real = core.decoder.__class__.__call__

    def spy(step, tokens, rows, **kw):
        batch_sizes.append((len(tokens), sum(not q.done for q in core.running[: len(tokens)])))
        return real(step, tokens, rows, **kw)

    core.decoder.__class__.__call__ = spy
    try:
        core.submit(seqs)
        while core.busy:
            core.step()
            assert len(core.running) <= 4 and all(not q.done for q in core.running)
    finally:
        core.decoder.__class__.__call__ = real
    assert all(b == live for b, live in batch_sizes)  # no finished row rides along
    assert batch_sizes[-1][0] == 1  # the last sequence alone pays batch 1
    for q, p, m in zip(seqs, prompts, lengths):
        assert q.tokens == engine.generate(p, max_new_tokens=m, ignore_eos=False).token_ids


def test_no_host_copy_of_the_pool_and_logits_only_for_sampling_rows(tiny):
    _, engine, _, _ = tiny
    V = engine.config.vocab_size
    seqs = [*engine.sequences([[1, 2], [3]], GenerationOptions(max_new_tokens=6, ignore_eos=True)),
            *engine.sequences(["to be"], GenerationOptions(max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True))]
    core = Core(engine.model, slots=3, max_length=16)
    core.submit(seqs)
    per_step = []
    while core.busy:
        before = engine.model.transfers["logits"]
        core.step()
        per_step.append(engine.model.transfers["logits"] - before)
    assert per_step == [V * 4] * 6  # one sampling row: its logits, never the greedy rows'
    assert core.pool.host_reads == 0
    greedy_only = engine.sequences([[1, 2], [3]], GenerationOptions(max_new_tokens=6, ignore_eos=True))
    core = Core(engine.model, slots=2, max_length=16)
    core.submit(greedy_only)
    before = engine.model.transfers["logits"]
    while core.busy:
        core.step()
    assert engine.model.transfers["logits"] == before and core.pool.host_reads == 0


def test_kv_copy_graph_equals_numpy_copies(tiny):
    """kv_copy.onnx (the device path) run on CPU: n samples, a prefix and compaction give the same ids."""
    _, engine, _, _ = tiny
    pre = engine.prefill([7, 8, 9, 10, 11, 12])

    def run():
        a = engine.generate_batch(["the quick"], n=3, max_new_tokens=12, temperature=1.0, seed=5)
        b = engine.generate_batch([[1, 2], [3, 4, 5]], prefix=pre, max_new_tokens=10, stop=["\x00never"])
        c = engine.generate_batch([[1], [2, 3], [4, 5, 6]], max_new_tokens=9, stop=[" "])
        return [r.token_ids for r in a + b + c]

    want = run()
    engine.model.kv_copy_mode = "graph"
    try:
        copies = engine.model.transfers["kv_rows"]
        assert run() == want
        assert engine.model.transfers["kv_rows"] > copies
    finally:
        engine.model.kv_copy_mode = "numpy"


# ---- the automatic prefix cache ------------------------------------------------------------------
def test_prefix_cache_reuses_shared_prompts_and_changes_no_answer(served, tiny):
    s, engine = served
    rng = np.random.default_rng(4)
    shots = rng.integers(1, 1000, 70).tolist()  # a few-shot preamble
    queries = [rng.integers(1, 1000, 5).tolist() for _ in range(6)]
    want = [engine.generate(shots + q, max_new_tokens=8).text for q in queries]
    hits, hit_tokens = metric(s.url, "gpt2onnx_prefix_cache_hits_total"), metric(s.url, "gpt2onnx_prefix_cache_hit_tokens_total")
    got = [post(s.url, {"prompt": shots + queries[0], "max_tokens": 8, "temperature": 0}).json()]
    with ThreadPoolExecutor(5) as pool:  # concurrent: they wait a step and reuse the first one's KV
        got += list(pool.map(lambda q: post(s.url, {"prompt": shots + q, "max_tokens": 8, "temperature": 0}).json(),
                             queries[1:]))
    assert [g["choices"][0]["text"] for g in got] == want
    assert metric(s.url, "gpt2onnx_prefix_cache_hits_total") - hits >= 5
    assert metric(s.url, "gpt2onnx_prefix_cache_hit_tokens_total") - hit_tokens >= 5 * 70
    _, eng, _, _ = tiny
    plain = Server(create_app(eng, model_id="tiny", max_batch=8, prefix_cache_mb=0))
    try:
        again = [post(plain.url, {"prompt": shots + q, "max_tokens": 8, "temperature": 0}).json() for q in queries]
        assert [g["choices"][0]["text"] for g in again] == want
        assert metric(plain.url, "gpt2onnx_prefix_cache_hits_total") == 0
    finally:
        plain.stop()


def test_prefix_cache_is_bounded_lru(tiny):
    _, engine, _, _ = tiny
    row = engine.model.new_cache(1, 40).nbytes  # bytes of a 40-token entry
    cache = PrefixCache(engine.model, max_bytes=int(2.5 * row))
    pool = engine.model.new_cache(4, 64)
    contexts = [[k] * 40 for k in (1, 2, 3)]
    for i, ctx in enumerate(contexts):
        engine.model.run(pool, np.array([ctx]), np.array([40]), np.array([[39]]), start=i)
    cache.insert(contexts[0], pool, 0)
    cache.insert(contexts[1], pool, 1)
    assert cache.match(np.array(contexts[0] + [5]))[0] == 40  # touch entry 0: entry 1 is now the oldest
    cache.insert(contexts[2], pool, 2)
    assert cache.nbytes <= 2.5 * row and len(cache.entries) == 2
    assert cache.match(np.array(contexts[1] + [5]))[0] == 0 and cache.match(np.array(contexts[2]))[0] == 39


def test_decode_step_device_path_equals_the_cpu_path(tiny):
    """DecodeStep's device path (buffers in OrtValues, logits copied by onnxruntime) run on the CPU."""
    from gpt2_onnx.model import DecodeStep

    _, engine, _, _ = tiny
    prompts, lens = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0], [7, 7, 0, 0, 0]]), np.array([5, 3, 2])
    caches = [engine.model.new_cache(3, 16) for _ in range(2)]
    for c in caches:
        engine.model.run(c, prompts, lens, (lens - 1)[:, None])
    host, dev = DecodeStep(engine.model, caches[0]), DecodeStep(engine.model, caches[1], device_buffers=True)
    tokens = np.array([7, 8, 9])
    for rows in ([], [1], [0, 2], [0, 1, 2], [2]):
        a, la = host(tokens, np.array(rows, np.int64))
        b, lb = dev(tokens, np.array(rows, np.int64))
        assert a.tolist() == b.tolist() and la.shape == (len(rows), engine.config.vocab_size)
        np.testing.assert_array_equal(la, lb)
        tokens = a
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [10, 8, 7]


def test_cancelled_waiting_sequences_leave_the_queue_at_once(tiny):
    _, engine, _, _ = tiny
    seqs = engine.sequences([[1, 2], [3, 4], [5, 6]], GenerationOptions(max_new_tokens=4))
    core = Core(engine.model, slots=1, max_length=16)
    core.submit(seqs)
    core.step()  # the first runs, two wait
    core.cancel(seqs[1:])
    assert len(core.waiting) == 0 and [s.finish_reason for s in seqs[1:]] == ["cancelled"] * 2
    while core.busy:
        core.step()
    assert seqs[0].tokens == engine.generate([1, 2], max_new_tokens=4).token_ids


def test_prompts_of_very_different_lengths_are_not_padded_together(tiny, monkeypatch):
    _, engine, _, _ = tiny
    shapes = []
    real = engine.model.run

    def spy(cache, ids, n_new, *a, **kw):
        shapes.append((ids.shape, int(np.sum(n_new))))
        return real(cache, ids, n_new, *a, **kw)

    monkeypatch.setattr(engine.model, "run", spy)
    prompts = [[i + 1] * 10 for i in range(7)] + [list(range(1, 101))]
    got = engine.generate_batch(prompts, max_new_tokens=3)
    assert len(shapes) >= 2 and all(b * s <= 1.5 * real_tokens + 64 for (b, s), real_tokens in shapes)
    monkeypatch.undo()
    assert [g.token_ids for g in got] == [engine.generate(p, max_new_tokens=3).token_ids for p in prompts]


def test_prefix_cache_match_looks_at_one_entry_not_all(tiny, monkeypatch):
    _, engine, _, _ = tiny
    cache = PrefixCache(engine.model, max_bytes=1 << 30)
    pool = engine.model.new_cache(1, 64)
    preamble = list(range(1, 33))  # two blocks shared by every entry
    engine.model.run(pool, np.array([preamble + [99] * 8]), np.array([40]), np.array([[39]]))
    for i in range(300):
        pool.lengths[0] = 40
        cache.insert(preamble + [i + 1] * 8, pool, 0)
    assert len(cache.entries) == 300
    calls = []
    real = prefix_cache_module.common_prefix
    monkeypatch.setattr(prefix_cache_module, "common_prefix", lambda a, b: calls.append(1) or real(a, b))
    m, entry = cache.match(np.array(preamble + [299] * 8 + [5, 6]))  # a recent entry: all of it is reused
    assert m == 40 and entry.token_ids == tuple(preamble + [299] * 8) and len(calls) <= 8
    m, entry = cache.match(np.array(preamble + [7] * 8 + [5, 6]))  # an old one: the shared blocks are reused
    assert m == 32 and len(calls) <= 16


def test_a_prefix_that_is_the_whole_context_reuses_its_logits(tiny, monkeypatch):
    _, engine, _, _ = tiny
    ids = [4, 8, 15, 16, 23, 42]
    pre = engine.prefill(ids)
    want = engine.generate(ids, max_new_tokens=6)
    runs = []
    real = engine.model.run
    monkeypatch.setattr(engine.model, "run", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    got = engine.generate([], prefix=pre, max_new_tokens=6)
    assert got.token_ids == want.token_ids and got.prompt_tokens == len(ids) and runs == []  # no prefill ran


def test_requests_take_free_rows_in_turns_so_a_small_one_is_not_stuck_behind_a_huge_one(tiny):
    """Fair admission: a one-prompt request queued behind 16 prompts x n=4 joins at the first free row, not after
    the 64 sequences ahead of it; the big request's answers are unchanged; the bound is one unit of each request
    queued before it."""
    _, engine, _, _ = tiny
    opts = GenerationOptions(max_new_tokens=6, temperature=0, ignore_eos=True)
    core = Core(engine.model, slots=4, max_length=64)
    big = engine.sequences([[5, 6, 7 + i] for i in range(16)], dataclasses.replace(opts, n=4))
    small = engine.sequences([[9, 9, 9]], opts)
    third = engine.sequences([[4, 4]], opts)
    core.submit(big)
    core.step()  # the big request fills the 4 rows
    core.submit(small)
    core.submit(third)
    steps = 0
    while not (small[0].tokens and third[0].tokens):
        core.step()
        steps += 1
    # both joined as soon as the first unit's 4 rows freed (after its 6 tokens), not after 64 sequences
    assert steps <= opts.max_new_tokens
    assert sum(s.done for s in big) == 4
    while core.busy:
        core.step()
    assert [s.tokens for s in small] == [r.token_ids for r in engine.generate_batch([[9, 9, 9]], **{
        "max_new_tokens": 6, "temperature": 0, "ignore_eos": True})]
    want = engine.generate_batch([[5, 6, 7 + i] for i in range(16)], n=4, max_new_tokens=6, temperature=0,
                                 ignore_eos=True)
    assert [s.tokens for s in big] == [r.token_ids for r in want]


def test_fifo_order_holds_within_one_request(tiny):
    _, engine, _, _ = tiny
    opts = GenerationOptions(max_new_tokens=2, temperature=0)
    core = Core(engine.model, slots=2, max_length=32)
    seqs = engine.sequences([[3 + i] for i in range(6)], opts)
    core.submit(seqs)
    order = []
    while core.busy:
        core.step()
        order += [s.row for s in core.running if s.row not in order]
    assert order == sorted(order)


def _rss_mb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_NOHUGEPAGE"), reason="no transparent huge pages here")
def test_a_kv_pool_is_resident_only_where_rows_were_written(bundled_onnx):
    """Rows use a prefix of each head's block: a pool of 256 rows x n_positions, 32 rows of it prefilled
    with 8 tokens, grows resident memory by those pages, not by the pool (2 MB huge pages made it ~0.8 GB)."""
    engine = Engine.load(bundled_onnx, provider="cpu")
    cache = engine.model.new_cache(256, engine.config.n_positions)
    assert cache.nbytes > 700 * 2**20
    before = _rss_mb()
    ids = np.arange(8, dtype=np.int64)[None] + 100
    for row in range(0, 256, 8):
        engine.model.run(cache, ids, np.array([8]), np.array([[7]]), start=row)
    grew = _rss_mb() - before
    assert grew < 64, f"resident memory grew by {grew:.0f} MB for 32 rows of 8 tokens"
    ref = engine.model.new_cache(1, 8)
    engine.model.run(ref, ids, np.array([8]), np.array([[7]]))
    for a, b in zip(cache.host_arrays(), ref.host_arrays()):  # each row holds exactly its own KV
        np.testing.assert_array_equal(a[248, :, :8], b[0, :, :8])
