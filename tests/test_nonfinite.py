"""Non-finite logits are an error on every path, greedy included (the graph marks such rows with next_token
-1): one position embedding set to NaN makes exactly the sequences that reach that position fail, alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from gpt2_onnx import Engine
from gpt2_onnx.batch import run
from gpt2_onnx.export import export_model
from helpers import SHAPES, Server, make_checkpoint, read_rows, write_rows

POISON = 40  # the position whose embedding is NaN


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    make_checkpoint(root / "hf", seed=3, **SHAPES["tiny"])
    path = root / "hf" / "model.safetensors"
    w = load_file(str(path))
    name = next(n for n in w if n.endswith("wpe.weight"))
    w[name][POISON] = float("nan")  # the file keeps its size: load checks pass
    save_file(w, str(path), metadata={"format": "pt"})
    out = {}
    for label, kw in (("fp32", {}), ("fp16", {"dtype": "float16"}), ("int8", {"quantize": "int8"})):
        out[label] = export_model(str(root / "hf"), root / label, **kw)
    return out


@pytest.mark.parametrize("label", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "seed": 1}, {"num_beams": 2}, {"logprobs": 0}],
                         ids=["greedy", "sampled", "beams", "logprobs"])
def test_a_sequence_reaching_the_nan_position_raises_and_a_shorter_one_does_not(poisoned, label, options):
    engine = Engine.load(poisoned[label], provider="cpu")
    prompt = [5, 6, 7]
    ok = engine.generate(prompt, max_new_tokens=POISON - len(prompt), **options)
    assert len(ok.token_ids) == POISON - len(prompt) or ok.finish_reason in ("eos", "stop")
    with pytest.raises(ValueError, match="non-finite logits"):
        engine.generate(prompt, max_new_tokens=POISON + 5 - len(prompt), ignore_eos=True, **options)


def test_the_graph_marks_non_finite_rows_with_minus_one(poisoned):
    engine = Engine.load(poisoned["fp32"], provider="cpu")
    cache = engine.model.new_cache(2, POISON + 2)
    ids = np.array([list(range(1, POISON + 2)), list(range(1, POISON + 2))], np.int64)
    lens = np.array([POISON + 1, POISON - 5])  # the first row reaches the NaN position, the second does not
    nxt, _ = engine.model.run(cache, ids, lens, (lens - 1)[:, None])
    assert nxt[0, 0] == -1 and nxt[1, 0] >= 0


def test_in_the_server_and_in_batch_only_the_poisoned_request_fails(poisoned, tmp_path):
    engine = Engine.load(poisoned["fp32"], provider="cpu")
    from gpt2_onnx.server import create_app

    s = Server(create_app(engine, model_id="nan", max_batch=8))
    try:
        def ask(n):
            return httpx.post(s.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": n,
                                                               "temperature": 0, "ignore_eos": True}, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, [10, POISON + 5, 20, 30]))
        codes = [r.status_code for r in answers]
        assert codes == [200, 500, 200, 200], [r.text for r in answers]
        assert "non-finite logits" in answers[1].json()["error"]["message"]
        assert answers[0].json()["choices"][0]["text"] == engine.generate([5, 6, 7], max_new_tokens=10,
                                                                         ignore_eos=True).text
    finally:
        s.stop()
    rows = [{"id": i, "prompt": [5, 6, 7], "max_tokens": n, "temperature": 0, "ignore_eos": True}
            for i, n in enumerate([10, POISON + 5, 20])]
    out = tmp_path / "out.jsonl"
    run(write_rows(tmp_path / "in.jsonl", rows), out, model=str(poisoned["fp32"]), provider="cpu")
    got = read_rows(out)
    assert [got[json.dumps(i)]["status"] for i in range(3)] == [200, 500, 200]
    assert "non-finite logits" in got["1"]["body"]["error"]["message"]
