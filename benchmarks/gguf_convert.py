"""Write a GPT-2 HF checkpoint (safetensors) as GGUF for llama.cpp, with the `gguf` package's writer.

Benchmark-only (anchors): f32, q8_0 or q4_0 weights; the tokenizer is stored as a plain vocabulary
(benchmarks feed token ids, never text).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def convert(ck: Path, out: Path, qtype: str = "f32") -> Path:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((ck / "config.json").read_text())
    w = {k.removeprefix("transformer."): v.astype(np.float32) for f in sorted(ck.glob("*.safetensors"))
         for k, v in load_file(str(f)).items()}
    n_layer, E = cfg["n_layer"], cfg["n_embd"]
    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name("gpt2-bench")
    writer.add_context_length(cfg["n_positions"])
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(4 * E)
    writer.add_block_count(n_layer)
    writer.add_head_count(cfg["n_head"])
    writer.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type({"f32": 0, "q8_0": 7, "q4_0": 2}[qtype])
    vocab = w["wte.weight"].shape[0]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges(["<t0> <t1>"])  # llama.cpp insists on merges; ids are fed directly
    writer.add_eos_token_id(cfg.get("eos_token_id", vocab - 1))
    writer.add_bos_token_id(cfg.get("bos_token_id", vocab - 1))
    gq = {"f32": None, "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]

    def add(name: str, arr: np.ndarray, quant: bool = False) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if quant and gq is not None:
            writer.add_tensor(name, gguf.quants.quantize(arr, gq), raw_shape=gguf.quant_shape_to_byte_shape(arr.shape, gq),
                              raw_dtype=gq)
        else:
            writer.add_tensor(name, arr)

    add("token_embd.weight", w["wte.weight"], quant=True)
    add("position_embd.weight", w["wpe.weight"])
    add("output_norm.weight", w["ln_f.weight"])
    add("output_norm.bias", w["ln_f.bias"])
    add("output.weight", w.get("lm_head.weight", w["wte.weight"]), quant=True)
    names = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(n_layer):
        for hf, gg in names.items():
            wt = w[f"h.{i}.{hf}.weight"]
            add(f"blk.{i}.{gg}.weight", wt.T if wt.ndim == 2 else wt, quant=wt.ndim == 2)  # Conv1D (in,out) -> (out,in)
            add(f"blk.{i}.{gg}.bias", w[f"h.{i}.{hf}.bias"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
