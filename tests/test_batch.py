"""gpt2-onnx batch without Ray: the server's answers for every row, scoring rows, per-row errors, input
validation (exit 2, one line), resuming after a torn write and after a kill (every row exactly once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpt2_onnx.batch import BatchWorker, read_input, resume, run
from helpers import read_rows, write_rows


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


ROWS = [
    {"id": 1, "prompt": "the quick", "max_tokens": 12, "temperature": 0},
    {"id": "1", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "stop": ["e"]},
    {"id": "n", "prompt": ["to be", "the lazy"], "max_tokens": 6, "temperature": 0.9, "top_k": 40, "seed": 3, "n": 2},
    {"id": "lp", "prompt": "to be", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    {"id": "beam", "prompt": "the lazy", "max_tokens": 8, "n": 2, "best_of": 3, "use_beam_search": True,
     "no_repeat_ngram_size": 2, "presence_penalty": 1.0},
    {"id": "s", "context": "the quick brown", "continuation": " fox"},
    {"id": "s-ids", "context": [], "continuation": [3, 4]},
    {"id": "too-long", "prompt": "x", "max_tokens": 1000},
    {"id": "bad-ids", "prompt": [1, 99999], "max_tokens": 2},
    {"id": "bad-score", "context": "a", "continuation": ""},
    {"id": "other-model", "prompt": "x", "model": "nope"},
]


def test_every_row_gets_the_servers_answer_and_scores_match_the_engine(tiny, tmp_path):
    _, engine, _, onnx_dir = tiny
    out = tmp_path / "out.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", ROWS), out, model=str(onnx_dir), provider="cpu", batch_size=4)
    assert (done.written, done.errors) == (len(ROWS), 4)
    got = read_rows(out)
    assert set(got) == {json.dumps(r["id"]) for r in ROWS}
    texts = lambda k: [c["text"] for c in got[json.dumps(k)]["body"]["choices"]]  # noqa: E731
    assert texts(1) == [engine.generate("the quick", max_new_tokens=12).text]
    assert texts("1") == [engine.generate([5, 6, 7], max_new_tokens=9, stop=["e"]).text]
    assert texts("n") == [r.text for r in engine.generate_batch(["to be", "the lazy"], max_new_tokens=6, temperature=0.9,
                                                               top_k=40, seed=3, n=2)]
    assert texts("beam") == [r.text for r in engine.generate_batch(["the lazy"], max_new_tokens=8, n=2, num_beams=3,
                                                                  no_repeat_ngram_size=2, presence_penalty=1.0)]
    lp = got['"lp"']["body"]["choices"][0]
    assert lp["text"].startswith("to be") and len(lp["logprobs"]["top_logprobs"][-1]) == 2
    want = engine.score([("the quick brown", " fox"), ([], [3, 4])])
    for key, w in zip(('"s"', '"s-ids"'), want):
        body = got[key]["body"]
        assert got[key]["status"] == 200 and body["tokens"] == w.token_ids and body["is_greedy"] == w.is_greedy
        assert body["token_logprobs"] == pytest.approx(w.logprobs, abs=1e-6)
    for key, status, words in (('"too-long"', 400, "n_positions"), ('"bad-ids"', 400, "outside the vocabulary"),
                               ('"bad-score"', 400, "empty"), ('"other-model"', 404, "not served")):
        assert got[key]["status"] == status and words in got[key]["body"]["error"]["message"], got[key]


def test_a_torn_last_line_is_cut_and_its_row_answered_again(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    rows = [{"id": i, "prompt": [i + 1, 2], "max_tokens": 5, "temperature": 0} for i in range(6)]
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    run(inp, out, model=str(onnx_dir), provider="cpu", batch_size=2)
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:3]) + "\n" + full[3][: len(full[3]) // 2])  # a kill in the middle of row 4
    done, torn = resume(out, {json.dumps(r["id"]) for r in rows})
    assert torn and len(done) == 3 and out.read_text().count("\n") == 3
    again = run(inp, out, model=str(onnx_dir), provider="cpu", batch_size=2)
    assert again.written == 3
    got = read_rows(out)
    assert {k: v["body"]["choices"] for k, v in got.items()} == \
        {json.dumps(json.loads(line)["id"]): json.loads(line)["body"]["choices"] for line in full}
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == 0  # nothing left to do


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "prompt": "x"}', "not json"], "line 2 is not JSON"),
    (['{"prompt": "x"}'], 'line 1: the row has no "id"'),
    (['{"id": 1, "prompt": "x"}', '{"id": 1, "prompt": "y"}'], "id 1 is already used on line 1"),
    (['{"id": true, "prompt": "x"}'], '"id" must be a string or an integer'),
    (["[1, 2]"], "each line must be a JSON object"),
    ([""], "has no rows"),
])
def test_bad_input_is_exit_2_with_one_line_naming_the_row(tmp_path, lines, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=None) as e:
        read_input(inp)
    assert message in str(e.value)
    r = cli("batch", inp, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr


@pytest.mark.parametrize("row, param, message", [
    ({"id": 1, "prompt": "x", "max_tokens": -1}, "max_tokens", "line 1: max_tokens"),
    ({"id": 1, "prompt": "x", "bogus": 1}, "bogus", "unknown field 'bogus'"),
    ({"id": 1, "prompt": "x", "stream": True}, "stream", "stream is not supported in batch rows"),
    ({"id": 1, "prompt": "x", "context": "y"}, "prompt", "not both"),
    ({"id": 1, "max_tokens": 3}, "prompt", 'neither "prompt"'),
    ({"id": 1, "context": "x"}, "continuation", "line 1: continuation is required"),
])
def test_a_bad_row_is_its_own_400_line_and_needs_no_engine(tmp_path, row, param, message):
    out = tmp_path / "out.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", [row]), out)
    assert (done.written, done.errors) == (1, 1)
    got = read_rows(out)["1"]
    assert got["status"] == 400 and got["body"]["error"]["param"] == param, got
    assert message in got["body"]["error"]["message"], got
    assert run(tmp_path / "in.jsonl", out).written == 0


def test_an_output_of_another_job_is_refused(tiny, tmp_path):
    inp = write_rows(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x"}])
    out = write_rows(tmp_path / "out.jsonl", [{"id": 2, "status": 200, "body": {}}])
    r = cli("batch", inp, "-o", out)
    assert r.returncode == 2 and "OUTPUT belongs to another job" in r.stderr
    out.write_text("garbage\n")
    r = cli("batch", inp, "-o", out)
    assert r.returncode == 2 and "is not a row of gpt2-onnx batch" in r.stderr
    r = cli("batch", inp, "-o", inp)
    assert r.returncode == 2 and "OUTPUT is INPUT" in r.stderr
    r = cli("batch", inp, "-o", tmp_path / "o.jsonl", "--batch-size", "0")
    assert r.returncode == 2 and "--batch-size must be an integer >= 1" in r.stderr


def test_killed_mid_job_and_rerun_every_row_exactly_once(bundled_onnx, tmp_path):
    """SIGKILL while the CLI is writing, then the same command again: every row once, the same answers as
    one uninterrupted run (greedy)."""
    rows = [{"id": f"r{i}", "prompt": f"KING {i}:", "max_tokens": 24, "temperature": 0} for i in range(96)]
    rows += [{"id": f"s{i}", "context": f"ROMEO {i}:", "continuation": " my lord"} for i in range(16)]
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "gpt2_onnx.cli", "batch", inp, "-o", out, "-m", bundled_onnx, "--batch-size", "8",
            "--threads", "1", "--provider", "cpu"]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out.exists() and out.read_text().count("\n") >= 16):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    partial = out.read_text().count("\n")
    assert 16 <= partial < len(rows), partial  # killed mid-way
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{partial} already in" in r.stderr and f"wrote {len(rows) - partial} rows" in r.stderr, r.stderr
    got = read_rows(out)
    assert set(got) == {json.dumps(r["id"]) for r in rows}
    once = tmp_path / "once.jsonl"
    run(inp, once, model=str(bundled_onnx), provider="cpu", threads=1, batch_size=16)
    want = read_rows(once)
    assert {k: v["body"].get("choices", v["body"].get("token_logprobs")) for k, v in got.items()} == \
        {k: v["body"].get("choices", v["body"].get("token_logprobs")) for k, v in want.items()}


def test_the_worker_is_one_engine_answering_batches_like_ray_data_calls_it(tiny):
    import numpy as np

    _, engine, _, onnx_dir = tiny
    w = BatchWorker(str(onnx_dir), provider="cpu", max_batch=2)
    try:
        rows = [json.dumps({"id": i, "prompt": [i + 1], "max_tokens": 4, "temperature": 0}) for i in range(5)]
        out = w({"row": np.array(rows, dtype=object)})["row"]
        assert [json.loads(o)["body"]["choices"][0]["text"] for o in out] == \
            [engine.generate([i + 1], max_new_tokens=4).text for i in range(5)]
    finally:
        w.close()


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Two jobs appending to one OUTPUT would write every row twice: the second is refused (the file is
    locked for the first job's whole run), and can run once the first has ended."""
    from gpt2_onnx.batch import prepare

    inp = write_rows(tmp_path / "in.jsonl", [{"id": 1, "prompt": "x", "max_tokens": 1}])
    first = prepare(inp, tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="being written by another gpt2-onnx batch job"):
        prepare(inp, tmp_path / "out.jsonl")
    r = subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", "batch", str(inp), "-o", str(tmp_path / "out.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "being written by another" in r.stderr and "Traceback" not in r.stderr, r.stderr
    first.release()
    second = prepare(inp, tmp_path / "out.jsonl")
    assert second.pending and second.lock is not None
    second.release()


def test_a_row_over_a_mebibyte_is_that_rows_400_and_the_job_goes_on(tiny, tmp_path):
    """No HTTP inside a batch job: a huge row is answered like any bad row, and every later row is answered."""
    _, engine, _, onnx_dir = tiny
    rows = [{"id": 1, "prompt": "the quick", "max_tokens": 4, "temperature": 0},
            {"id": 2, "prompt": "to be " * 200_000, "max_tokens": 4},  # 1.2 MB
            {"id": 3, "prompt": "the lazy", "max_tokens": 4, "temperature": 0}]
    out = tmp_path / "out.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", rows), out, model=str(onnx_dir), provider="cpu")
    got = read_rows(out)
    assert (done.written, done.errors) == (3, 1)
    assert got["2"]["status"] == 400 and got["2"]["body"]["error"]["param"] == "prompt"
    assert got["3"]["body"]["choices"][0]["text"] == engine.generate("the lazy", max_new_tokens=4).text
