"""AsyncEngine: one generation core shared by any number of threads and asyncio tasks in this process.

    llm = AsyncEngine.load()                                   # or AsyncEngine(engine, max_batch=32)
    request = llm.submit("ROMEO:", GenerationOptions(max_new_tokens=20))
    for step in request: ...                                   # or: async for step in request
    results = request.result()                                 # or: results = await request

A background thread steps the core while it has work: requests join at step boundaries (continuous
batching) and leave when they end. Each request buffers at most `buffer` unread Steps per sequence; a
sequence whose consumer is further behind is held (it keeps its KV row, decodes nothing) until its
consumer reads on, so a slow reader costs a row, never memory. The HTTP server, `gpt2-onnx batch`
and the Ray replicas are clients of this class.
"""

from __future__ import annotations

import asyncio
import mmap
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.core import Core
from gpt2_onnx.errors import Cancelled, InvalidInput, QueueFull, ReadTimeout, ShuttingDown
from gpt2_onnx.sequence import workers
from gpt2_onnx.types import GenerationOptions, GenerationResult, Lora, Prefix, Step, as_prompts

if TYPE_CHECKING:
    from gpt2_onnx.sequence import Sequence as Seq
    from gpt2_onnx.sync_engine import Engine, Prompt


# KV rows decoded together when max_batch is not given. CPU: throughput still grows from 16 to 64 rows
# (benchmarks/results/server_anchors.md) and on Linux the pool is resident only where rows are written
# (kv_cache.small_pages); elsewhere, and on a GPU, whose pool is allocated whole at start, it stays at 16.
MAX_BATCH = {"cpu": 64 if hasattr(mmap, "MADV_NOHUGEPAGE") else 16, "cuda": 16}


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Request:
    """A submitted request: its sequences (row p * n + i) and their Steps, in the order they come.

    Iterate it (blocking) or `async for` it for Steps; `result()` or `await request` for one
    GenerationResult per row (raising the error of a failed row, Cancelled if cancelled). Stopping an
    iteration early, or cancelling the task that awaits it, cancels the request.
    """

    def __init__(self, engine: "AsyncEngine", sequences: list[Seq], buffer: int):
        self.engine, self.sequences, self.buffer = engine, sequences, buffer
        self._events: deque[Step] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._unread = [0] * len(sequences)
        self._open = len(sequences)  # sequences whose last Step has not been read yet
        self._results_only = False  # result() / await: only each sequence's last Step is kept and woken for
        ref = weakref.ref(self)  # the core holds the sequences, not the request: a dropped request is collected

        def on_step(step: Step) -> None:
            request = ref()
            if request is not None:
                request._on_step(step)

        for s in sequences:
            s.on_step = on_step

    def __del__(self) -> None:  # dropped before its end: its rows go back within a poll of the step thread
        if getattr(self, "_open", 0):  # (no lock is taken: this may run in any thread, at any allocation)
            for s in self.sequences:
                s.cancelled = True

    @property
    def done(self) -> bool:
        """Every sequence's last Step has been read."""
        return not self._open

    def cancel(self) -> None:
        """Stop the request's sequences; their rows are free within one step."""
        self.engine._cancel(self.sequences)

    def _on_step(self, step: Step) -> None:  # in the core's thread (or a cancelling caller's)
        if self._results_only and not step.finish_reason:
            return  # the sequence keeps its tokens, text and log-probabilities itself
        with self._cond:
            self._events.append(step)
            self._unread[step.row] += 1
            if self._unread[step.row] >= self.buffer and not step.finish_reason:
                seq = self.sequences[step.row]
                seq.held, seq.held_since = True, time.monotonic()
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # that event loop is closed: nobody waits there any more
                pass

    def _pop(self) -> Step | None:
        """The next Step, if one is there; a sequence its consumer caught up with is released."""
        with self._cond:
            if not self._events:
                return None
            step = self._events.popleft()
            self._unread[step.row] -= 1
            seq = self.sequences[step.row]
            release = seq.held and self._unread[step.row] < self.buffer
            seq.held = seq.held and not release
            self._open -= step.finish_reason is not None
        if release:
            self.engine._wake()
        return step

    def __iter__(self) -> Iterator[Step]:
        try:
            while self._open:
                step = self._pop()
                if step is None:
                    with self._cond:
                        while not self._events:
                            self._cond.wait()
                    continue
                yield step
        finally:
            if self._open:
                self.cancel()

    async def _steps(self) -> AsyncIterator[Step]:
        try:
            while self._open:
                step = self._pop()
                if step is None:
                    loop = asyncio.get_running_loop()
                    future = loop.create_future()
                    with self._cond:
                        if self._events:
                            continue
                        self._waiters.append((loop, future))
                    await future
                    continue
                yield step
        finally:
            if self._open:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[Step]:
        return self._steps()

    @staticmethod
    def _check(step: Step) -> None:
        if step.error is not None:  # a failure, or why it was cancelled (ReadTimeout)
            raise step.error
        if step.finish_reason == "cancelled":
            raise Cancelled(f"sequence {step.row} was cancelled")

    def _results(self) -> list[GenerationResult]:
        for s in self.sequences:  # Steps another reader took
            if s.finish_reason in ("error", "cancelled"):
                self._check(Step(s.row, -1, -1, "", s.finish_reason, 0.0, error=s.error))
        return [s.result() for s in self.sequences]

    def _only_results(self) -> None:
        """From now on keep no Steps but each sequence's last (results come from the sequences): no wake-up
        per token, and nothing is held."""
        with self._cond:
            self._results_only = True
            kept = [s for s in self._events if s.finish_reason]
            for s in self._events:
                self._unread[s.row] -= 1
            self._events.clear()
            self._events.extend(kept)
            for s in kept:
                self._unread[s.row] += 1
            release = [s for s in self.sequences if s.held]
            for s in release:
                s.held = False
        if release:
            self.engine._wake()

    def result(self) -> list[GenerationResult]:
        """Block until every row has ended; one GenerationResult per row."""
        self._only_results()
        steps = iter(self)
        try:
            for step in steps:
                self._check(step)
        finally:
            steps.close()
        return self._results()

    async def _result(self) -> list[GenerationResult]:
        self._only_results()
        steps = self._steps()
        try:
            async for step in steps:
                self._check(step)
        finally:
            await steps.aclose()
        return self._results()

    def __await__(self):
        return self._result().__await__()


class AsyncEngine:
    """Continuous batching across callers: one Core (max_batch KV rows) stepped by one background thread.

    submit() is a plain call, safe from any thread or event loop. Every request must be read (iterated,
    result(), awaited) or dropped: one left unread holds its rows once `buffer` Steps wait in it, and with
    every row held, later requests wait for a row; with read_timeout, a sequence held that long is
    cancelled (ReadTimeout) and its row goes to the next request.
    """

    POLL_S = 0.5  # the step thread's longest sleep: a dropped request (flags only, no lock) is seen within it

    def __init__(self, engine: Engine, *, max_batch: int | None = None, max_queue: int = 256,
                 prefix_cache_mb: float = 512, buffer: int = 16, read_timeout: float | None = None):
        if max_batch is None:
            max_batch = MAX_BATCH[engine.model.device]
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("buffer", buffer, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InvalidInput(f"must be >= {low}, got {value!r}", name, lead=True)
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or prefix_cache_mb < 0:
            raise InvalidInput(f"must be a number >= 0, got {prefix_cache_mb!r}", "prefix_cache_mb", lead=True)
        if read_timeout is not None and (isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float))
                                         or not read_timeout > 0):
            raise InvalidInput(f"must be a number of seconds > 0 (None: never), got {read_timeout!r}", "read_timeout",
                               lead=True)
        self.read_timeout = read_timeout
        self.engine, self.max_queue, self.buffer = engine, int(max_queue), int(buffer)
        self.core = Core(engine.model, slots=int(max_batch), max_length=engine.config.n_positions,
                         prefix_cache_bytes=int(prefix_cache_mb * 2**20))
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gpt2-onnx-core", daemon=True)
        self.thread.start()

    @classmethod
    def load(cls, model: str | None = None, *, max_batch: int | None = None, max_queue: int = 256,
             prefix_cache_mb: float = 512, buffer: int = 16, read_timeout: float | None = None,
             **load_options) -> "AsyncEngine":
        """Engine.load(model, **load_options) behind an AsyncEngine."""
        from gpt2_onnx.sync_engine import Engine

        return cls(Engine.load(model, **load_options), max_batch=max_batch, max_queue=max_queue,
                   prefix_cache_mb=prefix_cache_mb, buffer=buffer, read_timeout=read_timeout)

    def submit(self, prompt_or_prompts: Prompt | Sequence[Prompt], options: GenerationOptions = GenerationOptions(),
               *, prefix: Prefix | None = None, adapter: Lora | None = None) -> Request:
        """Queue a prompt (or several, n samples each); returns its Request at once. InvalidInput for bad
        input, QueueFull when max_queue sequences already wait, ShuttingDown while draining."""
        if not isinstance(options, GenerationOptions):
            raise InvalidInput("options must be a GenerationOptions", "options")
        width = options.width
        if width > self.core.slots:
            name = "num_beams" if options.num_beams > 1 else "best_of" if width > options.rows else "n"
            raise InvalidInput(f"asks for {width} sequences of one prompt decoding together but the engine runs at "
                               f"most {self.core.slots} (max_batch); ask for at most {self.core.slots}", name, lead=True)
        seqs = self.engine.sequences(as_prompts(prompt_or_prompts), options, prefix=prefix, adapter=adapter)
        size = len(workers(seqs))
        if size > self.max_queue:
            raise InvalidInput(f"this request needs {size} sequences (prompts x n) but the engine queues at most "
                               f"{self.max_queue}; send fewer prompts or a smaller n", "n" if width > 1 else "prompt")
        request = Request(self, seqs, self.buffer)
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the engine is shutting down")
            if len(self.core.waiting) + size > self.max_queue:
                raise QueueFull(f"{len(self.core.waiting)} sequences are already waiting")
            self.core.submit(seqs)
            self.cond.notify()
        return request

    def stats(self) -> dict:
        """The core's state: sequences running and waiting, steps run, prefix cache use."""
        c, p = self.core, self.core.prefixes
        return {"active": len(c.running), "queue_depth": len(c.waiting), "steps": c.steps, "slots": c.slots,
                "prefix_cache_hits": p.hits, "prefix_cache_hit_tokens": p.hit_tokens, "prefix_cache_bytes": p.nbytes,
                "stopping": self.stopping, "alive": self.thread.is_alive()}

    def drain(self, grace: float) -> None:
        """Admit nothing new from now on (ShuttingDown); sequences still in flight after `grace` seconds
        are cancelled."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        timer = threading.Timer(grace, self._cancel_all)
        timer.daemon = True
        timer.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Admit nothing new; let in-flight sequences finish for up to `timeout` seconds, cancel the rest, stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        self._cancel_all()
        self.thread.join(5)

    # ---- the step thread -----------------------------------------------------------------------
    def _wake(self) -> None:
        with self.cond:
            self.cond.notify()

    def _cancel(self, seqs: list[Seq]) -> None:
        self.core.cancel(seqs)
        self._wake()

    def _cancel_all(self) -> None:
        self.core.cancel_all()
        self._wake()

    def _expire(self) -> None:
        """Cancel the sequences held for longer than read_timeout (their readers left them unread)."""
        if self.read_timeout is None:
            return
        late = time.monotonic() - self.read_timeout
        tickets = {s.ticket for s in self.core.running if s.held and s.held_since < late and not s.cancelled}
        if not tickets:
            return
        with self.core.lock:  # the whole request ends: its queued sequences too, not only those holding rows
            overdue = [s for s in [*self.core.running, *self.core.waiting] if s.ticket in tickets and not s.cancelled]
        for s in overdue:
            s.cancel_error = ReadTimeout(f"not read for {self.read_timeout:g} s: the request was ended and its KV "
                                         "rows given to other requests")
        self.core.cancel(overdue)

    def _loop(self) -> None:
        while True:
            with self.cond:
                self._expire()
                while not self.core.runnable and not (self.stopping and not self.core.busy):
                    self.cond.wait(self.POLL_S)
                    self._expire()
                if self.stopping and not self.core.busy:
                    return
            try:
                self.core.step()
            except Exception as e:  # a bug in the step itself: fail what is in flight, keep serving
                self.core.fail_all(e)
