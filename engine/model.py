"""The forward pass: one onnxruntime session over model.onnx, KV bound in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine import config as C
from engine.kv_cache import KVCache

LFS_MAGIC = b"version https://git-lfs"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_provider(provider: str) -> str:
    """'auto' | 'cpu' | 'cuda' -> a provider that is really available (no silent fallback)."""
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda', got {provider!r}")
    if PROVIDERS[provider] not in available:
        raise ValueError(
            f"provider {provider!r} asked for, but onnxruntime {ort.__version__} offers only {available}. "
            "For CUDA install the GPU build instead of the CPU one: "
            "pip uninstall -y onnxruntime && pip install 'gpt2-onnx[gpu]'"
        )
    return provider


def _check_file(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"{path} not found: the exported folder is incomplete; re-export with gpt2-onnx export")
    with open(path, "rb") as f:
        head = f.read(len(LFS_MAGIC))
    if head == LFS_MAGIC:
        raise ValueError(f"{path} is a Git LFS pointer, not the {what}: run `git lfs pull` or re-export")
    size = path.stat().st_size
    if expected and size != expected:
        raise ValueError(f"{path} has {size} bytes but the manifest says {expected}: the file is truncated "
                         "or was changed; copy it again or re-export")


class Model:
    """model.onnx in an onnxruntime session; `forward` runs one step and returns logits."""

    def __init__(self, folder: str | Path, cfg: C.ModelConfig, *, provider: str = "auto", threads: int | None = None):
        folder = Path(folder)
        self.cfg = cfg
        self.provider = resolve_provider(provider)
        self.device = "cuda" if self.provider == "cuda" else "cpu"
        path = folder / C.MODEL_NAME
        _check_file(path, cfg.onnx_bytes, "ONNX model")
        if cfg.external_data:
            _check_file(folder / cfg.external_data, cfg.external_data_bytes, "ONNX weights")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[PROVIDERS[self.provider]])
        except Exception as e:
            raise ValueError(f"onnxruntime could not load {path}: {str(e).strip()[:500]}; re-export the model") from e
        got = self.session.get_providers()
        if PROVIDERS[self.provider] not in got:
            raise ValueError(f"session for {path} runs on {got}, not {PROVIDERS[self.provider]}")
        self.kv_names = list(zip(cfg.past_names(), cfg.present_names()))  # (past, present) per KV buffer
        want = [C.INPUT_IDS, C.POSITION_IDS, C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH, C.LOGITS_INDEX] + cfg.past_names()
        have = [i.name for i in self.session.get_inputs()]
        if sorted(have) != sorted(want):
            raise ValueError(f"{path} inputs {have} do not match its manifest (expected {want}); re-export the model")

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache on this model's device."""
        return KVCache(self.cfg, batch_size, max_length, device=self.device)

    def forward(self, input_ids: np.ndarray, n_new: np.ndarray, cache: KVCache,
                logits_index: np.ndarray, *, argmax: bool = False) -> np.ndarray:
        """Run tokens through the model, appending their KV to `cache`; returns logits (B, K, V), or
        with argmax=True only the greedy next ids (B, K), so the logits never leave the device.

        input_ids (B, S) holds n_new[b] real tokens per row, right-padded. Either the cache is empty
        (a prefill of ragged rows), or S == 1 (a decode step), or B == 1 (a chunk after a prefix).
        logits_index (B, K) names the positions (0..S-1) whose logits are returned.
        """
        B, S = input_ids.shape
        past = cache.lengths
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} rows for a cache of {cache.batch_size}")
        if S > 1 and past.any() and B > 1:
            raise ValueError("a multi-token chunk after cached tokens needs a batch of one row")
        total = past + n_new
        if int(total.max()) > cache.max_length:
            raise ValueError(f"{int(total.max())} tokens do not fit the KV cache of {cache.max_length}")
        position_ids = np.minimum(past[:, None] + np.arange(S), self.cfg.n_positions - 1)  # (B, S)
        io = self.session.io_binding()
        io.bind_cpu_input(C.INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input(C.POSITION_IDS, np.ascontiguousarray(position_ids, dtype=np.int64))
        io.bind_cpu_input(C.SEQLENS_K, (total - 1).astype(np.int32))
        # first prompt (empty cache): GQA wants total == S; otherwise the longest row's total
        tsl = S if not past.any() else int(total.max())
        io.bind_cpu_input(C.TOTAL_SEQUENCE_LENGTH, np.array(tsl, dtype=np.int32))
        io.bind_cpu_input(C.LOGITS_INDEX, np.ascontiguousarray(logits_index, dtype=np.int64))
        if argmax:
            io.bind_output(C.NEXT_TOKEN, "cpu")
            io.bind_output(C.LOGITS, self.device)  # stays where it was computed
        else:
            logits = np.empty((B, logits_index.shape[1], self.cfg.vocab_size), dtype=np.float32)
            io.bind_output(C.LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            io.bind_output(C.NEXT_TOKEN, "cpu")
        for (name_in, name_out), value in zip(self.kv_names, cache.values):
            io.bind_ortvalue_input(name_in, value)
            io.bind_ortvalue_output(name_out, value)  # in place: present is the same buffer
        self.session.run_with_iobinding(io)
        cache.lengths = total
        return io.get_outputs()[0].numpy() if argmax else logits
