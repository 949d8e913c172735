"""The serving options, in one place: ServeOptions (`gpt2-onnx serve`'s flags, a --config file and a Ray
Service's args are the same fields; the single-process server and the Ray deployments read them), the Ray
CPUs of one engine's actor (a Serve replica or a Ray Data batch worker), and --config files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from gpt2_onnx.errors import InvalidInput


class OptionError(InvalidInput):
    """Bad serving options (a ValueError): the message names each option as `{name}`, so that each surface
    says it in its own words (`named(names)`: the CLI's flags; str(): the options' own names)."""

    def __init__(self, template: str, param: str, **values):
        self.template = template.format(**{k: _literal(v) for k, v in values.items()}, **{n: f"{{{n}}}" for n in
                                        _NAMES})
        super().__init__(self.template, param)

    def named(self, names: dict[str, str]) -> str:
        return self.template.format_map({n: names.get(n, n) for n in _NAMES})


def api_key_problem(key) -> str | None:
    """What makes `key` unusable as an API key (None: nothing, or no key). A key is sent as `Authorization:
    Bearer KEY`, a header of ASCII text whose ends are stripped, and compared byte for byte: so printable ASCII,
    not blank, without whitespace at its ends (a non-ASCII key could never match what clients send: HTTP
    clients send headers in ASCII (httpx, the OpenAI SDK) or Latin-1, not UTF-8)."""
    if key is None or not isinstance(key, str):
        return None  # (no key; a non-string is refused as such)
    if key == "":
        return "is empty: pass a non-empty key, or none to serve without authentication"
    if not key.strip():
        return "is blank (only whitespace): pass a key of visible characters, or none to serve without authentication"
    bad = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if bad is not None:
        return (f"must be printable ASCII (it is sent in an HTTP header); character {bad + 1} is "
                f"{'not ASCII' if ord(key[bad]) > 127 else 'a control character'}")
    if key != key.strip():
        return "starts or ends with whitespace, which an HTTP header cannot carry: remove it"
    return None


def _literal(value) -> str:  # a value in a template: its braces are not names
    return repr(value).replace("{", "{{").replace("}", "}}")


def actor_cpus(threads: int, override: float | None = None) -> float:
    """Ray CPUs of one engine's actor (a replica, a batch worker): 0.9 per thread, so that 2 fit 2 cores
    beside the ingress's 0.1; override if given."""
    return override if override is not None else round(0.9 * threads, 3)


@dataclass
class ServeOptions:
    """How to serve, in one process or on Ray. `gpt2-onnx serve` (flags, --config FILE) and app_builder(args)
    take these names."""

    model: str | None = None  # as `-m`: an exported folder, a Hugging Face folder or a Hub id; None = bundled
    provider: str = "auto"
    threads: int | None = None  # onnxruntime threads per engine [default: onnxruntime's; on Ray 1 per replica]
    host: str = "127.0.0.1"  # where the HTTP server (or Ray's proxy) listens
    port: int = 8000
    ray_address: str | None = None  # the Ray cluster to deploy on [default: a local Ray instance]
    served_model_name: str | None = None
    api_key: str | None = None  # None: the replica's $GPT2_ONNX_API_KEY if set, else no authentication
    max_batch: int | None = None  # KV rows per replica; also the requests Ray lets a replica run at once
    #                               [default: AsyncEngine's, 64 on a Linux CPU, else 16]
    max_queue: int = 256  # requests waiting for a replica before 429
    prefix_cache_mb: float = 512
    prefix_adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft prefix/prompt/P-tuning folder
    lora_adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft LoRA folder (--lora-slots export)
    chat_template: str | None = None  # /v1/chat/completions' template: a file or the Jinja text [default: the model's]
    grace_period: float = 10.0  # seconds a stopping replica lets its requests finish
    read_timeout: float = 60.0  # seconds a stream may stay unread (its rows held) before it is ended; 0 = never
    # connection handling of the single-process server (gpt2_onnx.server.limits; Ray Serve's proxy has its own):
    max_connections: int = 512  # open connections; one more gets a JSON 503 + Retry-After (stays under ulimit -n 1024)
    header_timeout: float = 10.0  # seconds for a request's line and headers, from its first byte (a new connection's
    #                               first request: from the connect); then a JSON 408 and the connection is closed
    idle_timeout: float = 15.0  # seconds a connection may stay silent between requests (keep-alive; over httpx's and
    #                             the OpenAI client's 5 s pool expiry, so that the client closes first) and within a
    #                             request's body (then a JSON 408)
    max_header_bytes: int = 32768  # request line + headers (nginx's 4 x 8k); beyond: a JSON 431
    metrics_auth: bool = False  # with api_key: /metrics, /docs, /redoc and /openapi.json need the key too
    replicas: int = 1  # the number of replicas; with autoscaling, the initial number
    min_replicas: int | None = None  # either bound turns autoscaling on
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target per replica [default: max_batch / 2]
    replica_cpus: float | None = None  # Ray CPUs per replica [default: 0.9 x threads]
    ingress_cpus: float = 0.1

    def __post_init__(self) -> None:
        for name, low in (("threads", 1), ("max_batch", 1), ("max_queue", 1), ("replicas", 0),
                          ("min_replicas", 0), ("max_replicas", 1), ("max_connections", 1),
                          ("max_header_bytes", 1024)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise OptionError(f"{{{name}}} must be an integer >= {low}, got {{v}}", name, v=v)
        for name in ("prefix_cache_mb", "grace_period", "read_timeout", "target_ongoing_requests", "replica_cpus",
                     "ingress_cpus"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                  or not math.isfinite(v)):
                raise OptionError(f"{{{name}}} must be a number >= 0, got {{v}}", name, v=v)
        for name in ("header_timeout", "idle_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise OptionError(f"{{{name}}} must be a number of seconds > 0, got {{v}}", name, v=v)
        if not isinstance(self.metrics_auth, bool):
            raise OptionError("{metrics_auth} must be true or false, got {v}", "metrics_auth", v=self.metrics_auth)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise OptionError("{port} must be a TCP port 1..65535, got {v}", "port", v=self.port)
        for name in ("model", "served_model_name", "api_key", "host", "ray_address", "chat_template"):
            v = getattr(self, name)
            if (v is not None or name == "host") and not isinstance(v, str):
                raise OptionError(f"{{{name}}} must be a string, got {{v}}", name, v=v)
        if self.provider not in ("auto", "cpu", "cuda"):
            raise OptionError("{provider} must be auto, cpu or cuda, got {v}", "provider", v=self.provider)
        if self.target_ongoing_requests == 0:
            raise OptionError("{target_ongoing_requests} must be > 0", "target_ongoing_requests")
        if not self.autoscaling and self.replicas < 1:
            raise OptionError("{replicas} must be >= 1 (0 only as the initial number of an autoscaled deployment "
                              "with {min_replicas} 0)", "replicas")
        lo, hi = self.bounds()
        if self.autoscaling and not lo <= self.replicas <= hi:
            raise OptionError("{replicas} ({r}) must lie between {min_replicas} ({lo}) and {max_replicas} ({hi}); "
                              "change one of them", "replicas", r=self.replicas, lo=lo, hi=hi)
        if self.target_ongoing_requests is not None and not self.autoscaling:
            raise OptionError("{target_ongoing_requests} applies to autoscaling: give {min_replicas} or "
                              "{max_replicas} too", "target_ongoing_requests")
        for name in ("prefix_adapters", "lora_adapters"):
            v = getattr(self, name)
            if not isinstance(v, dict) or not all(isinstance(k, str) and k and isinstance(f, str) and f
                                                  for k, f in v.items()):
                raise OptionError(f"{{{name}}} must map served names to folders, got {{v}}", name, v=v)
        both = sorted(set(self.prefix_adapters) & set(self.lora_adapters))
        if both:
            raise OptionError("{lora_adapters} and {prefix_adapters} both serve the name {v}; give each its own",
                              "lora_adapters", v=both[0])
        problem = api_key_problem(self.api_key)
        if problem:
            raise OptionError("{api_key} " + problem.replace("{", "{{").replace("}", "}}"), "api_key")
        if self.metrics_auth and self.api_key is None:
            raise OptionError("{metrics_auth} protects /metrics and /docs with the API key: give {api_key} too",
                              "metrics_auth")

    def connection_limits(self) -> dict:
        """gpt2_onnx.server.serve()'s connection options."""
        return {"max_connections": self.max_connections, "header_timeout": self.header_timeout,
                "idle_timeout": self.idle_timeout, "max_header_bytes": self.max_header_bytes}

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

    @classmethod
    def resolve(cls, config: Path | None = None, given: dict | None = None) -> "ServeOptions":
        """The defaults, then a --config file's options, then those given (a command line's flags)."""
        args = load_config(config) if config is not None else {}
        return cls.from_args({**args, **(given or {})})

    @property
    def replica_threads(self) -> int:
        return self.threads or 1

    def served(self, engine):
        """`engine` behind an AsyncEngine of these options, with the prefix and LoRA adapters loaded: what the
        single-process server and each Ray replica serve (a gpt2_onnx.server.completions.Served)."""
        from gpt2_onnx.async_engine import AsyncEngine
        from gpt2_onnx.server.completions import Served

        model_id = self.served_model_name or engine.config.name or engine.folder.name
        if model_id in self.lora_adapters:
            raise OptionError("{lora_adapters} name {v} is the served model's own id; choose another name",
                              "lora_adapters", v=model_id)
        prefixes = {name: engine.load_prefix(folder) for name, folder in self.prefix_adapters.items()}
        loras = {name: engine.load_lora(folder, name=name) for name, folder in self.lora_adapters.items()}
        llm = AsyncEngine(engine, max_batch=self.max_batch, max_queue=self.max_queue,
                          prefix_cache_mb=self.prefix_cache_mb, read_timeout=self.read_timeout or None)
        from gpt2_onnx.chat import read_template

        template = read_template(self.chat_template) if self.chat_template is not None else None
        return Served(llm, model_id, prefixes, chat_template=template, loras=loras)

    @property
    def rows(self) -> int:
        """KV rows per replica: max_batch, or the engine's default on the provider the replicas resolve (auto:
        CUDA where this machine's onnxruntime offers it, as on the replicas of one image)."""
        from gpt2_onnx.async_engine import MAX_BATCH
        from gpt2_onnx.model import resolve_provider

        return self.max_batch or MAX_BATCH[self.provider if self.provider != "auto" else resolve_provider("auto")]

    def replica_deployment(self) -> dict:
        """serve.deployment() options of the replicas."""
        kw = dict(ray_actor_options={"num_cpus": actor_cpus(self.replica_threads, self.replica_cpus)}, max_ongoing_requests=self.rows,
                  max_queued_requests=self.max_queue, graceful_shutdown_timeout_s=self.grace_period,
                  graceful_shutdown_wait_loop_s=min(self.grace_period, 0.5) or 0.1)
        if self.autoscaling:
            lo, hi = self.bounds()
            kw["autoscaling_config"] = {
                "min_replicas": lo, "max_replicas": hi, "initial_replicas": self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests or max(self.rows / 2, 1)}
        else:
            kw["num_replicas"] = self.replicas
        return kw

    def ingress_deployment(self) -> dict:
        """serve.deployment() options of the ingress: it holds only coroutines waiting on replicas."""
        most = self.bounds()[1]
        return dict(num_replicas=1, ray_actor_options={"num_cpus": self.ingress_cpus},
                    max_ongoing_requests=max(1024, self.max_queue + 2 * self.rows * most))


_NAMES = [f.name for f in fields(ServeOptions)]


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
