"""Read a Hugging Face GPT-2 checkpoint (Hub id or local folder) into numpy arrays."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]


@dataclass
class Checkpoint:
    """A GPT-2 checkpoint: its config.json, weights as float32 numpy arrays, and its folder."""

    folder: Path
    source: str
    config: dict
    name: str  # a Hub id as given, else the folder's name
    weights: dict[str, np.ndarray] = field(repr=False)


def resolve(model: str) -> tuple[Path, str]:
    """Return (local folder, source label) for a local HF folder or a Hub id (downloads it)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists():
        raise ValueError(f"{model} is a file; pass the checkpoint folder that holds config.json")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"{model}: no such folder (and it is not a Hugging Face Hub id like 'gpt2')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ValueError("huggingface_hub is needed to download from the Hub: pip install huggingface_hub") from e
    try:
        folder = Path(snapshot_download(model, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):  # old checkpoints only ship pytorch_model.bin
            folder = Path(snapshot_download(model, allow_patterns=HUB_FILES + ["pytorch_model.bin"]))
    except Exception as e:  # network, 404, auth: one clear message
        raise ValueError(
            f"could not download {model!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Check the name and your network, or pass a local checkpoint folder"
        ) from e
    return folder, model


def read_config(folder: Path) -> dict:
    """config.json of a GPT-2 checkpoint; other model types are refused."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: {folder} is not a Hugging Face checkpoint folder")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "gpt2":
        raise ValueError(
            f"{path}: model_type is {cfg.get('model_type')!r}, but gpt2-onnx exports only GPT-2 "
            "checkpoints (model_type 'gpt2': gpt2, distilgpt2, gpt2-medium/large/xl and fine-tunes)"
        )
    if cfg.get("add_cross_attention"):
        raise ValueError(f"{path}: add_cross_attention (encoder-decoder GPT-2) is not supported by gpt2-onnx")
    return cfg


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except Exception as e:
            raise ValueError(f"could not read {f} ({e}); is the download complete?") from e
    return out


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
            "Install torch (pip install torch) or convert the checkpoint to model.safetensors"
        ) from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def load(model: str) -> Checkpoint:
    """Load config and weights (float32, canonical names such as `h.0.attn.c_attn.weight`)."""
    folder, source = resolve(model)
    cfg = read_config(folder)
    st_files = sorted(folder.glob("*.safetensors"))
    if st_files:
        raw = _read_safetensors(st_files)
    elif (folder / "pytorch_model.bin").is_file():
        raw = _read_torch_bin(folder / "pytorch_model.bin")
    else:
        raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    weights = {}
    for k, v in raw.items():
        name = k.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints, not weights
        weights[name] = np.ascontiguousarray(v, dtype=np.float32)
    name = model if not Path(model).expanduser().is_dir() else folder.name
    return Checkpoint(folder=folder, source=source, config=cfg, name=name, weights=weights)
