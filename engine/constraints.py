"""Structured output: JSON Schema, regex, choice and grammar constraints as per-row token masks (llguidance).

Grammars (one per Engine; its llguidance tokenizer is built from the model's tokenizer.json on first use)
compiles a constraint once, cached by its text. Each constrained row gets a Constraint: an llguidance
matcher whose mask says which tokens may come next, advanced with every token the row takes. The core
computes the next step's masks of all its constrained rows in one llguidance call on a helper thread
while the graph runs (`prefetch`). llguidance is an optional dependency, imported only when a constraint
is asked for. Every token goes through the model: tokens the grammar forces are not appended unsampled.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.errors import InvalidInput, option_error

if TYPE_CHECKING:
    from gpt2_onnx.types import GenerationOptions

ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object
# JSON without free whitespace (outputs end instead of padding); a schema's own "x-guidance" may change it
JSON_DEFAULTS = {"whitespace_flexible": False}
CACHED = 256  # compiled constraints kept per engine, and at most this much of their text
CACHE_BYTES = 32 << 20


def _llguidance(option: str = "json_schema"):
    try:
        import llguidance
    except ImportError:
        raise option_error(option, "needs llguidance (structured output is an optional extra): "
                                   "pip install 'gpt2-onnx[structured]'") from None
    return llguidance


class Constraint:
    """One row's constraint: the tokens allowed next (`allowed`), advanced with each token taken. Its
    failures are InvalidInput: the request's constraint, not the engine, ends the row."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.V = matcher, vocab_size
        self.bits: np.ndarray | None = None  # (ceil(V / 32),) int32: the current state's mask, once computed
        self._allowed: np.ndarray | None = None

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the constraint allows next."""
        if self._allowed is None:
            if self.bits is None:
                bits = np.full((self.V + 31) // 32, -1, np.int32)
                self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
                self._check()
                self.bits = bits
            self._allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.V].view(bool)
        return self._allowed

    def advance(self, token: int) -> bool:
        """Take a token; True when the constraint is complete (nothing but eos may follow)."""
        self.bits = self._allowed = None
        if not self.matcher.consume_token(int(token)):
            self._check()
            raise InvalidInput(f"the constraint cannot take token {token}")
        return self.matcher.is_stopped()

    def completes(self, token: int) -> bool:
        """Whether taking token would complete the constraint (this one is left as it is)."""
        m = self.matcher.deep_copy()
        return m.consume_token(int(token)) and m.is_stopped()

    def fork(self) -> "Constraint":
        """A copy in the same state (a beam's second child)."""
        return Constraint(self.matcher.deep_copy(), self.V)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise InvalidInput(f"the constraint failed: {_one_line(self.matcher.get_error())[:300]}")


class Grammars:
    """Compiled constraints of one model's tokenizer, cached by their text (a matcher in its start state
    each, which every row copies)."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_id: int | None):
        self._source, self.V, self.eos = tokenizer_json, vocab_size, eos_token_id
        self._tokenizer = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()  # key -> a matcher at the start
        self._bytes = 0  # text held by the cache (keys and grammars)
        self._sizes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # AsyncEngine validates requests on several threads

    @property
    def tokenizer(self):
        """llguidance's tokenizer of this model (built once)."""
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                self._tokenizer = llg.LLTokenizer(self._source(), n_vocab=self.V, eos_token=self.eos)
            return self._tokenizer

    def compile(self, options: GenerationOptions):
        """The compiled constraint of options (None without one): a matcher at the start, checked by
        computing its first mask. ValueError naming the option when the schema, regex or grammar cannot
        be compiled, uses what llguidance does not support, or exceeds its limits."""
        key = options.constraint
        if key is None:
            return None
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        kind, text = key
        name = "json_schema" if kind == "json" else kind
        llg = _llguidance(name)
        try:
            if kind == "json":
                grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
            else:
                grammar = llg.grammar_from(kind, text)
        except (ValueError, RecursionError) as e:
            raise option_error(name, f"cannot be compiled: {_one_line(str(e))[:500]}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise option_error(name, f"cannot be compiled: {_one_line(messages[0])[:500]}")
        start = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        try:
            Constraint(start.deep_copy(), self.V).allowed()  # limits show at the first mask
        except InvalidInput as e:
            raise option_error(name, f"cannot be used: {e}") from None
        if start.is_error():
            raise option_error(name, f"cannot be used: {_one_line(start.get_error())[:300]}")
        size = len(text) + len(grammar)
        with self._lock:
            self._compiled[key] = start
            self._bytes += size
            self._sizes[key] = size
            while len(self._compiled) > CACHED or (self._bytes > CACHE_BYTES and len(self._compiled) > 1):
                old, _ = self._compiled.popitem(last=False)
                self._bytes -= self._sizes.pop(old)
        return start

    def constraint(self, compiled) -> Constraint:
        """A fresh row state of a compiled constraint."""
        return Constraint(compiled.deep_copy(), self.V)


_helper: list = []  # (thread pool, llguidance executor), made on first use; a forked child makes its own
_helper_lock = threading.Lock()
os.register_at_fork(after_in_child=_helper.clear)


def prefetch(constraints: list[Constraint]) -> Callable[[], None]:
    """Start computing these rows' next masks on a helper thread (llguidance drops the GIL, so it overlaps
    the graph); returns the function that waits for them. A row whose mask failed computes it again when
    asked (`allowed`), so that its error ends that row alone."""
    todo = [c for c in constraints if c.bits is None]
    if not todo:
        return lambda: None
    with _helper_lock:
        if not _helper:
            _helper.extend([ThreadPoolExecutor(1, thread_name_prefix="gpt2-onnx-masks"), _llguidance().LLExecutor()])
        pool, executor = _helper
    words = (todo[0].V + 31) // 32
    bits = np.full((len(todo), words), -1, np.int32)  # (R, ceil(V / 32))

    def fill() -> None:
        executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(todo)], bits.ctypes.data,
                                         words * 4, len(todo))
        for i, c in enumerate(todo):
            if not c.matcher.is_error():
                c.bits = bits[i]

    future = pool.submit(fill)

    def wait() -> None:
        try:
            future.result()
        except Exception:  # each row computes its own mask again, and fails alone
            pass

    return wait


def _one_line(message: str) -> str:
    """llguidance's message on one line, without its parser-state dump."""
    message = message.split("<state>")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def schema_text(schema) -> str:
    """A JSON Schema (a dict, a bool, or its JSON text) as compact JSON text, properties in their order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise option_error("json_schema", f"is not valid JSON: {e}") from None
        except RecursionError:
            raise option_error("json_schema", "is nested too deeply") from None
    if not isinstance(schema, (dict, bool)):
        raise option_error("json_schema", f"must be a JSON Schema (an object), got {type(schema).__name__}")
    if schema is False:
        raise option_error("json_schema", "is false, which no output satisfies: give a schema (true: any JSON)")
    if schema is True:  # any JSON value, as an object llguidance applies its options to
        schema = {}
    try:
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise option_error("json_schema", f"is not JSON: {e}") from None
    except RecursionError:
        raise option_error("json_schema", "is nested too deeply") from None
