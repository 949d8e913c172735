"""Evaluation-grade API: Engine.score, logprobs (top N) and prompt logprobs in the library, and the
server's logprobs / echo / tokenize endpoints in OpenAI's and lm-evaluation-harness's shapes. Every
log-probability is compared with torch's log_softmax of the same model (atol 1e-4)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")

from gpt2_onnx.server import create_app  # noqa: E402
from helpers import Server, post  # noqa: E402

ATOL = 1e-4


def torch_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()  # (S, V)


@pytest.fixture(scope="module")
def served(tiny):
    model, engine, _, _ = tiny
    s = Server(create_app(engine, model_id="tiny", max_batch=8))
    yield s, engine, model
    s.stop()


# ---- the library -------------------------------------------------------------------------------
def test_score_equals_torch_and_marks_greedy_tokens(tiny):
    model, engine, _, _ = tiny
    rng = np.random.default_rng(5)
    pairs = [(rng.integers(1, 1000, n).tolist(), rng.integers(1, 1000, k).tolist()) for n, k in [(5, 3), (40, 1), (1, 9)]]
    greedy_ctx = [7, 8, 9]
    greedy_cont = engine.generate(greedy_ctx, max_new_tokens=4, ignore_eos=True).token_ids
    pairs.append((greedy_ctx, greedy_cont))
    scores = engine.score(pairs)
    for (ctx, cont), sc in zip(pairs, scores):
        lp = torch_logprobs(model, ctx + cont)
        want = [lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)]
        np.testing.assert_allclose(sc.logprobs, want, atol=ATOL, rtol=0)
        assert sc.greedy == [bool(lp[len(ctx) - 1 + k].argmax() == t) for k, t in enumerate(cont)]
        assert sc.token_ids == cont and sc.logprob == pytest.approx(sum(want), abs=1e-3)
    assert scores[-1].is_greedy and not all(s.is_greedy for s in scores[:3])
    assert [s.logprobs for s in engine.score(pairs[:1])] == [scores[0].logprobs]  # batching changes nothing
    text = engine.score([("the quick", " brown fox"), ("", "the")])
    assert text[0].token_ids == engine.tokenizer.encode(" brown fox")
    np.testing.assert_allclose(text[1].logprobs, engine.score([([engine.config.bos_token_id], "the")])[0].logprobs)


@pytest.mark.parametrize("bad, match", [([("a", "")], "nothing to score"), (["ab"], r"\(context, continuation\) pair"),
                                        ([([1] * 120, [2] * 9)], "exceeds the model's context")])
def test_score_refuses_bad_requests(tiny, bad, match):
    _, engine, _, _ = tiny
    with pytest.raises(ValueError, match=match):
        engine.score(bad)


def test_logprobs_top_n_and_prompt_logprobs_equal_torch(tiny):
    model, engine, _, _ = tiny
    ids = [3, 14, 15, 92, 65]
    r = engine.generate(ids, max_new_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True, temperature=0.9, seed=1)
    lp = torch_logprobs(model, ids + r.token_ids)
    for k, t in enumerate(r.token_ids):
        row = lp[len(ids) - 1 + k]
        assert r.logprobs[k] == pytest.approx(row[t], abs=ATOL)
        best = np.argsort(-row)[:3]
        assert [i for i, _ in r.top_logprobs[k]] == best.tolist()
        np.testing.assert_allclose([v for _, v in r.top_logprobs[k]], row[best], atol=ATOL)
    assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None and len(r.prompt_logprobs) == len(ids)
    np.testing.assert_allclose(r.prompt_logprobs[1:], [lp[k - 1, ids[k]] for k in range(1, len(ids))], atol=ATOL)
    assert [i for i, _ in r.prompt_top_logprobs[2]] == np.argsort(-lp[1])[:2].tolist()
    assert engine.generate(ids, max_new_tokens=5, logprobs=0).top_logprobs[0] == ()
    scored = engine.generate(ids, max_new_tokens=0, prompt_logprobs=0)  # scoring only
    assert scored.token_ids == [] and scored.prompt_logprobs[1:] == pytest.approx(r.prompt_logprobs[1:], abs=1e-6)
    with pytest.raises(ValueError, match="logprobs must be None"):
        engine.generate(ids, logprobs=True)


# ---- the server -------------------------------------------------------------------------------
def test_completion_logprobs_in_openai_shape(served):
    s, engine, model = served
    r = post(s.url, {"prompt": "the quick", "max_tokens": 6, "temperature": 0, "logprobs": 2}).json()
    c = r["choices"][0]
    want = engine.generate("the quick", max_new_tokens=6, logprobs=2)
    assert c["text"] == want.text and len(c["logprobs"]["tokens"]) == len(want.token_ids)
    np.testing.assert_allclose(c["logprobs"]["token_logprobs"], want.logprobs, atol=1e-6)
    assert c["logprobs"]["tokens"] == [engine.tokenizer.token_text(t) for t in want.token_ids]
    assert all(len(d) <= 2 for d in c["logprobs"]["top_logprobs"])
    assert c["logprobs"]["text_offset"][0] == 0 and c["logprobs"]["text_offset"] == sorted(c["logprobs"]["text_offset"])


def test_echo_scores_the_prompt_as_lm_eval_asks(served):
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 1, temperature 0, on token ids."""
    s, engine, model = served
    ctx, cont = engine.tokenizer.encode("the quick brown"), engine.tokenizer.encode(" fox jumps")
    body = {"prompt": [ctx + cont, ctx], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    r = post(s.url, body).json()
    c = sorted(r["choices"], key=lambda c: c["index"])[0]
    lps = c["logprobs"]
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert len(lps["tokens"]) == len(ctx) + len(cont) + 1  # the prompt, then the one generated token
    mine = sum(lps["token_logprobs"][len(ctx):-1])  # what lm-eval's parse_logprobs sums
    assert mine == pytest.approx(engine.score([(ctx, cont)])[0].logprob, abs=ATOL)
    lp = torch_logprobs(model, ctx + cont)
    np.testing.assert_allclose(lps["token_logprobs"][1:-1], [lp[k - 1, t] for k, t in enumerate(ctx + cont) if k],
                               atol=ATOL)
    greedy = [tok == max(top.values()) for tok, top in zip(lps["token_logprobs"][len(ctx):-1],
                                                           lps["top_logprobs"][len(ctx):-1])]
    assert greedy == engine.score([(ctx, cont)])[0].greedy
    assert c["text"].startswith(engine.tokenizer.decode(ctx + cont))
    only = post(s.url, {**body, "prompt": "the quick brown fox", "max_tokens": 0}).json()["choices"][0]
    assert only["text"] == "the quick brown fox" and only["finish_reason"] == "length"
    assert len(only["logprobs"]["tokens"]) == len(engine.tokenizer.encode("the quick brown fox"))


def test_streaming_echo_and_logprobs_add_up_to_the_plain_answer(served):
    s, _, _ = served
    body = {"prompt": "to be", "max_tokens": 5, "temperature": 0, "logprobs": 1, "echo": True}
    plain = post(s.url, body).json()["choices"][0]
    text, tokens, offsets = "", [], []
    with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            for c in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
                text += c["text"]
                tokens += c["logprobs"]["tokens"]
                offsets += c["logprobs"]["text_offset"]
    assert (text, tokens, offsets) == (plain["text"], plain["logprobs"]["tokens"], plain["logprobs"]["text_offset"])


def test_tokenizer_endpoints_as_lm_eval_uses_them(served):
    s, engine, _ = served
    info = httpx.get(s.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == engine.config.n_positions
    eos = httpx.post(s.url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [engine.config.eos_token_id]  # special-token text is the special token
    t = httpx.post(s.url + "/tokenize", json={"prompt": "the quick fox"}).json()
    assert t["tokens"] == engine.tokenizer.encode("the quick fox") and t["count"] == len(t["tokens"])
    d = httpx.post(s.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "the quick fox"
    assert httpx.post(s.url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(s.url + "/tokenize", json={"text": "x"}).status_code == 400


def test_prompt_logprobs_after_skipped_tokens_are_those_of_the_whole_context():
    """score_prompt(skip=k) (the tokens after a prefix adapter's virtual ones): None for the first k + 1, then
    exactly what scoring the whole context gives."""
    from types import SimpleNamespace

    from gpt2_onnx.sequence import Sequence as Seq

    rng = np.random.default_rng(0)
    ids, logits = rng.integers(0, 50, 100).tolist(), rng.standard_normal((100, 50)).astype(np.float32)
    whole, part = (SimpleNamespace(options=SimpleNamespace(prompt_logprobs=2), context=ids) for _ in range(2))
    Seq.score_prompt(whole, logits)
    for skip in (1, 3, 70):
        Seq.score_prompt(part, logits[skip:], skip=skip)
        assert part.prompt_logprobs[: skip + 1] == [None] * (skip + 1) == part.prompt_top_logprobs[: skip + 1]
        assert part.prompt_logprobs[skip + 1:] == whole.prompt_logprobs[skip + 1:]
        assert part.prompt_top_logprobs[skip + 1:] == whole.prompt_top_logprobs[skip + 1:]
        assert len(part.prompt_logprobs) == len(ids)
