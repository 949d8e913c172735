"""The export cache and the exporter under faults: a full disk during an export, an entry without manifest.json,
a checkpoint folder named with a leading dot, weights that no longer match the manifest's digest (cache verify),
and a tokenizer.json that belongs to another model (a link to an unrelated file). Every CLI error is one line on
stderr and exit code 2; real processes for the CLI, an injected OSError(ENOSPC) for the full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_onnx.export import export_model
from gpt2_onnx.resolve import cache_entries, resolve

TIMEOUT = 120

# the CLI with the disk full once the export starts writing its weights (some bytes land first)
FULL_DISK = """
import errno, os, sys
from gpt2_onnx.export import exporter
def full(proto, onnx_path, data_path):
    with open(data_path, "wb") as f:
        f.write(bytes(4096))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
exporter.save_with_external_data = full
sys.argv[0] = "gpt2-onnx"
from gpt2_onnx import cli
cli.main()
"""


def cli(*args, cache: Path, hook: str | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable, "-c", hook] if hook else [sys.executable, "-m", "gpt2_onnx.cli"]
    return subprocess.run([*head, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "GPT2_ONNX_CACHE": str(cache)})


def one_line(r, *messages: str, code: int = 2) -> str:
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-3000:]
    for m in messages:
        assert m in r.stderr, r.stderr
    return r.stderr


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GPT2_ONNX_CACHE", str(root))
    return root


def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing_behind(tiny, tmp_path, cache):
    _, _, ck, _ = tiny
    out = tmp_path / "exports" / "tiny"
    one_line(cli("export", ck, "-o", out, cache=cache, hook=FULL_DISK),
             f"cannot write the export {out} (No space left on device)", "free space")
    assert list(out.parent.iterdir()) == []  # no temp folder, no half export
    one_line(cli("generate", "-m", ck, "x", "-n", "2", cache=cache, hook=FULL_DISK),
             f"cannot write the export of {ck} into the cache {cache} (No space left on device)", "GPT2_ONNX_CACHE")
    assert list(cache.iterdir()) == []  # no entry, no temp folder, no lock file
    assert resolve(str(ck)).is_dir()  # with room, the same export works


def test_an_entry_without_its_manifest_is_listed_cleared_and_named_with_the_fix(tiny, cache):
    _, _, ck, _ = tiny
    entry = resolve(str(ck))
    (entry / "manifest.json").unlink()  # damaged: what `generate` once answered with "choose another -o"
    fix = f"gpt2-onnx cache clear {entry.name}"
    err = one_line(cli("generate", "-m", ck, "x", "-n", "2", cache=cache), f"{entry} has no manifest.json", fix)
    assert "choose another -o" not in err and "-o" not in err.replace(str(entry), "").replace(fix, "")
    one_line(cli("generate", "-m", entry, "x", "-n", "2", cache=cache), "has no manifest.json", fix)
    listed = cli("cache", "list", cache=cache)
    assert listed.returncode == 0 and "1 export(s)" in listed.stdout, listed.stderr
    assert f"{entry.name}" in listed.stdout and "incomplete: no manifest.json" in listed.stdout and fix in listed.stdout
    cleared = cli("cache", "clear", entry.name, cache=cache)
    assert cleared.returncode == 0 and "deleted 1 export(s)" in cleared.stdout and not entry.exists(), cleared.stderr
    again = resolve(str(ck))  # exported anew
    assert again == entry and (entry / "manifest.json").is_file()
    (entry / "manifest.json").unlink()
    assert cli("cache", "clear", cache=cache).returncode == 0 and not entry.exists()  # `clear` (all) removes it too


def test_a_checkpoint_folder_named_with_a_leading_dot_makes_an_entry_list_and_clear_see(tiny, tmp_path, cache):
    _, _, ck, _ = tiny
    dotted = shutil.copytree(ck, tmp_path / ".hidden-ck")
    entry = resolve(str(dotted))
    assert entry.parent == cache and entry.name.startswith("hidden-ck-")  # never a dot-name (a temp folder's)
    legacy = shutil.copytree(entry, cache / f".hidden-ck-{'0' * 16}")  # what earlier versions made of it
    listed = cli("cache", "list", cache=cache)
    assert listed.returncode == 0 and "2 export(s)" in listed.stdout, listed.stdout
    assert entry.name in listed.stdout and legacy.name in listed.stdout and str(dotted) in listed.stdout
    assert {e["name"] for e in cache_entries()} == {entry.name, legacy.name}
    cleared = cli("cache", "clear", legacy.name, cache=cache)
    assert cleared.returncode == 0 and not legacy.exists() and entry.exists(), cleared.stderr
    assert cli("cache", "clear", cache=cache).returncode == 0 and list(cache.iterdir()) == []


def test_cache_verify_checks_the_weights_digest(tiny, cache):
    import onnx

    from gpt2_onnx.export.exporter import folder_digest, weights_digest
    from gpt2_onnx.resolve import verify_cache

    _, _, ck, _ = tiny
    first, second = resolve(str(ck)), resolve(str(ck), quantize="int8")
    recorded = json.loads((first / "manifest.json").read_text())["weights_digest"]
    assert (first / "model.onnx.data").stat().st_size > 0  # the weights live in the external data file
    assert folder_digest(first) == recorded == weights_digest(onnx.load(first / "model.onnx"))
    ok = cli("cache", "verify", cache=cache)
    assert ok.returncode == 0 and ok.stdout.splitlines() == [f"{first.name}: ok", f"{second.name}: ok"] \
        or ok.stdout.splitlines() == [f"{second.name}: ok", f"{first.name}: ok"], ok.stdout + ok.stderr

    data = first / "model.onnx.data"
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 1  # one bit of one weight
    data.write_bytes(bytes(flipped))
    assert verify_cache(second.name) == [(second.name, None)]
    (name, problem), = verify_cache(first.name)
    assert name == first.name
    assert problem.startswith(f"the weights do not match the digest in {first / 'manifest.json'}"), problem
    with open(second / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    r = cli("cache", "verify", cache=cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and r.stdout == "", r.stderr  # one line per mismatch, each naming its entry and the fix
    for name, line in zip(sorted([first.name, second.name]), sorted(errors)):
        assert line.startswith(f"error: {name}: ") and f"gpt2-onnx cache clear {name}" in line, line
    assert any("the weights do not match the digest" in line for line in errors)
    assert any("is truncated" in line for line in errors)
    one_line(cli("cache", "verify", "nope", cache=cache), "no export named 'nope'")


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused_wherever_it_lives(tiny, tmp_path, cache):
    from tokenizers import Tokenizer, models

    from benchmarks.common import write_gpt2_tokenizer

    _, _, ck, _ = tiny
    hf = shutil.copytree(ck, tmp_path / "hf")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (hf / "tokenizer.json").rename(blobs / "9b1c0a")  # a Hub snapshot: links into the blob store
    (hf / "tokenizer.json").symlink_to(Path("..") / "blobs" / "9b1c0a")
    out = export_model(str(hf), tmp_path / "ok")  # its own tokenizer (300 tokens, the model has 1000: fine)
    assert not (out / "tokenizer.json").is_symlink()

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(2000)}, unk_token="w0")).save(str(blobs / "other"))
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.json").symlink_to(blobs / "other")  # another model's tokenizer
    one_line(cli("export", hf, "-o", tmp_path / "bad", cache=cache),
             f"{hf / 'tokenizer.json'} (a link to {blobs / 'other'}) has 2000 tokens",
             f"{hf / 'config.json'} gives the model a vocabulary of 1000")
    assert not (tmp_path / "bad").exists()
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.json").symlink_to(hf / "config.json")  # not a tokenizer at all
    with pytest.raises(ValueError, match=r"tokenizer\.json \(a link to .*config\.json\) is not a tokenizer\.json"):
        export_model(str(hf), tmp_path / "bad")
    (hf / "tokenizer.json").unlink()
    write_gpt2_tokenizer(hf)  # vocab.json + merges.txt of GPT-2's 50257 tokens for a 1000-token model
    with pytest.raises(ValueError, match=r"vocab\.json \+ merges\.txt has 50257 tokens .* vocabulary of 1000"):
        export_model(str(hf), tmp_path / "bad")
