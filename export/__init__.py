"""Hugging Face GPT-2 checkpoint -> ONNX model folder (model.onnx, manifest.json, tokenizer.json)."""

from export.exporter import EXPORTER_VERSION, export_model

__all__ = ["export_model", "EXPORTER_VERSION"]
