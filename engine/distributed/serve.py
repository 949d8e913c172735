"""The OpenAI-compatible server as Ray Serve replicas: two deployments.

- `Replica` (N of them, or autoscaled): one AsyncEngine each, so one generation core and its continuous
  batching per replica, and the API over it without HTTP (gpt2_onnx.distributed.api): a forwarded
  request is answered with the completion service and create_app's route functions, the same code as
  the single-process server, as the ASGI messages of its answer.
- `Ingress` (the HTTP entry; Ray's proxy routes every request to it): reads each request's body, forwards
  it to a replica through a streaming DeploymentHandle and sends on the messages it gets back; answers
  /health and /metrics for all replicas (`handle.broadcast`), and turns what Ray reports about lost
  replicas into OpenAI-shaped answers. It parses nothing else.

Failure semantics (measured on Ray 2.60, see docs/scaling.md): a request waiting in Ray's router for
a replica slot has not started; Ray sends it to another replica when the chosen one is gone. A
request is started once its replica reported it accepted (the first message of the call); if that
replica dies afterwards the request gets a JSON 503 with Retry-After (a stream: an error event, as
the single-process server ends streams it cannot finish). A replica that dies before that first
message never started the request: the ingress sends it again, to another replica (up to RETRIES
times). Ray's backpressure (max_queue requests waiting) is a JSON 429, Ray Serve's other errors (no
replica available, the application being deleted) a JSON 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict

from gpt2_onnx.distributed.cluster import connect
from gpt2_onnx.server.options import ServeOptions, api_key_problem

APP_NAME = "gpt2-onnx"
ACCEPTED = "gpt2onnx.accepted"  # the first message of every forwarded call: the replica started it
REPLICA_HEADER = b"x-gpt2onnx-replica"  # which replica answered (the ingress adds it)
RETRIES = 3  # sends of a request whose replica was lost before it started it
BROADCAST_TIMEOUT_S = 5.0


# ---- the deployments -------------------------------------------------------------------------------
class Replica:
    """One AsyncEngine per Ray Serve replica, and the API over it (gpt2_onnx.distributed.api.Api)."""

    def __init__(self, options: dict):
        from ray import serve

        from gpt2_onnx import Engine
        from gpt2_onnx.distributed.api import Api

        o = ServeOptions.from_args(options)
        self.served = o.served(Engine.load(o.model, provider=o.provider, threads=o.replica_threads))
        key = o.api_key or os.environ.get("GPT2_ONNX_API_KEY") or None
        problem = api_key_problem(key)
        if problem:
            raise ValueError(f"--api-key (or GPT2_ONNX_API_KEY) {problem}")
        self.api = Api(self.served, api_key=key)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.closed = False

    async def handle(self, request: dict):
        """One forwarded request (api.forwarded); yields lists of ASGI messages, the first [ACCEPTED]."""
        yield [{"type": ACCEPTED, "replica": self.id}]
        async for batch in self.api.handle(request):
            yield batch

    def stats(self, metrics: bool = False) -> dict:
        """This replica's state for the ingress's /health, and with metrics its Prometheus text for /metrics."""
        import ray

        s = self.served.llm.stats()
        out = {"replica": self.id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
               "model": self.served.model_id, "active": s["active"], "queue_depth": s["queue_depth"]}
        if metrics:
            out["metrics"] = self.api.metrics.render().decode()
        return out

    def check_health(self) -> None:  # Ray Serve restarts a replica whose check fails
        if not self.served.llm.thread.is_alive():
            raise RuntimeError("the generation thread of this replica is not running")

    def __del__(self) -> None:  # Ray Serve's graceful stop: Ray has already waited grace_period for requests
        if not getattr(self, "closed", True):
            self.closed = True
            self.served.llm.shutdown(timeout=1.0)


class Ingress:
    """The HTTP entry: forwards requests to replicas, answers /health and /metrics for all of them."""

    def __init__(self, replicas, options: dict):
        from prometheus_client import CollectorRegistry
        from ray import serve

        self.options = ServeOptions.from_args(options)
        self.replicas = replicas
        self._page = None
        ctx = serve.get_replica_context()
        self.id, self.deployment, self.app_name = (ctx.replica_id.unique_id, ctx.replica_id.deployment_id.name,
                                                   ctx.replica_id.deployment_id.app_name)
        self.registry = CollectorRegistry()
        self.forwarder = Forwarder(replicas.options(stream=True, method_name="handle"),
                                   max_queue=self.options.max_queue, registry=self.registry)

    def __serve_build_asgi_app__(self):
        async def app(scope, receive, send):  # a plain function: uvicorn's lifespan runner takes it as ASGI 3
            await self.asgi(scope, receive, send)

        return app

    def ingress_metrics(self) -> dict:
        from prometheus_client import generate_latest

        return {"replica": self.id, "metrics": generate_latest(self.registry).decode()}

    async def asgi(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if path == "/health" and method == "GET":
            return await self.health(scope, receive, send)
        if path == "/metrics" and method == "GET":
            return await self.metrics(scope, receive, send)
        if method == "GET" and (path == "/" or path.startswith("/static/")):  # the playground page
            return await self.page(scope, receive, send)
        await self.forwarder.http(scope, receive, send)

    @property
    def page(self):
        """The playground page and its static files, as the single-process server serves them."""
        if self._page is None:
            from starlette.applications import Starlette
            from starlette.responses import FileResponse
            from starlette.routing import Mount, Route
            from starlette.staticfiles import StaticFiles

            from gpt2_onnx.server.app import STATIC

            async def index(request):
                return FileResponse(STATIC / "index.html", media_type="text/html")

            self._page = Starlette(routes=[Route("/", index), Mount("/static", StaticFiles(directory=STATIC))])
        return self._page

    async def _stats(self, metrics: bool = False) -> list[dict]:
        """Every live replica's stats (a replica that does not answer in 5 s is left out)."""
        try:
            results = await self.replicas.broadcast("stats", metrics).results_async(timeout_s=BROADCAST_TIMEOUT_S,
                                                                                    return_exceptions=True)
        except Exception:  # TimeoutError, DeploymentUnavailableError (none running yet): none answered
            return []
        return [r for r in results if isinstance(r, dict)]

    async def health(self, scope, receive, send) -> None:
        from starlette.responses import JSONResponse

        stats = await self._stats()
        body = {"status": "ok" if stats else "unavailable", "model": stats[0]["model"] if stats else None,
                "active": sum(s["active"] for s in stats), "queue_depth": sum(s["queue_depth"] for s in stats),
                "replicas": [{k: s[k] for k in ("replica", "node", "pid", "active", "queue_depth")} for s in stats]}
        await JSONResponse(body, status_code=200 if stats else 503)(scope, receive, send)

    async def metrics(self, scope, receive, send) -> None:
        """Every replica's metrics (label replica=...) and every ingress replica's, in one exposition."""
        from ray import serve
        from starlette.responses import Response

        stats = await self._stats(metrics=True)
        own = serve.get_deployment_handle(self.deployment, self.app_name).broadcast("ingress_metrics")
        try:
            ingress = [r for r in await own.results_async(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)
                       if isinstance(r, dict)]
        except Exception:  # TimeoutError, DeploymentUnavailableError: this replica's own, at least
            ingress = [self.ingress_metrics()]
        text = merge_metrics([("Replica", s["replica"], s["metrics"]) for s in stats]
                             + [(self.deployment, r["replica"], r["metrics"]) for r in ingress],
                             replicas=len(stats))
        await Response(text, media_type="text/plain; version=0.0.4")(scope, receive, send)


class Forwarder:
    """The ingress's part that relays requests to replicas: `calls.remote(request)` is one call of the
    replicas' `handle` (a streaming DeploymentHandle's), an async iterator of lists of ASGI messages."""

    def __init__(self, calls, *, max_queue: int, registry):
        from prometheus_client import Counter

        self.calls, self.max_queue = calls, max_queue
        self.requests = Counter("gpt2onnx_requests", "requests answered by the ingress itself, by HTTP status",
                                ["status"], registry=registry)
        self.resent = Counter("gpt2onnx_ray_resent_requests", "requests sent again after their replica was "
                              "lost before it started them", registry=registry)

    async def http(self, scope: dict, receive, send) -> None:
        """One HTTP request: its body read here (over 1 MiB: 413, as create_app answers), then forwarded."""
        from gpt2_onnx.server.errors import MAX_BODY, ApiError

        body = await _read_body(receive)
        if body is None:
            return  # the client left before sending its body
        if len(body) > MAX_BODY:
            return await self.answer(scope, send, ApiError(413, f"request body of more than {MAX_BODY} bytes"))
        await self.forward(scope, body, send)

    async def forward(self, scope: dict, body: bytes, send) -> None:
        """Send one request to a replica and relay its answer; what Ray reports about a lost replica
        becomes a resend (not started yet), a JSON 503 or a stream's error event."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, RayServeException

        from gpt2_onnx.distributed.api import forwarded

        given = {bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1") for k, v in scope.get("headers", [])}
        request = forwarded(scope.get("method", "GET"), scope.get("path", "/"), given, body)
        for attempt in range(RETRIES + 1):
            calls = self.calls.remote(request)
            replica, started, streaming = None, False, False
            try:
                async for batch in calls:
                    for m in batch:
                        if m["type"] == ACCEPTED:
                            replica = m["replica"]
                            continue
                        if m["type"] == "http.response.start":
                            started = True
                            headers = [(bytes(k), bytes(v)) for k, v in m.get("headers", [])]
                            streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                            for k, v in headers)
                            m = {**m, "headers": [*headers, (REPLICA_HEADER, replica.encode())]}
                        await send(m)
                        if m["type"] == "http.response.body" and not m.get("more_body", False):
                            return  # answered in full: the replica's end (or its loss) changes nothing now
                return
            except asyncio.CancelledError:  # the client hung up: so does the replica's call (it frees the rows)
                calls.cancel()
                raise
            except BackPressureError:
                return await self.error(scope, send, 429, f"server busy: more than {self.max_queue} requests "
                                        "are waiting for a replica", "rate_limit_error")
            except (RayActorError, RayServeException) as e:  # the replica died, or none is available
                lost = isinstance(e, RayActorError)
                if lost and replica is None and attempt < RETRIES:  # it never started: send it again, elsewhere
                    self.resent.inc()
                    continue
                message = (f"the replica serving this request was lost ({type(e).__name__}); it is being restarted: "
                           "retry" if lost or started else
                           f"no replica can take this request now ({type(e).__name__}); retry")
                if not started:
                    return await self.error(scope, send, 503, message, "server_error", replica)
                self.requests.labels("503").inc()
                if streaming:  # as create_app ends a stream it cannot finish: an error event, no [DONE]
                    event = "data: " + json.dumps({"error": {"message": message, "type": "server_error"}}) + "\n\n"
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": False})
                else:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return

    async def error(self, scope, send, status: int, message: str, kind: str, replica: str | None = None) -> None:
        from gpt2_onnx.server.errors import ApiError

        headers = {"Retry-After": "1", **({REPLICA_HEADER.decode(): replica} if replica else {})}
        await self.answer(scope, send, ApiError(status, message, kind=kind, headers=headers))

    async def answer(self, scope, send, e) -> None:
        """An ApiError answered by the ingress itself, counted by its status."""
        self.requests.labels(str(e.status)).inc()
        await e.response()(scope, _never, send)


async def _never() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _read_body(receive) -> bytes | None:
    """The request body, cut one byte past the server's 1 MiB limit; None if the client left."""
    from gpt2_onnx.server.errors import MAX_BODY

    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY or not message.get("more_body", False):
            return b"".join(chunks)[: MAX_BODY + 1]


def merge_metrics(parts: list[tuple[str, str, str]], *, replicas: int) -> bytes:
    """One Prometheus exposition from (deployment, replica id, text) parts: every sample labelled with its
    deployment and replica (per-replica series, so that a restarted replica's counters reset on their own;
    sum() over replica in PromQL adds them up), plus gpt2onnx_replicas_reporting."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for deployment, replica, text in parts:
        for f in text_string_to_metric_families(text):
            m = families.get(f.name)
            if m is None:
                m = families[f.name] = Metric(f.name, f.documentation, f.type, f.unit)
            for s in f.samples:
                m.add_sample(s.name, {**s.labels, "deployment": deployment, "replica": replica}, s.value,
                             s.timestamp, s.exemplar)
    reporting = Metric("gpt2onnx_replicas_reporting", "engine replicas that answered this scrape", "gauge")
    reporting.add_sample("gpt2onnx_replicas_reporting", {}, replicas)

    class Merged:
        def collect(self):
            return [*families.values(), reporting]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# ---- building and running the application -------------------------------------------------------
def build(options: ServeOptions):
    """The Ray Serve application: Ingress bound to Replica."""
    from ray import serve

    args = asdict(options)
    replica = serve.deployment(Replica, name="Replica", **options.replica_deployment())
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", **options.ingress_deployment())
    return ingress.bind(replica.bind(args), args)


def app_builder(args: dict):
    """The import_path of a Serve config or KubeRay RayService (`gpt2_onnx.distributed:app_builder`):
    args are ServeOptions' fields (model, threads, replicas, min_replicas, max_replicas, ...)."""
    return build(ServeOptions.from_args(args))


def serve_forever(options: ServeOptions, *, address: str | None, host: str, port: int,
                  on_ready: Callable[[str], None] = print) -> None:
    """Deploy on Ray Serve and block until SIGINT/SIGTERM; then delete the application (replicas let their
    requests finish for grace_period seconds) and, if it was started here, stop the local Ray instance."""
    import ray
    from ray import serve

    local = connect(address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(options), name=APP_NAME, route_prefix="/")
        host, port = _http_address(host, port)
        on_ready(f"serving on http://{host}:{port}/v1 with {options.replicas} replica(s) on Ray "
                 f"({'a local instance' if local else address})")
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            if local:
                ray.shutdown()


def _http_address(host: str, port: int) -> tuple[str, int]:
    """Where Ray's proxy listens: Serve may already run on the cluster with its own HTTP options."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return config.host, config.port
    except Exception:  # a Ray version without it: what was asked for
        return host, port
