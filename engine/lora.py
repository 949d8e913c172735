"""LoRA adapters at run time: the stacked adapter buffers an export with lora_slots takes as graph inputs."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from gpt2_onnx import config as C


class LoraStacks:
    """One buffer per LoRA graph input (config.LORA_A / LORA_B: each layer's and module's slots side by side) on
    the session's device, bound once per binding and written in place by `write`. Slot 0 stays zero (no
    adapter); a rank below max_lora_rank leaves zero columns of A and rows of B, so the product is exact."""

    def __init__(self, cfg: C.ModelConfig, device: str):
        self.cfg, self.device = cfg, device
        # held by a decode step (Core.step) and by load_lora / unload: a slot never changes under a running step
        self.lock = threading.RLock()
        self.host = {n: np.zeros(shape, cfg.np_dtype) for n, shape in cfg.lora_inputs().items()}
        # on the CPU the OrtValues share the numpy memory; elsewhere the host arrays are copied over at write
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) if device == "cpu" else
                       ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in self.host.items()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.host.values())

    def bind(self, io: ort.IOBinding, inputs: set[str] | None = None) -> None:
        """Bind every stack (or those among `inputs`, a graph's input names)."""
        for name, value in self.values.items():
            if inputs is None or name in inputs:
                io.bind_ortvalue_input(name, value)

    def write(self, slot: int, parts: dict[str, tuple]) -> None:
        """Put an adapter into `slot` ({GPT-2 prefix: (A (in, r), B (r, out), bias (out,) or None)}, as
        export.adapters.read_lora gives it); modules it does not target get zeros."""
        K1, R1 = self.cfg.lora_slots + 1, self.cfg.max_lora_rank + 1
        for i in range(self.cfg.n_layer):
            for m in C.LORA_MODULES:
                a, b, bias = parts.get(f"h.{i}.{m}", (None, None, None))
                A = self.host[C.LORA_A.format(i=i, m=m)].reshape(-1, K1, R1)[:, slot]  # (in, R + 1), a view
                B = self.host[C.LORA_B.format(i=i, m=m)].reshape(K1, R1, -1)[slot]  # (R + 1, out), a view
                A[...], B[...] = 0, 0
                if a is not None:
                    A[:, : a.shape[1]], B[: b.shape[0]] = a, b
                if bias is not None:
                    B[-1] = bias
        if self.device != "cpu":
            for name, value in self.values.items():
                value.update_inplace(self.host[name])
