"""The decoding loop: prefill, then one token per step for every live row, KV cache owned here."""

from __future__ import annotations

import time

import numpy as np

from engine.kv_cache import KVCache
from engine.model import DecodeStep, Model
from engine.sampling import SamplingParams, choose, log_softmax


class Generator:
    """A batch of sequences decoding together, in the onnxruntime-genai style::

        gen = Generator(model, [[464, 2068], [464]], max_new_tokens=20)
        while not gen.is_done():
            for row, token in gen.generate_next_token(): ...

    Prompts are prefilled once; with ``n`` > 1 each prompt's KV is copied to n rows (one prefill
    for n samples). A prefix cache (batch of one) is reused as is and extended by the prompt.
    Rows that finish leave the batch, so they stop costing compute.
    """

    def __init__(self, model: Model, prompts: list[list[int]], *, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), eos_token_id: int | None = None,
                 n: int = 1, prefix: KVCache | None = None, prefix_logits: np.ndarray | None = None,
                 logprobs: bool = False):
        self.model = model
        self.prompts = prompts
        self.n = n
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.eos_token_id = eos_token_id
        self.prefix = prefix
        self.prefix_logits = prefix_logits
        rows = len(prompts) * n
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.finish_reason: list[str | None] = [None] * rows
        self.logprobs: list[list[float]] | None = [[] for _ in range(rows)] if logprobs else None
        if max_new_tokens == 0:
            self.finish_reason = ["length"] * rows
        seed = sampling.seed
        self.rngs = [np.random.default_rng(None if seed is None else [seed, r]) for r in range(rows)]
        self.cache: KVCache | None = None
        self.step: DecodeStep | None = None  # decode binding over self.cache
        self.alive: list[int] = []  # row ids, in cache-row order
        self.logits: np.ndarray | None = None  # (len(alive), V): the next token's logits
        self.next_ids: np.ndarray | None = None  # (len(alive),): greedy ids when logits stay on device
        # plain greedy needs no logits on the host: the graph's argmax output is enough
        self.argmax_only = sampling.greedy and sampling.repetition_penalty == 1.0 and not logprobs
        self.t_start = time.perf_counter()

    def is_done(self) -> bool:
        return all(r is not None for r in self.finish_reason)

    def stop(self, row: int, reason: str) -> None:
        """Finish a row from outside (a stop string was seen); it leaves the batch at the next step."""
        if self.finish_reason[row] is None:
            self.finish_reason[row] = reason

    def _prefill(self) -> None:
        pl = self.prefix.lengths[0] if self.prefix is not None else 0
        max_len = max(pl + len(p) for p in self.prompts) + self.max_new_tokens
        if self.prefix is not None:
            cache = self.prefix.gather([0], max_length=max_len)
            (prompt,) = self.prompts
            if prompt:
                logits = self.model.forward(np.array([prompt]), np.array([len(prompt)]), cache,
                                            np.array([[len(prompt) - 1]]))[:, 0]
            else:
                logits = self.prefix_logits[None]
        else:
            lens = np.array([len(p) for p in self.prompts])
            ids = np.zeros((len(self.prompts), lens.max()), dtype=np.int64)  # right-padded (B, S)
            for b, p in enumerate(self.prompts):
                ids[b, : len(p)] = p
            cache = self.model.new_cache(len(self.prompts), max_len)
            logits = self.model.forward(ids, lens, cache, (lens - 1)[:, None])[:, 0]  # (B, V)
        if self.n > 1:  # n samples per prompt share its prefill
            rows = np.repeat(np.arange(len(self.prompts)), self.n)
            cache, logits = cache.gather(rows), logits[rows]
        self.cache, self.logits = cache, logits
        self.alive = list(range(len(self.tokens)))

    def _decode(self) -> None:
        keep = [i for i, r in enumerate(self.alive) if self.finish_reason[r] is None]
        if len(keep) < len(self.alive):  # finished rows leave the batch
            self.cache = self.cache.gather(keep)
            self.alive = [self.alive[i] for i in keep]
            self.step = None
        if self.step is None:
            self.step = DecodeStep(self.model, self.cache)
        last = np.array([self.tokens[r][-1] for r in self.alive], dtype=np.int64)  # (B,)
        self.next_ids, self.logits = self.step(last, logits=not self.argmax_only)

    def generate_next_token(self) -> list[tuple[int, int]]:
        """Run one step; return (row, token id) for every row that got a token."""
        if self.is_done():
            return []
        if self.cache is None:
            self._prefill()
        else:
            self._decode()
        out = []
        pen = self.sampling.repetition_penalty != 1.0
        for i, r in enumerate(self.alive):
            if self.finish_reason[r] is not None:
                continue
            seen = np.array(self.prompts[r // self.n] + self.tokens[r], dtype=np.int64) if pen else None
            if self.argmax_only and self.next_ids is not None:  # the graph already took the argmax
                tok = int(self.next_ids[i])
            else:
                tok = choose(self.logits[i], self.sampling, self.rngs[r], seen)
            self.tokens[r].append(tok)
            if self.logprobs is not None:  # under the model's own distribution, before sampling filters
                self.logprobs[r].append(float(log_softmax(self.logits[i])[tok]))
            out.append((r, tok))
            if tok == self.eos_token_id:
                self.finish_reason[r] = "eos"
            elif len(self.tokens[r]) >= self.max_new_tokens:
                self.finish_reason[r] = "length"
        return out
