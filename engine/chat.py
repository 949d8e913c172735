"""Chat: messages rendered into one prompt by the model's chat template (Jinja, sandboxed, as
transformers' apply_chat_template renders it). Engine.chat and POST /v1/chat/completions share it.

jinja2 is imported only when a template is rendered (`pip install 'gpt2-onnx[chat]'`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from gpt2_onnx import config as C
from gpt2_onnx.errors import InvalidInput

# DialoGPT's convention (a GPT2LMHeadModel): each turn's text followed by <|endoftext|>
DIALOGPT = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}"
NO_TEMPLATE = ("this model has no chat template: serve it with --chat-template FILE|STRING (Engine.chat: "
               "chat_template=...), e.g. DialoGPT's: " + DIALOGPT)


def folder_template(folder: Path) -> str | None:
    """An exported folder's chat template (the checkpoint's, kept by the export), or None."""
    path = folder / C.CHAT_TEMPLATE_NAME
    return path.read_text(encoding="utf-8") if path.is_file() else None


def read_template(spec: str) -> str:
    """--chat-template: a file's text, or the template itself when it is no file."""
    p = Path(spec).expanduser()
    try:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read --chat-template {spec}: {e}") from None
    if "{" not in spec:
        raise ValueError(f"--chat-template {spec!r} is neither a file nor a Jinja template")
    return spec


def check_messages(messages) -> list[dict]:
    """Messages as [{"role": str, "content": str}, ...]; InvalidInput naming the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInput("messages must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise InvalidInput(f"messages[{i}] must be an object with a role (a string)", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidInput(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                   "are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string", "messages")
        out.append({**m, "content": content})
    return out


@lru_cache(maxsize=32)
def _compiled(template: str):
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InvalidInput("chat templates need jinja2: pip install 'gpt2-onnx[chat]'", "messages") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise InvalidInput(f"the chat template does not compile: {e}", "chat_template") from None


def render(template: str | None, messages, *, add_generation_prompt: bool = True, bos_token: str = "",
           eos_token: str = "") -> str:
    """The prompt of messages under a chat template (InvalidInput without one, or when it fails)."""
    if template is None:
        raise InvalidInput(NO_TEMPLATE, "messages")
    messages = check_messages(messages)
    compiled = _compiled(template)
    from jinja2 import TemplateError

    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token)
    except TemplateError as e:
        raise InvalidInput(f"the chat template failed on these messages: {e}", "messages") from None
