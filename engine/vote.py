"""Self-consistency (Wang et al., 2022): sample many reasoning paths of one prompt, extract each one's
answer with a regular expression, and return the answer most of them reach."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpt2_onnx.errors import option_error
from gpt2_onnx.types import GREEDY_BELOW, GenerationOptions, GenerationResult

if TYPE_CHECKING:
    from gpt2_onnx.sync_engine import Engine, Prompt
    from gpt2_onnx.types import Lora, Prefix

LAST_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"  # the default answer: the last number in the text (commas dropped)


@dataclass(frozen=True)
class Vote:
    """The majority answer of n samples (None when no sample has one), each answer's count (most first),
    and every sample with the answer extracted from it (None where the pattern does not match)."""

    answer: str | None
    counts: dict[str, int]
    answers: list[str | None]
    samples: list[GenerationResult]


def answer_of(text: str, pattern: re.Pattern) -> str | None:
    """The last match of pattern in text (its first group if it has one); a number loses its commas."""
    found = None
    for m in pattern.finditer(text):
        found = m.group(1) if pattern.groups else m.group(0)
    if found is None:
        return None
    found = found.strip()
    return found.replace(",", "") if pattern.pattern == LAST_NUMBER else found


def compile_answer(answer_regex: str | None) -> re.Pattern:
    """The answer pattern (None: the last number); InvalidInput naming answer_regex if it does not compile."""
    try:
        return re.compile(LAST_NUMBER if answer_regex is None else answer_regex)
    except (re.error, TypeError) as e:
        raise option_error("answer_regex", f"is not a valid regular expression ({e}): {answer_regex!r}") from None


def vote(engine: Engine, prompt: Prompt, *, n: int, answer_regex: str | None, prefix: Prefix | None,
         adapter: Lora | None = None, options: dict) -> Vote:
    pattern = compile_answer(answer_regex)
    options = {"temperature": 0.7, **options}
    if GenerationOptions(n=n, **options).temperature < GREEDY_BELOW and n > 1:
        raise option_error("temperature", "must be > 0 to vote: greedy samples are all the same")
    samples = engine.generate_batch([prompt], prefix=prefix, adapter=adapter, n=n, **options)
    answers = [answer_of(s.text, pattern) for s in samples]
    counts = dict(Counter(a for a in answers if a is not None).most_common())
    return Vote(answer=next(iter(counts), None), counts=counts, answers=answers, samples=samples)
