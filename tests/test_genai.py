"""The onnxruntime-genai export target, run by onnxruntime-genai's own Python package (og.Model, og.Generator):
greedy ids equal to torch's and to our engine's; int4 and fp16 equal to our engine on the same export options."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import SHAPES, make_checkpoint

from gpt2_onnx import Engine
from gpt2_onnx import config as C
from gpt2_onnx.export import export_model
from gpt2_onnx.export.genai import ATTENTION_MASK, GENAI_CONFIG, export_genai

og = pytest.importorskip("onnxruntime_genai")

NEW = 24
OUR_INPUTS = [C.INPUT_IDS, C.POSITION_IDS, C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH, C.LOGITS_INDEX, C.LOGITS_ROWS]


def og_model(folder, provider: str | None = None):
    """og.Model of an export; provider None: as genai_config.json says, "cpu": providers cleared, else that one."""
    config = og.Config(str(folder))
    if provider:
        config.clear_providers()
        if provider != "cpu":
            config.append_provider(provider)
    return og.Model(config)


def og_greedy(model, prompts: list[list[int]], new: int = NEW, pad: int = 0) -> list[list[int]]:
    """Greedy new ids per prompt; a batch is right-padded with pad_token_id (eos: 0 in the test checkpoints),
    as og.Tokenizer.encode_batch pads."""
    S = max(map(len, prompts))
    ids = np.full((len(prompts), S), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=S + new, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [gen.get_sequence(i)[S:].tolist() for i in range(len(prompts))]


def until_eos(ids: list[int], eos: int) -> list[int]:
    """ids before the first eos (og ends a row there without keeping the eos; torch and our engine keep it)."""
    return ids[: ids.index(eos)] if eos in ids else ids


def prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + n).integers(1, vocab, n).tolist()  # no 0: eos, and pad in a batch


@pytest.fixture(scope="module")
def genai(exported, tmp_path_factory):
    """(torch model, our Engine, og.Model) of each test shape, both exports from the same checkpoint."""
    model, engine = exported
    out = export_genai(engine.config.source, tmp_path_factory.mktemp("genai") / "m")
    return model, engine, og_model(out)


@pytest.mark.parametrize("n_prompt", [1, 7, 50])
def test_greedy_ids_equal_torch_and_ours(genai, n_prompt):
    model, engine, ogm = genai
    eos, ids = engine.config.eos_token_id, prompt(engine.config.vocab_size, n_prompt)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=eos)[0, n_prompt:].tolist()
    ours = engine.generate(ids, max_new_tokens=NEW).token_ids
    (got,) = og_greedy(ogm, [ids])
    assert until_eos(got, eos) == until_eos(ref, eos) == until_eos(ours, eos)
    assert len(until_eos(ref, eos)) >= 12 and len(set(ref)) > 3, "test model too degenerate to be a meaningful check"


def test_right_padded_batch_rows_equal_single_runs(genai):
    _, engine, ogm = genai
    eos, V = engine.config.eos_token_id, engine.config.vocab_size
    prompts = [prompt(V, 1), prompt(V, 7), prompt(V, 50), prompt(V, 13, seed=3)]
    rows = og_greedy(ogm, prompts)
    for p, row in zip(prompts, rows):
        assert until_eos(row, eos) == until_eos(engine.generate(p, max_new_tokens=NEW).token_ids, eos)
    assert sum(len(until_eos(row, eos)) for row in rows) >= 2 * NEW, "too few tokens before eos to mean much"


def test_prompt_appended_in_two_parts(genai):
    """Continuous decoding (a chat's next turn): a second append_tokens runs a chunk after the cached tokens."""
    _, engine, ogm = genai
    eos, ids = engine.config.eos_token_id, prompt(engine.config.vocab_size, 30)
    params = og.GeneratorParams(ogm)
    params.set_search_options(max_length=30 + NEW, do_sample=False)
    gen = og.Generator(ogm, params)
    gen.append_tokens(np.array(ids[:12], np.int32))
    gen.append_tokens(np.array(ids[12:], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert until_eos(gen.get_sequence(0)[30:].tolist(), eos) == until_eos(og_greedy(ogm, [ids])[0], eos)


def test_beam_search_equals_torch(tiny, tmp_path):
    """og's beam search reorders our KV buffers between steps: 4 beams give transformers' best beam."""
    model, _, ck, _ = tiny
    ogm = og_model(export_genai(str(ck), tmp_path / "genai"))
    ids = prompt(1000, 7)
    params = og.GeneratorParams(ogm)
    params.set_search_options(max_length=7 + 16, num_beams=4, do_sample=False, early_stopping=False,
                              length_penalty=1.0, num_return_sequences=1)
    gen = og.Generator(ogm, params)
    gen.append_tokens(np.array(ids, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, num_beams=4, do_sample=False,
                             early_stopping=False, pad_token_id=0)[0, 7:].tolist()
    assert until_eos(gen.get_sequence(0)[7:].tolist(), 0) == until_eos(ref, 0)


def test_padded_heads(tmp_path):
    """A head size that is not a multiple of 8 is zero-padded (graph.pad_heads): genai_config says the padded size."""
    model = make_checkpoint(tmp_path / "hf", seed=2, vocab_size=300, n_positions=64, n_embd=40, n_layer=2, n_head=4)
    out = export_genai(str(tmp_path / "hf"), tmp_path / "genai")
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["decoder"]["head_size"] == 16
    ids = prompt(300, 9)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    assert until_eos(og_greedy(og_model(out), [ids])[0], 0) == until_eos(ref, 0)
    assert len(until_eos(ref, 0)) >= 8


@pytest.fixture(scope="module")
def tiny_ck(tiny):
    return tiny[2]


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_ids_equal_our_quantized_export(tiny_ck, tmp_path_factory, quantize):
    """The same MatMulNBits weights (quantization differs from torch): og's ids are our engine's."""
    root = tmp_path_factory.mktemp(quantize)
    ogm = og_model(export_genai(str(tiny_ck), root / "genai", quantize=quantize))
    engine = Engine.load(export_model(str(tiny_ck), root / "ours", quantize=quantize), provider="cpu")
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(root / "genai" / C.MODEL_NAME,
                                                              load_external_data=False).graph.node)
    prompts = [prompt(1000, n) for n in (3, 7, 40)]
    for p, row in zip(prompts, og_greedy(ogm, prompts)):
        assert until_eos(row, 0) == until_eos(engine.generate(p, max_new_tokens=NEW).token_ids, 0)
        assert og_greedy(ogm, [p]) == [row]


def test_fp16_on_cpu_equals_our_fp16(tiny_ck, tmp_path_factory):
    """fp16 is written for CUDA (genai_config's provider); its graph runs on CPU too, as ours does."""
    root = tmp_path_factory.mktemp("fp16")
    out = export_genai(str(tiny_ck), root / "genai", dtype="float16")
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["decoder"]["session_options"][
        "provider_options"] == [{"cuda": {}}]
    engine = Engine.load(export_model(str(tiny_ck), root / "ours", dtype="float16"), provider="cpu")
    ids = prompt(1000, 11)
    (got,) = og_greedy(og_model(out, "cpu"), [ids])
    assert until_eos(got, 0) == until_eos(engine.generate(ids, max_new_tokens=NEW).token_ids, 0)


def test_fp16_cuda(tiny_ck, tmp_path_factory):
    import onnxruntime as ort

    if not og.is_cuda_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-genai or onnxruntime was built without CUDA, or there is no GPU")
    root = tmp_path_factory.mktemp("fp16cuda")
    out = export_genai(str(tiny_ck), root / "genai", dtype="float16")
    engine = Engine.load(export_model(str(tiny_ck), root / "ours", dtype="float16"), provider="cuda")
    prompts = [prompt(1000, n) for n in (5, 30)]
    rows = og_greedy(og_model(out), prompts)
    for p, row in zip(prompts, rows):
        assert until_eos(row, 0) == until_eos(engine.generate(p, max_new_tokens=NEW).token_ids, 0)


def test_adapter_merged_as_export_does(tmp_path):
    from peft import LoraConfig
    from test_adapters import BASE, peft_reference, save_adapter

    make_checkpoint(tmp_path / "hf", seed=5, **BASE)
    save_adapter(tmp_path / "hf", LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
                 tmp_path / "lora")
    ids = [5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200]
    _, ref = peft_reference(tmp_path / "hf", tmp_path / "lora", ids, new=20)
    ogm = og_model(export_genai(str(tmp_path / "hf"), tmp_path / "genai", adapter=tmp_path / "lora"))
    assert until_eos(og_greedy(ogm, [ids], new=20)[0], 0) == until_eos(ref, 0)


def test_graph_io_and_config(tiny_ck, tmp_path):
    out = export_genai(str(tiny_ck), tmp_path / "genai")
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                     "tokenizer.json", "tokenizer_config.json"]
    graph = onnx.load(out / C.MODEL_NAME, load_external_data=False).graph
    cfg = json.loads((out / GENAI_CONFIG).read_text())["model"]
    assert [i.name for i in graph.input][:3] == [C.INPUT_IDS, ATTENTION_MASK, C.POSITION_IDS]
    kv = [(i, t) for i in range(2) for t in ("key", "value")]
    assert [i.name for i in graph.input][3:] == [f"past_key_values.{i}.{t}" for i, t in kv]
    assert [o.name for o in graph.output] == ["logits"] + [f"present.{i}.{t}" for i, t in kv]
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1  # og reads a pruned LM head
    assert {n.op_type for n in graph.node} >= {"GroupQueryAttention", "ReduceSum"}
    assert cfg["type"] == "decoder" and cfg["decoder"]["head_size"] == 16 and cfg["decoder"]["num_hidden_layers"] == 2
    assert cfg["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # our own graph contract is untouched by the genai target
    ours = onnx.load(export_model(str(tiny_ck), tmp_path / "ours") / C.MODEL_NAME, load_external_data=False).graph
    assert [i.name for i in ours.input][:6] == OUR_INPUTS
    assert [o.name for o in ours.output][:2] == [C.LOGITS, C.NEXT_TOKEN]


def test_export_again_replaces_the_folder(tiny_ck, tmp_path):
    export_genai(str(tiny_ck), tmp_path / "genai", quantize="int4")
    out = export_genai(str(tiny_ck), tmp_path / "genai")
    graph = onnx.load(out / C.MODEL_NAME, load_external_data=False).graph
    assert not any(n.op_type == "MatMulNBits" for n in graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genai"]  # no temporary folder left behind


def test_refuses_a_folder_that_is_not_a_genai_export(tiny_ck, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder or an onnxruntime-genai export"):
        export_genai(str(tiny_ck), tmp_path / "x")
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe"])
def test_og_tokenizer_equals_ours(tmp_path, tokenizer):
    """og.Tokenizer reads tokenizer.json + tokenizer_config.json: GPT-2's own BPE (from vocab.json + merges.txt)
    and a trained byte-level BPE encode and decode as our engine's tokenizer does."""
    make_checkpoint(tmp_path / "hf", seed=0, tokenizer=tokenizer, **SHAPES["gpt2vocab"])
    ogm = og_model(export_genai(str(tmp_path / "hf"), tmp_path / "genai"))
    ours = Engine.load(export_model(str(tmp_path / "hf"), tmp_path / "ours"), provider="cpu").tokenizer
    tok = og.Tokenizer(ogm)
    for text in ["Hello world", " the quick brown fox jumps over the lazy dog.", "To be, or not to be:\n\tthat's it",
                 "héllo wörld 123 4567", "a<|endoftext|>b"]:
        ids = ours.encode(text)
        assert tok.encode(text).tolist() == ids
        assert tok.decode(np.array(ids, np.int32)) == ours.decode(ids).replace("<|endoftext|>", "")
