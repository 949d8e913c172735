"""fp16 export (checked on CPU here) and the CUDA provider (skips cleanly without a GPU)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from engine import Engine
from export import export_model

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not available (install onnxruntime-gpu "
                                                     "on a machine with an NVIDIA GPU)")


@pytest.fixture(scope="module")
def fp16(tiny, tmp_path_factory):
    model, engine, ck, _ = tiny
    out = export_model(str(ck), tmp_path_factory.mktemp("fp16") / "m", dtype="float16")
    return model, engine, out


def _logits(engine, ids):
    cache = engine.model.new_cache(1, len(ids))
    return engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]


def test_fp16_export_is_sane_on_cpu(fp16):
    model, _, out = fp16
    eng = Engine.load(out, provider="cpu")
    assert eng.config.dtype == "float16"
    ids = np.random.default_rng(0).integers(0, 1000, 60).tolist()
    got = _logits(eng, ids)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 0.2
    assert eng.model.new_cache(1, 4).host_arrays()[0].dtype == np.float16
    assert (out / "model.onnx").stat().st_size < 0.6 * (fp16[1].folder / "model.onnx").stat().st_size


def test_greedy_uses_in_graph_argmax_and_matches_logits_path(tiny):
    _, engine, _, _ = tiny
    ids = [3, 1, 4, 1, 5]
    cache_a, cache_b = engine.model.new_cache(1, 8), engine.model.new_cache(1, 8)
    logits = engine.model.forward(np.array([ids]), np.array([5]), cache_a, np.array([[4]]))
    nxt = engine.model.forward(np.array([ids]), np.array([5]), cache_b, np.array([[4]]), argmax=True)
    assert nxt.dtype == np.int64 and nxt.tolist() == [[int(logits[0, 0].argmax())]]


@needs_cuda
def test_cuda_session_really_runs_on_cuda(tiny):
    _, _, _, onnx_dir = tiny
    eng = Engine.load(onnx_dir, provider="cuda")
    assert eng.model.session.get_providers()[0] == "CUDAExecutionProvider"
    assert eng.model.new_cache(1, 4).device == "cuda"


@needs_cuda
def test_cuda_fp32_parity_and_greedy(tiny):
    model, cpu, _, onnx_dir = tiny
    eng = Engine.load(onnx_dir, provider="cuda")
    ids = np.random.default_rng(2).integers(0, 1000, 40).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(eng, ids), ref, atol=1e-3, rtol=0)
    assert eng.generate(ids, max_new_tokens=20).token_ids == cpu.generate(ids, max_new_tokens=20).token_ids


@needs_cuda
def test_cuda_fp16_no_nan_and_close(fp16):
    model, _, out = fp16
    eng = Engine.load(out, provider="cuda")
    ids = np.random.default_rng(3).integers(0, 1000, 60).tolist()
    got = _logits(eng, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.2
    batch = eng.generate_batch([ids, ids[:7]], max_new_tokens=16)
    assert all(len(r.token_ids) for r in batch)
