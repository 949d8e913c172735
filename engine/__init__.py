"""gpt2-onnx runtime: numpy + onnxruntime + tokenizers, nothing heavier."""

from engine.config import ModelConfig
from engine.core import GenerationOptions, Prefix, Step
from engine.engine import Engine, GenerationResult
from engine.generator import Generator
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams

__all__ = ["Engine", "GenerationOptions", "GenerationResult", "Generator", "KVCache", "ModelConfig", "Prefix",
           "SamplingParams", "Step"]
__version__ = "0.1.0"
