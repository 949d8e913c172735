"""One HTTP request through an ASGI app in this process, without a socket.

The Ray Serve replicas (gpt2_onnx.distributed) and `gpt2-onnx batch` run create_app's routes this
way: the same code as the HTTP server, called directly. The body is delivered at once; the app sees
the client disconnect (http.disconnect) when the caller stops iterating (it was cancelled or closed).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator


def http_scope(method: str, path: str, *, headers: list[tuple[bytes, bytes]] = (), query_string: bytes = b"",
               client: tuple[str, int] | None = None) -> dict:
    """A plain HTTP scope for `path` (no server socket behind it)."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query_string, "headers": [(bytes(k), bytes(v)) for k, v in headers],
            "client": client, "server": ("127.0.0.1", 80), "state": {}}


async def call(app, scope: dict, body: bytes) -> AsyncIterator[list[dict]]:
    """Run one request; yields the app's `send` messages, in lists of those ready together, until the
    response is complete. Stopping the iteration early tells the app that the client went away."""
    sent: asyncio.Queue[dict] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the app returned (or raised) with nothing more to send
                getter.cancel()
                batch = _drain(sent)
                if batch:
                    yield batch
                task.result()  # its exception, if any
                return
            batch = [getter.result(), *_drain(sent)]
            yield batch
            last = batch[-1]
            if last["type"] == "http.response.body" and not last.get("more_body", False):
                return
    finally:
        gone.set()  # a caller that stopped early is a client that hung up: the app frees its rows
        if not task.done():
            await asyncio.wait({task}, timeout=10)
            task.cancel()


def _drain(queue: asyncio.Queue) -> list[dict]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def request(app, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    """A JSON request through the app: (status, the JSON body of its answer)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    scope = http_scope(method, path, headers=[(b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())])
    status, chunks = 500, []
    async for batch in call(app, scope, body):
        for m in batch:
            if m["type"] == "http.response.start":
                status = m["status"]
            elif m["type"] == "http.response.body":
                chunks.append(m.get("body", b""))
    return status, json.loads(b"".join(chunks) or b"null")
