"""fp16 export (checked on CPU here) and the CUDA provider (skips cleanly without a GPU)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model

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
    assert (out / "model.onnx.data").stat().st_size < 0.6 * (fp16[1].folder / "model.onnx.data").stat().st_size


def test_decode_step_greedy_ids_and_logits_match_forward(tiny):
    """The bound-once decode step (the CUDA-graph path) equals forward(), on any provider."""
    from gpt2_onnx.model import DecodeStep

    _, engine, _, _ = tiny
    prompts = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 0, 0]])
    lens = np.array([5, 3])
    a, b = engine.model.new_cache(2, 16), engine.model.new_cache(2, 16)
    for c in (a, b):
        engine.model.forward(prompts, lens, c, (lens - 1)[:, None])
    step = DecodeStep(engine.model, b)
    tokens = np.array([7, 8])
    for _ in range(6):
        ref = engine.model.forward(tokens[:, None], np.ones(2, np.int64), a, np.zeros((2, 1), np.int64))[:, 0]
        ids, logits = step(tokens, np.arange(2))
        np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
        assert ids.tolist() == ref.argmax(-1).tolist() and b.lengths.tolist() == a.lengths.tolist()
        tokens = ids


def test_cuda_graph_needs_cuda(tiny):
    _, _, _, onnx_dir = tiny
    with pytest.raises(ValueError, match="cuda_graph=True needs provider='cuda'"):
        Engine.load(onnx_dir, provider="cpu", cuda_graph=True)


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


@needs_cuda
def test_cuda_graph_decode_matches_plain_cuda(fp16):
    _, _, out = fp16
    ids = np.random.default_rng(4).integers(0, 1000, 20).tolist()
    plain = Engine.load(out, provider="cuda").generate_batch([ids, ids[:5]], max_new_tokens=24, ignore_eos=True)
    graph = Engine.load(out, provider="cuda", cuda_graph=True).generate_batch([ids, ids[:5]], max_new_tokens=24,
                                                                               ignore_eos=True)
    assert [r.token_ids for r in graph] == [r.token_ids for r in plain]
