"""Turn a model spec (exported folder, HF folder, Hub id) into an exported folder, caching exports."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from gpt2_onnx import config as C
from gpt2_onnx.config import cache_root
from gpt2_onnx.export import EXPORTER_VERSION

Progress = Callable[[str], None]


def _files(folder: Path) -> list[str]:
    """name:size:mtime of every file in a folder: a changed checkpoint or adapter gets a fresh export."""
    parts = [str(folder.resolve())]
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return parts


def _fingerprint(spec: str, dtype: str, quantize: str | None, adapter: str | None = None) -> str:
    path = Path(spec).expanduser()
    parts = [EXPORTER_VERSION, dtype, str(quantize)]
    parts += _files(path) if path.is_dir() else [spec]
    if adapter is not None:
        parts += ["adapter", *_files(Path(adapter).expanduser())]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def resolve_model(spec: str, *, dtype: str = "float32", quantize: str | None = None, adapter: str | None = None,
                  progress: Progress | None = None) -> Path:
    """An exported folder as is; a checkpoint (HF folder or Hub id), with an optional PEFT adapter folder
    (LoRA, IA3) merged in, exported once into the cache."""
    path = Path(spec).expanduser()
    if adapter is not None and not Path(adapter).expanduser().is_dir():
        raise ValueError(f"adapter {adapter}: no such folder; pass the folder PeftModel.save_pretrained wrote")
    if (path / C.MANIFEST_NAME).is_file():
        if adapter is not None:
            raise ValueError(f"{spec} is already exported; an adapter is merged at export: pass the base "
                             "checkpoint with the adapter instead")
        return path
    name = Path(spec).name or "model"
    if adapter is not None:
        name += "+" + (Path(adapter).expanduser().resolve().name or "adapter")
    out = cache_root() / f"{name}-{_fingerprint(spec, dtype, quantize, adapter)}"
    if (out / C.MANIFEST_NAME).is_file():
        return out
    from gpt2_onnx.export.exporter import export_model  # onnx and the rest, only to export

    return export_model(spec, out, dtype=dtype, quantize=quantize, adapter=adapter, progress=progress)
