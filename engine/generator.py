"""The explicit decode loop, in the onnxruntime-genai style: a thin client of the one generation core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpt2_onnx.core import Core
from gpt2_onnx.sequence import workers
from gpt2_onnx.types import GenerationOptions, Lora, Prefix, Step

if TYPE_CHECKING:
    from gpt2_onnx.sync_engine import Engine, Prompt


class Generator:
    """Several prompts (and n samples each) decoding together::

        gen = Generator(engine, ["ROMEO:", [464, 2068]], GenerationOptions(max_new_tokens=20))
        while not gen.is_done():
            for step in gen.generate_next_token():
                print(step.row, step.token_id, step.text)

    Each call runs one step of the core (the same step AsyncEngine and the server run): the first one
    prefills every prompt, the next ones decode one token per unfinished sequence. A failing sequence
    raises its error.
    """

    def __init__(self, engine: Engine, prompts: Sequence[Prompt], options: GenerationOptions = GenerationOptions(),
                 *, prefix: Prefix | None = None, adapter: Lora | None = None):
        self.sequences = engine.sequences(prompts, options, prefix=prefix, adapter=adapter)
        longest = max(len(s.context) for s in self.sequences)
        self.core = Core(engine.model, slots=len(workers(self.sequences)),
                         max_length=longest + options.max_new_tokens)
        self.core.submit(self.sequences)

    def is_done(self) -> bool:
        return not self.core.busy

    def generate_next_token(self) -> list[Step]:
        """Run one step; returns a Step for every sequence that got a token (or finished)."""
        steps = self.core.step()
        for s in steps:
            if s.error is not None:
                raise s.error
        return steps
