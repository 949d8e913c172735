"""OpenAI-compatible HTTP server: POST /v1/completions (SSE streaming), /v1/models, /health, /metrics.

Needs the `serve` extra (fastapi, uvicorn). Requests from all clients share one continuous batch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.engine import Engine, Step, stop_list
from engine.sampling import SamplingParams
from engine.scheduler import QueueFull
from engine.scheduler import Request as SeqRequest
from engine.scheduler import Scheduler

MAX_BODY = 1 << 20  # 1 MiB
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
         "repetition_penalty", "user", "echo", "logprobs", "presence_penalty", "frequency_penalty", "best_of",
         "suffix", "logit_bias", "stream_options"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                        status_code=e.status, headers=e.headers)


class Metrics:
    """Prometheus text exposition, by hand (no extra dependency)."""

    def __init__(self) -> None:
        self.requests: Counter = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.hist = {"request_duration_seconds": [0] * (len(LATENCY_BUCKETS) + 1),
                     "time_to_first_token_seconds": [0] * (len(LATENCY_BUCKETS) + 1)}
        self.sums = {k: 0.0 for k in self.hist}

    def observe(self, name: str, v: float) -> None:
        i = next((k for k, b in enumerate(LATENCY_BUCKETS) if v <= b), len(LATENCY_BUCKETS))
        self.hist[name][i] += 1
        self.sums[name] += v

    def render(self, sched: Scheduler) -> str:
        out = ["# TYPE gpt2onnx_requests_total counter"]
        out += [f'gpt2onnx_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        out += ["# TYPE gpt2onnx_prompt_tokens_total counter", f"gpt2onnx_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE gpt2onnx_completion_tokens_total counter",
                f"gpt2onnx_completion_tokens_total {self.completion_tokens}",
                "# TYPE gpt2onnx_queue_depth gauge", f"gpt2onnx_queue_depth {sched.queue_depth}",
                "# TYPE gpt2onnx_active_sequences gauge", f"gpt2onnx_active_sequences {sched.active}",
                "# TYPE gpt2onnx_decode_steps_total counter", f"gpt2onnx_decode_steps_total {sched.steps}"]
        for name, counts in self.hist.items():
            out.append(f"# TYPE gpt2onnx_{name} histogram")
            acc = 0
            for b, c in zip(list(LATENCY_BUCKETS) + ["+Inf"], counts):
                acc += c
                out.append(f'gpt2onnx_{name}_bucket{{le="{b}"}} {acc}')
            out += [f"gpt2onnx_{name}_sum {self.sums[name]:.6f}", f"gpt2onnx_{name}_count {acc}"]
        return "\n".join(out) + "\n"


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def parse_completion(body: Any, engine: Engine, model_id: str) -> dict:
    """Validate a /v1/completions body; ApiError(400) names the field and the reason."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; supported: {sorted(KNOWN)}", unknown[0])
    if body.get("model") not in (None, model_id):
        raise ApiError(404, f"model {body.get('model')!r} is not served here; this server serves {model_id!r}",
                       "model", "model_not_found")
    for name, ok in [("echo", (None, False)), ("best_of", (None, 1)), ("suffix", (None,)), ("logit_bias", (None, {})),
                     ("logprobs", (None,)), ("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0))]:
        if body.get(name) not in ok:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those", "prompt")
    if len(prompts) > 64:
        raise ApiError(400, f"at most 64 prompts per request, got {len(prompts)}", "prompt")
    max_tokens = _int(body, "max_tokens", 16, 0, engine.config.n_positions)
    n = _int(body, "n", 1, 1, 16)
    try:
        sampling = SamplingParams(temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                                  top_k=_int(body, "top_k", 0, 0, engine.config.vocab_size),
                                  top_p=_float(body, "top_p", 1.0, 1e-9, 1.0),
                                  repetition_penalty=_float(body, "repetition_penalty", 1.0, 1e-3, 100.0),
                                  seed=_int(body, "seed", 0, 0, 2**63 - 1) if body.get("seed") is not None else None)
        stops = stop_list(body.get("stop"))
    except ValueError as e:
        raise ApiError(400, str(e), "stop") from e
    if len(stops) > 4:
        raise ApiError(400, f"at most 4 stop strings, got {len(stops)}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    ids = []
    for p in prompts:
        try:
            x = engine.encode(p)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from e
        if len(x) + max_tokens > engine.config.n_positions:
            raise ApiError(400, f"prompt of {len(x)} tokens + max_tokens {max_tokens} exceeds the model's context of "
                                f"n_positions {engine.config.n_positions}; shorten the prompt or lower max_tokens",
                           "max_tokens" if len(x) < engine.config.n_positions else "prompt")
        ids.append(x)
    return dict(ids=ids, n=n, max_tokens=max_tokens, sampling=sampling, stops=stops, stream=stream)


def create_app(engine: Engine, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256, shutdown_timeout: float = 10.0) -> FastAPI:
    """The FastAPI app serving `engine` with continuous batching."""
    model_id = model_id or engine.folder.name
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    metrics = Metrics()
    created = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, sched.shutdown, shutdown_timeout)

    app = FastAPI(title="gpt2-onnx", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = sched, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/") and api_key:
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                metrics.requests["401"] += 1
                return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                                       kind="authentication_error"))
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY:
            metrics.requests["413"] += 1
            return _error(ApiError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY}"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "active": sched.active, "queue_depth": sched.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(sched), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "gpt2-onnx"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        try:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise ApiError(413, f"request body exceeds the limit of {MAX_BODY} bytes")
            try:
                data = json.loads(bytes(body).decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ApiError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from e
            except json.JSONDecodeError as e:
                raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
            spec = parse_completion(data, engine, model_id)
        except ApiError as e:
            metrics.requests[str(e.status)] += 1
            return _error(e)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        n, rid = spec["n"], f"cmpl-{secrets.token_hex(12)}"
        seqs = []
        texts = ["" for _ in range(len(spec["ids"]) * n)]
        reasons: list[str | None] = [None] * len(texts)

        def callback(index: int):
            if spec["stream"]:  # every step goes to the event loop
                return lambda step: loop.call_soon_threadsafe(events.put_nowait, (index, step))

            def collect(step):  # runs in the scheduler thread; wakes the loop only when the sequence ends
                if not isinstance(step, Exception):
                    texts[index] += step.text
                if isinstance(step, Exception) or step.finish_reason:
                    loop.call_soon_threadsafe(events.put_nowait, (index, step))
            return collect

        for p_idx, ids in enumerate(spec["ids"]):
            for i in range(n):
                index = p_idx * n + i
                cb = callback(index)
                seed = spec["sampling"].seed
                seqs.append(SeqRequest(ids=ids, max_new_tokens=spec["max_tokens"], sampling=spec["sampling"],
                                       on_step=cb, stops=spec["stops"], eos_token_id=engine.config.eos_token_id,
                                       rng_key=(seed if seed is not None else secrets.randbits(63), i)))
        prompt_tokens = sum(len(x) for x in spec["ids"]) * n
        if spec["max_tokens"] == 0:
            pending = set()
        else:
            try:
                for s in seqs:
                    sched.submit(s)
            except QueueFull as e:
                for s in seqs:
                    sched.cancel(s)
                metrics.requests["429"] += 1
                return _error(ApiError(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}))
            pending = set(range(len(seqs)))
        metrics.prompt_tokens += prompt_tokens

        def finish(status: str) -> None:
            for s in seqs:
                sched.cancel(s)
            metrics.requests[status] += 1
            metrics.completion_tokens += sum(len(s.tokens) for s in seqs)
            metrics.observe("request_duration_seconds", time.perf_counter() - t0)
            firsts = [s.t_first - s.t_submit for s in seqs if s.t_first]
            if firsts:
                metrics.observe("time_to_first_token_seconds", min(firsts))

        def usage() -> dict:
            done = sum(len(s.tokens) for s in seqs)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

        if spec["stream"]:
            async def sse():
                status = "cancelled"
                try:
                    while pending:
                        index, step = await events.get()
                        if isinstance(step, Exception):
                            raise step
                        if step.finish_reason:
                            pending.discard(index)
                        chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                                 "choices": [{"text": step.text, "index": index, "logprobs": None,
                                              "finish_reason": _reason(step.finish_reason)}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    for index in range(len(seqs)) if spec["max_tokens"] == 0 else ():
                        chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                                 "choices": [{"text": "", "index": index, "logprobs": None, "finish_reason": "length"}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    final = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                             "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                    status = "200"
                except Exception as e:  # engine failure mid-stream: tell the client in-band
                    status = "500"
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                finally:
                    finish(status)  # also runs when the client disconnects: frees the slots

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            while pending:
                try:
                    index, step = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        finish("cancelled")
                        return Response(status_code=499)
                    continue
                if isinstance(step, Exception):
                    finish("500")
                    return _error(ApiError(500, f"generation failed: {step}", kind="server_error"))
                reasons[index] = _reason(step.finish_reason)
                pending.discard(index)
        except asyncio.CancelledError:
            finish("cancelled")
            raise
        finish("200")
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [{"text": t, "index": i, "logprobs": None, "finish_reason": r or "length"}
                            for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": usage()}

    return app


def _reason(r: str | None) -> str | None:
    """OpenAI's finish reasons: eos and stop strings are both 'stop'."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(r, r)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the server until interrupted (graceful: in-flight requests finish or are cancelled)."""
    import uvicorn

    uvicorn.run(create_app(engine, **options), host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
