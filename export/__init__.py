"""Hugging Face GPT-2 checkpoint -> ONNX model folder (model.onnx, kv_copy.onnx, embeds.onnx, manifest.json,
tokenizer.json)."""

EXPORTER_VERSION = "0.8.0"  # part of the export cache key: bump when exports change

__all__ = ["export_model", "EXPORTER_VERSION"]


def __getattr__(name: str):
    """export_model on first use, so `export.cache` and `export.checkpoint` alone do not import onnx."""
    if name == "export_model":
        from gpt2_onnx.export import exporter

        return exporter.export_model
    raise AttributeError(f"module 'gpt2_onnx.export' has no attribute {name!r}")
