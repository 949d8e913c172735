"""lm-evaluation-harness as a real client: its local-completions model against `gpt2-onnx serve` (remote
tokenizer, echo/logprobs loglikelihoods, generate_until) gives the results of its own `hf` backend on
the same checkpoint. Offline: two small local tasks (tests/data/lmeval), a server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_healthy

from gpt2_onnx.models import BUNDLED

TASKS = Path(__file__).parent / "data" / "lmeval"


def _lm_eval(out: Path, env: dict, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "lm_eval", *args, "--tasks", "gpt2onnx_mc,gpt2onnx_gen",
                        "--include_path", ".", "--output_path", str(out), "--log_samples"],
                       cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (results,) = out.glob("*/results_*.json")
    samples = {}
    for f in out.glob("*/samples_*.jsonl"):
        task = f.name.split("_2")[0].removeprefix("samples_")
        samples[task] = {row["doc_id"]: row["resps"] for row in map(json.loads, f.read_text().splitlines())}
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


@pytest.mark.slow
def test_lm_eval_local_completions_equals_its_hf_backend(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GPT2_ONNX_CACHE=str(tmp_path / "cache"),
               TOKENIZERS_PARALLELISM="false")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "gpt2_onnx.cli", "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, 300)
        ours = _lm_eval(tmp_path / "remote", env, "--model", "local-completions", "--model_args",
                        f"base_url=http://127.0.0.1:{port}/v1/completions,model=tiny-shakespeare,max_length=256,"
                        "tokenizer_backend=remote,tokenized_requests=True")
    finally:
        server.terminate()
        server.wait(30)
    hf = _lm_eval(tmp_path / "hf", env, "--model", "hf", "--device", "cpu", "--model_args",
                  f"pretrained={BUNDLED},dtype=float32,max_length=256")
    assert ours["results"] == hf["results"]  # every metric and its stderr
    assert 0 < ours["results"]["gpt2onnx_mc"]["acc,none"] < 1 and ours["results"]["gpt2onnx_gen"]["exact_match,none"] > 0
    mc_ours, mc_hf = ours["samples"]["gpt2onnx_mc"], hf["samples"]["gpt2onnx_mc"]
    assert sorted(mc_ours) == sorted(mc_hf) and len(mc_ours) == 10
    for doc in mc_ours:  # every (loglikelihood, is_greedy) of every choice
        for (a,), (b,) in zip(mc_ours[doc], mc_hf[doc], strict=True):
            assert abs(float(a[0]) - float(b[0])) < 1e-4 and a[1] == b[1], (doc, a, b)
    assert ours["samples"]["gpt2onnx_gen"] == hf["samples"]["gpt2onnx_gen"]  # the same generated texts
