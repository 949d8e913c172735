"""Prometheus metrics of one server (prometheus_client, one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gpt2_onnx.core import Core

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _CoreCollector:
    """The core's own counters and gauges, read when scraped."""

    def __init__(self, core: Core):
        self.core = core

    def collect(self):
        c, p = self.core, self.core.prefixes
        yield GaugeMetricFamily("gpt2onnx_queue_depth", "sequences waiting for a KV row", value=len(c.waiting))
        yield GaugeMetricFamily("gpt2onnx_active_sequences", "sequences holding a KV row", value=len(c.running))
        yield CounterMetricFamily("gpt2onnx_decode_steps", "core steps that ran the model", value=c.steps)
        yield CounterMetricFamily("gpt2onnx_prefix_cache_hits", "prompts that reused cached KV", value=p.hits)
        yield CounterMetricFamily("gpt2onnx_prefix_cache_hit_tokens", "prompt tokens not recomputed",
                                  value=p.hit_tokens)
        yield GaugeMetricFamily("gpt2onnx_prefix_cache_bytes", "KV bytes held by the prefix cache", value=p.nbytes)


class Metrics:
    """Requests by status (499: the client closed the connection), tokens, latencies, and the core's state."""

    def __init__(self, core: Core):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2onnx_requests", "requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("gpt2onnx_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("gpt2onnx_completion_tokens", "tokens generated", registry=r)
        self.duration = Histogram("gpt2onnx_request_duration_seconds", "request latency", buckets=LATENCY_BUCKETS,
                                  registry=r)
        self.ttft = Histogram("gpt2onnx_time_to_first_token_seconds", "time to a request's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        r.register(_CoreCollector(core))

    def render(self) -> bytes:
        return generate_latest(self.registry)
