"""The routes: POST /v1/completions (SSE streaming), GET /v1/models, /health, /metrics.

Requests become Sequences of the one generation core (engine/core.py), stepped by one background
thread (`Worker`): continuous batching on a KV pool on the session's device, with an automatic
prefix cache. The routes validate with the request models, call the engine's own API
(`Engine.sequences`), and report what the engine says (finish reasons, failures).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gpt2_onnx.core import Core, Prefix, Sequence, Step
from gpt2_onnx.engine import Engine
from gpt2_onnx.server.metrics import Metrics
from gpt2_onnx.server.protocol import (FINISH, CompletionChoice, CompletionRequest, CompletionResponse,
                                       DetokenizeRequest, DetokenizeResponse, ErrorResponse, LogProbs, ModelCard,
                                       ModelList, TokenizeRequest, TokenizeResponse, TokenizerInfo, Usage)

MAX_BODY = 1 << 20  # 1 MiB
ERRORS = {400: "invalid request (the field is named)", 401: "missing or wrong API key", 404: "unknown model",
          413: "request body over 1 MiB", 429: "queue full (Retry-After)", 500: "generation failed",
          503: "shutting down (Retry-After)"}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class QueueFull(Exception):
    """The waiting queue is at its limit; retry later."""


class ShuttingDown(Exception):
    """The server is draining before it stops; retry on another replica or later."""


class Worker:
    """Steps one Core in a background thread while it has work; submit() and cancel() from any thread."""

    def __init__(self, core: Core, *, max_queue: int):
        self.core, self.max_queue = core, max_queue
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gpt2-onnx-core", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences; QueueFull when max_queue sequences already wait, ShuttingDown while draining."""
        with self.cond:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
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

    def drain(self, grace: float) -> None:
        """Stop admitting now; sequences still in flight after `grace` seconds are cancelled (their
        requests then end with an error: a JSON 503, or an error event on a stream)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        timer = threading.Timer(grace, lambda: self.cancel([*self.core.running, *self.core.waiting]))
        timer.daemon = True
        timer.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let in-flight sequences finish for up to `timeout` seconds, then cancel the rest."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)
        self.cancel([*self.core.running, *self.core.waiting])
        self.thread.join(5)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem of a request body, naming its field."""
    errors = exc.errors()
    e = errors[0]
    loc = [x for x in e.get("loc", ()) if x != "body"]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    kind, msg = e.get("type", ""), str(e.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        where = f" at position {loc[0]}" if loc else ""
        return ApiError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', msg)}{where}")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden":
        known = sorted(CompletionRequest.model_fields)
        return ApiError(400, f"unknown field {param!r}; supported: {known}", param)
    if kind == "missing":
        return ApiError(400, f"{param} is required", param)
    if param == "prompt" and kind != "value_error":
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those",
                        param)
    got = f", got {e['input']!r}" if kind != "value_error" and "input" in e and len(repr(e["input"])) < 80 else ""
    return ApiError(400, f"{param}: {msg}{got}" if param and kind != "value_error" else msg, param)


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: Engine, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256, shutdown_timeout: float = 10.0, prefix_cache_mb: float = 512,
               prefixes: dict[str, Prefix] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` with continuous batching and an automatic prefix cache.

    model_id defaults to the model's name from its manifest (a Hub id as given, a folder's name).
    prefixes: more served models, each the engine after a Prefix (e.g. `engine.load_prefix(peft_dir)`
    for a prefix-tuning adapter), chosen per request by its "model" field, as vLLM selects adapters.
    """
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                             ("prefix_cache_mb", prefix_cache_mb, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if api_key == "":
        raise ValueError("api_key is empty: pass a non-empty key, or none to serve without authentication")
    model_id = model_id or engine.config.name or engine.folder.name
    prefixes = dict(prefixes or {})
    if model_id in prefixes:
        raise ValueError(f"prefix name {model_id!r} is the served model's own id; choose another name")
    core = Core(engine.model, slots=max_batch, max_length=engine.config.n_positions,
                prefix_cache_bytes=int(prefix_cache_mb * 2**20), pinned=list(prefixes.values()))
    worker = Worker(core, max_queue=max_queue)
    metrics = Metrics(core)
    created = int(time.time())

    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.shutdown, shutdown_timeout)

    app = FastAPI(title="gpt2-onnx", version=_version(), lifespan=lifespan, max_body_size=MAX_BODY,
                  responses={code: {"model": ErrorResponse, "description": why} for code, why in ERRORS.items()})
    app.state.core, app.state.worker, app.state.metrics, app.state.model_id = core, worker, metrics, model_id

    def answer(e: ApiError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        return e.response()

    app.add_exception_handler(ApiError, lambda request, e: answer(e))
    app.add_exception_handler(ClientDisconnect, lambda request, e: (metrics.requests.labels("499").inc(),
                                                                    Response(status_code=499))[1])
    app.add_exception_handler(RequestValidationError, lambda request, e: answer(_validation_error(e)))
    app.add_exception_handler(HTTPException, lambda request, e: answer(ApiError(
        e.status_code, f"request body of more than {MAX_BODY} bytes" if e.status_code == 413 else
        "the request body could not be parsed as JSON (invalid UTF-8, nested too deeply, or a number too long)"
        if e.status_code == 400 else str(e.detail))))
    app.add_exception_handler(Exception, lambda request, e: answer(ApiError(  # never a text/plain 500
        500, f"internal error: {type(e).__name__}: {str(e)[:300]}", kind="server_error")))

    async def authorized(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("authorization", "").encode(),
                                                  f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "active": len(core.running), "queue_depth": len(core.waiting)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        """Prometheus text exposition."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)], response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=m, created=created) for m in [model_id, *prefixes]])

    @app.post("/tokenize", dependencies=[Depends(authorized)], response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest):
        """Token ids of a text (special-token text is the special token, as in Hugging Face's tokenizers)."""
        ids = await asyncio.get_running_loop().run_in_executor(None, engine.tokenizer.encode, body.prompt)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.config.n_positions)

    @app.post("/detokenize", dependencies=[Depends(authorized)], response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < engine.config.vocab_size]
        if bad:
            raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {engine.config.vocab_size})",
                           "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info", dependencies=[Depends(authorized)], response_model=TokenizerInfo)
    async def tokenizer_info():
        cfg, tok = engine.config, engine.tokenizer
        return TokenizerInfo(eos_token=tok.token_name(cfg.eos_token_id), bos_token=tok.token_name(cfg.bos_token_id),
                             model_max_length=cfg.n_positions, vocab_size=cfg.vocab_size)

    @app.post("/v1/completions", dependencies=[Depends(authorized)], response_model=CompletionResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "the completion, or with stream: true server-sent events"}})
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.perf_counter()
        if body.model not in (None, model_id, *prefixes):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{[model_id, *prefixes]}", "model", "model_not_found")
        prefix = prefixes.get(body.model)
        try:
            options = body.to_options()
        except ValueError as e:
            raise ApiError(400, str(e), str(e).split()[0] if str(e).split()[0] in CompletionRequest.model_fields
                           else None) from e
        before, loop = len(prefix.token_ids) if prefix is not None else 0, asyncio.get_running_loop()

        prompts = body.prompts()

        def encode() -> list[list[int]]:  # in a worker thread: a 1 MiB prompt takes a while to tokenize
            return [engine.encode(p, empty_ok=prefix is not None and not prefix.virtual) for p in prompts]

        try:
            ids = await loop.run_in_executor(None, encode)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from e
        n_pos = engine.config.n_positions
        for x in ids:
            if before + len(x) + options.max_new_tokens > n_pos:
                head = f"{before} prefix tokens + " if before else ""
                raise ApiError(400, f"{head}prompt of {len(x)} tokens + max_tokens {options.max_new_tokens} exceeds "
                                    f"the model's context of n_positions {n_pos}; shorten the prompt or lower max_tokens",
                               "max_tokens" if before + len(x) < n_pos else "prompt")
        seqs = engine.sequences(ids, options, prefix=prefix)
        stream, echo = bool(body.stream), bool(body.echo)
        echoed = ([p if isinstance(p, str) else engine.tokenizer.decode(ids[k]) for k, p in enumerate(prompts)]
                  if echo else [])  # each prompt's text, for echo
        rid = f"cmpl-{secrets.token_hex(12)}"
        events: asyncio.Queue[Step] = asyncio.Queue()
        done: list[list[Step]] = [[] for _ in seqs]  # each sequence's steps (non-streaming)

        def on_step(step: Step) -> None:  # runs in the core's thread
            if not stream:
                done[step.row].append(step)
            if stream or step.finish_reason:
                loop.call_soon_threadsafe(events.put_nowait, step)

        for s in seqs:
            s.on_step = on_step
        pending = {s.row for s in seqs}
        if len(seqs) > max_queue:
            raise ApiError(400, f"this request needs {len(seqs)} sequences (prompts x n) but the server queues at most "
                                f"{max_queue}; send fewer prompts or a smaller n", "n" if options.n > 1 else "prompt")
        try:
            worker.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"}) from e
        except ShuttingDown as e:
            raise ApiError(503, f"{e}; retry", kind="server_error", headers={"Retry-After": "1"}) from e
        metrics.prompt_tokens.inc(sum(len(s.context) for s in seqs))

        def finish(status: str) -> None:
            worker.cancel(seqs)
            metrics.requests.labels(status).inc()
            metrics.completion_tokens.inc(sum(len(s.tokens) for s in seqs))
            metrics.duration.observe(time.perf_counter() - t0)
            firsts = [s.t_first - s.t_submit for s in seqs if s.t_first]
            if firsts:
                metrics.ttft.observe(min(firsts))

        def usage() -> Usage:
            prompt, done = sum(len(s.context) for s in seqs), sum(len(s.tokens) for s in seqs)
            return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)

        def response(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
            return CompletionResponse(id=rid, created=int(time.time()), model=model_id, choices=choices, usage=usage)

        def head(s: Sequence) -> str:  # the text before the completion: the prompt with echo
            return echoed[s.row // options.n] if echo else ""

        def logprobs(s: Sequence, steps: list[Step], at: int, with_prompt: bool) -> LogProbs | None:
            """OpenAI's logprobs of the prompt (with_prompt: echo's first part) and of these steps' tokens,
            text offsets counted from `at` characters into the choice's text."""
            if options.logprobs is None:
                return None
            tok, toks, lps, tops, offsets = engine.tokenizer, [], [], [], []
            if with_prompt:
                real = s.context[s.virtual:]
                toks += real
                lps += s.prompt_logprobs[s.virtual:] or [None] * len(real)
                tops += s.prompt_top_logprobs[s.virtual:] or [None] * len(real)
                offsets += tok.offsets(real)
                at = len(head(s))
            for st in steps:
                if st.token_id >= 0:
                    toks.append(st.token_id)
                    lps.append(st.logprob)
                    tops.append(st.top_logprobs)
                    offsets.append(at)
                at += len(st.text)
            top = None if not options.logprobs else [
                None if t is None else {tok.token_text(i): lp for i, lp in t} for t in tops]
            return LogProbs(tokens=[tok.token_text(t) for t in toks], token_logprobs=lps, top_logprobs=top,
                            text_offset=offsets)

        def failure(step: Step) -> ApiError:
            if step.error is None:  # cancelled by the server itself: it is shutting down
                return ApiError(503, "the server is shutting down; retry", kind="server_error",
                                headers={"Retry-After": "1"})
            return ApiError(500, f"generation failed: {type(step.error).__name__}: {step.error}", kind="server_error")

        if stream:
            async def sse():
                status = "499"  # unless it ends below: the client went away
                sent = [0] * len(seqs)  # characters of each choice's text sent so far
                started: set[int] = set()
                try:
                    while pending:
                        step = await events.get()
                        if step.error is not None or step.finish_reason == "cancelled":
                            e = failure(step)
                            status = str(e.status)
                            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
                            return
                        if step.finish_reason:
                            pending.discard(step.row)
                        s, text = seqs[step.row], step.text
                        first = echo and step.row not in started  # the prompt comes first, with its logprobs
                        started.add(step.row)
                        if first:
                            text = head(s) + text
                        choice = CompletionChoice(text=text, index=step.row, finish_reason=FINISH.get(step.finish_reason),
                                                  logprobs=logprobs(s, [step], sent[step.row], first))
                        sent[step.row] += len(text)
                        yield f"data: {response([choice]).model_dump_json()}\n\n"
                    yield f"data: {response([], usage()).model_dump_json()}\n\n"
                    yield "data: [DONE]\n\n"
                    status = "200"
                finally:
                    finish(status)  # also runs when the client disconnects: frees the rows

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        reasons: dict[int, str] = {}

        async def collect() -> Step | None:
            while pending:
                step = await events.get()
                if step.error is not None or step.finish_reason == "cancelled":
                    return step
                reasons[step.row] = FINISH[step.finish_reason]
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
            e = failure(failed)
            finish(str(e.status))
            return e.response()
        finish("200")
        return response([CompletionChoice(text=head(s) + "".join(st.text for st in done[s.row]), index=s.row,
                                          logprobs=logprobs(s, done[s.row], 0, echo), finish_reason=reasons[s.row])
                         for s in seqs], usage())

    return app


def _version() -> str:
    from gpt2_onnx import __version__

    return __version__


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0) -> None:
    """Run an app from create_app until SIGINT/SIGTERM, then shut down gracefully: admit nothing new
    (503 + Retry-After), let in-flight requests finish for `grace` seconds, then end each stream with
    an error event and each other request with a JSON 503."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=grace + 5))
    stop = server.handle_exit

    def handle_exit(sig, frame) -> None:  # uvicorn's signal handler, with the drain first
        if not app.state.worker.stopping:
            app.state.worker.drain(grace)
        stop(sig, frame)

    server.handle_exit = handle_exit
    server.run()
