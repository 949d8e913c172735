"""gpt2-onnx batch on OpenAI Batch files ({"custom_id", "method", "url", "body"} lines): the server's bodies in
OpenAI's batch output shape, a bad request its own 400 line, resuming by custom_id, bad envelopes and mixed
formats refused (exit 2, one line), chat rows (once gpt2_onnx.server.chat exists)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from gpt2_onnx.batch import prepare, read_input, run
from helpers import read_rows, write_rows

REQUESTS = {  # answered alike in both formats
    "greedy": {"prompt": "the quick", "max_tokens": 12, "temperature": 0},
    "ids-stop": {"prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0, "stop": ["e"]},
    "seeded-n": {"prompt": ["to be", "the lazy"], "max_tokens": 6, "temperature": 0.9, "top_k": 40, "seed": 3, "n": 2},
    "logprobs": {"prompt": "to be", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    "too-long": {"prompt": "x", "max_tokens": 1000},
    "other-model": {"prompt": "x", "model": "nope"},
}
BAD = {  # an OpenAI batch answers these with a 400 line (the gpt2-onnx format refuses the file)
    "hot": ({"prompt": "x", "temperature": 3}, "temperature"),
    "no-prompt": ({"max_tokens": 3}, "prompt"),
    "stream": ({"prompt": "x", "stream": True}, "stream"),
}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gpt2_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def request(custom_id, body, url="/v1/completions", method="POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_custom_id(path) -> dict:
    out = lines(path)
    got = {r["custom_id"]: r for r in out}
    assert len(got) == len(out), "a custom_id appears twice"
    return got


def same(body: dict) -> dict:
    """A body without what differs between two answers of one request (its id and time)."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def openai_rows() -> list[dict]:
    bad = iter(BAD.items())
    rows = []
    for k, body in REQUESTS.items():  # bad requests between good ones
        rows.append(request(k, body))
        cid, (b, _) = next(bad, (None, (None, None)))
        if cid:
            rows.append(request(cid, b))
    return rows


def test_completions_rows_get_the_existing_formats_bodies_in_openais_output_shape(tiny, tmp_path):
    _, engine, _, onnx_dir = tiny
    out, plain = tmp_path / "out.jsonl", tmp_path / "plain.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", openai_rows()), out, model=str(onnx_dir), provider="cpu",
               batch_size=4)
    run(write_rows(tmp_path / "plain-in.jsonl", [{"id": k, **b} for k, b in REQUESTS.items()]), plain,
        model=str(onnx_dir), provider="cpu", batch_size=4)
    assert (done.written, done.errors) == (len(REQUESTS) + len(BAD), 2 + len(BAD))
    got, want = by_custom_id(out), read_rows(plain)
    assert set(got) == set(REQUESTS) | set(BAD)
    for line in lines(out):  # exactly OpenAI's keys
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None, line
        assert set(line["response"]) == {"status_code", "request_id", "body"}, line
        assert re.fullmatch(r"batch_req_[0-9a-f]{32}", line["id"]) and re.fullmatch("[0-9a-f]{32}",
                                                                                     line["response"]["request_id"])
    assert len({line["id"] for line in lines(out)}) == len(got)
    for k in REQUESTS:
        r, w = got[k]["response"], want[json.dumps(k)]
        assert (r["status_code"], same(r["body"])) == (w["status"], same(w["body"])), k
    assert got["greedy"]["response"]["body"]["choices"][0]["text"] == engine.generate("the quick",
                                                                                      max_new_tokens=12).text
    assert [got[k]["response"]["status_code"] for k in ("too-long", "other-model")] == [400, 404]
    for k, (_, param) in BAD.items():
        r = got[k]["response"]
        assert r["status_code"] == 400 and r["body"]["error"]["param"] == param, r
        assert set(r["body"]) == {"error"} and r["body"]["error"]["type"] == "invalid_request_error"


def test_the_bodies_are_the_http_servers(tiny, tmp_path):
    """Every response, a 400 for a bad body included, is what POST /v1/completions answers."""
    pytest.importorskip("uvicorn")
    from gpt2_onnx.server import create_app
    from helpers import Server, post

    _, engine, _, onnx_dir = tiny
    rows = [r for r in openai_rows() if r["custom_id"] != "stream"]  # the server streams that one
    out = tmp_path / "out.jsonl"
    run(write_rows(tmp_path / "in.jsonl", rows), out, model=str(onnx_dir), provider="cpu")
    got = by_custom_id(out)
    server = Server(create_app(engine))
    try:
        for r in rows:
            http = post(server.url, r["body"])
            answer = got[r["custom_id"]]["response"]
            assert (answer["status_code"], same(answer["body"])) == (http.status_code, same(http.json())), r
    finally:
        server.stop()


def test_a_rerun_skips_answered_custom_ids_and_appends_only_the_missing_ones(tiny, tmp_path):
    _, _, _, onnx_dir = tiny
    rows = [request(f"r{i}", {"prompt": [i + 1, 2], "max_tokens": 5, "temperature": 0}) for i in range(6)]
    inp, out = write_rows(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    run(inp, out, model=str(onnx_dir), provider="cpu", batch_size=2)
    full = out.read_text().splitlines()
    out.write_text("\n".join(full[:3]) + "\n" + full[3][: len(full[3]) // 2])  # killed while writing line 4
    again = run(inp, out, model=str(onnx_dir), provider="cpu", batch_size=2)
    assert again.written == 3
    now = out.read_text().splitlines()
    assert now[:3] == full[:3]  # appended to, never rewritten
    assert {k: v["response"]["body"]["choices"] for k, v in by_custom_id(out).items()} == \
        {r["custom_id"]: r["response"]["body"]["choices"] for r in map(json.loads, full)}
    assert run(inp, out, model=str(onnx_dir), provider="cpu").written == 0
    assert out.read_text().splitlines() == now
    plain = write_rows(tmp_path / "plain.jsonl", [{"id": "r0", "status": 200, "body": {}}])
    with pytest.raises(ValueError, match="line 1 is not an OpenAI batch output line"):
        prepare(inp, plain)  # an OUTPUT of the gpt2-onnx format
    with pytest.raises(ValueError, match="OUTPUT belongs to another job"):
        prepare(write_rows(tmp_path / "plain-in.jsonl", [{"id": "r0", "prompt": "x"}]), out)


GOOD = json.dumps(request("a", {"prompt": "x"}))
PLAIN = '{"id": "b", "prompt": "x"}'


@pytest.mark.parametrize("rows, message", [
    ([GOOD, GOOD], "line 2: custom_id 'a' is already used on line 1; custom_ids must be unique"),
    ([GOOD, PLAIN], "line 2 is a gpt2-onnx batch row ({\"id\", ...}) but line 1 is an OpenAI batch request"),
    ([PLAIN, GOOD], "line 2 is an OpenAI batch request (custom_id, method, url, body) but line 1 is a gpt2-onnx"),
    ([json.dumps(request(7, {"prompt": "x"}))], 'line 1: "custom_id" must be a string, got 7'),
])
def test_bad_openai_input_is_exit_2_with_one_line_naming_the_line_and_field(tmp_path, rows, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as e:
        read_input(inp)
    assert message in str(e.value)
    r = cli("batch", inp, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr


def test_chat_rows_without_the_chat_service_are_refused_when_planned(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt2_onnx.server.chat", None)  # import fails, as before it existed
    inp = write_rows(tmp_path / "in.jsonl", [request("a", {"messages": []}, url="/v1/chat/completions")])
    with pytest.raises(ValueError, match='line 1: "url" /v1/chat/completions is not available'):
        read_input(inp)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
ROLES = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


def test_chat_rows_are_answered_as_the_chat_route_answers(tiny, tmp_path):
    pytest.importorskip("gpt2_onnx.server.chat")  # the chat route; everything else here runs without it
    from gpt2_onnx import Engine
    from gpt2_onnx.export import export_model

    _, _, hf, _ = tiny
    shutil.copytree(hf, tmp_path / "hf")  # the tiny checkpoint with a chat template
    cfg_path = tmp_path / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg_path.write_text(json.dumps({**cfg, "chat_template": ROLES}))
    export_model(str(tmp_path / "hf"), tmp_path / "onnx")
    engine = Engine.load(tmp_path / "onnx", provider="cpu")
    chat = "/v1/chat/completions"
    rows = [request("chat", {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}, url=chat),
            request("cmpl", {"prompt": "the quick", "max_tokens": 4, "temperature": 0}),
            request("lp", {"messages": MESSAGES, "max_completion_tokens": 3, "temperature": 0, "logprobs": True,
                           "top_logprobs": 2}, url=chat),
            request("empty", {"messages": [], "max_tokens": 2}, url=chat),
            request("top-alone", {"messages": MESSAGES, "top_logprobs": 2}, url=chat),
            request("stream", {"messages": MESSAGES, "stream": True}, url=chat)]
    out = tmp_path / "out.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", rows), out, model=str(tmp_path / "onnx"), provider="cpu")
    assert (done.written, done.errors) == (6, 3)
    got = {k: v["response"] for k, v in by_custom_id(out).items()}
    want = engine.chat(MESSAGES, max_new_tokens=8)
    body = got["chat"]["body"]
    assert got["chat"]["status_code"] == 200 and body["object"] == "chat.completion", body
    message = body["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", want.text)
    assert body["usage"]["completion_tokens"] == len(want.token_ids)
    assert got["cmpl"]["body"]["choices"][0]["text"] == engine.generate("the quick", max_new_tokens=4).text
    content = got["lp"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(1 <= len(t["top_logprobs"]) <= 2 for t in content)  # 2 (fewer texts if alike)
    for k, param in (("empty", "messages"), ("top-alone", "top_logprobs"), ("stream", "stream")):
        assert got[k]["status_code"] == 400 and got[k]["body"]["error"]["param"] == param, got[k]


@pytest.mark.parametrize("row, param, message", [
    (request("b", {"prompt": "x"}, method="GET"), "method", 'line 1: "method" must be "POST", got \'GET\''),
    (request("a", {"prompt": "x"}, url="/v1/embeddings"), "url",
     'line 1: "url" must be "/v1/completions" or "/v1/chat/completions", got \'/v1/embeddings\''),
    ({"custom_id": "a", "method": "POST", "url": "/v1/completions"}, "body",
     'line 1: the OpenAI batch request has no "body"'),
    (request("a", ["x"]), "body", 'line 1: "body" must be a JSON object'),
    ({**request("a", {"prompt": "x"}), "header": {}}, "header", "line 1: unknown field 'header' in an OpenAI"),
])
def test_a_bad_envelope_is_its_own_400_line(tmp_path, row, param, message):
    out = tmp_path / "out.jsonl"
    done = run(write_rows(tmp_path / "in.jsonl", [row]), out)
    assert (done.written, done.errors) == (1, 1)
    (line,) = lines(out)
    assert line["custom_id"] == row["custom_id"] and line["error"] is None, line
    r = line["response"]
    assert r["status_code"] == 400 and r["body"]["error"]["param"] == param, r
    assert message in r["body"]["error"]["message"], r
