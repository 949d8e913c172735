"""Scoring with the ONNX engine: continuations after contexts (Engine.score), held-out loss of a text."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.errors import option_error
from gpt2_onnx.sampling import log_softmax
from gpt2_onnx.types import Score

if TYPE_CHECKING:
    from gpt2_onnx.sync_engine import Engine, Prompt

MAX_SCORE_LOGITS = 1 << 25  # logits (rows x positions x vocab) held at once while scoring: 128 MB of float32


def score(engine: Engine, requests: Sequence[tuple[Prompt, Prompt]]) -> list[Score]:
    """Score (context, continuation) pairs of texts or id lists: ragged rows in one forward each batch,
    no generation (CTranslate2's score_batch, lm-evaluation-harness's loglikelihood).

    Context and continuation are tokenized separately; an empty context starts from <|endoftext|>.
    """
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise ValueError("requests must be a list of (context, continuation) pairs")
    pairs = []
    for r in requests:
        if not isinstance(r, (tuple, list)) or len(r) != 2:
            raise ValueError(f"each request must be a (context, continuation) pair, got {r!r}")
        ctx, cont = engine.encode(r[0]), engine.encode(r[1], empty_ok=True)
        if not cont:
            raise ValueError(f"the continuation of {r!r} is empty: there is nothing to score")
        engine.check_length(len(ctx) + len(cont), 0)
        pairs.append((ctx, cont))
    out: list[Score | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    V, batch = engine.config.vocab_size, []

    def flush() -> None:
        rows = [pairs[i] for i in batch]
        lens = np.array([len(c) + len(t) for c, t in rows])
        K = max(len(t) for _, t in rows)
        ids = np.zeros((len(rows), lens.max()), np.int64)  # right-padded (B, S)
        index = np.zeros((len(rows), K), np.int64)  # (B, K): the positions that predict each continuation token
        for b, (c, t) in enumerate(rows):
            ids[b, : lens[b]] = c + t
            index[b] = np.minimum(np.arange(len(c) - 1, len(c) - 1 + K), lens[b] - 2)
        cache = engine.model.new_cache(len(rows), int(lens.max()))
        logits = engine.model.forward(ids, lens, cache, index)  # (B, K, V)
        for b, (c, t) in enumerate(rows):
            lg, tok = logits[b, : len(t)], np.asarray(t)  # (len(t), V), (len(t),)
            out[batch[b]] = Score(list(t), log_softmax(lg)[np.arange(len(t)), tok].tolist(),
                                  (lg.argmax(-1) == tok).tolist())
        batch.clear()

    for i in order:
        c, t = pairs[i]
        # ascending total length: this pair is the batch's longest
        if batch and (len(batch) + 1) * (len(c) + len(t)) * V > MAX_SCORE_LOGITS:
            flush()
        batch.append(i)
    if batch:
        flush()
    return out


@dataclass(frozen=True)
class EvalResult:
    """Cross-entropy of the text under the model."""

    nats_per_token: float
    nats_per_char: float
    perplexity: float
    tokens: int  # tokens in the text (all but the first are predicted)
    chars: int
    top1: np.ndarray  # argmax prediction at every predicted position (for agreement between exports)


def evaluate(engine: Engine, text: str, *, window: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Loss over `text` in windows of n_positions tokens that overlap by one, so each token but the
    first is predicted exactly once, with up to window-1 tokens of context."""
    ids = engine.tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s); evaluation needs at least 2")
    n = window or engine.config.n_positions
    if not 2 <= n <= engine.config.n_positions:
        raise option_error("window", f"must be in 2..n_positions ({engine.config.n_positions}), got {n}")
    starts = list(range(0, len(ids) - 1, n - 1))
    total, count, top1 = 0.0, 0, []
    for k, s in enumerate(starts):
        w = np.array(ids[s : s + n], dtype=np.int64)
        cache = engine.model.new_cache(1, len(w))
        logits = engine.model.forward(w[None], np.array([len(w)]), cache, np.arange(len(w) - 1)[None])[0]  # (S-1, V)
        lp = log_softmax(logits)
        total -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
        top1.append(logits.argmax(-1))
        if progress:
            progress(k + 1, len(starts))
    return EvalResult(total / count, total / len(text), math.exp(total / count), len(ids), len(text),
                      np.concatenate(top1))
