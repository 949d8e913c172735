"""tokenizer.json via `tokenizers`, plus incremental decoding that only emits whole UTF-8 characters."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from gpt2_onnx.config import is_lfs_pointer
from gpt2_onnx.errors import InvalidInput


def check_text(text: str) -> str:
    """text, or a ValueError where it holds lone surrogates (not encodable as UTF-8, so not tokenizable)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(f"prompt is not valid Unicode text ({e.reason} at character {e.start})", "prompt") from None
    return text


class Tokenizer:
    """Encode text to ids and decode ids to text (special tokens dropped).

    Special-token text in a prompt (`<|endoftext|>`) encodes as the special token, as Hugging Face's
    tokenizers do; the library, the server and /tokenize follow this one policy.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path} not found: the exported folder is incomplete; re-export with gpt2-onnx export")
        if is_lfs_pointer(path):
            raise ValueError(f"{path} is a Git LFS pointer, not the tokenizer: run `git lfs pull` or re-export")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"could not read tokenizer {path}: {e}") from e
        self._texts: dict[int, str] = {}  # token_text's answers: logprobs ask for the same ids again and again

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its own from)."""
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        if len(text) > 4096:  # encode_batch releases the GIL: a long text does not stall other threads
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (a piece of a UTF-8 character shows as U+FFFD)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def token_name(self, token_id: int) -> str | None:
        """The vocabulary's name of a token (`<|endoftext|>`), or None outside the vocabulary."""
        return self._tok.id_to_token(token_id)

    def offsets(self, ids: list[int]) -> list[int]:
        """Character offset of each token in decode(ids): where the text it completes begins."""
        stream, out, at = TextStream(self), [], 0
        for t in ids:
            out.append(at)
            at += len(stream.push(t))
        return out


class TextStream:
    """Turns a growing id list into text deltas; a character split across tokens is held back."""

    def __init__(self, tok: Tokenizer, ids: list[int] | None = None):
        self.tok = tok
        self.ids: list[int] = list(ids or [])
        self.prefix = max(0, len(self.ids) - 5)  # decode with a little left context (spaces, merges)
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ('' while a character is incomplete)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
