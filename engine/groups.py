"""Groups: one prompt's sequences that decode together in the core and report fewer rows.

BeamSearch (num_beams): B worker rows hold the running beams; each step scores B x V continuations,
keeps the best B (their KV rows forked on the device by the core) and the best finished hypotheses,
exactly as transformers' beam search does; the outputs get the top hypotheses with their scores.
BestOf (best_of): best_of sampled workers; the outputs get the ones with the highest cumulative log p.
Workers report nothing themselves: a group turns their ends into its outputs' Steps.
"""

from __future__ import annotations

import time

import numpy as np

from gpt2_onnx.processors import process
from gpt2_onnx.sampling import NON_FINITE, log_softmax
from gpt2_onnx.sequence import Sequence
from gpt2_onnx.types import Step

DROPPED = -1.0e9  # transformers' score for a continuation that cannot be kept


class Group:
    """Workers (rows in the core) decoding for outputs (what the caller sees)."""

    def __init__(self, workers: list[Sequence], outputs: list[Sequence]):
        self.workers, self.outputs = workers, outputs
        self.ended = False
        for w in workers:
            w.group = self
            w.needs_logits = True  # a group reads every row's logits (scores, cumulative log p)
        for o in outputs:
            o.workers = workers

    @property
    def cancelled(self) -> bool:
        return any(o.cancelled for o in self.outputs)

    def on_step(self, worker: Sequence, step: Step) -> list[tuple[Sequence, Step]]:
        """A worker's Step; returns the outputs' Steps it causes. A worker's failure or cancellation ends
        every output with it and cancels the other workers."""
        if step.finish_reason not in ("error", "cancelled") or self.ended:
            return []
        self.ended = True
        for w in self.workers:
            w.cancelled = True
        return [(o, o.end(step.finish_reason, step.error)) for o in self.outputs]

    def _report(self) -> list[tuple[Sequence, Step]]:
        self.ended = True
        return [(o, Step(o.row, len(o.tokens) - 1, o.tokens[-1] if o.tokens else -1, o.text, o.finish_reason,
                         time.perf_counter() - o.t_submit)) for o in self.outputs]


class BestOf(Group):
    """best_of samples of one prompt; the outputs are the n with the highest cumulative log p, best first."""

    def on_step(self, worker: Sequence, step: Step) -> list[tuple[Sequence, Step]]:
        if step.finish_reason in ("error", "cancelled"):
            return super().on_step(worker, step)
        if step.finish_reason is None or self.ended or not all(w.done for w in self.workers):
            return []
        ranked = sorted(self.workers, key=lambda w: -w.cumulative_logprob)
        for o, w in zip(self.outputs, ranked):
            o.adopt(w)
            o.score = w.cumulative_logprob
        return self._report()


class BeamSearch(Group):
    """transformers' beam search (GenerationMixin._beam_search) for one prompt, in numpy.

    `running` lists the workers in beam order (best first); advance() takes their logits (B, V) and
    returns the next beams as (parent index in `running`, token); the core forks the KV rows.
    """

    def __init__(self, workers: list[Sequence], outputs: list[Sequence]):
        super().__init__(workers, outputs)
        o = workers[0].options
        self.B, self.max_new, self.lp, self.early = o.num_beams, o.max_new_tokens, o.length_penalty, o.early_stopping
        self.enders = np.fromiter(workers[0].enders, np.int64)
        self.keep = max(2, 1 + len(self.enders)) * self.B  # continuations scored per step
        self.running = list(workers)
        self.scores = np.full(self.B, DROPPED)  # running beams' sums of log p
        self.scores[0] = 0.0  # the B rows start identical: only the first one's continuations count
        self.alive = np.ones(self.B, bool)
        self.finished: list[list[int]] = [[] for _ in range(self.B)]
        self.finished_scores = np.full(self.B, DROPPED)
        self.is_finished = np.zeros(self.B, bool)
        self.improvable = True
        self.generated = 0
        self.done = False
        self.t_first: float | None = None

    def advance(self, logits: np.ndarray) -> list[tuple[int, int]]:
        """One step from the running beams' logits (B, V): the next beams, best first."""
        B, V = logits.shape
        if not np.isfinite(logits).all():
            raise ValueError(NON_FINITE)
        lp = log_softmax(logits, np.float32)  # fp32, as transformers scores beams
        if any(w.options.processed for w in self.running):  # on log-probabilities, as in transformers
            lp = process(lp, self.running, np.float32)
        acc = (lp + self.scores[:, None].astype(np.float32)).reshape(-1)  # (B * V,)
        top = np.argpartition(-acc, self.keep - 1)[: self.keep]
        top = top[np.argsort(-acc[top], kind="stable")]
        top_lp, parent, token = acc[top], top // V, top % V
        g = self.generated + 1  # new tokens in these continuations
        hits = np.isin(token, self.enders) | (g >= self.max_new)
        if self.running[0].constraint is not None:  # a continuation that completes its constraint ends there
            self._completing(hits, parent, token, np.isfinite(top_lp))
        seqs = [self.running[k].tokens + [int(t)] for k, t in zip(parent, token)]

        top_lp = top_lp.astype(np.float64)
        run_lp = top_lp + hits * DROPPED
        nxt = np.argsort(-run_lp, kind="stable")[: self.B]
        self.scores = run_lp[nxt]
        self.alive = np.isfinite(self.scores)  # a beam whose masks left it nothing is -inf: it takes no token

        just = hits & (np.arange(self.keep) < self.B)  # only the best B may finish
        cand = top_lp / (g ** self.lp)
        cand = cand + DROPPED * ((self.is_finished.all() and self.early is True) + (not self.improvable) + ~just)
        merged = np.concatenate([self.finished_scores, cand])
        best = np.argsort(-merged, kind="stable")[: self.B]
        pool = self.finished + seqs
        flags = np.concatenate([self.is_finished, just])
        self.finished = [pool[i] for i in best]
        self.finished_scores, self.is_finished = merged[best], flags[best]

        self.generated = g
        longest = self.max_new if self.early == "never" and self.lp > 0 else g
        worst = self.finished_scores.min() if self.is_finished.all() else DROPPED
        self.improvable = self.improvable and bool(self.scores[0] / (longest ** self.lp) > worst)
        self.done = not (self.improvable and not (self.is_finished.all() and self.early is True) and not hits.all())
        self.t_first = self.t_first or time.perf_counter()
        return [(int(parent[j]), int(token[j])) for j in nxt]

    def _completing(self, hits: np.ndarray, parent: np.ndarray, token: np.ndarray, finite: np.ndarray) -> None:
        """Mark (in hits) the candidates, best first, whose token completes their beam's constraint: those
        that may finish (the best B) and those taken until B continue."""
        going = 0
        for j in range(len(hits)):
            if going >= self.B and j >= self.B:
                break
            if not hits[j] and finite[j]:
                hits[j] = self.running[parent[j]].constraint.completes(int(token[j]))
            going += not hits[j]

    def finish(self) -> list[tuple[Sequence, Step]]:
        """The outputs get the best hypotheses (tokens, text, finish reason, score), best first."""
        for o, tokens, score in zip(self.outputs, self.finished, self.finished_scores):
            o.replay(tokens, self.t_first)
            o.score = float(score)
        for w in self.workers:
            w.finish_reason = w.finish_reason or "length"
        return self._report()
