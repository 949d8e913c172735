"""Bad input gets a clear ValueError naming the problem, never a crash inside onnxruntime."""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2_onnx import Engine
from gpt2_onnx import config as C
from gpt2_onnx.export import export_model

from helpers import make_checkpoint


def test_empty_prompt_starts_from_endoftext(tiny):
    _, engine, _, _ = tiny
    a = engine.generate("", max_new_tokens=5)
    b = engine.generate([engine.config.bos_token_id], max_new_tokens=5)
    assert a.token_ids == b.token_ids and a.prompt_tokens == 1


def test_prompt_plus_max_new_tokens_beyond_context(tiny):
    _, engine, _, _ = tiny
    n = engine.config.n_positions
    with pytest.raises(ValueError, match=rf"100 tokens \+ max_new_tokens 29 = 129 exceeds .*n_positions {n}"):
        engine.generate([1] * 100, max_new_tokens=29)
    assert len(engine.generate([1] * 100, max_new_tokens=28, ignore_eos=True).token_ids) == 28


@pytest.mark.parametrize("bad", [[-1], [1, 1000], [5, 10**9]])
def test_token_ids_outside_vocab(tiny, bad):
    _, engine, _, _ = tiny
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1000\)"):
        engine.generate(bad, max_new_tokens=2)


@pytest.mark.parametrize("bad", [[1.5], ["a"], [True]])
def test_token_ids_of_wrong_type(tiny, bad):
    _, engine, _, _ = tiny
    with pytest.raises(ValueError, match="token ids must be integers"):
        engine.generate(bad, max_new_tokens=2)


def test_max_new_tokens_zero_returns_nothing(tiny):
    _, engine, _, _ = tiny
    r = engine.generate("hello", max_new_tokens=0)
    assert r.token_ids == [] and r.text == "" and r.finish_reason == "length"


@pytest.mark.parametrize("bad", [-1, 2.5, None])
def test_bad_max_new_tokens(tiny, bad):
    _, engine, _, _ = tiny
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        engine.generate("hi", max_new_tokens=bad)


@pytest.fixture
def export_copy(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    dst = tmp_path / "copy"
    shutil.copytree(onnx_dir, dst)
    return dst


def test_missing_model_onnx(export_copy):
    (export_copy / "model.onnx").unlink()
    with pytest.raises(ValueError, match=r"model\.onnx not found"):
        Engine.load(export_copy)


def test_truncated_model_onnx(export_copy):
    p = export_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.onnx has 1000 bytes but the manifest says \d+: the file is truncated"):
        Engine.load(export_copy)


def test_truncated_model_onnx_without_size_in_manifest(export_copy):
    m = json.loads((export_copy / "manifest.json").read_text())
    m["onnx_bytes"] = 0
    (export_copy / "manifest.json").write_text(json.dumps(m))
    p = export_copy / "model.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"onnxruntime could not load .*model\.onnx"):
        Engine.load(export_copy)


def test_git_lfs_pointer(export_copy):
    (export_copy / "model.onnx").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match=r"model\.onnx is a Git LFS pointer"):
        Engine.load(export_copy)


def test_missing_manifest(export_copy):
    (export_copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"manifest\.json not found.*gpt2-onnx export"):
        Engine.load(export_copy)


def test_manifest_from_another_version(export_copy):
    m = json.loads((export_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (export_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"format_version 99 but this engine reads format {C.FORMAT_VERSION}"):
        Engine.load(export_copy)


def test_manifest_not_json(export_copy):
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Engine.load(export_copy)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        Engine.load(tmp_path / "nope")


def test_unknown_provider(tiny):
    _, _, _, onnx_dir = tiny
    with pytest.raises(ValueError, match="provider must be 'auto', 'cpu' or 'cuda'"):
        Engine.load(onnx_dir, provider="tpu")


def test_cuda_asked_but_missing_is_an_error_not_a_fallback(tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present")
    _, _, _, onnx_dir = tiny
    with pytest.raises(ValueError, match="provider 'cuda' asked for"):
        Engine.load(onnx_dir, provider="cuda")


def test_non_gpt2_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="model_type is 'llama'.*only GPT-2"):
        export_model(str(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        export_model(str(tmp_path), tmp_path / "out")


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        export_model(str(tmp_path / "missing" / "model"), tmp_path / "out")


def test_pytorch_bin_checkpoint_exports_with_torch(tmp_path):
    import torch

    model = make_checkpoint(tmp_path / "hf", n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=32)
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    out = export_model(str(tmp_path / "hf"), tmp_path / "out")
    assert Engine.load(out).generate([1, 2], max_new_tokens=3).token_ids


def test_export_refuses_to_overwrite_unrelated_folder(tiny, tmp_path):
    _, _, ck, _ = tiny
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty folder that is not a gpt2-onnx export"):
        export_model(str(ck), tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    import torch

    model = make_checkpoint(tmp_path / "hf", n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=32)
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ValueError, match="PyTorch pickle and reading it needs torch, which is not installed"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")


def test_weights_are_page_aligned_external_data_and_truncation_is_detected(tiny, tmp_path):
    import onnx

    _, engine, ck, _ = tiny
    out = export_model(str(ck), tmp_path / "big")
    assert (out / "model.onnx.data").is_file() and (out / "model.onnx").stat().st_size < 100_000
    offsets = [int(e.value) for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)  # so that onnxruntime maps the file
    big = Engine.load(out)
    assert big.config.external_data == "model.onnx.data"
    assert big.generate([1, 2, 3], max_new_tokens=8).token_ids == engine.generate([1, 2, 3], max_new_tokens=8).token_ids
    data = out / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model\.onnx\.data has 5000 bytes but the manifest says"):
        Engine.load(out)


@pytest.mark.parametrize("field, value, match", [
    ("activation_function", "relu",
     r"activation_function .relu. is not supported \(gelu_new, gelu_pytorch_tanh or gelu_fast"),
    ("n_inner", 48, r"n_inner 48 is not 4\*n_embd"),
])
def test_unsupported_gpt2_variant_is_refused_before_writing(tmp_path, field, value, match):
    make_checkpoint(tmp_path / "hf", n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=32, **{field: value})
    with pytest.raises(ValueError, match=match):
        export_model(str(tmp_path / "hf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_prefix_from_another_model_is_refused(tiny, tmp_path):
    _, engine, _, _ = tiny
    from helpers import SHAPES

    make_checkpoint(tmp_path / "hf", seed=99, **SHAPES["tiny"])  # the same shape, other weights
    other = Engine.load(export_model(str(tmp_path / "hf"), tmp_path / "onnx"))
    pre = other.prefill([1, 2, 3, 4])
    with pytest.raises(ValueError, match="this prefix was computed by another model"):
        engine.generate([5], prefix=pre, max_new_tokens=2)
    assert other.generate([5], prefix=pre, max_new_tokens=2).token_ids


@pytest.mark.parametrize("field, value", [("n_embd", 128), ("n_head", 8), ("vocab_size", 999), ("n_positions", 256),
                                          ("n_layer", 3)])
def test_a_manifest_out_of_step_with_the_graph_is_refused_at_load(export_copy, field, value):
    m = json.loads((export_copy / "manifest.json").read_text())
    m[field] = value
    (export_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json (does not describe|.*inputs).*re-export"):
        Engine.load(export_copy)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(export_copy, tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(1500)}, unk_token="w0")).save(
        str(export_copy / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json has 1500 tokens but the model's vocabulary is 1000"):
        Engine.load(export_copy)
