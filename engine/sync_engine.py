"""Engine: an exported model loaded for generation and scoring, one caller at a time (blocking calls).

Engine.generate / stream / generate_batch / stream_batch / prefill / score / load_prefix / load_lora. Several
callers that should share continuous batching use AsyncEngine (gpt2_onnx.async_engine) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from typing_extensions import Unpack

from gpt2_onnx import config as C
from gpt2_onnx.chat import folder_template, render
from gpt2_onnx.constraints import Grammars
from gpt2_onnx.errors import ContextTooLong, InvalidInput, option_error
from gpt2_onnx.generator import Generator
from gpt2_onnx.groups import BeamSearch, BestOf
from gpt2_onnx.model import Model
from gpt2_onnx.resolve import read_lora_adapter, read_virtual_tokens, resolve
from gpt2_onnx.sequence import Sequence as Seq
from gpt2_onnx.tokenizer import Tokenizer, check_text
from gpt2_onnx.types import (GenerateKwargs, GenerationOptions, GenerationResult, Lora, Prefix, Score, Step,
                              virtual_ids)
from gpt2_onnx.vote import Vote, vote

Prompt = str | Sequence[int]


def _single(options: dict) -> GenerationOptions:
    """GenerationOptions of a one-prompt call (n belongs to the batch calls)."""
    for name in ("n", "num_return_sequences"):
        if options.get(name, 1) != 1:
            raise option_error(name, "is for generate_batch / stream_batch (n sequences per prompt); generate and "
                                     "stream make one sequence")
    return GenerationOptions(**options)


def _streamable(options: GenerationOptions) -> GenerationOptions:
    """Options of a streaming call: beam search and best_of choose their answers only at the end."""
    if options.num_beams > 1:
        raise option_error("num_beams", "> 1 cannot stream (beams change until the search ends); use generate or "
                                        "generate_batch")
    if options.grouped:
        raise option_error("best_of", "cannot stream (the best samples are known only at the end); use generate or "
                                      "generate_batch")
    return options


class Engine:
    """An exported GPT-2 folder loaded for generation. Create with `Engine.load(path)`."""

    def __init__(self, folder: Path, cfg: C.ModelConfig, model: Model, tokenizer: Tokenizer):
        self.folder, self.config, self.model, self.tokenizer = folder, cfg, model, tokenizer
        self.grammars = Grammars(tokenizer.to_json, cfg.vocab_size, cfg.eos_token_id)  # structured output
        self.chat_template = folder_template(folder)  # the checkpoint's, kept by the export (or None)
        self.loras: dict[int, Lora] = {}  # LoRA slot -> the adapter loaded there

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
            raise InvalidInput(f"prompt must be a string or a sequence of token ids, got {type(prompt).__name__}",
                               "prompt")
        else:
            ids = list(prompt)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise InvalidInput(f"token ids must be integers, got {t!r} ({type(t).__name__})", "prompt")
            bad = [int(t) for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InvalidInput(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})",
                                   "prompt")
            ids = [int(t) for t in ids]
        return ids if ids or empty_ok else [self.config.bos_token_id]

    def check_length(self, n_prompt: int, max_new_tokens: int, prefix: int = 0) -> None:
        """ContextTooLong (a ValueError) if prefix + prompt tokens + max_new_tokens exceed n_positions."""
        if prefix + n_prompt + max_new_tokens > self.config.n_positions:
            raise ContextTooLong(n_prompt, max_new_tokens, self.config.n_positions, prefix)

    def check_adapter(self, adapter: Lora | None) -> int:
        """The key of a LoRA handle loaded in this engine (0 for None); InvalidInput for anything else."""
        if adapter is None:
            return 0
        if not isinstance(adapter, Lora) or adapter.model != self.config.weights_digest \
                or self.loras.get(adapter.slot) is not adapter:
            what = "was unloaded" if isinstance(adapter, Lora) and not adapter.loaded else "is not loaded here"
            raise InvalidInput(f"adapter {getattr(adapter, 'name', adapter)!r} {what}; pass a handle from this "
                               "engine's load_lora(...)", "adapter")
        return adapter.key

    def sequences(self, prompts: Sequence[Prompt], options: GenerationOptions, *,
                  prefix: Prefix | None = None, adapter: Lora | None = None) -> list[Seq]:
        """Validated Sequences for prompts x options.n (row p * n + i), ready for a Core; `adapter` is the
        LoRA adapter they run with (None: the base model)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not len(prompts):
            raise InvalidInput("prompts must be a non-empty list of prompts (strings or token id lists)", "prompt")
        if prefix is not None and not isinstance(prefix, Prefix):
            raise InvalidInput("prefix must come from engine.prefill(...) or engine.load_prefix(...)", "prefix")
        if prefix is not None and (prefix.model != self.config.weights_digest
                                   or prefix.cache.shape[1:] != (self.config.n_head, len(prefix.token_ids),
                                                                 self.config.kv_head_size)):
            raise InvalidInput(f"this prefix was computed by another model (weights {prefix.model or '?'}, this "
                             f"engine's {self.config.weights_digest or '?'}); compute it with this engine's prefill",
                               "prefix")
        key = self.check_adapter(adapter)
        if prefix is not None and not prefix.virtual and prefix.lora != key:  # a prefix-tuning KV fits any adapter
            raise InvalidInput("this prefix was computed with another LoRA adapter (or none) than the one asked for; "
                               "compute it with engine.prefill(..., adapter=) of the same adapter", "prefix")
        for name, ids in (("stop_token_ids", options.stop_token_ids), ("logit_bias", options.logit_bias or ()),
                          ("bad_words_ids", [t for w in options.bad_words_ids for t in w])):
            bad = [t for t in dict.fromkeys(ids) if t >= self.config.vocab_size]
            if bad:
                raise option_error(name, f"has ids {bad[:5]} outside the vocabulary [0, {self.config.vocab_size})")
        before = len(prefix.token_ids) if prefix is not None else 0
        contexts = []
        for p in prompts:
            ids = self.encode(p, empty_ok=prefix is not None and not prefix.virtual)
            self.check_length(len(ids), options.max_new_tokens, before)
            contexts.append(list(prefix.token_ids) + ids if prefix is not None else ids)
        banned = self.bad_words(options)
        compiled = self.grammars.compile(options)  # once per request; each row copies its start state
        rows, width, grouped = options.rows, options.width, options.grouped

        def seq(c: list[int], row: int) -> Seq:
            return Seq(c, options, row=row, eos_token_id=self.config.eos_token_id, tokenizer=self.tokenizer,
                       prefix=prefix, banned=banned, lora=adapter,
                       constraint=self.grammars.constraint(compiled) if compiled is not None else None)

        out = []
        for p, c in enumerate(contexts):
            outputs = [seq(c, p * rows + i) for i in range(rows)]
            units = [seq(c, p * width + i) for i in range(width)] if grouped else outputs
            units[0].join = len(units)  # one prompt's rows join the core together
            for w in units[1:]:
                w.join = 0
            if grouped:
                (BeamSearch if options.num_beams > 1 else BestOf)(units, outputs)
            out += outputs
        return out

    def bad_words(self, options: GenerationOptions) -> tuple[tuple[int, ...], ...]:
        """bad_words_ids and bad_words as token id sequences; a word counts with and without a leading space."""
        ids = list(options.bad_words_ids)
        for w in options.bad_words:
            for text in (w.strip(), " " + w.strip()):
                t = tuple(self.tokenizer.encode(text))
                if t and t not in ids:
                    ids.append(t)
        return tuple(ids)

    # ---- generation -------------------------------------------------------------------------
    def prefill(self, prefix: Prompt, *, adapter: Lora | None = None) -> Prefix:
        """Compute a prompt prefix once (e.g. few-shot examples) for reuse via generate(..., prefix=), with the
        LoRA adapter the generation uses."""
        ids = self.encode(prefix)
        self.check_length(len(ids), 0)
        key = self.check_adapter(adapter)
        cache = self.model.new_cache(1, len(ids))
        _, logits = self.model.run(cache, np.array([ids]), np.array([len(ids)]), np.array([[len(ids) - 1]]),
                                   lora=None if adapter is None else np.array([adapter.slot]))
        return Prefix(tuple(ids), cache, logits[0, 0], model=self.config.weights_digest, lora=key)

    def score(self, requests: Sequence[tuple[Prompt, Prompt]]) -> list[Score]:
        """Log-probabilities of continuations after contexts, and whether each token is the greedy one.

        requests: (context, continuation) pairs of texts or token id lists, tokenized separately (as
        lm-evaluation-harness does); ragged rows run in one forward, no generation.
        """
        from gpt2_onnx.evaluate import score

        return score(self, requests)

    def load_prefix(self, adapter: str | Path) -> Prefix:
        """A peft prefix-tuning, prompt-tuning or P-tuning adapter as a Prefix for generate(..., prefix=).

        Its virtual tokens' KV is computed once (prompt and P-tuning embeddings run through the model,
        at positions 0..num_virtual_tokens-1) and stays on the device; prompts follow it from position
        num_virtual_tokens on, as under peft, and count against n_positions. An empty prompt after it
        starts from <|endoftext|>, as an empty prompt does without a prefix.
        """
        kind, arrays = read_virtual_tokens(adapter, self.config)
        T = arrays[0].shape[2] if kind == "kv" else arrays[0].shape[1]
        cache = self.model.new_cache(1, T)
        if kind == "kv":
            cache.write(arrays, T)
        else:
            self.model.run_embeds(cache, arrays[0])
        return Prefix(virtual_ids(T), cache, model=self.config.weights_digest, virtual=T, name=str(adapter))

    def load_lora(self, adapter: str | Path, *, name: str | None = None) -> Lora:
        """A peft LoRA adapter in a free slot of this export (one exported with --lora-slots), for
        generate(..., adapter=); rows with different adapters (and none) decode in one batch.

        The same adapters as the merge at export (r, alpha, rsLoRA, rank/alpha patterns, lora_bias) of rank
        up to the export's max_lora_rank; `name` defaults to the folder.
        """
        K, where = self.config.lora_slots, self.folder / C.MANIFEST_NAME
        if not K:
            raise ValueError(f"{self.folder} was exported without LoRA slots ({where}: lora_slots 0); re-export the "
                             "base with gpt2-onnx export BASE -o DIR --lora-slots K --max-lora-rank R, or merge this "
                             "adapter at export with --adapter")
        parts, rank = read_lora_adapter(adapter, self.config)
        with self.model.lora.lock:  # one slot per load, never written under a running step
            free = [slot for slot in range(1, K + 1) if slot not in self.loras]
            if not free:
                raise ValueError(f"all {K} LoRA slots of {self.folder} hold adapters "
                                 f"({', '.join(a.name for a in self.loras.values())}); unload one (engine.unload) or "
                                 "re-export the base with a larger --lora-slots")
            self.model.lora.write(free[0], parts)
            handle = Lora(name or str(adapter), free[0], rank, model=self.config.weights_digest)
            self.loras[free[0]] = handle
        return handle

    def unload(self, adapter: Lora) -> None:
        """Free a LoRA adapter's slot (the next load_lora overwrites it); requests still using it end with an
        error at their next step."""
        if not isinstance(adapter, Lora):
            raise InvalidInput(f"unload takes a handle from load_lora(...), got {type(adapter).__name__}", "adapter")
        with self.model.lora.lock:
            self.check_adapter(adapter)
            adapter.loaded = False
            del self.loras[adapter.slot]

    def stream_batch(self, prompts: Sequence[Prompt], *, prefix: Prefix | None = None,
                     adapter: Lora | None = None, **options: Unpack[GenerateKwargs]) -> Iterator[Step]:
        """Decode several prompts (n samples each) together; yields Steps (each with its row) as tokens arrive.

        Options as in GenerationOptions; prefix (from prefill or load_prefix) is reused without recomputation;
        adapter: a LoRA handle from load_lora.
        """
        return self._drain(Generator(self, prompts, _streamable(GenerationOptions(**options)), prefix=prefix,
                                     adapter=adapter))

    def stream(self, prompt: Prompt, *, prefix: Prefix | None = None, adapter: Lora | None = None,
               **options: Unpack[GenerateKwargs]) -> Iterator[Step]:
        """Generate for one prompt, yielding a Step per token (options as in GenerationOptions)."""
        return self._drain(Generator(self, [prompt], _streamable(_single(options)), prefix=prefix, adapter=adapter))

    def generate_batch(self, prompts: Sequence[Prompt], *, prefix: Prefix | None = None, adapter: Lora | None = None,
                       **options: Unpack[GenerateKwargs]) -> list[GenerationResult]:
        """Generate for several prompts (and n samples each), one result per sequence (row p * n + i)."""
        return self._collect(Generator(self, prompts, GenerationOptions(**options), prefix=prefix, adapter=adapter))

    def generate(self, prompt: Prompt, *, prefix: Prefix | None = None, adapter: Lora | None = None,
                 **options: Unpack[GenerateKwargs]) -> GenerationResult:
        """Generate for one prompt; returns text, ids and timings (options as in GenerationOptions; adapter: a
        LoRA handle from load_lora)."""
        return self._collect(Generator(self, [prompt], _single(options), prefix=prefix, adapter=adapter))[0]

    def chat(self, messages: Sequence[dict], *, chat_template: str | None = None, add_generation_prompt: bool = True,
             **options: Unpack[GenerateKwargs]) -> GenerationResult:
        """Generate the next turn of a conversation ([{"role", "content"}, ...]) rendered by chat_template,
        default the model's own (see chat_prompt); options as in GenerationOptions."""
        return self.generate(self.chat_prompt(messages, chat_template=chat_template,
                                              add_generation_prompt=add_generation_prompt), **options)

    def chat_prompt(self, messages: Sequence[dict], *, chat_template: str | None = None,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text of messages under chat_template (default: the checkpoint's, which the export keeps),
        rendered as transformers' apply_chat_template does; ValueError without a template."""
        tok = self.tokenizer
        return render(chat_template or self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=tok.token_name(self.config.bos_token_id) or "",
                      eos_token=tok.token_name(self.config.eos_token_id) or "")

    def vote(self, prompt: Prompt, *, n: int = 40, answer_regex: str | None = None, prefix: Prefix | None = None,
             adapter: Lora | None = None, **options: Unpack[GenerateKwargs]) -> Vote:
        """Self-consistency: n samples of one prompt (one prefill; temperature 0.7 unless given), each one's
        answer by answer_regex (its last match, first group if any; default: the last number); the
        majority answer with the counts and the samples."""
        return vote(self, prompt, n=n, answer_regex=answer_regex, prefix=prefix, adapter=adapter, options=options)

    @staticmethod
    def _drain(gen: Generator) -> Iterator[Step]:
        while not gen.is_done():
            yield from gen.generate_next_token()

    def _collect(self, gen: Generator) -> list[GenerationResult]:
        for _ in self._drain(gen):
            pass
        return [s.result() for s in gen.sequences]
