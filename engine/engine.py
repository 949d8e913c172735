"""The public surface: Engine.load, engine.generate / stream / generate_batch / stream_batch / prefill."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx import config as C
from gpt2_onnx.core import GenerationOptions, Prefix, Sequence as Seq, Step, virtual_ids
from gpt2_onnx.generator import Generator
from gpt2_onnx.model import Model
from gpt2_onnx.resolve import read_prefix_adapter, resolve
from gpt2_onnx.tokenizer import Tokenizer, check_text

if TYPE_CHECKING:
    from gpt2_onnx.evaluate import Score

Prompt = str | Sequence[int]
OPTION_NAMES = [f.name for f in fields(GenerationOptions)]


def _options(args: dict) -> GenerationOptions:
    """GenerationOptions from a public method's keyword arguments."""
    return GenerationOptions(**{k: v for k, v in args.items() if k in OPTION_NAMES})


@dataclass(frozen=True)
class GenerationResult:
    """What generate returns for one sequence."""

    text: str
    token_ids: list[int]  # new tokens (an eos that ended the row is included, its text is not)
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop"
    time_to_first_token: float  # seconds, prefill included
    decode_tokens_per_s: float  # tokens after the first / time after the first
    logprobs: list[float] | None = None  # per new token, when logprobs is not None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None  # per new token: the N most likely (id, log p)
    prompt_logprobs: list[float | None] | None = None  # per context token (the first None), with prompt_logprobs
    prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] | None = None

    @classmethod
    def from_steps(cls, steps: list[Step], prompt_tokens: int, seq: Seq | None = None) -> "GenerationResult":
        """The result of one sequence from its Steps (as generate and the CLI's --stream --stats see them);
        seq adds its prompt logprobs."""
        tokens = [s for s in steps if s.token_id >= 0]
        ttft = tokens[0].time if tokens else 0.0
        span = tokens[-1].time - tokens[0].time if tokens else 0.0
        scored = seq is not None and seq.options.prompt_logprobs is not None
        lps = seq is not None and seq.options.logprobs is not None or bool(tokens and tokens[0].logprob is not None)
        return cls(text="".join(s.text for s in steps), token_ids=[s.token_id for s in tokens],
                   prompt_tokens=prompt_tokens, finish_reason=steps[-1].finish_reason if steps else "length",
                   time_to_first_token=ttft, decode_tokens_per_s=(len(tokens) - 1) / span if span > 0 else 0.0,
                   logprobs=[s.logprob for s in tokens] if lps else None,
                   top_logprobs=[s.top_logprobs for s in tokens] if lps else None,
                   prompt_logprobs=list(seq.prompt_logprobs) if scored else None,
                   prompt_top_logprobs=list(seq.prompt_top_logprobs) if scored else None)


class Engine:
    """An exported GPT-2 folder loaded for generation. Create with `Engine.load(path)`."""

    def __init__(self, folder: Path, cfg: C.ModelConfig, model: Model, tokenizer: Tokenizer):
        self.folder, self.config, self.model, self.tokenizer = folder, cfg, model, tokenizer

    @classmethod
    def load(cls, model: str | Path | None = None, *, provider: str = "auto", threads: int | None = None,
             cuda_graph: bool = False, dtype: str = "float32", quantize: str | None = None,
             progress: Callable[[str], None] | None = None) -> "Engine":
        """Load a model: None (the bundled one), an exported folder, a Hugging Face folder or a Hub id.

        Checkpoints are exported once (dtype float32 | float16, quantize None | int8 | int4) into the
        export cache and reused. cuda_graph=True (CUDA only) replays decode steps as captured graphs.
        """
        folder = resolve(model, dtype=dtype, quantize=quantize, progress=progress)
        cfg = C.ModelConfig.load(folder)
        model = Model(folder, cfg, provider=provider, threads=threads, cuda_graph=cuda_graph)
        tokenizer = Tokenizer(folder / C.TOKENIZER_NAME)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"{folder / C.TOKENIZER_NAME} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                             f"is {cfg.vocab_size}: it belongs to another model; re-export with gpt2-onnx export")
        return cls(folder, cfg, model, tokenizer)

    @property
    def provider(self) -> str:
        return self.model.provider

    # ---- input validation (the library and the server share it) -------------------------------
    def encode(self, prompt: Prompt, *, empty_ok: bool = False) -> list[int]:
        """Prompt text or ids -> validated ids; an empty prompt starts from <|endoftext|> (as HF does),
        unless empty_ok (after a prefix)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(check_text(prompt))
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
        return ids if ids or empty_ok else [self.config.bos_token_id]

    def check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        """ValueError if a prompt of n_prompt tokens + max_new_tokens exceeds n_positions."""
        if n_prompt + max_new_tokens > self.config.n_positions:
            raise ValueError(
                f"prompt of {n_prompt} tokens + max_new_tokens {max_new_tokens} = {n_prompt + max_new_tokens} "
                f"exceeds the model's context of n_positions {self.config.n_positions} tokens; "
                "shorten the prompt or lower max_new_tokens"
            )

    def sequences(self, prompts: Sequence[Prompt], options: GenerationOptions, *,
                  prefix: Prefix | None = None) -> list[Seq]:
        """Validated Sequences for prompts x options.n (row p * n + i), ready for a Core."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not len(prompts):
            raise ValueError("prompts must be a non-empty list of prompts (strings or token id lists)")
        if prefix is not None and not isinstance(prefix, Prefix):
            raise ValueError("prefix must come from engine.prefill(...) or engine.load_prefix(...)")
        if prefix is not None and (prefix.model != self.config.weights_digest
                                   or prefix.cache.shape[1:] != (self.config.n_head, len(prefix.token_ids),
                                                                 self.config.kv_head_size)):
            raise ValueError(f"this prefix was computed by another model (weights {prefix.model or '?'}, this "
                             f"engine's {self.config.weights_digest or '?'}); compute it with this engine's prefill")
        contexts = []
        for p in prompts:
            ids = self.encode(p, empty_ok=prefix is not None and not prefix.virtual)
            context = list(prefix.token_ids) + ids if prefix is not None else ids
            self.check_length(len(context), options.max_new_tokens)
            contexts.append(context)
        n, eos, virtual = options.n, self.config.eos_token_id, prefix.virtual if prefix is not None else 0
        return [Seq(c, options, row=p * n + i, eos_token_id=eos, tokenizer=self.tokenizer, virtual=virtual)
                for p, c in enumerate(contexts) for i in range(n)]

    # ---- generation -------------------------------------------------------------------------
    def prefill(self, prefix: Prompt) -> Prefix:
        """Compute a prompt prefix once (e.g. few-shot examples) for reuse via generate(..., prefix=)."""
        ids = self.encode(prefix)
        self.check_length(len(ids), 0)
        cache = self.model.new_cache(1, len(ids))
        _, logits = self.model.run(cache, np.array([ids]), np.array([len(ids)]), np.array([[len(ids) - 1]]))
        return Prefix(tuple(ids), cache, logits[0, 0], model=self.config.weights_digest)

    def score(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[Score]:
        """Log-probabilities of continuations after contexts, and whether each token is the greedy one.

        requests: (context, continuation) pairs of texts or token id lists, tokenized separately (as
        lm-evaluation-harness does); ragged rows run in one forward, no generation.
        """
        from gpt2_onnx.evaluate import score

        return score(self, requests)

    def load_prefix(self, adapter: str | Path) -> Prefix:
        """A peft prefix-tuning adapter (PrefixTuningConfig) as a Prefix for generate(..., prefix=).

        Its virtual tokens' KV goes to the device once; prompts follow it from position
        num_virtual_tokens on, as under peft, and count against n_positions. An empty prompt after it
        starts from <|endoftext|>, as an empty prompt does without a prefix.
        """
        arrays = read_prefix_adapter(adapter, self.config)
        T = arrays[0].shape[2]
        cache = self.model.new_cache(1, T)
        cache.write(arrays, T)
        return Prefix(virtual_ids(T), cache, model=self.config.weights_digest, virtual=T, name=str(adapter))

    def stream_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
                     prompt_logprobs: int | None = None, n: int = 1, prefix: Prefix | None = None) -> Iterator[Step]:
        """Decode several prompts together; yields Steps (each with its row) as tokens arrive.

        Options as in GenerationOptions. n samples per prompt share one prefill; prefix (from prefill
        or load_prefix) is reused without recomputation.
        """
        return self._drain(Generator(self, prompts, _options(locals()), prefix=prefix))

    @staticmethod
    def _drain(gen: Generator) -> Iterator[Step]:
        while not gen.is_done():
            yield from gen.generate_next_token()

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
               prompt_logprobs: int | None = None, prefix: Prefix | None = None) -> Iterator[Step]:
        """Generate for one prompt, yielding a Step per token (options as in GenerationOptions)."""
        return self._drain(Generator(self, [prompt], _options(locals()), prefix=prefix))

    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                       stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
                       prompt_logprobs: int | None = None, n: int = 1,
                       prefix: Prefix | None = None) -> list[GenerationResult]:
        """Generate for several prompts (and n samples each), one result per sequence (row p * n + i)."""
        return self._collect(Generator(self, prompts, _options(locals()), prefix=prefix))

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False, logprobs: int | None = None,
                 prompt_logprobs: int | None = None, prefix: Prefix | None = None) -> GenerationResult:
        """Generate for one prompt; returns text, ids and timings (options as in GenerationOptions)."""
        return self._collect(Generator(self, [prompt], _options(locals()), prefix=prefix))[0]

    def _collect(self, gen: Generator) -> list[GenerationResult]:
        steps: dict[int, list[Step]] = {s.row: [] for s in gen.sequences}
        for s in self._drain(gen):
            steps[s.row].append(s)
        return [GenerationResult.from_steps(steps[q.row], len(q.context), q) for q in gen.sequences]
