"""The public surface: Engine.load, engine.generate / stream / generate_batch / prefill."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import config as C
from engine.generator import Generator
from engine.kv_cache import KVCache
from engine.model import Model
from engine.sampling import SamplingParams
from engine.tokenizer import TextStream, Tokenizer

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Step:
    """One generated token of one row, with the text it completes (valid UTF-8, maybe '')."""

    row: int
    index: int  # 0-based position among the row's new tokens
    token_id: int
    text: str
    finish_reason: str | None  # set on the row's last step: "length" | "eos" | "stop"
    time: float  # seconds since the call started
    logprob: float | None = None  # log p(token) under the model, when logprobs=True


@dataclass(frozen=True)
class GenerationResult:
    """What generate returns for one sequence."""

    text: str
    token_ids: list[int]  # new tokens (an eos that ended the row is included, its text is not)
    prompt_tokens: int
    finish_reason: str
    time_to_first_token: float  # seconds, prefill included
    decode_tokens_per_s: float  # tokens after the first / time after the first
    logprobs: list[float] | None = None  # per new token, when logprobs=True


@dataclass(frozen=True)
class Prefix:
    """A prompt prefix computed once by `Engine.prefill`, reusable by many generate calls."""

    token_ids: tuple[int, ...]
    cache: KVCache
    last_logits: np.ndarray  # (V,) logits after the prefix's last token


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    """Normalize the stop option to a list of strings (ValueError otherwise)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    return stops


class _StopText:
    """Holds back text that could be the start of a stop string; cuts at the first stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.buf += delta
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class RowText:
    """One sequence's text side: whole UTF-8 characters only, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], stops: Sequence[str]):
        self.stream = TextStream(tokenizer, list(context)[-5:])
        self.stop = _StopText(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text completed by this token, and whether a stop string was hit (the row must end)."""
        return self.stop.push(self.stream.push(token_id))

    def finish(self) -> str:
        """Text still held back when the row ends by eos or length."""
        return self.stop.push(self.stream.flush())[0] + self.stop.flush()


class Engine:
    """An exported GPT-2 folder loaded for generation. Create with `Engine.load(path)`."""

    def __init__(self, folder: Path, cfg: C.ModelConfig, model: Model, tokenizer: Tokenizer):
        self.folder, self.config, self.model, self.tokenizer = folder, cfg, model, tokenizer

    @classmethod
    def load(cls, path: str | Path, *, provider: str = "auto", threads: int | None = None,
             cuda_graph: bool = False) -> "Engine":
        """Load an exported folder (manifest.json, model.onnx, tokenizer.json); validates all three.

        cuda_graph=True (CUDA only) replays decode steps as captured CUDA graphs.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder; pass a folder written by gpt2-onnx export")
        cfg = C.ModelConfig.load(folder)
        model = Model(folder, cfg, provider=provider, threads=threads, cuda_graph=cuda_graph)
        return cls(folder, cfg, model, Tokenizer(folder / C.TOKENIZER_NAME))

    @property
    def provider(self) -> str:
        return self.model.provider

    # ---- input validation -------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Prompt text or ids -> validated ids; an empty prompt starts from <|endoftext|> (as HF does)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (bytes, dict)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise ValueError(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}")
        else:
            ids = list(prompt)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise ValueError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
            bad = [int(t) for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            ids = [int(t) for t in ids]
        return ids or [self.config.bos_token_id]

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if n_prompt + max_new_tokens > self.config.n_positions:
            raise ValueError(
                f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} = {n_prompt + max_new_tokens} "
                f"exceeds the model's context of n_positions {self.config.n_positions} tokens; "
                "shorten the prompt or lower max_new_tokens"
            )

    # ---- generation -------------------------------------------------------------------
    def prefill(self, prefix: Prompt) -> Prefix:
        """Compute a prompt prefix once (e.g. few-shot examples) for reuse via generate(..., prefix=)."""
        ids = self.encode(prefix)
        self._check_length(len(ids), 0)
        cache = self.model.new_cache(1, len(ids))
        logits = self.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.array([[len(ids) - 1]]))
        return Prefix(tuple(ids), cache, logits[0, 0])

    def _contexts(self, prompts: Sequence[Prompt], prefix: Prefix | None) -> tuple[list[list[int]], list[list[int]]]:
        """(ids to run, full context per prompt); after a prefix an empty prompt adds nothing."""
        if prefix is None:
            ids = [self.encode(p) for p in prompts]
            return ids, ids
        if len(prompts) != 1:
            raise ValueError("a prefix is reused by one prompt at a time; pass a single prompt")
        if not isinstance(prefix, Prefix):
            raise ValueError("prefix must come from engine.prefill(...)")
        ids = self.encode(prompts[0]) if len(prompts[0]) else []
        return [ids], [list(prefix.token_ids) + ids]

    def stream_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, n: int = 1, prefix: Prefix | None = None,
                     ignore_eos: bool = False, logprobs: bool = False) -> Iterator[Step]:
        """Decode several prompts together; yields Steps (each with its row) as tokens arrive.

        Greedy by default; temperature > 0 samples (top_k, top_p, repetition_penalty, seed). Stops at
        eos, max_new_tokens, or a stop string (not returned). n samples per prompt share one prefill;
        prefix (from prefill) is reused without recomputation.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of prompts (strings or token id lists)")
        sampling = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        sampling.validate()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        stops = stop_list(stop)
        ids, context = self._contexts(prompts, prefix)
        for c in context:
            self._check_length(len(c), max_new_tokens)
        gen = Generator(self.model, ids, max_new_tokens=max_new_tokens, sampling=sampling, n=n,
                        eos_token_id=None if ignore_eos else self.config.eos_token_id,
                        prefix=prefix.cache if prefix else None, prefix_logits=prefix.last_logits if prefix else None,
                        logprobs=logprobs)
        texts = [RowText(self.tokenizer, context[r // n], stops) for r in range(len(gen.tokens))]
        while not gen.is_done():
            for r, tok in gen.generate_next_token():
                delta, hit = texts[r].push(tok)
                if hit:
                    gen.stop(r, "stop")
                reason = gen.finish_reason[r]
                if reason in ("eos", "length"):
                    delta += texts[r].finish()
                lp = gen.logprobs[r][-1] if gen.logprobs is not None else None
                yield Step(r, len(gen.tokens[r]) - 1, tok, delta, reason, time.perf_counter() - gen.t_start, lp)

    def stream(self, prompt: Prompt, **options) -> Iterator[Step]:
        """Generate for one prompt, yielding a Step per token (see stream_batch for options)."""
        return self.stream_batch([prompt], **options)

    def generate_batch(self, prompts: Sequence[Prompt], **options) -> list[GenerationResult]:
        """Generate for several prompts (and n samples each); drains stream_batch."""
        n = options.get("n", 1)
        steps: dict[int, list[Step]] = {}
        t0 = time.perf_counter()
        for s in self.stream_batch(prompts, **options):
            steps.setdefault(s.row, []).append(s)
        n_prompt = [len(c) for c in self._contexts(prompts, options.get("prefix"))[1]]
        out = []
        for r in range(len(prompts) * n):
            ss = steps.get(r, [])
            ttft = ss[0].time if ss else time.perf_counter() - t0
            rate = (len(ss) - 1) / (ss[-1].time - ss[0].time) if len(ss) > 1 and ss[-1].time > ss[0].time else 0.0
            out.append(GenerationResult(
                text="".join(s.text for s in ss), token_ids=[s.token_id for s in ss], prompt_tokens=n_prompt[r // n],
                finish_reason=ss[-1].finish_reason if ss else "length", time_to_first_token=ttft,
                decode_tokens_per_s=rate,
                logprobs=[s.logprob for s in ss] if options.get("logprobs") else None))
        return out

    def generate(self, prompt: Prompt, **options) -> GenerationResult:
        """Generate for one prompt; returns text, ids and timings (drains stream)."""
        if options.get("n", 1) != 1:
            raise ValueError("generate returns one sequence; use generate_batch([prompt], n=...) for several")
        return self.generate_batch([prompt], **options)[0]
