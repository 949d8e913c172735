"""onnxruntime-genai export target: a folder that `og.Model(folder)` (Python, C#, Java, C/C++) loads.

The graph is our own (graph.build: the same layers, weights, quantization and adapters), with
onnxruntime-genai's decoder I/O instead of our contract:

  inputs   input_ids (B, S) int64, attention_mask (B, T) int64, position_ids (B, S) int64,
           past_key_values.{i}.key/.value (B, n_head, max_length, head_size)
  outputs  logits (B, 1, vocab) float32 (the last real token of each row only: a pruned LM head),
           present.{i}.key/.value (the same buffers: past_present_share_buffer)

GroupQueryAttention's seqlens_k and total_sequence_length are derived in the graph from
attention_mask, as onnxruntime-genai's own builder does for llama/phi (ReduceSum - 1, Shape[1]).
onnxruntime-genai right-pads a batch with pad_token_id (GPT-2 has none: eos, as transformers
uses); GroupQueryAttention tells the rows apart by seqlens_k, as in our own runtime.

genai_config.json uses the model type `decoder` (onnxruntime-genai's generic decoder-only model,
separate key/value caches shared between past and present). Its type `gpt2` is the layout of the
old transformers-to-ONNX GPT-2 export: one combined `past_%d` (2, B, n_head, S, head_size) per
layer, re-allocated each step, which GroupQueryAttention cannot read in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from gpt2_onnx import config as C
from gpt2_onnx.export import exporter
from gpt2_onnx.export.graph import _Builder, build

GENAI_CONFIG = "genai_config.json"
ATTENTION_MASK = "attention_mask"
GENAI_TYPE = "decoder"
# search options onnxruntime-genai's builder takes from generation_config.json (when they differ from its defaults)
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams", "length_penalty",
               "no_repeat_ngram_size", "num_return_sequences", "diversity_penalty")


def genai_graph(proto: onnx.ModelProto, cfg: C.ModelConfig) -> onnx.ModelProto:
    """Turn a graph of graph.build into onnxruntime-genai's decoder I/O, in place.

    seqlens_k, total_sequence_length and logits_index become tensors computed from attention_mask
    (so the layers are untouched); the logits_rows gather and next_token go; logits keep fp32.
    """
    g = proto.graph
    b = _Builder()
    one = b.weight("genai/one", np.array([1], np.int64))
    total = b.op("ReduceSum", [ATTENTION_MASK, one], name="attn_mask/ReduceSum", keepdims=0)[0]  # (B,) tokens per row
    last = b.op("Sub", [total, one], name="attn_mask/Sub")[0]  # (B,) seqlens_k as int64
    b.op("Cast", [last], name="attn_mask/Sub/Cast", outputs=[C.SEQLENS_K], to=TensorProto.INT32)
    index_1 = b.weight("genai/index_1", np.array(1, np.int64))
    width = b.op("Gather", [b.op("Shape", [ATTENTION_MASK], name="attn_mask/Shape")[0], index_1],
                 name="attn_mask/Gather", axis=0)[0]  # () T: past + new positions
    b.op("Cast", [width], name="attn_mask/Gather/Cast", outputs=[C.TOTAL_SEQUENCE_LENGTH], to=TensorProto.INT32)
    # each row's last real token among the S new ones: seqlens_k in a right-padded first prompt (no past),
    # S - 1 otherwise (a decode step, or one unpadded row continuing after its past)
    seq = b.op("Gather", [b.op("Shape", [C.INPUT_IDS], name="input_ids/Shape")[0], index_1],
               name="input_ids/Gather", axis=0)[0]  # () S
    row_last = b.op("Min", [last, b.op("Sub", [seq, one], name="input_ids/Sub")[0]], name="last_token")[0]  # (B,)
    b.op("Unsqueeze", [row_last, b.weight("genai/axis_last", np.array([-1], np.int64))], name="last_token/Unsqueeze",
         outputs=[C.LOGITS_INDEX])  # (B, 1): our LM head gathers these positions

    (rows,) = [n for n in g.node if C.LOGITS_ROWS in n.input]  # Gather(logits, logits_rows): every row is wanted
    g.node.remove(rows)
    src, dst = rows.input[0], rows.output[0]
    if dst == C.LOGITS:  # fp32: the LM head's output becomes `logits`
        src, dst = dst, src
    for n in g.node:
        for names in (n.input, n.output):
            for j, name in enumerate(names):
                if name == dst:
                    names[j] = src
    nodes = b.nodes + list(g.node)  # the new nodes read graph inputs only: first
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(b.inits)

    drop = {C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH, C.LOGITS_INDEX, C.LOGITS_ROWS}
    inputs = [i for i in g.input if i.name not in drop]
    mask = helper.make_tensor_value_info(ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence_length"])
    inputs.insert(1, mask)
    outputs = [helper.make_tensor_value_info(C.LOGITS, TensorProto.FLOAT, ["batch", 1, cfg.vocab_size])]
    outputs += [o for o in g.output if o.name in cfg.present_names()]
    del g.input[:], g.output[:]
    g.input.extend(inputs)
    g.output.extend(outputs)
    _prune(g)
    return proto


def _prune(g: onnx.GraphProto) -> None:
    """Drop the nodes and initializers no output needs (the next_token branch)."""
    needed, keep = {o.name for o in g.output}, []
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def genai_config(cfg: C.ModelConfig, folder: Path, *, provider: str) -> dict:
    """genai_config.json, with the fields onnxruntime-genai's builder writes for a decoder-only model."""
    gen = exporter._read_json(folder / "generation_config.json")
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": cfg.n_positions, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    search |= {k: gen[k] for k in SEARCH_KEYS if gen.get(k) is not None}
    providers = [] if provider == "cpu" else [{provider: {}}]
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.n_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": C.MODEL_NAME,
                "head_size": cfg.kv_head_size,  # padded heads (graph.pad_heads) are what the KV buffers hold
                "hidden_size": cfg.n_embd,
                "inputs": {"input_ids": C.INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": C.POSITION_IDS,
                           "past_key_names": C.PAST_KEY.replace("{i}", "%d"),
                           "past_value_names": C.PAST_VALUE.replace("{i}", "%d")},
                "outputs": {"logits": C.LOGITS, "present_key_names": C.PRESENT_KEY.replace("{i}", "%d"),
                            "present_value_names": C.PRESENT_VALUE.replace("{i}", "%d")},
                "num_attention_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "num_key_value_heads": cfg.n_head,
            },
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.eos_token_id,  # GPT-2 has no pad token; batches are right-padded with eos
            "type": GENAI_TYPE,
            "vocab_size": cfg.vocab_size,
        },
        "search": search,
    }


def tokenizer_config(cfg: C.ModelConfig, folder: Path, tokenizer: Path) -> dict:
    """tokenizer_config.json for onnxruntime-genai's tokenizer (which reads it beside tokenizer.json): the
    checkpoint's own when it has one, else GPT-2's, with the chat template and the context length."""
    from tokenizers import Tokenizer

    conf = exporter._read_json(folder / "tokenizer_config.json")
    conf.pop("added_tokens_decoder", None)  # tokenizer.json holds the added tokens
    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.id_to_token(cfg.eos_token_id) or "<|endoftext|>"
    conf.setdefault("tokenizer_class", "GPT2Tokenizer")
    for key, value in (("bos_token", tok.id_to_token(cfg.bos_token_id) or eos), ("eos_token", eos),
                       ("unk_token", eos), ("add_prefix_space", False)):
        conf.setdefault(key, value)
    conf["model_max_length"] = cfg.n_positions
    template = exporter.chat_template(folder)
    if template is not None:
        conf["chat_template"] = template
    return conf


def export_genai(model: str, out: str | Path, *, dtype: str = "float32", quantize: str | None = None,
                 adapter: str | Path | None = None, progress: exporter.Progress | None = None,
                 provider: str | None = None) -> Path:
    """Export a GPT-2 checkpoint (Hub id or HF folder) as an onnxruntime-genai folder: model.onnx (+ .data),
    genai_config.json, tokenizer.json, tokenizer_config.json. provider: the execution provider written into
    genai_config.json, default cuda for float16 and cpu otherwise. The folder is published atomically."""
    say = progress or (lambda msg: None)
    exporter.check_options(dtype, quantize)
    provider = provider or ("cuda" if dtype == "float16" else "cpu")
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / GENAI_CONFIG).is_file())):
        raise ValueError(f"{out} exists and is not an empty folder or an onnxruntime-genai export; choose another -o")

    ck, cfg, eps, scales, quantizer = exporter.read_checkpoint(model, dtype, quantize, adapter, say)
    say(f"building the onnxruntime-genai graph ({cfg.n_layer} layers, {dtype}{', ' + quantize if quantize else ''})")
    proto = genai_graph(build(cfg, ck.weights, eps=eps, attn_scales=scales, quantize=quantizer,
                              bottleneck=ck.bottleneck), cfg)
    del ck.weights
    helper.set_model_props(proto, {"source": cfg.source, "exporter_version": cfg.exporter_version,
                                   "adapter": cfg.adapter or "", "genai_type": GENAI_TYPE})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        say("writing model.onnx")
        exporter.save_with_external_data(proto, tmp / C.MODEL_NAME, tmp / exporter.DATA_NAME)
        exporter.write_tokenizer(ck.folder, tmp / C.TOKENIZER_NAME)
        for name, data in ((GENAI_CONFIG, genai_config(cfg, ck.folder, provider=provider)),
                           ("tokenizer_config.json", tokenizer_config(cfg, ck.folder, tmp / C.TOKENIZER_NAME))):
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        if out.exists():  # a previous genai export: moved aside by one rename, removed once the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and str(e.filename or "").startswith(str(tmp)):  # ENOSPC, EIO, a quota
            raise exporter.WriteError(out, e) from e
        raise
    say(f"exported for onnxruntime-genai to {out}")
    return out
