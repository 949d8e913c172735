"""export_model: checkpoint in, self-contained engine folder out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gpt2_onnx import config as C
from gpt2_onnx.errors import option_error
from gpt2_onnx.export import EXPORTER_VERSION, bottleneck, checkpoint
from gpt2_onnx.export.graph import build, build_embeds, build_kv_copy, lm_head_first

DATA_NAME = "model.onnx.data"
PAGE = 4096  # external data offsets are multiples of this, so that the file can be memory-mapped

Progress = Callable[[str], None]


class WriteError(ValueError):
    """The export could not be written (ENOSPC, EIO, EDQUOT, ...): nothing was published, the temp folder is gone."""

    def __init__(self, out: Path, e: OSError):
        self.errno, self.strerror, self.out = e.errno, e.strerror or str(e), out
        super().__init__(f"cannot write the export {out} ({self.strerror}); nothing was written there: free space in "
                         f"{out.parent} or choose another folder")


# Activations that are the tanh-approximated GELU of GPT-2, which FastGelu computes. gelu_fast writes
# sqrt(2/pi) as 0.7978845608 and x + 0.044715 x^3 as x (1 + 0.044715 x^2): equal up to fp32 rounding.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention's head size must be a multiple of this


def _model_config(ck: checkpoint.Checkpoint, dtype: str, quantization: str | None,
                  adapter: str | None) -> tuple[C.ModelConfig, float, list[float]]:
    hf, where = ck.config, f"{ck.folder / 'config.json'}"
    n_layer, n_head, n_embd = hf.get("n_layer", 12), hf.get("n_head", 12), hf.get("n_embd", 768)
    wte = ck.weights.get("wte.weight")
    vocab = int(wte.shape[0]) if wte is not None else hf.get("vocab_size", 50257)
    eos = hf.get("eos_token_id", 50256)
    bos = hf.get("bos_token_id", eos)
    fields = dict(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=hf.get("n_positions", 1024), vocab_size=vocab,
        eos_token_id=eos if isinstance(eos, int) else eos[0], bos_token_id=bos if isinstance(bos, int) else bos[0],
        dtype=dtype, quantization=quantization, source=ck.source, name=ck.name, exporter_version=EXPORTER_VERSION,
        adapter=adapter,
    )
    C.ModelConfig(**fields).validate(where)
    hs = n_embd // n_head
    if hs % GQA_HEAD_MULTIPLE:  # zero-pad each head (exact, see graph.pad_heads)
        fields["kv_head_size_padded"] = -(-hs // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE
    cfg = C.ModelConfig(**fields)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{where}: n_inner {hf['n_inner']} is not 4*n_embd; not supported")
    if hf.get("activation_function", "gelu_new") not in TANH_GELU:
        raise ValueError(f"{where}: activation_function {hf['activation_function']!r} is not supported "
                         "(gelu_new, gelu_pytorch_tanh or gelu_fast, the tanh-approximated GELU of GPT-2)")
    scales = []
    for i in range(n_layer):
        s = 1.0 / np.sqrt(hs) if hf.get("scale_attn_weights", True) else 1.0  # the real head size, padded or not
        if hf.get("scale_attn_by_inverse_layer_idx", False):
            s /= i + 1
        scales.append(float(s))
    return cfg, float(hf.get("layer_norm_epsilon", 1e-5)), scales


def _expected_shapes(cfg: C.ModelConfig) -> dict[str, tuple[int, ...]]:
    E, V, P = cfg.n_embd, cfg.vocab_size, cfg.n_positions
    expect = {"wte.weight": (V, E), "wpe.weight": (P, E), "ln_f.weight": (E,), "ln_f.bias": (E,)}
    for i in range(cfg.n_layer):
        p = f"h.{i}"
        expect |= {
            f"{p}.ln_1.weight": (E,), f"{p}.ln_1.bias": (E,), f"{p}.ln_2.weight": (E,), f"{p}.ln_2.bias": (E,),
            f"{p}.attn.c_attn.weight": (E, 3 * E), f"{p}.attn.c_attn.bias": (3 * E,),
            f"{p}.attn.c_proj.weight": (E, E), f"{p}.attn.c_proj.bias": (E,),
            f"{p}.mlp.c_fc.weight": (E, 4 * E), f"{p}.mlp.c_fc.bias": (4 * E,),
            f"{p}.mlp.c_proj.weight": (4 * E, E), f"{p}.mlp.c_proj.bias": (E,),
        }
    return expect


def _natural(name: str) -> list:
    """Sort key that puts h.2 before h.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "none"


def _check_weights(cfg: C.ModelConfig, w: dict[str, np.ndarray], folder: Path, hf: dict) -> None:
    """Every weight the config implies is there with its shape, and nothing else is (lm_head optional)."""
    expect = _expected_shapes(cfg)
    if hf.get("tie_word_embeddings", True) is False:  # transformers would initialize a missing head at random
        expect["lm_head.weight"] = (cfg.vocab_size, cfg.n_embd)
    missing = sorted(set(expect) - set(w), key=_natural)
    leftover = sorted(set(w) - set(expect) - {"lm_head.weight"}, key=_natural)
    if missing or leftover:
        raise ValueError(
            f"{folder}: the weights do not match config.json (n_layer {cfg.n_layer}, n_embd {cfg.n_embd}): "
            f"missing {_some(missing)}; not used {_some(leftover)}. Check that config.json belongs to these "
            "weights and that the checkpoint is a GPT-2 language model (GPT2LMHeadModel or GPT2Model)"
        )
    expect.setdefault("lm_head.weight", (cfg.vocab_size, cfg.n_embd))
    for name, arr in w.items():
        if tuple(arr.shape) != expect[name]:
            raise ValueError(f"{folder}: weight {name} has shape {tuple(arr.shape)}, config implies {expect[name]}")
    if "lm_head.weight" in w and np.array_equal(w["lm_head.weight"], w["wte.weight"]):
        del w["lm_head.weight"]  # tied: store wte once


NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GPT2_SPECIAL = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return checkpoint.read_json_object(path)


def _content(token) -> str:
    return token if isinstance(token, str) else token["content"]


def _added_token(token, special: bool):
    """A token from tokenizer_config / special_tokens_map (a string or a dict of AddedToken fields)."""
    from tokenizers import AddedToken

    if isinstance(token, str):
        return AddedToken(token, special=special)
    flags = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
    return AddedToken(token["content"], special=special or bool(token.get("special")), **flags)


def _added_tokens(folder: Path, config: dict) -> list[tuple[int | None, object]]:
    """(declared id or None, AddedToken) in the order transformers' GPT2Tokenizer adds them.

    tokenizer_config.json's added_tokens_decoder when it has one; else the legacy files:
    special_tokens_map.json (overriding tokenizer_config's named tokens) and added_tokens.json
    ({token: id}; special if named in either). Then every named or extra special token not yet
    added, with GPT-2's defaults (<|endoftext|> for bos, eos and unk).
    """
    named = {k: config[k] for k in NAMED_SPECIAL if config.get(k)}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = list(extra.values() if isinstance(extra, dict) else extra)
    if "added_tokens_decoder" in config:
        added = [(int(i), _added_token(t, False)) for i, t in config["added_tokens_decoder"].items()]
    else:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in ("additional_special_tokens", "extra_special_tokens"):
                extra += [t for t in (value.values() if isinstance(value, dict) else value) if t not in extra]
            elif key in NAMED_SPECIAL and value:
                named[key] = value
        special = {_content(t) for t in [*named.values(), *extra]}
        from tokenizers import AddedToken

        added = [(int(i), AddedToken(t, lstrip=False, rstrip=False, normalized=t not in special, special=t in special))
                 for t, i in _read_json(folder / "added_tokens.json").items()]
    added.sort(key=lambda it: it[0])
    have = {tok.content for _, tok in added}
    named = {**GPT2_SPECIAL, **named}
    for token in [*(named[k] for k in NAMED_SPECIAL if named.get(k)), *extra]:  # transformers' order
        if _content(token) not in have:
            added.append((None, _added_token(token, True)))
            have.add(_content(token))
    return added


def write_tokenizer(folder: Path, dest: Path) -> None:
    """Copy tokenizer.json, or build it from vocab.json + merges.txt (GPT-2 byte-level BPE) with the
    added and special tokens of added_tokens.json / tokenizer_config.json / special_tokens_map.json,
    as transformers' GPT2Tokenizer reads them."""
    for name in (C.TOKENIZER_NAME, "vocab.json", "merges.txt"):
        if (folder / name).is_file():
            checkpoint.check_not_lfs_pointer(folder / name, "tokenizer")
    if (folder / C.TOKENIZER_NAME).is_file():
        shutil.copyfile(folder / C.TOKENIZER_NAME, dest)  # a link (a Hub snapshot's blob) is copied as its file
        return
    build_tokenizer(folder).save(str(dest))


def build_tokenizer(folder: Path):
    """The tokenizers.Tokenizer of vocab.json + merges.txt and the added tokens, as transformers' GPT2Tokenizer."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ValueError(f"{folder} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    config = _read_json(folder / "tokenizer_config.json")
    if config.get("split_special_tokens"):
        raise ValueError(f"{folder / 'tokenizer_config.json'}: split_special_tokens is not supported; "
                         "save the tokenizer as tokenizer.json (tokenizer.save_pretrained) and export again")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = _added_tokens(folder, config)
    tok.add_tokens([t for _, t in added])
    for declared, t in added:
        if declared is not None and tok.token_to_id(t.content) != declared:
            raise ValueError(f"{folder}: added token {t.content!r} is declared with id {declared} but follows "
                             f"the vocabulary as id {tok.token_to_id(t.content)}; the tokenizer files disagree")
    return tok


def check_tokenizer(folder: Path, vocab_size: int) -> None:
    """Refuse a tokenizer that does not belong to the checkpoint: one with more tokens (added tokens included)
    or higher ids than the model's vocabulary. Smaller is fine (GPT-2 models often pad the vocabulary). Checked
    on the file's content, wherever it lives (a Hub snapshot's tokenizer.json is a link into its blob store)."""
    from tokenizers import Tokenizer

    path = folder / C.TOKENIZER_NAME
    if path.is_file():
        checkpoint.check_not_lfs_pointer(path, "tokenizer")
        where = f"{path}" + (f" (a link to {path.resolve()})" if path.is_symlink() else "")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception for text that is not a tokenizer
            raise ValueError(f"{where} is not a tokenizer.json that tokenizers can read ({str(e)[:200]}); put the "
                             "checkpoint's own tokenizer.json there (tokenizer.save_pretrained writes it)") from None
    else:
        where, tok = f"{folder / 'vocab.json'} + merges.txt", build_tokenizer(folder)
    ids = tok.get_vocab(with_added_tokens=True).values()
    n = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
    if n > vocab_size:
        raise ValueError(f"{where} has {n} tokens (with its added tokens) but {folder / 'config.json'} gives the "
                         f"model a vocabulary of {vocab_size} (vocab_size): the tokenizer belongs to another model; "
                         "put this checkpoint's own tokenizer there (a tokenizer may be smaller than the model's "
                         "vocabulary, never larger)")


def chat_template(folder: Path) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (its
    "default" one when it holds several)."""
    if (folder / C.CHAT_TEMPLATE_NAME).is_file():
        return (folder / C.CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        t = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from None
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t.strip() else None


def weights_digest(proto) -> str:
    """sha256 over the graph's initializers (name, dtype, dims, bytes) in graph order."""
    h = hashlib.sha256()
    for t in proto.graph.initializer:
        h.update(f"{t.name}\0{t.data_type}\0{list(t.dims)}\0".encode())
        h.update(t.raw_data)
    return "sha256:" + h.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """weights_digest of an exported folder as its files hold it: model.onnx's initializers, the bytes of those
    moved to the external data file read from there in chunks (never the whole model in memory). A ValueError
    names a file that is missing, unreadable or shorter than the graph says."""
    import onnx

    folder = Path(folder)
    path = folder / C.MODEL_NAME
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise C.read_error(path, e) from None
    except Exception as e:  # a protobuf DecodeError: not a graph
        raise ValueError(f"{path} is not an ONNX graph ({type(e).__name__}); the file is damaged") from None
    h, files = hashlib.sha256(), {}
    try:
        for t in proto.graph.initializer:
            h.update(f"{t.name}\0{t.data_type}\0{list(t.dims)}\0".encode())
            if t.data_location != onnx.TensorProto.EXTERNAL:
                h.update(t.raw_data)
                continue
            info = {e.key: e.value for e in t.external_data}
            data = (folder / info.get("location", "")).resolve()
            if data.parent != folder.resolve() or not info.get("location"):
                raise ValueError(f"{path}: the weight {t.name} lives outside the export ({info.get('location')!r})")
            if data not in files:
                try:
                    files[data] = open(data, "rb")
                except OSError as e:
                    raise C.read_error(data, e) from None
            f, left = files[data], int(info["length"])
            f.seek(int(info.get("offset", 0)))
            while left:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise ValueError(f"{data} ends before the weight {t.name} does: the file is truncated")
                h.update(chunk)
                left -= len(chunk)
    except OSError as e:  # EIO while reading
        raise ValueError(f"{folder} cannot be read ({e.strerror})") from None
    finally:
        for f in files.values():
            f.close()
    return "sha256:" + h.hexdigest()


def verify_export(folder: str | Path) -> str | None:
    """None if the weights of an exported folder match the digest its manifest recorded, else what is wrong."""
    folder = Path(folder)
    path = folder / C.MANIFEST_NAME
    try:
        recorded = checkpoint.read_json_object(path).get("weights_digest")
    except ValueError as e:
        return str(e)
    if not recorded:
        return f"{path} records no weights digest (an export from before they were recorded)"
    try:
        found = folder_digest(folder)
    except ValueError as e:
        return str(e)
    if found != recorded:
        return (f"the weights do not match the digest in {path} ({found[:19]}... found, {recorded[:19]}... "
                "recorded): a file was changed or damaged after the export")
    return _embeds_problem(folder)


def _embeds_problem(folder: Path) -> str | None:
    """None if embeds.onnx (when the export has one) holds model.onnx's own weight entries (the same inline
    bytes, the same places in the data file, which the digest covers), else what is wrong."""
    import onnx

    path = folder / C.EMBEDS_MODEL_NAME
    recorded = checkpoint.read_json_object(folder / C.MANIFEST_NAME).get("embeds_bytes", 0)
    if not path.is_file():
        return f"{path} is missing, which the manifest records ({recorded} bytes)" if recorded else None
    if path.stat().st_size != recorded:
        return f"{path} has {path.stat().st_size} bytes but the manifest records {recorded}: the file was changed"
    try:
        model = {t.name: t for t in onnx.load(str(folder / C.MODEL_NAME), load_external_data=False).graph.initializer}
        embeds = onnx.load(str(path), load_external_data=False).graph.initializer
    except OSError as e:
        return str(C.read_error(e.filename or path, e))
    except Exception as e:  # a protobuf DecodeError: not a graph
        return f"{path} is not an ONNX graph ({type(e).__name__}); the file is damaged"
    wrong = [t.name for t in embeds if model.get(t.name) != t]
    if wrong:
        return (f"{path}: the weights {', '.join(wrong[:4])} differ from model.onnx's: a file was changed or damaged "
                "after the export")
    return None


def check_options(dtype: str, quantize: str | None) -> None:
    if dtype not in ("float32", "float16"):
        raise option_error("dtype", f"must be float32 or float16, got {dtype!r}")
    if quantize not in (None, "int8", "int4"):
        raise option_error("quantize", f"must be int8 or int4, got {quantize!r}")


DEFAULT_LORA_RANK = 16  # --max-lora-rank when --lora-slots is given alone (vLLM's default too)


def lora_options(lora_slots: int, max_lora_rank: int | None) -> tuple[int, int]:
    """(lora_slots, max_lora_rank) as the manifest records them: (0, 0) without slots."""
    for name, v in (("lora_slots", lora_slots), ("max_lora_rank", max_lora_rank)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise option_error(name, f"must be an integer >= 0, got {v!r}")
    if not lora_slots:
        if max_lora_rank:
            raise option_error("max_lora_rank", "needs lora_slots (--lora-slots K): the LoRA adapters taken at "
                                                "run time")
        return 0, 0
    if max_lora_rank == 0:
        raise option_error("max_lora_rank", "must be >= 1 with lora_slots")
    return lora_slots, max_lora_rank or DEFAULT_LORA_RANK


def read_checkpoint(model: str, dtype: str, quantize: str | None, adapter: str | Path | None, say: Progress,
                    lora: tuple[int, int] = (0, 0)):
    """What every export format builds from: the checkpoint (its weights with a PEFT adapter merged, or its
    `bottleneck` adapter of the adapters library), its ModelConfig (with `lora`: (lora_slots, max_lora_rank)),
    layer-norm eps, attention scales, and the MatMulNBits quantizer (None without quantize)."""
    say(f"reading checkpoint {model}")
    ck = checkpoint.load(model)
    adapter = str(Path(adapter).expanduser().resolve()) if adapter is not None else None
    cfg, eps, scales = _model_config(ck, dtype, quantize, adapter)
    ck.bottleneck = bottleneck.take_from_checkpoint(ck.config, ck.weights, str(ck.folder / "config.json"),
                                                    cfg.n_layer, cfg.n_embd)  # saved after adapters.init
    if ck.bottleneck is not None:
        if adapter:
            raise ValueError(f"{ck.folder} already holds the bottleneck adapter {ck.bottleneck.name!r} (saved after "
                             "adapters.init); export it without --adapter, or pass the base checkpoint instead")
        say(f"applying the bottleneck adapter {ck.bottleneck.name!r} saved in the checkpoint")
        cfg = dataclasses.replace(cfg, adapter=f"{ck.folder}#{ck.bottleneck.name}")
    if lora[0]:
        cfg = dataclasses.replace(cfg, lora_slots=lora[0], max_lora_rank=lora[1])
    _check_weights(cfg, ck.weights, ck.folder, ck.config)
    check_tokenizer(ck.folder, cfg.vocab_size)  # before the graph is built: a wrong tokenizer fails at once
    if adapter and bottleneck.is_adapters_folder(adapter):
        say(f"reading bottleneck adapter {adapter}")
        ck.bottleneck = bottleneck.read_folder(adapter, cfg.n_layer, cfg.n_embd,
                                               ck.weights.get("lm_head.weight", ck.weights["wte.weight"]))
    elif adapter:
        from gpt2_onnx.export.adapters import merge_adapter

        say(f"merging adapter {adapter}")
        ck.weights = merge_adapter(ck.weights, adapter)
    quantizer = None
    if quantize:
        from gpt2_onnx.export.quantize import matmul_nbits

        bits = 8 if quantize == "int8" else 4
        quantizer = lambda arr: matmul_nbits(arr, bits=bits, dtype=dtype)  # noqa: E731
    return ck, cfg, eps, scales, quantizer


def export_model(model: str, out: str | Path, *, dtype: str = "float32", quantize: str | None = None,
                 adapter: str | Path | None = None, lora_slots: int = 0, max_lora_rank: int | None = None,
                 progress: Progress | None = None) -> Path:
    """Export a GPT-2 checkpoint (Hub id or HF folder) to `out`; returns the folder.

    `adapter`: a PEFT LoRA or IA3 adapter folder merged into the weights (export.adapters), or a bottleneck
    adapter of the adapters library (save_adapter's folder), run as graph nodes (export.bottleneck); a
    checkpoint saved after adapters.init brings its bottleneck adapter along.
    `lora_slots`: LoRA adapters of rank <= max_lora_rank (default 16) taken at run time (Engine.load_lora),
    on all four projections, each row of a batch with its own; 0 keeps the plain graph.
    The folder is written atomically: a failed export leaves no half-written model behind.
    """
    say = progress or (lambda msg: None)
    check_options(dtype, quantize)
    lora = lora_options(lora_slots, max_lora_rank)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / C.MANIFEST_NAME).is_file():
        raise ValueError(f"{out} is a non-empty folder that is not a gpt2-onnx export; choose another -o")

    ck, cfg, eps, scales, quantizer = read_checkpoint(model, dtype, quantize, adapter, say, lora)
    say(f"building graph ({cfg.n_layer} layers, n_embd {cfg.n_embd}, {dtype}{', ' + quantize if quantize else ''})")
    proto = build(cfg, ck.weights, eps=eps, attn_scales=scales, quantize=quantizer, bottleneck=ck.bottleneck)
    lm_head_first(proto)
    del ck.weights

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ValueError(f"cannot write into {out.parent} ({e.strerror}); choose a writable folder") from e
    old = None
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users of a shared cache
        import onnx

        say("writing model.onnx")
        digest = weights_digest(proto)  # before saving: external data moves the bytes out of the proto
        onnx.helper.set_model_props(proto, C.ModelConfig(**{**cfg.__dict__, "weights_digest": digest}).graph_facts())
        onnx_path = tmp / C.MODEL_NAME
        save_with_external_data(proto, onnx_path, tmp / DATA_NAME)
        onnx.save_model(build_embeds(proto, cfg), str(tmp / C.EMBEDS_MODEL_NAME))  # its weights: model.onnx.data's
        onnx.save_model(build_kv_copy(cfg), str(tmp / C.COPY_MODEL_NAME))
        write_tokenizer(ck.folder, tmp / C.TOKENIZER_NAME)
        template = chat_template(ck.folder)
        if template is not None:  # the checkpoint's chat template, for Engine.chat and /v1/chat/completions
            (tmp / C.CHAT_TEMPLATE_NAME).write_text(template, encoding="utf-8")
        final = C.ModelConfig(**{**cfg.__dict__, "onnx_bytes": onnx_path.stat().st_size, "weights_digest": digest,
                                 "kv_copy_bytes": (tmp / C.COPY_MODEL_NAME).stat().st_size,
                                 "embeds_bytes": (tmp / C.EMBEDS_MODEL_NAME).stat().st_size,
                                 "external_data": DATA_NAME, "external_data_bytes": (tmp / DATA_NAME).stat().st_size})
        final.save(tmp)
        if out.exists():  # a previous export: moved aside by one rename, so no reader sees half a folder
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            os.replace(out, old)
        os.replace(tmp, out)  # publish: readers see no folder or the whole export, never a part of it
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():  # the publish failed: the previous export goes back
            os.replace(old, out)
            old = None
        if isinstance(e, OSError) and e.filename and not str(e.filename).startswith(str(tmp)):
            raise C.read_error(e.filename, e) from e  # a checkpoint file (the chat template) cannot be read
        if isinstance(e, OSError):  # a full disk (ENOSPC), a quota, an I/O error: one clear error
            raise WriteError(out, e) from e
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    say(f"exported to {out}")
    return out


def save_with_external_data(proto, onnx_path: Path, data_path: Path) -> None:
    """model.onnx holds the graph, model.onnx.data every weight of 1 KB or more, each at an offset that
    is a multiple of the page size: onnxruntime then maps the file instead of copying it (no second
    copy of the weights at load, and rows the model never reads are never resident). Initializers with equal
    bytes (a tied LM head's and the embedding's) are stored once, each pointing at the same place."""
    import onnx

    stored: dict[bytes, int] = {}  # sha256 of the bytes -> their offset
    with open(data_path, "wb") as f:
        for t in proto.graph.initializer:
            if len(t.raw_data) < 1024:
                continue
            digest = hashlib.sha256(t.raw_data).digest()
            if digest not in stored:
                f.write(b"\0" * (-f.tell() % PAGE))
                stored[digest] = f.tell()
                f.write(t.raw_data)
            offset, length = stored[digest], len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(proto, str(onnx_path))
