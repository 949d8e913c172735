"""The manifest: the one frozen description of an exported model that the runtime reads."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
COPY_MODEL_NAME = "kv_copy.onnx"  # copies KV rows between buffers on the session's device
EMBEDS_MODEL_NAME = "embeds.onnx"  # model.onnx entered by input embeddings: the KV of prompt-tuning virtual tokens
TOKENIZER_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"  # the checkpoint's chat template, when it has one
FORMAT_VERSION = 5  # bump when the graph contract changes; the engine refuses other versions

# Graph I/O names. Layer-indexed names come from these templates, never from substring search.
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS_INDEX = "logits_index"
LOGITS_ROWS = "logits_rows"  # batch rows whose logits leave the graph (rows that sample); next_token covers all
LOGITS = "logits"
NEXT_TOKEN = "next_token"  # argmax of logits in the graph (greedy without a logits copy); -1: best logit not finite
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"
# LoRA at run time (exports with lora_slots > 0): each row's adapter slot (0: none), and per layer and module
# every slot's adapter side by side, in blocks of max_lora_rank + 1: slot s holds columns (A) / rows (B)
# s * (R + 1) .. s * (R + 1) + R; the last of them is zero in A and lora_bias in B (see graph.build)
LORA_SLOT = "lora_slot"  # (B,) int64
LORA_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the Conv1D projections LoRA targets
LORA_A = "lora.h.{i}.{m}.A"  # (in, (lora_slots + 1) * (max_lora_rank + 1)): lora_A.T per slot
LORA_B = "lora.h.{i}.{m}.B"  # ((lora_slots + 1) * (max_lora_rank + 1), out): lora_B.T * scaling, bias * scaling
# facts the exporter writes into model.onnx's metadata; the engine checks them against the manifest
GRAPH_FACTS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "kv_head_size", "weights_digest")
# kv_copy.onnx: for every KV buffer j (past-name order) dst.{j} = Pad(Slice(src.{j}, :length on axis 2), pads)
COPY_SRC = "src.{j}"
COPY_DST = "dst.{j}"
COPY_LENGTH = "length"  # (1,) int64: positions to copy
COPY_PADS = "pads"  # (8,) int64: ONNX Pad pads that grow the copied positions to the destination length
# embeds.onnx: model.onnx's inputs with INPUTS_EMBEDS (B, S, n_embd) in place of input_ids (wpe is added in the
# graph) and no logits inputs; outputs the present KV only. Its weights are model.onnx's, in the same data file.
INPUTS_EMBEDS = "inputs_embeds"


def cache_root() -> Path:
    """Where exports of checkpoints are kept: $GPT2_ONNX_CACHE, else $XDG_CACHE_HOME/gpt2-onnx,
    else ~/.cache/gpt2-onnx."""
    if os.environ.get("GPT2_ONNX_CACHE"):
        return Path(os.environ["GPT2_ONNX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2-onnx"


LFS_MAGIC = b"version https://git-lfs"  # the first bytes of a Git LFS pointer file


def read_error(path: str | Path, e: OSError) -> ValueError:
    """A file or folder that exists but cannot be read (permissions): named, never mistaken for a bad one."""
    return ValueError(f"{path} cannot be read ({type(e).__name__}: {e.strerror}); make it readable "
                      "(check its permissions and owner) or copy it somewhere you can read")


def check_readable(folder: Path) -> None:
    """A folder whose files cannot be listed or opened is named, not taken for one without them."""
    if folder.is_dir() and not os.access(folder, os.R_OK | os.X_OK):
        raise read_error(folder, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


# A Hugging Face Hub repo id as huggingface_hub validates it: `name` or `owner/name`, word characters,
# '-' and '.', starting and ending with a word character, no '--' or '..' (so never ./x, ../x, /x or ~/x)
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}", re.ASCII)


def is_hub_id(spec: str) -> bool:
    """Whether `spec` can name a Hugging Face Hub repo (`gpt2`, `openai-community/gpt2`)."""
    return bool(_HUB_ID.fullmatch(spec)) and "--" not in spec and ".." not in spec and not spec.endswith(".git")


def check_model_spec(spec: str) -> None:
    """A model spec that is neither an existing path nor a Hub id (`./nope`, `/x/y`, `~/m`, `a/b/c`, or
    `dir/name` where `dir` is a local folder) is a missing local folder: a ValueError at once, before
    anything is imported or downloaded for it."""
    path = Path(spec).expanduser()
    if path.exists() or is_hub_id(spec) and not ("/" in spec and Path(spec.split("/")[0]).is_dir()):
        return  # an owner/name whose owner is a local folder is a path into that folder
    where = "" if str(path.absolute()) == spec else f" ({path.absolute()})"
    raise ValueError(f"{spec}: no such folder{where}; pass an exported folder, a Hugging Face checkpoint folder "
                     "or a Hub id like 'gpt2'")


def is_lfs_pointer(path: Path) -> bool:
    """Whether a file is a Git LFS pointer (a clone without `git lfs pull`); an unreadable file is a ValueError."""
    try:
        with open(path, "rb") as f:
            return f.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError as e:
        raise read_error(path, e) from e


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 dimensions and export facts, written by export as manifest.json beside model.onnx."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    eos_token_id: int
    bos_token_id: int
    dtype: str = "float32"  # activations / KV cache dtype: float32 | float16
    quantization: str | None = None  # None | int8 | int4 (weight-only MatMulNBits)
    source: str = ""  # checkpoint the model was exported from
    name: str = ""  # the model's name: a Hub id as given, else the checkpoint folder's name (the served model id)
    exporter_version: str = ""
    format_version: int = FORMAT_VERSION
    onnx_bytes: int = 0  # size of model.onnx, to detect truncated copies
    kv_copy_bytes: int = 0  # size of kv_copy.onnx
    embeds_bytes: int = 0  # size of embeds.onnx (0: an export from before it, which has none)
    external_data: str | None = None  # file holding the weights (page-aligned: onnxruntime maps it)
    external_data_bytes: int = 0
    kv_head_size_padded: int = 0  # 0: heads not padded; else each head zero-padded to this size (a multiple of 8)
    adapter: str | None = None  # adapter folder applied at export (PEFT LoRA/IA3 merged, an adapters-library
    # bottleneck as graph nodes), or CHECKPOINT#NAME for a bottleneck saved inside the checkpoint; None if none
    weights_digest: str = ""  # "sha256:..." over the graph's initializers (name, dtype, dims, bytes) in graph order
    lora_slots: int = 0  # LoRA adapters the graph takes at run time (0: none, the plain graph)
    max_lora_rank: int = 0  # their largest rank (smaller ranks are zero-padded to it)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_head_size(self) -> int:
        """Head size of the KV buffers the graph reads and writes (the padded head size, if padded)."""
        return self.kv_head_size_padded or self.head_size

    @property
    def np_dtype(self) -> type:
        """numpy dtype of activations and KV buffers."""
        return np.float16 if self.dtype == "float16" else np.float32

    def graph_facts(self) -> dict[str, str]:
        """GRAPH_FACTS of this config, as model.onnx's metadata holds them."""
        return {k: str(getattr(self, k)) for k in GRAPH_FACTS}

    def past_names(self) -> list[str]:
        return [t.format(i=i) for i in range(self.n_layer) for t in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [t.format(i=i) for i in range(self.n_layer) for t in (PRESENT_KEY, PRESENT_VALUE)]

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each module kind LoRA targets, as the graph holds it (heads padded)."""
        E, H = self.n_embd, self.n_head * self.kv_head_size
        return {"attn.c_attn": (E, 3 * H), "attn.c_proj": (H, E), "mlp.c_fc": (E, 4 * E), "mlp.c_proj": (4 * E, E)}

    def lora_inputs(self) -> dict[str, tuple[int, ...]]:
        """Graph inputs of the LoRA adapters' slots (none without lora_slots), name -> shape."""
        if not self.lora_slots:
            return {}
        n, out = (self.lora_slots + 1) * (self.max_lora_rank + 1), {}
        for i in range(self.n_layer):
            for m, (k, o) in self.lora_shapes().items():
                out |= {LORA_A.format(i=i, m=m): (k, n), LORA_B.format(i=i, m=m): (n, o)}
        return out

    def save(self, folder: str | Path) -> Path:
        """Write manifest.json into folder."""
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        """Read and validate manifest.json from an exported folder."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(
                f"{path} not found: {folder} is not an exported model folder. "
                f"Export a checkpoint first: gpt2-onnx export MODEL -o {folder}"
            )
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise read_error(path, e) from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-export the model with gpt2-onnx export") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path} does not hold a JSON object; re-export the model with gpt2-onnx export")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {version!r} but this engine reads format {FORMAT_VERSION}; "
                "re-export the model with this version's gpt2-onnx export"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in raw and f.default is dataclasses.MISSING)
        if unknown or missing:
            raise ValueError(f"{path}: unknown fields {unknown}, missing fields {missing}; re-export the model")
        cfg = cls(**raw)
        cfg.validate(str(path))
        return cfg

    def validate(self, where: str = "config") -> None:
        """Raise ValueError if the dimensions are inconsistent."""
        for name in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{where}: {name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{where}: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for name in ("eos_token_id", "bos_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise ValueError(f"{where}: {name} {v!r} is outside the vocabulary [0, {self.vocab_size})")
        kv = self.kv_head_size_padded
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0 or (kv and (kv < self.head_size or kv % 8)):
            raise ValueError(f"{where}: kv_head_size_padded must be 0 or a multiple of 8 >= head_size "
                             f"{self.head_size}, got {kv!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"{where}: dtype must be float32 or float16, got {self.dtype!r}")
        for name in ("lora_slots", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{where}: {name} must be an integer >= 0, got {v!r}")
        if bool(self.lora_slots) != bool(self.max_lora_rank):
            raise ValueError(f"{where}: lora_slots {self.lora_slots} and max_lora_rank {self.max_lora_rank} must be "
                             "both 0 or both positive")
        if self.quantization not in (None, "int8", "int4"):
            raise ValueError(f"{where}: quantization must be null, int8 or int4, got {self.quantization!r}")
