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
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from gpt2_onnx.errors import option_error

if TYPE_CHECKING:
    from gpt2_onnx.types import GenerationOptions

ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object
# JSON without free whitespace (outputs end instead of padding); a schema's own "x-guidance" may change it
JSON_DEFAULTS = {"whitespace_flexible": False}
CACHED = 256  # compiled grammars kept per engine


def _llguidance(option: str = "json_schema"):
    try:
        import llguidance
    except ImportError:
        raise option_error(option, "needs llguidance (structured output is an optional extra): "
                                   "pip install 'gpt2-onnx[structured]'") from None
    return llguidance


class Constraint:
    """One row's constraint: the tokens allowed next (`allowed`), advanced with each token taken."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.V = matcher, vocab_size
        self.bits: np.ndarray | None = None  # (ceil(V / 32),) int32: the current state's mask, once computed

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the constraint allows next."""
        if self.bits is None:
            self.bits = np.full((self.V + 31) // 32, -1, np.int32)
            self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
            self._check()
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.V].view(bool)

    def advance(self, token: int) -> bool:
        """Take a token; True when the constraint is complete (nothing but eos may follow)."""
        self.bits = None
        if not self.matcher.consume_token(int(token)):
            self._check()
            raise ValueError(f"token {token} does not fit the constraint")
        return self.matcher.is_stopped()

    def completes(self, token: int) -> bool:
        """Whether taking token would complete the constraint (this one is left as it is)."""
        m = self.matcher.deep_copy()
        return m.consume_token(int(token)) and m.is_stopped()

    def child(self, token: int) -> "Constraint":
        """A copy that has taken token (a beam's continuation)."""
        c = Constraint(self.matcher.deep_copy(), self.V)
        c.advance(token)
        return c

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"the constraint failed: {self.matcher.get_error().splitlines()[0]}")


class Grammars:
    """Compiled constraints of one model's tokenizer, cached by their text."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_id: int | None):
        self._source, self.V, self.eos = tokenizer_json, vocab_size, eos_token_id
        self._tokenizer = None
        self._compiled: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()  # AsyncEngine validates requests on several threads

    @property
    def tokenizer(self):
        """llguidance's tokenizer of this model (built once)."""
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                self._tokenizer = llg.LLTokenizer(self._source(), n_vocab=self.V, eos_token=self.eos)
            return self._tokenizer

    def compile(self, options: GenerationOptions) -> str | None:
        """The llguidance grammar of options' constraint (None without one); ValueError naming the option
        when the schema, regex or grammar cannot be compiled or uses what llguidance does not support."""
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
        except ValueError as e:
            raise option_error(name, f"cannot be compiled: {_one_line(str(e))}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise option_error(name, f"cannot be compiled: {_one_line(messages[0])}")
        with self._lock:
            self._compiled[key] = grammar
            while len(self._compiled) > CACHED:
                self._compiled.popitem(last=False)
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        """A fresh row state of a compiled grammar."""
        m = _llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"the constraint cannot start: {m.get_error().splitlines()[0]}")
        return Constraint(m, self.V)


_helper: list = []  # (thread pool, llguidance executor), made on first use


def prefetch(constraints: list[Constraint]) -> Callable[[], None]:
    """Start computing these rows' next masks on a helper thread (llguidance drops the GIL, so it overlaps
    the graph); returns the function that waits for them. A row whose mask failed computes it again when
    asked (`allowed`), so that its error ends that row alone."""
    todo = [c for c in constraints if c.bits is None]
    if not todo:
        return lambda: None
    if not _helper:
        llg = _llguidance()
        _helper.extend([ThreadPoolExecutor(1, thread_name_prefix="gpt2-onnx-masks"), llg.LLExecutor()])
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
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def schema_text(schema) -> str:
    """A JSON Schema (a dict, a bool, or its JSON text) as compact JSON text, properties in their order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise option_error("json_schema", f"is not valid JSON: {e}") from None
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
