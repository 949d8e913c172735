"""Head sizes that are not a multiple of 8: each head is zero-padded for GroupQueryAttention, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_checkpoint
from test_fp16_cuda import needs_cuda
from test_parity import kv_layer

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model

ATOL = 1e-4
SHAPES = {  # name: (GPT2Config kwargs, padded head size)
    "head5": (dict(n_embd=10, n_head=2, n_layer=2), 8),
    "head20": (dict(n_embd=60, n_head=3, n_layer=2, scale_attn_by_inverse_layer_idx=True), 24),
    "tiny-gpt2": (dict(n_embd=2, n_head=2, n_layer=2), 8),  # the common 2-wide test model: head size 1
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def padded(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    kwargs, hsp = SHAPES[request.param]
    model = make_checkpoint(root / "hf", seed=3, vocab_size=400, n_positions=64, **kwargs)
    engine = Engine.load(export_model(str(root / "hf"), root / "onnx"), provider="cpu")
    return model, engine, hsp, root


def test_manifest_names_the_padded_head_size(padded):
    model, engine, hsp, _ = padded
    cfg = engine.config
    assert cfg.head_size == model.config.n_embd // model.config.n_head and cfg.head_size % 8
    assert cfg.kv_head_size_padded == cfg.kv_head_size == hsp
    assert engine.model.new_cache(1, 4).host_arrays()[0].shape == (1, cfg.n_head, 4, hsp)


def test_prefill_and_decode_logits_and_kv_match_torch(padded):
    model, engine, _, _ = padded
    ids = np.random.default_rng(0).integers(0, 400, 20).tolist()
    cache = engine.model.new_cache(1, 24)
    got = engine.model.forward(np.array([ids[:15]]), np.array([15]), cache, np.arange(15)[None])[0]
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    np.testing.assert_allclose(got, out.logits[0, :15].numpy(), atol=ATOL, rtol=0)
    for t, tok in enumerate(ids[15:], start=15):
        step = engine.model.forward(np.array([[tok]]), np.array([1]), cache, np.zeros((1, 1), np.int64))[0, 0]
        np.testing.assert_allclose(step, out.logits[0, t].numpy(), atol=ATOL, rtol=0)
    hs, arrays = engine.config.head_size, cache.host_arrays()
    for i in range(engine.config.n_layer):
        k, v = kv_layer(out.past_key_values, i)  # (B, nh, T, hs)
        np.testing.assert_allclose(arrays[2 * i][:, :, :20, :hs], k.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(arrays[2 * i + 1][:, :, :20, :hs], v.numpy(), atol=ATOL, rtol=0)
        assert not arrays[2 * i][..., hs:].any() and not arrays[2 * i + 1][..., hs:].any()  # padding stays zero


def test_greedy_ids_equal_hf_generate(padded):
    model, engine, _, _ = padded
    ids = [7, 300, 12, 45, 99]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                             pad_token_id=engine.config.eos_token_id)[0, len(ids):].tolist()
    assert engine.generate(ids, max_new_tokens=24).token_ids == ref


def test_prefix_reuse_and_batches_on_padded_heads(padded):
    _, engine, _, _ = padded
    pre = engine.prefill([3, 14, 15, 92, 65])
    a = engine.generate([3, 14, 15, 92, 65, 35, 89], max_new_tokens=10, ignore_eos=True)
    b = engine.generate([35, 89], max_new_tokens=10, ignore_eos=True, prefix=pre)  # the prompt after the prefix
    assert a.token_ids == b.token_ids
    rows = engine.generate_batch([[1], [5, 6, 7, 8]], max_new_tokens=8, ignore_eos=True)
    assert rows[1].token_ids == engine.generate([5, 6, 7, 8], max_new_tokens=8, ignore_eos=True).token_ids


def test_quantized_export_of_padded_heads_runs(padded):
    _, engine, _, root = padded
    q = Engine.load(export_model(str(root / "hf"), root / "int8", quantize="int8"), provider="cpu")
    assert q.config.kv_head_size == engine.config.kv_head_size
    ids = [7, 300, 12, 45, 99]
    cache = q.model.new_cache(1, 5)
    got = q.model.forward(np.array([ids]), np.array([5]), cache, np.arange(5)[None])[0]
    ref = engine.model.forward(np.array([ids]), np.array([5]), engine.model.new_cache(1, 5), np.arange(5)[None])[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # int8 weights: close, not equal


@pytest.mark.parametrize("bad", [4, 12, -8, True])
def test_manifest_with_an_impossible_padded_head_size_is_refused(padded, bad):
    from dataclasses import replace

    _, engine, _, _ = padded
    with pytest.raises(ValueError, match="kv_head_size_padded must be 0 or a multiple of 8 >= head_size"):
        replace(engine.config, kv_head_size_padded=bad).validate()


@needs_cuda
def test_padded_heads_on_cuda_fp32_and_fp16(padded):
    model, cpu, hsp, root = padded
    ids = [7, 300, 12, 45, 99, 3, 250]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    gpu = Engine.load(root / "onnx", provider="cuda")
    cache = gpu.model.new_cache(1, len(ids))
    got = gpu.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert gpu.generate(ids, max_new_tokens=16).token_ids == cpu.generate(ids, max_new_tokens=16).token_ids
    half = Engine.load(export_model(str(root / "hf"), root / "fp16", dtype="float16"), provider="cuda")
    assert half.config.kv_head_size == hsp
    cache = half.model.new_cache(1, len(ids))
    got = half.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.2
