"""Decoding features against transformers: logits processors and warpers on the same scores, greedy decoding
with processors, beam search (ids and scores), the rows that need logits, best_of, and refused values."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation import logits_process as hf

from gpt2_onnx import Engine, GenerationOptions
from gpt2_onnx.core import Core
from gpt2_onnx.model import DecodeStep
from gpt2_onnx.processors import process
from gpt2_onnx.sampling import filter_logits

EOS = 0  # the test checkpoints' (and the bundled model's) eos_token_id


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch references run one thread: small models decode token by token, and two threads on two busy
    cores made transformers' generate several times slower here (the results are the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundled(bundled_onnx):
    from gpt2_onnx.models import BUNDLED

    model = GPT2LMHeadModel.from_pretrained(str(BUNDLED), dtype=torch.float32).eval()  # fp16 file, upcast
    return model, Engine.load(bundled_onnx, provider="cpu")


# ---- 1. logits processors vs transformers' LogitsProcessors ---------------------------------------
@dataclass
class Row:
    """What process() reads of a row."""

    options: GenerationOptions
    prompt: list[int]
    tokens: list[int]
    enders: set[int] = field(default_factory=lambda: {EOS})
    banned: tuple[tuple[int, ...], ...] = ()
    constraint: None = None

    def history(self) -> np.ndarray:
        return np.array(self.prompt + self.tokens, np.int64)


def histories(V: int, R: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """R (prompt, new tokens) pairs of different lengths with many repeats (a small alphabet plus a few ids
    from anywhere in the vocabulary), so that penalties and n-gram bans really hit prompt and new tokens."""
    rng = np.random.default_rng(seed)
    alphabet = np.concatenate([np.arange(1, 7), rng.integers(1, V, 4), [V - 1]])
    out = []
    for r in range(R):
        P, N = 2 + r % 5 * 2, (r * 3) % 11  # some rows have no new tokens yet
        seq = rng.choice(alphabet, P + N).tolist()
        if r % 3 == 0:  # a repeating motif: its last n - 1 tokens (n <= 4) occurred before, followed by one
            seq = (seq[:3] * (4 + P + N))[: max(P + N, 8)]
        out.append((seq[:P], seq[P:]))
    return out


def hf_rows(proc, rows: list[Row], scores: np.ndarray) -> np.ndarray:
    """transformers' processor applied row by row (each row's own input_ids: prompt + new tokens), in float64."""
    return np.stack([proc(torch.tensor([r.prompt + r.tokens]), torch.tensor(z[None], dtype=torch.float64))[0].numpy()
                     for r, z in zip(rows, scores)])


def assert_same_scores(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))  # the masks, exactly
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all()
    np.testing.assert_allclose(got[fin], want[fin], atol=1e-6, rtol=0)


V_CASES = [pytest.param(1000, id="V1000"), pytest.param(50257, id="V50257")]


def scores_for(V: int, R: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(R, V)) * 2.5).astype(np.float32)


@pytest.mark.parametrize("V", V_CASES)
@pytest.mark.parametrize("penalty", [1.3, 0.7, 5.0])
def test_repetition_penalty_equals_transformers(V, penalty):
    R = 7
    z = scores_for(V, R, 1)
    rows = [Row(GenerationOptions(repetition_penalty=penalty), p, t) for p, t in histories(V, R, 2)]
    want = hf_rows(hf.RepetitionPenaltyLogitsProcessor(penalty), rows, z)
    got = process(z, rows)
    assert_same_scores(got, want)
    # the prompt's tokens count, not only the new ones
    r = next(r for r in rows if set(r.prompt) - set(r.tokens))
    i = rows.index(r)
    only_prompt = sorted(set(r.prompt) - set(r.tokens))
    assert not np.allclose(got[i, only_prompt], z[i, only_prompt])


@pytest.mark.parametrize("V", V_CASES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(V, n):
    R = 9
    z = scores_for(V, R, 3)
    rows = [Row(GenerationOptions(no_repeat_ngram_size=n), p, t) for p, t in histories(V, R, 4)]
    rows.append(Row(GenerationOptions(no_repeat_ngram_size=n), [5, 6, 5][: max(n - 1, 1)], []))  # shorter than n
    z = np.concatenate([z, scores_for(V, 1, 5)])
    want = hf_rows(hf.NoRepeatNGramLogitsProcessor(n), rows, z)
    assert np.isneginf(want).any(), "no n-gram was banned: the case tests nothing"
    assert_same_scores(process(z, rows), want)


@pytest.mark.parametrize("V", V_CASES)
def test_bad_words_equal_transformers(V):
    words = [(5,), (V - 1,), (3, 4), (7, 8, 9), (2, EOS), (EOS, 11)]  # eos alone is left out: HF drops it
    prompts = [([1, 2, 3], []), ([3], [4, 7]), ([1], [7, 8]), ([9, 7], [8]), ([8, 9], []), ([7, 8, 2], [3]),
               ([6, 6], [2]), ([1, 1, 1], [EOS]), ([4, 3], [8, 7, 8]), ([7], [8]), ([3], [])]
    R = len(prompts)
    z = scores_for(V, R, 6)
    rows = [Row(GenerationOptions(bad_words_ids=words), p, t, banned=tuple(words)) for p, t in prompts]
    want = hf_rows(hf.NoBadWordsLogitsProcessor([list(w) for w in words], eos_token_id=EOS), rows, z)
    got = process(z, rows)
    assert_same_scores(got, want)
    # multi-token words banned exactly where their prefix ends the history
    assert np.isneginf(got[0, 4]) and np.isneginf(got[2, 9]) and np.isneginf(got[6, EOS])
    assert np.isfinite(got[1, 4]) and np.isfinite(got[4, 9]) and np.isfinite(got[0, 9])
    assert np.isneginf(got[9, 9]) and np.isneginf(got[10, 4])  # the history is exactly the word's prefix


@pytest.mark.parametrize("V", V_CASES)
@pytest.mark.parametrize("enders", [{EOS}, {EOS, 17}])
def test_min_new_tokens_equals_transformers(V, enders):
    k = 4
    R = 8
    z = scores_for(V, R, 7)
    rows = []
    for r in range(R):
        prompt = list(range(1, 2 + r % 3))  # prompts of 1..3 tokens; new tokens 0..7
        rows.append(Row(GenerationOptions(min_new_tokens=k), prompt, [9] * r, enders=set(enders)))
    want = []
    for r, zr in zip(rows, z):
        proc = hf.MinNewTokensLengthLogitsProcessor(len(r.prompt), k, sorted(enders))
        want.append(proc(torch.tensor([r.prompt + r.tokens]), torch.tensor(zr[None], dtype=torch.float64))[0].numpy())
    want = np.stack(want)
    got = process(z, rows)
    assert_same_scores(got, want)
    assert [bool(np.isneginf(got[i, EOS])) for i in range(R)] == [i < k for i in range(R)]


@pytest.mark.parametrize("V", V_CASES)
def test_logit_bias_equals_sequence_bias(V):
    bias = {3: 5.0, 0: -100.0, V - 1: 100.0, 42: -2.5, 7: 0.25}
    R = 5
    z = scores_for(V, R, 8)
    rows = [Row(GenerationOptions(logit_bias=bias), p, t) for p, t in histories(V, R, 9)]
    want = hf_rows(hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]), rows, z)
    assert_same_scores(process(z, rows), want)


@pytest.mark.parametrize("V", V_CASES)
@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.2, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_are_openais(V, presence, frequency):
    R = 7
    z = scores_for(V, R, 10)
    rows = [Row(GenerationOptions(presence_penalty=presence, frequency_penalty=frequency), p, t)
            for p, t in histories(V, R, 11)]
    got = process(z, rows)
    for i, r in enumerate(rows):
        c = np.bincount(np.array(r.tokens, np.int64), minlength=V).astype(np.float64)  # new tokens only
        want = z[i].astype(np.float64) - c * frequency - (c > 0) * presence
        np.testing.assert_allclose(got[i], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("V", V_CASES)
def test_rows_with_different_processors_in_one_call(V):
    """One process() call over rows with different options (some none) equals each row alone through
    transformers' processors in GenerationOptions' order (repetition, OpenAI penalties, bias, bad words,
    min_new_tokens, n-grams)."""
    words = ((3, 4), (6,))
    opts = [GenerationOptions(),
            GenerationOptions(repetition_penalty=1.4, no_repeat_ngram_size=2),
            GenerationOptions(),
            GenerationOptions(logit_bias={5: 3.0, 2: -1.0}, min_new_tokens=6, presence_penalty=0.3,
                              frequency_penalty=0.2),
            GenerationOptions(bad_words_ids=words, repetition_penalty=0.9, no_repeat_ngram_size=3),
            GenerationOptions(min_new_tokens=1)]
    hist = histories(V, len(opts), 12)
    z = scores_for(V, len(opts), 13)
    rows = [Row(o, p, t, banned=words if o.bad_words_ids else ()) for o, (p, t) in zip(opts, hist)]
    got = process(z, rows)
    for i, (r, o) in enumerate(zip(rows, opts)):
        ids = torch.tensor([r.prompt + r.tokens])
        s = torch.tensor(z[i][None], dtype=torch.float64)
        if o.repetition_penalty != 1:
            s = hf.RepetitionPenaltyLogitsProcessor(o.repetition_penalty)(ids, s)
        c = torch.bincount(torch.tensor(r.tokens, dtype=torch.int64), minlength=V).double()
        s = s - c * o.frequency_penalty - (c > 0) * o.presence_penalty
        if o.logit_bias:
            s = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in o.logit_bias.items()])(ids, s)
        if o.bad_words_ids:
            s = hf.NoBadWordsLogitsProcessor([list(w) for w in o.bad_words_ids], eos_token_id=EOS)(ids, s)
        if o.min_new_tokens:
            s = hf.MinNewTokensLengthLogitsProcessor(len(r.prompt), o.min_new_tokens, EOS)(ids, s)
        if o.no_repeat_ngram_size:
            s = hf.NoRepeatNGramLogitsProcessor(o.no_repeat_ngram_size)(ids, s)
        assert_same_scores(got[i : i + 1], s.numpy())
        if not o.processed:
            np.testing.assert_array_equal(got[i], z[i])


# ---- 2. warpers: filter_logits vs transformers' LogitsWarpers ----------------------------------------
WARPS = [
    dict(temperature=1.0, top_k=50),
    dict(temperature=0.6, top_k=5),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=2.0, top_p=0.5),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=0.8, min_p=0.3),
    dict(temperature=1.0, typical_p=0.8),
    dict(temperature=0.5, typical_p=0.95),
    dict(temperature=1.7, typical_p=0.3),
    dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05),
    dict(temperature=0.8, top_k=200, top_p=0.95, min_p=0.02, typical_p=0.9),
    dict(temperature=1.0, top_p=0.8, typical_p=0.7),
    dict(temperature=1.2, min_p=0.1, typical_p=0.6),
]


def hf_warp(z: np.ndarray, o: GenerationOptions) -> np.ndarray:
    """transformers' warpers in the order generate() builds them (temperature, top-k, top-p, min-p, typical)."""
    chain = [hf.TemperatureLogitsWarper(o.temperature)]
    if o.top_k:
        chain.append(hf.TopKLogitsWarper(o.top_k))
    if o.top_p < 1:
        chain.append(hf.TopPLogitsWarper(o.top_p))
    if o.min_p > 0:
        chain.append(hf.MinPLogitsWarper(o.min_p))
    if o.typical_p < 1:
        chain.append(hf.TypicalLogitsWarper(o.typical_p))
    s = torch.tensor(z[None], dtype=torch.float64)
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in chain:
        s = w(ids, s)
    return s[0].numpy()


@pytest.mark.parametrize("V", V_CASES)
@pytest.mark.parametrize("warp", WARPS, ids=lambda w: "-".join(f"{k}{v}" for k, v in w.items()))
def test_filter_logits_equals_transformers_warpers(V, warp):
    o = GenerationOptions(**warp)
    rng = np.random.default_rng(WARPS.index(warp))
    sizes = []
    for scale in (0.5, 1.0, 2.0, 4.0) if V == 1000 else (1.0, 3.0):  # flat to peaked distributions
        z = (rng.normal(size=V) * scale).astype(np.float32)
        ids, probs = filter_logits(z, o)
        s = hf_warp(z, o)
        kept = np.flatnonzero(np.isfinite(s))
        assert sorted(ids.tolist()) == kept.tolist(), (warp, scale)
        want = torch.softmax(torch.tensor(s), 0).numpy()
        np.testing.assert_allclose(probs, want[ids], atol=1e-6, rtol=0)
        assert np.all(np.diff(probs) <= 1e-12)  # most likely first
        sizes.append(len(ids))
    assert any(1 < k < V for k in sizes), sizes  # the warpers really cut, and keep a choice


def check_warp(z: np.ndarray, o: GenerationOptions) -> int:
    ids, probs = filter_logits(z, o)
    s = hf_warp(z, o)
    assert sorted(ids.tolist()) == np.flatnonzero(np.isfinite(s)).tolist()
    np.testing.assert_allclose(probs, torch.softmax(torch.tensor(s), 0).numpy()[ids], atol=1e-6, rtol=0)
    return len(ids)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.995])
def test_top_p_over_the_whole_vocabulary_equals_transformers(top_p):
    """A real-sized vocabulary, flat to peaked rows: nuclei of a few tokens to tens of thousands."""
    rng = np.random.default_rng(int(top_p * 1000))
    sizes = [check_warp((rng.normal(size=50257) * scale).astype(np.float32), GenerationOptions(temperature=1.0,
                                                                                             top_p=top_p))
             for scale in (0.5, 1.5, 3.0, 6.0)]
    assert min(sizes) < 1024 < max(sizes), sizes


def test_top_p_when_the_nucleus_just_fits_or_misses_the_likeliest_1024():
    """A row whose 1024 likeliest tokens hold mass m: top_p just under m keeps at most those, just over m
    needs more; both as transformers."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=50257) * 0.01
    z[rng.permutation(50257)[:1024]] += 6.0
    z = z.astype(np.float32)
    p = torch.softmax(torch.tensor(z, dtype=torch.float64), 0).numpy()
    m = float(np.sort(p)[::-1][:1024].sum())
    assert check_warp(z, GenerationOptions(temperature=1.0, top_p=m - 1e-4)) <= 1024
    assert check_warp(z, GenerationOptions(temperature=1.0, top_p=min(m + 1e-4, 1.0))) > 1024


# ---- 3. greedy generation with processors vs transformers' generate ---------------------------------
def strip(ids: list[int], enders) -> list[int]:
    """A sequence up to and including its first ender (transformers pads after it)."""
    for i, t in enumerate(ids):
        if t in enders:
            return ids[: i + 1]
    return ids


def hf_generate(model, prompt: list[int], max_new_tokens: int, *, eos=(EOS,), **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, eos_token_id=list(eos), pad_token_id=EOS, **kw)
    seqs = out.sequences if hasattr(out, "sequences") else out
    return [strip(s[len(prompt):].tolist(), eos) for s in seqs], out


def prompts_for(engine: Engine, seed: int, count: int = 4) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    V = engine.config.vocab_size
    return [rng.integers(1, V, 2 + 3 * i).tolist() for i in range(count)]


def early_eos(engine: Engine, candidates: list[list[int]]) -> tuple[list[int], float, list[int]]:
    """(prompt, eos bias, greedy ids) for a prompt whose greedy decoding ends with eos within 6 tokens.
    Random-init and Shakespeare checkpoints rarely pick eos on their own: the search tries no bias first,
    then growing logit_bias on eos (transformers' sequence_bias for the reference), until one prompt does."""
    for bias in (0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0):
        extra = {"logit_bias": {EOS: bias}} if bias else {}
        for p, r in zip(candidates, engine.generate_batch(candidates, max_new_tokens=6, **extra)):
            if r.finish_reason == "eos" and len(r.token_ids) >= 2:
                return p, bias, r.token_ids
    raise AssertionError("no candidate prompt reaches eos early, even with a bias on eos")


def check_greedy_processors(model, engine: Engine, prompts: list[list[int]], M: int,
                            require_all: bool = False, stop: int | None = None) -> None:
    plain = [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=M)]
    for p, ids in zip(prompts, plain):  # the baseline itself
        assert ids == hf_generate(model, p, M, do_sample=False)[0][0]
    words = [w for w in ([plain[0][0]], plain[0][3:5], plain[1][2:5], plain[2][1:3]) if w and w != [EOS]]
    cases = [dict(repetition_penalty=1.5), dict(repetition_penalty=0.8),
             dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
             dict(bad_words_ids=words)]
    changed = set()
    for case in cases:
        ours = [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=M, **case)]
        for p, got in zip(prompts, ours):
            want = hf_generate(model, p, M, do_sample=False, **case)[0][0]
            assert got == want, (case, p)
        changed |= {str(case) for a, b in zip(ours, plain) if a != b}
    # each option changed some output (so that the comparison sees it); on random weights trigrams rarely repeat
    # within M tokens, so there only each family must have changed something
    families = {"repetition_penalty", "no_repeat_ngram_size", "bad_words_ids"}
    assert {f for f in families if any(f in c for c in changed)} == families, changed
    if require_all:
        assert len(changed) == len(cases), changed

    # min_new_tokens: a prompt that really reaches eos early
    p, bias, ended = early_eos(engine, prompts[::-1] + prompts_for(engine, 99, 8))
    extra = {"logit_bias": {EOS: bias}} if bias else {}
    hf_extra = {"sequence_bias": [[[EOS], bias]]} if bias else {}
    assert hf_generate(model, p, 6, do_sample=False, **hf_extra)[0][0] == ended
    for k in (len(ended), len(ended) + 3):
        got = engine.generate(p, max_new_tokens=M, min_new_tokens=k, **extra).token_ids
        assert got == hf_generate(model, p, M, do_sample=False, min_new_tokens=k, **hf_extra)[0][0], (k, bias)
        assert EOS not in got[:k] and len(got) > k - 1 and got[: len(ended) - 1] == ended[:-1]

    # min_new_tokens masks stop_token_ids too (transformers: more eos ids): a token greedy decoding produces early
    stop = stop if stop is not None else plain[0][2]
    at = plain[0].index(stop)
    for k in (0, at + 1, at + 4):
        got = engine.generate(prompts[0], max_new_tokens=M, min_new_tokens=k, stop_token_ids=[stop])
        assert got.token_ids == hf_generate(model, prompts[0], M, eos=(EOS, stop), do_sample=False,
                                            min_new_tokens=k)[0][0], k
        assert stop not in got.token_ids[:k] and (k or got.finish_reason == "stop")


def test_greedy_processors_equal_transformers(exported):
    model, engine = exported
    check_greedy_processors(model, engine, prompts_for(engine, 0), 20)


def test_greedy_processors_equal_transformers_bundled(bundled):
    model, engine = bundled
    prompts = [engine.tokenizer.encode(t) for t in ("ROMEO:\nWhat light", "First Citizen:\n", "KING HENRY",
                                                    "JULIET:\nO, swear not")]
    newline = engine.tokenizer.encode("\n")
    assert len(newline) == 1
    check_greedy_processors(model, engine, prompts, 24, require_all=True, stop=newline[0])


def test_bad_words_are_their_token_sequences_with_and_without_a_space(bundled):
    """bad_words: each word as transformers' bad_words_ids, tokenized alone and after a space."""
    model, engine = bundled
    prompt = engine.tokenizer.encode("ROMEO:\nWhat light")
    plain = engine.generate(prompt, max_new_tokens=24)
    assert " have" in plain.text and "And" in plain.text
    got = engine.generate(prompt, max_new_tokens=24, bad_words=["have", "And"])
    ids = [engine.tokenizer.encode(w) for w in ("have", " have", "And", " And")]
    assert got.token_ids == hf_generate(model, prompt, 24, do_sample=False, bad_words_ids=ids)[0][0]
    assert " have" not in got.text and "And" not in got.text


# ---- 4. beam search vs transformers' beam search ----------------------------------------------------
def check_beams(model, engine: Engine, prompts: list[list[int]], cases, M: int, tol: float,
                early: bool = True) -> None:
    """Each case: (num_beams, n, length_penalty, early_stopping, stop ids[, logit bias on eos]); our hypotheses
    (best first) have transformers' ids and sequences_scores (its sequence_bias for the bias on eos)."""
    finished_early = 0
    for B, n, lp, es, stops, *bias in cases:
        enders = (EOS, *stops)
        extra = {"logit_bias": {EOS: bias[0]}} if bias else {}
        hf_extra = {"sequence_bias": [[[EOS], bias[0]]]} if bias else {}
        res = engine.generate_batch(prompts, max_new_tokens=M, num_beams=B, n=n, length_penalty=lp, early_stopping=es,
                                    stop_token_ids=list(stops), **extra)
        assert len(res) == n * len(prompts)
        for k, p in enumerate(prompts):
            want, out = hf_generate(model, p, M, eos=enders, num_beams=B, num_return_sequences=n, length_penalty=lp,
                                    early_stopping=es, output_scores=True, return_dict_in_generate=True,
                                    do_sample=False, **hf_extra)
            mine = res[k * n : (k + 1) * n]
            case = (B, n, lp, es, stops, bias, p)
            assert [r.token_ids for r in mine] == want, case
            scores = out.sequences_scores.numpy()
            got = np.array([r.score for r in mine])
            scale = np.maximum(1.0, np.array([len(w) for w in want], float) ** max(-lp, 0))  # lp < 0 scales up
            assert np.all(np.abs(got - scores) <= tol * scale), (case, got, scores)
            assert all(np.diff(got) <= 1e-9), "best first"
            assert all(r.finish_reason == ("length" if len(r.token_ids) == M and r.token_ids[-1] not in enders
                                           else "eos" if r.token_ids[-1] == EOS else "stop") for r in mine)
            finished_early += any(len(w) < M for w in want)
    if early and any(c[4] or c[5:] for c in cases):
        assert finished_early, "no hypothesis ended before max_new_tokens: the eos cases test nothing"


def beam_cases(stop: int, bias: float) -> list:
    out = []
    lps = [1.0, 0.5, 2.0, -0.5, 0.0]
    i = 0
    for B in (2, 4, 5):
        for es in (True, False, "never"):
            for ends in ((), (stop,), ((), bias)):
                out.append((B, [1, B, 2][i % 3], lps[i % len(lps)], es, *(ends if ends[-1:] == (bias,) else (ends,))))
                i += 1
    return out


def test_beam_search_equals_transformers(exported):
    model, engine = exported
    prompts = prompts_for(engine, 1, 2)
    M = 10
    # hypotheses must finish at different lengths for early_stopping and length_penalty to matter: an id that
    # greedy decoding of the first prompt produces early is made an ender (an eos for transformers), and eos
    # itself gets the bias that makes greedy decoding of some prompt end early
    stop = next(t for t in engine.generate(prompts[0], max_new_tokens=M).token_ids[2:] if t != EOS)
    p, bias, _ = early_eos(engine, prompts + prompts_for(engine, 99, 8))
    prompts = [q for q in prompts if q != p] + [p]
    check_beams(model, engine, prompts, beam_cases(stop, bias or 1.0), M, 1e-4)
    # more enders than beams among the likeliest first tokens: transformers keeps (1 + enders) x B continuations a
    # step, so that B of them still run
    first = prompts_for(engine, 1, 2)[0]
    likely = [t for t, _ in engine.generate(first, max_new_tokens=1, logprobs=12).top_logprobs[0] if t != EOS]
    cases = [(4, 4, 2.0, "never", tuple(likely[:6])), (2, 2, 2.0, "never", tuple(likely[:3])),
             (4, 4, 1.0, False, tuple(likely[2:8]))]
    check_beams(model, engine, [first], cases, M, 1e-4, early=False)


def test_beam_search_equals_transformers_bundled(bundled):
    """Real weights (logits up to ~15): the ids exactly, the scores within 1e-4. (Budgeted at 5e-3 for ONNX vs
    torch logit differences of up to ~3e-3 per token; measured with this fp32 export: logits within 1.3e-5,
    scores within 1e-5.)"""
    model, engine = bundled
    prompts = [engine.tokenizer.encode(t) for t in ("ROMEO:\nWhat light", "KING HENRY")]
    newline = engine.tokenizer.encode("\n")
    assert len(newline) == 1
    cases = [(2, 2, 1.0, False, ()), (4, 3, 0.5, True, newline), (5, 5, 2.0, "never", newline),
             (4, 1, 1.0, "never", ()), (5, 2, -0.5, False, newline), (2, 1, 0.0, True, newline)]
    check_beams(model, engine, prompts, cases, 12, 1e-4)


BEAM_PROCESSORS = [dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.5),
                   dict(no_repeat_ngram_size=3, repetition_penalty=0.8)]


def check_beam_processors(model, engine: Engine, prompts: list[list[int]], case: dict) -> None:
    plain = engine.generate_batch(prompts, max_new_tokens=12, num_beams=3, n=3)
    res = engine.generate_batch(prompts, max_new_tokens=12, num_beams=3, n=3, **case)
    assert [r.token_ids for r in res] != [r.token_ids for r in plain], "the processors changed nothing"
    for k, p in enumerate(prompts):
        want, _ = hf_generate(model, p, 12, num_beams=3, num_return_sequences=3, do_sample=False, **case)
        assert [r.token_ids for r in res[3 * k : 3 * k + 3]] == want, (case, p)


@pytest.mark.parametrize("case", BEAM_PROCESSORS, ids=str)
def test_beam_search_with_processors_equals_transformers(exported, case):
    """transformers applies processors to the beams' log-softmax scores; so does our beam search."""
    model, engine = exported
    check_beam_processors(model, engine, prompts_for(engine, 2, 2), case)


@pytest.mark.parametrize("case", BEAM_PROCESSORS, ids=str)
def test_beam_search_with_processors_equals_transformers_bundled(bundled, case):
    model, engine = bundled
    check_beam_processors(model, engine, [engine.tokenizer.encode("ROMEO:\nWhat light")], case)


# ---- 5. rows without processors copy no logits -------------------------------------------------------
def test_only_rows_with_processors_or_sampling_request_logits(tiny, monkeypatch):
    _, engine, _, _ = tiny
    decode_rows, run_rows = [], []
    real_call, real_run = DecodeStep.__call__, engine.model.run

    def spy_call(step, tokens, logits_rows, **kw):
        decode_rows.append((len(tokens), np.asarray(logits_rows).tolist()))
        return real_call(step, tokens, logits_rows, **kw)

    def spy_run(cache, ids, *a, **kw):
        rows = kw.get("logits_rows")
        run_rows.append(list(range(len(ids))) if rows is None else np.asarray(rows).tolist())
        return real_run(cache, ids, *a, **kw)

    monkeypatch.setattr(DecodeStep, "__call__", spy_call)
    monkeypatch.setattr(engine.model, "run", spy_run)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # plain greedy: the graph's argmax, no logits at all
    before = engine.model.transfers["logits"]
    plain = [r.token_ids for r in engine.generate_batch(prompts, max_new_tokens=6, ignore_eos=True)]
    assert decode_rows and all(rows == [] for _, rows in decode_rows)
    assert run_rows and all(rows == [] for rows in run_rows)
    assert engine.model.transfers["logits"] == before
    # the same greedy rows with one n-gram row among them: only that row's logits come to the host
    decode_rows.clear()
    run_rows.clear()
    greedy = engine.sequences(prompts[:2], GenerationOptions(max_new_tokens=6, ignore_eos=True))
    ngram = engine.sequences(prompts[2:], GenerationOptions(max_new_tokens=6, ignore_eos=True, no_repeat_ngram_size=2))
    core = Core(engine.model, slots=3, max_length=16)
    core.submit(greedy + ngram)
    V = engine.config.vocab_size
    before = engine.model.transfers["logits"]
    while core.busy:
        core.step()
    assert run_rows == [[2]]  # one prefill of the three prompts, logits of the n-gram row only
    assert decode_rows == [(3, [2])] * 5
    assert engine.model.transfers["logits"] - before == 6 * V * 4  # one (V,) float32 row per token
    assert [s.tokens for s in greedy] == plain[:2]
    assert ngram[0].tokens == engine.generate(prompts[2], max_new_tokens=6, ignore_eos=True,
                                              no_repeat_ngram_size=2).token_ids


# ---- 6. best_of ------------------------------------------------------------------------------------
def test_best_of_returns_the_most_likely_samples(tiny):
    _, engine, _, _ = tiny
    prompts = [[5, 6, 7], [11, 12]]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=3)
    best = engine.generate_batch(prompts, best_of=6, n=2, **kw)
    # best_of's workers draw from default_rng([seed, p * best_of + i]), as n=6's rows p * 6 + i do
    samples = engine.generate_batch(prompts, n=6, logprobs=0, **kw)
    assert len(best) == 4
    for p in range(len(prompts)):
        mine = samples[6 * p : 6 * p + 6]
        assert len({tuple(s.token_ids) for s in mine}) > 2, "the samples should differ"
        totals = [sum(s.logprobs) for s in mine]
        order = np.argsort(totals)[::-1][:2]
        got = best[2 * p : 2 * p + 2]
        assert [g.token_ids for g in got] == [mine[i].token_ids for i in order]
        for g, i in zip(got, order):
            assert g.score == pytest.approx(totals[i], abs=1e-9)
            assert g.text == mine[i].text and g.finish_reason == mine[i].finish_reason
    # generate (one sequence) returns the single most likely of the best_of samples
    one = engine.generate(prompts[0], best_of=6, **kw)
    totals = [sum(s.logprobs) for s in samples[:6]]
    assert one.token_ids == samples[int(np.argmax(totals))].token_ids
    assert one.score == pytest.approx(max(totals), abs=1e-9)


# ---- 7. bad values are refused by name ----------------------------------------------------------------
@pytest.mark.parametrize("bad,name", [
    (dict(min_p=2), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(typical_p=0), "typical_p"),
    (dict(typical_p=1.5), "typical_p"), (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, temperature=0.7), "temperature"),
    (dict(num_beams=2, n=3), "n"), (dict(num_beams=2, best_of=2), "best_of"),
    (dict(num_beams=2, stop=["x"]), "stop"), (dict(num_beams=2, logprobs=0), "logprobs"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(length_penalty=2000.0), "length_penalty"), (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={3: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(bad_words_ids=[[]]), "bad_words_ids"), (dict(bad_words_ids=[[1, -2]]), "bad_words_ids"),
    (dict(bad_words_ids=[1, 2]), "bad_words_ids"), (dict(bad_words=[""]), "bad_words"),
    (dict(best_of=1, n=2), "best_of"), (dict(best_of=3, n=2), "best_of"),
    (dict(n=2, num_return_sequences=3), "num_return_sequences"),
])
def test_bad_options_are_refused_by_name(bad, name):
    with pytest.raises(ValueError) as e:
        GenerationOptions(**bad)
    assert str(e.value).startswith(name + " "), str(e.value)


@pytest.mark.parametrize("bad,name", [
    (dict(bad_words_ids=[[3, 1000]]), "bad_words_ids"), (dict(bad_words_ids=[[10**6]]), "bad_words_ids"),
    (dict(logit_bias={1000: 1.0}), "logit_bias"), (dict(stop_token_ids=[1000]), "stop_token_ids"),
])
def test_out_of_vocabulary_ids_are_refused_by_name(tiny, bad, name):
    _, engine, _, _ = tiny  # vocab_size 1000
    with pytest.raises(ValueError) as e:
        engine.generate([1, 2], max_new_tokens=3, **bad)
    assert str(e.value).startswith(name + " "), str(e.value)


def test_beam_search_and_best_of_do_not_stream(tiny):
    _, engine, _, _ = tiny
    for call in (lambda: engine.stream([1, 2], max_new_tokens=3, num_beams=2),
                 lambda: engine.stream_batch([[1, 2]], max_new_tokens=3, num_beams=3, n=2)):
        with pytest.raises(ValueError) as e:
            next(iter(call()))
        assert str(e.value).startswith("num_beams "), str(e.value)
    with pytest.raises(ValueError) as e:
        next(iter(engine.stream_batch([[1, 2]], max_new_tokens=3, best_of=3, temperature=1.0, seed=1)))
    assert str(e.value).startswith("best_of "), str(e.value)


def test_self_consistency_vote_equals_a_vote_by_hand(tiny):
    """Engine.vote: the same seeded samples as generate_batch(n=...), each one's answer its last regex match
    (first group), the majority answer first; the default pattern is the last number, commas dropped."""
    import re
    from collections import Counter

    from gpt2_onnx.vote import LAST_NUMBER, answer_of

    _, engine, _, _ = tiny
    v = engine.vote("the quick", n=12, answer_regex=r"\b(\w)", max_new_tokens=10, temperature=0.9, seed=5)
    samples = engine.generate_batch(["the quick"], n=12, max_new_tokens=10, temperature=0.9, seed=5)
    assert [s.token_ids for s in v.samples] == [s.token_ids for s in samples]
    by_hand = [(re.findall(r"\b(\w)", s.text) or [None])[-1] for s in samples]
    assert v.answers == by_hand
    counts = Counter(a for a in by_hand if a is not None)
    assert v.counts == dict(counts.most_common()) and v.answer == counts.most_common(1)[0][0]
    assert list(v.counts.values()) == sorted(v.counts.values(), reverse=True)
    assert answer_of("so 1,200 apples, then 7 and finally -3.5 left", re.compile(LAST_NUMBER)) == "-3.5"
    assert answer_of("12,345 in all.", re.compile(LAST_NUMBER)) == "12345"
    assert answer_of("no number", re.compile(LAST_NUMBER)) is None
    with pytest.raises(ValueError, match="answer_regex is not a valid regular expression"):
        engine.vote("x", n=2, answer_regex="(")
