"""Connection handling of `gpt2-onnx serve` (gpt2_onnx.server.limits) and the edges of its answers: header and
idle timeouts, the header size limit and the connection cap on real loopback sockets with timeouts of a second,
draining on SIGTERM in a real server process, half-closed clients, JSON 413s, API key edges, error texts. Every
refusal is one OpenAI-shaped JSON object."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import _free_port, post, wait_healthy

from gpt2_onnx.server import create_app
from gpt2_onnx.server.limits import Limits, server
from gpt2_onnx.server.options import ServeOptions


class LimitedServer:
    """An app served as `gpt2-onnx serve` serves it (limits.server: the limited h11 protocol, draining), in a
    thread on 127.0.0.1."""

    def __init__(self, app, grace: float = 10.0, **limits):
        self.app, self.port = app, _free_port()
        self.server = server(app, Limits(**limits), port=self.port, grace=grace, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.settimeout(10)
        return sock

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> bytes:
    """One whole response (with a content-length), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
            responses(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")[0][1].get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def trickle(sock: socket.socket, lines, every: float = 0.2) -> int:
    """Send lines one by one, `every` seconds apart, until the server answers; the bytes sent."""
    sent = 0
    for line in lines:
        if select.select([sock], [], [], every)[0]:
            return sent
        sock.sendall(line)
        sent += len(line)
    raise AssertionError(f"no answer after {sent} bytes")


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """(status, headers, body) of each HTTP/1.1 response in data (bodies with content-length)."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, data[:n]))
        data = data[n:]
    return out


def json_error(status: int, headers: dict, body: bytes, want: int) -> dict:
    assert status == want and headers["content-type"] == "application/json", (status, headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def request(path: str = "/health", method: str = "GET", body: bytes = b"", headers: str = "") -> bytes:
    extra = f"content-type: application/json\r\ncontent-length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nhost: x\r\n{extra}{headers}\r\n".encode() + body


def metric(url: str, status: int) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'gpt2onnx_requests_total{{status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def limited(tiny):
    """The tiny model behind a 1 s header timeout, a 1 s idle timeout and 4 KiB of headers."""
    _, engine, _, _ = tiny
    s = LimitedServer(create_app(engine, model_id="tiny", max_batch=8, prefixes={"story": engine.prefill("once")}),
                      header_timeout=1.0, idle_timeout=1.0, max_header_bytes=4096)
    yield s
    s.stop()


# ---- timeouts and sizes ----------------------------------------------------------------------------------
def test_a_socket_that_never_sends_is_closed_after_the_header_timeout(limited):
    with limited.connect() as sock:
        t = time.monotonic()
        assert read_all(sock) == b""  # closed without a word: it asked nothing
        assert 0.8 < time.monotonic() - t < 3


def test_trickled_headers_get_a_json_408_at_the_header_timeout_also_on_a_kept_alive_connection(limited):
    for first in (False, True):  # a new connection; one kept alive after a first request
        with limited.connect() as sock:
            if first:
                sock.sendall(request())
                assert responses(read_response(sock))[0][0] == 200
            t = time.monotonic()  # one header line every 0.2 s: bytes keep coming, the headers never end
            trickle(sock, [b"GET /health HTTP/1.1\r\n"] + [f"x-trickle-{i}: y\r\n".encode() for i in range(40)])
            (got,) = responses(read_all(sock))
            assert 0.8 < time.monotonic() - t < 3
            error = json_error(*got, want=408)
            assert error["type"] == "timeout_error" and "header_timeout" in error["message"]


def test_an_idle_connection_and_a_stalled_body_are_closed_after_the_idle_timeout(limited):
    with limited.connect() as sock:
        sock.sendall(request())
        t = time.monotonic()
        (answer,) = responses(read_all(sock))  # kept alive, then closed once idle for 1 s
        assert answer[0] == 200 and 0.8 < time.monotonic() - t < 3
    before = metric(limited.url, 499)
    with limited.connect() as sock:  # 10 of 100 bytes of a body, then nothing
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b'content-length: 100\r\n\r\n{"prompt":')
        t = time.monotonic()
        error = json_error(*responses(read_all(sock))[0], want=408)
        assert "idle_timeout" in error["message"] and 0.8 < time.monotonic() - t < 3
    assert metric(limited.url, 499) == before + 1  # the route saw its client leave


def test_headers_over_max_header_bytes_get_a_json_431_before_more_is_buffered(limited):
    with limited.connect() as sock:  # unfinished headers: refused once 4 KiB are buffered, not after 50 MB
        sent = trickle(sock, [b"GET /health HTTP/1.1\r\nhost: x\r\n"] + [b"x-pad: " + b"a" * 1000 + b"\r\n"] * 1000,
                       every=0.01)
        error = json_error(*responses(read_all(sock))[0], want=431)
        assert "max_header_bytes" in error["message"] and sent < 64 << 10
    with limited.connect() as sock:  # complete but too large headers, in one packet
        sock.sendall(request(headers="x-pad: " + "a" * 5000 + "\r\n"))
        json_error(*responses(read_all(sock))[0], want=431)
    assert httpx.get(limited.url + "/health").status_code == 200


def test_a_connection_over_max_connections_gets_a_json_503_with_retry_after(tiny):
    _, engine, _, _ = tiny
    s = LimitedServer(create_app(engine, model_id="t"), max_connections=2, header_timeout=10)
    try:
        held = [s.connect(), s.connect()]  # two idle connections fill it
        time.sleep(0.1)
        with s.connect() as third:
            third.sendall(request())
            status, headers, body = responses(read_all(third))[0]
            error = json_error(status, headers, body, want=503)
            assert headers["retry-after"] == "1" and headers["connection"] == "close"
            assert "max_connections" in error["message"]
        held.pop().close()
        time.sleep(0.1)
        with s.connect() as fourth:
            fourth.sendall(request(headers="connection: close\r\n"))
            assert responses(read_all(fourth))[0][0] == 200
        assert metric(s.url, 503) == 1
        held.pop().close()
    finally:
        s.stop()


# ---- draining, half-closed clients -------------------------------------------------------------------
SERVER = """
import sys, time
from gpt2_onnx import Engine
from gpt2_onnx.model import DecodeStep
from gpt2_onnx.server import create_app, serve
real = DecodeStep.__call__
DecodeStep.__call__ = lambda self, *a: (time.sleep(0.05), real(self, *a))[1]  # 20 tokens a second
serve(create_app(Engine.load(sys.argv[1], provider="cpu", threads=1), model_id="t"), port=int(sys.argv[2]),
      grace=float(sys.argv[3]))
"""


def test_sigterm_keeps_the_listener_up_answering_503_until_the_requests_in_flight_end(tiny):
    _, _, _, onnx_dir = tiny
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(onnx_dir), str(port), "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 60, pause=0.1)
        lines, first = [], threading.Event()

        def stream() -> None:  # 100 tokens: 5 s, longer than the grace period
            with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                    "prompt": "x", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        first.set()

        streaming = threading.Thread(target=stream)
        streaming.start()
        assert first.wait(30)
        kept = socket.create_connection(("127.0.0.1", port))  # a kept-alive connection, idle at the signal
        kept.sendall(request())
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        time.sleep(0.3)
        for method, path in (("POST", "/v1/completions"), ("GET", "/health")):  # new connections: still accepted
            r = httpx.request(method, url + path, json={"prompt": "x"} if method == "POST" else None, timeout=5)
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "server_error" and "shutting down" in r.json()["error"]["message"]
        kept.sendall(request())
        got = responses(read_all(kept))
        assert [g[0] for g in got] == [200, 503] and got[1][1]["connection"] == "close"
        streaming.join(30)
        assert "shutting down" in json.loads(lines[-1][6:])["error"]["message"]  # cut at the grace period
        assert proc.wait(15) in (0, -signal.SIGTERM)
        assert 1.5 < time.monotonic() - t < 8  # the grace period (2 s), then out
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        proc.kill()
        proc.wait(10)


def test_on_a_signal_an_idle_server_stops_at_once(tiny):
    _, engine, _, _ = tiny
    s = LimitedServer(create_app(engine, model_id="t"), grace=30)
    t = time.monotonic()
    s.server.handle_exit(signal.SIGTERM, None)
    s.thread.join(10)
    assert not s.thread.is_alive() and time.monotonic() - t < 2


def test_a_client_that_half_closes_after_its_request_gets_the_answer(limited):
    body = json.dumps({"prompt": "x", "max_tokens": 3, "temperature": 0}).encode()
    for version in ("1.1", "1.0"):
        with limited.connect() as sock:
            sock.sendall(request("/v1/completions", "POST", body).replace(b"HTTP/1.1", f"HTTP/{version}".encode()))
            sock.shutdown(socket.SHUT_WR)
            got = responses(read_all(sock))
        assert [g[0] for g in got] == ([100, 200] if version == "1.1" else [200])  # (a 1.1 client reads a 100)
        assert json.loads(got[-1][2])["choices"][0]["finish_reason"] == "length"


def test_a_client_that_closes_while_its_request_runs_still_frees_its_rows(limited, monkeypatch):
    from gpt2_onnx.model import DecodeStep

    real = DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: (time.sleep(0.02), real(self, *a))[1])
    before = metric(limited.url, 499)
    body = json.dumps({"prompt": "x", "max_tokens": 100, "n": 4, "temperature": 1.0, "ignore_eos": True}).encode()
    with limited.connect() as sock:
        sock.sendall(request("/v1/completions", "POST", body))
        time.sleep(0.3)
    t = time.monotonic()
    while httpx.get(limited.url + "/health").json()["active"]:
        assert time.monotonic() - t < 2, "rows not freed after the client left"
        time.sleep(0.02)
    assert metric(limited.url, 499) == before + 1


# ---- answers: 413, auth, texts, malformed requests -------------------------------------------------------
def test_bodies_over_1_mib_get_a_json_413_with_content_length_or_chunked(limited):
    before = metric(limited.url, 413)
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'

    def chunked():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)]

    for path in ("/v1/completions", "/tokenize", "/v1/chat/completions", "/nowhere"):
        for content in (big, chunked()):
            r = httpx.post(limited.url + path, content=content, headers={"content-type": "application/json"},
                           timeout=30)
            if path == "/nowhere" and not isinstance(content, bytes):
                assert r.status_code == 404  # no route reads it
                continue
            error = json_error(r.status_code, r.headers, r.content, want=413)
            assert error["message"] == "request body of more than 1048576 bytes"
    r = httpx.request("GET", limited.url + "/health", content=big, timeout=30)
    json_error(r.status_code, r.headers, r.content, want=413)
    assert metric(limited.url, 413) == before + 8
    assert post(limited.url, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_api_key_edges_and_which_paths_it_guards(tiny):
    _, engine, _, _ = tiny
    for key, why in (("clé-sekrit", "printable ASCII"), ("   ", "blank"), (" sekrit", "whitespace"),
                     ("sekrit\n", "control"), ("", "is empty")):
        with pytest.raises(ValueError, match=why):
            create_app(engine, api_key=key)
        with pytest.raises(ValueError, match=why) as e:
            ServeOptions(api_key=key)
        assert e.value.named({"api_key": "--api-key"}).startswith("--api-key ")
        assert "sekrit" not in str(e.value)  # a key is a secret: not repeated
    with pytest.raises(ValueError, match="metrics_auth"):
        ServeOptions(metrics_auth=True)
    for metrics_auth in (False, True):
        s = LimitedServer(create_app(engine, model_id="t", api_key="s3cr3t-Key", metrics_auth=metrics_auth))
        try:
            for scheme in ("Bearer", "bearer", "BEARER", "Bearer  "):
                r = httpx.get(s.url + "/v1/models", headers={"Authorization": f"{scheme} s3cr3t-Key"})
                assert r.status_code == 200, scheme
            for given in ({}, {"Authorization": "Bearer s3cr3t-key"}, {"Authorization": "Basic s3cr3t-Key"},
                          {"Authorization": "Bearers3cr3t-Key"}, {"Authorization": "Bearer s3cr3t-Key x"}):
                r = httpx.post(s.url + "/tokenize", json={"prompt": "x"}, headers=given)
                error = json_error(r.status_code, r.headers, r.content, want=401)
                assert error["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
            for path in ("/metrics", "/docs", "/openapi.json"):
                assert httpx.get(s.url + path).status_code == (401 if metrics_auth else 200), path
                assert httpx.get(s.url + path, headers={"Authorization": "bearer s3cr3t-Key"}).status_code == 200
            for path in ("/", "/static/app.js", "/health"):  # the page asks for the key itself
                assert httpx.get(s.url + path).status_code == 200, path
        finally:
            s.stop()


def test_error_texts_name_the_routes_own_fields_and_models(limited):
    url = limited.url
    r = httpx.post(url + "/tokenize", json={"prompt": "x", "max_tokens": 3})
    error = json_error(r.status_code, r.headers, r.content, want=400)
    assert error["message"] == "unknown field 'max_tokens'; supported: ['add_special_tokens', 'model', 'prompt']"
    r = httpx.post(url + "/detokenize", json={"tokens": [1], "prompt": "x"})
    assert json_error(r.status_code, r.headers, r.content, want=400)["message"].endswith("['model', 'tokens']")
    for path, body in (("/tokenize", {"prompt": "x", "model": "nope"}),
                       ("/detokenize", {"tokens": [1], "model": "nope"})):
        r = httpx.post(url + path, json=body)
        error = json_error(r.status_code, r.headers, r.content, want=404)
        assert error["param"] == "model" and "not served here" in error["message"]
    assert httpx.post(url + "/tokenize", json={"prompt": "x", "model": "story"}).status_code == 200
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        for content in (b"", None):
            r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
            error = json_error(r.status_code, r.headers, r.content, want=400)
            assert "request body is empty" in error["message"] and "None" not in error["message"], path
        r = httpx.post(url + path, json=[1])
        assert json_error(r.status_code, r.headers, r.content, want=400)["message"] == \
            "the request body must be a JSON object"


def test_malformed_requests_get_json_errors_never_text(limited):
    for raw, want in ((b"GET /health HTTP/1.1\r\n\r\n", 400),  # no Host
                      (b"GET /h\xffalth HTTP/1.1\r\nhost: x\r\n\r\n", 400),  # not ASCII
                      (b"NOT HTTP AT ALL\r\n\r\n", 400),
                      (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n", 400)):
        with limited.connect() as sock:
            sock.sendall(raw)
            json_error(*responses(read_all(sock))[0], want=want)
    r = httpx.post(limited.url + "/v1/models")
    assert json_error(r.status_code, r.headers, r.content, want=405) and r.headers["allow"] == "GET"
    r = httpx.get(limited.url + "/static/nowhere.js")
    json_error(r.status_code, r.headers, r.content, want=404)


def test_serve_options_check_the_connection_limits():
    o = ServeOptions()
    assert o.connection_limits() == {"max_connections": 512, "header_timeout": 10.0, "idle_timeout": 15.0,
                                     "max_header_bytes": 32768}
    for name, bad in (("max_connections", 0), ("header_timeout", 0), ("idle_timeout", -1.0),
                      ("max_header_bytes", 100), ("header_timeout", float("inf")), ("metrics_auth", "yes")):
        with pytest.raises(ValueError, match=name):
            ServeOptions(**{name: bad})


def test_a_client_that_reads_nothing_loses_its_connection_after_send_timeout(tiny):
    """A stream whose client never reads is ended by the engine's read_timeout; its connection, whose answer can
    never be written, is dropped send_timeout after the client's socket filled up, freeing its slot."""
    _, engine, _, _ = tiny
    app = create_app(engine, max_batch=8, read_timeout=1.0)
    s = LimitedServer(app, max_connections=1, idle_timeout=1.0, send_timeout=2.0)
    try:
        body = json.dumps({"prompt": ["the quick"] * 4, "n": 2, "max_tokens": 120, "logprobs": 20, "stream": True,
                           "ignore_eos": True, "temperature": 1.0}).encode()
        sock = s.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills up at once
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)  # and never reads
        deadline = time.time() + 30
        while True:  # the only slot is taken until the connection is dropped
            r = httpx.get(s.url + "/health", timeout=10)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.time() < deadline, r.text
            time.sleep(0.5)
        assert r.json()["active"] == 0
        sock.close()
    finally:
        s.stop()
