"""The library's value types: GenerationOptions (and its keyword set), Step, GenerationResult, Prefix, Score."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
from typing_extensions import TypedDict

from gpt2_onnx.errors import option_error

if TYPE_CHECKING:
    from gpt2_onnx.kv_cache import KVCache

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily: logits / T would overflow float64


def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class GenerationOptions:
    """How to generate; the one options type of the library, the engines and the server.

    max_new_tokens: tokens to generate at most; min_new_tokens: eos and stop_token_ids are masked until
    this many. temperature 0 (or < 1e-5, or top_k 1) is greedy; > 0 samples with seed, after the
    samplers top_k (0 = off), top_p (1 = off), min_p (0 = off), typical_p (1 = off), in that order.
    Processors, applied in this order to each row's logits before temperature (to the beams' log-
    probabilities in beam search): repetition_penalty (HF/CTRL; 1 = off), presence_penalty and
    frequency_penalty (OpenAI's, over the new tokens; 0 = off), logit_bias ({token id: -100..100}),
    bad_words_ids and bad_words (token id sequences / words never generated: a word's last token is
    masked after its other tokens), min_new_tokens, no_repeat_ngram_size (0 = off).
    stop: strings that end a sequence (the stop text is not returned); stop_token_ids: ids that end it
    (the id is kept in token_ids, its text is not returned). ignore_eos: keep going past <|endoftext|>.
    logprobs: None = off, 0 = log p of each new token, N = also the N most likely tokens there;
    prompt_logprobs: the same for the prompt's tokens (the first has none). Log-probabilities are
    log_softmax of the model's fp32 logits, before processors, temperature and samplers.
    n (or num_return_sequences): sequences returned per prompt (one prefill). best_of: sample this many,
    return the n with the highest cumulative log p. num_beams > 1: beam search (greedy, as in
    transformers) with length_penalty and early_stopping (True, False or "never"); the n best
    hypotheses are returned, each with its score.
    Structured output (at most one; needs the `structured` extra, llguidance): json_schema (a JSON Schema,
    dict or text; compact JSON, no free whitespace), json_object (any JSON object), regex (the whole output
    matches it), choice (one of these strings), grammar (llguidance's Lark syntax, or GBNF). Tokens the
    constraint does not allow are masked before every selection (greedy, samplers, processors, beams);
    a sequence whose constraint is complete ends with finish_reason "stop"; max_new_tokens may end it
    first ("length": the output is then incomplete).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    bad_words: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    num_return_sequences: int = 1
    best_of: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    json_schema: Mapping | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        stop = self.stop
        stops = () if stop is None else (stop,) if isinstance(stop, str) else \
            tuple(stop) if isinstance(stop, (list, tuple)) else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise option_error("stop", f"must be a string or a list of strings, got {stop!r}")
        object.__setattr__(self, "stop", stops)
        for name in ("stop_token_ids",):
            ids = getattr(self, name)
            ids = () if ids is None else tuple(ids) if isinstance(ids, (list, tuple)) else None
            if ids is None or not all(_int(t) and t >= 0 for t in ids):
                raise option_error(name, f"must be a list of token ids (integers >= 0), got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(int(t) for t in ids))
        words = self.bad_words_ids
        words = () if words is None else tuple(words) if isinstance(words, (list, tuple)) else None
        if words is None or not all(isinstance(w, (list, tuple)) and len(w) and all(_int(t) and t >= 0 for t in w)
                                    for w in words):
            raise option_error("bad_words_ids", f"must be a list of non-empty token id lists, got "
                                                f"{self.bad_words_ids!r}")
        object.__setattr__(self, "bad_words_ids", tuple(tuple(int(t) for t in w) for w in words))
        bad = self.bad_words
        bad = () if bad is None else (bad,) if isinstance(bad, str) else tuple(bad) if isinstance(bad, (list, tuple)) \
            else None
        if bad is None or not all(isinstance(w, str) and w.strip() for w in bad):
            raise option_error("bad_words", f"must be a list of non-empty words, got {self.bad_words!r}")
        object.__setattr__(self, "bad_words", bad)
        self._check_bias()
        self._check_constraint()
        checks = [
            ("max_new_tokens", _int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0"),
            ("min_new_tokens", _int(self.min_new_tokens) and self.min_new_tokens >= 0, "an integer >= 0"),
            ("n", _int(self.n) and self.n >= 1, "an integer >= 1"),
            ("num_return_sequences", _int(self.num_return_sequences) and self.num_return_sequences >= 1,
             "an integer >= 1"),
            ("best_of", self.best_of is None or (_int(self.best_of) and self.best_of >= 1), "None or an integer >= 1"),
            ("num_beams", _int(self.num_beams) and self.num_beams >= 1, "an integer >= 1 (1 = no beam search)"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("temperature", _number(self.temperature) and 0 <= self.temperature <= 100, "in [0, 100] (0 = greedy)"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", _number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("typical_p", _number(self.typical_p) and 0 < self.typical_p <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", _number(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100,
             "in [0.01, 100] (1 = off)"),
            ("presence_penalty", _number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2] (0 = off)"),
            ("frequency_penalty", _number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2] (0 = off)"),
            ("no_repeat_ngram_size", _int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
             "an integer >= 0 (0 = off)"),
            ("length_penalty", _number(self.length_penalty) and -50 <= self.length_penalty <= 50,
             "in [-50, 50] (1 = score / length)"),
            ("early_stopping", isinstance(self.early_stopping, bool) or self.early_stopping == "never",
             'true, false or "never"'),
            ("seed", self.seed is None or (_int(self.seed) and self.seed >= 0), "a non-negative integer"),
        ]
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            checks.append((name, v is None or (_int(v) and v >= 0),
                           "None (off), 0 (the token's own) or N > 0 (also the N most likely tokens)"))
        for name, ok, what in checks:
            if not ok:
                raise option_error(name, f"must be {what}, got {getattr(self, name)!r}")
        self._check_combinations()

    def _check_bias(self) -> None:
        bias = self.logit_bias
        if bias is None or (isinstance(bias, Mapping) and not bias):
            object.__setattr__(self, "logit_bias", None)
            return
        if not isinstance(bias, Mapping):
            raise option_error("logit_bias", f"must be a mapping of token id to bias, got {bias!r}")
        out = {}
        for k, v in bias.items():
            tid = int(k) if isinstance(k, str) and k.strip().isdigit() else k
            if not (_int(tid) and tid >= 0):
                raise option_error("logit_bias", f"keys must be token ids (integers >= 0), got {k!r}")
            if not (_number(v) and -100 <= v <= 100):
                raise option_error("logit_bias", f"values must be in [-100, 100], got {v!r} for token {tid}")
            out[int(tid)] = float(v)
        object.__setattr__(self, "logit_bias", MappingProxyType(out))

    def _check_constraint(self) -> None:
        from gpt2_onnx.constraints import ANY_OBJECT, schema_text

        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", schema_text(self.json_schema))
        if self.choice is not None:
            choice = tuple(self.choice) if isinstance(self.choice, (list, tuple)) else ()
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise option_error("choice", f"must be a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", choice)
        if not isinstance(self.json_object, bool):
            raise option_error("json_object", f"must be true or false, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and (v if name == "regex" else v.strip())):
                raise option_error(name, f"must be a non-empty string, got {v!r}")
        given = [name for name in ("json_schema", "json_object", "regex", "choice", "grammar")
                 if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise option_error(given[1], "cannot be combined with another constraint: give only one")
        key = (("json", self.json_schema) if self.json_schema is not None else ("json", ANY_OBJECT) if self.json_object
               else ("regex", self.regex) if self.regex is not None
               else ("choice", json.dumps(list(self.choice))) if self.choice is not None
               else ("grammar", self.grammar) if self.grammar is not None else None)
        object.__setattr__(self, "_constraint", key)  # not a field: derived from the five above

    def _check_combinations(self) -> None:
        n, r = self.n, self.num_return_sequences
        if n != 1 and r != 1 and n != r:
            raise option_error("num_return_sequences", f"is another name for n: got n={n} and "
                                                       f"num_return_sequences={r}; give one")
        rows = self.rows
        if self.min_new_tokens > self.max_new_tokens:
            raise option_error("min_new_tokens", f"must not exceed the most new tokens asked for, got "
                                                 f"{self.min_new_tokens} > {self.max_new_tokens}")
        if self.best_of is not None and self.best_of < rows:
            raise option_error("best_of", f"must be >= n (the sequences returned), got best_of={self.best_of}, n={rows}")
        if self.num_beams > 1:
            wrong = [(name, why) for name, bad, why in (
                ("temperature", not self.greedy, "beam search here is deterministic: set temperature 0"),
                ("best_of", self.best_of is not None, "the beam width is num_beams"),
                ("stop", bool(self.stop), "end beams with stop_token_ids instead of stop strings"),
                ("logprobs", self.logprobs is not None, "each hypothesis has its score instead"),
                ("prompt_logprobs", self.prompt_logprobs is not None, "score the prompt without num_beams"),
                ("n", rows > self.num_beams, f"at most num_beams ({self.num_beams}) hypotheses can be returned"),
                ("max_new_tokens", self.max_new_tokens < 1, "beams need at least one new token"),
            ) if bad]
            if wrong:
                name, why = wrong[0]
                raise option_error(name, f"is not supported with num_beams > 1 as given: {why}")
        if self.best_of is not None and self.best_of > rows and self.greedy:
            raise option_error("best_of", "needs sampling (temperature > 0): greedy samples are all the same")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def rows(self) -> int:
        """Sequences returned per prompt."""
        return self.n if self.n != 1 else self.num_return_sequences

    @property
    def width(self) -> int:
        """Sequences decoded per prompt: num_beams, best_of, or the rows returned."""
        return self.num_beams if self.num_beams > 1 else max(self.best_of or 1, self.rows)

    @property
    def grouped(self) -> bool:
        """Beam search or best_of: the rows returned are chosen among more when all have ended (no streaming)."""
        return self.num_beams > 1 or self.width > self.rows

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint (kind json | regex | choice | grammar), or None."""
        return self._constraint

    @property
    def processed(self) -> bool:
        """A logits processor or a constraint is active (the row's logits come to the host, greedy or not)."""
        return (self.constraint is not None or self.repetition_penalty != 1.0 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or self.logit_bias is not None or bool(self.bad_words_ids or self.bad_words)
                or self.min_new_tokens > 0 or self.no_repeat_ngram_size > 0)


class GenerateKwargs(TypedDict, total=False):
    """The keyword options of Engine.generate/stream/generate_batch/stream_batch: GenerationOptions' fields."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Mapping[int, float] | None
    bad_words_ids: Sequence[Sequence[int]]
    bad_words: str | Sequence[str]
    no_repeat_ngram_size: int
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: int | None
    prompt_logprobs: int | None
    n: int
    num_return_sequences: int
    best_of: int | None
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    json_schema: Mapping | str | None
    json_object: bool
    regex: str | None
    choice: Sequence[str] | None
    grammar: str | None


OPTION_NAMES = tuple(f.name for f in fields(GenerationOptions))
assert set(GenerateKwargs.__annotations__) == set(OPTION_NAMES), "GenerateKwargs must list GenerationOptions' fields"


def as_prompts(prompt_or_prompts) -> list:
    """A prompt (text, or a list of token ids) or a list of prompts, as a list of prompts."""
    p = prompt_or_prompts
    if isinstance(p, np.ndarray):
        return [p] if p.ndim == 1 else list(p)
    if isinstance(p, str) or (isinstance(p, Sequence) and len(p) and not isinstance(p[0], (str, Sequence,
                                                                                          np.ndarray))):
        return [p]
    return p


@dataclass(frozen=True)
class Step:
    """One generated token of one sequence, with the text it completes (valid UTF-8, maybe '')."""

    row: int  # the sequence's index in its call or request (prompt p, sample i: p * n + i)
    index: int  # 0-based position among the sequence's new tokens (-1 for a failure before any token)
    token_id: int
    text: str
    finish_reason: str | None  # set on the sequence's last step: "length" | "eos" | "stop" | "error" | "cancelled"
    time: float  # seconds since the sequence was submitted
    logprob: float | None = None  # log p(token) under the model, when logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # the `logprobs` most likely (id, log p), best first
    error: Exception | None = None  # with finish_reason "error"


@dataclass(frozen=True)
class GenerationResult:
    """What generation returns for one sequence."""

    text: str
    token_ids: list[int]  # new tokens (an eos or stop token id that ended the row is included, its text is not)
    prompt_tokens: int
    finish_reason: str  # "length" | "eos" | "stop"
    time_to_first_token: float  # seconds, prefill (and any wait for a KV row) included
    decode_tokens_per_s: float  # tokens after the first / time after the first
    logprobs: list[float] | None = None  # per new token, when logprobs is not None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None  # per new token: the N most likely (id, log p)
    prompt_logprobs: list[float | None] | None = None  # per context token (the first None), with prompt_logprobs
    prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] | None = None
    score: float | None = None  # beam search: the hypothesis' score (sum of log p / length ** length_penalty);
    # best_of: the sum of its tokens' log p

    @classmethod
    def from_steps(cls, steps: list[Step], prompt_tokens: int) -> "GenerationResult":
        """The result of one sequence from its Steps (as a streaming caller sees them)."""
        tokens = [s for s in steps if s.token_id >= 0]
        ttft = tokens[0].time if tokens else 0.0
        span = tokens[-1].time - tokens[0].time if tokens else 0.0
        lps = bool(tokens and tokens[0].logprob is not None)
        return cls(text="".join(s.text for s in steps), token_ids=[s.token_id for s in tokens],
                   prompt_tokens=prompt_tokens, finish_reason=steps[-1].finish_reason if steps else "length",
                   time_to_first_token=ttft, decode_tokens_per_s=(len(tokens) - 1) / span if span > 0 else 0.0,
                   logprobs=[s.logprob for s in tokens] if lps else None,
                   top_logprobs=[s.top_logprobs for s in tokens] if lps else None)


@dataclass(eq=False)
class Prefix:
    """Token ids and their KV (a one-row cache), reusable by sequences whose context starts with them.

    `model` is the weights digest of the model that computed it (another model refuses it). A
    prefix-tuning adapter's prefix has `virtual` leading tokens with no real ids: they get ids below
    zero, unique in the process, so they match only themselves.
    """

    token_ids: tuple[int, ...]
    cache: KVCache
    last_logits: np.ndarray | None = None  # (V,) logits after the last token, when computed by Engine.prefill
    model: str = ""
    virtual: int = 0
    name: str = ""
    lora: int = 0  # the key of the LoRA adapter its KV was computed with (0: none)
    ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ids = np.array(self.token_ids, np.int64)


@dataclass(eq=False)
class Lora:
    """A LoRA adapter in a slot of an export with lora_slots (Engine.load_lora), for generate(..., adapter=).

    `key` is unique in the process (never reused after an unload): the prefix cache keeps each adapter's
    KV apart by it, and 0 stands for the base model.
    """

    name: str
    slot: int
    rank: int
    model: str = ""  # weights digest of the engine that loaded it
    key: int = field(default_factory=lambda: next(_lora_keys))
    loaded: bool = True


_lora_keys = itertools.count(1)
_virtual_next = [-1]


def virtual_ids(n: int) -> tuple[int, ...]:
    """n placeholder ids (< 0) for virtual tokens, never handed out twice in this process."""
    start = _virtual_next[0]
    _virtual_next[0] -= n
    return tuple(range(start, start - n, -1))


@dataclass(frozen=True)
class Score:
    """Log-probabilities of one continuation after its context."""

    token_ids: list[int]  # the continuation's tokens
    logprobs: list[float]  # log p of each of them, log_softmax of the fp32 logits
    greedy: list[bool]  # whether each was the model's most likely token there

    @property
    def logprob(self) -> float:
        """log p(continuation | context)."""
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        """Whether greedy decoding from the context produces the continuation."""
        return all(self.greedy)
