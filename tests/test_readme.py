"""README's code runs as written: blocks tagged `offline` run here, `server` ones against the
`server-start` block's server on 127.0.0.1:8000. Blocks tagged hub (internet), gpu, fresh-machine
(CI runs the test one) and no-run (needs files of your own) are not run; an untagged python or bash
block is an error, so nothing is skipped silently."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_healthy

README = Path(__file__).resolve().parents[1] / "README.md"
TAGS = {"offline", "server", "server-start", "hub", "gpu", "fresh-machine", "no-run"}
BLOCKS = [(m.group(1), m.group(2).strip(), m.group(3)) for m in
          re.finditer(r"^```(python|bash)([^\n]*)\n(.*?)^```", README.read_text(), re.S | re.M)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    bin_dir = str(Path(sys.executable).parent)  # where this environment's gpt2-onnx lives
    return dict(os.environ, GPT2_ONNX_CACHE=str(tmp_path_factory.mktemp("readme-cache")),
                PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1")


def _run(lang: str, code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_every_code_block_is_tagged():
    assert BLOCKS and all(tag in TAGS for _, tag, _ in BLOCKS), [(lang, tag) for lang, tag, _ in BLOCKS
                                                                 if tag not in TAGS]


@pytest.mark.parametrize("lang, code", [(lang, code) for lang, tag, code in BLOCKS if tag == "offline"],
                         ids=lambda x: x.splitlines()[0][:50] if "\n" in x else x)
def test_offline_block_runs(lang, code, env, tmp_path):
    r = _run(lang, code, env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_server_blocks_run_against_the_documented_server(env, tmp_path):
    (start,) = [code for _, tag, code in BLOCKS if tag == "server-start"]
    server = subprocess.Popen(["bash", "-c", "exec " + start.split("#")[0].strip()], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy("http://127.0.0.1:8000", server, 300)
        for lang, tag, code in BLOCKS:
            if tag == "server":
                r = _run(lang, code, env, tmp_path)
                assert r.returncode == 0 and r.stdout.strip(), r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(30)
