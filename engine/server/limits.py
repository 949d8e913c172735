"""Connection handling of the single-process server: uvicorn's h11 protocol with limits, and a server that drains.

uvicorn has no header timeout and, with httptools (its default when installed), no header size limit: a socket
that never sends, or trickles a header line every few seconds, stays open, and each buffers unfinished headers
without bound. `Limits` says what the server allows; `protocol(limits)` is an H11Protocol subclass enforcing it
(passed to uvicorn.Config as its `http` class), and `server(app, limits, ...)` the uvicorn.Server that runs it:

- header_timeout: a request's line and headers must arrive within this many seconds of its first byte (of the
  connection, for its first request); else a JSON 408 (or, if nothing came, a silent close).
- idle_timeout: a connection may stay silent this long between requests (uvicorn's keep-alive timeout) and
  while the server waits for the rest of a request's body (then a JSON 408).
- max_header_bytes: unfinished request line and headers beyond this are a JSON 431 (h11's incomplete-event
  limit); malformed requests a JSON 400 (uvicorn answers both in text/plain).
- max_connections: a connection beyond this many open ones gets a JSON 503 with Retry-After for its request,
  then is closed (uvicorn's limit_concurrency answers in text/plain, and counts tasks too).
- a client that half-closes (shutdown(SHUT_WR)) after a complete request gets its answer (uvicorn closes the
  connection on EOF). Whether the peer half-closed or closed entirely looks the same (a FIN); on Linux a
  "100 Continue" probe tells them apart: a closed peer answers it with a reset, and the request is then
  ended as a disconnect (its rows freed, counted 499) as before.
- draining (set by the server on SIGTERM/SIGINT): the listener stays open; every new request gets a JSON 503
  with Retry-After and `Connection: close` until the requests in flight have ended (at most the grace period);
  then the server stops as uvicorn does. A second signal stops it at once.

Every answer given here is an OpenAI-shaped JSON error (gpt2_onnx.server.errors.ApiError), counted in the
app's /metrics by status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from gpt2_onnx.server.errors import ApiError
from gpt2_onnx.server.options import ServeOptions

logger = logging.getLogger("uvicorn.error")

_TCP_CLOSE_WAIT = 8  # Linux's tcp_states.h: the peer sent FIN and we have not closed
_PROBE_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0)  # after a half-close probe; then every second


@dataclass
class Limits:
    """What one server allows each connection (defaults: ServeOptions')."""

    max_connections: int = ServeOptions.max_connections
    header_timeout: float = ServeOptions.header_timeout
    idle_timeout: float = ServeOptions.idle_timeout
    max_header_bytes: int = ServeOptions.max_header_bytes
    send_timeout: float | None = None  # seconds a client may read nothing at all before its connection is dropped
    draining: bool = False  # set on SIGTERM: every new request gets a 503
    count: Callable[[int], None] = field(default=lambda status: None, repr=False)  # answers by status (/metrics)

    def config(self, app, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0,
               log_level: str = "info", **kw) -> uvicorn.Config:
        """The uvicorn.Config of an app served under these limits."""
        return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol(self), ws="none",
                              timeout_keep_alive=self.idle_timeout, h11_max_incomplete_event_size=self.max_header_bytes,
                              timeout_graceful_shutdown=grace + 5, **kw)


def error_bytes(e: ApiError, extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response of an ApiError, closing the connection (written without h11, whose state may not
    allow a response here)."""
    body = json.dumps(e.body()).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *[(k.encode(), v.encode()) for k, v in (e.headers or {}).items()], (b"connection", b"close"), *extra]
    lines = [b"HTTP/1.1 %d %s" % (e.status, STATUS_PHRASES.get(e.status, b""))] + [k + b": " + v for k, v in head]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _json_app(e: ApiError):
    """An ASGI app answering every request with e, closing the connection."""

    async def app(scope, receive, send) -> None:
        headers = {**(e.headers or {}), "Connection": "close"}
        await ApiError(e.status, e.message, e.param, e.kind, headers).response()(scope, receive, send)

    return app


def protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's H11Protocol under `limits` (a class per server, as uvicorn.Config's `http` takes a class)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


class LimitedH11Protocol(H11Protocol):
    """H11Protocol with a header timeout, a body-stall timeout, a connection cap, JSON answers for what uvicorn
    answers in text/plain, answers to half-closed clients, and a draining mode; see the module's doc."""

    limits: Limits

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._head_started = False  # bytes of the pending request's head have come
        self._over_limit = False
        self._error: h11.RemoteProtocolError | None = None
        app = self.app

        async def admitted(scope, receive, send) -> None:  # uvicorn calls self.app for each request
            refusal = self._refusal(scope)
            if refusal is not None:
                self.limits.count(refusal.status)
                return await _json_app(refusal)(scope, receive, send)
            await app(scope, receive, send)

        self.app = admitted
        next_event = self.conn.next_event

        def recorded_next_event():  # uvicorn answers any RemoteProtocolError; keep it for the JSON answer
            try:
                return next_event()
            except h11.RemoteProtocolError as e:
                self._error = e
                raise

        self.conn.next_event = recorded_next_event

    def _refusal(self, scope) -> ApiError | None:
        head = (len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
                + sum(len(k) + len(v) + 4 for k, v in scope["headers"]))
        if head > self.limits.max_header_bytes:  # (h11 limits only what it buffers unfinished)
            return self._too_large()
        if self.limits.draining:
            return ApiError(503, "the server is shutting down; retry", kind="server_error",
                            headers={"Retry-After": "1"})
        if self._over_limit:
            return ApiError(503, f"the server has its maximum of {self.limits.max_connections} connections open "
                            "(max_connections); retry", kind="server_error", headers={"Retry-After": "1"})
        return None

    def _too_large(self) -> ApiError:
        return ApiError(431, f"the request line and headers are longer than {self.limits.max_header_bytes} bytes "
                        "(max_header_bytes)")

    # ---- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.limits.max_connections
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._probe_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._probe_timer = self._write_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._head_started = self._head_started or bool(data)
            if self._header_timer is None:  # the next request of a kept-alive connection begins
                self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)
        try:
            super().data_received(data)
        except UnicodeDecodeError:  # uvicorn decodes the target as ASCII; h11 lets other bytes through
            self._error = h11.RemoteProtocolError("the request target is not ASCII (percent-encode it)")
            self.send_400_response("Invalid HTTP request received.")
            return
        self._after_events()

    def _after_events(self) -> None:
        state = self.conn.their_state
        if state is not h11.IDLE and self._header_timer is not None:  # its head is complete
            self._header_timer.cancel()
            self._header_timer = None
            self._head_started = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if state is h11.SEND_BODY and not self.transport.is_closing():  # the rest of a body is awaited
            self._body_timer = self.loop.call_later(self.limits.idle_timeout, self._body_timed_out)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may handle a pipelined request
        if not self.transport.is_closing():
            self._after_events()

    def eof_received(self) -> bool | None:
        """The client sent FIN. With a whole request still unanswered it may have half-closed and wait for the
        answer: keep the connection open to write it (then close); otherwise close, as uvicorn does."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or cycle.more_body or \
                self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE):
            return None
        cycle.keep_alive = False  # closed once answered
        if not cycle.response_started and self.scope.get("http_version") == "1.1":
            try:  # a closed peer answers this with a reset; a half-closed one reads it (any 1.1 client may)
                self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                cycle.waiting_for_100_continue = False
            except h11.LocalProtocolError:
                return True
            self._probe(0)
        return True

    def pause_writing(self) -> None:  # the client stopped reading: its socket buffer is full
        super().pause_writing()
        if self._write_timer is None and self.limits.send_timeout:
            self._write_timer = self.loop.call_later(self.limits.send_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # ---- timers ----------------------------------------------------------------------------------
    def _write_timed_out(self) -> None:
        """The client has read nothing for send_timeout (the engine's read_timeout, after which it ends a stream
        left unread, plus idle_timeout): drop the connection, so that a client that never reads cannot keep a
        connection slot after its stream ended (its answer could never be written)."""
        self._write_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # (a pipelined request waits for the one before it)
        if self._head_started:
            self.limits.count(408)
            self._write_error(ApiError(408, "the request's headers did not arrive within "
                                       f"{self.limits.header_timeout:g} s (header_timeout)", kind="timeout_error"))
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY or cycle is None:
            return
        if self.flow.read_paused:  # the server stopped reading, not the client sending: wait on
            self._body_timer = self.loop.call_later(self.limits.idle_timeout, self._body_timed_out)
            return
        if not cycle.response_started:  # the app waits for the body: it sees a disconnect (counted 499)
            cycle.disconnected = True
            cycle.message_event.set()
            self._write_error(ApiError(408, f"no part of the request body came for {self.limits.idle_timeout:g} s "
                                       "(idle_timeout)", kind="timeout_error"))
        self.transport.close()

    def _probe(self, i: int) -> None:
        """After a FIN with an unanswered request: once the probe's reset came back (the socket left CLOSE_WAIT),
        the client is gone: close, so that the app sees the disconnect."""
        self._probe_timer = None
        if self.transport.is_closing() or self.cycle is None or self.cycle.response_complete:
            return
        state = _tcp_state(self.transport)
        if state is None:
            return  # not Linux: the request is answered; a gone client is noticed when its answer is written
        if state != _TCP_CLOSE_WAIT:
            self.transport.close()
            return
        delay = _PROBE_DELAYS[i] if i < len(_PROBE_DELAYS) else 1.0
        self._probe_timer = self.loop.call_later(delay, self._probe, i + 1)

    # ---- answers ---------------------------------------------------------------------------------
    def _write_error(self, e: ApiError) -> None:
        if not self.transport.is_closing():
            self.transport.write(error_bytes(e, self.server_state.default_headers))

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 refused, as JSON: 431 for headers over max_header_bytes, else 400."""
        e, self._error = self._error, None
        status = getattr(e, "error_status_hint", 400) if e is not None else 400
        if status == 431:
            error = self._too_large()
        else:
            error = ApiError(status, f"invalid HTTP request: {e}" if e is not None and str(e) else
                             "invalid HTTP request")
        self.limits.count(error.status)
        self._write_error(error)
        self.transport.close()


def _tcp_state(transport) -> int | None:
    """The TCP state of a transport's socket (Linux's TCP_INFO), or None where it cannot be read."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
    except (OSError, struct.error, ValueError):
        return None


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that on its first SIGTERM/SIGINT drains instead of closing its listener at once: the engine
    admits nothing new and cancels what still runs after `grace` seconds (AsyncEngine.drain), every new request
    gets a JSON 503 + Retry-After, and once nothing is in flight (at most `grace` seconds) it stops as uvicorn
    does. A second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, limits: Limits, llm, grace: float):
        super().__init__(config)
        self.limits, self.llm, self.grace = limits, llm, grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.limits.draining or self.should_exit or self._loop is None or not self.started:
            return super().handle_exit(sig, frame)
        self.limits.draining = True
        if not self.llm.stopping:
            self.llm.drain(self.grace)
        self._loop.call_soon_threadsafe(self._start_drain, sig)  # (no logging in a signal handler)

    def _start_drain(self, sig) -> None:
        logger.info("Draining: new requests get 503 for up to %g s while %d request(s) finish (signal again to "
                    "stop now)", self.grace, len(self.server_state.tasks))
        self._drain_task = self._loop.create_task(self._drain(sig))

    def busy(self) -> bool:
        stats = self.llm.stats()
        return bool(stats["active"] or stats["queue_depth"] or self.server_state.tasks)

    async def _drain(self, sig) -> None:
        deadline = self._loop.time() + self.grace
        while self.busy() and self._loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, None)


def server(app, limits: Limits | None = None, *, host: str = "127.0.0.1", port: int = 8000, grace: float = 10.0,
           log_level: str = "info", **config) -> DrainingServer:
    """The server of an app from create_app under `limits` (not started: .run(), or .serve() in a loop); answers
    given by the connection handling are counted in the app's /metrics."""
    limits = limits or Limits()
    metrics = app.state.metrics
    limits.count = lambda status: metrics.requests.labels(str(status)).inc()
    return DrainingServer(limits.config(app, host=host, port=port, grace=grace, log_level=log_level, **config),
                          limits, app.state.llm, grace)
