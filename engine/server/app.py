"""The routes: POST /v1/completions and /v1/chat/completions (SSE streaming), GET /v1/models, /tokenize, /detokenize,
/tokenizer_info, /health, /metrics.

Each route is a few lines over the completion service (server/completions.py), which submits to the
app's AsyncEngine: continuous batching across requests on a KV pool on the session's device, with an
automatic prefix cache. Auth is a dependency; every error is OpenAI-shaped JSON (server/errors.py).
serve() runs an app under the connection limits of server/limits.py, draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gpt2_onnx.async_engine import AsyncEngine
from gpt2_onnx.errors import InvalidInput
from gpt2_onnx.server import chat, completions
from gpt2_onnx.server.completions import Completion, Served
from gpt2_onnx.server.errors import ERRORS, MAX_BODY, ApiError, validation_error
from gpt2_onnx.server.metrics import Metrics
from gpt2_onnx.server.options import ServeOptions, api_key_problem
from gpt2_onnx.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                       CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                       ErrorResponse, LoadLoraRequest, ModelCard, ModelList, TokenizeRequest,
                                       TokenizeResponse, TokenizerInfo, UnloadLoraRequest)
from gpt2_onnx.types import Lora, Prefix

router = APIRouter()


def served(request: Request) -> Served:
    return request.app.state.served


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def key_matches(authorization: str | None, key: str) -> bool:
    """Whether an Authorization header's value (as starlette gives it: its bytes read as Latin-1) is `Bearer KEY`:
    the scheme in any case (RFC 9110), one or more spaces, the key compared byte for byte in constant time (keys
    are printable ASCII: ServeOptions and create_app refuse others)."""
    raw = (authorization or "").encode("latin-1", "replace")
    scheme, _, token = raw.strip(b" \t").partition(b" ")
    same = secrets.compare_digest(token.strip(b" "), key.encode("ascii", "replace"))
    return same and scheme.lower() == b"bearer"


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error",
                    headers={"WWW-Authenticate": "Bearer"})


async def authorized(request: Request) -> None:
    key = request.app.state.api_key
    if key and not key_matches(request.headers.get("authorization"), key):
        raise unauthorized()


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed when the response ends, also when a disconnect cancels it
    while it waits to send (starlette leaves that to garbage collection): the request's rows are freed and
    it is counted at once."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


STATIC = Path(__file__).parent / "static"  # the playground page, shipped in the package (no CDN)


@router.get("/", include_in_schema=False)
async def playground():
    """The playground page (open: with an API key it asks for the key and sends it as a Bearer token)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/health")
async def health(s: Served = Depends(served)):
    stats = s.llm.stats()
    return {"status": "ok", "model": s.model_id, "active": stats["active"], "queue_depth": stats["queue_depth"]}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(m: Metrics = Depends(metrics)):
    """Prometheus text exposition."""
    return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=[Depends(authorized)], response_model=ModelList)
async def list_models(s: Served = Depends(served)):
    return ModelList(data=[ModelCard(id=m, created=s.created) for m in s.models])


def _runtime_lora(request: Request) -> None:
    if not request.app.state.api_key:  # a request names a folder on the server's disk: never without a key
        raise ApiError(403, "loading and unloading LoRA adapters over HTTP needs a server started with --api-key "
                            "(or load them at start with --lora NAME=DIR)", kind="permission_error")


@router.post("/v1/load_lora_adapter", dependencies=[Depends(authorized), Depends(_runtime_lora)])
async def load_lora_adapter(body: LoadLoraRequest, s: Served = Depends(served)):
    """Serve one more LoRA adapter (vLLM's route) as model lora_name, in a free slot of a --lora-slots export."""
    async with s.lora_lock:  # the name checked, loaded and served as one step
        if body.lora_name in s.models:
            raise ApiError(400, f"model {body.lora_name!r} is already served; unload it first or choose another "
                                "name", "lora_name")
        try:
            handle = await asyncio.get_running_loop().run_in_executor(
                None, lambda: s.llm.engine.load_lora(body.lora_path, name=body.lora_name))
        except ValueError as e:
            raise ApiError(400, str(e), "lora_path") from e
        s.loras[body.lora_name] = handle
    return {"message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}  # vLLM's text, as JSON


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(authorized), Depends(_runtime_lora)])
async def unload_lora_adapter(body: UnloadLoraRequest, s: Served = Depends(served)):
    """Stop serving a LoRA adapter (vLLM's route); its requests still running end with an error."""
    async with s.lora_lock:
        handle = s.loras.get(body.lora_name)
        if handle is None:
            raise ApiError(404, f"no LoRA adapter {body.lora_name!r} is served here; LoRA adapters: "
                                f"{sorted(s.loras)}", "lora_name", "not_found_error")
        await asyncio.get_running_loop().run_in_executor(None, s.llm.engine.unload, handle)  # waits for a step
        del s.loras[body.lora_name]
    return {"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}


@router.post("/tokenize", dependencies=[Depends(authorized)], response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, s: Served = Depends(served)):
    """Token ids of a text (special-token text is the special token, as in Hugging Face's tokenizers)."""
    s.prefix(body.model)  # a model not served here: 404, as the completion routes answer
    ids = await asyncio.get_running_loop().run_in_executor(None, s.llm.engine.tokenizer.encode, body.prompt)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=s.llm.engine.config.n_positions)


@router.post("/detokenize", dependencies=[Depends(authorized)], response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, s: Served = Depends(served)):
    s.prefix(body.model)
    vocab = s.llm.engine.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", "tokens")
    return DetokenizeResponse(prompt=s.llm.engine.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", dependencies=[Depends(authorized)], response_model=TokenizerInfo)
async def tokenizer_info(s: Served = Depends(served)):
    cfg, tok = s.llm.engine.config, s.llm.engine.tokenizer
    return TokenizerInfo(eos_token=tok.token_name(cfg.eos_token_id), bos_token=tok.token_name(cfg.bos_token_id),
                         model_max_length=cfg.n_positions, vocab_size=cfg.vocab_size)


@router.post("/v1/completions", dependencies=[Depends(authorized)], response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the completion, or with stream: true server-sent events"}})
async def create_completion(body: CompletionRequest, request: Request, s: Served = Depends(served),
                            m: Metrics = Depends(metrics)):
    c = await completions.start(s, body)
    m.accepted(c)
    if body.stream:
        return EventStream(m.streamed(c))
    return await _unless_disconnected(c, request, m)


@router.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the chat completion, or with stream: true server-sent events"}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, s: Served = Depends(served),
                                 m: Metrics = Depends(metrics)):
    c = await chat.start(s, body)
    m.accepted(c)
    if body.stream:
        return EventStream(chat.events(m.streamed(c)))
    out = await _unless_disconnected(c, request, m)
    return chat.response(out) if isinstance(out, CompletionResponse) else out


async def _unless_disconnected(c: Completion, request: Request, m: Metrics):
    """The completion, or 499 as soon as the client hangs up (its rows are freed at once)."""
    answer, gone = asyncio.ensure_future(c.response()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():  # the client hung up (or this task was cancelled): stop its sequences
            answer.cancel()
            c.request.cancel()
        m.finished(c)
    if not answer.done():
        return Response(status_code=499)
    try:
        return answer.result()
    except ApiError as e:  # counted above, with its status
        return e.response()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# with metrics_auth, these need the API key too (the playground's / and /static/* stay open: the page asks for it)
INFO_PATHS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class _Guard:
    """ASGI middleware before the routes: bodies over MAX_BODY are a JSON 413 (by Content-Length before any
    is read, else once the bytes read pass it: fastapi's own limit answers text/plain), and with metrics_auth
    the INFO_PATHS need the key."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        if state.metrics_auth and state.api_key and scope.get("path") in INFO_PATHS:
            given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
            if not key_matches(given, state.api_key):
                return await state.metrics.answer(unauthorized())(scope, receive, send)
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None and length.strip().isdigit() and int(length) > MAX_BODY:
            return await state.metrics.answer(_too_large())(scope, receive, send)
        size = 0

        async def limited():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > MAX_BODY:  # a chunked body: fastapi re-raises an HTTPException from its body read
                    raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


def _too_large() -> ApiError:
    return ApiError(413, f"request body of more than {MAX_BODY} bytes")


def _http_error(e: HTTPException) -> ApiError | None:
    """What starlette and fastapi raise as HTTPExceptions, as ApiErrors (None: the client left mid-body)."""
    if isinstance(e.__cause__, ClientDisconnect):  # fastapi turns it into a 400 "error parsing the body"
        return None
    if e.status_code == 413:
        return _too_large()
    if e.status_code == 400:
        return ApiError(400, "the request body could not be parsed as JSON (invalid UTF-8, nested too deeply, or a "
                        "number too long)")
    return ApiError(e.status_code, str(e.detail), headers=e.headers)


def body_fields() -> dict[str, list[str]]:
    """Each route's body model's fields, by path (named for an unknown field)."""
    out = {}
    for r in router.routes:
        if isinstance(r, APIRoute) and r.dependant.body_params:
            out[r.path] = list(getattr(r.dependant.body_params[0].field_info.annotation, "model_fields", {}))
    return out


def create_app(engine, *, model_id: str | None = None, api_key: str | None = None, max_batch: int | None = None,
               max_queue: int = 256, shutdown_timeout: float = 10.0, prefix_cache_mb: float = 512,
               prefixes: dict[str, Prefix] | None = None, read_timeout: float | None = 60.0,
               chat_template: str | None = None, metrics_auth: bool = False,
               loras: dict[str, Lora] | None = None) -> FastAPI:
    """The FastAPI app serving an Engine (behind a new AsyncEngine of max_batch rows, max_queue waiting
    sequences and an automatic prefix cache), an AsyncEngine as it is, or a Served (ServeOptions.served).

    model_id defaults to the model's name from its manifest (a Hub id as given, a folder's name).
    prefixes: more served models, each the engine after a Prefix (e.g. `engine.load_prefix(peft_dir)` for a
    prefix-tuning, prompt-tuning or P-tuning adapter), chosen per request by its "model" field, as vLLM selects
    adapters;
    loras: likewise, LoRA adapters of the engine (`engine.load_lora(peft_dir)`). With an api_key, POST
    /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes) change them while serving.
    read_timeout: seconds a stream may stay unread (its rows held) before it ends with an error event.
    chat_template: the Jinja template of /v1/chat/completions (default: the model's own).
    api_key: required as `Authorization: Bearer KEY` (the scheme in any case) on /v1/*, /tokenize, /detokenize
    and /tokenizer_info; printable ASCII, not blank. metrics_auth: on /metrics, /docs and /openapi.json too.
    /health, the playground page (/) and /static/* stay open.
    """
    problem = api_key_problem(api_key)
    if api_key is not None and not isinstance(api_key, str):
        problem = f"must be a string, got {type(api_key).__name__}"
    if problem:
        raise InvalidInput(problem, "api_key", lead=True)
    if metrics_auth and api_key is None:
        raise InvalidInput("protects /metrics and /docs with the API key: give api_key too", "metrics_auth",
                           lead=True)
    if isinstance(engine, Served):
        served_ = engine
    else:
        prefixes = dict(prefixes or {})
        llm = engine if isinstance(engine, AsyncEngine) else AsyncEngine(
            engine, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb,
            read_timeout=read_timeout)
        served_ = Served(llm, model_id or llm.engine.config.name or llm.engine.folder.name, prefixes,
                         chat_template=chat_template, loras=dict(loras or {}))
    llm = served_.llm

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown, shutdown_timeout)

    app = FastAPI(title="gpt2-onnx", version=_version(), lifespan=lifespan,
                  responses={code: {"model": ErrorResponse, "description": why} for code, why in ERRORS.items()})
    app.state.served, app.state.llm, app.state.api_key = served_, llm, api_key
    app.state.model_id, app.state.metrics, app.state.metrics_auth = served_.model_id, Metrics(llm), metrics_auth
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_Guard, state=app.state)
    answer = app.state.metrics.answer
    fields = body_fields()
    app.add_exception_handler(ApiError, lambda request, e: answer(e))
    app.add_exception_handler(ClientDisconnect, lambda request, e: answer(None))
    app.add_exception_handler(RequestValidationError, lambda request, e: answer(validation_error(
        e.errors(), fields.get(request.url.path, []))))
    app.add_exception_handler(HTTPException, lambda request, e: answer(_http_error(e)))
    app.add_exception_handler(Exception, lambda request, e: answer(ApiError(  # never a text/plain 500
        500, f"internal error: {type(e).__name__}: {str(e)[:300]}", kind="server_error")))
    return app


def _version() -> str:
    from gpt2_onnx import __version__

    return __version__


def serve(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0,
          max_connections: int = ServeOptions.max_connections, header_timeout: float = ServeOptions.header_timeout,
          idle_timeout: float = ServeOptions.idle_timeout,
          max_header_bytes: int = ServeOptions.max_header_bytes) -> None:
    """Run an app from create_app until SIGINT/SIGTERM, then shut down gracefully: the listener stays open and
    every new request gets a JSON 503 + Retry-After while in-flight requests finish, for at most `grace` seconds;
    then each stream still open ends with an error event and each other request with a JSON 503, and the server
    exits (a second signal: at once). Connections are limited as ServeOptions' fields of these names say
    (gpt2_onnx.server.limits)."""
    from gpt2_onnx.server.limits import Limits, server

    ServeOptions(host=host, port=port, grace_period=grace, max_connections=max_connections,  # checks them
                 header_timeout=header_timeout, idle_timeout=idle_timeout, max_header_bytes=max_header_bytes)
    read_timeout = app.state.llm.read_timeout  # a stream left unread ends after it; its connection idle_timeout later
    limits = Limits(max_connections=max_connections, header_timeout=header_timeout, idle_timeout=idle_timeout,
                    max_header_bytes=max_header_bytes, send_timeout=read_timeout + idle_timeout if read_timeout else None)
    server(app, limits, host=host, port=port, grace=grace).run()
