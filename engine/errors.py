"""The errors of the public API: bad input names its option (`param`), so that every surface (the
library, the server, the CLI) can say it in its own words; a busy or stopping engine has a type of its own."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Bad input: the message names the problem and the fix; `param` is the option at fault (or None).

    `named(names)` renders the message with the option called by another surface's name (the server's
    `max_tokens`, the CLI's `--max-new-tokens`): the message is `detail` after the name when `lead`.
    """

    def __init__(self, detail: str, param: str | None = None, *, lead: bool = False):
        self.detail, self.param, self.lead = detail, param, lead
        super().__init__(self.named({}))

    def named(self, names: dict[str, str]) -> str:
        if self.lead and self.param:
            return f"{names.get(self.param, self.param)} {self.detail}"
        return self.detail


def option_error(param: str, detail: str) -> InvalidInput:
    """`param must be ...`: an InvalidInput whose message starts with the option's name."""
    return InvalidInput(detail, param, lead=True)


class ContextTooLong(InvalidInput):
    """A prompt (after a prefix) plus max_new_tokens does not fit the model's n_positions."""

    def __init__(self, prompt: int, max_new_tokens: int, n_positions: int, prefix: int = 0):
        self.prompt, self.max_new_tokens, self.n_positions, self.prefix = prompt, max_new_tokens, n_positions, prefix
        param = "max_new_tokens" if prefix + prompt < n_positions else "prompt"
        super().__init__("", param)

    def named(self, names: dict[str, str]) -> str:
        m = names.get("max_new_tokens", "max_new_tokens")
        head = f"{self.prefix} prefix tokens + " if self.prefix else ""
        total = self.prefix + self.prompt + self.max_new_tokens
        return (f"{head}prompt of {self.prompt} tokens + {m} {self.max_new_tokens} = {total} exceeds the model's "
                f"context of n_positions {self.n_positions} tokens; shorten the prompt or lower {m}")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit (max_queue): retry later."""


class ShuttingDown(RuntimeError):
    """The engine is draining before it stops and admits nothing new: retry elsewhere or later."""


class Cancelled(RuntimeError):
    """A request's sequences were cancelled (by its caller, or by an engine shutting down) before they ended."""


class ReadTimeout(Cancelled):
    """A request's reader left its Steps unread for longer than the engine's read_timeout: it was cancelled,
    and its KV rows went to other requests."""
