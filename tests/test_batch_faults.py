"""gpt2-onnx batch under faults, with real processes: a bad or huge row is its own error line (the job goes on), a
second job on one OUTPUT is refused, a full disk, an OUTPUT that cannot be written, Ctrl-C, and row errors that
name the row's own fields. Each: exit code, one line on stderr, no traceback, and every row exactly once after a
rerun."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from gpt2_onnx.batch import read_input, run
from helpers import write_rows

TIMEOUT = 120


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


def batch_args(inp, out, onnx_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "gpt2_onnx.cli", "batch", str(inp), "-o", str(out), "-m", str(onnx_dir),
            "--provider", "cpu", "--threads", "1", *map(str, extra)]


def fails_with_one_line(r, code: int, *messages: str) -> str:
    """Exit code `code`, no traceback, the last stderr line is the error (earlier lines: the job's progress)."""
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for m in messages:
        assert m in last, r.stderr[-3000:]
    return last


def only_line(r, *messages: str) -> None:
    """An error before the job starts: exit 2 and exactly one line on stderr."""
    fails_with_one_line(r, 2, *messages)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows_once(path, key="id") -> dict:
    got = lines(path)
    by = {json.dumps(r[key]): r for r in got}
    assert len(by) == len(got), "a row appears twice"
    return by


def wait_rows(out, n: int, proc) -> None:
    """Wait until the job `proc` has written n lines to out (it must still run)."""
    deadline = time.time() + TIMEOUT
    while not (out.exists() and out.read_text().count("\n") >= n):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)


def slow_rows(n: int, tokens: int = 100) -> list[dict]:
    return [{"id": i, "prompt": f"the quick {i}", "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
            for i in range(n)]


# ---- a poison row is its own error line ------------------------------------------------------------------
HUGE = "to be " * 200_000  # 1.2 MB: over the HTTP server's 1 MiB, which a batch job (no HTTP) does not have


def test_bad_and_huge_rows_get_their_own_error_lines_and_the_job_goes_on(tiny, tmp_path):
    _, engine, _, onnx_dir = tiny
    plain = [{"id": 1, "prompt": "the quick", "max_tokens": 4, "temperature": 0},
             {"id": "huge", "prompt": HUGE, "max_tokens": 4},
             {"id": "field", "prompt": "x", "max_tokens": -1},
             {"id": "unknown", "prompt": "x", "bogus": 1},
             {"id": "stream", "prompt": "x", "stream": True},
             {"id": "both", "prompt": "x", "context": "y", "continuation": "z"},
             {"id": "neither", "max_tokens": 3},
             {"id": "no-cont", "context": "x"},
             {"id": 2, "prompt": "the lazy", "max_tokens": 4, "temperature": 0}]
    inp, out = write_rows(tmp_path / "in.jsonl", plain), tmp_path / "out.jsonl"
    r = cli(*batch_args(inp, out, onnx_dir)[3:])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "wrote 9 rows (7 with an error status)" in r.stderr, r.stderr
    got = rows_once(out)
    assert got["1"]["body"]["choices"][0]["text"] == engine.generate("the quick", max_new_tokens=4).text
    assert got["2"]["body"]["choices"][0]["text"] == engine.generate("the lazy", max_new_tokens=4).text
    huge = got['"huge"']  # answered on its merits: far beyond n_positions
    assert (huge["status"], huge["body"]["error"]["param"]) == (400, "prompt") and "n_positions" in \
        huge["body"]["error"]["message"]
    expected = [("field", "max_tokens", "line 3: max_tokens"),
                ("unknown", "bogus", "line 4: unknown field 'bogus'"),
                ("stream", "stream", "line 5: stream is not supported"),
                ("both", "prompt", "line 6: a row has either"),
                ("neither", "prompt", "line 7: the row has neither"),
                ("no-cont", "continuation", "line 8: continuation is required")]
    for key, param, words in expected:
        row = got[json.dumps(key)]
        assert row["status"] == 400 and set(row["body"]) == {"error"}, row
        e = row["body"]["error"]
        assert (e["param"], e["type"]) == (param, "invalid_request_error") and words in e["message"], row
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == 0  # the rerun skips them like any row

    request = lambda cid, body, **kw: {"custom_id": cid, "method": "POST", "url": "/v1/completions",  # noqa: E731
                                       "body": body, **kw}
    openai = [request("a", {"prompt": "the quick", "max_tokens": 4, "temperature": 0}),
              request("huge", {"prompt": HUGE, "max_tokens": 4}),
              request("get", {"prompt": "x"}, method="GET"),
              request("url", {"prompt": "x"}, url="/v1/embeddings"),
              request("body", ["x"]),
              {"custom_id": "nobody", "method": "POST", "url": "/v1/completions"},
              request("header", {"prompt": "x"}, header={}),
              request("b", {"prompt": "the lazy", "max_tokens": 4, "temperature": 0})]
    inp, out = write_rows(tmp_path / "openai.jsonl", openai), tmp_path / "openai-out.jsonl"
    done = run(inp, out, model=str(onnx_dir), provider="cpu")  # the CLI's path, in this process
    assert (done.written, done.errors) == (8, 6)
    got = {k: v["response"] for k, v in rows_once(out, "custom_id").items()}
    assert got['"b"']["body"]["choices"][0]["text"] == engine.generate("the lazy", max_new_tokens=4).text
    assert got['"huge"']["status_code"] == 400 and got['"huge"']["body"]["error"]["param"] == "prompt"
    expected = [("get", "method", 'line 3: "method" must be "POST"'),
                ("url", "url", 'line 4: "url" must be'),
                ("body", "body", 'line 5: "body" must be a JSON object'),
                ("nobody", "body", 'line 6: the OpenAI batch request has no "body"'),
                ("header", "header", "line 7: unknown field 'header'")]
    for cid, param, words in expected:
        resp = got[json.dumps(cid)]
        assert resp["status_code"] == 400 and resp["body"]["error"]["param"] == param, resp
        assert words in resp["body"]["error"]["message"], resp
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == 0 and len(lines(out)) == 8

    # a line whose id cannot be read is the one thing that stops a job: it could not be skipped on a rerun
    unreadable = [('{"prompt": "x"}', 'line 2: the row has no "id"'),
                  ('{"id": 1.5, "prompt": "x"}', '"id" must be a string or an integer'),
                  ("not json", "line 2 is not JSON"),
                  ('{"id": 1, "prompt": "y"}', "id 1 is already used on line 1"),
                  ('{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}',
                   "line 2 is an OpenAI batch request")]
    for bad, words in unreadable:
        (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "x"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=None) as e:
            read_input(tmp_path / "bad.jsonl")
        assert words in str(e.value) and ("nothing was answered" in str(e.value) or "custom_id" in bad)
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "x"}\n{"prompt": "y"}\n')
    r = cli(*batch_args(tmp_path / "bad.jsonl", tmp_path / "bad-out.jsonl", onnx_dir)[3:])
    only_line(r, 'line 2: the row has no "id"', "nothing was answered")
    assert not (tmp_path / "bad-out.jsonl").exists()


# ---- one OUTPUT, one job ----------------------------------------------------------------------------------
def test_a_second_job_on_the_same_output_is_one_clear_error_and_rows_are_written_once(tiny, tmp_path):
    """Two real processes on one -o: the second is refused while the first holds the lock (stopped with SIGSTOP
    right after its first batch, so that the overlap is certain), the first then finishes, every row once."""
    _, _, _, onnx_dir = tiny
    rows = slow_rows(24, tokens=8)
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    first = subprocess.Popen(batch_args(inp, out, onnx_dir, "--batch-size", "4"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_rows(out, 4, first)
        first.send_signal(signal.SIGSTOP)
        try:
            second = cli(*batch_args(inp, out, onnx_dir)[3:])
            via_link = tmp_path / "link.jsonl"
            via_link.symlink_to(out)  # the same file under another name
            third = cli(*batch_args(inp, via_link, onnx_dir)[3:])
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        first.kill()
    for r in (second, third):
        only_line(r, "is being written by another gpt2-onnx batch job", "write to another file (-o)")
    assert first.returncode == 0 and "wrote 24 rows" in err, err
    assert set(rows_once(out)) == {json.dumps(r["id"]) for r in rows}
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == 0  # the lock went with the first job


# ---- a full disk, an OUTPUT that cannot be written ---------------------------------------------------------
def test_a_full_disk_or_an_unwritable_output_is_one_line_and_exit_2(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    rows = slow_rows(40, tokens=8)
    inp = write_rows(tmp_path / "in.jsonl", rows)
    if os.path.exists("/dev/full"):  # every write fails with ENOSPC
        r = cli(*batch_args(inp, "/dev/full", onnx_dir)[3:])
        fails_with_one_line(r, 2, "cannot write OUTPUT /dev/full (No space left on device)", "run the same command "
                            "again")
    (tmp_path / "dir").mkdir()
    only_line(cli(*batch_args(inp, tmp_path / "dir", onnx_dir)[3:]), f"cannot write OUTPUT {tmp_path / 'dir'}",
              "Is a directory")
    only_line(cli(*batch_args(inp, tmp_path / "missing" / "x.jsonl", onnx_dir)[3:]), "cannot write OUTPUT",
              "No such file or directory")

    # the disk fills mid-job (a file size limit: the kernel's EFBIG, a write cut in the middle of a line): the rows
    # written are kept, the rerun cuts the torn line and answers the rest, every row once
    out = tmp_path / "out.jsonl"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # noqa: E731
    r = subprocess.run(batch_args(inp, out, onnx_dir, "--batch-size", "4"), capture_output=True, text=True,
                       timeout=TIMEOUT, preexec_fn=limit)
    fails_with_one_line(r, 2, f"cannot write OUTPUT {out} (File too large)", "rows written before are kept")
    kept = out.read_bytes().count(b"\n")  # whole lines; what follows the last one is a torn line
    assert 0 < kept < len(rows)
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == len(rows) - kept  # the torn line cut
    assert set(rows_once(out)) == {json.dumps(r["id"]) for r in rows}


def test_enospc_mid_job_keeps_the_rows_written_and_the_rerun_finishes(tiny, tmp_path):
    """ENOSPC injected into the second batch's write (os.fsync fails as a full disk makes it): one line, exit 2."""
    _, _, _, onnx_dir = tiny
    rows = slow_rows(12, tokens=4)
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    hook = ("import errno, os, sys\nreal, calls = os.fsync, []\n"
            "def fsync(fd):\n    calls.append(fd)\n    if len(calls) > 1:\n"
            "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n    real(fd)\n"
            "os.fsync = fsync\nsys.argv[0] = 'gpt2-onnx'\nfrom gpt2_onnx import cli\ncli.main()\n")
    r = subprocess.run([sys.executable, "-c", hook, *batch_args(inp, out, onnx_dir, "--batch-size", "4")[3:]],
                       capture_output=True, text=True, timeout=TIMEOUT)
    fails_with_one_line(r, 2, f"cannot write OUTPUT {out} (No space left on device)", "the 4 rows written before "
                        "are kept")
    kept = out.read_bytes().count(b"\n")  # the 4 fsynced, and the failed batch's lines that reached the file
    assert 4 <= kept < len(rows)
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == len(rows) - kept
    assert set(rows_once(out)) == {json.dumps(r["id"]) for r in rows}


# ---- Ctrl-C -----------------------------------------------------------------------------------------------
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_resumes(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    rows = slow_rows(300, tokens=30)
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    p = subprocess.Popen(batch_args(inp, out, onnx_dir, "--batch-size", "8"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_rows(out, 8, p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    data = out.read_bytes()
    held = data.count(b"\n")
    assert data.endswith(b"\n") and 8 <= held < len(rows)  # whole lines only
    last = err.strip().splitlines()[-1]
    assert last == (f"interrupted: {out} holds {held} of the {len(rows)} rows (flushed and fsynced); run the same "
                    f"command again to answer the other {len(rows) - held}"), err
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == len(rows) - held  # nothing torn, resumed
    assert set(rows_once(out)) == {json.dumps(r["id"]) for r in rows}


# ---- messages: the row's own words -------------------------------------------------------------------------
@pytest.mark.parametrize("openai", [False, True])
def test_row_errors_name_the_rows_own_fields_never_a_cli_flag(tiny, tmp_path, openai):
    _, engine, _, onnx_dir = tiny
    n = engine.config.n_positions
    bodies = {"nan": {"prompt": "x", "temperature": float("nan")},
              "inf": {"prompt": "x", "top_p": float("inf")},
              "long": {"prompt": "x", "max_tokens": 10 * n}}
    scores = {"long-score": {"context": [1] * (n - 2), "continuation": [2] * 5},
              "long-context": {"context": [1] * n, "continuation": [2]}}
    if openai:
        rows = [{"custom_id": k, "method": "POST", "url": "/v1/completions", "body": b} for k, b in bodies.items()]
    else:
        rows = [{"id": k, **b} for k, b in {**bodies, **scores}.items()]
    out = tmp_path / "out.jsonl"
    run(write_rows(tmp_path / "in.jsonl", rows), out, model=str(onnx_dir), provider="cpu")
    key = "custom_id" if openai else "id"
    got = {json.loads(k): (v["response"]["status_code"], v["response"]["body"]) if openai else (v["status"], v["body"])
           for k, v in rows_once(out, key).items()}
    for k, param in (("nan", "temperature"), ("inf", "top_p"), ("long", "max_tokens")):
        status, body = got[k]
        assert status == 400 and body["error"]["param"] == param and param in body["error"]["message"], body
        assert "--" not in body["error"]["message"], body  # never the CLI's flag
    if not openai:
        status, body = got["long-score"]
        assert (status, body["error"]["param"]) == (400, "continuation"), body
        assert body["error"]["message"] == (
            f"context of {n - 2} tokens + continuation of 5 tokens = {n + 3} exceeds the model's context of "
            f"n_positions {n} tokens; shorten the context or the continuation")
        assert "max_new_tokens" not in body["error"]["message"] and "max_tokens" not in body["error"]["message"]
        assert got["long-context"][1]["error"]["param"] == "context"
