"""The server under hostile input and shutdown: schemathesis against its OpenAPI schema, hypothesis
properties at the API boundary, malformed bodies, draining, SIGTERM during streams. Loopback only,
bounded in examples and time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2_onnx.server import create_app
from helpers import Server, post, wait_healthy


@pytest.fixture(scope="module")
def served(tiny):
    _, engine, _, _ = tiny
    s = Server(create_app(engine, model_id="tiny", max_batch=8, max_queue=64))
    yield s, engine
    s.stop()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(served):
    """Every operation of the OpenAPI schema, bodies generated from the request models (40 examples
    each): no 5xx, and every response (status, content type, body) as the schema documents it."""
    s, _ = served
    api = schemathesis.openapi.from_url(s.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "GET /v1/models", "POST /tokenize", "POST /detokenize", "GET /tokenizer_info"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            # constraints across fields (prompt + max_tokens <= n_positions, token ids < vocab_size) are the
            # server's to check, not the schema's: a schema-valid request may get a (documented) 400
            response = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
            assert response.status_code < 500, response.text

        check()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
FIELDS = st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
                          "echo", "logprobs", "model", "bogus"])


@given(body=st.dictionaries(FIELDS, JSON, max_size=6) | JSON)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_body_gets_200_or_a_4xx_json_error(served, body):
    s, _ = served
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # bounded work per example
    r = post(s.url, body)
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"]


@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
@settings(max_examples=100, deadline=None)
def test_any_text_without_special_tokens_decodes_back(tiny, text):
    _, engine, _, _ = tiny
    if "<|endoftext|>" in text:
        return
    assert engine.tokenizer.decode(engine.tokenizer.encode(text)) == text


@pytest.mark.parametrize("body, fragment", [
    (b"[" * 5000 + b"]" * 5000, "could not be parsed as JSON"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "could not be parsed as JSON"),
    ('{"prompt": "ab\\ud800"}'.encode(), "not valid Unicode text"),
    (b'{"prompt": "x", "stop": 5}', "stop: Input should be a valid string"),
    (b'{"prompt": {"a": 1}}', "prompt must be a string"),
])
def test_malformed_bodies_get_a_json_400(served, body, fragment):
    s, _ = served
    r = post(s.url, body)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
    assert fragment in r.json()["error"]["message"]
    assert post(s.url, {"prompt": "x", "max_tokens": 2, "temperature": 0}).status_code == 200  # the server is fine


def test_an_unexpected_error_is_a_json_500_not_text(tiny, monkeypatch):
    _, engine, _, _ = tiny
    app = create_app(engine, model_id="t")
    s = Server(app)
    try:
        monkeypatch.setattr(engine, "sequences", lambda *a, **kw: 1 / 0)
        r = post(s.url, {"prompt": "x"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "ZeroDivision" in r.text
    finally:
        monkeypatch.undo()
        s.stop()


def test_a_megabyte_prompt_is_tokenized_off_the_event_loop(served):
    s, _ = served
    big = {"prompt": "the quick brown fox " * 50_000, "max_tokens": 1}  # ~1 MB, far over n_positions
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post, s.url, big)
        time.sleep(0.05)
        t = time.perf_counter()
        assert httpx.get(s.url + "/health", timeout=5).status_code == 200
        health = time.perf_counter() - t
        assert slow.result().status_code == 400
    assert health < 0.5, f"/health waited {health:.2f} s behind a prompt being tokenized"


def test_draining_refuses_new_work_and_ends_the_rest_with_errors(tiny, monkeypatch):
    from gpt2_onnx.model import DecodeStep

    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: (time.sleep(0.02), real(self, *a))[1])
    _, engine, _, _ = tiny
    app = create_app(engine, model_id="t", max_batch=4)
    s = Server(app)
    try:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(post, s.url, {"prompt": "x", "max_tokens": 100, "temperature": 0})
            time.sleep(0.3)
            app.state.llm.drain(0.3)
            r = post(s.url, {"prompt": "x", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            cut = long.result()
        assert cut.status_code == 503 and "shutting down" in cut.json()["error"]["message"]
    finally:
        s.stop()


@pytest.mark.slow
def test_sigterm_during_16_streams_ends_each_with_done_or_an_error_event(tmp_path):
    env = dict(os.environ, GPT2_ONNX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "serve", "--port", str(port), "--grace-period",
                               "1", "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, server, 300)

    def stream(i: int) -> tuple[list[str], int]:
        lines = []
        short = i < 4  # done before the signal; the 12 long ones (4 samples each) are still going
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                "prompt": f"ROMEO {i}:", "max_tokens": 8 if short else 240, "n": 1 if short else 4,
                "temperature": 0, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    lines.append(line)
            return lines, r.status_code

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        time.sleep(0.3)
        futures += [pool.submit(stream, i) for i in range(4, 16)]
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    done = errors = 0
    for lines, status in results:
        assert status == 200 and lines, lines
        if lines[-1] == "data: [DONE]":
            done += 1
        else:
            assert "shutting down" in json.loads(lines[-1][6:])["error"]["message"], lines[-1]
            errors += 1
    assert done + errors == 16 and done >= 4 and errors >= 1  # the short ones finish, the long ones are cut cleanly


def _unread_stream(port: int) -> socket.socket:
    """A client that sends a big streaming request (16 prompts x n=8, logprobs 20: ~10 MB of events) on a
    socket with a small receive buffer, and does not read."""
    body = json.dumps({"prompt": [f"the quick {i}" for i in range(16)], "n": 8, "max_tokens": 120,
                       "logprobs": 20, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_streaming_client_that_never_reads_holds_its_rows_not_memory(tiny):
    """A stream (16 prompts x n=8, logprobs 20: ~10 MB of events) whose client sends the request and never
    reads: once the sockets' buffers are full the server stops pulling events and each running sequence
    stops at its engine buffer (held, decoding nothing, its memory bounded). Closing the socket ends the
    request and frees every row for the next one."""
    _, engine, _, _ = tiny
    app = create_app(engine, model_id="t", max_batch=8)
    s = Server(app)
    llm = app.state.llm
    try:
        sock = _unread_stream(s.port)
        deadline = time.time() + 60

        def held() -> int:
            return sum(q.held for q in list(llm.core.running))

        while held() < 8:
            assert time.time() < deadline, (llm.stats(), [len(q.tokens) for q in llm.core.running])
            time.sleep(0.05)
        made = llm.stats()["steps"]
        time.sleep(0.5)
        assert llm.stats()["steps"] == made and llm.stats()["queue_depth"] > 0  # nothing decodes; the rest wait
        sock.close()
        while llm.stats()["active"] or llm.stats()["queue_depth"]:
            assert time.time() < deadline, llm.stats()
            time.sleep(0.05)
        assert post(s.url, {"prompt": "x", "max_tokens": 5, "temperature": 0}).status_code == 200
    finally:
        s.stop()


def test_a_stream_left_unread_past_read_timeout_ends_with_an_error_event(tiny):
    """--read-timeout: a stream whose client stops reading holds its rows only that long; then the request
    ends (an error event of type timeout_error, counted as 499, a client that left) and its rows serve the next
    request."""
    _, engine, _, _ = tiny
    app = create_app(engine, model_id="t", max_batch=8, read_timeout=0.5)
    s = Server(app)
    llm = app.state.llm
    try:
        sock = _unread_stream(s.port)
        r = post(s.url, {"prompt": "x", "max_tokens": 5, "temperature": 0}, timeout=60)  # waits for a row
        assert r.status_code == 200
        deadline = time.time() + 60
        while llm.stats()["active"] or llm.stats()["queue_depth"]:
            assert time.time() < deadline, llm.stats()
            time.sleep(0.05)
        sock.settimeout(30)
        data = b""
        while b"timeout_error" not in data:  # read on: the stream ends with the error event
            chunk = sock.recv(1 << 20)
            assert chunk, data[-500:]
            data += chunk
        assert b"not read for 0.5 s" in data and b"[DONE]" not in data
        sock.close()
        metrics = httpx.get(s.url + "/metrics").text
        assert 'gpt2onnx_requests_total{status="499"} 1.0' in metrics
    finally:
        s.stop()
