"""A newcomer's first steps as README shows them: a fresh virtual environment with the `cpu` extra alone
runs README's offline `gpt2-onnx batch` example. Needs the package index (pip reuses its cache)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_batch_example() -> str:
    """README's ```bash offline block that writes rows.jsonl with printf and runs `gpt2-onnx batch` on it."""
    blocks = [m.group(1) for m in re.finditer(r"^```bash offline\n(.*?)^```", (ROOT / "README.md").read_text(),
                                              re.S | re.M)]
    (code,) = [b for b in blocks if b.startswith("printf") and "gpt2-onnx batch rows.jsonl -o out.jsonl" in b]
    return code


@pytest.mark.slow
def test_a_fresh_cpu_install_runs_the_readme_batch_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-e", f"{ROOT}[cpu]"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    env.update(PATH=str(venv / "bin") + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=str(venv),
               GPT2_ONNX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_batch_example()], capture_output=True, text=True,
                       cwd=work, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {row["id"] for row in rows} == {1, 2, "s"}, rows
    assert all(row["status"] == 200 for row in rows), rows
