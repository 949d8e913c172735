"""The runtime's one way to the exporter: a model spec -> an exported folder, exported once into the cache.

A spec is None (the bundled model), an exported folder (used as is), a Hugging Face checkpoint
folder or a Hub id (`gpt2`, `distilgpt2`, ...). The exporter (onnx, safetensors, huggingface_hub)
is imported only when something must be exported, so loading an exported or cached model imports
numpy, onnxruntime and tokenizers alone.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from gpt2_onnx import config as C
from gpt2_onnx.errors import option_error

Progress = Callable[[str], None]


def bundled() -> Path:
    """The Tiny Shakespeare checkpoint shipped with the package."""
    from gpt2_onnx.models import BUNDLED

    return BUNDLED


def resolve(model: str | Path | None = None, *, dtype: str = "float32", quantize: str | None = None,
            adapter: str | Path | None = None, progress: Progress | None = None) -> Path:
    """An exported folder for `model`; checkpoints (with a PEFT LoRA/IA3 adapter merged, if given) are
    exported once into cache_root() and reused."""
    spec = str(bundled() if model is None else model)
    path = Path(spec).expanduser()
    C.check_readable(path)
    C.check_model_spec(spec)  # a mistyped local path fails here, before the exporter is imported
    if (path / C.MANIFEST_NAME).is_file():
        if dtype != "float32" or quantize or adapter:
            raise ValueError(f"{path} is already exported; dtype, quantize and adapter apply to checkpoints "
                             "(pass the Hugging Face folder or Hub id instead)")
        return path
    if (path / C.MODEL_NAME).is_file():  # an exported folder that lost its manifest: no checkpoint to export
        if path.resolve().parent == C.cache_root().expanduser().resolve():
            raise ValueError(f"the cached export {path} has no {C.MANIFEST_NAME}: it is incomplete or damaged; remove "
                             f"it with `gpt2-onnx cache clear {path.resolve().name}` and load its checkpoint again")
        C.ModelConfig.load(path)  # raises ValueError naming manifest.json
    from gpt2_onnx.export.cache import resolve_model  # the exporter, only now

    return resolve_model(spec, dtype=dtype, quantize=quantize, adapter=None if adapter is None else str(adapter),
                         progress=progress)


EXPORT_FORMATS = ("gpt2-onnx", "genai")


def export(model: str, out: str | Path, *, dtype: str = "float32", quantize: str | None = None,
           adapter: str | Path | None = None, lora_slots: int = 0, max_lora_rank: int | None = None,
           progress: Progress | None = None, format: str = "gpt2-onnx") -> Path:
    """Export a checkpoint (Hugging Face folder or Hub id, with a PEFT adapter merged) into the folder `out`:
    format "gpt2-onnx", this runtime's folder (lora_slots: LoRA adapters taken at run time); "genai", a
    folder for onnxruntime-genai (export.genai)."""
    if format not in EXPORT_FORMATS:
        raise option_error("format", f"must be gpt2-onnx or genai, got {format!r}")
    C.check_model_spec(str(model))  # before the exporter is imported
    if format == "genai":
        if lora_slots or max_lora_rank:
            raise option_error("lora_slots", "is for the gpt2-onnx format (onnxruntime-genai loads its own adapters); "
                                             "merge the adapter instead with --adapter")
        from gpt2_onnx.export.genai import export_genai  # the exporter, only now

        return export_genai(model, out, dtype=dtype, quantize=quantize, adapter=adapter, progress=progress)
    from gpt2_onnx.export.exporter import export_model  # the exporter, only now

    return export_model(model, out, dtype=dtype, quantize=quantize, adapter=adapter, lora_slots=lora_slots,
                        max_lora_rank=max_lora_rank, progress=progress)


def read_virtual_tokens(adapter: str | Path, cfg: C.ModelConfig) -> tuple[str, list]:
    """A peft prefix-tuning, prompt-tuning or P-tuning adapter's virtual tokens for the model `cfg`: ("kv", their
    KV) or ("embeds", [their input embeddings (1, T, n_embd)]) (see export.adapters.read_virtual_tokens)."""
    from gpt2_onnx.export.adapters import read_virtual_tokens as read  # safetensors, only now

    return read(adapter, cfg)


def read_lora_adapter(adapter: str | Path, cfg: C.ModelConfig) -> tuple[dict[str, list], int]:
    """A peft LoRA adapter as per-module, per-layer slot contents for the export `cfg` (see export.adapters)."""
    from gpt2_onnx.export.adapters import read_lora  # safetensors, only now

    return read_lora(adapter, cfg)


# A cache entry's name ends with the 16 hex digits of its fingerprint (export.cache); temp folders of exports
# (`.NAME.xxxxxxxx`) and lock files (`.NAME.lock`) never do.
ENTRY = re.compile(r".+-[0-9a-f]{16}")


def _is_entry(folder: Path) -> bool:
    """An export in the cache: a folder named as the cache names them (with or without its manifest: a damaged
    one is listed so that it can be cleared; a dot-named one made by older versions too), or any other folder
    with a manifest.json whose name is not a dot-name (a temp folder)."""
    if not folder.is_dir():
        return False
    return bool(ENTRY.fullmatch(folder.name)) or (not folder.name.startswith(".")
                                                  and (folder / C.MANIFEST_NAME).is_file())


def cache_entries() -> list[dict]:
    """The exports in the cache: name, folder, bytes, the manifest's source, dtype and quantization, and
    `problem`: None, or why the entry cannot be used (no manifest.json, or one that cannot be read)."""
    root, out = C.cache_root(), []
    try:
        folders = sorted(f for f in root.iterdir() if _is_entry(f)) if root.is_dir() else []
    except OSError as e:
        raise C.read_error(root, e) from e
    for folder in folders:
        problem = None
        try:
            m = json.loads((folder / C.MANIFEST_NAME).read_text())
            m = m if isinstance(m, dict) else {}
        except FileNotFoundError:
            m, problem = {}, f"incomplete: no {C.MANIFEST_NAME}"
        except (OSError, ValueError):
            m, problem = {}, f"damaged: {C.MANIFEST_NAME} cannot be read as JSON"
        try:
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        except OSError:
            size = 0
        out.append({"name": folder.name, "folder": str(folder), "bytes": size, "source": m.get("source", "?"),
                    "dtype": m.get("dtype", "?"), "quantization": m.get("quantization"), "problem": problem})
    return out


def _named(name: str | None) -> list[dict]:
    entries = cache_entries()
    if name is not None:
        entries = [e for e in entries if e["name"] == name]
        if not entries:
            raise ValueError(f"no export named {name!r} in {C.cache_root()}; see gpt2-onnx cache list")
    return entries


def clear_cache(name: str | None = None) -> list[str]:
    """Delete every export in the cache (damaged ones included), or the one called `name`, and the temp folders
    that killed exports left (an export under way keeps its own); returns the names deleted."""
    from gpt2_onnx.export.cache import clear_orphans  # no onnx: the cache's locks only

    entries = _named(name)
    for e in entries:
        try:
            shutil.rmtree(e["folder"])
        except OSError as err:
            raise ValueError(f"cannot delete {e['folder']} ({err.strerror}); the export cache "
                             f"{C.cache_root()} must be writable to clear it") from err
    clear_orphans(C.cache_root(), name)
    return [e["name"] for e in entries]


def verify_cache(name: str | None = None) -> list[tuple[str, str | None]]:
    """(name, None if its weights match the digest its manifest recorded, else what is wrong) for every export
    in the cache, or the one called `name`. Reads every weight once (onnx is imported to read the graph)."""
    entries = _named(name)
    if not entries:
        return []
    from gpt2_onnx.export.exporter import verify_export  # the graph's initializers: onnx, only now

    return [(e["name"], e["problem"] or verify_export(e["folder"])) for e in entries]
