"""Chat: templates rendered as transformers' apply_chat_template renders them, Engine.chat, the export keeping
a checkpoint's chat_template, and /v1/chat/completions through the official openai client."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from gpt2_onnx import Engine  # noqa: E402
from gpt2_onnx.chat import DIALOGPT  # noqa: E402
from gpt2_onnx.export import export_model  # noqa: E402
from gpt2_onnx.server import create_app  # noqa: E402
from helpers import Server  # noqa: E402

ROLES = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STRICT = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}"
          "{% endif %}{% for m in messages %}{{ m['content'] | tojson }}{{ eos_token }}{% endfor %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
            {"role": "assistant", "content": "A friend."}, {"role": "user", "content": "Whence \"comest\" thou?"}]


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    """The tiny checkpoint with a chat_template in its tokenizer_config.json, exported."""
    _, _, hf, _ = tiny
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(hf, root / "hf")
    cfg_path = root / "hf" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg_path.write_text(json.dumps({**cfg, "chat_template": ROLES}))
    export_model(str(root / "hf"), root / "onnx")
    return root / "hf", Engine.load(root / "onnx", provider="cpu")


@pytest.mark.parametrize("template", [ROLES, CHATML, DIALOGPT, STRICT])
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_transformers_apply_chat_template(chat_model, template, gen):
    from transformers import AutoTokenizer

    hf, engine = chat_model
    tok = AutoTokenizer.from_pretrained(str(hf))
    want = tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=gen)
    assert engine.chat_prompt(MESSAGES, chat_template=template, add_generation_prompt=gen) == want


def test_export_keeps_the_checkpoints_template_and_engine_chat_uses_it(chat_model):
    _, engine = chat_model
    assert engine.chat_template == ROLES
    prompt = engine.chat_prompt(MESSAGES)
    assert prompt.endswith("assistant:")
    assert engine.chat(MESSAGES, max_new_tokens=8).token_ids == engine.generate(prompt, max_new_tokens=8).token_ids


def test_bad_messages_and_templates_are_value_errors(chat_model, tiny):
    _, engine = chat_model
    for messages, fragment in (([], "non-empty list"), ([{"content": "x"}], "role"),
                               ([{"role": "user", "content": 3}], "content must be a string")):
        with pytest.raises(ValueError, match=fragment):
            engine.chat(messages)
    with pytest.raises(ValueError, match="system message must come first"):
        engine.chat([{"role": "user", "content": "x"}], chat_template=STRICT)
    with pytest.raises(ValueError, match="does not compile"):
        engine.chat(MESSAGES, chat_template="{% for %}")
    with pytest.raises(ValueError, match="no chat template.*--chat-template"):
        tiny[1].chat(MESSAGES)


def test_the_template_is_sandboxed(chat_model):
    _, engine = chat_model
    with pytest.raises(ValueError, match="unsafe|not safely|access"):
        engine.chat_prompt(MESSAGES, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")


@pytest.fixture(scope="module")
def chat_server(chat_model):
    _, engine = chat_model
    s = Server(create_app(engine, model_id="tiny-chat", max_batch=8))
    yield s, engine
    s.stop()


def test_openai_client_chat_and_stream_answer_as_engine_chat(chat_server):
    s, engine = chat_server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    lib = engine.chat(MESSAGES, max_new_tokens=12)
    r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == lib.text
    assert choice.finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert r.usage.completion_tokens == len(lib.token_ids)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(engine.chat_prompt(MESSAGES)))
    assert len(choice.logprobs.content) == len(lib.token_ids)
    # alternatives come from the completions shape (a dict by token text): ids with the same text merge
    assert all(1 <= len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in choice.logprobs.content)
    assert any(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == lib.text
    assert chunks[-1].usage.completion_tokens == len(lib.token_ids)


def test_chat_n_seed_and_structured_output(chat_server):
    s, engine = chat_server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    lib = engine.generate_batch([engine.chat_prompt(MESSAGES)], n=3, max_new_tokens=10, temperature=0.9, seed=4)
    r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_completion_tokens=10, n=3,
                                       temperature=0.9, seed=4)
    assert [c.message.content for c in r.choices] == [x.text for x in lib]
    r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, temperature=0.9, seed=1,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "a", "schema": {"type": "object", "properties": {
                                               "ok": {"type": "boolean"}}, "required": ["ok"],
                                               "additionalProperties": False}}})
    assert json.loads(r.choices[0].message.content) in ({"ok": True}, {"ok": False})


def test_chat_errors_are_openai_shaped_400s(chat_server, tiny):
    s, _ = chat_server
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"role": "user", "content": 1}]}, "messages"),
                        ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
                        ({"messages": MESSAGES, "echo": True}, "echo"), ({"messages": MESSAGES, "model": "x"}, "model")):
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)
    plain = Server(create_app(tiny[1], model_id="plain"))
    try:
        r = httpx.post(plain.url + "/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 400 and "--chat-template" in r.json()["error"]["message"]
    finally:
        plain.stop()
    with_template = Server(create_app(tiny[1], model_id="plain", chat_template=DIALOGPT))
    try:
        r = httpx.post(with_template.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4,
                                                                         "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        with_template.stop()
