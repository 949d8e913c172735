"""Ray: `gpt2-onnx serve --replicas 2` on Ray Serve and `gpt2-onnx batch --replicas 2` on Ray Data, on one
local Ray instance of 2 CPUs for the module (loopback only, shut down at the end), plus the ingress's
failure handling against a scripted handle, a replica's answers against the single-process server's
(without Ray), the options, and the KubeRay manifest. Bounded in time."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from gpt2_onnx import Engine
from gpt2_onnx.batch import run
from gpt2_onnx.distributed import ACCEPTED, REPLICA_HEADER, RETRIES, Forwarder, ServeOptions, app_builder, connect
from gpt2_onnx.server import create_app
from helpers import Server, read_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-ray"
AUTH = {"authorization": f"Bearer {KEY}"}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


# ---- the ingress's handling of lost replicas, against a scripted handle (no Ray instance) ----------------
class Script:
    """What a replica call yields: lists of ASGI messages, or an exception raised in their place."""

    def __init__(self, *items):
        self.items, self.cancelled = items, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for item in self.items:
            if isinstance(item, Exception):
                raise item
            yield item

    def cancel(self):
        self.cancelled = True


class Calls:
    def __init__(self, *scripts):
        self.scripts, self.sent, self.requests = list(scripts), 0, []

    def remote(self, request):
        self.sent += 1
        self.requests.append(request)
        return self.scripts.pop(0)


def relay(*scripts):
    """(messages sent to the client, calls made, the forwarder) for one request."""
    from prometheus_client import CollectorRegistry

    calls, sent = Calls(*scripts), []
    fwd = Forwarder(calls, max_queue=7, registry=CollectorRegistry())

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-type", b"x")]}
    asyncio.run(fwd.forward(scope, b"{}", send))
    return sent, calls.sent, fwd


def accepted(replica="r1"):
    return [{"type": ACCEPTED, "replica": replica}]


def response(status=200, body=b'{"ok": 1}', kind=b"application/json"):
    return [{"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]},
            {"type": "http.response.body", "body": body, "more_body": False}]


def status_and_body(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_a_request_lost_before_its_replica_started_it_is_sent_again():
    sent, n, fwd = relay(Script(ActorDiedError()), Script(accepted("r2"), response()))
    status, headers, body = status_and_body(sent)
    assert (status, body, n) == (200, b'{"ok": 1}', 2) and headers[REPLICA_HEADER] == b"r2"
    assert fwd.resent._value.get() == 1
    sent, n, _ = relay(*[Script(ActorDiedError()) for _ in range(RETRIES + 1)])  # never started anywhere: 503
    assert n == RETRIES + 1 and status_and_body(sent)[0] == 503


def test_a_request_running_on_a_lost_replica_gets_an_openai_503():
    sent, n, fwd = relay(Script(accepted("r1"), ActorDiedError()))
    status, headers, body = status_and_body(sent)
    err = json.loads(body)["error"]
    assert (status, n) == (503, 1) and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and "replica" in err["message"] and "retry" in err["message"]
    assert headers[b"retry-after"] == b"1" and headers[REPLICA_HEADER] == b"r1"
    assert fwd.requests.labels("503")._value.get() == 1


def test_a_replica_lost_after_its_answer_was_complete_changes_nothing():
    sent, n, fwd = relay(Script(accepted(), response(), ActorDiedError()))
    assert status_and_body(sent)[:3:2] == (200, b'{"ok": 1}') and len(sent) == 2 and n == 1
    assert fwd.requests.labels("503")._value.get() == 0


def test_a_stream_on_a_lost_replica_ends_with_an_error_event():
    chunk = b'data: {"choices": [{"text": "a"}]}\n\n'
    sent, n, _ = relay(Script(accepted(), [{"type": "http.response.start", "status": 200,
                                            "headers": [(b"content-type", b"text/event-stream")]},
                                           {"type": "http.response.body", "body": chunk, "more_body": True}],
                              ActorDiedError()))
    status, _, body = status_and_body(sent)
    events = [e for e in body.decode().split("\n\n") if e]
    assert (status, n) == (200, 1) and events[0] == chunk.decode().strip()
    assert json.loads(events[-1].removeprefix("data: "))["error"]["type"] == "server_error"
    assert "[DONE]" not in body.decode() and sent[-1]["more_body"] is False


def test_no_replica_available_is_an_openai_503():
    from ray.serve.exceptions import RayServeException

    sent, n, _ = relay(Script(RayServeException("Deployment(name='Replica') is unavailable")))
    status, headers, body = status_and_body(sent)
    assert (status, n) == (503, 1) and headers[b"retry-after"] == b"1"
    assert "no replica can take this request" in json.loads(body)["error"]["message"]


def test_backpressure_is_an_openai_429():
    sent, _, _ = relay(Script(BackPressureError(num_queued_requests=7, max_queued_requests=7)))
    status, headers, body = status_and_body(sent)
    assert status == 429 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["type"] == "rate_limit_error" and "7 requests" in json.loads(body)["error"]["message"]


def test_the_ingress_forwards_the_request_and_answers_a_body_over_1_mib_itself():
    from prometheus_client import CollectorRegistry

    calls, sent = Calls(Script(accepted(), response())), []
    fwd = Forwarder(calls, max_queue=7, registry=CollectorRegistry())

    async def send(m):
        sent.append(m)

    def receive(body):
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def next_message():
            return messages.pop(0)

        return next_message

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"Authorization", b"Bearer k"), (b"content-type", b"application/json"), (b"cookie", b"c")]}
    asyncio.run(fwd.http(scope, receive(b'{"prompt": "x"}'), send))
    assert calls.requests == [{"method": "POST", "path": "/v1/completions", "body": b'{"prompt": "x"}',
                               "headers": {"authorization": "Bearer k", "content-type": "application/json"}}]
    sent.clear()
    asyncio.run(fwd.http(scope, receive(b"{" + b" " * (1 << 20) + b"}"), send))
    status, _, body = status_and_body(sent)
    assert (status, calls.sent) == (413, 1) and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert fwd.requests.labels("413")._value.get() == 1


# ---- a replica's answers are the single-process server's (its Api behind the ingress's Forwarder, no Ray) ---
class Local:
    """The replicas' streaming handle, in this process: each call is Replica.handle's, over one Api."""

    def __init__(self, api):
        self.api = api

    def remote(self, request):
        api = self.api

        class Call:
            async def _run(self):
                yield accepted("local")
                async for batch in api.handle(request):
                    yield batch

            def __aiter__(self):
                return self._run()

            def cancel(self):
                pass  # the ingress's task is cancelled: so is this iteration, in the same task

        return Call()


def _scrub(x):
    """An answer without what differs from one server to another (ids, creation times)."""
    if isinstance(x, dict):
        return {k: _scrub(v) for k, v in x.items() if k not in ("id", "created")}
    return [_scrub(v) for v in x] if isinstance(x, list) else x


def _answer(url: str, method: str, path: str, headers: dict, body) -> tuple:
    content = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    r = httpx.request(method, url + path, headers=headers, content=content, timeout=60)
    kind = r.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        got = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        got = [e if e == "[DONE]" else json.loads(e) for e in got]
    else:
        got = r.json() if kind.startswith("application/json") else r.text
    return r.status_code, kind, r.headers.get("retry-after"), _scrub(got)


JSON = {"content-type": "application/json"}
ASKS = [  # (method, path, headers, body): every route, and each way create_app refuses a request
    ("GET", "/v1/models", {}, None), ("GET", "/v1/models", AUTH, None), ("GET", "/tokenizer_info", AUTH, None),
    ("POST", "/tokenize", {**JSON, **AUTH}, {"prompt": "ROMEO: <|endoftext|>"}),
    ("POST", "/detokenize", {**JSON, **AUTH}, {"tokens": [1, 2, 3]}),
    ("POST", "/detokenize", {**JSON, **AUTH}, {"tokens": [1, 10**9]}),
    ("POST", "/v1/completions", JSON, {"prompt": "x"}),
    ("POST", "/v1/completions", {**JSON, "authorization": "Bearer wrong"}, {"prompt": "x"}),
    ("POST", "/v1/completions", JSON, b'{"prompt": '),  # not JSON, and no key: fastapi reads the body first
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "x", "max_tokens": -1}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "x", "bogus": 1}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "x", "model": "other"}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "x" * 3000, "max_tokens": 10}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, [1, 2]),
    ("POST", "/v1/completions", {**JSON, **AUTH}, b"\xff\xfe"),
    ("POST", "/v1/completions", {**JSON, **AUTH}, b""),
    ("POST", "/v1/completions", AUTH, b'{"prompt": "x"}'),  # no content type
    ("POST", "/v1/completions", {**AUTH, "content-type": "text/plain"}, b'{"prompt": "x"}'),
    ("POST", "/v1/completions", {**JSON, **AUTH}, b"{" + b" " * (1 << 20) + b"}"),
    ("GET", "/nowhere", {}, None), ("GET", "/v1/completions", AUTH, None), ("POST", "/v1/models", AUTH, None),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": ["ROMEO:", [1, 2, 3]], "max_tokens": 8, "temperature": 0,
                                                  "n": 2, "logprobs": 2, "echo": True}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "JULIET:", "max_tokens": 6, "temperature": 0,
                                                  "stop": ["e"], "model": "tiny-shakespeare"}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "JULIET:", "max_tokens": 8, "temperature": 0.8,
                                                  "seed": 3, "stream": True, "logprobs": 1,
                                                  "stream_options": {"include_usage": True}}),
    ("POST", "/v1/chat/completions", {**JSON, **AUTH}, {"messages": [{"role": "user", "content": "Good morrow"}],
                                                       "max_tokens": 6, "temperature": 0, "logprobs": True,
                                                       "top_logprobs": 2}),
    ("POST", "/v1/chat/completions", {**JSON, **AUTH}, {"messages": [{"role": "user", "content": "Good morrow"}],
                                                       "max_tokens": 6, "temperature": 0.8, "seed": 1, "n": 2,
                                                       "stream": True, "stream_options": {"include_usage": True}}),
    ("POST", "/v1/chat/completions", {**JSON, **AUTH}, {"messages": [], "echo": True}),
    ("POST", "/v1/chat/completions", {**JSON, **AUTH}, {"messages": [{"role": "user", "content": "x"}],
                                                       "guided_regex": "a("}),
    ("POST", "/v1/completions", {**JSON, **AUTH}, {"prompt": "x", "max_tokens": 4, "seed": 5,  # sampled: seeded
                                                  "guided_choice": ["yes", "no"]}),
]


def test_a_replica_answers_every_route_as_the_single_process_server(bundled_onnx):
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from gpt2_onnx import AsyncEngine
    from gpt2_onnx.chat import DIALOGPT
    from gpt2_onnx.distributed import Replica
    from gpt2_onnx.distributed.api import Api
    from gpt2_onnx.server.app import router
    from gpt2_onnx.server.completions import Served as Answering

    llm = AsyncEngine(Engine.load(bundled_onnx, provider="cpu", threads=1), max_batch=4)
    api = Api(Answering(llm, "tiny-shakespeare", chat_template=DIALOGPT), api_key=KEY)
    assert {r.endpoint for r in router.routes if r.path not in ("/health", "/metrics", "/")} == set(api.calls)
    fwd = Forwarder(Local(api), max_queue=7, registry=CollectorRegistry())

    async def ingress(scope, receive, send):
        if scope["type"] == "http":
            await fwd.http(scope, receive, send)

    on_replica = Server(ingress)
    alone = Server(create_app(Engine.load(bundled_onnx, provider="cpu", threads=1), api_key=KEY, max_batch=4,
                              chat_template=DIALOGPT))
    try:
        for method, path, headers, body in ASKS:
            want, got = (_answer(url, method, path, headers, body) for url in (alone.url, on_replica.url))
            if want[0] == 413:  # the ingress's own answer: OpenAI's JSON error, as the README says of every error
                want = (413, "application/json", None, {"error": {
                    "message": "request body of more than 1048576 bytes", "type": "invalid_request_error",
                    "param": None, "code": None}})
            assert got == want, (method, path, body)
        r = httpx.get(on_replica.url + "/v1/models", headers=AUTH, timeout=30)
        assert r.headers[REPLICA_HEADER.decode()] == "local"
        single = httpx.get(alone.url + "/metrics", timeout=30).text
    finally:
        on_replica.stop()
        alone.stop()

    def requests_by_status(text):
        return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "gpt2onnx_requests_total"}

    counted = requests_by_status(api.metrics.render().decode())
    assert counted == {k: v for k, v in requests_by_status(single).items() if k != "413"}  # 413: the ingress's
    replica = Replica.__new__(Replica)  # its health check: the AsyncEngine's step thread
    replica.served, replica.closed = api.served, True
    replica.check_health()
    llm.shutdown(timeout=5)
    with pytest.raises(RuntimeError, match="generation thread"):
        replica.check_health()


def test_the_package_imports_without_ray_and_batch_does_not_import_it():
    code = ("import sys, gpt2_onnx.batch; assert 'gpt2_onnx.distributed' not in sys.modules\n"
            "import gpt2_onnx.distributed; assert not {'ray', 'fastapi'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (ROOT / "engine" / "server" / "asgi.py").exists()


# ---- options, CLI flags, and the KubeRay manifest (no Ray instance) ---------------------------------------
def test_two_replicas_and_the_ingress_fit_two_cpus():
    o = ServeOptions(replicas=2, threads=1)
    r, i = o.replica_deployment(), o.ingress_deployment()
    assert r["num_replicas"] == 2 and r["max_ongoing_requests"] == o.rows == 64  # max_batch: the CPU default
    assert 2 * r["ray_actor_options"]["num_cpus"] + i["ray_actor_options"]["num_cpus"] <= 2
    a = ServeOptions(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=6).replica_deployment()
    assert "num_replicas" not in a and a["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 2, "target_ongoing_requests": 6}


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--min-replicas", "3"], "--replicas (2) must lie between --min-replicas (3)"),
    (["--replicas", "2", "--target-ongoing-requests", "4"], "--target-ongoing-requests applies to autoscaling"),
    (["--replicas", "2", "--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["--replicas", "2", "--threads", "0"], "error: --threads must be an integer >= 1"),  # one rename, not two
    (["--config", "{missing}"], "cannot read --config"),
    (["--config", "{bad_key}"], "unknown option 'replica'"),
    (["--config", "{not_mapping}"], "must hold a mapping of options"),
])
def test_bad_ray_options_exit_2_with_one_line(tmp_path, args, message):
    (tmp_path / "bad_key.yaml").write_text("replica: 2\n")
    (tmp_path / "not_mapping.yaml").write_text("- 2\n")
    args = [a.format(missing=tmp_path / "none.yaml", bad_key=tmp_path / "bad_key.yaml",
                     not_mapping=tmp_path / "not_mapping.yaml") for a in args]
    r = cli("serve", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr


def test_serve_options_come_from_defaults_then_the_config_file_then_the_flags(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gpt2_onnx.cli
    import gpt2_onnx.distributed

    got = {}
    monkeypatch.setattr(gpt2_onnx.distributed, "serve_forever", lambda options, **kw: got.update(options=options, **kw))
    config = tmp_path / "ray.yaml"
    config.write_text("replicas: 3\nmin_replicas: 1\nmax_replicas: 6\nmax_batch: 8\nray_address: 127.0.0.1:6380\n"
                      "port: 9000\nprefix_adapters: {legal: /adapters/legal}\n")
    r = CliRunner().invoke(gpt2_onnx.cli.app, ["serve", "--config", str(config), "--max-replicas", "5", "--threads", "2"])
    assert r.exit_code == 0, r.output
    o = got["options"]
    assert (o.replicas, o.min_replicas, o.max_replicas, o.max_batch, o.threads, o.max_queue) == (3, 1, 5, 8, 2, 256)
    assert o.prefix_adapters == {"legal": "/adapters/legal"}
    assert (got["address"], got["host"], got["port"]) == ("127.0.0.1:6380", "127.0.0.1", 9000)
    (tmp_path / "ray.json").write_text('{"replicas": 2}')
    r = CliRunner().invoke(gpt2_onnx.cli.app, ["serve", "--config", str(tmp_path / "ray.json"), "--port", "9001"])
    assert r.exit_code == 0 and (got["options"].replicas, got["port"], got["address"]) == (2, 9001, None)


def test_the_kuberay_manifest_builds_its_application():
    """docs/kuberay-rayservice.yaml: a RayService whose import_path and args build (as Serve builds them)
    an Ingress + Replica application, with Ray's version and enough worker CPUs for max_replicas."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    manifest = yaml.safe_load((ROOT / "docs" / "kuberay-rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    (spec,) = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]
    module, _, attr = spec["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert builder is app_builder
    built = build_app(call_user_app_builder_with_args_if_necessary(builder, spec["args"]), name=spec["name"])
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == {"Ingress", "Replica"} and built.ingress_deployment_name == "Ingress"
    options = ServeOptions.from_args(spec["args"])
    replica = deployments["Replica"]
    assert replica.ray_actor_options["num_cpus"] == pytest.approx(0.9 * options.threads)
    auto = replica._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (options.min_replicas, options.max_replicas)
    (workers,) = cluster["workerGroupSpecs"]
    cpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert options.max_replicas * 0.9 * options.threads + options.ingress_cpus <= workers["maxReplicas"] * cpus


# ---- on a local Ray instance ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs started as the CLI starts one (loopback only); its GCS address."""
    saved = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    assert connect(None, num_cpus=2)
    try:
        assert ray.util.get_node_ip_address() == "127.0.0.1"
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield ray.get_runtime_context().gcs_address
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def cli_env() -> dict:
    return dict(os.environ, **LOOPBACK_ENV, HF_HUB_OFFLINE="1")


@pytest.mark.slow
def test_batch_on_ray_data_killed_mid_job_and_rerun_gives_every_row_once(cluster, bundled_onnx, tmp_path):
    rows = [{"id": f"g{i}", "prompt": f"KING {i}:", "max_tokens": 24, "temperature": 0} for i in range(72)]
    rows += [{"id": i, "context": f"ROMEO {i}:", "continuation": " my good lord"} for i in range(24)]
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "gpt2_onnx.cli", "batch", inp, "-o", out, "-m", bundled_onnx, "--replicas", "2",
            "--ray-address", cluster, "--batch-size", "8", "--provider", "cpu"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(list(map(str, args)), stdout=log, stderr=log, env=cli_env())
    deadline = time.time() + 180
    while not (out.exists() and out.read_text().count("\n") >= 8):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the driver: Ray ends its job's actors
    proc.wait(30)
    partial = out.read_text().count("\n")
    assert 8 <= partial < len(rows), partial
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{partial} already in" in r.stderr and f"wrote {len(rows) - partial} rows" in r.stderr, r.stderr[-2000:]
    got = read_rows(out)
    assert set(got) == {json.dumps(x["id"]) for x in rows} and all(v["status"] == 200 for v in got.values())
    here = tmp_path / "here.jsonl"  # the same job in this process, without Ray
    run(inp, here, model=str(bundled_onnx), provider="cpu", threads=1)
    want = read_rows(here)
    pick = lambda v: v["body"].get("choices") or v["body"]["token_logprobs"]  # noqa: E731
    assert {k: pick(v) for k, v in got.items()} == {k: pick(v) for k, v in want.items()}


class Served:
    """`gpt2-onnx serve --replicas 2 --ray-address ...` in a process of its own, on the module's Ray instance."""

    def __init__(self, address: str, model: Path, log: Path):
        self.port, self.log = _free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpt2_onnx.cli", "serve", "--replicas", "2", "--ray-address", address,
                 "--port", str(self.port), "-m", str(model), "--api-key", KEY, "--max-batch", "4", "--threads", "1",
                 "--provider", "cpu", "--grace-period", "2"], stdout=f, stderr=f, env=cli_env())
        deadline = time.time() + 240
        while len(self.health().get("replicas", [])) < 2:
            assert self.proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)

    def health(self) -> dict:
        try:
            return httpx.get(self.url + "/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def metric(self, name: str, **labels) -> dict[str, float]:
        """Per replica: the value of one series of /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for f in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in f.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # the CLI deletes its application (replicas drain), then exits
        self.proc.wait(90)


@pytest.fixture(scope="module")
def served(cluster, bundled_onnx, tmp_path_factory):
    s = Served(cluster, bundled_onnx, tmp_path_factory.mktemp("served") / "serve.log")
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def bundled_engine(bundled_onnx):
    return Engine.load(bundled_onnx, provider="cpu", threads=1)


@pytest.mark.slow
def test_two_replicas_answer_64_concurrent_requests_as_the_single_process_server(served, bundled_engine):
    prompts = [f"ROMEO {i}:" if i % 2 else [(7 * i + j) % 4000 + 1 for j in range(1 + i % 9)] for i in range(64)]
    bodies = [{"prompt": p, "max_tokens": 6 + i % 9, "temperature": 0} for i, p in enumerate(prompts)]
    before = served.metric("gpt2onnx_requests_total", deployment="Replica", status="200")
    single = Server(create_app(bundled_engine, max_batch=4))
    try:
        def ask(url, body):
            r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)
            return r.status_code, r.headers.get(REPLICA_HEADER.decode()), r.json()

        with ThreadPoolExecutor(64) as pool:
            on_ray = list(pool.map(lambda b: ask(served.url, b), bodies))
            alone = list(pool.map(lambda b: ask(single.url, b), bodies))
    finally:
        single.stop()
    assert [s for s, _, _ in on_ray] == [200] * 64, [b for s, _, b in on_ray if s != 200][:2]
    assert [b["choices"] for _, _, b in on_ray] == [b["choices"] for _, _, b in alone]
    assert [b["choices"][0]["text"] for _, _, b in on_ray] == \
        [bundled_engine.generate(b["prompt"], max_new_tokens=b["max_tokens"]).text for b in bodies]
    used = {rep for _, rep, _ in on_ray}
    assert len(used) == 2, used  # both replicas served
    after = served.metric("gpt2onnx_requests_total", deployment="Replica", status="200")
    assert sum(after.values()) - sum(before.values()) == 64  # /metrics covers every replica
    assert set(after) == used | set(before)


@pytest.mark.slow
def test_health_and_api_key_behave_as_in_the_single_process_server(served):
    h = served.health()
    assert h["status"] == "ok" and h["model"] == "tiny-shakespeare" and len(h["replicas"]) == 2
    assert {"active", "queue_depth"} <= set(h)
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(served.url + "/v1/completions", json={"prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(served.url + "/v1/models", timeout=30).status_code == 401
    assert [m["id"] for m in httpx.get(served.url + "/v1/models", headers=AUTH, timeout=30).json()["data"]] == \
        ["tiny-shakespeare"]
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "x", "max_tokens": -1}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(served.url + "/v1/completions", content=b"{" + b" " * (1 << 20) + b"}", headers=AUTH, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"  # 1 MiB: the ingress's
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    plain = client.completions.create(model="tiny-shakespeare", prompt="JULIET:", max_tokens=8, temperature=0)
    chunks = client.completions.create(model="tiny-shakespeare", prompt="JULIET:", max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text


def _outcome(url: str, body: dict) -> dict:
    """One request to the end: its status, replica, text, [DONE] or error (never an exception)."""
    try:
        if not body.get("stream"):
            r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)
            ok = r.status_code == 200
            return {"status": r.status_code, "replica": r.headers.get(REPLICA_HEADER.decode()), "stream": False,
                    "text": r.json()["choices"][0]["text"] if ok else None, "error": None if ok else r.json(),
                    "retry_after": r.headers.get("retry-after")}
        text, done, error = "", False, None
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            replica = r.headers.get(REPLICA_HEADER.decode())
            if r.status_code != 200:  # refused before its first event: a JSON error, as without stream
                r.read()
                return {"status": r.status_code, "replica": replica, "stream": True, "text": None,
                        "error": r.json(), "retry_after": r.headers.get("retry-after")}
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event
                    text += "".join(c["text"] for c in event.get("choices", []))
        return {"status": r.status_code, "replica": replica, "stream": True, "text": text, "done": done, "error": error}
    except httpx.HTTPError as e:
        return {"status": None, "exception": repr(e)}


@pytest.mark.slow
def test_a_replica_killed_mid_load_is_restarted_and_no_request_is_lost_or_duplicated(served, bundled_engine):
    """16 long greedy requests (half streamed) on 2 replicas that run 4 each: 8 run, 8 wait in Ray's router.
    SIGKILL the replica running most: its running requests get a JSON 503 / an error event, every other
    request (the waiting ones go to the other replica or the restarted one) its full greedy answer; the
    replicas' own counters show each answered request ran once. Up to 4 rounds, until both a JSON 503
    and a stream's error event were seen."""
    seen = set()
    for rnd in range(4):
        prompts = [f"KING {rnd}-{i}:" for i in range(16)]
        want = [r.text for r in bundled_engine.generate_batch(prompts, max_new_tokens=200)]
        health = served.health()
        pids = {r["replica"]: r["pid"] for r in health["replicas"]}
        before = served.metric("gpt2onnx_requests_total", deployment="Replica", status="200")
        resent = sum(served.metric("gpt2onnx_ray_resent_requests_total").values())
        failed_before = sum(served.metric("gpt2onnx_requests_total", deployment="Ingress", status="503").values())
        bodies = [{"prompt": p, "max_tokens": 200, "temperature": 0, "stream": i % 2 == 1} for i, p in enumerate(prompts)]
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_outcome, served.url, b) for b in bodies]
            deadline, victim = time.time() + 60, None
            while victim is None:
                assert time.time() < deadline and not all(f.done() for f in futures), "no replica got busy"
                busy = [r for r in served.health().get("replicas", []) if r["active"] >= 3]
                victim = busy[0]["replica"] if busy else None
            os.kill(pids[victim], signal.SIGKILL)
            results = [f.result() for f in futures]
        failures = 0
        for want_text, res in zip(want, results):
            assert res["status"] in (200, 503), res
            if res["status"] == 503:  # JSON: running on the victim when it died
                err = res["error"]["error"]
                assert res["replica"] == victim and err["type"] == "server_error" and res["retry_after"] == "1", res
                failures += 1
                seen.add("json-503")
            elif res["error"] is not None:  # a stream cut: an error event after a prefix of its answer, no [DONE]
                assert res["replica"] == victim and res["error"]["error"]["type"] == "server_error", res
                assert want_text.startswith(res["text"]) and not res["done"], res
                failures += 1
                seen.add("stream-error")
            else:
                assert res["text"] == want_text and (not res["stream"] or res["done"]), res
        # failures may be 0: the victim can finish its requests between the health poll and the kill; the
        # round still checks the restart and the counters, and the rounds go on until both kinds were seen
        print(f"round {rnd}: killed {victim}; {failures} failed on it, seen {sorted(seen)}, "
              f"{sum(r['replica'] == victim and r['status'] == 200 and not r.get('error') for r in results)} done there before")
        deadline = time.time() + 90  # Ray Serve restarts the replica
        while True:
            ids = {r["replica"] for r in served.health().get("replicas", [])}
            if len(ids) == 2 and victim not in ids:
                break
            assert time.time() < deadline, ids
            time.sleep(0.5)
        after = served.metric("gpt2onnx_requests_total", deployment="Replica", status="200")
        survivors = set(after) - {victim}
        ok_elsewhere = sum(r["status"] == 200 and r.get("error") is None and r["replica"] in survivors for r in results)
        assert sum(after.get(k, 0) - before.get(k, 0) for k in survivors) == ok_elsewhere  # each ran once
        failed = sum(served.metric("gpt2onnx_requests_total", deployment="Ingress", status="503").values())
        assert failed - failed_before == failures  # every failure is counted by the ingress: none silent
        assert sum(served.metric("gpt2onnx_ray_resent_requests_total").values()) >= resent
        if seen == {"json-503", "stream-error"}:
            break
    assert seen == {"json-503", "stream-error"}, seen


def test_the_ingress_serves_the_playground_page_as_the_single_process_server():
    from gpt2_onnx.distributed.serve import Ingress
    from gpt2_onnx.server.app import STATIC

    ingress = Ingress.__new__(Ingress)  # its page only: no Ray instance
    ingress._page = None

    async def get(path):
        transport = httpx.ASGITransport(app=ingress.page)
        async with httpx.AsyncClient(transport=transport, base_url="http://ray") as client:
            return await client.get(path)

    page = asyncio.run(get("/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC / "index.html").read_text()
    script = asyncio.run(get("/static/app.js"))
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert asyncio.run(get("/static/nope.js")).status_code == 404
