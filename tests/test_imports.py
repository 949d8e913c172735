"""The runtime stays light and its package is its own: `import gpt2_onnx`, nothing generic at top level."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "safetensors", "huggingface_hub", "peft", "ray")


def _imports_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    return eval(r.stdout.strip().splitlines()[-1])


def test_import_and_cli_pull_in_nothing_heavy():
    assert _imports_after("import gpt2_onnx, gpt2_onnx.cli, gpt2_onnx.evaluate; from gpt2_onnx import Engine") == []


def test_loading_an_exported_or_cached_model_imports_only_the_runtime(tiny, tmp_path):
    _, _, ck, onnx_dir = tiny
    cache = tmp_path / "cache"
    assert _imports_after(f"import os; os.environ['GPT2_ONNX_CACHE'] = {str(cache)!r}\n"
                          f"from gpt2_onnx import Engine; Engine.load({str(ck)!r})")  # exports: onnx comes in
    for model in (onnx_dir, ck):  # an exported folder, and a checkpoint whose export is cached
        code = (f"import os; os.environ['GPT2_ONNX_CACHE'] = {str(cache)!r}\n"
                f"from gpt2_onnx import Engine; Engine.load({str(model)!r}).generate([1, 2], max_new_tokens=2)")
        assert _imports_after(code) == [], model


def test_a_batch_job_without_replicas_runs_without_ray(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": [1, 2], "max_tokens": 2}\n')
    code = (f"from gpt2_onnx.batch import run; run({str(tmp_path / 'in.jsonl')!r}, {str(tmp_path / 'out.jsonl')!r}, "
            f"model={str(onnx_dir)!r}, provider='cpu')")
    assert _imports_after(code) == []
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 1


def test_the_runtime_reaches_the_exporter_only_through_the_resolver():
    for f in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith(("gpt2_onnx.export", "export")):
                    assert f.name == "resolve.py", f"{f.relative_to(ROOT)} imports {name}"


def test_the_wheel_installs_one_package_named_gpt2_onnx(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("gpt2_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"gpt2_onnx"}, top
    for must in ("gpt2_onnx/cli.py", "gpt2_onnx/core.py", "gpt2_onnx/server/app.py", "gpt2_onnx/export/graph.py",
                 "gpt2_onnx/models/tiny-shakespeare/model.safetensors", "gpt2_onnx/models/tiny-shakespeare/tokenizer.json"):
        assert must in names, must


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py is prepared here: its smoke mode on the CPU provider runs every part."""
    import json

    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--provider", "cpu", "--smoke", "--runs", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**__import__("os").environ, "GPU_CHECK_WORK": str(tmp_path / "work")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all("error" not in report[k] for k in ("server_core", "memcpy_profile", "server_http")), report
    assert report["server_core"]["greedy_equal_solo"] and report["memcpy_profile"]["memcpy_node_events"] == 0
    assert all(p.get("max_abs_logit_diff", 1) < 1e-3 for k, p in report["parity"].items() if k == "fp32")
