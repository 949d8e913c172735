"""The routes: POST /v1/completions and /v1/chat/completions (SSE streaming), GET /v1/models, /tokenize, /detokenize,
/tokenizer_info, /health, /metrics.

Each route is a few lines over the completion service (server/completions.py), which submits to the
app's AsyncEngine: continuous batching across requests on a KV pool on the session's device, with an
automatic prefix cache. Auth is a dependency; every error is OpenAI-shaped JSON (server/errors.py).
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from gpt2_onnx.async_engine import AsyncEngine
from gpt2_onnx.errors import InvalidInput
from gpt2_onnx.server import chat, completions
from gpt2_onnx.server.completions import Completion, Served
from gpt2_onnx.server.errors import ERRORS, MAX_BODY, ApiError, validation_error
from gpt2_onnx.server.metrics import Metrics
from gpt2_onnx.server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                       CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                       ErrorResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
                                       TokenizerInfo)
from gpt2_onnx.types import Prefix

router = APIRouter()


def served(request: Request) -> Served:
    return request.app.state.served


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def authorized(request: Request) -> None:
    key = request.app.state.api_key
    if key and not secrets.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")


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


@router.post("/tokenize", dependencies=[Depends(authorized)], response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, s: Served = Depends(served)):
    """Token ids of a text (special-token text is the special token, as in Hugging Face's tokenizers)."""
    ids = await asyncio.get_running_loop().run_in_executor(None, s.llm.engine.tokenizer.encode, body.prompt)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=s.llm.engine.config.n_positions)


@router.post("/detokenize", dependencies=[Depends(authorized)], response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, s: Served = Depends(served)):
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
        return StreamingResponse(m.streamed(c), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _unless_disconnected(c, request, m)


@router.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "the chat completion, or with stream: true server-sent events"}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, s: Served = Depends(served),
                                 m: Metrics = Depends(metrics)):
    c = await chat.start(s, body)
    m.accepted(c)
    if body.stream:
        return StreamingResponse(chat.events(m.streamed(c)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
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


def create_app(engine, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256, shutdown_timeout: float = 10.0, prefix_cache_mb: float = 512,
               prefixes: dict[str, Prefix] | None = None, read_timeout: float | None = 60.0,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving an Engine (behind a new AsyncEngine of max_batch rows, max_queue waiting
    sequences and an automatic prefix cache), an AsyncEngine as it is, or a Served (ServeOptions.served).

    model_id defaults to the model's name from its manifest (a Hub id as given, a folder's name).
    prefixes: more served models, each the engine after a Prefix (e.g. `engine.load_prefix(peft_dir)`
    for a prefix-tuning adapter), chosen per request by its "model" field, as vLLM selects adapters.
    read_timeout: seconds a stream may stay unread (its rows held) before it ends with an error event.
    chat_template: the Jinja template of /v1/chat/completions (default: the model's own).
    """
    if api_key == "":
        raise InvalidInput("is empty: pass a non-empty key, or none to serve without authentication", "api_key",
                           lead=True)
    if isinstance(engine, Served):
        served_ = engine
    else:
        prefixes = dict(prefixes or {})
        llm = engine if isinstance(engine, AsyncEngine) else AsyncEngine(
            engine, max_batch=max_batch, max_queue=max_queue, prefix_cache_mb=prefix_cache_mb,
            read_timeout=read_timeout)
        served_ = Served(llm, model_id or llm.engine.config.name or llm.engine.folder.name, prefixes,
                         chat_template=chat_template)
    llm = served_.llm

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, llm.shutdown, shutdown_timeout)

    app = FastAPI(title="gpt2-onnx", version=_version(), lifespan=lifespan, max_body_size=MAX_BODY,
                  responses={code: {"model": ErrorResponse, "description": why} for code, why in ERRORS.items()})
    app.state.served, app.state.llm, app.state.api_key = served_, llm, api_key
    app.state.model_id, app.state.metrics = served_.model_id, Metrics(llm)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    answer = app.state.metrics.answer
    fields = {"/v1/completions": list(CompletionRequest.model_fields),
              "/v1/chat/completions": list(ChatCompletionRequest.model_fields)}
    app.add_exception_handler(ApiError, lambda request, e: answer(e))
    app.add_exception_handler(ClientDisconnect, lambda request, e: answer(None))
    app.add_exception_handler(RequestValidationError, lambda request, e: answer(validation_error(
        e.errors(), fields.get(request.url.path, fields["/v1/completions"]))))
    app.add_exception_handler(HTTPException, lambda request, e: answer(ApiError(
        e.status_code, f"request body of more than {MAX_BODY} bytes" if e.status_code == 413 else
        "the request body could not be parsed as JSON (invalid UTF-8, nested too deeply, or a number too long)"
        if e.status_code == 400 else str(e.detail))))
    app.add_exception_handler(Exception, lambda request, e: answer(ApiError(  # never a text/plain 500
        500, f"internal error: {type(e).__name__}: {str(e)[:300]}", kind="server_error")))
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
        if not app.state.llm.stopping:
            app.state.llm.drain(grace)
        stop(sig, frame)

    server.handle_exit = handle_exit
    server.run()
