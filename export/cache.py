"""Turn a model spec (exported folder, HF folder, Hub id) into an exported folder, caching exports."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine import config as C
from export.exporter import EXPORTER_VERSION, Progress, export_model


def cache_root() -> Path:
    """$GPT2_ONNX_CACHE, else $XDG_CACHE_HOME/gpt2-onnx, else ~/.cache/gpt2-onnx."""
    if os.environ.get("GPT2_ONNX_CACHE"):
        return Path(os.environ["GPT2_ONNX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-onnx"


def _fingerprint(spec: str, dtype: str, quantize: str | None) -> str:
    path = Path(spec).expanduser()
    parts = [EXPORTER_VERSION, dtype, str(quantize)]
    if path.is_dir():
        parts.append(str(path.resolve()))
        for f in sorted(path.iterdir()):  # a changed checkpoint gets a fresh export
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    else:
        parts.append(spec)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def resolve_model(spec: str, *, dtype: str = "float32", quantize: str | None = None,
                  progress: Progress | None = None) -> Path:
    """An exported folder as is; a checkpoint (HF folder or Hub id) exported once into the cache."""
    path = Path(spec).expanduser()
    if (path / C.MANIFEST_NAME).is_file():
        return path
    name = Path(spec).name or "model"
    out = cache_root() / f"{name}-{_fingerprint(spec, dtype, quantize)}"
    if (out / C.MANIFEST_NAME).is_file():
        return out
    return export_model(spec, out, dtype=dtype, quantize=quantize, progress=progress)
