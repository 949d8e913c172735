"""Bottleneck adapters of the `adapters` library (AdapterHub) as graph nodes: seq_bn (Pfeiffer),
double_seq_bn (Houlsby) and par_bn (parallel), with their reduction factor, non-linearity, scaling,
residual_before_ln, original_ln_before/after, ln_before/ln_after.

A bottleneck has a non-linearity, so it cannot be merged into the weights; it runs where the library
runs it. GPT-2's blocks (adapters/models/gpt2/modeling_gpt2.py) call
`attention_adapters(attn_output, residual, None)` (mh_adapter) and `output_adapters(mlp_output, residual,
None)` (output_adapter): the layer norm passed is None, so original_ln_before/after only add the block's
residual, and the result is the block's new residual stream, which the next LayerNorm (ln_2, the next
ln_1 or ln_f) reads. With h the sub-layer's output (c_proj's, bias included) and r the residual:

  sequential:  x = h + r if original_ln_before else h;  res = h if residual_before_ln else x
               out = up(act(down(ln_before(x)))) * scaling, then + res before or after ln_after
               y = out + r if original_ln_after else out
  parallel:    y = ln_after(up(act(down(ln_before(r)))) * scaling) + h (+ r if original_ln_after)

Sources: a folder written by `model.save_adapter(dir, name)` (adapter_config.json + adapter.safetensors or
pytorch_adapter.bin, the latter read by torch.load(weights_only=True): a pickle never runs code), or a
checkpoint saved by `save_pretrained` after `adapters.init` (an `adapters` section in config.json,
`transformer.h.N.{attention,output}_adapters.adapters.NAME.*` tensors). The scaling is folded into the
up-projection (exact up to rounding); the adapter's MatMuls stay in the activation dtype in int8/int4 exports.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2_onnx.export import checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")  # save_adapter(use_safetensors=True) / default
HEADS = ("model_head.safetensors", "pytorch_model_head.bin")
LOCATIONS = {"attention_adapters": "mh_adapter", "output_adapters": "output_adapter"}
KEY = re.compile(r"h\.(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\.(.+)")
LN_EPS = 1e-5  # nn.LayerNorm's default, which the library's ln_before / ln_after use
REMEDY = ("of the adapters library, gpt2-onnx exports the bottleneck adapters seq_bn, double_seq_bn and par_bn (as "
          "graph nodes); merge a LoRA there first (model.merge_adapter(NAME), load model.state_dict() without its "
          "'.loras.' tensors into a plain GPT2LMHeadModel, save_pretrained it) and export that checkpoint; of peft, "
          "LoRA and IA3 adapters are merged at export (--adapter) or LoRA taken at run time (--lora-slots, --lora), and "
          "prefix-tuning, prompt-tuning and P-tuning are loaded at run time (--prefix-adapter)")
# config fields whose math is not a plain bottleneck at the two sites GPT-2 has
REFUSED = {"phm_layer": "Compacter's PHM layers (phm_layer)", "use_gating": "gating (use_gating, as in UniPELT)",
           "inv_adapter": "invertible adapters on the embeddings (inv_adapter, as in seq_bn_inv)"}
# non_linearity (lowercased, as Activation_Function_Class reads it) -> how the graph computes it
ACTIVATIONS = ("relu", "leakyrelu", "leaky_relu", "relu6", "relu2", "sigmoid", "tanh", "silu", "swish", "quick_gelu",
               "gelu", "gelu_python", "gelu_10", "gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast",
               "gelu_accurate", "mish", "linear")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "gelu_accurate")


@dataclass
class Site:
    """One adapter module: down (E, d), up (d, E) in x @ W layout, scaling folded into up and up_bias."""

    down: np.ndarray
    down_bias: np.ndarray
    up: np.ndarray
    up_bias: np.ndarray
    ln_before: tuple[np.ndarray, np.ndarray] | None = None
    ln_after: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Bottleneck:
    """A bottleneck adapter: its name, its BnConfig fields and its modules by (layer, mh_adapter | output_adapter)."""

    name: str
    config: dict
    sites: dict[tuple[int, str], Site]


def is_adapters_folder(folder: str | Path) -> bool:
    """Whether a folder holds an adapter saved by the adapters library (its adapter_config.json has `config`)."""
    path = Path(folder).expanduser() / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "peft_type" not in data


def read_folder(folder: str | Path, n_layer: int, n_embd: int, head: np.ndarray) -> Bottleneck:
    """The adapter of a save_adapter folder, checked against the base model (n_layer, n_embd, its LM head)."""
    folder = Path(folder).expanduser()
    where = str(folder / CONFIG)
    meta = checkpoint.read_json_object(folder / CONFIG)
    if meta.get("model_type", "gpt2") != "gpt2" or meta.get("hidden_size", n_embd) != n_embd:
        raise ValueError(f"{where}: the adapter was saved for a {meta.get('model_type')} model of hidden_size "
                         f"{meta.get('hidden_size')}, but the base model is GPT-2 with n_embd {n_embd}; "
                         "was it trained on another base model?")
    config = _config(meta["config"], where)
    path = next((folder / f for f in WEIGHTS if (folder / f).is_file()), None)
    if path is None:
        raise ValueError(f"{folder} has neither {' nor '.join(WEIGHTS)}: save the adapter with the adapters "
                         "library's model.save_adapter(DIR, NAME)")
    tensors = _read(path)
    name = meta.get("name") or "adapter"
    for f in HEADS:  # save_adapter stores the model's head too: it must be the base model's, untouched
        if (folder / f).is_file():
            saved = _read(folder / f).get("lm_head.weight")
            if saved is not None and (saved.shape != head.shape or not np.allclose(saved, head, rtol=0, atol=1e-6)):
                raise ValueError(f"{folder / f}: the adapter's LM head differs from the base model's; export the "
                                 "checkpoint the adapter was trained on, or save the whole model after adapters.init "
                                 "(save_pretrained) and export that folder")
    return _collect(name, config, {checkpoint.canonical(k): v for k, v in tensors.items()}, where, n_layer, n_embd)


def take_from_checkpoint(hf: dict, weights: dict[str, np.ndarray], where: str, n_layer: int,
                         n_embd: int) -> Bottleneck | None:
    """The adapter of a checkpoint saved after adapters.init (config.json's `adapters`), its tensors removed from
    `weights`; None when it holds none."""
    section = hf.get("adapters") or {}
    names = (section.get("adapters") or {}) if isinstance(section, dict) else {}
    if not names:
        return None
    if section.get("fusions"):
        raise ValueError(f"{where}: AdapterFusion ({', '.join(section['fusions'])}) is not supported; {REMEDY}")
    if len(names) > 1:
        raise ValueError(f"{where}: the checkpoint holds {len(names)} adapters ({', '.join(names)}); save the one to "
                         "export with model.save_adapter(DIR, NAME) and export the base checkpoint it was trained on "
                         "with --adapter DIR")
    (name, key), = names.items()
    config = (section.get("config_map") or {}).get(key) if isinstance(key, str) else key
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config of adapter {name!r} ({key!r}) is not in adapters.config_map")
    config = _config(config, where)
    mine = {k: weights.pop(k) for k in [k for k in weights if KEY.fullmatch(k)]}
    return _collect(name, config, mine, where, n_layer, n_embd)


def _read(path: Path) -> dict[str, np.ndarray]:
    reader = checkpoint.read_safetensors if path.suffix == ".safetensors" else checkpoint.read_torch_bin
    return {k: np.asarray(v, dtype=np.float32) for k, v in reader(path).items()}


def _config(config: dict, where: str) -> dict:
    """The BnConfig fields with the library's defaults, refused by name when they are not a plain bottleneck."""
    arch = config.get("architecture")
    if arch is not None:
        raise ValueError(f"{where}: {arch} adapters of the adapters library are not supported; {REMEDY}")
    c = {"original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
         "is_parallel": False, "scaling": 1.0, "residual_before_ln": True, "adapter_residual_before_ln": False,
         "mh_adapter": False, "output_adapter": False, "leave_out": [], **config}
    for field, what in REFUSED.items():
        if c.get(field):
            raise ValueError(f"{where}: {what} is not supported; {REMEDY}")
    if c["residual_before_ln"] not in (True, False):
        raise ValueError(f"{where}: residual_before_ln {c['residual_before_ln']!r} is not supported: GPT-2 blocks pass "
                         "no layer norm to their adapters, so the adapters library itself fails on it (post_add); "
                         "train with residual_before_ln true or false")
    act = str(c.get("non_linearity")).lower()
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: non_linearity {c.get('non_linearity')!r} is not supported (supported: "
                         f"{', '.join(ACTIVATIONS)}); train the adapter with one of these")
    scaling = c["scaling"]
    if not (isinstance(scaling, (int, float)) and not isinstance(scaling, bool) or scaling in ("learned", "channel")):
        raise ValueError(f"{where}: scaling {scaling!r} is not a number, 'learned' or 'channel'")
    return {**c, "non_linearity": act}


def _collect(name: str, c: dict, tensors: dict[str, np.ndarray], where: str, n_layer: int, n_embd: int) -> Bottleneck:
    """Sites from tensors named h.N.{attention,output}_adapters.adapters.NAME.*, checked against the config."""
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = KEY.fullmatch(key)
        if not m or m[3] != name:
            raise ValueError(f"{where}: unexpected tensor {key} in bottleneck adapter {name!r}; {REMEDY}")
        parts.setdefault((int(m[1]), LOCATIONS[m[2]]), {})[m[4]] = arr
    left_out = {int(i) for i in c["leave_out"]}
    want = {(i, loc) for i in range(n_layer) if i not in left_out for loc in ("mh_adapter", "output_adapter") if c[loc]}
    if set(parts) != want:
        raise ValueError(f"{where}: the adapter's tensors are at {sorted(parts)} but its config (mh_adapter, "
                         f"output_adapter, leave_out) and this {n_layer}-layer model imply {sorted(want)}; was it "
                         "trained on another base model?")
    down_key = "adapter_down.1.weight" if c["ln_before"] else "adapter_down.0.weight"
    sites = {}
    for site, p in sorted(parts.items()):
        try:
            wd, bd, wu, bu = (p.pop(k) for k in (down_key, down_key[:-6] + "bias", "adapter_up.weight",
                                                  "adapter_up.bias"))
            ln_before = (p.pop("adapter_down.0.weight"), p.pop("adapter_down.0.bias")) if c["ln_before"] else None
            for k in ("adapter_norm_before.weight", "adapter_norm_before.bias"):  # the same module, a second name
                p.pop(k, None)
            ln_after = (p.pop("adapter_norm_after.weight"), p.pop("adapter_norm_after.bias")) if c["ln_after"] else None
            scaling = p.pop("scaling") if c["scaling"] in ("learned", "channel") else np.float32(c["scaling"])
        except KeyError as e:
            raise ValueError(f"{where}: layer {site[0]} {site[1]} lacks the tensor {e.args[0]}") from None
        d = wd.shape[0]
        if p or wd.shape != (d, n_embd) or bd.shape != (d,) or wu.shape != (n_embd, d) or bu.shape != (n_embd,) \
                or np.shape(scaling) not in ((), (1,), (n_embd,)):
            raise ValueError(f"{where}: layer {site[0]} {site[1]} has tensors {sorted(p) or ''} down {wd.shape}, up "
                             f"{wu.shape} that do not fit n_embd {n_embd}; was it trained on another base model?")
        s = np.asarray(scaling, np.float32).reshape(-1)  # (1,) or (E,): scales up's output channels
        sites[site] = Site(wd.T.copy(), bd, (wu.T * s).astype(np.float32), (bu * s).astype(np.float32),
                           ln_before, ln_after)
    return Bottleneck(name, c, sites)


def emit(b, site: Site, c: dict, *, prefix: str, proj: str, bias: np.ndarray, resid: str, ln: tuple[str, str],
         eps: float, name: str, np_dtype) -> tuple[str, str]:
    """The adapter at one site and the LayerNormalization after it; returns (normalized, new residual stream).

    proj: the sub-layer's output without its bias `bias` (float32); resid: the block's residual r; ln: the
    following LayerNormalization's (weight, bias). Sums are kept as terms plus a constant until a tensor is
    needed: constants fold into the down-projection's bias and the final SkipLayerNormalization's bias, a sum
    of terms is made once (seq_bn's h + r feeds the down-projection and is the skip), and the last addition
    is the SkipLayerNormalization's: 5 extra nodes per site for a plain seq_bn or double_seq_bn.
    """
    from gpt2_onnx.export.graph import MS

    consts = iter(range(1 << 30))
    sums: dict[tuple[str, ...], str] = {}

    def W(n: str, arr) -> str:
        return b.weight(f"{prefix}.{n}", np.asarray(arr).astype(np_dtype))

    def tensor(terms: tuple[str, ...]) -> str:
        """The sum of terms, each partial sum made once."""
        if terms not in sums:
            sums[terms] = terms[0] if len(terms) == 1 else \
                b.op("Add", [tensor(terms[:-1]), terms[-1]], name=f"{prefix}/add{len(sums)}")[0]
        return sums[terms]

    def value(v: Sum) -> str:
        """A Sum as one tensor."""
        t, k = tensor(v.terms), next(consts)
        return t if v.const is None else b.op("Add", [t, W(f"const{k}", v.const)], name=f"{prefix}/const{k}")[0]

    def norm(v: Sum, params, n: str) -> Sum:
        return Sum((b.op("LayerNormalization", [value(v), W(f"{n}.weight", params[0]), W(f"{n}.bias", params[1])],
                         name=f"{prefix}/{n}", axis=-1, epsilon=LN_EPS)[0],))

    h, r = Sum((proj,), bias), Sum((resid,))  # the sub-layer's output and the residual, as the library sees them
    parallel = c["is_parallel"]
    if parallel:
        x = r
    else:
        x = h + r if c["original_ln_before"] else h
        res = h if c["residual_before_ln"] else x
    a = norm(x, site.ln_before, "ln_before") if site.ln_before else x
    down = b.op("MatMul", [tensor(a.terms), W("down.weight", site.down)], name=f"{prefix}/down")[0]  # (B, S, d)
    down_bias = site.down_bias + (a.const @ site.down if a.const is not None else 0)  # (t + k) @ Wd = t @ Wd + k @ Wd
    act = _activation(b, down, W("down.bias", down_bias), c["non_linearity"], f"{prefix}/act", W)
    up = Sum((b.op("MatMul", [act, W("up.weight", site.up)], name=f"{prefix}/up")[0],), site.up_bias)  # (B, S, E)
    if site.ln_after:
        out = norm(up + res if not parallel and c["adapter_residual_before_ln"] else up, site.ln_after, "ln_after")
        up = out if parallel or c["adapter_residual_before_ln"] else out + res
    elif not parallel:
        up = up + res
    y = up + h if parallel else up
    y = y + r if c["original_ln_after"] else y
    if len(y.terms) == 1:  # the adapter's output alone is the new residual stream
        stream = value(y)
        return b.op("LayerNormalization", [stream, *ln], name=name, axis=-1, epsilon=eps)[0], stream
    inputs = [y.terms[0], tensor(y.terms[1:]), *ln] + ([W("out.bias", y.const)] if y.const is not None else [])
    x, _, _, stream = b.op("SkipLayerNormalization", inputs, n_out=4, domain=MS, name=name, epsilon=eps)
    return x, stream


@dataclass(frozen=True)
class Sum:
    """terms[0] + terms[1] + ... + const: graph tensors and a constant vector not yet added."""

    terms: tuple[str, ...]
    const: np.ndarray | None = None

    def __add__(self, other: "Sum") -> "Sum":
        const = other.const if self.const is None else self.const if other.const is None else self.const + other.const
        return Sum(self.terms + other.terms, const)


def _activation(b, x: str, bias: str, act: str, name: str, W) -> str:
    """act(x + bias) as the library's Activation_Function_Class computes it (transformers' ACT2FN)."""
    from gpt2_onnx.export.graph import MS

    if act in TANH_GELU:
        return b.op("FastGelu", [x, bias], domain=MS, name=name)[0]
    if act in ("gelu", "gelu_python", "gelu_10"):  # erf GELU
        y = b.op("BiasGelu", [x, bias], domain=MS, name=name)[0]
        return b.op("Clip", [y, W("minus_10", -10.0), W("plus_10", 10.0)], name=f"{name}/clip")[0] \
            if act == "gelu_10" else y
    x = b.op("Add", [x, bias], name=f"{name}/bias")[0]
    if act in ("silu", "swish", "quick_gelu"):  # x * sigmoid(alpha x)
        return b.op("QuickGelu", [x], domain=MS, name=name, alpha=1.702 if act == "quick_gelu" else 1.0)[0]
    if act in ("leakyrelu", "leaky_relu"):
        return b.op("LeakyRelu", [x], name=name, alpha=0.01)[0]
    if act == "relu6":
        return b.op("Clip", [x, W("zero", 0.0), W("six", 6.0)], name=name)[0]
    if act == "relu2":
        r = b.op("Relu", [x], name=name)[0]
        return b.op("Mul", [r, r], name=f"{name}/square")[0]
    if act == "mish":  # x * tanh(softplus(x))
        t = b.op("Tanh", [b.op("Softplus", [x], name=f"{name}/softplus")[0]], name=f"{name}/tanh")[0]
        return b.op("Mul", [x, t], name=name)[0]
    if act == "linear":
        return x
    return b.op({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}[act], [x], name=name)[0]
