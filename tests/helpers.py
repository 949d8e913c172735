"""Test helpers: GPT-2 checkpoints built locally with seeded random weights (never downloaded)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be: that is the question."]

SHAPES = {
    # name: GPT2Config kwargs
    "tiny": dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4),
    "gpt2vocab": dict(vocab_size=50257, n_positions=96, n_embd=48, n_layer=2, n_head=2),
    "deep": dict(vocab_size=512, n_positions=160, n_embd=96, n_layer=4, n_head=6, scale_attn_by_inverse_layer_idx=True),
}


def write_tokenizer(folder: Path) -> None:
    """A small byte-level BPE (GPT-2 style) so that text prompts work on the test models."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))


def make_checkpoint(folder: Path, *, seed: int = 0, **kwargs) -> "transformers.GPT2LMHeadModel":
    """Save a seeded random GPT-2 (HF format + tokenizer.json) into folder; return the torch model."""
    kw = dict(initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    kw.update(kwargs)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


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


def post(url, body, *, timeout=60, **kw):
    """POST /v1/completions with a JSON (or raw bytes) body."""
    return httpx.post(url + "/v1/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                      headers={"content-type": "application/json", **kw.pop("headers", {})}, timeout=timeout, **kw)
