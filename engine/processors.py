"""Logits processors of the one core, applied to the rows of a step together, in GenerationOptions' order:
repetition_penalty, presence and frequency penalties, logit_bias, bad words, min_new_tokens,
no_repeat_ngram_size, and last a structured-output constraint's mask. Definitions are transformers'
(RepetitionPenalty, NoBadWords, MinNewTokensLength, NoRepeatNGram logits processors) and OpenAI's
(presence/frequency over the new tokens, logit_bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from gpt2_onnx.constraints import Constraint
    from gpt2_onnx.types import GenerationOptions


class Row(Protocol):
    """What a processor reads of a row (a Sequence, or a beam of one)."""

    options: GenerationOptions
    tokens: list[int]  # new tokens
    enders: set[int]  # eos (unless ignore_eos) and stop_token_ids
    banned: tuple[tuple[int, ...], ...]  # bad words as token id sequences
    constraint: Constraint | None  # structured output: the tokens allowed next

    def history(self) -> np.ndarray: ...  # (L,) the real context ids and the new tokens


def _scatter(rows: list[int], cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flat (row index, column index) arrays for per-row column lists."""
    r = np.concatenate([np.full(len(c), i, np.int64) for i, c in zip(rows, cols)]) if rows else np.empty(0, np.int64)
    c = np.concatenate(cols).astype(np.int64) if rows else np.empty(0, np.int64)
    return r, c


def banned_words(row: Row, history: np.ndarray) -> list[int]:
    """Last tokens of the bad words whose other tokens end the history (single tokens always)."""
    out = []
    for w in row.banned:
        k = len(w) - 1
        if k == 0 or (len(history) >= k and tuple(history[len(history) - k:].tolist()) == w[:-1]):
            out.append(w[-1])
    return out


def banned_ngrams(history: np.ndarray, n: int) -> np.ndarray:
    """Tokens that would repeat an n-gram of the history (transformers' NoRepeatNGramLogitsProcessor)."""
    if len(history) < n:
        return np.empty(0, np.int64)
    if n == 1:
        return np.unique(history)
    grams = sliding_window_view(history, n)  # (L - n + 1, n)
    hit = (grams[:, :-1] == history[len(history) - n + 1:]).all(axis=1)
    return np.unique(grams[hit, -1])


def process(scores: np.ndarray, rows: list[Row], dtype: type = np.float64) -> np.ndarray:
    """Each row's processors applied to scores (R, V) (logits, or log-probabilities in beam search);
    returns a copy in dtype. Rows whose options enable no processor come back unchanged."""
    z = scores.astype(dtype)  # (R, V)
    active = [i for i, r in enumerate(rows) if r.options.processed]
    if not active:
        return z
    hist = {i: rows[i].history() for i in active  # only the processors that look at the whole history
            if rows[i].options.repetition_penalty != 1.0 or rows[i].banned or rows[i].options.no_repeat_ngram_size}

    pen = [i for i in active if rows[i].options.repetition_penalty != 1.0]
    if pen:
        ri, ci = _scatter(pen, [np.unique(hist[i]) for i in pen])
        p = np.array([rows[i].options.repetition_penalty for i in pen])[np.searchsorted(pen, ri)]
        v = z[ri, ci]
        z[ri, ci] = np.where(v < 0, v * p, v / p)

    openai = [i for i in active if rows[i].options.presence_penalty or rows[i].options.frequency_penalty]
    for i in openai:
        if rows[i].tokens:
            ids, counts = np.unique(np.asarray(rows[i].tokens, np.int64), return_counts=True)
            o = rows[i].options
            z[i, ids] -= counts * o.frequency_penalty + o.presence_penalty

    biased = [i for i in active if rows[i].options.logit_bias]
    if biased:
        ri, ci = _scatter(biased, [np.fromiter(rows[i].options.logit_bias, np.int64) for i in biased])
        z[ri, ci] += np.concatenate([np.fromiter(rows[i].options.logit_bias.values(), np.float64) for i in biased])

    masks: list[tuple[int, np.ndarray]] = []
    for i in active:
        r, o = rows[i], rows[i].options
        if r.banned:
            masks.append((i, np.asarray(banned_words(r, hist[i]), np.int64)))
        if len(r.tokens) < o.min_new_tokens and r.enders:
            masks.append((i, np.fromiter(r.enders, np.int64)))
        if o.no_repeat_ngram_size:
            masks.append((i, banned_ngrams(hist[i], o.no_repeat_ngram_size)))
    if masks:
        ri, ci = _scatter([i for i, _ in masks], [c for _, c in masks])
        z[ri, ci] = -np.inf
    for i in active:  # structured output: what the constraint does not allow, last, so nothing lifts it
        if rows[i].constraint is not None:
            np.putmask(z[i], ~rows[i].constraint.allowed(), -np.inf)  # in place, no index arrays
    return z
