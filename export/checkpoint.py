"""Read a Hugging Face GPT-2 checkpoint (Hub id or local folder) into numpy arrays."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2_onnx import config as C

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json",
             "special_tokens_map.json", "chat_template.jinja"]


@dataclass
class Checkpoint:
    """A GPT-2 checkpoint: its config.json, weights as float32 numpy arrays, and its folder."""

    folder: Path
    source: str
    config: dict
    name: str  # a Hub id as given, else the folder's name
    weights: dict[str, np.ndarray] = field(repr=False)
    bottleneck: object = None  # an export.bottleneck.Bottleneck adapter, run as graph nodes, if any


def resolve(model: str) -> tuple[Path, str]:
    """Return (local folder, source label) for a local HF folder or a Hub id (downloads it)."""
    path = Path(model).expanduser()
    C.check_readable(path)
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise ValueError(f"{model} is a file; pass the checkpoint folder that holds config.json")
    C.check_model_spec(model)  # a path that does not exist and is no Hub id is never sent to the Hub
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ValueError("huggingface_hub is needed to download from the Hub: pip install huggingface_hub") from e
    try:
        folder = Path(snapshot_download(model, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # old checkpoints only ship pytorch_model.bin
            folder = Path(snapshot_download(model, allow_patterns=HUB_FILES + ["pytorch_model*.bin",
                                                                               "pytorch_model.bin.index.json"]))
    except Exception as e:  # network, 404, auth: one clear message
        raise ValueError(
            f"could not download {model!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Check the name and your network, or pass a local checkpoint folder"
        ) from e
    return folder, model


# GPT2Config.attribute_map: config.json may use these names; transformers reads them as the GPT-2
# names, and an alias wins over the GPT-2 name when a file has both.
ATTRIBUTE_MAP = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                 "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")  # classes whose weights are a GPT-2 language model
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DataParallel/DDP
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of old checkpoints, not weights


def read_json_object(path: Path, hint: str = "") -> dict:
    """The JSON object in path; a ValueError naming the file (and hint) if it cannot be read or is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise C.read_error(path, e) from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}){hint}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object{hint}")
    return data


def read_config(folder: Path) -> dict:
    """config.json of a GPT-2 checkpoint, aliases resolved to GPT-2 names; other model types are refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: {folder} is not a Hugging Face checkpoint folder")
    cfg = read_json_object(path, "; download the checkpoint's config.json again")
    model_type = cfg.get("model_type")
    if model_type is None and any(a in GPT2_ARCHITECTURES for a in cfg.get("architectures") or []):
        model_type = "gpt2"  # older configs name only the class
    if model_type != "gpt2":
        raise ValueError(
            f"{path}: model_type is {cfg.get('model_type')!r}, but gpt2-onnx exports only GPT-2 "
            "checkpoints (model_type 'gpt2' or architectures ['GPT2LMHeadModel']: gpt2, distilgpt2, "
            "gpt2-medium/large/xl and fine-tunes)"
        )
    for alias, name in ATTRIBUTE_MAP.items():
        if alias in cfg:
            cfg[name] = cfg.pop(alias)
    if cfg.get("add_cross_attention"):
        raise ValueError(f"{path}: add_cross_attention (encoder-decoder GPT-2) is not supported by gpt2-onnx")
    return cfg


# safetensors dtype -> numpy dtype; BF16 is read as its raw 16 bits and widened exactly (see _bf16_to_f32)
ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
             "I8": "i1", "U8": "u1", "BOOL": "?"}


def check_not_lfs_pointer(path: Path, what: str) -> None:
    """A Git LFS pointer in place of a checkpoint file (a clone without git lfs) is named as such."""
    if C.is_lfs_pointer(path):
        raise ValueError(f"{path} is a Git LFS pointer, not the {what}: run `git lfs pull` in the checkpoint's "
                         "repository (or download the checkpoint again)")


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shifting its bits up is exact (no ml_dtypes needed)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as numpy (BF16 widened to float32), read with numpy alone.

    The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data; reading it here keeps bf16 working without any numpy bfloat16 type.
    """
    check_not_lfs_pointer(path, "weights")
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            base, size = 8 + n, path.stat().st_size
            out = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"tensor {name} has dtype {info['dtype']}, which gpt2-onnx does not read")
                dt = np.dtype(ST_DTYPES[info["dtype"]])
                begin, end = info["data_offsets"]
                count = int(np.prod(info["shape"], dtype=np.int64))
                if end - begin != count * dt.itemsize or base + end > size:
                    raise ValueError(f"tensor {name} runs past the end of the file or has the wrong size")
                f.seek(base + begin)
                arr = np.fromfile(f, dtype=dt, count=count).reshape(info["shape"])
                out[name] = _bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
            return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:  # JSON errors too
        raise ValueError(f"could not read {path} ({e}); is the download complete?") from e


def read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch pickle (state dict) as numpy, floats as float32; needs torch, imported here only."""
    check_not_lfs_pointer(path, "weights")
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
            "Install torch (pip install torch) or convert the checkpoint to model.safetensors"
        ) from e
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read {path} ({type(e).__name__}: {e}); is the download complete?") from e
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _read_sharded(folder: Path, index: Path, reader) -> dict[str, np.ndarray]:
    """The shards a *.index.json names (weight_map: tensor -> file), checked to hold every tensor it lists."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{index} is not a valid index of shards (expected a weight_map): {e}") from e
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{index} names shards that are not in {folder}: {missing}; is the download complete?")
    raw: dict[str, np.ndarray] = {}
    for f in files:
        raw |= reader(folder / f)
    absent = sorted(set(weight_map) - set(raw))
    if absent:
        raise ValueError(f"{index} lists tensors that no shard holds: {absent[:5]}; is the download complete?")
    return raw


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """The raw state dict, from the files transformers would load, in its order of preference."""
    for name, reader in [("model.safetensors", read_safetensors), ("model.safetensors.index.json", read_safetensors),
                         ("pytorch_model.bin", read_torch_bin), ("pytorch_model.bin.index.json", read_torch_bin)]:
        path = folder / name
        if path.is_file():
            return _read_sharded(folder, path, reader) if name.endswith(".index.json") else reader(path)
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin (nor their sharded "
                     "*.index.json forms); is this the checkpoint folder?")


def canonical(key: str) -> str:
    """A state-dict key as a GPT-2 name (`h.0.attn.c_attn.weight`): wrapper prefixes and `transformer.` dropped."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.removeprefix("transformer.")


def canonical_names(raw: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The state dict under GPT-2 names, without the causal-mask buffers."""
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = canonical(key)
        if BUFFER.fullmatch(name):
            continue
        if name in out:
            raise ValueError(f"{where}: two tensors map to the weight {name} (one of them is {key})")
        out[name] = value
    return out


def load(model: str) -> Checkpoint:
    """Load config and weights (float32, canonical names such as `h.0.attn.c_attn.weight`)."""
    folder, source = resolve(model)
    cfg = read_config(folder)
    weights = {k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in canonical_names(read_weights(folder), str(folder)).items()}
    name = model if not Path(model).expanduser().is_dir() else folder.name
    return Checkpoint(folder=folder, source=source, config=cfg, name=name, weights=weights)
