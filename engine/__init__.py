"""gpt2-onnx runtime: numpy + onnxruntime + tokenizers, nothing heavier."""

from gpt2_onnx.async_engine import AsyncEngine, Request
from gpt2_onnx.config import ModelConfig
from gpt2_onnx.errors import Cancelled, ContextTooLong, InvalidInput, QueueFull, ShuttingDown
from gpt2_onnx.generator import Generator
from gpt2_onnx.kv_cache import KVCache  # noqa: F401  (importable as before; not part of the public surface)
from gpt2_onnx.sync_engine import Engine
from gpt2_onnx.types import GenerationOptions, GenerationResult, Lora, Prefix, Score, Step
from gpt2_onnx.vote import Vote

SamplingParams = GenerationOptions  # the earlier name of the sampling options, kept importable

__all__ = ["AsyncEngine", "Cancelled", "ContextTooLong", "Engine", "GenerationOptions", "GenerationResult",
           "Generator", "InvalidInput", "Lora", "ModelConfig", "Prefix", "QueueFull", "Request", "Score",
           "ShuttingDown", "Step", "Vote"]
__version__ = "0.2.0"
