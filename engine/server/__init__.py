"""OpenAI-compatible HTTP server (the `serve` extra: fastapi, uvicorn, prometheus_client).

`protocol` holds the request and response models, `metrics` the Prometheus metrics, `app` the routes.
"""

from gpt2_onnx.server.app import ApiError, Worker, create_app, serve

__all__ = ["ApiError", "Worker", "create_app", "serve"]
