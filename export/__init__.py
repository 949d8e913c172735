"""Hugging Face GPT-2 checkpoint -> ONNX model folder (model.onnx, manifest.json, tokenizer.json)."""

__all__ = ["export_model", "EXPORTER_VERSION"]


def __getattr__(name: str):
    """export_model / EXPORTER_VERSION on first use, so `export.checkpoint` alone does not import onnx."""
    if name in __all__:
        from export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
