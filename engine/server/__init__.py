"""OpenAI-compatible HTTP server (the `serve` extra: fastapi, uvicorn, prometheus_client).

`protocol` holds the request and response models and `completions` the completion service (both need
pydantic only, so `gpt2-onnx batch` runs without fastapi), `errors` the OpenAI-shaped errors,
`metrics` the Prometheus metrics, `app` the routes.
"""

__all__ = ["ApiError", "create_app", "serve"]


def __getattr__(name: str):  # the routes (and fastapi) load only when asked for
    if name in ("create_app", "serve"):
        from gpt2_onnx.server import app

        return getattr(app, name)
    if name == "ApiError":
        from gpt2_onnx.server.errors import ApiError

        return ApiError
    raise AttributeError(f"module 'gpt2_onnx.server' has no attribute {name!r}")
