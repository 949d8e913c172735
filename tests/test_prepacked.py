"""The per-machine prepacked model (GPT2_ONNX_PREPACKED=1; engine.model: <export>/prepacked/<key>/): made on the
first CPU load, used (mapped, not rewritten) by later ones, made again when onnxruntime's version or the CPU differs,
skipped on a folder that cannot be written; the same logits and greedy ids either way, for fp32, int4 and LoRA-slot
exports. And the tied wte held once: the LM head reads the same bytes of the data file through a name of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import SHAPES, make_checkpoint

from gpt2_onnx import Engine
from gpt2_onnx import model as M
from gpt2_onnx.export import export_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 42, 7, 99, 3], [11, 2, 250]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exported folders of one tiny checkpoint: fp32, int4 and fp32 with 2 LoRA slots (copied per test)."""
    root = tmp_path_factory.mktemp("prepacked")
    make_checkpoint(root / "hf", seed=3, **SHAPES["tiny"])
    return {"fp32": export_model(str(root / "hf"), root / "fp32"),
            "int4": export_model(str(root / "hf"), root / "int4", quantize="int4"),
            "lora": export_model(str(root / "hf"), root / "lora", lora_slots=2, max_lora_rank=4)}


@pytest.fixture(autouse=True)
def prepacked_on(monkeypatch):
    monkeypatch.setenv("GPT2_ONNX_PREPACKED", "1")


def fresh(exports, kind: str, tmp_path: Path) -> Path:
    """A copy of an export without any prepacked folder."""
    return shutil.copytree(exports[kind], tmp_path / kind, ignore=shutil.ignore_patterns(M.PREPACKED))


def outputs(folder: Path) -> tuple[np.ndarray, list, Path | None]:
    """(prefill logits of PROMPTS, greedy ids of 8 new tokens, the prepacked model loaded or None)."""
    eng = Engine.load(folder, provider="cpu")
    m, n = eng.model, max(map(len, PROMPTS))
    ids = np.array([p + [0] * (n - len(p)) for p in PROMPTS])  # right-padded (B, S)
    logits = m.forward(ids, np.array([len(p) for p in PROMPTS]), m.new_cache(2, 32), np.tile(np.arange(n), (2, 1)))
    greedy = [r.token_ids for r in eng.generate_batch(PROMPTS, max_new_tokens=8, temperature=0, ignore_eos=True)]
    return logits, greedy, m.prepacked


def heap_outputs(folder: Path, monkeypatch) -> tuple:
    """outputs() with the weights prepacked in memory (the default: model.onnx itself)."""
    with monkeypatch.context() as mp:
        mp.setenv("GPT2_ONNX_PREPACKED", "0")
        return outputs(folder)


def identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def keys(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / M.PREPACKED).iterdir())


@pytest.mark.parametrize("kind", ["fp32", "int4", "lora"])
def test_made_on_first_load_then_used_with_the_same_logits_and_ids(exports, kind, tmp_path, monkeypatch):
    folder = fresh(exports, kind, tmp_path)
    want_logits, want_ids, none = heap_outputs(folder, monkeypatch)
    assert none is None and not (folder / M.PREPACKED).exists()
    logits, ids, made = outputs(folder)
    key, _ = M.prepacked_key(folder, Engine.load(folder, provider="cpu").config)
    assert made == folder / M.PREPACKED / key / "model.onnx" and keys(folder) == [key]
    info = json.loads((made.parent / M.PREPACKED_INFO).read_text())
    assert info["onnxruntime"] == ort.__version__ and info["bytes"]["model.onnx.data"] > 0
    # the saved data file holds the weights' prepacked copies too (onnxruntime marks each in its external data)
    assert b"prepacked_0" in made.read_bytes()
    assert np.array_equal(logits, want_logits) and ids == want_ids
    before = {p.name: identity(p) for p in made.parent.iterdir()}
    logits2, ids2, used = outputs(folder)  # a later load maps it: not written again
    assert used == made and {p.name: identity(p) for p in made.parent.iterdir()} == before
    assert np.array_equal(logits2, want_logits) and ids2 == want_ids


def test_off_by_default_and_a_bad_switch_is_named(exports, tmp_path, monkeypatch):
    folder = fresh(exports, "fp32", tmp_path)
    monkeypatch.delenv("GPT2_ONNX_PREPACKED")
    assert outputs(folder)[2] is None and not (folder / M.PREPACKED).exists()
    monkeypatch.setenv("GPT2_ONNX_PREPACKED", "yes")
    with pytest.raises(ValueError, match="GPT2_ONNX_PREPACKED must be 0 .* or 1 .*got 'yes'"):
        Engine.load(folder, provider="cpu")


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_the_tied_wte_is_stored_once_and_the_lm_head_reads_it_by_a_name_of_its_own(exports, kind):
    import onnx

    graph = onnx.load(str(exports[kind] / "model.onnx"), load_external_data=False).graph
    place = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    gather, head = nodes["wte"].input[0], nodes["lm_head"].input[1]
    assert gather != head and place[gather] == place[head]  # two mappings of one place in the data file
    assert graph.node[0].name == "lm_head"  # prepacked first at load: its mapping goes before the others are made
    offsets = [(int(p["offset"]), int(p["length"])) for p in place.values() if p]
    assert len(set(offsets)) < len(offsets) and (exports[kind] / "model.onnx.data").stat().st_size < sum(
        n for _, n in set(offsets)) + 4096 * len(set(offsets))  # equal bytes stored once


def test_a_new_onnxruntime_version_or_cpu_makes_a_new_one_and_old_ones_are_bounded(exports, tmp_path, monkeypatch):
    folder = fresh(exports, "fp32", tmp_path)
    want, want_ids, _ = heap_outputs(folder, monkeypatch)
    first = outputs(folder)[2]
    monkeypatch.setattr(ort, "__version__", "0.0.1-other")
    second = outputs(folder)[2]
    assert second != first and sorted([first.parent.name, second.parent.name]) == keys(folder)
    features = M.cpu_features()
    monkeypatch.setattr(M, "cpu_features", lambda: {**features, "flags": "sse2"})
    logits, ids, third = outputs(folder)
    assert third not in (first, second) and np.array_equal(logits, want) and ids == want_ids
    assert keys(folder) == sorted([second.parent.name, third.parent.name])  # PREPACKED_KEEP: the oldest went
    assert json.loads((third.parent / M.PREPACKED_INFO).read_text())["flags"] == "sse2"


def test_a_changed_data_file_or_a_damaged_prepacked_file_is_made_again(exports, tmp_path):
    folder = fresh(exports, "fp32", tmp_path)
    made = outputs(folder)[2]
    data = made.parent / "model.onnx.data"
    with open(data, "r+b") as f:  # a truncated copy: its size no longer matches the info file
        f.truncate(data.stat().st_size // 2)
    again = outputs(folder)[2]
    assert again == made and data.stat().st_size == json.loads((made.parent / M.PREPACKED_INFO).read_text())[
        "bytes"]["model.onnx.data"]
    os.utime(folder / "model.onnx.data", ns=(1, 1))  # the export's weights replaced: a new key
    assert outputs(folder)[2] != made


def _make_read_only(folder: Path, monkeypatch) -> None:
    """chmod; as root (which writes anyway) the immutable attribute; where neither stops root, mkdtemp raises
    EACCES as a read-only folder's would."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK) or os.geteuid() != 0:
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            (folder / "probe").mkdir()
        except OSError:
            return
        (folder / "probe").rmdir()
    import errno

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(M.tempfile, "mkdtemp", denied)
    monkeypatch.setattr(M.Path, "mkdir", lambda self, *a, **k: denied())


def test_a_folder_that_cannot_be_written_loads_as_before(exports, tmp_path, monkeypatch, caplog):
    folder = fresh(exports, "fp32", tmp_path)
    want, want_ids, _ = heap_outputs(folder, monkeypatch)
    _make_read_only(folder, monkeypatch)
    try:
        with caplog.at_level("INFO", logger="gpt2_onnx.model"):
            logits, ids, made = outputs(folder)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)
    assert made is None and not (folder / M.PREPACKED).exists()
    assert np.array_equal(logits, want) and ids == want_ids
    assert any("cannot be written" in r.getMessage() for r in caplog.records), caplog.text


LOAD = "from gpt2_onnx import Engine; import sys; print(Engine.load(sys.argv[1], provider='cpu').model.prepacked)"


def test_two_processes_loading_at_once_share_one(exports, tmp_path):
    folder = fresh(exports, "fp32", tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "GPT2_ONNX_PREPACKED": "1"}) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    (key,) = keys(folder)  # no temp folder left, one key
    assert {o[0].strip() for o in outs} == {str(folder / M.PREPACKED / key / "model.onnx")}


def test_cache_verify_is_not_misled_by_the_prepacked_folder(exports, tmp_path, monkeypatch):
    from gpt2_onnx.resolve import resolve, verify_cache

    monkeypatch.setenv("GPT2_ONNX_CACHE", str(tmp_path / "cache"))
    folder = resolve(str(Path(exports["fp32"]).parent / "hf"))
    assert outputs(folder)[2] is not None
    assert verify_cache(folder.name) == [(folder.name, None)]
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "cache", "clear", folder.name], capture_output=True,
                       text=True, env={**os.environ, "GPT2_ONNX_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0 and not folder.exists(), r.stderr


# Peak RSS (VmHWM, MB) of a 64-token greedy generation, 124M width with 4 layers (fp32 weights 270 MB, of which
# wte 154 MB), CPU, 2 threads. Measured with onnxruntime 1.32 on an Intel Xeon (AVX-512): default (heap) 425,
# GPT2_ONNX_PREPACKED=1 first load 650, later loads 628; with the LM head reading wte by the same
# name as the embedding (exports before the tied head had its own name) the default measured 481. Bounds: +10%.
RSS_BOUND_MB = {"heap": 467, "first": 715, "later": 691}
GENERATE = """
import sys, json
from gpt2_onnx import Engine
eng = Engine.load(sys.argv[1], provider="cpu", threads=2)
ids = eng.generate([1, 2, 3], max_new_tokens=64, ignore_eos=True).token_ids
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"peak_mb": int(status["VmHWM"].split()[0]) / 1024, "ids": ids,
                  "prepacked": eng.model.prepacked is not None}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_rss_of_a_64_token_generation_stays_under_the_recorded_bound(tmp_path):
    make_checkpoint(tmp_path / "hf", seed=0, n_layer=4, n_positions=256)
    folder = export_model(str(tmp_path / "hf"), tmp_path / "onnx")
    runs = {}
    for load, switch in (("heap", "0"), ("first", "1"), ("later", "1")):
        r = subprocess.run([sys.executable, "-c", GENERATE, str(folder)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "GPT2_ONNX_PREPACKED": switch})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[load] = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(runs[load]["ids"]) == 64 and runs[load]["prepacked"] == (switch == "1")
    assert runs["heap"]["ids"] == runs["first"]["ids"] == runs["later"]["ids"]
    for load, bound in RSS_BOUND_MB.items():
        assert runs[load]["peak_mb"] < bound, {k: v["peak_mb"] for k, v in runs.items()}
