"""AsyncEngine: many threads and asyncio tasks in one process share one core's continuous batching."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gpt2_onnx import AsyncEngine, Cancelled, GenerationOptions, InvalidInput, QueueFull, ShuttingDown
from gpt2_onnx.errors import ReadTimeout
from gpt2_onnx.model import DecodeStep

PROMPTS = [[(11 * i + j) % 997 + 1 for j in range(1 + i % 9)] for i in range(32)]


def wait_until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def spy_batches(monkeypatch):
    """The batch size of every decode step run anywhere in the process."""
    sizes, real = [], DecodeStep.__call__

    def spy(self, tokens, rows, **kw):
        sizes.append(len(tokens))
        return real(self, tokens, rows, **kw)

    monkeypatch.setattr(DecodeStep, "__call__", spy)
    return sizes


def test_32_threads_and_tasks_get_their_solo_answers_from_shared_steps(tiny, spy_batches):
    _, engine, _, _ = tiny
    lengths = [6 + i % 11 for i in range(32)]
    want = [engine.generate(p, max_new_tokens=n).token_ids for p, n in zip(PROMPTS, lengths)]
    spy_batches.clear()
    llm = AsyncEngine(engine, max_batch=32)
    got: dict[int, list[int]] = {}
    start = threading.Barrier(17)  # 16 threads and the event loop's thread submit together

    def caller(i: int) -> None:
        start.wait()
        got[i] = llm.submit(PROMPTS[i], GenerationOptions(max_new_tokens=lengths[i])).result()[0].token_ids

    async def tasks() -> None:
        start.wait()

        async def one(i: int) -> None:
            got[i] = (await llm.submit(PROMPTS[i], GenerationOptions(max_new_tokens=lengths[i])))[0].token_ids

        await asyncio.gather(*[one(i) for i in range(16, 32)])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join(60)
    llm.shutdown()
    assert [got[i] for i in range(32)] == want
    assert max(spy_batches) >= 16, spy_batches  # callers decoded together, not one by one
    assert len(spy_batches) < sum(lengths) / 4


def test_seeded_samples_equal_the_servers_and_generate_batch(tiny):
    uvicorn = pytest.importorskip("uvicorn")  # noqa: F841
    from gpt2_onnx.server import create_app
    from helpers import Server, post

    _, engine, _, _ = tiny
    options = GenerationOptions(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=7, n=3)
    llm = AsyncEngine(engine, max_batch=8)
    mine = [r.text for r in llm.submit(["to be", [5, 6]], options).result()]
    llm.shutdown()
    s = Server(create_app(engine, model_id="t", max_batch=8))
    try:
        body = {"prompt": ["to be", [5, 6]], "max_tokens": 9, "temperature": 0.8, "top_p": 0.9, "seed": 7, "n": 3}
        theirs = [c["text"] for c in post(s.url, body).json()["choices"]]
    finally:
        s.stop()
    assert mine == theirs == [r.text for r in engine.generate_batch(["to be", [5, 6]], max_new_tokens=9,
                                                                     temperature=0.8, top_p=0.9, seed=7, n=3)]


def test_cancel_frees_the_row_within_one_step(tiny):
    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=2)
    request = llm.submit([1, 2, 3], GenerationOptions(max_new_tokens=100, ignore_eos=True))
    steps = iter(request)
    next(steps), next(steps)
    at = llm.core.steps
    request.cancel()
    rest = list(steps)
    assert rest[-1].finish_reason == "cancelled"
    wait_until(lambda: llm.stats()["active"] == 0)
    assert llm.core.steps - at <= 1
    with pytest.raises(Cancelled):
        request.result()
    llm.shutdown()


def test_a_reader_that_falls_behind_holds_its_row_not_memory(tiny):
    """A sequence whose consumer does not read stops at `buffer` unread Steps; the others go on; read on, it
    finishes with the answer it would have had."""
    _, engine, _, _ = tiny
    want = engine.generate([4, 5], max_new_tokens=60, ignore_eos=True).token_ids
    llm = AsyncEngine(engine, max_batch=4, buffer=4)
    slow = llm.submit([4, 5], GenerationOptions(max_new_tokens=60, ignore_eos=True))
    wait_until(lambda: slow.sequences[0].held)
    fast = llm.submit([[7], [8, 9]], GenerationOptions(max_new_tokens=40, ignore_eos=True)).result()
    assert [len(r.token_ids) for r in fast] == [40, 40]
    assert len(slow.sequences[0].tokens) == 4 and llm.stats()["active"] == 1  # held: 4 unread Steps, no more
    assert [s.token_id for s in slow] == want  # reading on releases it


def test_async_iteration_stopped_early_cancels_the_request(tiny):
    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=2)

    async def read_two() -> list:
        request = llm.submit([3, 4], GenerationOptions(max_new_tokens=80, ignore_eos=True))
        out = []
        steps = request.__aiter__()
        async for step in steps:
            out.append(step)
            if len(out) == 2:
                break
        await steps.aclose()
        return request

    request = asyncio.run(read_two())
    wait_until(lambda: llm.stats()["active"] == 0)
    assert request.sequences[0].finish_reason == "cancelled" and len(request.sequences[0].tokens) < 80
    llm.shutdown()


def test_a_dropped_request_gives_its_rows_back(tiny):
    import gc

    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=2, buffer=2)
    request = llm.submit([[1], [2]], GenerationOptions(max_new_tokens=100, ignore_eos=True))
    seqs = request.sequences
    wait_until(lambda: all(s.held for s in seqs))  # nobody reads: both rows held
    del request
    gc.collect()
    wait_until(lambda: llm.stats()["active"] == 0)
    assert [s.finish_reason for s in seqs] == ["cancelled"] * 2
    assert len(llm.submit([3], GenerationOptions(max_new_tokens=4)).result()[0].token_ids) == 4
    llm.shutdown()


def test_held_rows_and_a_waiting_request_leave_the_step_thread_idle(tiny, monkeypatch):
    """Every row held by an unread request, another request waiting for a row: nothing can run, so the step
    thread sleeps instead of spinning."""
    from gpt2_onnx.core import Core

    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=1, buffer=1)
    held = llm.submit([1], GenerationOptions(max_new_tokens=20, ignore_eos=True))
    wait_until(lambda: held.sequences[0].held)
    waiting = llm.submit([2], GenerationOptions(max_new_tokens=3))
    calls, real = [], Core.step
    monkeypatch.setattr(Core, "step", lambda self: calls.append(1) or real(self))
    time.sleep(1.0)
    assert len(calls) <= 4, len(calls)  # polls at most every AsyncEngine.POLL_S
    assert len(held.result()[0].token_ids) == 20 and len(waiting.result()[0].token_ids) == 3
    llm.shutdown()


def test_drain_cancels_sequences_that_were_being_admitted(tiny, monkeypatch):
    from gpt2_onnx.core import Core

    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=2)
    real, entered = Core._plan, threading.Event()

    def slow_plan(self, new):
        entered.set()
        time.sleep(0.3)  # the sequences are neither waiting nor running meanwhile
        return real(self, new)

    monkeypatch.setattr(Core, "_plan", slow_plan)
    request = llm.submit([1, 2], GenerationOptions(max_new_tokens=100, ignore_eos=True))
    assert entered.wait(10)
    llm.drain(0.0)
    with pytest.raises(Cancelled):
        request.result()
    assert len(request.sequences[0].tokens) < 100
    llm.shutdown()


def test_a_request_left_unread_past_read_timeout_gives_its_rows_to_the_next(tiny):
    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=1, buffer=2, read_timeout=0.3)
    unread = llm.submit([1], GenerationOptions(max_new_tokens=50, ignore_eos=True))
    wait_until(lambda: unread.sequences[0].held)
    waiting = llm.submit([2], GenerationOptions(max_new_tokens=4))  # no row until the unread one ends
    assert len(waiting.result()[0].token_ids) == 4
    with pytest.raises(ReadTimeout, match="not read for 0.3 s"):
        unread.result()
    assert isinstance(ReadTimeout("x"), Cancelled) and len(unread.sequences[0].tokens) == 2
    llm.shutdown()


def test_read_timeout_ends_the_whole_request_its_queued_sequences_too(tiny):
    """A request of more sequences than rows, left unread: one read_timeout ends all of it, instead of each wave
    of its queued sequences being admitted, decoded until held, and held for another read_timeout."""
    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=2, buffer=2, read_timeout=0.5)
    unread = llm.submit([[1], [2], [3], [4], [5], [6]], GenerationOptions(max_new_tokens=60, ignore_eos=True))
    wait_until(lambda: all(s.held for s in unread.sequences[:2]))
    t0 = time.monotonic()
    wait_until(lambda: all(s.done for s in unread.sequences), timeout=10)
    assert time.monotonic() - t0 < 1.4  # one read_timeout (0.5 s), not three
    assert all(isinstance(s.error, ReadTimeout) and s.finish_reason == "cancelled" for s in unread.sequences)
    assert [len(s.tokens) for s in unread.sequences[2:]] == [0, 0, 0, 0]  # the queued ones never ran
    llm.shutdown()


def test_typed_errors(tiny):
    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=1, max_queue=1, buffer=1)
    with pytest.raises(InvalidInput) as e:
        llm.submit("x", GenerationOptions(max_new_tokens=1000))
    assert e.value.param == "max_new_tokens" and "n_positions" in str(e.value)
    with pytest.raises(InvalidInput) as e:
        llm.submit(["a", "b"], GenerationOptions(max_new_tokens=2))  # 2 sequences, a queue of 1
    assert e.value.param == "prompt"
    running = llm.submit([1], GenerationOptions(max_new_tokens=50, ignore_eos=True))  # held after 1 unread Step
    wait_until(lambda: running.sequences[0].held)
    waiting = llm.submit([2], GenerationOptions(max_new_tokens=5))  # no free row: it waits
    with pytest.raises(QueueFull):
        llm.submit([3], GenerationOptions(max_new_tokens=5))
    llm.drain(30)
    with pytest.raises(ShuttingDown):
        llm.submit([3], GenerationOptions(max_new_tokens=5))
    assert len(running.result()[0].token_ids) == 50 and len(waiting.result()[0].token_ids) <= 5
    llm.shutdown()
    with pytest.raises(InvalidInput) as e:
        GenerationOptions(top_p=0)
    assert e.value.param == "top_p" and e.value.named({"top_p": "--top-p"}).startswith("--top-p must be in (0, 1]")
