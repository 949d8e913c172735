"""Bottleneck adapters of the `adapters` library (AdapterHub) against the library's own model.

The library pins an older transformers than this suite's, so its reference runs in an environment made once and
cached (`reference_python`): a venv whose .pth names this interpreter's site-packages (its torch is reused, never
downloaded again) and which holds adapters and the transformers it pins, shadowing the suite's.
tests/adapters_reference.py builds the adapter there, saves it, and writes the library's logits and greedy ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import SHAPES, make_checkpoint

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model
from gpt2_onnx.export.cache import resolve_model

ADAPTERS = ["adapters==1.3.0", "transformers~=4.57"]
ATOL = 1e-4
IDS = [5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200]
NEW = 16
HERE = Path(__file__).parent


def _unavailable(why: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"the adapters reference environment could not be made: {why}")
    pytest.skip(f"the adapters reference environment could not be made: {why}")


@pytest.fixture(scope="session")
def reference_python() -> Path:
    """The python of a cached venv with adapters 1.3.0 and transformers 4.57 over this suite's torch."""
    import torch

    sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    sites.append(str(Path(torch.__file__).parent.parent))
    key = hashlib.sha256(json.dumps([ADAPTERS, torch.__version__, sys.version, sites]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("GPT2_ONNX_TEST_CACHE", Path.home() / ".cache" / "gpt2-onnx-tests"))
    env = root / f"adapters-1.3.0-{key}"
    python = env / "bin" / "python"
    if (env / "ok").is_file():
        return python
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{env.name}.", dir=root))  # built aside, published by one rename
    try:
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True, timeout=300)
        (site,) = (tmp / "lib").glob("python*/site-packages")
        (site / "gpt2_onnx_suite.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(sites)))
        r = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *ADAPTERS], capture_output=True, text=True, timeout=600)
        if r.returncode:
            _unavailable(f"pip install {' '.join(ADAPTERS)} failed: {r.stderr.strip()[-1500:]}")
        check = subprocess.run([str(tmp / "bin" / "python"), "-c", "import adapters, torch, transformers; "
                                "assert transformers.__version__.startswith('4.57'), transformers.__version__"],
                               capture_output=True, text=True, timeout=300)
        if check.returncode:
            _unavailable(check.stderr.strip()[-1500:])
        (tmp / "ok").write_text("installed\n")
        try:
            os.rename(tmp, env)
        except OSError:  # another worker published it first
            if not (env / "ok").is_file():
                raise
    except subprocess.TimeoutExpired as e:
        _unavailable(f"{e.cmd[:4]} timed out")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return python


def run_reference(python: Path, jobs: list[dict], folder: Path) -> None:
    path = folder / "jobs.json"
    path.write_text(json.dumps(jobs))
    r = subprocess.run([str(python), str(HERE / "adapters_reference.py"), str(path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def with_tokenizer(whole: Path, base: Path) -> Path:
    """The whole model saved after adapters.init, with the base checkpoint's tokenizer files beside it."""
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            shutil.copyfile(f, whole / f.name)
    return whole


def all_logits(engine, ids=IDS):
    cache = engine.model.new_cache(1, len(ids))
    return engine.model.forward(np.array([ids]), np.array([len(ids)]), cache, np.arange(len(ids))[None])[0]


# name: (shapes, config name, options, saved with safetensors)
CASES = {
    "seq_bn": (("tiny", "deep"), "seq_bn", dict(reduction_factor=4, non_linearity="gelu", residual_before_ln=False,
                                                init_weights="houlsby"), False),
    "double_seq_bn": (("tiny", "deep"), "double_seq_bn", dict(reduction_factor=8, non_linearity="tanh",
                                                              residual_before_ln=False, scaling=0.5), True),
    "par_bn": (("tiny", "deep"), "par_bn", dict(reduction_factor=2, scaling=2.0, leave_out=[1]), False),
    "seq_bn-ln-channel": (("tiny",), "seq_bn", dict(reduction_factor=8, non_linearity="swish", ln_before=True,
                                                    ln_after=True, scaling="channel", original_ln_after=False), False),
    "double_seq_bn-ln-learned": (("deep",), "double_seq_bn", dict(
        reduction_factor=3, non_linearity="relu2", ln_after=True, adapter_residual_before_ln=True,
        scaling="learned", original_ln_before=True, init_weights="mam_adapter"), True),
    "par_bn-ln": (("tiny",), "par_bn", dict(non_linearity="gelu_new", ln_before=True, ln_after=True,
                                            original_ln_after=False), False),  # the library saves
    # ln_before (one LayerNorm under two names) only as .bin
}
RUNS = [(name, shape) for name, (shapes, *_) in CASES.items() for shape in shapes]


@pytest.fixture(scope="module")
def references(reference_python, tmp_path_factory):
    """{(case, shape): (base checkpoint, save_adapter folder, whole model folder, reference .npz)}, one library run."""
    root = tmp_path_factory.mktemp("bottleneck")
    jobs, out = [], {}
    for shape in sorted({s for _, s in RUNS}):  # tiny: conftest's `tiny`, whose quantized exports test_quantize holds
        make_checkpoint(root / shape, seed=1 if shape == "tiny" else 11, **SHAPES[shape])
    for i, (name, shape) in enumerate(RUNS):
        _, kind, options, safetensors = CASES[name]
        d = root / f"{name}-{shape}"
        jobs.append(dict(checkpoint=str(root / shape), kind=kind, options=options, seed=i, safetensors=safetensors,
                         adapter_out=str(d / "adapter"), whole_out=str(d / "whole"), ids=IDS, new=NEW,
                         npz=str(d / "ref.npz")))
        out[name, shape] = root / shape, d / "adapter", d / "whole", d / "ref.npz"
    run_reference(reference_python, jobs, root)
    return out


@pytest.mark.parametrize("name, shape", RUNS, ids=[f"{n}-{s}" for n, s in RUNS])
def test_bottleneck_matches_the_adapters_library(references, tmp_path, name, shape):
    base, adapter, whole, npz = references[name, shape]
    ref = np.load(npz)
    assert np.abs(ref["plain"] - ref["logits"]).max() > 0.05  # the adapter matters
    assert {f.name for f in adapter.iterdir()} >= {"adapter_config.json", "adapter.safetensors" if CASES[name][3]
                                                   else "pytorch_adapter.bin"}
    engine = Engine.load(export_model(str(base), tmp_path / "a", adapter=adapter), provider="cpu")
    assert engine.config.adapter == str(adapter.resolve())
    np.testing.assert_allclose(all_logits(engine), ref["logits"], atol=ATOL, rtol=0)
    assert engine.generate(IDS, max_new_tokens=NEW).token_ids == ref["greedy"].tolist()
    # the whole model saved after adapters.init, exported as it is
    engine = Engine.load(export_model(str(with_tokenizer(whole, base)), tmp_path / "w"), provider="cpu")
    assert engine.config.adapter == f"{whole.resolve()}#bn"
    np.testing.assert_allclose(all_logits(engine), ref["logits"], atol=ATOL, rtol=0)
    assert engine.generate(IDS, max_new_tokens=NEW).token_ids == ref["greedy"].tolist()


def test_graph_splits_only_the_adapted_layer_norms(references, tmp_path):
    base, adapter, _, _ = references["par_bn", "deep"]  # leave_out=[1]: layer 1 keeps its fused SkipLayerNorms
    graph = onnx.load(str(export_model(str(base), tmp_path / "a", adapter=adapter) / "model.onnx"),
                      load_external_data=False).graph
    skips = {n.name for n in graph.node if n.op_type == "SkipLayerNormalization"}
    assert skips == {"h.0.ln_2", "h.1.ln_1", "h.1.ln_2", "h.2.ln_1", "h.2.ln_2", "h.3.ln_1", "h.3.ln_2", "ln_f"}
    adapters = [n.name.split("/")[0] for n in graph.node if "_adapter/" in n.name]
    assert sorted(set(adapters)) == ["h.0.output_adapter", "h.2.output_adapter", "h.3.output_adapter"]
    assert adapters.count("h.0.output_adapter") == 5  # MatMul, Add + Relu, MatMul, and proj + r for the skip


@pytest.mark.parametrize("quantize, corr, top1", [("int8", 0.995, 0.85), ("int4", 0.9, 0.45)])
def test_quantized_exports_with_an_adapter_track_fp32(references, tmp_path, monkeypatch, quantize, corr, top1):
    """As tests/test_quantize.py holds the base model's quantized exports: the adapter's MatMuls stay float."""
    from gpt2_onnx.export import quantize as Q

    base, adapter, _, npz = references["double_seq_bn", "tiny"]
    monkeypatch.setitem(Q.BLOCK_SIZE, 4, 32)  # this model's K is 64, as in test_quantize
    out = export_model(str(base), tmp_path / quantize, quantize=quantize, adapter=adapter)
    q = Engine.load(out, provider="cpu")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert {n.name for n in graph.node if n.op_type == "MatMul"} == {
        f"h.{i}.{site}/{m}" for i in range(2) for site in ("mh_adapter", "output_adapter") for m in ("down", "up")}
    ids = np.random.default_rng(1).integers(0, 1000, 40)
    fp32 = Engine.load(export_model(str(base), tmp_path / "fp32", adapter=adapter), provider="cpu")
    a, b = all_logits(fp32, ids), all_logits(q, ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > corr
    assert (a.argmax(-1) == b.argmax(-1)).mean() > top1
    ref = np.load(npz)  # and against the library itself
    b = all_logits(q, IDS)
    assert np.corrcoef(ref["logits"].ravel(), b.ravel())[0, 1] > corr


def test_fp16_export_with_an_adapter(references, tmp_path):
    base, adapter, _, npz = references["seq_bn", "tiny"]
    engine = Engine.load(export_model(str(base), tmp_path / "fp16", dtype="float16", adapter=adapter), provider="cpu")
    got, ref = all_logits(engine), np.load(npz)["logits"]
    assert engine.config.dtype == "float16" and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


# ---- refusals --------------------------------------------------------------------------------------------------

REFUSED = {
    "compacter": ("compacter", dict(reduction_factor=8), r"Compacter's PHM layers \(phm_layer\) is not supported"),
    "gating": ("seq_bn", dict(use_gating=True), r"gating \(use_gating, as in UniPELT\) is not supported"),
    "invertible": ("seq_bn_inv", {}, r"invertible adapters on the embeddings \(inv_adapter"),
    "post_add": ("seq_bn", dict(residual_before_ln="post_add"), r"residual_before_ln 'post_add' is not supported.*"
                 r"the adapters library itself fails on it"),
    "prelu": ("seq_bn", dict(non_linearity="prelu"), r"non_linearity 'prelu' is not supported \(supported: relu"),
    "lora": ("lora", {}, r"lora adapters of the adapters library are not supported.*merge a LoRA there first"),
    "prefix": ("prefix_tuning", {}, r"prefix_tuning adapters of the adapters library are not supported.*"
               r"prefix-tuning, prompt-tuning and P-tuning are loaded at run time"),
    "mam": ("mam", {}, r"union adapters of the adapters library are not supported"),
}


@pytest.fixture(scope="module")
def refused(reference_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("refused")
    make_checkpoint(root / "hf", seed=3, **SHAPES["tiny"])
    jobs = [dict(checkpoint=str(root / "hf"), kind=kind, options=options, seed=0, adapter_out=str(root / name),
                 whole_out=str(root / f"{name}-whole"), forward=False) for name, (kind, options, _) in REFUSED.items()]
    jobs.append(dict(checkpoint=str(root / "hf"), kind="seq_bn", seed=0, adapter_out=str(root / "two"),
                     whole_out=str(root / "two-whole"), more=["second"], forward=False))
    run_reference(reference_python, jobs, root)
    return root


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_adapter_configs_are_refused_by_name_with_the_remedy(refused, tmp_path, name):
    match = REFUSED[name][2]
    for spec, adapter in ((refused / "hf", refused / name), (with_tokenizer(refused / f"{name}-whole",
                                                                             refused / "hf"), None)):
        with pytest.raises(ValueError, match=match) as e:
            export_model(str(spec), tmp_path / "out", adapter=adapter)
        assert "has neither adapter_model" not in str(e.value) and "seq_bn, double_seq_bn and par_bn" in str(e.value) \
            or name in ("post_add", "prelu")
    assert not (tmp_path / "out").exists()


def test_checkpoints_with_several_adapters_or_an_adapter_twice_are_refused(refused, references, tmp_path):
    whole = with_tokenizer(refused / "two-whole", refused / "hf")
    with pytest.raises(ValueError, match=r"holds 2 adapters \(bn, second\); save the one to export with "
                                         r"model.save_adapter"):
        export_model(str(whole), tmp_path / "out")
    with pytest.raises(ValueError, match="already holds the bottleneck adapter 'bn'.*export it without --adapter"):
        base, adapter, whole, _ = references["seq_bn", "tiny"]
        export_model(str(with_tokenizer(whole, base)), tmp_path / "o", adapter=adapter)


def test_adapter_for_another_base_model_is_refused(references, tmp_path):
    _, adapter, _, _ = references["seq_bn", "deep"]
    base, *_ = references["seq_bn", "tiny"]
    with pytest.raises(ValueError, match=r"hidden_size 96, but the base model is GPT-2 with n_embd 64"):
        export_model(str(base), tmp_path / "out", adapter=adapter)


def test_a_pickle_that_runs_code_is_never_executed(references, tmp_path):
    """A pytorch_adapter.bin whose unpickling would create a file: export refuses it, and creates nothing."""
    import torch

    base, adapter, _, _ = references["seq_bn", "tiny"]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    evil = tmp_path / "evil"
    shutil.copytree(adapter, evil)
    state = torch.load(str(adapter / "pytorch_adapter.bin"), weights_only=True)
    torch.save({**state, "payload": Payload()}, str(evil / "pytorch_adapter.bin"))
    with pytest.raises(ValueError, match=r"could not read .*pytorch_adapter.bin \(UnpicklingError"):
        export_model(str(base), tmp_path / "out", adapter=evil)
    assert not marker.exists()
    torch.load(str(evil / "pytorch_adapter.bin"), weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_cli_export_and_cache_key(references, tmp_path, monkeypatch):
    base, adapter, _, npz = references["double_seq_bn", "tiny"]
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "export", str(base), "--adapter", str(adapter), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(all_logits(Engine.load(tmp_path / "out", provider="cpu")), np.load(npz)["logits"],
                               atol=ATOL, rtol=0)
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["config"]["use_gating"] = True
    (bad / "adapter_config.json").write_text(json.dumps(config))
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "export", str(base), "--adapter", str(bad), "-o",
                        str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "use_gating" in r.stderr and "Traceback" not in r.stderr

    monkeypatch.setenv("GPT2_ONNX_CACHE", str(tmp_path / "cache"))
    plain = resolve_model(str(base))
    adapted = resolve_model(str(base), adapter=str(adapter))
    assert adapted != plain and resolve_model(str(base), adapter=str(adapter)) == adapted
    manifest = json.loads((adapted / "manifest.json").read_text())
    assert manifest["adapter"] == str(adapter.resolve())
    assert manifest["weights_digest"] != json.loads((plain / "manifest.json").read_text())["weights_digest"]
    weights = adapter / "adapter.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a retrained adapter
    assert resolve_model(str(base), adapter=str(adapter)) not in (adapted, plain)


def test_genai_export_runs_the_adapter_as_the_library_does(references, tmp_path):
    """--format genai builds the same graph: onnxruntime-genai's own package generates the library's greedy ids."""
    pytest.importorskip("onnxruntime_genai")
    from test_genai import og_greedy, og_model, until_eos

    from gpt2_onnx.export.genai import export_genai

    base, adapter, _, npz = references["double_seq_bn-ln-learned", "deep"]
    ogm = og_model(export_genai(str(base), tmp_path / "genai", adapter=adapter))
    assert until_eos(og_greedy(ogm, [IDS], new=NEW)[0], 0) == until_eos(np.load(npz)["greedy"].tolist(), 0)
