"""gpt2-onnx runtime: numpy + onnxruntime + tokenizers, nothing heavier."""

from gpt2_onnx.config import ModelConfig
from gpt2_onnx.core import GenerationOptions, Prefix, Step
from gpt2_onnx.engine import Engine, GenerationResult
from gpt2_onnx.generator import Generator
from gpt2_onnx.kv_cache import KVCache
from gpt2_onnx.sampling import SamplingParams

__all__ = ["Engine", "GenerationOptions", "GenerationResult", "Generator", "KVCache", "ModelConfig", "Prefix",
           "SamplingParams", "Step"]
__version__ = "0.2.0"
