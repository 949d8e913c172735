"""The HTTP server on loopback: OpenAI client, load with continuous batching, faults. Bounded in time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from gpt2_onnx.server import create_app  # noqa: E402
from helpers import Server, post  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny):
    _, engine, _, _ = tiny
    s = Server(create_app(engine, model_id="tiny", max_batch=8))
    yield s, engine
    s.stop()


def test_openai_client_completions_and_stream(server):
    s, engine = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0)
    want = engine.generate("the quick", max_new_tokens=12)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_the_openai_clients_plain_streaming_loop(server):
    """`for c in stream: print(c.choices[0].text)`, as the openai client's examples do: no chunk without choices
    unless stream_options.include_usage asks for the usage chunk."""
    s, engine = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    text = ""
    for c in client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0, stream=True):
        text += c.choices[0].text
    assert text == engine.generate("the quick", max_new_tokens=12).text
    chunks = list(client.completions.create(model="tiny", prompt="the quick", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.choices and c.usage is None for c in chunks[:-1])


def test_ignore_eos_and_stop_token_ids(server):
    """vLLM's fields: a stop token id ends the choice with finish_reason stop (its id counted, its text not
    returned); ignore_eos generates past <|endoftext|>."""
    s, engine = server
    full = engine.generate([9, 8], max_new_tokens=12, ignore_eos=True)
    stop_id = full.token_ids[4]
    r = post(s.url, {"prompt": [9, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                     "stop_token_ids": [stop_id]}).json()
    want = engine.generate([9, 8], max_new_tokens=12, ignore_eos=True, stop_token_ids=[stop_id])
    k = full.token_ids.index(stop_id)
    assert want.token_ids == full.token_ids[: k + 1] and want.finish_reason == "stop"
    assert r["choices"][0]["text"] == want.text and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == k + 1
    bad = post(s.url, {"prompt": "x", "stop_token_ids": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop_token_ids"


def test_sampling_n_and_seed_match_the_engine(server):
    s, engine = server
    body = {"prompt": "to be", "max_tokens": 10, "temperature": 0.9, "top_k": 50, "seed": 4, "n": 3}
    a, b = post(s.url, body).json(), post(s.url, body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    want = engine.generate_batch(["to be"], max_new_tokens=10, temperature=0.9, top_k=50, seed=4, n=3)
    assert [c["text"] for c in a["choices"]] == [w.text for w in want]


def test_decoding_controls_answer_as_the_library_does_while_batched_with_other_requests(server):
    """Beam search (vLLM's use_beam_search: width best_of, the top n), best_of, the processors and min_p/typical_p
    through the official openai client (extra_body for vLLM's fields), all at once with plain greedy
    requests: each answer equals the library's."""
    s, engine = server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    prompts = ["the quick", [5, 6, 7], "to be or"]
    cases = [
        (dict(n=2, best_of=4, extra_body={"use_beam_search": True, "length_penalty": 0.8}),
         dict(num_beams=4, n=2, length_penalty=0.8)),
        (dict(n=3, extra_body={"use_beam_search": True, "early_stopping": True}), dict(num_beams=3, n=3,
                                                                                      early_stopping=True)),
        (dict(n=2, best_of=5, temperature=0.9, seed=3), dict(n=2, best_of=5, temperature=0.9, seed=3)),
        (dict(temperature=0, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={"7": 4.0},
              extra_body={"no_repeat_ngram_size": 2, "min_tokens": 12, "bad_words": ["the"]}),
         dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={7: 4.0}, no_repeat_ngram_size=2,
              min_new_tokens=12, bad_words=["the"])),
        (dict(temperature=0.8, seed=1, extra_body={"min_p": 0.1, "typical_p": 0.8}),
         dict(temperature=0.8, seed=1, min_p=0.1, typical_p=0.8)),
    ]

    def ask(case):
        api, _ = case
        return client.completions.create(model="tiny", prompt=prompts, max_tokens=14, **{"temperature": 0, **api})

    def plain(i):
        return post(s.url, {"prompt": [i % 50, 3], "max_tokens": 14, "temperature": 0}).json()["choices"][0]["text"]

    with ThreadPoolExecutor(12) as pool:
        others = [pool.submit(plain, i) for i in range(8)]
        got = list(pool.map(ask, cases))
        assert [o.result() for o in others] == [engine.generate([i % 50, 3], max_new_tokens=14).text for i in range(8)]
    for (api, lib), r in zip(cases, got):
        want = engine.generate_batch(prompts, max_new_tokens=14, **lib)
        assert [c.text for c in r.choices] == [w.text for w in want], api
        assert [c.index for c in r.choices] == list(range(len(want)))
        assert [c.finish_reason for c in r.choices] == [{"eos": "stop"}.get(w.finish_reason, w.finish_reason)
                                                        for w in want]


def test_n_up_to_max_batch_shares_one_prefill(server, monkeypatch):
    """n (and best_of, beams) may be as large as --max-batch (8 here); one prompt's rows join together and
    its prompt runs once."""
    from gpt2_onnx.model import Model

    s, engine = server
    runs = []
    real = Model.run
    monkeypatch.setattr(Model, "run", lambda self, cache, ids, *a, **k: (runs.append(ids.shape), real(self, cache, ids,
                                                                                                       *a, **k))[1])
    r = post(s.url, {"prompt": "the quick brown", "max_tokens": 6, "n": 8, "temperature": 1.0, "seed": 2}).json()
    assert len(r["choices"]) == 8 and len(runs) == 1 and runs[0][0] == 1  # one prefill of one row
    want = engine.generate_batch(["the quick brown"], max_new_tokens=6, n=8, temperature=1.0, seed=2)
    assert [c["text"] for c in r["choices"]] == [w.text for w in want]


def test_stop_strings_and_prompt_lists(server):
    s, engine = server
    full = engine.generate("the lazy", max_new_tokens=30).text
    stop = full[5:8]
    r = post(s.url, {"prompt": ["the lazy", [5, 6, 7]], "max_tokens": 30, "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[: full.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][1]["text"] == engine.generate([5, 6, 7], max_new_tokens=30, stop=[stop]).text


def test_64_concurrent_clients_get_their_solo_greedy_answers(server):
    s, engine = server
    prompts = [[(7 * i + j) % 1000 for j in range(1 + i % 13)] for i in range(64)]
    want = [engine.generate(p, max_new_tokens=8 + i % 9).text for i, p in enumerate(prompts)]

    def one(i):
        r = post(s.url, {"prompt": prompts[i], "max_tokens": 8 + i % 9, "temperature": 0})
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    assert [g[0] for g in got] == [200] * 64
    assert [g[1] for g in got] == want
    m = httpx.get(s.url + "/metrics").text
    assert 'gpt2onnx_requests_total{status="200"}' in m and "gpt2onnx_time_to_first_token_seconds_bucket" in m


def test_client_disconnect_mid_stream_frees_its_slot(server):
    s, _ = server
    with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                      json={"prompt": "x", "max_tokens": 100, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while httpx.get(s.url + "/health").json()["active"]:
        assert time.time() < deadline, "slot not freed after disconnect"
        time.sleep(0.05)
    assert post(s.url, {"prompt": "x", "max_tokens": 3, "temperature": 0}).status_code == 200


@pytest.mark.parametrize("body, param, fragment", [
    (b'{"prompt": "x", "max_tokens": ', None, "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', None, "could not be parsed as JSON (invalid UTF-8"),
    (b'[1, 2]', None, "JSON object"),
    ({"prompt": 5}, "prompt", "prompt must be"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "max_tokens: Input should be greater than or equal to 0"),
    ({"prompt": "x", "max_tokens": 10**9}, "max_tokens", "max_tokens 1000000000 = 1000000001 exceeds the model's context"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "max_tokens: Input should be a valid integer, got '5'"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "max_tokens: Input should be a valid integer"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "temperature: Input should be a valid number"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "temperature: Input should be less than or equal to 2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p: Input should be greater than 0"),
    ({"prompt": "x", "n": 17}, "n", "n asks for 17 sequences of one prompt decoding together but the engine runs at "
                                    "most 8 (max_batch)"),
    ({"prompt": "x", "best_of": 9, "n": 2}, "best_of", "best_of asks for 9 sequences"),
    ({"prompt": "x", "use_beam_search": True, "best_of": 9}, "use_beam_search", "use_beam_search asks for 9"),
    ({"prompt": "x", "best_of": 1, "n": 2}, "best_of", "best_of must be >= n"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "best_of cannot stream"),
    ({"prompt": "x", "use_beam_search": True, "stream": True}, "use_beam_search", "use_beam_search cannot stream"),
    ({"prompt": "x", "use_beam_search": True, "temperature": 0.7}, "temperature", "omit temperature or send 0"),
    ({"prompt": "x", "use_beam_search": True, "n": 3, "best_of": 2}, "n", "at most num_beams (2) hypotheses"),
    ({"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias", "keys must be token ids"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "values must be in [-100, 100]"),
    ({"prompt": "x", "logit_bias": {"5000": 1}}, "logit_bias", "outside the vocabulary"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"prompt": "x", "min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"prompt": "x", "min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"prompt": "x", "bad_words": [""]}, "bad_words", "non-empty words"),
    ({"prompt": "x", "early_stopping": "sometimes"}, "early_stopping", "early_stopping"),
    ({"prompt": "x", "use_beam_search": True, "length_penalty": 2000}, "length_penalty", "less than or equal to 50"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "min_tokens must not exceed the most new tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
    ({"prompt": []}, "prompt", "prompt must not be an empty list"),
    ({"prompt": ["x"] * 65}, "prompt", "at most 64 prompts"),
    ({"max_tokens": 3}, "prompt", "prompt is required"),
    ({"prompt": "x", "bogus": 1}, "bogus", "unknown field"),
    ({"prompt": [1, 100000]}, "prompt", "outside the vocabulary"),
    ({"prompt": "x " * 20, "max_tokens": 100}, "max_tokens", "n_positions 128"),
    ({"prompt": "x " * 200, "max_tokens": 1}, "prompt", "n_positions 128"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs: Input should be less than or equal to 20"),
])
def test_bad_requests_get_400_naming_the_field(server, body, param, fragment):
    s, _ = server
    r = post(s.url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["param"] == param


def test_wrong_model_body_limit_and_health(server):
    s, _ = server
    assert post(s.url, {"prompt": "x", "model": "gpt-4"}).status_code == 404
    assert post(s.url, b'{"prompt": "' + b"a" * (2 << 20) + b'"}').status_code == 413
    assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_api_key_queue_full_and_requests_that_can_never_fit(tiny, monkeypatch):
    from gpt2_onnx.model import DecodeStep

    real, go = DecodeStep.__call__, threading.Event()
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, *a: (go.wait(30), real(self, *a))[1])  # held until go
    _, engine, _, _ = tiny
    s = Server(create_app(engine, model_id="t", api_key="sekrit", max_batch=1, max_queue=1))
    auth = {"authorization": "Bearer sekrit"}
    try:
        assert post(s.url, {"prompt": "x"}).status_code == 401
        assert post(s.url, {"prompt": "x"}, headers={"authorization": "Bearer nope"}).status_code == 401
        r = post(s.url, {"prompt": "x", "n": 2}, headers=auth)  # 2 sequences, a queue of 1: never fits
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        def until(field: str) -> None:
            deadline = time.time() + 30
            while httpx.get(s.url + "/health").json()[field] < 1:
                assert time.time() < deadline, field
                time.sleep(0.01)

        with ThreadPoolExecutor(2) as pool:
            busy = []
            for field in ("active", "queue_depth"):  # one runs (held), then one waits: sent together, the
                busy.append(pool.submit(post, s.url, {"prompt": "x", "max_tokens": 5, "temperature": 0},
                                        headers=auth))  # second could find the first still queued (429)
                until(field)
            r = post(s.url, {"prompt": "x"}, headers=auth)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert httpx.get(s.url + "/health").status_code == 200  # health stays open
            go.set()
            assert [f.result().status_code for f in busy] == [200, 200]
    finally:
        s.stop()
