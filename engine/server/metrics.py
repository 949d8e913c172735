"""Prometheus metrics of one server (prometheus_client, one registry per app)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.responses import Response

from gpt2_onnx.async_engine import AsyncEngine
from gpt2_onnx.server.completions import Completion
from gpt2_onnx.server.errors import ApiError

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _EngineCollector:
    """The engine's own counters and gauges, read when scraped."""

    def __init__(self, llm: AsyncEngine):
        self.llm = llm

    def collect(self):
        s = self.llm.stats()
        yield GaugeMetricFamily("gpt2onnx_queue_depth", "sequences waiting for a KV row", value=s["queue_depth"])
        yield GaugeMetricFamily("gpt2onnx_active_sequences", "sequences holding a KV row", value=s["active"])
        yield CounterMetricFamily("gpt2onnx_decode_steps", "core steps that ran the model", value=s["steps"])
        yield CounterMetricFamily("gpt2onnx_prefix_cache_hits", "prompts that reused cached KV",
                                  value=s["prefix_cache_hits"])
        yield CounterMetricFamily("gpt2onnx_prefix_cache_hit_tokens", "prompt tokens not recomputed",
                                  value=s["prefix_cache_hit_tokens"])
        yield GaugeMetricFamily("gpt2onnx_prefix_cache_bytes", "KV bytes held by the prefix cache",
                                value=s["prefix_cache_bytes"])


class Metrics:
    """Requests by status (499: the client closed the connection), tokens, latencies, and the engine's state."""

    def __init__(self, llm: AsyncEngine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2onnx_requests", "requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("gpt2onnx_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("gpt2onnx_completion_tokens", "tokens generated", registry=r)
        self.duration = Histogram("gpt2onnx_request_duration_seconds", "request latency", buckets=LATENCY_BUCKETS,
                                  registry=r)
        self.ttft = Histogram("gpt2onnx_time_to_first_token_seconds", "time to a request's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(llm))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def answer(self, e: ApiError | None) -> Response:
        """An error's response, counted by its status (None: the client went away before its body was read)."""
        if e is None:
            self.requests.labels("499").inc()
            return Response(status_code=499)
        self.requests.labels(str(e.status)).inc()
        return e.response()

    def accepted(self, c: Completion) -> None:
        self.prompt_tokens.inc(sum(len(s.context) for s in c.sequences))

    def finished(self, c: Completion) -> None:
        """Count an accepted completion once, with the status it ended with."""
        if c.counted:
            return
        c.counted = True
        self.requests.labels(c.status).inc()
        self.completion_tokens.inc(sum(len(s.tokens) for s in c.sequences))
        self.duration.observe(time.perf_counter() - c.t0)
        firsts = [s.t_first - s.t_submit for s in c.sequences if s.t_first]
        if firsts:
            self.ttft.observe(min(firsts))

    async def streamed(self, c: Completion) -> AsyncIterator[str]:
        """c's events, counted when the stream ends (also when the client hangs up: its rows are freed)."""
        try:
            async for event in c.events():
                yield event
        finally:
            if not c.request.done:  # the client hung up: its rows go back now
                c.request.cancel()
            self.finished(c)
