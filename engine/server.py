"""OpenAI-compatible HTTP server: POST /v1/completions (SSE streaming), /v1/models, /health, /metrics.

Needs the `serve` extra (fastapi, uvicorn). Requests from all clients become Sequences of the one
generation core (engine/core.py), stepped by one background thread: continuous batching on a KV
pool on the session's device, with an automatic prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import Counter
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from engine.core import Core, GenerationOptions, Sequence, Step
from engine.engine import Engine

MAX_BODY = 1 << 20  # 1 MiB
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
         "repetition_penalty", "user", "echo", "logprobs", "presence_penalty", "frequency_penalty", "best_of",
         "suffix", "logit_bias", "stream_options"}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the engine's reasons in OpenAI's words


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}},
                        status_code=e.status, headers=e.headers)


class QueueFull(Exception):
    """The waiting queue is at its limit; retry later."""


class Worker:
    """Steps one Core in a background thread while it has work; submit() and cancel() from any thread."""

    def __init__(self, core: Core, *, max_queue: int):
        self.core, self.max_queue = core, max_queue
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gpt2-onnx-core", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences; QueueFull when max_queue sequences already wait (or the server is stopping)."""
        with self.cond:
            if self.stopping:
                raise QueueFull("server is shutting down")
            if len(self.core.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.core.waiting)} sequences are already waiting")
            self.core.submit(seqs)
            self.cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        self.core.cancel(seqs)
        with self.cond:
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.core.busy and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.core.busy:
                    return
            try:
                self.core.step()
            except Exception as e:  # a bug in the step itself: fail what is in flight, keep serving
                with self.core.lock:
                    stuck = [*self.core.running, *self.core.waiting]
                    self.core.waiting.clear()
                for s in stuck:
                    if not s.done:
                        self.core._fail(s, e, [])
                self.core._release()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let in-flight sequences finish for up to `timeout` seconds, then cancel the rest."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        self.cancel([*self.core.running, *self.core.waiting])
        self.thread.join(5)


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

    def render(self, core: Core) -> str:
        pc = core.prefixes
        out = ["# TYPE gpt2onnx_requests_total counter"]
        out += [f'gpt2onnx_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        out += ["# TYPE gpt2onnx_prompt_tokens_total counter", f"gpt2onnx_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE gpt2onnx_completion_tokens_total counter",
                f"gpt2onnx_completion_tokens_total {self.completion_tokens}",
                "# TYPE gpt2onnx_queue_depth gauge", f"gpt2onnx_queue_depth {len(core.waiting)}",
                "# TYPE gpt2onnx_active_sequences gauge", f"gpt2onnx_active_sequences {len(core.running)}",
                "# TYPE gpt2onnx_decode_steps_total counter", f"gpt2onnx_decode_steps_total {core.steps}",
                "# TYPE gpt2onnx_prefix_cache_hits_total counter", f"gpt2onnx_prefix_cache_hits_total {pc.hits}",
                "# TYPE gpt2onnx_prefix_cache_hit_tokens_total counter",
                f"gpt2onnx_prefix_cache_hit_tokens_total {pc.hit_tokens}",
                "# TYPE gpt2onnx_prefix_cache_bytes gauge", f"gpt2onnx_prefix_cache_bytes {pc.nbytes}"]
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


def parse_completion(body: Any, engine: Engine, model_id: str) -> tuple[list[list[int]], GenerationOptions, bool]:
    """Validate a /v1/completions body -> (prompt ids, options, stream); ApiError(400) names the field."""
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
    values = dict(max_new_tokens=max_tokens, n=_int(body, "n", 1, 1, 16),
                  temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                  top_k=_int(body, "top_k", 0, 0, engine.config.vocab_size),
                  top_p=_float(body, "top_p", 1.0, 1e-9, 1.0),
                  repetition_penalty=_float(body, "repetition_penalty", 1.0, 1e-3, 100.0),
                  seed=_int(body, "seed", 0, 0, 2**63 - 1) if body.get("seed") is not None else None)
    try:
        options = GenerationOptions(**values, stop=body.get("stop"))
    except ValueError as e:
        raise ApiError(400, str(e), "stop") from e
    if len(options.stop) > 4:
        raise ApiError(400, f"at most 4 stop strings, got {len(options.stop)}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    ids, n_pos = [], engine.config.n_positions
    for p in prompts:
        try:
            x = engine.encode(p)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from e
        if len(x) + max_tokens > n_pos:
            raise ApiError(400, f"prompt of {len(x)} tokens + max_tokens {max_tokens} exceeds the model's context of "
                                f"n_positions {n_pos}; shorten the prompt or lower max_tokens",
                           "max_tokens" if len(x) < n_pos else "prompt")
        ids.append(x)
    return ids, options, stream


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256, shutdown_timeout: float = 10.0, prefix_cache_mb: float = 512) -> FastAPI:
    """The FastAPI app serving `engine` with continuous batching and an automatic prefix cache."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefix_cache_mb", prefix_cache_mb)):
        if value < (1 if name == "max_batch" else 0):
            raise ValueError(f"{name} must be >= {1 if name == 'max_batch' else 0}, got {value}")
    model_id = model_id or engine.folder.name
    core = Core(engine.model, slots=max_batch, max_length=engine.config.n_positions,
                prefix_cache_bytes=int(prefix_cache_mb * 2**20))
    worker = Worker(core, max_queue=max_queue)
    metrics = Metrics()
    created = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.shutdown, shutdown_timeout)

    app = FastAPI(title="gpt2-onnx", lifespan=lifespan)
    app.state.core, app.state.worker, app.state.metrics = core, worker, metrics

    async def authorized(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        metrics.requests[str(e.status)] += 1
        return _error(e)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "active": len(core.running), "queue_depth": len(core.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(core), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "gpt2-onnx"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY}")
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
        ids, options, stream = parse_completion(data, engine, model_id)
        seqs = engine.sequences(ids, options)
        rid = f"cmpl-{secrets.token_hex(12)}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Step] = asyncio.Queue()
        texts = ["" for _ in seqs]

        def on_step(step: Step) -> None:  # runs in the core's thread
            if stream or step.finish_reason:
                if not stream:
                    texts[step.row] += step.text
                loop.call_soon_threadsafe(events.put_nowait, step)
            else:
                texts[step.row] += step.text

        for s in seqs:
            s.on_step = on_step
        pending = {s.row for s in seqs}
        try:
            worker.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}) from e
        metrics.prompt_tokens += sum(len(s.context) for s in seqs)

        def finish(status: str) -> None:
            worker.cancel(seqs)
            metrics.requests[status] += 1
            metrics.completion_tokens += sum(len(s.tokens) for s in seqs)
            metrics.observe("request_duration_seconds", time.perf_counter() - t0)
            firsts = [s.t_first - s.t_submit for s in seqs if s.t_first]
            if firsts:
                metrics.observe("time_to_first_token_seconds", min(firsts))

        def usage() -> dict:
            prompt, done = sum(len(s.context) for s in seqs), sum(len(s.tokens) for s in seqs)
            return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

        def chunk(choices: list, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": int(time.time()),
                                          "model": model_id, "choices": choices, **extra}) + "\n\n"

        def failure(step: Step) -> ApiError:
            return ApiError(500, f"generation failed: {type(step.error).__name__}: {step.error}", kind="server_error")

        if stream:
            async def sse():
                status = "499"  # unless it ends below: the client went away
                try:
                    while pending:
                        step = await events.get()
                        if step.error is not None:
                            status = "500"
                            e = failure(step)
                            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
                            return
                        if step.finish_reason:
                            pending.discard(step.row)
                        yield chunk([{"text": step.text, "index": step.row, "logprobs": None,
                                      "finish_reason": FINISH.get(step.finish_reason)}])
                    yield chunk([], usage=usage())
                    yield "data: [DONE]\n\n"
                    status = "200"
                finally:
                    finish(status)  # also runs when the client disconnects: frees the rows

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        reasons: dict[int, str] = {}

        async def collect() -> Step | None:
            while pending:
                step = await events.get()
                if step.error is not None:
                    return step
                reasons[step.row] = FINISH.get(step.finish_reason, step.finish_reason)
                pending.discard(step.row)
            return None

        gone, result = asyncio.create_task(_disconnected(request)), asyncio.create_task(collect())
        try:
            await asyncio.wait({gone, result}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            finish("499")
            raise
        finally:
            gone.cancel()
        if not result.done():  # the client hung up: stop its sequences now
            result.cancel()
            finish("499")
            return Response(status_code=499)
        failed = result.result()
        if failed is not None:
            finish("500")
            return _error(failure(failed))
        finish("200")
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                "choices": [{"text": texts[s.row], "index": s.row, "logprobs": None, "finish_reason": reasons[s.row]}
                            for s in seqs],
                "usage": usage()}

    return app


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run an app from create_app until interrupted (graceful: in-flight requests finish or are cancelled)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
