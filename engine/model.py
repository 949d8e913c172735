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

    def __init__(self, folder: str | Path, cfg: C.ModelConfig, *, provider: str = "auto", threads: int | None = None,
                 cuda_graph: bool = False):
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
        # Without this the CPU arena kept ~26 KB per decode step (124M shape: +12.9 MB over 500 steps,
        # 0.55 MB without it, same tok/s within noise): resident memory must stay flat.
        opts.enable_cpu_mem_arena = self.provider != "cpu"
        if cuda_graph and self.provider != "cuda":
            raise ValueError("cuda_graph=True needs provider='cuda'")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=[PROVIDERS[self.provider]])
            # decode steps replay one captured CUDA graph; it needs its own session (static shapes only)
            self.step_session = (ort.InferenceSession(str(path), opts, providers=[
                (PROVIDERS["cuda"], {"enable_cuda_graph": "1"})]) if cuda_graph else self.session)
        except Exception as e:
            raise ValueError(f"onnxruntime could not load {path}: {str(e).strip()[:500]}; re-export the model") from e
        self.cuda_graph = cuda_graph
        self._graph_ids = 0
        got = self.session.get_providers()
        if PROVIDERS[self.provider] not in got:
            raise ValueError(f"session for {path} runs on {got}, not {PROVIDERS[self.provider]}")
        self.kv_names = list(zip(cfg.past_names(), cfg.present_names()))  # (past, present) per KV buffer
        want = [C.INPUT_IDS, C.POSITION_IDS, C.SEQLENS_K, C.TOTAL_SEQUENCE_LENGTH, C.LOGITS_INDEX,
                C.LOGITS_ROWS] + cfg.past_names()
        have = [i.name for i in self.session.get_inputs()]
        if sorted(have) != sorted(want):
            raise ValueError(f"{path} inputs {have} do not match its manifest (expected {want}); re-export the model")

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty KV cache on this model's device."""
        return KVCache(self.cfg, batch_size, max_length, device=self.device)

    def forward(self, input_ids: np.ndarray, n_new: np.ndarray, cache: KVCache,
                logits_index: np.ndarray) -> np.ndarray:
        """Run tokens through the model, appending their KV to `cache`; returns logits (B, K, V).

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
        io.bind_cpu_input(C.LOGITS_ROWS, np.arange(B, dtype=np.int64))
        logits = np.empty((B, logits_index.shape[1], self.cfg.vocab_size), dtype=np.float32)
        io.bind_output(C.LOGITS, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        io.bind_output(C.NEXT_TOKEN, "cpu")
        for (name_in, name_out), value in zip(self.kv_names, cache.values):
            io.bind_ortvalue_input(name_in, value)
            io.bind_ortvalue_output(name_out, value)  # in place: present is the same buffer
        self.session.run_with_iobinding(io)
        cache.lengths = total
        return logits


class DecodeStep:
    """Decode steps over one KV cache with every input and output bound once to fixed buffers.

    A step only writes the new token ids and lengths into those buffers (device-resident on CUDA),
    runs, and reads back the greedy ids (B int64), plus the logits only when sampling needs them.
    `total_sequence_length` stays at the buffer length: GroupQueryAttention then reads each row's
    length from `seqlens_k` alone, so the shapes never change and, with cuda_graph, onnxruntime
    captures the step once and replays it.
    """

    def __init__(self, model: Model, cache: KVCache):
        self.model, self.cache = model, cache
        B, dev, cfg = cache.batch_size, model.device, model.cfg
        if cache.max_length < 2:
            raise ValueError("a decode step needs a KV buffer of at least 2 positions")

        def buf(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, dev, 0)

        self.ids, self.pos, self.seqlens = buf((B, 1), np.int64), buf((B, 1), np.int64), buf((B,), np.int32)
        self.next, self.logits = buf((B, 1), np.int64), buf((B, 1, cfg.vocab_size), np.float32)
        index = ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1), np.int64), dev, 0)
        rows = ort.OrtValue.ortvalue_from_numpy(np.arange(B, dtype=np.int64), dev, 0)
        total = ort.OrtValue.ortvalue_from_numpy(np.array(cache.max_length, np.int32))  # a CPU input of GQA
        io = model.step_session.io_binding()
        io.bind_ortvalue_output(C.NEXT_TOKEN, self.next)
        io.bind_ortvalue_output(C.LOGITS, self.logits)
        for name, v in [(C.INPUT_IDS, self.ids), (C.POSITION_IDS, self.pos), (C.SEQLENS_K, self.seqlens),
                        (C.LOGITS_INDEX, index), (C.LOGITS_ROWS, rows), (C.TOTAL_SEQUENCE_LENGTH, total)]:
            io.bind_ortvalue_input(name, v)
        for (name_in, name_out), value in zip(model.kv_names, cache.values):
            io.bind_ortvalue_input(name_in, value)
            io.bind_ortvalue_output(name_out, value)  # in place
        self.io = io
        self.run_options = ort.RunOptions()
        if model.cuda_graph:  # one captured graph per set of buffers
            model._graph_ids += 1
            self.run_options.add_run_config_entry("gpu_graph_id", str(model._graph_ids))

    def __call__(self, tokens: np.ndarray, *, logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Feed one token per row (B,); returns (greedy next ids (B,), logits (B, V) or None)."""
        lengths = self.cache.lengths
        if int(lengths.max()) + 1 > self.cache.max_length:
            raise ValueError(f"{int(lengths.max()) + 1} tokens do not fit the KV cache of {self.cache.max_length}")
        self.ids.update_inplace(np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1, 1))
        self.pos.update_inplace(np.minimum(lengths, self.model.cfg.n_positions - 1).reshape(-1, 1))
        self.seqlens.update_inplace(lengths.astype(np.int32))  # total after this step - 1
        self.model.step_session.run_with_iobinding(self.io, self.run_options)
        self.cache.lengths = lengths + 1
        return self.next.numpy()[:, 0], self.logits.numpy()[:, 0] if logits else None
