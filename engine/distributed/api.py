"""The OpenAI API of one replica, without HTTP: a request the ingress forwards (method, path, headers, body)
in, the ASGI messages of its answer out, for the ingress to send on as they come.

The answers are the single-process server's: completions come from the completion service
(gpt2_onnx.server.completions) over the replica's AsyncEngine, /v1/models, /tokenize, /detokenize and
/tokenizer_info from create_app's own route functions (gpt2_onnx.server.app), called directly; errors are
ApiErrors, counted in the replica's Metrics as create_app counts them. A request is checked as create_app
checks it, in the same order: its route (404, 405), its JSON body (400), the API key (401), its fields
(400). No ASGI app runs here: the messages are built from the completion service's results.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from gpt2_onnx.server import app as routes
from gpt2_onnx.server import chat, completions
from gpt2_onnx.server.completions import Completion, Served
from gpt2_onnx.server.errors import ApiError, validation_error
from gpt2_onnx.server.metrics import Metrics
from gpt2_onnx.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, LoadLoraRequest,
                                       TokenizeRequest, UnloadLoraRequest)

# what the ingress passes on of a request's headers
HEADERS = ("authorization", "content-type")
STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
# create_app's answers to what fastapi refuses before a route runs
UNPARSABLE = ("the request body could not be parsed as JSON (invalid UTF-8, nested too deeply, or a number too "
              "long)")


def forwarded(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> dict:
    """A forwarded request: what the ingress sends a replica (plain values)."""
    return {"method": method, "path": path, "body": body,
            "headers": {k: v for k, v in (headers or {}).items() if k in HEADERS}}


def messages(response: Response) -> list[dict]:
    """A whole starlette Response as its ASGI messages."""
    return [{"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers},
            {"type": "http.response.body", "body": response.body, "more_body": False}]


def _chunk(data: bytes, more: bool = True) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Api:
    """The routes of create_app over one Served, called without HTTP; `handle(request)` yields lists of ASGI
    messages (those ready together): a whole answer in one list, a stream as its head with the first event,
    then one event per list, then the end."""

    def __init__(self, served: Served, *, api_key: str | None = None):
        self.served, self.api_key, self.metrics = served, api_key, Metrics(served.llm)
        s = served
        # each route's body model and its call; the router's paths, methods and auth say which applies
        self.calls = {
            routes.list_models: (None, lambda _: routes.list_models(s)),
            routes.tokenize: (TokenizeRequest, lambda body: routes.tokenize(body, s)),
            routes.detokenize: (DetokenizeRequest, lambda body: routes.detokenize(body, s)),
            routes.tokenizer_info: (None, lambda _: routes.tokenizer_info(s)),
            routes.create_completion: (CompletionRequest, None),
            routes.create_chat_completion: (ChatCompletionRequest, None),
            routes.load_lora_adapter: (LoadLoraRequest, self._no_runtime_lora),
            routes.unload_lora_adapter: (UnloadLoraRequest, self._no_runtime_lora),
        }
        self.routes = {r.path: r for r in routes.router.routes}

    async def handle(self, request: dict) -> AsyncIterator[list[dict]]:
        """One forwarded request's answer (see forwarded()); the caller stopping early is a client that hung
        up: the request's sequences are cancelled."""
        try:
            c, answer = await self._start(request)
        except ApiError as e:
            c, answer = None, messages(self.metrics.answer(e))
        except Exception as e:  # never a text/plain 500
            c, answer = None, messages(self.metrics.answer(ApiError(
                500, f"internal error: {type(e).__name__}: {str(e)[:300]}", kind="server_error")))
        if c is None:
            yield answer
        elif c.body.stream:
            async for batch in self._stream(c):
                yield batch
        else:
            yield await self._whole(c)

    async def _start(self, request: dict) -> tuple[Completion | None, list[dict] | None]:
        """A started completion, or the whole answer of another route; ApiError if refused."""
        route = self.routes.get(request["path"])
        if route is None:
            raise ApiError(404, "Not Found")
        if request["method"] not in route.methods:
            raise ApiError(405, "Method Not Allowed")
        if route.endpoint not in self.calls:
            raise ApiError(404, f"{request['path']} is answered by the ingress, not by a replica")
        model, call = self.calls[route.endpoint]
        data = self._json(request, model) if model is not None else None
        self._authorize(request, route)
        body = self._validate(model, data) if model is not None else None
        if call is not None:
            return None, messages(JSONResponse((await call(body)).model_dump(mode="json")))
        c = await (chat.start if route.endpoint is routes.create_chat_completion else completions.start)(self.served,
                                                                                                       body)
        c.chat = route.endpoint is routes.create_chat_completion  # answered in the chat shapes
        self.metrics.accepted(c)
        return c, None

    @staticmethod
    async def _no_runtime_lora(body) -> None:
        raise ApiError(400, "on Ray Serve each replica has its own engine: LoRA adapters are loaded at start on every "
                            "replica (--lora NAME=DIR, or lora_adapters in --config), not over HTTP")

    @staticmethod
    def _json(request: dict, model: type[BaseModel]):
        """The body as fastapi reads it: JSON for a JSON content type, else the bytes; None if empty (model: the
        route's body, whose fields an error names)."""
        raw, kind = request["body"], request["headers"].get("content-type", "")
        if not raw:
            return None
        media = kind.split(";")[0].strip().lower()
        if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
            return raw
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise validation_error([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": e.msg}}], list(model.model_fields)) from None
        except Exception:  # invalid UTF-8, too deep, a number too long
            raise ApiError(400, UNPARSABLE) from None

    def _authorize(self, request: dict, route) -> None:
        """As create_app's `authorized`, on the routes that depend on it."""
        if not self.api_key or not any(d.dependency is routes.authorized for d in route.dependencies):
            return
        if not routes.key_matches(request["headers"].get("authorization", ""), self.api_key):
            raise routes.unauthorized()

    @staticmethod
    def _validate(model: type[BaseModel], data):
        fields = list(model.model_fields)  # named for an unknown field, as create_app names the route's body's
        if data is None:  # no body: fastapi's error for a missing one
            raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}],
                                   fields)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors(), fields) from None

    async def _whole(self, c: Completion) -> list[dict]:
        """A completion's JSON answer (its error's if a row failed), counted when it ends (499 if cancelled)."""
        try:
            out = await c.response()
            response = JSONResponse((chat.response(out) if c.chat else out).model_dump(mode="json"))
        except ApiError as e:
            response = e.response()
        finally:
            self.metrics.finished(c)
        return messages(response)

    async def _stream(self, c: Completion) -> AsyncIterator[list[dict]]:
        """A completion's events: the head with the first event, one event per list, then the end."""
        head = [{"type": "http.response.start", "status": 200, "headers": list(STREAM_HEADERS)}]
        events = chat.events(self.metrics.streamed(c)) if c.chat else self.metrics.streamed(c)
        try:
            async for event in events:
                yield [*head, _chunk(event.encode())]
                head = []
        finally:
            await events.aclose()  # counted, its sequences cancelled if it did not end
        yield [*head, _chunk(b"", more=False)]
