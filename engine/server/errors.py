"""Errors in OpenAI's shape: ApiError, and the engine's errors and pydantic's validation errors as ApiErrors."""

from __future__ import annotations

from gpt2_onnx.errors import Cancelled, InvalidInput, QueueFull, ReadTimeout, ShuttingDown

MAX_BODY = 1 << 20  # 1 MiB
# the library's option names as the completions API calls them
API_NAMES = {"max_new_tokens": "max_tokens", "prompt_logprobs": "logprobs", "min_new_tokens": "min_tokens",
             "num_beams": "use_beam_search",
             "bad_words_ids": "bad_words", "num_return_sequences": "n", "adapter": "model"}
ERRORS = {400: "invalid request (the field is named)", 401: "missing or wrong API key",
          403: "loading LoRA adapters over HTTP on a server without an API key", 404: "unknown model",
          408: "the request's headers or body did not arrive in time", 413: "request body over 1 MiB",
          429: "queue full (Retry-After)", 431: "request headers too large", 500: "generation failed",
          503: "shutting down, or too many connections (Retry-After)"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def of(cls, e: Exception, names: dict[str, str] | None = None) -> "ApiError":
        """The answer for an exception from the engine: bad input 400 (its option by the API's name, or by
        `names`: the request's own), a full queue 429, shutting down 503, anything else a failed generation 500."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, InvalidInput):
            names = {**API_NAMES, **(names or {})}
            return cls(400, e.named(names), names.get(e.param, e.param))
        if isinstance(e, QueueFull):
            return cls(429, f"server busy: {e}", kind="rate_limit_error", headers={"Retry-After": "1"})
        if isinstance(e, ReadTimeout):
            return cls(499, str(e), kind="timeout_error")  # the client stopped reading: counted as one that left
        if isinstance(e, (ShuttingDown, Cancelled)):
            return cls(503, "the server is shutting down; retry", kind="server_error", headers={"Retry-After": "1"})
        if isinstance(e, ValueError):
            return cls(400, str(e))
        return cls(500, f"generation failed: {type(e).__name__}: {str(e)[:300]}", kind="server_error")


def validation_error(errors: list[dict], fields: list[str]) -> ApiError:
    """The first problem of a request body that pydantic found (ValidationError.errors()), naming its field;
    fields: the request's known fields, listed for an unknown one."""
    e = errors[0]
    loc = [x for x in e.get("loc", ()) if x != "body"]
    param = str(loc[0]) if loc and isinstance(loc[0], str) else None
    kind, msg = e.get("type", ""), str(e.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        where = f" at position {loc[0]}" if loc else ""
        return ApiError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', msg)}{where}")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the request body must be a JSON object")
    if kind == "extra_forbidden" and len(loc) > 1:  # inside an object field (structured_outputs, response_format)
        path = ".".join(str(x) for x in loc)
        return ApiError(400, f"unknown field {path!r}; see {param}'s fields in /openapi.json", path)
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}; supported: {sorted(fields)}", param)
    if kind == "missing" and not loc:  # no body at all (fastapi's "Field required" of the body itself)
        return ApiError(400, "the request body is empty: send a JSON object (content-type: application/json)")
    if kind == "missing":
        path = ".".join(str(x) for x in loc) or param
        return ApiError(400, f"{path} is required", path)
    if param == "prompt" and kind != "value_error":
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of those",
                        param)
    got = f", got {e['input']!r}" if kind != "value_error" and "input" in e and len(repr(e["input"])) < 80 else ""
    return ApiError(400, f"{param}: {msg}{got}" if param and kind != "value_error" else msg, param)
