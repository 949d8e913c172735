"""Checkpoint layouts and configs users have: exported like transformers reads them, or refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from helpers import make_checkpoint
from safetensors.torch import load_file, save_file

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model

ATOL = 1e-4
SMALL = dict(vocab_size=300, n_positions=48, n_embd=32, n_layer=2, n_head=4)
IDS = [5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200, 11]


def logits_of(engine, ids=IDS):
    cache = engine.model.new_cache(1, len(ids))
    return engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]


def hf_logits(folder, ids=IDS):
    """What transformers itself loads from the folder and computes."""
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy(), model.config


def export_and_load(folder, out):
    return Engine.load(export_model(str(folder), out), provider="cpu")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("stale", [False, True], ids=["aliases-only", "aliases-beside-stale-gpt2-names"])
def test_config_aliases_are_read_as_transformers_reads_them(tmp_path, stale):
    make_checkpoint(tmp_path / "hf", vocab_size=300, n_positions=40, n_embd=32, n_layer=3, n_head=2)
    edit_config(tmp_path / "hf", n_layer=12 if stale else None, n_head=12 if stale else None,
                n_embd=768 if stale else None, n_positions=1024 if stale else None,
                num_hidden_layers=3, num_attention_heads=2, hidden_size=32, max_position_embeddings=40)
    ref, hf_cfg = hf_logits(tmp_path / "hf")
    engine = export_and_load(tmp_path / "hf", tmp_path / "out")
    got = engine.config
    assert (got.n_layer, got.n_head, got.n_embd, got.n_positions) == (
        hf_cfg.n_layer, hf_cfg.n_head, hf_cfg.n_embd, hf_cfg.n_positions) == (3, 2, 32, 40)
    np.testing.assert_allclose(logits_of(engine), ref, atol=ATOL, rtol=0)


def test_config_without_model_type_but_gpt2_architecture(tmp_path):
    make_checkpoint(tmp_path / "hf", **SMALL)
    edit_config(tmp_path / "hf", model_type=None)
    ref, _ = hf_logits(tmp_path / "hf")
    np.testing.assert_allclose(logits_of(export_and_load(tmp_path / "hf", tmp_path / "out")), ref, atol=ATOL, rtol=0)
    edit_config(tmp_path / "hf", architectures=["BertModel"])
    with pytest.raises(ValueError, match=r"model_type is None.*architectures \['GPT2LMHeadModel'\]"):
        export_model(str(tmp_path / "hf"), tmp_path / "out2")


def test_gelu_fast_is_the_tanh_gelu_of_gpt2():
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 200_001, dtype=torch.float32)
    new = ACT2FN["gelu_new"](x)
    for name in ("gelu_fast", "gelu_pytorch_tanh"):
        assert (ACT2FN[name](x) - new).abs().max().item() < 2e-6, name  # fp32 rounding, |x| up to 12
    assert (ACT2FN["gelu"](x) - new).abs().max().item() > 1e-4  # the erf GELU is another function


def test_gelu_fast_checkpoint_exports_exactly(tmp_path):
    model = make_checkpoint(tmp_path / "hf", activation_function="gelu_fast", **SMALL)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(logits_of(export_and_load(tmp_path / "hf", tmp_path / "out")), ref, atol=ATOL, rtol=0)


def test_missing_and_leftover_weights_are_named(tmp_path):
    make_checkpoint(tmp_path / "hf", **SMALL)
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(path)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(4)
    sd["score.weight"] = torch.zeros(2, 32)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"missing h\.1\.mlp\.c_fc\.bias; not used h\.0\.attn\.rotary\.inv_freq, "
                                         r"score\.weight"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layers_beyond_the_config_are_not_dropped_silently(tmp_path):
    make_checkpoint(tmp_path / "hf", **{**SMALL, "n_layer": 3})
    edit_config(tmp_path / "hf", n_layer=None, num_hidden_layers=None)  # GPT2Config's default of 12 would apply
    with pytest.raises(ValueError, match=r"n_layer 12, .*missing h\.3\.attn\.c_attn\.bias, .* and 100 more; "
                                         r"not used none"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")
    edit_config(tmp_path / "hf", n_layer=2)
    with pytest.raises(ValueError, match=r"n_layer 2, .*missing none; not used h\.2\.attn\.c_attn\.bias, "
                                         r".* and 4 more"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")


def test_untied_head_must_be_in_the_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "hf", tie_word_embeddings=False, **SMALL)
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(path)
    assert "lm_head.weight" in sd
    del sd["lm_head.weight"]
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"missing lm_head\.weight"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod.", "strip-transformer"])
def test_wrapper_prefixes(tmp_path, prefix):
    model = make_checkpoint(tmp_path / "hf", **SMALL)
    path = tmp_path / "hf" / "model.safetensors"
    sd = load_file(path)
    if prefix == "strip-transformer":  # a GPT2Model state dict
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    else:  # torch.compile / DDP wrappers of the whole LM
        sd = {prefix + k: v for k, v in sd.items()}
    save_file(sd, path)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(logits_of(export_and_load(tmp_path / "hf", tmp_path / "out")), ref, atol=ATOL, rtol=0)


def test_sharded_pytorch_bin(tmp_path):
    model = make_checkpoint(tmp_path / "hf", **SMALL)
    (tmp_path / "hf" / "model.safetensors").unlink()
    sd = model.state_dict()
    names = list(sd)
    weight_map = {}
    for j, part in enumerate(np.array_split(np.arange(len(names)), 3)):
        shard = f"pytorch_model-{j + 1:05d}-of-00003.bin"
        torch.save({names[i]: sd[names[i]] for i in part}, tmp_path / "hf" / shard)
        weight_map |= {names[i]: shard for i in part}
    index = tmp_path / "hf" / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ref, _ = hf_logits(tmp_path / "hf")
    np.testing.assert_allclose(logits_of(export_and_load(tmp_path / "hf", tmp_path / "out")), ref, atol=ATOL, rtol=0)
    (tmp_path / "hf" / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(ValueError, match=r"names shards that are not in .*pytorch_model-00002-of-00003\.bin"):
        export_model(str(tmp_path / "hf"), tmp_path / "out2")


def test_sharded_safetensors(tmp_path):
    model = make_checkpoint(tmp_path / "hf", **SMALL)
    (tmp_path / "hf" / "model.safetensors").unlink()
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(logits_of(export_and_load(tmp_path / "hf", tmp_path / "out")), ref, atol=ATOL, rtol=0)


def test_bf16_safetensors_read_with_numpy_alone(tmp_path):
    """bf16 is widened exactly in a process where ml_dtypes cannot be imported and onnx never was."""
    model = make_checkpoint(tmp_path / "hf", **SMALL)
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    code = (
        "import sys; sys.modules['ml_dtypes'] = None\n"  # as if ml_dtypes were not installed
        "import numpy as np\n"
        "from gpt2_onnx.export import checkpoint\n"
        f"ck = checkpoint.load({str(tmp_path / 'hf')!r})\n"
        "assert 'onnx' not in sys.modules, 'reading a checkpoint imported onnx'\n"
        f"np.savez({str(tmp_path / 'w.npz')!r}, **ck.weights)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = np.load(tmp_path / "w.npz")
    assert sorted(got.files) == sorted(k.removeprefix("transformer.") for k in sd)
    for k, v in sd.items():
        ref = v.float().numpy()
        assert got[k.removeprefix("transformer.")].dtype == np.float32
        np.testing.assert_array_equal(got[k.removeprefix("transformer.")], ref)
    w = "transformer.h.0.attn.c_attn.weight"
    assert not np.array_equal(got[w.removeprefix("transformer.")], model.state_dict()[w].numpy())  # really bf16


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    make_checkpoint(tmp_path / "hf", **SMALL)
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"could not read .*model\.safetensors .*runs past the end.*download complete"):
        export_model(str(tmp_path / "hf"), tmp_path / "out")


def test_weights_digest_names_the_exported_weights(tiny, tmp_path, monkeypatch):
    import onnx

    from gpt2_onnx.export import exporter

    _, engine, ck, onnx_dir = tiny
    digest = engine.config.weights_digest
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert exporter.weights_digest(onnx.load(onnx_dir / "model.onnx")) == digest  # what the files hold
    assert Engine.load(export_model(str(ck), tmp_path / "again")).config.weights_digest == digest
    assert Engine.load(export_model(str(ck), tmp_path / "int8", quantize="int8")).config.weights_digest != digest


def test_bitfit_bias_only_fine_tune_exports_exactly(tmp_path):
    """BitFit trains only the biases (GPT-2's init leaves them zero): a plain checkpoint, exported exactly."""
    model = make_checkpoint(tmp_path / "base", **SMALL)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "bitfit")
    shutil.copyfile(tmp_path / "base" / "tokenizer.json", tmp_path / "bitfit" / "tokenizer.json")
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
        base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(ref - base).max() > 0.1  # the biases matter
    engine = export_and_load(tmp_path / "bitfit", tmp_path / "out")
    np.testing.assert_allclose(logits_of(engine), ref, atol=ATOL, rtol=0)
    ids = engine.generate(IDS, max_new_tokens=16).token_ids
    assert ids == model.generate(torch.tensor([IDS]), max_new_tokens=16, do_sample=False,
                                 pad_token_id=0)[0, len(IDS):].tolist()
