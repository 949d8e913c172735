"""What every benchmark shares: results folder, machine description, the 124M-shape checkpoint, engine loading."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_checkpoint(folder: Path, seed: int = 0) -> Path:
    """GPT2Config() (124M shape), seeded random init, saved once (needs torch + transformers)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    write_id_tokenizer(folder, GPT2Config().vocab_size)
    return folder


def checkpoint(arg: str | None) -> Path:
    """--checkpoint as given, else the random-init 124M-shape checkpoint (made once in the cache)."""
    return Path(arg) if arg else make_checkpoint(Path.home() / ".cache" / "gpt2-onnx" / "bench-gpt2-124m")


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
