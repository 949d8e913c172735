"""Continuous batching: requests join the running decode batch at step boundaries and leave when done.

Each sequence owns a slot of one KV pool (max_batch, n_head, n_positions, head_size); a decode step
runs the slots up to the highest one in use, so no sequence's padding touches another's attention.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.engine import Engine, RowText, Step
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams, choose


class QueueFull(Exception):
    """The waiting queue is at its limit; retry later."""


@dataclass(eq=False)
class Request:
    """One sequence to generate. `on_step` is called from the scheduler thread for every Step, and
    with an Exception if the request fails."""

    ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    on_step: Callable[[Step | Exception], None]
    stops: list[str] = field(default_factory=list)
    eos_token_id: int | None = None
    rng_key: tuple[int, ...] = (0,)
    # scheduler state
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    _rng: np.random.Generator | None = field(default=None, repr=False)
    _text: RowText | None = field(default=None, repr=False)


class Scheduler:
    """Runs the decode loop in a background thread; submit() from any thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 256, max_length: int | None = None):
        self.engine = engine
        self.cfg = engine.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_length = max_length or self.cfg.n_positions
        dtype = np.float16 if self.cfg.dtype == "float16" else np.float32
        shape = (max_batch, self.cfg.n_head, self.max_length, self.cfg.head_size)  # (slots, nh, T, hs)
        self.pool = [np.zeros(shape, dtype) for _ in range(2 * self.cfg.n_layer)]
        self.lengths = np.zeros(max_batch, np.int64)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="gpt2-onnx-scheduler", daemon=True)
        self.thread.start()

    # ---- API ------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def submit(self, req: Request) -> Request:
        """Queue a request; raises QueueFull when max_queue requests already wait."""
        if len(req.ids) + req.max_new_tokens > self.max_length:
            raise ValueError(f"prompt of {len(req.ids)} tokens + {req.max_new_tokens} new tokens exceeds "
                             f"n_positions {self.max_length}")
        with self.cond:
            if self.stopping:
                raise QueueFull("server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop generating for req (client gone); its slot is freed at the next step."""
        with self.cond:
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish in-flight requests for up to `timeout` seconds, then cancel the rest and stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        with self.cond:
            for r in list(self.waiting) + [r for r in self.slots if r is not None]:
                r.cancelled = True
            self.cond.notify()
        self.thread.join(5)

    # ---- loop -----------------------------------------------------------------------------
    def _emit(self, req: Request, tok: int, text: RowText) -> None:
        req.tokens.append(tok)
        delta, hit = text.push(tok)
        if hit:
            req.finish_reason = "stop"
        elif tok == req.eos_token_id:
            req.finish_reason = "eos"
        elif len(req.tokens) >= req.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason in ("eos", "length"):
            delta += text.finish()
        now = time.perf_counter()
        req.t_first = req.t_first or now
        req.on_step(Step(0, len(req.tokens) - 1, tok, delta, req.finish_reason, now - req.t_submit))

    def _choose(self, req: Request, logits: np.ndarray) -> int:
        seen = np.array(req.ids + req.tokens, np.int64) if req.sampling.repetition_penalty != 1.0 else None
        return choose(logits, req.sampling, req._rng, seen)

    def _admit(self, new: list[Request]) -> None:
        """Prefill new requests together (ragged rows), copy their KV into free slots, pick token 1."""
        lens = np.array([len(r.ids) for r in new])
        ids = np.zeros((len(new), lens.max()), np.int64)
        for b, r in enumerate(new):
            ids[b, : len(r.ids)] = r.ids
        cache = self.engine.model.new_cache(len(new), int(lens.max()))
        logits = self.engine.model.forward(ids, lens, cache, (lens - 1)[:, None])[:, 0]
        for b, r in enumerate(new):
            r.slot = self.slots.index(None)
            self.slots[r.slot] = r
            for dst, src in zip(self.pool, cache.host_arrays()):
                dst[r.slot, :, : lens[b]] = src[b, :, : lens[b]]
            self.lengths[r.slot] = lens[b]
            r._rng = np.random.default_rng(list(r.rng_key))
            r._text = RowText(self.engine.tokenizer, r.ids, r.stops)
            self._emit(r, self._choose(r, logits[b]), r._text)

    def _decode(self) -> None:
        """One token for every slot in use; idle slots below the highest ride along harmlessly."""
        hi = max(i for i, r in enumerate(self.slots) if r is not None) + 1
        view = KVCache(self.cfg, hi, self.max_length, arrays=[a[:hi] for a in self.pool])  # shares memory
        live = [r is not None for r in self.slots[:hi]]
        view.lengths[:] = np.where(live, self.lengths[:hi], 0)
        last = np.array([[r.tokens[-1] if r is not None else 0] for r in self.slots[:hi]], np.int64)  # (B, 1)
        logits = self.engine.model.forward(last, np.ones(hi, np.int64), view, np.zeros((hi, 1), np.int64))[:, 0]
        self.lengths[:hi] = np.where(live, view.lengths, 0)
        self.steps += 1
        for i, r in enumerate(self.slots[:hi]):
            if r is not None:
                self._emit(r, self._choose(r, logits[i]), r._text)

    def _release_finished(self) -> None:
        for i, r in enumerate(self.slots):
            if r is not None and (r.finish_reason is not None or r.cancelled):
                self.slots[i] = None
                self.lengths[i] = 0

    def _loop(self) -> None:
        while True:
            with self.cond:
                self._release_finished()
                while not self.waiting and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.active and not self.waiting:
                    return
                free = self.slots.count(None)
                new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            try:
                if new:
                    self._admit(new)
                    self._release_finished()
                if self.active:
                    self._decode()
            except Exception as e:  # fail the affected requests, keep serving
                for r in new + [r for r in self.slots if r is not None]:
                    if r.finish_reason is None:
                        r.finish_reason = "error"
                        r.on_step(e)
                with self.cond:
                    self._release_finished()
