"""Prompt tuning and P-tuning at run time against peft's own PeftModel: the virtual tokens' embeddings run
through embeds.onnx once into a prefix KV, then serve as a Prefix (Engine.load_prefix, --prefix-adapter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from helpers import Server, make_checkpoint, post
from peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model)
from test_adapters import ATOL, BASE, IDS, _peft_greedy, load_base, save_adapter

from gpt2_onnx import Engine
from gpt2_onnx import config as C
from gpt2_onnx.export import export_model
from gpt2_onnx.export.adapters import read_prefix_adapter, read_virtual_tokens
from gpt2_onnx.export.exporter import verify_export
from gpt2_onnx.model import DecodeStep, Model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's advice
LENGTHS = (1, 5, len(IDS))  # prompt lengths after the virtual tokens


def prompt_text(base):
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text="the quick brown fox", tokenizer_name_or_path=str(base))


KINDS = {
    "prompt-random": lambda base: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt-text": prompt_text,
    "p-tuning-mlp": lambda base: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                     encoder_hidden_size=24),
    "p-tuning-lstm": lambda base: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=7,
                                                      encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
}


def save_prompt_adapter(base, kind, out, seed=3):
    """A trained-looking adapter: text init moved by training (noise added), every other one random."""
    config = KINDS[kind](base)
    if kind != "prompt-text":
        return save_adapter(base, config, out, seed=seed, scale=1.0)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module", params=["head8", "head5"])
def base(request, tmp_path_factory):
    """(checkpoint folder, its fp32 export's Engine); head5: heads zero-padded to 8 in the graph."""
    root = tmp_path_factory.mktemp(request.param)
    make_checkpoint(root / "hf", seed=7, **(BASE if request.param == "head8" else {**BASE, "n_embd": 10, "n_head": 2}))
    return root / "hf", Engine.load(export_model(str(root / "hf"), root / "onnx"), provider="cpu")


@pytest.fixture(scope="module", params=sorted(KINDS))
def adapter(request, base, tmp_path_factory):
    """(trained PeftModel, PeftModel loaded from disk, Engine, adapter folder)."""
    hf, engine = base
    out = tmp_path_factory.mktemp(request.param) / "adapter"
    trained = save_prompt_adapter(hf, request.param, out)
    return trained.eval(), PeftModel.from_pretrained(load_base(hf), out).eval(), engine, out


def prompt_logits(engine, pre, ids):
    """The logits of every prompt position after the Prefix `pre`, by the model's forward pass."""
    cache = engine.model.new_cache(1, pre.virtual + len(ids))
    engine.model.copy_kv(pre.cache, 0, cache, 0, pre.virtual)
    return engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]


def test_virtual_embeddings_are_what_peft_feeds(adapter):
    trained, loaded, engine, folder = adapter
    kind, (emb,) = read_virtual_tokens(folder, engine.config)
    T = loaded.active_peft_config.num_virtual_tokens
    assert kind == "embeds" and emb.shape == (1, T, engine.config.n_embd)
    with torch.no_grad():  # the training model runs the P-tuning encoder (MLP or LSTM) on its embedding again
        np.testing.assert_array_equal(emb, loaded.get_prompt(batch_size=1).numpy())
        np.testing.assert_allclose(emb, trained.get_prompt(batch_size=1).numpy(), atol=2e-5, rtol=0)


def test_logits_and_greedy_ids_match_peft_forward(adapter):
    _, loaded, engine, folder = adapter
    pre = engine.load_prefix(folder)
    T = loaded.active_peft_config.num_virtual_tokens
    assert pre.virtual == T and pre.cache.lengths.tolist() == [T]
    for n in LENGTHS:
        ids = IDS[:n]
        with torch.no_grad():
            ref = loaded(input_ids=torch.tensor([ids])).logits[0, T:].numpy()  # peft's logits include the virtual
            with loaded.disable_adapter():  # and the adapter changes the answer
                assert np.abs(loaded(input_ids=torch.tensor([ids])).logits[0].numpy() - ref).max() > 0.05
        np.testing.assert_allclose(prompt_logits(engine, pre, ids), ref, atol=ATOL, rtol=0)
        r = engine.generate(ids, prefix=pre, max_new_tokens=10)
        assert r.token_ids == _peft_greedy(loaded, ids, 10) and r.prompt_tokens == T + n
    batch = engine.generate_batch([IDS[:n] for n in LENGTHS], prefix=pre, max_new_tokens=6)  # rows share the KV
    assert [b.token_ids for b in batch] == [_peft_greedy(loaded, IDS[:n], 6) for n in LENGTHS]


def test_the_embeddings_graph_opens_for_prompt_adapters_only(base, tmp_path, monkeypatch):
    hf, engine = base
    save_adapter(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path / "prefix")
    save_prompt_adapter(hf, "prompt-random", tmp_path / "prompt")
    opened, real = [], Model._open_embeds
    monkeypatch.setattr(Model, "_open_embeds", lambda self: opened.append(self) or real(self))
    e = Engine.load(engine.folder, provider="cpu")
    e.generate(IDS, prefix=e.load_prefix(tmp_path / "prefix"), max_new_tokens=2)
    assert opened == []  # plain use and prefix-tuning never open embeds.onnx
    e.load_prefix(tmp_path / "prompt")
    assert opened == [e.model]


def test_served_adapters_batch_with_the_base_model(base, tmp_path, monkeypatch):
    """Two prompt-learning adapters and the base model, each chosen by its model name, decode in one batch."""
    from gpt2_onnx.server import create_app

    hf, engine = base
    folders = {name: tmp_path / name for name in ("p-tuning-lstm", "prompt-text")}
    loaded = {}
    for name, folder in folders.items():
        save_prompt_adapter(hf, name, folder)
        loaded[name] = PeftModel.from_pretrained(load_base(hf), folder).eval()
    prefixes = {name: engine.load_prefix(folder) for name, folder in folders.items()}
    app = create_app(engine, model_id="base", prefixes=prefixes)
    s = Server(app)
    llm, widths = app.state.llm, []
    real_step, real_call, go = llm.core.step, DecodeStep.__call__, threading.Event()

    def step():  # the core waits until the three requests are queued: they start together
        go.wait(30)
        return real_step()

    def call(self, tokens, *a, **k):
        widths.append(len(tokens))
        return real_call(self, tokens, *a, **k)

    llm.core.step = step
    monkeypatch.setattr(DecodeStep, "__call__", call)
    try:
        body = {"prompt": IDS, "max_tokens": 8, "temperature": 0}
        with ThreadPoolExecutor(3) as pool:
            futures = {m: pool.submit(post, s.url, {**body, "model": m}) for m in ["base", *folders]}
            deadline = time.time() + 30
            while llm.stats()["queue_depth"] < 3 and time.time() < deadline:
                time.sleep(0.01)
            go.set()
            answers = {m: f.result().json() for m, f in futures.items()}
        assert max(widths) == 3  # the base model's row and both adapters' rows in one decode step
        for name in folders:
            alone = engine.generate(IDS, prefix=prefixes[name], max_new_tokens=8)
            assert alone.token_ids == _peft_greedy(loaded[name], IDS, 8)
            assert answers[name]["choices"][0]["text"] == alone.text
            assert answers[name]["model"] == name and answers[name]["usage"]["prompt_tokens"] == len(IDS)
        assert answers["base"]["choices"][0]["text"] == engine.generate(IDS, max_new_tokens=8).text
        assert len({a["choices"][0]["text"] for a in answers.values()}) == 3
    finally:
        go.set()
        s.stop()


def test_cli_generate_with_a_p_tuning_adapter(base, tmp_path):
    hf, engine = base
    save_prompt_adapter(hf, "p-tuning-mlp", tmp_path / "a")
    cmd = [sys.executable, "-m", "gpt2_onnx.cli", "generate", "the quick", "-m", str(engine.folder), "-n", "8",
           "--no-echo", "--provider", "cpu", "--prefix-adapter"]
    r = subprocess.run(cmd + [str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == engine.generate("the quick", prefix=engine.load_prefix(tmp_path / "a"),
                                                    max_new_tokens=8).text
    save_adapter(hf, LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "lora")
    r = subprocess.run(cmd + [str(tmp_path / "lora")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "gpt2-onnx export BASE --adapter DIR" in " ".join(r.stderr.split())


# ---- refusals: each names the true remedy ------------------------------------------------------------------

RUN_TIME_REMEDY = r"load it at run time on the base model's export: Engine\.load_prefix\(DIR\), `gpt2-onnx generate " \
                  r"--prefix-adapter DIR` or `gpt2-onnx serve --prefix-adapter NAME=DIR`"


@pytest.mark.parametrize("kind", ["prompt-random", "p-tuning-lstm", "prefix"])
def test_export_refuses_run_time_adapters_naming_load_prefix(base, tmp_path, kind):
    hf, _ = base
    if kind == "prefix":
        save_adapter(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), tmp_path / "a")
    else:
        save_prompt_adapter(hf, kind, tmp_path / "a")
    with pytest.raises(ValueError, match=r"adapter \((PROMPT_TUNING|P_TUNING|PREFIX_TUNING)\) is not merged into the "
                                         rf"weights; export the base model without --adapter and {RUN_TIME_REMEDY}"):
        export_model(str(hf), tmp_path / "out", adapter=tmp_path / "a")
    assert not (tmp_path / "out").exists()


def _retyped(folder, out, peft_type):
    shutil.copytree(folder, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))
    return out


def test_load_prefix_refuses_other_types_naming_their_remedy(base, tmp_path):
    hf, engine = base
    save_adapter(hf, LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "lora")
    with pytest.raises(ValueError, match=r"a LORA adapter changes the weights, it is not loaded at run time; merge it "
                                         r"at export: gpt2-onnx export BASE --adapter DIR"):
        engine.load_prefix(tmp_path / "lora")
    _retyped(tmp_path / "lora", tmp_path / "loha", "LOHA")  # peft merges LoHa (merge_and_unload); gpt2-onnx does not
    with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not loaded at run time \(gpt2-onnx merges LORA and IA3 "
                                         r"at export.*merge it in peft instead \(model\.merge_and_unload\(\)"):
        engine.load_prefix(tmp_path / "loha")
    with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not supported; --adapter merges LORA and IA3 adapters "
                                         r"\(PREFIX_TUNING, PROMPT_TUNING and P_TUNING load at run time\), for others "
                                         r"merge it in peft instead"):
        export_model(str(hf), tmp_path / "out", adapter=tmp_path / "loha")
    save_prompt_adapter(hf, "prompt-random", tmp_path / "prompt")
    for kind in ("MULTITASK_PROMPT_TUNING", "CPT"):  # peft has no merge_and_unload for these: no merge advice
        retyped = _retyped(tmp_path / "prompt", tmp_path / kind, kind)
        for load in (engine.load_prefix, lambda a: export_model(str(hf), tmp_path / "out", adapter=a)):
            with pytest.raises(ValueError, match=rf"peft_type {kind} is not supported: peft cannot merge it \(no "
                                                 r"merge_and_unload\) and gpt2-onnx does not run it; run it with peft"):
                load(retyped)
    with pytest.raises(ValueError, match=r"not a prefix-tuning adapter: its virtual tokens are input embeddings"):
        read_prefix_adapter(tmp_path / "prompt", engine.config)


def test_prompt_adapter_for_another_model_is_refused(base, tmp_path):
    hf, engine = base
    make_checkpoint(tmp_path / "wide", **{**BASE, "n_embd": 48})
    save_prompt_adapter(tmp_path / "wide", "p-tuning-mlp", tmp_path / "a")
    with pytest.raises(ValueError, match=r"'token_dim': 48\} do not fit this model.*another base model"):
        engine.load_prefix(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "token_dim": engine.config.n_embd,
                                                                         "num_attention_heads": engine.config.n_head}))
    with pytest.raises(ValueError, match=rf"expected prompt_embeddings of shape \(5, {engine.config.n_embd}\), "
                                         r"got \(5, 48\)"):
        engine.load_prefix(tmp_path / "a")


def test_an_export_missing_its_embeds_graph_says_so(base, tmp_path):
    hf, engine = base
    old = tmp_path / "old"
    shutil.copytree(engine.folder, old)
    (old / C.EMBEDS_MODEL_NAME).unlink()  # plain use never opens it
    save_prompt_adapter(hf, "prompt-random", tmp_path / "a")
    e = Engine.load(old, provider="cpu")
    assert e.generate(IDS, max_new_tokens=4).token_ids == engine.generate(IDS, max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match=rf"{old / C.EMBEDS_MODEL_NAME} not found: the exported folder is incomplete; "
                                         "re-export"):
        e.load_prefix(tmp_path / "a")
    assert verify_export(old) == f"{old / C.EMBEDS_MODEL_NAME} is missing, which the manifest records " \
                                 f"({engine.config.embeds_bytes} bytes)"


def test_run_embeds_refuses_rows_or_positions_its_cache_lacks(base):
    _, engine = base
    E = engine.config.n_embd
    for shape, rows, length in (((2, 3, E), 1, 4), ((1, 0, E), 1, 4), ((1, 5, E), 1, 4), ((1, 3, E + 1), 1, 4)):
        with pytest.raises(ValueError, match="input embeddings"):
            engine.model.run_embeds(engine.model.new_cache(rows, length), np.zeros(shape, np.float32))


# ---- the embeddings graph: its weights are model.onnx's, in every export kind --------------------------------

def assert_token_path_kv(engine, hf, atol):
    """embeds.onnx fed the token embeddings wte[ids] writes the KV that model.onnx writes for the ids."""
    wte = load_base(hf).transformer.wte.weight.detach().numpy()
    by_ids, by_embeds = engine.model.new_cache(1, len(IDS)), engine.model.new_cache(1, len(IDS))
    engine.model.run(by_ids, np.array([IDS]), np.array([len(IDS)]), np.array([[len(IDS) - 1]]))
    engine.model.run_embeds(by_embeds, wte[IDS][None])  # (1, S, n_embd)
    assert by_embeds.lengths.tolist() == by_ids.lengths.tolist() == [len(IDS)]
    for a, b in zip(by_ids.host_arrays(), by_embeds.host_arrays()):
        np.testing.assert_allclose(b, a, atol=atol, rtol=0)


def test_embeds_graph_fed_token_embeddings_writes_the_token_path_kv(base):
    hf, engine = base
    assert_token_path_kv(engine, hf, atol=1e-6)


def test_embeds_graph_shares_the_weights_file_and_verify_checks_it(base, tmp_path):
    _, engine = base
    folder = engine.folder
    model = {t.name: t for t in onnx.load(str(folder / C.MODEL_NAME), load_external_data=False).graph.initializer}
    embeds = onnx.load(str(folder / C.EMBEDS_MODEL_NAME), load_external_data=False)
    assert {i.name for i in embeds.graph.input} == {C.INPUTS_EMBEDS, C.POSITION_IDS, C.SEQLENS_K,
                                                    C.TOTAL_SEQUENCE_LENGTH, *engine.config.past_names()}
    assert [o.name for o in embeds.graph.output] == engine.config.present_names()
    big = [t for t in embeds.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(t == model[t.name] for t in embeds.graph.initializer)  # the same entries: no second copy
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert "wte.weight" not in {t.name for t in embeds.graph.initializer}  # the ids' embedding is not needed
    assert json.loads((folder / C.MANIFEST_NAME).read_text())["embeds_bytes"] == (folder / C.EMBEDS_MODEL_NAME
                                                                                  ).stat().st_size
    assert verify_export(folder) is None
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    proto = onnx.load(str(bad / C.EMBEDS_MODEL_NAME), load_external_data=False)
    offset = next(e for e in big[0].external_data if e.key == "offset")
    tensor = next(t for t in proto.graph.initializer if t.name == big[0].name)
    next(e for e in tensor.external_data if e.key == "offset").value = str(int(offset.value) + 4096)
    onnx.save_model(proto, str(bad / C.EMBEDS_MODEL_NAME))
    assert f"weights {big[0].name} differ from model.onnx's" in verify_export(bad)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """(fp32 Engine, {variant: Engine}, adapter folder) on the head8 shape: fp16, int8 and int4 exports."""
    from gpt2_onnx.export import quantize as Q

    root = tmp_path_factory.mktemp("variants")
    make_checkpoint(root / "hf", seed=7, **BASE)
    save_prompt_adapter(root / "hf", "p-tuning-lstm", root / "a")
    kw = {"fp16": {"dtype": "float16"}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(Q.BLOCK_SIZE, 4, 32)  # K is 32 here: a block of 128 would span a whole column (test_quantize.py)
        engines = {k: Engine.load(export_model(str(root / "hf"), root / k, **v), provider="cpu") for k, v in kw.items()}
    fp32 = Engine.load(export_model(str(root / "hf"), root / "fp32"), provider="cpu")
    return fp32, engines, root / "a"


@pytest.mark.parametrize("variant, corr, top1", [("fp16", 0.9999, 0.95), ("int8", 0.995, 0.85), ("int4", 0.9, 0.45)])
def test_fp16_and_quantized_exports_run_prompt_adapters_close_to_fp32(variants, variant, corr, top1):
    """As tests/test_quantize.py judges the base model's quantized exports: correlation and top-1 agreement with
    fp32, here for the logits after the adapter's virtual tokens."""
    fp32, engines, folder = variants
    engine = engines[variant]
    ids = list(np.random.default_rng(1).integers(0, BASE["vocab_size"], 40))
    got = prompt_logits(engine, engine.load_prefix(folder), ids)
    ref = prompt_logits(fp32, fp32.load_prefix(folder), ids)
    assert np.isfinite(got).all()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > corr
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > top1
    if variant == "fp16":
        assert np.abs(got - ref).max() < 0.2  # as tests/test_head_padding.py bounds fp16 logits
        assert_token_path_kv(engine, folder.parent / "hf", atol=0)  # the same fp16 kernels on the same inputs
    assert verify_export(engine.folder) is None
    if variant != "fp16":  # the quantized graph reads the embeddings from GatherBlockQuantized: embeds.onnx does not
        ops = {n.op_type for n in onnx.load(str(engine.folder / C.EMBEDS_MODEL_NAME), load_external_data=False
                                            ).graph.node}
        assert "MatMulNBits" in ops and "GatherBlockQuantized" not in ops


def test_a_lora_slots_export_runs_prompt_adapters_with_the_adapters_off(base, tmp_path):
    """embeds.onnx of an export with LoRA slots takes the slot inputs too: the virtual tokens run on slot 0,
    so the prefix equals the plain export's, and a LoRA adapter may decode after it."""
    from peft import LoraConfig

    hf, engine = base
    folder = tmp_path / "adapter"
    save_prompt_adapter(hf, "p-tuning-lstm", folder)
    slots = Engine.load(export_model(str(hf), tmp_path / "slots", lora_slots=2, max_lora_rank=4), provider="cpu")
    save_adapter(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]), tmp_path / "lora", seed=1)
    lora = slots.load_lora(tmp_path / "lora")
    pre, plain = slots.load_prefix(folder), engine.load_prefix(folder)
    np.testing.assert_allclose(pre.cache.host_arrays()[0], plain.cache.host_arrays()[0], atol=1e-6, rtol=0)
    assert slots.generate(IDS, prefix=pre, max_new_tokens=8).token_ids == \
        engine.generate(IDS, prefix=plain, max_new_tokens=8).token_ids
    assert slots.generate(IDS, prefix=pre, adapter=lora, max_new_tokens=8).token_ids != \
        engine.generate(IDS, prefix=plain, max_new_tokens=8).token_ids


def test_an_adapters_library_folder_at_run_time_names_the_export(base, tmp_path):
    _, engine = base
    folder = tmp_path / "bn"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"config": {"architecture": "bottleneck"}, "name": "bn"}))
    with pytest.raises(ValueError, match=r"an adapter of the adapters library .* graph nodes at export "
                                         r"\(gpt2-onnx export BASE --adapter DIR\)"):
        engine.load_prefix(folder)
