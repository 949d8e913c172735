"""Per-sequence state of the one generation core: context ids, new tokens, RNG, text and stop holder,
finish rule, log-probabilities, timings."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq

import numpy as np

from gpt2_onnx.constraints import Constraint
from gpt2_onnx.processors import process
from gpt2_onnx.sampling import NON_FINITE, choose, log_softmax, top_n
from gpt2_onnx.tokenizer import TextStream, Tokenizer
from gpt2_onnx.types import GenerationOptions, GenerationResult, Lora, Prefix, Step


class StopText:
    """Holds back text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.buf += delta
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Sequence:
    """One sequence being generated. Seeded sequences draw from numpy's default_rng([seed, row]).

    `on_step` is called (in the core's thread) with every Step; `held` (set by its consumer) keeps the
    sequence from decoding while its consumer is behind; `slot` is its row of the core's KV pool. Virtual
    tokens (a prefix-tuning adapter's) lead the context with ids below zero. `lora`: the LoRA adapter its
    row runs with (None: the base model).
    """

    def __init__(self, context: list[int], options: GenerationOptions, *, row: int, eos_token_id: int | None,
                 tokenizer: Tokenizer | None = None, on_step: Callable[[Step], None] | None = None,
                 prefix: Prefix | None = None, banned: tuple[tuple[int, ...], ...] = (),
                 constraint: Constraint | None = None, lora: Lora | None = None):
        self.context, self.options, self.row = context, options, row
        self.banned = banned  # bad words as token id sequences
        self.constraint = constraint  # structured output: the tokens allowed next, advanced by push
        self.group = None  # the Group (beam search, best_of) it decodes for, if any
        self.workers = [self]  # the sequences the core runs for this one (its group's, once per group)
        self.join = 1  # this and the next join - 1 waiting sequences join the core in one step (0: follows one)
        self.ticket = 0  # the request (Core.submit call) it came with: requests take free rows in turns
        self.cumulative_logprob = 0.0  # sum of log p of the new tokens (kept for best_of and beams)
        self.score: float | None = None  # a beam hypothesis' score, or best_of's cumulative log p
        self.prefix = prefix  # the KV of context's first tokens, computed once (prefill, a prefix adapter)
        self.virtual = prefix.virtual if prefix is not None else 0  # no text, no repetition penalty
        self.lora = lora
        self.lora_key = lora.key if lora is not None else 0  # the prefix cache's tag for its KV
        self.enders = set(options.stop_token_ids) | ({eos_token_id} if eos_token_id is not None
                                                      and not options.ignore_eos else set())
        self.eos_token_id = None if options.ignore_eos else eos_token_id
        self.rng = np.random.default_rng(None if options.seed is None else [options.seed, row])
        self.stream = TextStream(tokenizer, context[self.virtual:][-5:]) if tokenizer is not None else None
        self.stop = StopText(options.stop)
        self.on_step = on_step
        self.held = False
        self.held_since = 0.0  # time.monotonic() when it was last held
        self.cancel_error: Exception | None = None  # why it is cancelled, when not by its caller (ReadTimeout)
        self.slot = -1
        self.first: tuple[int, np.ndarray | None] | None = None  # while admitted: its prefill's (greedy id, logits)
        self.share_logits = False  # while admitted: a copy of its context samples from its first logits
        self.tokens: list[int] = []
        self.text_parts: list[str] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.prompt_logprobs: list[float | None] = []  # with prompt_logprobs: one per context token, the first None
        self.prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self._cancelled = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_last: float | None = None
        # plain greedy needs no logits on the host: the graph's argmax output is enough
        self.needs_logits = not options.greedy or options.processed or options.logprobs is not None

    @property
    def cancelled(self) -> bool:
        """Cancelled by its caller, or (a group's worker) its group's outputs were."""
        return self._cancelled or (self.group is not None and self.group.cancelled)

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = value

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def history(self) -> np.ndarray:
        """(L,) the real context ids and the new tokens (what repetition processors look at)."""
        return np.array(self.context[self.virtual:] + self.tokens, np.int64)

    def choose(self, greedy_id: int, logits: np.ndarray | None, scores: np.ndarray | None = None) -> int:
        """The next token: the graph's argmax, or a choice from this row's logits (V,) after its processors
        (`scores`, when the step computed them for all its rows together)."""
        if logits is None:
            if greedy_id < 0:  # the graph marks a row whose best logit is not finite
                raise ValueError(NON_FINITE)
            return int(greedy_id)
        if scores is None and self.options.processed:
            scores = process(logits[None], [self])[0]
        tok = choose(logits, self.options, self.rng, scores)
        if self.options.logprobs is not None or self.group is not None:  # under the model's own distribution
            lp = log_softmax(logits)
            self.cumulative_logprob += float(lp[tok])
            if self.options.logprobs is not None:
                self.logprobs.append(float(lp[tok]))
                self.top_logprobs.append(top_n(lp, self.options.logprobs))
        return tok

    def score_prompt(self, logits: np.ndarray, skip: int = 0) -> None:
        """Prompt logprobs from the logits (S - skip, V) of the context positions after the first skip; those
        first skip tokens (and the one after them, which no run here predicts) get none."""
        n, ids = self.options.prompt_logprobs, self.context
        self.prompt_logprobs, self.prompt_top_logprobs = [None] * (skip + 1), [None] * (skip + 1)
        for at in range(0, len(ids) - skip - 1, 64):  # (64, V) at a time: float64 log_softmax of long prompts is big
            lp = log_softmax(logits[at : min(at + 64, len(ids) - skip - 1)])
            for k, row in enumerate(lp):
                self.prompt_logprobs.append(float(row[ids[skip + at + k + 1]]))
                self.prompt_top_logprobs.append(top_n(row, n))

    def push(self, tok: int) -> Step:
        """Append a token and apply the finish rule: a stop string, then eos / a stop token id, then a
        complete constraint ("stop"), then max_new_tokens. An eos or stop token id adds no text."""
        self.tokens.append(tok)
        delta, hit = "", False
        complete = self.constraint is not None and self.constraint.advance(tok)
        ender = tok in self.enders
        if self.stream is not None and not ender:
            delta, hit = self.stop.push(self.stream.push(tok))
        if hit:
            self.finish_reason = "stop"
        elif ender:
            self.finish_reason = "eos" if tok == self.eos_token_id else "stop"
        elif complete:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.options.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason and not hit and self.stream is not None:  # text held back until now
            tail, hit = self.stop.push(self.stream.flush())
            delta += tail if hit else tail + self.stop.flush()
            self.finish_reason = "stop" if hit else self.finish_reason
        now = time.perf_counter()
        self.t_first, self.t_last = self.t_first or now, now
        self.text_parts.append(delta)
        on = self.options.logprobs is not None
        return Step(self.row, len(self.tokens) - 1, tok, delta, self.finish_reason, now - self.t_submit,
                    self.logprobs[-1] if on else None, self.top_logprobs[-1] if on else None)

    def adopt(self, other: "Sequence") -> None:
        """Take another (finished) sequence's tokens, text, log-probabilities and end (best_of)."""
        self.tokens, self.text_parts = list(other.tokens), list(other.text_parts)
        self.logprobs, self.top_logprobs = list(other.logprobs), list(other.top_logprobs)
        self.finish_reason, self.error = other.finish_reason, other.error
        self.t_first, self.t_last, self.cumulative_logprob = other.t_first, other.t_last, other.cumulative_logprob

    def replay(self, tokens: list[int], t_first: float | None) -> None:
        """Push a whole hypothesis (beam search): its text and finish reason, as if decoded here."""
        for t in tokens:
            self.push(t)
        self.t_first = t_first or self.t_first

    def end(self, reason: str, error: Exception | None = None) -> Step:
        """Finish without a token (failure, cancellation, or max_new_tokens 0)."""
        self.finish_reason, self.error = reason, error
        return Step(self.row, len(self.tokens) - 1, -1, "", reason, time.perf_counter() - self.t_submit, error=error)

    def result(self) -> GenerationResult:
        """This finished sequence as a GenerationResult."""
        n = len(self.tokens)
        span = (self.t_last - self.t_first) if n > 1 else 0.0
        lps, scored = self.options.logprobs is not None, self.options.prompt_logprobs is not None
        return GenerationResult(
            text=self.text, token_ids=list(self.tokens), prompt_tokens=len(self.context), score=self.score,
            finish_reason=self.finish_reason or "length",
            time_to_first_token=(self.t_first - self.t_submit) if self.t_first else 0.0,
            decode_tokens_per_s=(n - 1) / span if span > 0 else 0.0,
            logprobs=list(self.logprobs) if lps else None, top_logprobs=list(self.top_logprobs) if lps else None,
            prompt_logprobs=list(self.prompt_logprobs) if scored else None,
            prompt_top_logprobs=list(self.prompt_top_logprobs) if scored else None)


def workers(seqs: Seq[Sequence]) -> list[Sequence]:
    """The sequences the core runs for these: each one's own, or its group's workers (once per group)."""
    out, seen = [], set()
    for s in seqs:
        for w in s.workers:
            if id(w) not in seen:
                seen.add(id(w))
                out.append(w)
    return out
