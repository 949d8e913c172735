"""Token choice apart from the model: greedy or sampled (temperature, top-k, top-p), repetition penalty,
log-probabilities. Each function reads the options it needs from a GenerationOptions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gpt2_onnx.types import GenerationOptions


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_n(lp: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, log p) of one row of log-probabilities, best first."""
    if not n:
        return ()
    ids = np.argpartition(-lp, n - 1)[:n] if n < len(lp) else np.arange(len(lp))
    ids = ids[np.argsort(-lp[ids], kind="stable")]
    return tuple((int(i), float(lp[i])) for i in ids)


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF/CTRL repetition penalty on the ids in `seen`: positive logits / p, negative * p."""
    if penalty == 1.0 or not len(seen):
        return logits
    out = logits.astype(np.float64)  # a copy, wide enough that dividing by the penalty cannot overflow
    ids = np.unique(seen)
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def filter_logits(logits: np.ndarray, p: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, then top-k, then top-p; returns (candidate ids, their probabilities).

    Softmax with the maximum subtracted, so any temperature >= GREEDY_BELOW stays finite.
    """
    z = logits.astype(np.float64) / p.temperature
    V = z.shape[-1]
    if 0 < p.top_k < V:
        ids = np.argpartition(-z, p.top_k - 1)[: p.top_k]
    else:
        ids = np.arange(V)
    zs = z[ids]
    order = np.argsort(-zs, kind="stable")
    ids, zs = ids[order], zs[order]
    probs = np.exp(zs - zs[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def choose(logits: np.ndarray, p: GenerationOptions, rng: np.random.Generator | None,
           seen: np.ndarray | None = None) -> int:
    """Pick one token id from logits (V,) for one row; ValueError if the logits are not finite."""
    if not np.isfinite(logits).all():
        raise ValueError("the model produced non-finite logits (NaN or infinity); check the model and its dtype")
    z = penalize(logits, seen if seen is not None else np.empty(0, np.int64), p.repetition_penalty)
    if p.greedy:
        return int(np.argmax(z))
    ids, probs = filter_logits(z, p)
    return int(ids[rng.choice(len(ids), p=probs)] if len(ids) > 1 else ids[0])
