"""PEFT adapters: LoRA and IA3 merged into the base weights at export; prefix-tuning, prompt tuning and P-tuning
read at run time as their virtual tokens (a prefix KV, or input embeddings that the model turns into one).

An adapter folder is what peft's `PeftModel.save_pretrained` writes: adapter_config.json plus
adapter_model.safetensors (or adapter_model.bin). Its tensor names are the base model's module
names under `base_model.model.`, e.g. `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`.
GPT-2's c_attn / c_proj / c_fc are Conv1D modules: weight (in, out), y = x @ W + b.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from gpt2_onnx import config as C
from gpt2_onnx.export import bottleneck, checkpoint

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)")  # modules merged into
# LoRA variants and options whose math is not W += B @ A * scaling on the targeted modules alone
LORA_REFUSED = {
    "use_dora": "DoRA (use_dora)", "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)", "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow (arrow_config)", "kasa_config": "KaSA (kasa_config)", "use_qalora": "QALoRA (use_qalora)",
    "layer_replication": "layer_replication", "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)", "modules_to_save": "modules_to_save",
}
# init_lora_weights values that change the base weights themselves (or are a variant): the adapter alone
# does not describe the fine-tuned model
BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
MERGE_ELSEWHERE = ("merge it in peft instead (model.merge_and_unload(), then save_pretrained) and export the "
                   "merged checkpoint")
# peft types whose virtual tokens load at run time; those merged at export; those peft cannot merge either
RUN_TIME = {"PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning", "P_TUNING": "P-tuning"}
MERGED = ("LORA", "IA3")
UNMERGEABLE = ("MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE", "ADAPTION_PROMPT")  # no merge_and_unload in peft
LOAD_AT_RUN_TIME = ("load it at run time on the base model's export: Engine.load_prefix(DIR), "
                    "`gpt2-onnx generate --prefix-adapter DIR` or `gpt2-onnx serve --prefix-adapter NAME=DIR`")
MERGE_AT_EXPORT = "merge it at export: gpt2-onnx export BASE --adapter DIR (then load that export)"
SUPPORTED = ("gpt2-onnx merges LORA and IA3 at export (--adapter) and loads PREFIX_TUNING, PROMPT_TUNING and "
             "P_TUNING at run time (load_prefix, --prefix-adapter)")


def refusal(kind, where: str, *, run_time: bool) -> ValueError:
    """Why an adapter of peft_type `kind` is refused by export --adapter (run_time False) or by load_prefix /
    --prefix-adapter (run_time True), and the true remedy."""
    if kind in RUN_TIME and not run_time:
        return ValueError(f"{where}: a {RUN_TIME[kind]} adapter ({kind}) is not merged into the weights; export the "
                          f"base model without --adapter and {LOAD_AT_RUN_TIME}")
    if kind in MERGED and run_time:
        return ValueError(f"{where}: a {kind} adapter changes the weights, it is not loaded at run time; "
                          f"{MERGE_AT_EXPORT}")
    if kind in UNMERGEABLE:
        return ValueError(f"{where}: peft_type {kind} is not supported: peft cannot merge it (no merge_and_unload) and "
                          f"gpt2-onnx does not run it; run it with peft ({SUPPORTED})")
    if run_time:
        return ValueError(f"{where}: peft_type {kind!r} is not loaded at run time ({SUPPORTED}); {MERGE_ELSEWHERE}")
    return ValueError(f"{where}: peft_type {kind!r} is not supported; --adapter merges LORA and IA3 adapters "
                      f"(PREFIX_TUNING, PROMPT_TUNING and P_TUNING load at run time), for others {MERGE_ELSEWHERE}")


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, tensors as float32 numpy with the `base_model.model.` prefix removed)."""
    folder = Path(adapter_dir).expanduser()
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{path} not found: {folder} is not a PEFT adapter folder "
                         "(one written by PeftModel.save_pretrained)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if (folder / "adapter_model.safetensors").is_file():
        raw = checkpoint.read_safetensors(folder / "adapter_model.safetensors")
    elif (folder / "adapter_model.bin").is_file():
        raw = checkpoint.read_torch_bin(folder / "adapter_model.bin")
    elif bottleneck.is_adapters_folder(folder):
        raise ValueError(f"{folder} holds an adapter of the adapters library (AdapterHub), not a peft adapter: its "
                         "bottleneck adapters become graph nodes at export (gpt2-onnx export BASE --adapter DIR), "
                         "they do not load at run time")
    else:
        raise ValueError(f"{folder} has neither adapter_model.safetensors nor adapter_model.bin")
    return config, {k.removeprefix(PEFT_PREFIX): np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def pattern_key(patterns, module: str) -> str | None:
    """peft's get_pattern_key: the first rank/alpha pattern that matches the end of the module name."""
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", module)), None)


def merge_adapter(weights: dict[str, np.ndarray], adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """The base weights (GPT-2 names, float32) with a LoRA or IA3 adapter merged in; `weights` is not changed.

    LoRA: W (in, out) += (B @ A).T * scaling with scaling = alpha / r (alpha / sqrt(r) with rsLoRA),
    r and alpha per module from rank_pattern / alpha_pattern as peft resolves them; lora_bias adds
    lora_B.bias * scaling; bias "all" / "lora_only" replace the base biases with the trained ones.
    IA3: l scales the input of feedforward modules (rows of W) and the output of the others
    (columns of W and the bias), exactly as peft's forward does. Anything else is a ValueError.
    """
    config, tensors = read_adapter(adapter_dir)
    where = str(Path(adapter_dir).expanduser() / ADAPTER_CONFIG)
    kind = config.get("peft_type")
    if kind == "LORA":
        return _merge_lora(weights, config, tensors, where)
    if kind == "IA3":
        return _merge_ia3(weights, config, tensors, where)
    raise refusal(kind, where, run_time=False)


def _target(weights: dict[str, np.ndarray], module: str, what: str, where: str) -> str:
    """The GPT-2 prefix of an adapted module; refuses modules that are not one of the Conv1D layers."""
    name = checkpoint.canonical(module)
    if CONV1D.fullmatch(name):
        if f"{name}.weight" not in weights:
            raise ValueError(f"{where}: the adapter adapts {module}, which this base model does not have; "
                             "was it trained on another base model?")
        return name
    part = "embeddings" if name.split(".")[-1] in ("wte", "wpe") else name
    raise ValueError(f"{where}: {what} on {part} ({module}) is not supported: only the attention and MLP layers "
                     f"(c_attn, c_proj, c_fc) are merged; {MERGE_ELSEWHERE}")


def _lora_parts(shapes: dict, config: dict, tensors: dict[str, np.ndarray], where: str):
    """What merging and run-time slots share: the refusals, then [(GPT-2 prefix, peft module, A (r, in),
    B (out, r), scaling, lora_B.bias or None)] with r and alpha per module as peft resolves them from
    rank_pattern / alpha_pattern, and the trained base biases (bias "all" / "lora_only") by tensor name.
    `shapes`: the base weights' shapes by GPT-2 name."""
    for field, name in LORA_REFUSED.items():
        if config.get(field):
            raise ValueError(f"{where}: {name} is not supported, only plain LoRA is merged exactly; {MERGE_ELSEWHERE}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INIT):
        raise ValueError(f"{where}: init_lora_weights {init!r} changes the base model's weights, so the adapter "
                         "alone is not the fine-tune; convert it to plain LoRA with peft's save_pretrained("
                         "path_initial_model_for_weight_conversion=...) or merge it in peft and export the result")
    bias_mode = config.get("bias", "none")
    modules: dict[str, dict[str, np.ndarray]] = {}
    biases: dict[str, np.ndarray] = {}
    others = []
    for key, arr in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)", key)
        if m:
            modules.setdefault(m[1], {})[m[2]] = arr
        elif re.search(r"\.lora_embedding_[AB]$", key):
            raise ValueError(f"{where}: LoRA on embeddings ({key.rsplit('.', 1)[0]}) is not supported: only the "
                             f"attention and MLP layers (c_attn, c_proj, c_fc) are merged; {MERGE_ELSEWHERE}")
        elif key.endswith(".bias") and bias_mode in ("all", "lora_only"):
            biases[key.replace(".base_layer.", ".")] = arr  # a trained base bias
        else:
            others.append(key)
    targets = {module: _target(shapes, module, "LoRA", where) for module in sorted(modules)}
    if others:
        what = ("whole embedding weights (peft's save_embedding_layers, e.g. after resizing the vocabulary)"
                if any(re.search(r"(wte|wpe|lm_head)(\.base_layer)?\.weight$", k) for k in others) else "tensors")
        raise ValueError(f"{where}: the adapter holds {what} besides LoRA weights ({', '.join(others[:4])}), "
                         f"which is not supported; {MERGE_ELSEWHERE}")
    if not modules:
        raise ValueError(f"{where}: the adapter holds no LoRA weights (lora_A / lora_B)")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    checks = (("r", {"": r_default}, (int,)), ("lora_alpha", {"": alpha_default}, (int, float)),
              ("rank_pattern", rank_pattern, (int,)), ("alpha_pattern", alpha_pattern, (int, float)))
    for field, values, kinds in checks:  # a hand-edited config: a named error, not a TypeError further on
        if not isinstance(values, dict) or not all(isinstance(v, kinds) and not isinstance(v, bool)
                                                   for v in values.values()):
            what = ("a mapping of module patterns to " if field.endswith("pattern") else "") + \
                ("integers" if kinds == (int,) else "numbers")
            raise ValueError(f"{where}: {field} must be {what}, got {config.get(field)!r}; save the adapter again "
                             "with peft")
    parts_out = []
    for module, name in targets.items():
        parts = modules[module]
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise ValueError(f"{where}: {module} has {sorted(parts)} but LoRA needs lora_A.weight and lora_B.weight")
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]  # (r, in), (out, r)
        W = tuple(shapes[f"{name}.weight"])  # (in, out)
        r = A.shape[0]
        r_key = pattern_key(rank_pattern, module)
        r_config = rank_pattern[r_key] if r_key is not None else r_default
        if r != r_config or B.shape[1] != r or A.shape[1] != W[0] or B.shape[0] != W[1]:
            raise ValueError(f"{where}: {module} has lora_A {A.shape} and lora_B {B.shape}, which do not fit its "
                             f"weight {W} with r {r_config}; was the adapter trained on another base model?")
        a_key = pattern_key(alpha_pattern, module)
        alpha = alpha_pattern[a_key] if a_key is not None else alpha_default
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        parts_out.append((name, module, A, B, scaling, parts.get("lora_B.bias")))
    return parts_out, biases


def _merge_lora(weights, config, tensors, where):
    parts, biases = _lora_parts({k: v.shape for k, v in weights.items()}, config, tensors, where)
    out = dict(weights)
    for key, arr in biases.items():
        name = checkpoint.canonical(key)
        if name not in out or out[name].shape != arr.shape:
            raise ValueError(f"{where}: trained bias {key} does not match a bias of the base model")
        out[name] = arr
    for name, _, A, B, scaling, bias in parts:
        W = out[f"{name}.weight"]  # (in, out)
        out[f"{name}.weight"] = (W + (B @ A).T * scaling).astype(np.float32)  # Conv1D: fan_in_fan_out
        if bias is not None:
            out[f"{name}.bias"] = (out[f"{name}.bias"] + bias * scaling).astype(np.float32)
    return out


def read_lora(adapter_dir: str | Path, cfg: C.ModelConfig) -> tuple[dict[str, tuple], int]:
    """A peft LoRA adapter for a slot of the export `cfg` (lora_slots > 0): ({GPT-2 prefix: (A.T (in, r),
    B.T * scaling (r, out), lora_B.bias * scaling (out,) or None)}, its largest r), float32, heads padded
    like the graph's. The same adapters as merge_adapter's LoRA, except those that change base weights."""
    config, tensors = read_adapter(adapter_dir)
    folder = Path(adapter_dir).expanduser()
    where = str(folder / ADAPTER_CONFIG)
    merge = f"merge it into the weights at export instead (gpt2-onnx export BASE --adapter {folder})"
    kind = config.get("peft_type")
    if kind == "PREFIX_TUNING":
        raise ValueError(f"{where}: a prefix-tuning adapter is not a LoRA adapter; load it with load_prefix "
                         "(serve --prefix-adapter)")
    if kind != "LORA":
        raise ValueError(f"{where}: peft_type {kind!r} is not LoRA; LoRA slots take LORA adapters only, {merge}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias {config['bias']!r} trains the base model's biases, which a LoRA slot does not "
                         f"hold (only lora_bias); {merge}")
    E, hs, hp = cfg.n_embd, cfg.head_size, cfg.kv_head_size
    kinds = {"attn.c_attn": (E, 3 * E), "attn.c_proj": (E, E), "mlp.c_fc": (E, 4 * E), "mlp.c_proj": (4 * E, E)}
    shapes = {f"h.{i}.{m}.weight": shape for i in range(cfg.n_layer) for m, shape in kinds.items()}  # unpadded
    parts, _ = _lora_parts(shapes, config, tensors, where)
    out, rank = {}, 0
    for name, module, A, B, scaling, bias in parts:
        a, b = A.T, B.T * scaling  # (in, r), (r, out)
        bias = None if bias is None else bias * scaling  # (out,)
        r = a.shape[1]
        if r > cfg.max_lora_rank:
            raise ValueError(f"{where}: {module} has rank {r}, above this export's max_lora_rank "
                             f"{cfg.max_lora_rank}; re-export the base with --max-lora-rank {r} (or more)")
        rank = max(rank, r)
        if hp != hs and name.endswith("attn.c_attn"):  # q|k|v heads padded as graph.pad_heads does
            b = np.pad(b.reshape(r, 3, cfg.n_head, hs), [(0, 0)] * 3 + [(0, hp - hs)]).reshape(r, -1)
            if bias is not None:
                bias = np.pad(bias.reshape(3, cfg.n_head, hs), [(0, 0)] * 2 + [(0, hp - hs)]).reshape(-1)
        elif hp != hs and name.endswith("attn.c_proj"):  # rows that read the padded value dims
            a = np.pad(a.reshape(cfg.n_head, hs, r), [(0, 0), (0, hp - hs), (0, 0)]).reshape(-1, r)
        out[name] = (a.astype(np.float32), b.astype(np.float32), None if bias is None else bias.astype(np.float32))
    return out, rank


def _merge_ia3(weights, config, tensors, where):
    if config.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save is not supported; {MERGE_ELSEWHERE}")
    out = dict(weights)
    for key, l in sorted(tensors.items()):
        if not key.endswith(".ia3_l"):
            raise ValueError(f"{where}: unexpected tensor {key} in an IA3 adapter; {MERGE_ELSEWHERE}")
        name = _target(weights, key.removesuffix(".ia3_l"), "IA3", where)
        W, b = out[f"{name}.weight"], out[f"{name}.bias"]  # (in, out), (out,)
        if l.shape == (1, W.shape[0]):  # feedforward: peft scales the module's input, x * l
            out[f"{name}.weight"] = W * l.reshape(-1, 1)
        elif l.shape == (W.shape[1], 1):  # others: peft scales the output, (x @ W + b) * l
            out[f"{name}.weight"], out[f"{name}.bias"] = W * l.reshape(1, -1), b * l.reshape(-1)
        else:
            raise ValueError(f"{where}: {key} has shape {l.shape}, but its weight is {W.shape}; "
                             "was the adapter trained on another base model?")
    return out


def read_virtual_tokens(adapter_dir: str | Path, cfg: C.ModelConfig) -> tuple[str, list[np.ndarray]]:
    """A peft adapter that loads at run time, for the exported model `cfg`: ("kv", read_prefix_adapter's arrays)
    for PREFIX_TUNING; ("embeds", [inputs_embeds (1, T, n_embd)]) for PROMPT_TUNING and P_TUNING, the
    virtual tokens' input embeddings, which run through the model (wpe added, positions 0..T-1) to give
    their KV. Other types are a ValueError naming their remedy.

    peft saves both as `prompt_embeddings` (T, n_embd) (get_prompt_embedding_to_save): P-tuning's MLP or
    LSTM prompt encoder has already run on them, so none runs here; peft feeds them as inputs_embeds
    = cat(virtual, prompt embeddings), so the prompt's tokens take positions from T on.
    """
    config, tensors = read_adapter(adapter_dir)
    where = str(Path(adapter_dir).expanduser() / ADAPTER_CONFIG)
    kind = config.get("peft_type")
    if kind == "PREFIX_TUNING":
        return "kv", _prefix_kv(config, tensors, cfg, where)
    if kind not in RUN_TIME:
        raise refusal(kind, where, run_time=True)
    n_virtual, emb = _virtual_tokens(config, tensors, cfg, where, cfg.n_embd)
    return "embeds", [emb.reshape(1, n_virtual, cfg.n_embd)]  # (1, T, n_embd)


def _virtual_tokens(config, tensors, cfg, where, width: int) -> tuple[int, np.ndarray]:
    """(num_virtual_tokens, prompt_embeddings (T, width)) after the checks every run-time type needs."""
    want = {"num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "token_dim": cfg.n_embd,
            "num_transformer_submodules": 1}
    wrong = {k: config.get(k) for k, v in want.items() if config.get(k, v) != v}
    if wrong:
        raise ValueError(f"{where}: {wrong} do not fit this model ({want}); was it trained on another base model?")
    n_virtual = config.get("num_virtual_tokens")
    emb = tensors.get("prompt_embeddings")
    if not isinstance(n_virtual, int) or emb is None or emb.shape != (n_virtual, width):
        raise ValueError(f"{where}: expected prompt_embeddings of shape ({n_virtual}, {width}), "
                         f"got {None if emb is None else emb.shape}")
    if not 0 < n_virtual < cfg.n_positions:
        raise ValueError(f"{where}: num_virtual_tokens {n_virtual} must be in 1..n_positions-1 ({cfg.n_positions - 1})")
    return n_virtual, emb


def read_prefix_adapter(adapter_dir: str | Path, cfg: C.ModelConfig) -> list[np.ndarray]:
    """A peft prefix-tuning adapter as the KV of its virtual tokens, for the exported model `cfg`.

    Returns 2 * n_layer arrays in past-name order (layer 0 key, layer 0 value, layer 1 key, ...),
    each (1, n_head, num_virtual_tokens, cfg.kv_head_size) of dtype cfg.np_dtype: the values peft's
    `get_prompt` feeds as past_key_values, zero-padded per head like the exported graph's heads.
    Put them at positions 0..num_virtual_tokens-1 of a KV cache (lengths = num_virtual_tokens);
    the prompt's tokens then take positions from num_virtual_tokens on, as they do under peft.

    peft saves `prompt_embeddings` (num_virtual_tokens, 2 * n_layer * n_embd) already through its
    prefix_projection MLP when it has one (get_prompt_embedding_to_save), so no MLP runs here.
    """
    kind, arrays = read_virtual_tokens(adapter_dir, cfg)
    if kind != "kv":
        raise ValueError(f"{Path(adapter_dir).expanduser() / ADAPTER_CONFIG}: not a prefix-tuning adapter: its virtual "
                         "tokens are input embeddings (read_virtual_tokens), which Engine.load_prefix runs through "
                         "the model")
    return arrays


def _prefix_kv(config, tensors, cfg, where) -> list[np.ndarray]:
    L, nh, hs = cfg.n_layer, cfg.n_head, cfg.head_size
    n_virtual, emb = _virtual_tokens(config, tensors, cfg, where, 2 * L * cfg.n_embd)
    kv = emb.reshape(n_virtual, 2 * L, nh, hs).transpose(1, 2, 0, 3)  # (2L, nh, T, hs): layer-major, key then value
    kv = np.pad(kv, [(0, 0), (0, 0), (0, 0), (0, cfg.kv_head_size - hs)])  # (2L, nh, T, kv_head_size)
    return [np.ascontiguousarray(kv[j][None], dtype=cfg.np_dtype) for j in range(2 * L)]  # each (1, nh, T, hsp)
