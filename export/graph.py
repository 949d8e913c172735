"""Build the GPT-2 decoder graph directly from weights, with onnxruntime contrib ops.

Per layer: MatMul+Add -> GroupQueryAttention (packed QKV, past/present KV that may share one
max-length buffer) -> MatMul -> SkipLayerNormalization -> MatMul -> FastGelu (= gelu_new, bias
fused) -> MatMul -> SkipLayerNormalization. The embedding Gather and the LM head share `wte`;
the LM head runs only on the positions named by `logits_index`. Heads whose size is not a multiple
of 8 (which GroupQueryAttention needs) are zero-padded to `cfg.kv_head_size` (see `pad_heads`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpt2_onnx import config as C
from gpt2_onnx.export.quantize import gather_block_params

MS = "com.microsoft"
OPSET = 17
IR_VERSION = 10


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._n = 0

    def weight(self, name: str, arr: np.ndarray) -> str:
        """An initializer; a name given twice (a shared constant) is stored once."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, domain: str = "", name: str = "",
           outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{base}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs


def pad_heads(cfg: C.ModelConfig, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-pad every attention head from head_size to cfg.kv_head_size; exact.

    The q/k/v columns of c_attn get zero columns, so the padded q.k terms are 0 * 0 and the padded
    value dims are 0; the rows of attn.c_proj that read those value dims are zero too. The attention
    scale stays 1/sqrt(head_size): it is passed to GroupQueryAttention explicitly.
    """
    E, nh, hs, hp = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.kv_head_size
    if hp == hs:
        return w
    out = dict(w)
    for i in range(cfg.n_layer):
        p = f"h.{i}.attn"
        qkv = w[f"{p}.c_attn.weight"].reshape(E, 3, nh, hs)  # (E, q|k|v, nh, hs)
        out[f"{p}.c_attn.weight"] = np.pad(qkv, [(0, 0), (0, 0), (0, 0), (0, hp - hs)]).reshape(E, 3 * nh * hp)
        bias = w[f"{p}.c_attn.bias"].reshape(3, nh, hs)  # (q|k|v, nh, hs)
        out[f"{p}.c_attn.bias"] = np.pad(bias, [(0, 0), (0, 0), (0, hp - hs)]).reshape(3 * nh * hp)
        proj = w[f"{p}.c_proj.weight"].reshape(nh, hs, E)  # (nh, hs, E): input rows per head
        out[f"{p}.c_proj.weight"] = np.pad(proj, [(0, 0), (0, hp - hs), (0, 0)]).reshape(nh * hp, E)
    return out


def build(cfg: C.ModelConfig, w: dict[str, np.ndarray], *, eps: float, attn_scales: list[float],
          quantize=None, bottleneck=None) -> onnx.ModelProto:
    """Return the ONNX model for GPT-2 weights `w` (canonical names, float32 numpy).

    `quantize(weight (K, N)) -> (initializers, attrs)` turns every MatMul (LM head included) into
    MatMulNBits; None keeps fp32/fp16 MatMuls. `bottleneck`: an export.bottleneck.Bottleneck adapter, run as
    graph nodes after the attention and/or MLP of the layers it adapts (its MatMuls stay in the activation dtype).
    """
    np_dtype = cfg.np_dtype
    onnx_dtype = _onnx_dtype(cfg)
    w = pad_heads(cfg, w)
    b = _Builder()

    def W(name: str) -> str:
        return b.weight(name, w[name].astype(np_dtype))

    blocks: dict[str, tuple[list[str], list[np.ndarray], dict]] = {}  # prefix -> (initializer names, arrays, attrs)

    def quantized(prefix: str, weight: np.ndarray) -> tuple[list[str], list[np.ndarray], dict]:
        """weight (K, N) block-quantized once per prefix: B, scales, zero_points initializers."""
        if prefix not in blocks:
            inits, attrs = quantize(weight)
            blocks[prefix] = [b.weight(f"{prefix}.weight.{n}", a) for n, a in inits], [a for _, a in inits], attrs
        return blocks[prefix]

    def nbits(x: str, prefix: str, weight: np.ndarray, *, bias: str | None = None) -> str:
        """x @ weight (K, N) as MatMulNBits: A, B, scales, zero_points[, g_idx, bias]."""
        names, _, attrs = quantized(prefix, weight)
        inputs = [x] + names + (["", W(bias)] if bias else [])
        return b.op("MatMulNBits", inputs, domain=MS, name=prefix, **attrs)[0]

    def embedding(ids: str) -> str:
        """wte rows for ids (B, S) -> (B, S, n_embd). Quantized models gather from the block-quantized
        weight of the LM head (tied heads: the very same bytes), dequantized by GatherBlockQuantized."""
        if not quantize:
            return b.op("Gather", [W("wte.weight"), ids], name="wte")[0]
        prefix = "wte" if "lm_head.weight" in w else "lm_head"
        (data, *_), arrays, attrs = quantized(prefix, w["wte.weight"].T)
        if prefix == "lm_head":  # tied: the LM head's bytes under a name of the gather's own (see lm_head below)
            data = b.weight("wte.weight.B", arrays[0])
        scales, zero_points = gather_block_params(arrays, attrs)  # (V, n_blocks, 1) each
        rows = b.op("GatherBlockQuantized", [data, ids, b.weight(f"{prefix}.weight.gather_scales", scales),
                                             b.weight(f"{prefix}.weight.gather_zero_points", zero_points)],
                    domain=MS, name="wte", gather_axis=0, quantize_axis=2, block_size=attrs["block_size"],
                    bits=attrs["bits"])[0]  # (B, S, n_blocks, block)
        flat = b.op("Reshape", [rows, b.weight("shape_bs_flat", np.array([0, 0, -1], np.int64))],
                    name="wte/flat")[0]  # (B, S, n_blocks * block)
        if attrs["K"] % attrs["block_size"]:  # the last block is padded past n_embd
            flat = b.op("Slice", [flat, b.weight("zero", np.array([0], np.int64)),
                                  b.weight("n_embd", np.array([attrs["K"]], np.int64)),
                                  b.weight("axis_last", np.array([-1], np.int64))], name="wte/cut")[0]
        return flat

    masks: list[str] = []  # (keep, one), each (B, 1, (K + 1) * (R + 1)), made once from lora_slot

    def lora_masks() -> list[str]:
        """keep: 1 on the columns of the row's slot (its R rank columns and its bias column), else 0; one: 1 on
        the row's bias column only. Each row thus multiplies only its own adapter; slot 0 is all zeros."""
        if not masks:
            K1, R1 = cfg.lora_slots + 1, cfg.max_lora_rank + 1
            slot = b.op("Unsqueeze", [C.LORA_SLOT, b.weight("axis_last", np.array([-1], np.int64))],
                        name="lora/slot")[0]  # (B, 1)
            hot = b.op("Equal", [slot, b.weight("lora_slots", np.arange(K1, dtype=np.int64))], name="lora/hot")[0]
            hot = b.op("Cast", [hot], name="lora/hot_cast", to=onnx_dtype)[0]  # (B, K + 1)
            hot = b.op("Unsqueeze", [hot, b.weight("axis_last", np.array([-1], np.int64))], name="lora/hot3")[0]
            for name, block in (("keep", np.ones(R1)), ("one", np.eye(R1)[-1])):  # (R + 1,) per slot
                m = b.op("Mul", [hot, b.weight(f"lora_{name}_block", block.astype(np_dtype))],
                         name=f"lora/{name}")[0]  # (B, K + 1, R + 1)
                masks.append(b.op("Reshape", [m, b.weight("shape_lora_mask", np.array([0, 1, -1], np.int64))],
                                  name=f"lora/{name}_flat")[0])  # (B, 1, (K + 1) * (R + 1))
        return masks

    def lora(x: str, prefix: str) -> str:
        """The low-rank path of each row's adapter slot -> (B, S, out): x @ A (every slot's lora_A.T side by side,
        (in, (K + 1) * (R + 1))), kept on the row's slot with a 1 in its bias column, @ B (every slot's scaled
        lora_B.T and lora_bias). Slot 0 (no adapter) and ranks below max_lora_rank are zeros: exact."""
        _, i, m = prefix.split(".", 2)  # h, layer, module kind
        keep, one = lora_masks()
        xa = b.op("MatMul", [x, C.LORA_A.format(i=i, m=m)], name=f"{prefix}/lora_xA")[0]  # (B, S, (K+1) * (R+1))
        xa = b.op("Mul", [xa, keep], name=f"{prefix}/lora_keep")[0]  # the row's own slot
        xa = b.op("Add", [xa, one], name=f"{prefix}/lora_one")[0]  # its bias column: 1
        return b.op("MatMul", [xa, C.LORA_B.format(i=i, m=m)], name=f"{prefix}/lora_xAB")[0]  # (B, S, out)

    def linear(x: str, prefix: str, *, bias: bool = True) -> str:
        """x @ weight (+ bias); weight is GPT-2 Conv1D layout (in, out). With lora_slots, plus each row's LoRA
        path, added to the projection's output (before the op that fuses its bias, where one follows)."""
        wname = f"{prefix}.weight"
        if quantize:
            y = nbits(x, prefix, w[wname], bias=f"{prefix}.bias" if bias else None)
        else:
            y = b.op("MatMul", [x, W(wname)], name=f"{prefix}/MatMul")[0]
            y = b.op("Add", [y, W(f"{prefix}.bias")], name=f"{prefix}/Add")[0] if bias else y
        return b.op("Add", [y, lora(x, prefix)], name=f"{prefix}/AddLoRA")[0] if cfg.lora_slots else y

    # embeddings: (B, S) ids -> (B, S, n_embd)
    tok = embedding(C.INPUT_IDS)
    pos = b.op("Gather", [W("wpe.weight"), C.POSITION_IDS], name="wpe")[0]
    resid = b.op("Add", [tok, pos], name="embed")[0]
    x = b.op("LayerNormalization", [resid, W("h.0.ln_1.weight"), W("h.0.ln_1.bias")],
             name="h.0.ln_1", axis=-1, epsilon=eps)[0]

    def add_norm(y: str, resid: str, bias: str, ln: str, site: tuple[int, str]) -> tuple[str, str]:
        """LayerNorm `ln` of resid + y + bias, and that sum (the next residual); a bottleneck adapter at `site`
        runs between them (export.bottleneck)."""
        if bottleneck is not None and site in bottleneck.sites:
            from gpt2_onnx.export.bottleneck import emit

            return emit(b, bottleneck.sites[site], bottleneck.config, prefix=f"h.{site[0]}.{site[1]}", proj=y,
                        bias=w[bias], resid=resid, ln=(W(f"{ln}.weight"), W(f"{ln}.bias")), eps=eps, name=ln,
                        np_dtype=np_dtype)
        x, _, _, resid = b.op("SkipLayerNormalization", [y, resid, W(f"{ln}.weight"), W(f"{ln}.bias"), W(bias)],
                              n_out=4, domain=MS, name=ln, epsilon=eps)
        return x, resid

    for i in range(cfg.n_layer):
        p = f"h.{i}"
        qkv = linear(x, f"{p}.attn.c_attn")  # (B, S, 3 * n_head * kv_head_size): q heads | k heads | v heads
        attn, _, _ = b.op(
            "GroupQueryAttention",
            [qkv, "", "", C.PAST_KEY.format(i=i), C.PAST_VALUE.format(i=i), C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH],
            domain=MS, name=f"{p}.attn",
            outputs=[f"{p}.attn/out", C.PRESENT_KEY.format(i=i), C.PRESENT_VALUE.format(i=i)],
            num_heads=cfg.n_head, kv_num_heads=cfg.n_head, scale=attn_scales[i],
        )
        proj = linear(attn, f"{p}.attn.c_proj", bias=False)
        x, resid = add_norm(proj, resid, f"{p}.attn.c_proj.bias", f"{p}.ln_2", (i, "mh_adapter"))
        fc = linear(x, f"{p}.mlp.c_fc", bias=False)
        act = b.op("FastGelu", [fc, W(f"{p}.mlp.c_fc.bias")], domain=MS, name=f"{p}.mlp.gelu")[0]
        out = linear(act, f"{p}.mlp.c_proj", bias=False)
        nxt = f"h.{i + 1}.ln_1" if i + 1 < cfg.n_layer else "ln_f"
        x, resid = add_norm(out, resid, f"{p}.mlp.c_proj.bias", nxt, (i, "output_adapter"))

    # LM head only where asked: (B, S, E) gathered at (B, K) -> (B, K, E) -> (B, K, V)
    idx = b.op("Unsqueeze", [C.LOGITS_INDEX, b.weight("axis_last", np.array([-1], np.int64))], name="logits_index")[0]
    h = b.op("GatherND", [x, idx], name="gather_positions", batch_dims=1)[0]
    # The LM head reads its weight through an initializer of its own, also when tied to wte: the file holds the
    # bytes once (save_with_external_data stores equal initializers once) and onnxruntime maps each initializer on
    # its own, so that once the head's weight is prepacked its mapping is released, while the embedding's gather
    # touches only the rows it reads (one name for both kept every page of wte resident beside the packed copy).
    head_name = "lm_head.weight" if "lm_head.weight" in w else "wte.weight"
    if quantize:  # the LM head is the largest GEMV: quantized too, sharing its bytes with the embedding
        logits = nbits(h, "lm_head", w[head_name].T)
    else:
        head = b.weight("lm_head.weight", w[head_name].astype(np_dtype))
        logits = b.op("FusedMatMul", [h, head], domain=MS, name="lm_head", transB=1)[0]
    best = b.op("ArgMax", [logits], name="argmax", axis=-1, keepdims=0)[0]  # (B, K) over every row
    # next_token is -1 where a row's best logit is not finite (NaN, which fills a row whose hidden state is NaN, or
    # an overflow to infinity), so greedy decoding, which copies no logits, still fails on them; O(B) work
    at = b.op("Unsqueeze", [best, b.weight("axis_last", np.array([-1], np.int64))], name="best_index")[0]  # (B, K, 1)
    top = b.op("GatherElements", [logits, at], name="best_logit", axis=-1)[0]  # (B, K, 1)
    zero = b.op("Sub", [top, top], name="finite_check")[0]  # 0 where finite, NaN otherwise
    finite = b.op("Equal", [zero, b.weight(f"zero_{cfg.dtype}", np.zeros((), np.dtype(cfg.dtype)))], name="finite")[0]
    finite = b.op("Squeeze", [finite, b.weight("axis_last", np.array([-1], np.int64))], name="finite_rows")[0]
    b.op("Where", [finite, best, b.weight("minus_one", np.array(-1, np.int64))], name="next_token",
         outputs=[C.NEXT_TOKEN])
    rows = b.op("Gather", [logits, C.LOGITS_ROWS], name="logits_rows", axis=0)[0]  # (R, K, V): rows that sample
    if cfg.dtype == "float16":  # logits leave the graph in fp32
        b.op("Cast", [rows], name="logits_fp32", outputs=[C.LOGITS], to=TensorProto.FLOAT)
    else:
        b.nodes[-1].output[0] = C.LOGITS

    kv_shape = ["batch", cfg.n_head, "max_length", cfg.kv_head_size]
    inputs = [
        helper.make_tensor_value_info(C.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(C.POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(C.SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(C.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        helper.make_tensor_value_info(C.LOGITS_INDEX, TensorProto.INT64, ["batch", "num_logits"]),
        helper.make_tensor_value_info(C.LOGITS_ROWS, TensorProto.INT64, ["logits_rows"]),
    ] + [helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in cfg.past_names()]
    if cfg.lora_slots:  # bound once by the engine; load_lora writes a slot
        inputs.append(helper.make_tensor_value_info(C.LORA_SLOT, TensorProto.INT64, ["batch"]))
        inputs += [helper.make_tensor_value_info(n, onnx_dtype, shape) for n, shape in cfg.lora_inputs().items()]
    outputs = [helper.make_tensor_value_info(C.LOGITS, TensorProto.FLOAT, ["logits_rows", "num_logits", cfg.vocab_size])]
    outputs += [helper.make_tensor_value_info(C.NEXT_TOKEN, TensorProto.INT64, ["batch", "num_logits"])]
    outputs += [helper.make_tensor_value_info(n, onnx_dtype, kv_shape) for n in cfg.present_names()]
    graph = helper.make_graph(b.nodes, "gpt2", inputs, outputs, initializer=b.inits)
    return _model(graph, [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])


def lm_head_first(model: onnx.ModelProto) -> None:
    """Move the LM head to the front of the graph's nodes, in place. onnxruntime prepacks weights at load in node
    order (and sorts the nodes for execution itself): the largest weight's mapping is then released before the
    other packed copies are made (124M shape, fp32: peak RSS at load 553 MB against 691 MB). The graph is no
    longer stored topologically sorted, which onnxruntime-genai refuses: model.onnx of this engine's format only."""
    nodes = sorted(model.graph.node, key=lambda n: n.name != "lm_head")  # stable: the others keep their order
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def build_embeds(model: onnx.ModelProto, cfg: C.ModelConfig) -> onnx.ModelProto:
    """embeds.onnx: the graph `build` returned, entered by `inputs_embeds` (B, S, n_embd) in place of wte's rows.

    The `embed` node adds wpe[position_ids] to them as it adds it to token embeddings; only the present
    KV leave the graph, so the nodes it does not need (the wte gather, the last layer's MLP, ln_f, the
    LM head) are left out. Its initializers are copies of `model`'s protos: taken after
    save_with_external_data they point into the same weights file, so no weight is stored twice.
    """
    g = model.graph
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]
    embed = next(n for n in nodes if n.name == "embed")
    embed.input[0] = C.INPUTS_EMBEDS  # (B, S, n_embd) + wpe rows (B, S, n_embd)
    made = {out: n for n in nodes for out in n.output}
    keep, todo = set(), list(cfg.present_names())
    while todo:  # every node the present KV depend on
        node = made.get(todo.pop())
        if node is not None and node.name not in keep:
            keep.add(node.name)
            todo += node.input
    nodes = [n for n in nodes if n.name in keep]
    used = {i for n in nodes for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    onnx_dtype = _onnx_dtype(cfg)
    inputs = [helper.make_tensor_value_info(C.INPUTS_EMBEDS, onnx_dtype, ["batch", "sequence", cfg.n_embd])]
    inputs += [i for i in g.input if i.name in used]  # position_ids, seqlens_k, total_sequence_length, past KV
    outputs = [o for o in g.output if o.name in set(cfg.present_names())]
    out = _model(helper.make_graph(nodes, "gpt2_embeds", inputs, outputs, initializer=inits), model.opset_import)
    helper.set_model_props(out, {p.key: p.value for p in model.metadata_props})
    return out


def build_kv_copy(cfg: C.ModelConfig) -> onnx.ModelProto:
    """kv_copy.onnx: dst.{j} = Pad(Slice(src.{j}, positions :length), pads) for every KV buffer j.

    The engine binds src and dst to rows of KV buffers on the session's device, so rows move between
    buffers (prefix reuse, n samples of one prompt, compaction) without a trip through host memory.
    """
    onnx_dtype = _onnx_dtype(cfg)
    b = _Builder()
    starts, axes = b.weight("starts", np.array([0], np.int64)), b.weight("axes", np.array([2], np.int64))
    inputs = [helper.make_tensor_value_info(C.COPY_LENGTH, TensorProto.INT64, [1]),
              helper.make_tensor_value_info(C.COPY_PADS, TensorProto.INT64, [8])]
    outputs = []
    for j in range(2 * cfg.n_layer):
        src, dst = C.COPY_SRC.format(j=j), C.COPY_DST.format(j=j)
        part = b.op("Slice", [src, starts, C.COPY_LENGTH, axes], name=f"slice.{j}")[0]  # (R, nh, length, hs)
        b.op("Pad", [part, C.COPY_PADS], name=f"pad.{j}", outputs=[dst])  # (R, nh, dst length, hs)
        shape = ["rows", cfg.n_head, f"src_length.{j}", cfg.kv_head_size]
        inputs.append(helper.make_tensor_value_info(src, onnx_dtype, shape))
        outputs.append(helper.make_tensor_value_info(dst, onnx_dtype, ["rows", cfg.n_head, f"dst_length.{j}",
                                                                        cfg.kv_head_size]))
    graph = helper.make_graph(b.nodes, "gpt2_kv_copy", inputs, outputs, initializer=b.inits)
    return _model(graph, [helper.make_opsetid("", OPSET)])


def _onnx_dtype(cfg: C.ModelConfig) -> int:
    """The activation and KV dtype of the graphs."""
    return TensorProto.FLOAT16 if cfg.dtype == "float16" else TensorProto.FLOAT


def _model(graph: onnx.GraphProto, opsets) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=opsets, producer_name="gpt2-onnx")
    model.ir_version = IR_VERSION
    return model
