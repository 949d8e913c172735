"""Held-out loss of a model on a text, computed by the ONNX engine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpt2_onnx.engine import Engine
from gpt2_onnx.sampling import log_softmax


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
        raise ValueError(f"window must be in 2..n_positions ({engine.config.n_positions}), got {n}")
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
