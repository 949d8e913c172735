"""PEFT adapters against peft's own PeftModel in torch: LoRA / IA3 merged at export, prefix-tuning as a prefix KV."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from helpers import make_checkpoint
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from test_parity import kv_layer

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model
from gpt2_onnx.export.adapters import merge_adapter, read_prefix_adapter
from gpt2_onnx.export.cache import resolve_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's advice
ATOL = 1e-4
BASE = dict(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4)
IDS = [5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    make_checkpoint(root / "hf", seed=5, **BASE)
    return root / "hf"


def load_base(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def save_adapter(folder, config, out, *, seed=0, scale=0.3):
    """get_peft_model on the base, every trainable tensor random (LoRA B non-zero), saved with save_pretrained."""
    torch.manual_seed(seed)
    model = get_peft_model(load_base(folder), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(1 + scale * torch.randn_like(p) if "ia3_l" in name else scale * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def peft_reference(base_folder, adapter, ids=IDS, new=20):
    """Logits of every position and greedy ids, from the adapter as peft loads it from disk."""
    model = PeftModel.from_pretrained(load_base(base_folder), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                pad_token_id=0)[0, len(ids):].tolist()
    return logits, greedy


def all_logits(engine, ids=IDS):
    cache = engine.model.new_cache(1, len(ids))
    return engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]


MERGED = {
    "lora-all-modules": LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "lora-rslora": LoraConfig(r=2, lora_alpha=32, target_modules=["c_attn"], use_rslora=True),
    "lora-patterns": LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                rank_pattern={"h.1.mlp.c_fc": 2, "attn.c_proj": 3}, alpha_pattern={"c_fc": 5}),
    "lora-bias-all": LoraConfig(r=3, lora_alpha=6, target_modules=["c_proj"], bias="all", lora_bias=True),
    "lora-bias-lora_only": LoraConfig(r=4, lora_alpha=4, target_modules=["mlp.c_fc"], bias="lora_only"),
    "ia3": IA3Config(target_modules=["c_attn", "mlp.c_proj", "c_fc"], feedforward_modules=["mlp.c_proj"]),
    "ia3-gpt2-defaults": IA3Config(task_type="CAUSAL_LM"),  # peft's GPT-2 targets: c_attn, mlp.c_proj (feedforward)
    "ia3-regex": IA3Config(target_modules=r".*\.(c_fc|attn\.c_proj)", feedforward_modules=r".*\.attn\.c_proj"),
}


@pytest.mark.parametrize("name", sorted(MERGED))
def test_merged_adapter_matches_peft_model(base, tmp_path, name):
    save_adapter(base, copy.deepcopy(MERGED[name]), tmp_path / "adapter", seed=len(name))
    ref_logits, ref_ids = peft_reference(base, tmp_path / "adapter")
    plain = load_base(base)
    with torch.no_grad():
        assert np.abs(plain(torch.tensor([IDS])).logits[0].numpy() - ref_logits).max() > 0.05  # the adapter matters
    engine = Engine.load(export_model(str(base), tmp_path / "out", adapter=tmp_path / "adapter"), provider="cpu")
    assert engine.config.adapter == str((tmp_path / "adapter").resolve())
    np.testing.assert_allclose(all_logits(engine), ref_logits, atol=ATOL, rtol=0)
    assert engine.generate(IDS, max_new_tokens=20).token_ids == ref_ids
    assert len(set(ref_ids)) > 3


def test_lora_on_padded_heads_matches_peft_model(tmp_path):
    make_checkpoint(tmp_path / "hf", seed=2, **{**BASE, "n_embd": 10, "n_head": 2})  # head size 5, padded to 8
    save_adapter(tmp_path / "hf", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"]), tmp_path / "a")
    ref_logits, ref_ids = peft_reference(tmp_path / "hf", tmp_path / "a")
    engine = Engine.load(export_model(str(tmp_path / "hf"), tmp_path / "out", adapter=tmp_path / "a"), provider="cpu")
    assert engine.config.kv_head_size == 8
    np.testing.assert_allclose(all_logits(engine), ref_logits, atol=ATOL, rtol=0)
    assert engine.generate(IDS, max_new_tokens=20).token_ids == ref_ids


REFUSED = {
    "dora": (LoraConfig(r=2, target_modules=["c_fc"], use_dora=True), r"DoRA \(use_dora\) is not supported"),
    "lora-on-wte": (LoraConfig(r=2, target_modules=["wte"]), r"LoRA on embeddings \(transformer\.wte\)"),
    "lora-on-lm_head": (LoraConfig(r=2, target_modules=["lm_head"]), r"LoRA on lm_head \(lm_head\)"),
    "modules_to_save": (LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]), "modules_to_save"),
    "prefix-tuning": (PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
                      r"prefix-tuning adapter \(PREFIX_TUNING\) is not merged into the weights; export the base "
                      r"model without --adapter and load it at run time"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_adapters_that_cannot_be_merged_exactly_are_refused_by_name(base, tmp_path, name):
    config, match = REFUSED[name]
    save_adapter(base, copy.deepcopy(config), tmp_path / "adapter")
    with pytest.raises(ValueError, match=match):
        export_model(str(base), tmp_path / "out", adapter=tmp_path / "adapter")
    assert not (tmp_path / "out").exists()


def test_other_peft_types_and_mismatched_bases_are_refused(base, tmp_path):
    save_adapter(base, LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not supported; --adapter merges LORA and IA3 adapters "
                                         r"\(PREFIX_TUNING, PROMPT_TUNING and P_TUNING load at run time\), for others "
                                         r"merge it in peft instead \(model.merge_and_unload\(\)"):
        export_model(str(base), tmp_path / "out", adapter=tmp_path / "lora")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match=r"init_lora_weights 'pissa' changes the base model's weights"):
        export_model(str(base), tmp_path / "out", adapter=tmp_path / "lora")
    make_checkpoint(tmp_path / "other", **{**BASE, "n_embd": 48})
    save_adapter(tmp_path / "other", LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "wide")
    with pytest.raises(ValueError, match=r"lora_A \(2, 48\).*do not fit its weight \(32, 96\).*another base model"):
        export_model(str(base), tmp_path / "out", adapter=tmp_path / "wide")
    with pytest.raises(ValueError, match="is not a PEFT adapter folder"):
        merge_adapter({}, tmp_path)


def test_cli_export_with_adapter_and_cache_key(base, tmp_path):
    save_adapter(base, LoraConfig(r=4, target_modules=["c_attn", "c_fc"]), tmp_path / "adapter")
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "export", str(base), "--adapter", str(tmp_path / "adapter"),
                        "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref_logits, _ = peft_reference(base, tmp_path / "adapter")
    np.testing.assert_allclose(all_logits(Engine.load(tmp_path / "out", provider="cpu")), ref_logits, atol=ATOL, rtol=0)

    os.environ["GPT2_ONNX_CACHE"] = str(tmp_path / "cache")
    try:
        plain = resolve_model(str(base))
        merged = resolve_model(str(base), adapter=str(tmp_path / "adapter"))
        assert merged != plain and resolve_model(str(base), adapter=str(tmp_path / "adapter")) == merged
        assert json.loads((merged / "manifest.json").read_text())["adapter"] == str((tmp_path / "adapter").resolve())
        weights = tmp_path / "adapter" / "adapter_model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a retrained adapter
        assert resolve_model(str(base), adapter=str(tmp_path / "adapter")) not in (merged, plain)
        with pytest.raises(ValueError, match="already exported; an adapter is merged at export"):
            resolve_model(str(merged), adapter=str(tmp_path / "adapter"))
    finally:
        del os.environ["GPT2_ONNX_CACHE"]


# ---- prefix-tuning: a prefix KV at run time ----------------------------------------------------------

PREFIX = {
    "embedding": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "projection-mlp": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                         encoder_hidden_size=24),
}


@pytest.fixture(scope="module", params=[("embedding", "head8"), ("projection-mlp", "head8"), ("embedding", "head5")],
                ids=lambda p: "-".join(p))
def prefix_adapter(request, tmp_path_factory):
    kind, shape = request.param
    root = tmp_path_factory.mktemp(f"prefix-{kind}-{shape}")
    make_checkpoint(root / "hf", seed=7, **(BASE if shape == "head8" else {**BASE, "n_embd": 10, "n_head": 2}))
    trained = save_adapter(root / "hf", copy.deepcopy(PREFIX[kind]), root / "adapter", seed=3, scale=1.0)
    engine = Engine.load(export_model(str(root / "hf"), root / "onnx"), provider="cpu")
    loaded = PeftModel.from_pretrained(load_base(root / "hf"), root / "adapter").eval()
    return trained.eval(), loaded, engine, root / "adapter"


def test_prefix_kv_equals_what_peft_feeds_as_past_key_values(prefix_adapter):
    trained, loaded, engine, adapter = prefix_adapter
    kv = read_prefix_adapter(adapter, engine.config)
    cfg, n_virtual = engine.config, loaded.active_peft_config.num_virtual_tokens
    assert len(kv) == 2 * cfg.n_layer
    assert {a.shape for a in kv} == {(1, cfg.n_head, n_virtual, cfg.kv_head_size)}
    with torch.no_grad():
        for model in (loaded, trained):  # the training model runs the projection MLP, if any
            past = model.get_prompt(batch_size=1)
            for i in range(cfg.n_layer):
                k, v = kv_layer(past, i)  # (1, nh, T, hs)
                np.testing.assert_allclose(kv[2 * i][..., : cfg.head_size], k.numpy(), atol=1e-5, rtol=0)
                np.testing.assert_allclose(kv[2 * i + 1][..., : cfg.head_size], v.numpy(), atol=1e-5, rtol=0)
    assert all(not a[..., cfg.head_size:].any() for a in kv)  # padded dims are zero


def test_prefix_kv_in_the_onnx_model_matches_peft_logits_and_greedy_ids(prefix_adapter):
    _, loaded, engine, adapter = prefix_adapter
    kv = read_prefix_adapter(adapter, engine.config)
    T, new = kv[0].shape[2], 12
    cache = engine.model.new_cache(1, T + len(IDS) + new)
    for dst, src in zip(cache.host_arrays(), kv):
        dst[:, :, :T] = src  # (1, nh, T, hs): the virtual tokens take positions 0..T-1
    cache.lengths[:] = T
    got = engine.model.forward(np.array([IDS]), np.array([len(IDS)]), cache, np.arange(len(IDS))[None])[0]
    with torch.no_grad():
        ref = loaded(input_ids=torch.tensor([IDS])).logits[0].numpy()
        # greedy by full recomputes through PeftModel.forward: with transformers 5 (model kwarg `cache`),
        # peft 0.21's generate injects the prefix as `past_key_values`, which the model ignores
        ref_ids = []
        for _ in range(new):
            step = loaded(input_ids=torch.tensor([IDS + ref_ids])).logits[0, -1]
            ref_ids.append(int(step.argmax()))
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    ids = [int(got[-1].argmax())]
    for _ in range(new - 1):
        step = engine.model.forward(np.array([[ids[-1]]]), np.array([1]), cache, np.zeros((1, 1), np.int64))
        ids.append(int(step[0, 0].argmax()))
    assert ids == ref_ids
    with loaded.disable_adapter(), torch.no_grad():  # and the prefix changes the answer
        assert np.abs(loaded(input_ids=torch.tensor([IDS])).logits[0].numpy() - ref).max() > 0.05


def test_prefix_adapter_for_another_model_is_refused(prefix_adapter, tmp_path):
    from dataclasses import replace

    _, _, engine, adapter = prefix_adapter
    with pytest.raises(ValueError, match=r"'num_layers': 2.*do not fit this model.*another base model"):
        read_prefix_adapter(adapter, replace(engine.config, n_layer=3))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (lora / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"a LORA adapter changes the weights, it is not loaded at run time; merge it "
                                         "at export: gpt2-onnx export BASE --adapter DIR"):
        read_prefix_adapter(lora, engine.config)


def _peft_greedy(loaded, ids, new):
    """Greedy ids by full recomputes through PeftModel.forward (see above: peft's generate drops the prefix)."""
    out = []
    with torch.no_grad():
        for _ in range(new):
            out.append(int(loaded(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_engine_load_prefix_generates_as_peft(prefix_adapter):
    _, loaded, engine, adapter = prefix_adapter
    pre = engine.load_prefix(adapter)
    T = loaded.active_peft_config.num_virtual_tokens
    assert pre.virtual == T and pre.cache.lengths.tolist() == [T]
    r = engine.generate(IDS, prefix=pre, max_new_tokens=10, logprobs=0)
    assert r.token_ids == _peft_greedy(loaded, IDS, 10) and r.prompt_tokens == T + len(IDS)
    with torch.no_grad():
        lp = torch.log_softmax(loaded(input_ids=torch.tensor([IDS + r.token_ids])).logits[0], -1).numpy()
    np.testing.assert_allclose(r.logprobs, [lp[len(IDS) - 1 + i, t] for i, t in enumerate(r.token_ids)], atol=ATOL)
    batch = engine.generate_batch([IDS, IDS[:3], IDS], prefix=pre, max_new_tokens=6)  # rows share the prefix's KV
    assert [b.token_ids for b in batch] == [_peft_greedy(loaded, p, 6) for p in (IDS, IDS[:3], IDS)]
    empty = engine.generate("", prefix=pre, max_new_tokens=5)  # documented: starts from <|endoftext|>
    assert empty.token_ids == engine.generate([engine.config.bos_token_id], prefix=pre, max_new_tokens=5).token_ids
    with pytest.raises(ValueError, match=rf"^{T} prefix tokens \+ prompt of 60 tokens \+ max_new_tokens 5 = {T + 65} exceeds"):
        engine.generate([1] * 60, prefix=pre, max_new_tokens=5)


def test_served_prefix_adapters_are_selected_by_model_name(prefix_adapter):
    import json

    import httpx
    from helpers import Server, post

    from gpt2_onnx.server import create_app

    _, loaded, engine, adapter = prefix_adapter
    pre = engine.load_prefix(adapter)
    s = Server(create_app(engine, model_id="base", prefixes={"tuned": pre}))
    try:
        names = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert names == ["base", "tuned"]
        body = {"prompt": IDS, "max_tokens": 8, "temperature": 0}
        tuned = post(s.url, {**body, "model": "tuned"}).json()
        plain = post(s.url, {**body, "model": "base"}).json()
        assert tuned["choices"][0]["text"] == engine.generate(IDS, prefix=pre, max_new_tokens=8).text
        assert plain["choices"][0]["text"] == engine.generate(IDS, max_new_tokens=8).text
        assert tuned["usage"]["prompt_tokens"] == len(IDS)  # real tokens only: the virtual ones are the adapter's
        assert tuned["model"] == "tuned" and plain["model"] == "base"
        stream = httpx.post(s.url + "/v1/completions", json={**body, "model": "tuned", "stream": True,
                                                              "stream_options": {"include_usage": True}}).text
        events = [json.loads(e[6:]) for e in stream.split("\n\n") if e.startswith("data: {")]
        assert {e["model"] for e in events} == {"tuned"} and events[-1]["usage"]["prompt_tokens"] == len(IDS)
        assert post(s.url, {**body, "model": "other"}).status_code == 404
    finally:
        s.stop()
