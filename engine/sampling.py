"""Token choice apart from the model: greedy or sampled (temperature, top-k, top-p, min-p, typical-p),
log-probabilities. Each function reads the options it needs from a GenerationOptions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.errors import InvalidInput

if TYPE_CHECKING:
    from gpt2_onnx.types import GenerationOptions


def log_softmax(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    x = x.astype(dtype) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_n(lp: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely (token id, log p) of one row of log-probabilities, best first."""
    if not n:
        return ()
    ids = np.argpartition(-lp, n - 1)[:n] if n < len(lp) else np.arange(len(lp))
    ids = ids[np.argsort(-lp[ids], kind="stable")]
    return tuple((int(i), float(lp[i])) for i in ids)


NON_FINITE = "the model produced non-finite logits (NaN or infinity); check the model and its dtype"
NUCLEUS_FIRST = 1024  # top-p looks at this many most likely tokens first


def filter_logits(logits: np.ndarray, p: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
    """Temperature, then top-k, top-p, min-p and typical-p (transformers' warpers, in that order); returns
    (candidate ids, their probabilities), most likely first.

    Softmax with the maximum subtracted, so any temperature >= GREEDY_BELOW stays finite.
    """
    z = logits.astype(np.float64) / p.temperature
    V = z.shape[-1]
    if 0 < p.top_k < V:
        ids = np.argpartition(-z, p.top_k - 1)[: p.top_k]
        zs = z[ids]
        order = np.argsort(-zs, kind="stable")
        ids, zs = ids[order], zs[order]
        e, total = np.exp(zs - zs[0]), None
    else:
        e = np.exp(z - z.max())  # (V,); masked tokens (processors: -inf) get 0
        total, ids = e.sum(), None
        if p.top_p < 1.0 and V > NUCLEUS_FIRST:  # the nucleus is usually among the most likely 1024: sort those
            part = np.argpartition(-z, NUCLEUS_FIRST - 1)[:NUCLEUS_FIRST]
            ids = part if e[part].sum() >= p.top_p * total * (1 + 1e-9) else None
        ids = np.arange(V) if ids is None else ids
        ids = ids[np.argsort(-z[ids], kind="stable")]
        zs, e = z[ids], e[ids]
    finite = max(int(np.isfinite(zs).sum()), 1)  # masked tokens are never candidates
    ids, probs = ids[:finite], e[:finite]
    probs = probs / (probs.sum() if total is None else total)
    if p.top_p < 1.0:
        # smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p, side="left")) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    if p.min_p > 0:  # tokens less likely than min_p x the most likely one go
        keep = int((probs >= p.min_p * probs[0]).sum())
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    if p.typical_p < 1.0:  # the tokens whose surprise is closest to the entropy, up to typical_p of the mass
        lp = np.log(probs)
        shift = np.abs(-lp - -(probs * lp).sum())
        by = np.argsort(shift, kind="stable")
        last = min(int((np.cumsum(probs[by]) < p.typical_p).sum()), len(by) - 1)
        kept = shift <= shift[by[last]]
        kept[by[0]] = True
        ids, probs = ids[kept], probs[kept] / probs[kept].sum()
    return ids, probs


def choose(logits: np.ndarray, p: GenerationOptions, rng: np.random.Generator | None,
           scores: np.ndarray | None = None) -> int:
    """Pick one token id for one row from its logits (V,), or from its processed scores when given;
    ValueError if the logits are not finite or the processors leave no token."""
    if not np.isfinite(logits).all():
        raise ValueError(NON_FINITE)
    z = logits if scores is None else scores
    if scores is not None and not np.isfinite(scores).any():
        raise InvalidInput("the logits processors masked every token (bad_words, logit_bias, no_repeat_ngram_size, a "
                         "constraint, min_new_tokens): loosen them")
    if p.greedy:
        return int(np.argmax(z))
    ids, probs = filter_logits(z, p)
    return int(ids[rng.choice(len(ids), p=probs)] if len(ids) > 1 else ids[0])
