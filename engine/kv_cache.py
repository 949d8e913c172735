"""The KV cache: preallocated max-length buffers per layer, owned by the generation loop."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from engine.config import ModelConfig


class KVCache:
    """Keys and values for every layer, shape (B, n_head, max_length, head_size), plus row lengths.

    The model writes new entries in place (past and present are bound to the same buffer), so a
    decode step copies nothing that grows with the context.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_length: int, *, device: str = "cpu",
                 arrays: list[np.ndarray] | None = None):
        if not 0 < max_length <= cfg.n_positions:
            raise ValueError(f"KV cache max_length {max_length} must be in 1..n_positions ({cfg.n_positions})")
        self.cfg = cfg
        self.device = device
        self.max_length = max_length
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # tokens stored per row
        self.shape = (batch_size, cfg.n_head, max_length, cfg.kv_head_size)  # (B, nh, T, hs)
        self.dtype = cfg.np_dtype
        if arrays is None:
            arrays = [np.zeros(self.shape, self.dtype) for _ in range(2 * cfg.n_layer)]
        if device == "cpu":
            self._host = arrays
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the numpy memory
        else:
            self._host = None
            self.values = [ort.OrtValue.ortvalue_from_numpy(a, device, 0) for a in arrays]

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def host_arrays(self) -> list[np.ndarray]:
        """The buffers as numpy arrays, in past-name order (views on CPU, copies from a device)."""
        return self._host if self._host is not None else [v.numpy() for v in self.values]

    def gather(self, rows, *, max_length: int | None = None) -> "KVCache":
        """A new cache holding `rows` of this one (repeats allowed), optionally with another buffer length."""
        rows = np.asarray(rows, dtype=np.int64)
        length = max_length or self.max_length
        keep = min(int(self.lengths[rows].max(initial=0)), length)
        arrays = []
        for src in self.host_arrays():
            dst = np.zeros((len(rows), self.cfg.n_head, length, self.cfg.kv_head_size), self.dtype)
            dst[:, :, :keep] = src[rows, :, :keep]
            arrays.append(dst)
        new = KVCache(self.cfg, len(rows), length, device=self.device, arrays=arrays)
        new.lengths[:] = np.minimum(self.lengths[rows], length)
        return new
