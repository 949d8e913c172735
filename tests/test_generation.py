"""Generation features: token choice math, stops, UTF-8 streaming, batches, prefix reuse, n samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2_onnx import SamplingParams
from gpt2_onnx.sampling import choose, filter_logits
from gpt2_onnx.tokenizer import TextStream


# ---- token choice -------------------------------------------------------------------------
def test_top_k_only_returns_the_k_largest():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500).astype(np.float32)
    top = set(np.argsort(-logits)[:7].tolist())
    p = SamplingParams(temperature=1.5, top_k=7)
    ids, probs = filter_logits(logits, p)
    assert set(ids.tolist()) == top and probs.sum() == pytest.approx(1.0)
    draws = {choose(logits, p, rng) for _ in range(2000)}
    assert draws <= top and len(draws) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))
    for top_p, n in [(0.5, 1), (0.51, 2), (0.75, 2), (0.76, 3), (0.9, 3), (0.91, 4), (1.0, 5)]:
        ids, probs = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
        assert ids.tolist() == list(range(n)), top_p
        assert probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
                                    SamplingParams(temperature=1.0, top_p=0.8)])
def test_sampled_frequencies_match_the_softmax(params):
    logits = np.array([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    ids, probs = filter_logits(logits, params)
    expected = np.zeros(len(logits))
    expected[ids] = probs
    rng = np.random.default_rng(1)
    n = 20000
    counts = np.bincount([choose(logits, params, rng) for _ in range(n)], minlength=len(logits))
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) <= 5 * sigma + 1), (counts, n * expected)
    # and the filtered distribution is the softmax of logits / T restricted to the kept set
    ref = torch.softmax(torch.tensor(logits[ids]) / params.temperature, 0).numpy()
    np.testing.assert_allclose(probs, ref, rtol=1e-6)


def test_repetition_penalty_math():
    from types import SimpleNamespace

    from gpt2_onnx.processors import process

    row = SimpleNamespace(options=SamplingParams(repetition_penalty=2.0), tokens=[1], enders=set(), banned=(),
                          constraint=None, history=lambda: np.array([0, 1, 1]))
    out = process(np.array([[2.0, -2.0, 1.0, 0.5]]), [row])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                 dict(repetition_penalty=0), dict(seed=-3)])
def test_bad_sampling_options(tiny, bad):
    _, engine, _, _ = tiny
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        engine.generate("hi", max_new_tokens=3, **bad)


def test_seed_reproduces_and_temperature_to_zero_is_greedy(tiny):
    _, engine, _, _ = tiny
    a = engine.generate("the quick", max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    b = engine.generate("the quick", max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    c = engine.generate("the quick", max_new_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy = engine.generate("the quick", max_new_tokens=20, ignore_eos=True)
    cold = engine.generate("the quick", max_new_tokens=20, temperature=1e-4, seed=3, ignore_eos=True)
    assert cold.token_ids == greedy.token_ids


def test_repetition_penalty_changes_greedy_output(tiny):
    _, engine, _, _ = tiny
    plain = engine.generate([5, 6, 7], max_new_tokens=30, ignore_eos=True).token_ids
    pen = engine.generate([5, 6, 7], max_new_tokens=30, ignore_eos=True, repetition_penalty=5.0).token_ids
    assert plain != pen and len(set(pen)) >= len(set(plain))


def test_logprobs_are_the_models(tiny):
    model, engine, _, _ = tiny
    r = engine.generate([3, 4, 5], max_new_tokens=4, logprobs=0, ignore_eos=True)
    ids = [3, 4, 5] + r.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).numpy()
    want = [lp[2 + i, t] for i, t in enumerate(r.token_ids)]
    np.testing.assert_allclose(r.logprobs, want, atol=1e-4)


# ---- stopping -----------------------------------------------------------------------------
def test_stop_string_spanning_tokens_is_cut_and_not_returned(tiny):
    _, engine, _, _ = tiny
    full = engine.generate("the lazy", max_new_tokens=40, ignore_eos=True)
    steps = list(engine.stream("the lazy", max_new_tokens=40, ignore_eos=True))
    pieces = [s.text for s in steps]
    # a stop string made of the end of one token's text and the start of the next
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    at = full.text.find(stop)
    r = engine.generate("the lazy", max_new_tokens=40, ignore_eos=True, stop=[stop, "\x00never"])
    assert r.finish_reason == "stop" and r.text == full.text[:at] and stop not in r.text
    streamed = "".join(s.text for s in engine.stream("the lazy", max_new_tokens=40, ignore_eos=True, stop=stop))
    assert streamed == r.text


def test_finish_reasons(tiny):
    _, engine, _, _ = tiny
    assert engine.generate([1, 2], max_new_tokens=5, ignore_eos=True).finish_reason == "length"
    # make the eos token the greedy choice: the id the model picks first
    first = engine.generate([1, 2], max_new_tokens=1).token_ids[0]
    from dataclasses import replace

    engine.config, saved = replace(engine.config, eos_token_id=first), engine.config
    try:
        r = engine.generate([1, 2], max_new_tokens=5)
    finally:
        engine.config = saved
    assert r.finish_reason == "eos" and r.token_ids == [first]


# ---- streaming text -----------------------------------------------------------------------
def test_text_stream_holds_back_split_characters(tiny):
    _, engine, _, _ = tiny
    text = "héllo 🎉 世界, naïve café 👩‍👩‍👧 done"
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # the small test tokenizer splits these characters into bytes
    ts = TextStream(engine.tokenizer)
    deltas = [ts.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # at least one token was held back mid-character
    assert "".join(deltas) + ts.flush() == text


def test_stream_yields_valid_utf8_deltas_matching_generate(tiny):
    _, engine, _, _ = tiny
    for prompt in ["🎉 emoji", "世界 CJK"]:
        steps = list(engine.stream(prompt, max_new_tokens=30, temperature=1.0, seed=1))
        text = "".join(s.text for s in steps)
        assert text == engine.generate(prompt, max_new_tokens=30, temperature=1.0, seed=1).text
        # splitting into deltas never breaks a character: the pieces equal the whole decoded at once
        # (a random model may emit byte sequences that are invalid UTF-8 on their own; those stay U+FFFD)
        context = engine.tokenizer.encode(prompt)
        whole = engine.tokenizer.decode(context + [s.token_id for s in steps])
        assert engine.tokenizer.decode(context) + text == whole


# ---- batches, prefix reuse, n samples ----------------------------------------------------
def test_rows_that_stop_early_leave_the_batch_without_disturbing_others(tiny):
    _, engine, _, _ = tiny
    prompts = ["the quick", "to be", [7, 8, 9, 10, 11]]
    single = [engine.generate(p, max_new_tokens=25, ignore_eos=True) for p in prompts]
    stop = single[1].text[3:6]  # row 1 stops early
    batch = engine.generate_batch(prompts, max_new_tokens=25, ignore_eos=True, stop=stop)
    assert batch[1].finish_reason == "stop"
    for s, b in zip(single, batch):
        cut = s.text.find(stop)
        assert b.text == (s.text if cut < 0 else s.text[:cut])


def test_prefix_reuse_equals_one_go(tiny):
    _, engine, _, _ = tiny
    rng = np.random.default_rng(0)
    prefix_ids = rng.integers(0, 1000, 60).tolist()
    pre = engine.prefill(prefix_ids)
    for q in ([1, 2, 3], [42], rng.integers(0, 1000, 9).tolist()):
        reused = engine.generate(q, prefix=pre, max_new_tokens=20, ignore_eos=True)
        whole = engine.generate(prefix_ids + q, max_new_tokens=20, ignore_eos=True)
        assert reused.token_ids == whole.token_ids and reused.prompt_tokens == len(prefix_ids) + len(q)
    assert pre.cache.lengths.tolist() == [60]  # the prefix cache is not consumed


def test_n_samples_share_prefill_and_are_reproducible(tiny):
    _, engine, _, _ = tiny
    a = engine.generate_batch(["the quick"], n=4, temperature=1.0, seed=3, max_new_tokens=15, ignore_eos=True)
    b = engine.generate_batch(["the quick"], n=4, temperature=1.0, seed=3, max_new_tokens=15, ignore_eos=True)
    assert len(a) == 4 and [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1  # diverse samples
    greedy = engine.generate_batch(["the quick"], n=3, max_new_tokens=10, ignore_eos=True)
    single = engine.generate("the quick", max_new_tokens=10, ignore_eos=True)
    assert all(r.token_ids == single.token_ids for r in greedy)


def test_prefix_with_n_samples(tiny):
    _, engine, _, _ = tiny
    pre = engine.prefill("To be, or not to be")
    rs = engine.generate_batch([": that"], prefix=pre, n=3, temperature=1.0, seed=0, max_new_tokens=8)
    ws = engine.generate_batch(["To be, or not to be: that"], n=3, temperature=1.0, seed=0, max_new_tokens=8)
    assert [r.token_ids for r in rs] == [w.token_ids for w in ws]
