"""Test helpers: GPT-2 checkpoints built locally with seeded random weights (never downloaded)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common import make_checkpoint as build_checkpoint

SHAPES = {
    # name: GPT2Config kwargs
    "tiny": dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    "gpt2vocab": dict(vocab_size=50257, n_positions=96, n_embd=48, n_layer=2, n_head=2),
    "deep": dict(vocab_size=512, n_positions=160, n_embd=96, n_layer=4, n_head=6, scale_attn_by_inverse_layer_idx=True),
}


def make_checkpoint(folder: Path, *, seed: int = 0, **kwargs):
    """benchmarks.common.make_checkpoint with the tests' defaults: large init weights (so that greedy
    output is not degenerate), bos = eos = 0, the small BPE tokenizer."""
    return build_checkpoint(folder, seed=seed, **{"initializer_range": 0.3, "bos_token_id": 0, "eos_token_id": 0,
                                                  **kwargs})


# ---- the HTTP server on loopback -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An app served by uvicorn in a thread on 127.0.0.1 (a free port), for tests."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def wait_healthy(url: str, proc, timeout: float, pause: float = 0.2) -> None:
    """Wait until the server process `proc` answers GET url/health with 200; fails with the tail of its stderr
    if it exits first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(pause)


def post(url, body, *, timeout=60, **kw):
    """POST /v1/completions with a JSON (or raw bytes) body."""
    return httpx.post(url + "/v1/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=timeout, **kw)


# ---- JSONL files of gpt2-onnx batch ------------------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> dict:
    """OUTPUT rows by id (json.dumps of it); fails if an id appears twice."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {json.dumps(r["id"]): r for r in rows}
    assert len(by_id) == len(rows), "an id appears twice"
    return by_id
