"""Token choice: greedy or sampled (temperature, top-k, top-p, repetition penalty), apart from the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / T would overflow float64


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 (or below 1e-5, or top_k 1) means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        checks = [
            (isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
             and math.isfinite(self.temperature) and 0 <= self.temperature <= 100,
             f"temperature must be in [0, 100] (0 = greedy), got {self.temperature!r}"),
            (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (isinstance(self.top_p, (int, float)) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.repetition_penalty, (int, float)) and not isinstance(self.repetition_penalty, bool)
             and 0.01 <= self.repetition_penalty <= 100,
             f"repetition_penalty must be in [0.01, 100] (1 = off), got {self.repetition_penalty!r}"),
            (self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0),
             f"seed must be a non-negative integer, got {self.seed!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF/CTRL repetition penalty on the ids in `seen`: positive logits / p, negative * p."""
    if penalty == 1.0 or not len(seen):
        return logits
    out = logits.astype(np.float64)  # a copy, wide enough that dividing by the penalty cannot overflow
    ids = np.unique(seen)
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def filter_logits(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
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


def choose(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator | None,
           seen: np.ndarray | None = None) -> int:
    """Pick one token id from logits (V,) for one row; ValueError if the logits are not finite."""
    if not np.isfinite(logits).all():
        raise ValueError("the model produced non-finite logits (NaN or infinity); check the model and its dtype")
    z = penalize(logits, seen if seen is not None else np.empty(0, np.int64), p.repetition_penalty)
    if p.greedy:
        return int(np.argmax(z))
    ids, probs = filter_logits(z, p)
    return int(ids[rng.choice(len(ids), p=probs)] if len(ids) > 1 else ids[0])
