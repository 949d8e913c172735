"""The bundled Tiny Shakespeare model: parity with torch, evaluation, and the offline CLI end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2_onnx import Engine
from gpt2_onnx.evaluate import evaluate
from gpt2_onnx.export import export_model
from gpt2_onnx.models import BUNDLED

SAMPLE = Path(__file__).parent / "data" / "heldout_sample.txt"  # from the held-out last 10% of the corpus


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    out = export_model(str(BUNDLED), tmp_path_factory.mktemp("bundled") / "onnx")
    torch_model = GPT2LMHeadModel.from_pretrained(BUNDLED, dtype=torch.float32).eval()  # fp16 file, upcast
    return torch_model, Engine.load(out, provider="cpu")


def test_bundled_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in BUNDLED.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md", "train.py"):
        assert name in files, name
    assert sum(files.values()) < 15e6


def test_bundled_parity_with_torch(bundled):
    model, eng = bundled
    ids = eng.tokenizer.encode(SAMPLE.read_text()[:600])[: eng.config.n_positions]
    cache = eng.model.new_cache(1, len(ids))
    got = eng.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    prompt = eng.tokenizer.encode("ROMEO:\nWhat light")
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                            pad_token_id=eng.config.eos_token_id)[0, len(prompt):].tolist()
    assert eng.generate(prompt, max_new_tokens=40).token_ids == hf


def test_eval_matches_torch(bundled):
    model, eng = bundled
    text = SAMPLE.read_text()
    res = evaluate(eng, text)
    ids = eng.tokenizer.encode(text)
    n, total, count = eng.config.n_positions, 0.0, 0
    for s in range(0, len(ids) - 1, n - 1):  # the same windows, overlapping by one token
        w = torch.tensor([ids[s : s + n]])
        with torch.no_grad():
            logits = model(w).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    assert abs(res.nats_per_token - total / count) < 1e-3
    assert res.nats_per_char == pytest.approx(total / len(text), abs=1e-3)
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-3)
    assert res.nats_per_char < 1.8  # a trained model, not noise (random would be ~ln(4096)/3 = 2.8)


def _cli(*args, cache):
    env = dict(os.environ, GPT2_ONNX_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_default_model_offline_end_to_end(bundled, tmp_path):
    _, eng = bundled
    r = _cli("generate", "ROMEO:", "-n", "30", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + eng.generate("ROMEO:", max_new_tokens=30).text + "\n"
    r2 = _cli("eval", SAMPLE, cache=tmp_path)
    assert r2.returncode == 0, r2.stderr
    line = next(x for x in r2.stdout.splitlines() if x.startswith("nats/token"))
    assert abs(float(line.split()[1]) - evaluate(eng, SAMPLE.read_text()).nats_per_token) < 1e-3
    r3 = _cli("eval", tmp_path / "missing.txt", "-m", str(BUNDLED), cache=tmp_path)
    assert r3.returncode == 2 and "cannot read" in r3.stderr
