"""Beyond one machine: the OpenAI-compatible server as Ray Serve replicas, batch jobs on Ray Data.

Imported only when Ray is asked for (`gpt2-onnx serve --replicas N`, `gpt2-onnx batch --replicas N`,
a KubeRay RayService naming `gpt2_onnx.distributed:app_builder`): the runtime itself never imports ray.

Serving is two Ray Serve deployments:

- `Replica` (N of them, or autoscaled): one Engine and one `create_app` each, so one generation core
  and its continuous batching per replica. It answers requests forwarded as ASGI calls
  (gpt2_onnx.server.asgi): the routes are create_app's, the same code as the single-process server.
- `Ingress` (the HTTP entry; Ray's proxy routes every request to it): forwards each request to a
  replica through a streaming DeploymentHandle, answers /health and /metrics for all replicas
  (`handle.broadcast`), and turns what Ray reports about lost replicas into OpenAI-shaped answers.

Failure semantics (measured on Ray 2.60, see docs/scaling.md): a request waiting in Ray's router for
a replica slot has not started; Ray sends it to another replica when the chosen one is gone. A
request is started once its replica reported it accepted (the first message of the call); if that
replica dies afterwards the request gets a JSON 503 with Retry-After (a stream: an error event, as
the single-process server ends streams it cannot finish). A replica that dies before that first
message never started the request: the ingress sends it again, to another replica.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

APP_NAME = "gpt2-onnx"
ACCEPTED = "gpt2onnx.accepted"  # the first message of every forwarded call: the replica started it
REPLICA_HEADER = b"x-gpt2onnx-replica"  # which replica answered (the ingress adds it)
RETRIES = 3  # sends of a request whose replica was lost before it started it
BROADCAST_TIMEOUT_S = 5.0


# ---- options: the CLI's flags, a --config file and a RayService's args are the same fields -----------
def actor_cpus(threads: int, override: float | None = None) -> float:
    """Ray CPUs of one engine's actor (a replica, a batch worker): 0.9 per thread, so that 2 fit 2 cores
    beside the ingress's 0.1; override if given."""
    return override if override is not None else round(0.9 * threads, 3)


@dataclass
class ServeOptions:
    """How to serve on Ray. `gpt2-onnx serve --config FILE` and app_builder(args) take these names."""

    model: str | None = None  # as `-m`: an exported folder, a Hugging Face folder or a Hub id; None = bundled
    provider: str = "auto"
    threads: int = 1  # onnxruntime threads per replica
    served_model_name: str | None = None
    api_key: str | None = None  # None: the replica's $GPT2_ONNX_API_KEY if set, else no authentication
    max_batch: int = 16  # KV rows per replica; also the requests Ray lets a replica run at once
    max_queue: int = 256  # requests waiting for a replica before 429
    prefix_cache_mb: float = 512
    prefix_adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft prefix-tuning folder
    grace_period: float = 10.0  # seconds a stopping replica lets its requests finish
    replicas: int = 1  # the number of replicas; with autoscaling, the initial number
    min_replicas: int | None = None  # either bound turns autoscaling on
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica [default: max_batch / 2]
    replica_cpus: float | None = None  # Ray CPUs per replica [default: 0.9 x threads]
    ingress_cpus: float = 0.1

    def __post_init__(self) -> None:
        for name, low in (("threads", 1), ("max_batch", 1), ("max_queue", 1), ("replicas", 0),
                          ("min_replicas", 0), ("max_replicas", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("prefix_cache_mb", "grace_period", "target_ongoing_requests", "replica_cpus", "ingress_cpus"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                  or not math.isfinite(v)):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("model", "served_model_name", "api_key"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string, got {v!r}")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise ValueError(f"provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.target_ongoing_requests == 0:
            raise ValueError("target_ongoing_requests must be > 0")
        if not self.autoscaling and self.replicas < 1:
            raise ValueError("replicas must be >= 1 (0 only as the initial number of an autoscaled deployment "
                             "with min_replicas 0)")
        lo, hi = self.bounds()
        if self.autoscaling and not lo <= self.replicas <= hi:
            raise ValueError(f"replicas ({self.replicas}) must lie between min_replicas ({lo}) and max_replicas ({hi}); "
                             "change one of them")
        if self.target_ongoing_requests is not None and not self.autoscaling:
            raise ValueError("target_ongoing_requests applies to autoscaling: give min_replicas or max_replicas too")
        if not isinstance(self.prefix_adapters, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.prefix_adapters.items()):
            raise ValueError(f"prefix_adapters must map served names to folders, got {self.prefix_adapters!r}")
        if self.api_key == "":
            raise ValueError("api_key is empty: pass a non-empty key, or none to serve without authentication")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def bounds(self) -> tuple[int, int]:
        """(min, max) replicas: the number given, or the autoscaling bounds (a missing one from replicas)."""
        if not self.autoscaling:
            return self.replicas, self.replicas
        return (self.min_replicas if self.min_replicas is not None else min(1, self.replicas),
                self.max_replicas if self.max_replicas is not None else max(self.replicas, 1))

    @classmethod
    def from_args(cls, args: dict | None) -> "ServeOptions":
        """Options from a dict (a --config file, a RayService's args); unknown keys are an error."""
        args = dict(args or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; known: {known}")
        return cls(**args)

    def replica_deployment(self) -> dict:
        """serve.deployment() options of the replicas."""
        kw = dict(ray_actor_options={"num_cpus": actor_cpus(self.threads, self.replica_cpus)}, max_ongoing_requests=self.max_batch,
                  max_queued_requests=self.max_queue, graceful_shutdown_timeout_s=self.grace_period,
                  graceful_shutdown_wait_loop_s=min(self.grace_period, 0.5) or 0.1)
        if self.autoscaling:
            lo, hi = self.bounds()
            kw["autoscaling_config"] = {
                "min_replicas": lo, "max_replicas": hi, "initial_replicas": self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests or max(self.max_batch / 2, 1)}
        else:
            kw["num_replicas"] = self.replicas
        return kw

    def ingress_deployment(self) -> dict:
        """serve.deployment() options of the ingress: it holds only coroutines waiting on replicas."""
        most = self.bounds()[1]
        return dict(num_replicas=1, ray_actor_options={"num_cpus": self.ingress_cpus},
                    max_ongoing_requests=max(1024, self.max_queue + 2 * self.max_batch * most))


# ---- the deployments -------------------------------------------------------------------------------
class Replica:
    """One engine and its scheduler (create_app's Worker) per Ray Serve replica."""

    def __init__(self, options: dict):
        from gpt2_onnx import Engine
        from gpt2_onnx.server import create_app
        from ray import serve

        o = ServeOptions.from_args(options)
        engine = Engine.load(o.model, provider=o.provider, threads=o.threads)
        prefixes = {name: engine.load_prefix(folder) for name, folder in o.prefix_adapters.items()}
        self.app = create_app(engine, model_id=o.served_model_name,
                              api_key=o.api_key or os.environ.get("GPT2_ONNX_API_KEY") or None,
                              max_batch=o.max_batch, max_queue=o.max_queue, prefix_cache_mb=o.prefix_cache_mb,
                              prefixes=prefixes)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.closed = False

    async def handle(self, scope: dict, body: bytes):
        """One HTTP request through create_app's routes; yields lists of ASGI messages, the first [ACCEPTED]."""
        from gpt2_onnx.server.asgi import call

        yield [{"type": ACCEPTED, "replica": self.id}]
        async for batch in call(self.app, scope, body):
            yield batch

    def stats(self, metrics: bool = False) -> dict:
        """This replica's state for the ingress's /health, and with metrics its Prometheus text for /metrics."""
        import ray

        core = self.app.state.core
        out = {"replica": self.id, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
               "model": self.app.state.model_id, "active": len(core.running), "queue_depth": len(core.waiting)}
        if metrics:
            out["metrics"] = self.app.state.metrics.render().decode()
        return out

    def check_health(self) -> None:  # Ray Serve restarts a replica whose check fails
        if not self.app.state.worker.thread.is_alive():
            raise RuntimeError("the generation thread of this replica is not running")

    def __del__(self) -> None:  # Ray Serve's graceful stop: Ray has already waited grace_period for requests
        if not getattr(self, "closed", True):
            self.closed = True
            self.app.state.worker.shutdown(timeout=1.0)


class Ingress:
    """The HTTP entry: forwards requests to replicas, answers /health and /metrics for all of them."""

    def __init__(self, replicas, options: dict):
        from prometheus_client import CollectorRegistry
        from ray import serve

        self.options = ServeOptions.from_args(options)
        self.replicas = replicas
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
        body = await _read_body(receive)
        if body is None:
            return  # the client left before sending its body
        await self.forwarder.forward(scope, body, send)

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
    """The ingress's part that relays requests to replicas (a streaming DeploymentHandle's `handle`)."""

    def __init__(self, calls, *, max_queue: int, registry):
        from prometheus_client import Counter

        self.calls, self.max_queue = calls, max_queue
        self.requests = Counter("gpt2onnx_requests", "requests answered by the ingress itself, by HTTP status",
                                ["status"], registry=registry)
        self.resent = Counter("gpt2onnx_ray_resent_requests", "requests sent again after their replica was "
                              "lost before it started them", registry=registry)

    async def forward(self, scope: dict, body: bytes, send) -> None:
        """Send one request to a replica and relay its answer; what Ray reports about a lost replica
        becomes a resend (not started yet), a JSON 503 or a stream's error event."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, RayServeException

        inner = _inner_scope(scope, body)
        for attempt in range(RETRIES + 1):
            calls = self.calls.remote(inner, body)
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
            except asyncio.CancelledError:  # the client hung up: so does the replica's app (it frees the rows)
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
        from gpt2_onnx.server.app import ApiError

        self.requests.labels(str(status)).inc()
        headers = {"Retry-After": "1", **({REPLICA_HEADER.decode(): replica} if replica else {})}
        await ApiError(status, message, kind=kind, headers=headers).response()(scope, _never, send)



async def _never() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _read_body(receive) -> bytes | None:
    """The request body, cut one byte past the server's 1 MiB limit (the replica's app answers 413)."""
    from gpt2_onnx.server.app import MAX_BODY

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


def _inner_scope(scope: dict, body: bytes) -> dict:
    """The parts of the proxy's ASGI scope a replica's app needs (plain, serializable values)."""
    from gpt2_onnx.server.asgi import http_scope

    headers = [(bytes(k), bytes(v)) for k, v in scope.get("headers", []) if bytes(k).lower() != b"content-length"]
    client = scope.get("client")
    return http_scope(scope.get("method", "GET"), scope.get("path", "/"),
                      headers=[*headers, (b"content-length", str(len(body)).encode())],
                      query_string=scope.get("query_string", b""), client=tuple(client) if client else None)


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


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local Ray instance (True) that keeps to loopback:
    every Ray process listens on and talks to 127.0.0.1, usage statistics off."""
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # children: the node's address is 127.0.0.1
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return False
    if address is None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # this process: a single-node instance on 127.0.0.1
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 configure_logging=True)
        return True
    try:
        ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r} ({str(e).splitlines()[0][:200]}); "
                         "check --ray-address (host:port of the head node's GCS, or 'auto')") from None
    return False


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


# ---- batch jobs on Ray Data ------------------------------------------------------------------------
def run_batch(rows: list[str], on_rows: Callable[[list[str]], None], *, worker: dict, replicas: int,
              address: str | None, batch_size: int, cpus: float | None = None) -> None:
    """Ray Data map_batches over raw JSONL rows with a pool of `replicas` actors (gpt2_onnx.batch.BatchWorker,
    one engine each); on_rows gets each finished batch's output rows, in the driver, as they come."""
    import ray
    import ray.data

    from gpt2_onnx.batch import BatchWorker

    local = connect(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        ctx.print_on_execution_start = False
        threads = worker.get("threads") or 1
        ds = ray.data.from_items([{"row": r} for r in rows], override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
        out = ds.map_batches(BatchWorker, fn_constructor_kwargs={**worker, "threads": threads}, batch_size=batch_size,
                             compute=ray.data.ActorPoolStrategy(size=replicas), batch_format="numpy",
                             num_cpus=actor_cpus(threads, cpus))
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            on_rows([str(r) for r in batch["row"]])
    finally:
        if local:
            ray.shutdown()


def load_config(path: Path) -> dict:
    """A --config file: YAML or JSON with ServeOptions' fields."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --config {path}: {e}") from None
    try:
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"--config {path} is not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of options (replicas: 2, ...), got "
                         f"{type(data).__name__}")
    return data
