"""Bundled checkpoints (Hugging Face format), shipped so that gpt2-onnx works offline."""

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "tiny-shakespeare"
DEFAULT_MODEL = str(BUNDLED)
