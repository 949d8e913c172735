"""KV buffers on the model's device: a pool of rows, each row one sequence's keys and values."""

from __future__ import annotations

import mmap

import numpy as np
import onnxruntime as ort

from gpt2_onnx.config import ModelConfig


def small_pages(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in anonymous memory kept off transparent huge pages (where the OS has them).

    A row uses a prefix of each head's (max_length, kv_head_size) block, so only the pages it writes
    should become resident. numpy advises huge pages for large arrays: a row's first write then faulted
    in whole 2 MB pages (124M shape, 64 rows of 1024: +4.6 GB resident and 12.7 s for the first 32-token
    prefill of every row, against +176 MB and 2.3 s on 4 KB pages; decode no slower).
    """
    count = int(np.prod(shape))
    if not hasattr(mmap, "MADV_NOHUGEPAGE") or count == 0:  # no transparent huge pages to keep off here
        return np.zeros(shape, dtype)
    buf = mmap.mmap(-1, count * np.dtype(dtype).itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # EINVAL: a kernel built without transparent huge pages, nothing to keep off
        pass
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


class KVCache:
    """Keys and values for every layer, each buffer (rows, n_head, max_length, kv_head_size), plus the
    number of tokens stored per row.

    The buffers live on the session's device (numpy memory on CPU, device memory on CUDA). The model
    binds views of consecutive rows by address and writes new entries in place (past and present are
    the same buffer), so neither a decode step nor a row joining or leaving moves the pool through host
    memory. Rows are copied between caches with `Model.copy_kv`.
    """

    def __init__(self, cfg: ModelConfig, rows: int, max_length: int, *, device: str = "cpu"):
        if not 0 < max_length <= cfg.n_positions:
            raise ValueError(f"KV cache max_length {max_length} must be in 1..n_positions ({cfg.n_positions})")
        if rows < 1:
            raise ValueError(f"a KV cache needs at least one row, got {rows}")
        self.cfg, self.device, self.max_length = cfg, device, max_length
        self.lengths = np.zeros(rows, dtype=np.int64)  # tokens stored per row
        self.shape = (rows, cfg.n_head, max_length, cfg.kv_head_size)  # (rows, nh, T, hs)
        self.dtype = cfg.np_dtype
        self.host_reads = 0  # copies of whole buffers to host memory (tests check that serving makes none)
        if device == "cpu":
            self._host = [small_pages(self.shape, self.dtype) for _ in range(2 * cfg.n_layer)]
            self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._host]  # shares the numpy memory
        else:  # positions past a row's length are never read, so device memory needs no clearing
            self._host = None
            self.values = [ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, device, 0)
                           for _ in range(2 * cfg.n_layer)]
        self._base = [v.data_ptr() for v in self.values]
        self.row_bytes = int(np.prod(self.shape[1:])) * np.dtype(self.dtype).itemsize

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.rows * len(self.values)

    def address(self, j: int, row: int) -> int:
        """Device address of `row` in buffer j (past-name order)."""
        return self._base[j] + row * self.row_bytes

    def write(self, arrays: list[np.ndarray], length: int) -> None:
        """Fill every row from host arrays of this cache's shape (once, e.g. an adapter's prefix)."""
        for j, a in enumerate(arrays):
            if a.shape != self.shape:
                raise ValueError(f"KV array {j} has shape {a.shape}, the cache {self.shape}")
            if self._host is not None:
                self._host[j][...] = a
            else:
                self.values[j].update_inplace(np.ascontiguousarray(a, dtype=self.dtype))
        self.lengths[:] = length

    def host_arrays(self) -> list[np.ndarray]:
        """The buffers as numpy arrays, in past-name order (views on CPU, copies from a device)."""
        self.host_reads += 1
        return self._host if self._host is not None else [v.numpy() for v in self.values]
