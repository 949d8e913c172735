"""LoRA adapters at run time: the stacked adapter buffers an export with lora_slots takes as graph inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from gpt2_onnx import config as C


class LoraStacks:
    """One buffer per LoRA graph input (config.LORA_A / LORA_B / LORA_BIAS) on the session's device, bound
    once per binding and written in place by `write`; slot s of layer i is row i * (lora_slots + 1) + s.
    Slot 0 stays zero (no adapter); a rank below max_lora_rank leaves zero columns of A and rows of B, so
    x @ A @ B is exact."""

    def __init__(self, cfg: C.ModelConfig, device: str):
        self.cfg, self.device = cfg, device
        self.host = {n: np.zeros(shape, cfg.np_dtype) for n, shape in cfg.lora_inputs().items()}
        # on the CPU the OrtValues share the numpy memory; elsewhere the host arrays are copied over at write
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) if device == "cpu" else
                       ort.OrtValue.ortvalue_from_numpy(a, device, 0) for n, a in self.host.items()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.host.values())

    def bind(self, io: ort.IOBinding) -> None:
        for name, value in self.values.items():
            io.bind_ortvalue_input(name, value)

    def write(self, slot: int, parts: dict[str, tuple]) -> None:
        """Put an adapter into `slot` ({GPT-2 prefix: (A (in, r), B (r, out), bias (out,) or None)}, as
        export.adapters.read_lora gives it); modules it does not target get zeros. {} clears the slot."""
        K = self.cfg.lora_slots + 1
        for i in range(self.cfg.n_layer):
            for m in C.LORA_MODULES:
                a, b, bias = parts.get(f"h.{i}.{m}", (None, None, None))
                stacks = [self.host[t.format(m=m)][i * K + slot] for t in (C.LORA_A, C.LORA_B, C.LORA_BIAS)]
                for stack in stacks:  # (in, R), (R, out), (1, out)
                    stack[...] = 0
                if a is not None:
                    stacks[0][:, : a.shape[1]] = a
                    stacks[1][: b.shape[0]] = b
                if bias is not None:
                    stacks[2][0] = bias
        if self.device != "cpu":
            for name, value in self.values.items():
                value.update_inplace(self.host[name])
