"""The playground page at `/` of the server.

Always: the page and the static files it names are served with their content types, nothing is loaded from
outside (no CDN: works offline), and `/` stays open when /v1/* needs an API key.
In a browser (Debian's chromium driven by playwright; skipped without either): the page streams the text the API
answers, each token's log-prob and alternatives on hover, the server's error messages, Stop, and the API key.

`PYTHONPATH=. python tests/test_playground.py [docs/playground.png]` takes the screenshot with the bundled model.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from gpt2_onnx.server import create_app  # noqa: E402
from gpt2_onnx.server.app import STATIC  # noqa: E402
from helpers import Server  # noqa: E402

TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}  # starlette's types, by suffix


class _Refs(HTMLParser):
    """The resources a page loads: src and href of its elements (<a> links excepted)."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and tag != "a" and value:
                self.refs.append(value)


def refs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.refs


@pytest.fixture(scope="module")
def served(tiny):
    """The tiny model served openly (with a prefix served as a second model, "story"), and behind the API key "k"."""
    _, engine, _, _ = tiny
    open_ = Server(create_app(engine, model_id="tiny", max_batch=4, prefixes={"story": engine.prefill("once upon")}))
    keyed = Server(create_app(engine, model_id="tiny", max_batch=4, api_key="k"))
    yield open_, keyed
    open_.stop()
    keyed.stop()


# ---- without a browser ------------------------------------------------------------------------------
def test_the_page_and_its_static_files_are_served(served):
    s, _ = served
    page = httpx.get(s.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    names = refs(page.text)
    assert {"/static/app.js", "/static/style.css"} <= set(names)
    assert re.search(r'<script src="/static/app.js"', page.text)
    for ref in (r for r in names if r.startswith("/static/")):
        r = httpx.get(s.url + ref)
        assert r.status_code == 200, ref
        assert r.headers["content-type"].startswith(TYPES[Path(ref).suffix]), (ref, r.headers["content-type"])
        assert r.content == (STATIC / ref.removeprefix("/static/")).read_bytes()
    assert httpx.get(s.url + "/static/nothing-here.js").status_code == 404


def test_the_page_loads_nothing_from_outside():
    """No http(s):// or protocol-relative URL anywhere in the shipped files: the page works offline."""
    files = sorted(p for p in STATIC.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css"}
    for p in files:
        text = p.read_text()
        assert not re.search(r"https?://", text, re.IGNORECASE), p.name
        assert not re.search(r"""(?:url\(\s*["']?|(?:src|href)\s*=\s*["']?|fetch\(\s*["'`])//""", text), p.name
        assert "@import" not in text, p.name
    html = (STATIC / "index.html").read_text()
    assert all(r.startswith(("/static/", "data:")) for r in refs(html)), refs(html)
    assert "Content-Security-Policy" in html  # which also holds the browser to 'self'
    fetched = re.findall(r"""fetch\(\s*["'`]([^"'`]+)""", (STATIC / "app.js").read_text())
    assert fetched and all(u.startswith("/v1/") for u in fetched), fetched


def test_the_page_stays_open_when_the_api_needs_a_key(served):
    _, s = served
    assert httpx.get(s.url + "/").status_code == 200
    assert httpx.get(s.url + "/static/app.js").status_code == 200
    assert httpx.get(s.url + "/v1/models").status_code == 401
    ok = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and [m["id"] for m in ok.json()["data"]] == ["tiny"]


# ---- in a browser -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no browser: chromium is not on PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright; its own browsers are not "
                    "needed, the system's chromium is used)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (its own sessionStorage); fails the test on a script error or a CSP violation."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield page
    context.close()
    assert not problems, problems


def open_page(page, url: str):
    page.goto(url + "/")
    return page


def generate(page, prompt: str, **fields) -> str:
    """Type a prompt and options (input id -> value), click Generate, wait until the stream ends; its state."""
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))
    page.click("#generate")
    page.wait_for_selector("#stats:not([data-state='running'])", state="attached")
    return page.get_attribute("#stats", "data-state")


def completion(url: str, body: dict, key: str | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def test_the_page_streams_what_the_api_answers_with_logprobs_on_hover(served, page):
    s, _ = served
    open_page(page, s.url).wait_for_selector("#model option[value='tiny']", state="attached")
    assert page.is_hidden("#key-form") and page.is_enabled("#model")
    assert generate(page, "the quick", **{"max-tokens": 12, "temperature": 0}) == "done"
    want = completion(s.url, {"model": "tiny", "prompt": "the quick", "max_tokens": 12, "temperature": 0,
                              "logprobs": 5}).json()["choices"][0]
    assert page.text_content("#output") == want["text"] and want["text"]
    assert page.text_content("#shown-prompt") == "the quick"
    assert page.get_attribute("#stats", "data-tokens") == "12"
    assert re.search(r"12 tokens · [\d.]+ tokens/s", page.text_content("#stats"))
    assert page.is_hidden("#error")

    titles = page.eval_on_selector_all("#output .tok", "spans => spans.map(s => s.title)")
    texts = page.eval_on_selector_all("#output .tok", "spans => spans.map(s => s.textContent)")
    assert "".join(texts) == want["text"] and all(titles), titles
    lp = want["logprobs"]
    joined, at = "\n\n".join(titles), 0
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        at = joined.index(f"{json.dumps(token, ensure_ascii=False)}  log p {logprob:.3f}", at)  # in order
        for alt, alt_lp in top.items():
            assert f"{json.dumps(alt, ensure_ascii=False)}  {alt_lp:.3f}" in joined
    assert len(lp["tokens"]) == 12 and all(1 <= len(t) <= 5 for t in lp["top_logprobs"])  # keys may coincide

    page.hover("#output .tok >> nth=1")  # hovering shows the token's details beside the output too
    assert page.text_content("#token-info") == titles[1]

    stop = want["text"][len(want["text"]) // 2:][:2]  # stop strings, one per line, "\n" written as \n
    page.fill("#stop", "never\n" + stop.replace("\\", "\\\\").replace("\n", "\\n"))
    assert generate(page, "the quick", **{"max-tokens": 12, "temperature": 0}) == "done"
    cut = completion(s.url, {"model": "tiny", "prompt": "the quick", "max_tokens": 12, "temperature": 0,
                             "stop": ["never", stop]}).json()["choices"][0]
    assert page.text_content("#output") == cut["text"] and len(cut["text"]) < len(want["text"])
    assert "finish: stop" in page.text_content("#stats")


def test_the_model_picker_lists_the_served_models_and_sends_the_chosen_one(served, page):
    s, _ = served
    open_page(page, s.url).wait_for_selector("#model option[value='story']", state="attached")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny", "story"]
    assert page.input_value("#model") == "tiny"
    page.select_option("#model", "story")
    assert generate(page, "the quick", **{"max-tokens": 10, "temperature": 0}) == "done"
    body = {"prompt": "the quick", "max_tokens": 10, "temperature": 0}
    story, plain = (completion(s.url, {**body, "model": m}).json()["choices"][0]["text"] for m in ("story", "tiny"))
    assert story != plain and page.text_content("#output") == story


def test_the_page_shows_the_servers_error_messages(served, page):
    s, _ = served
    open_page(page, s.url).wait_for_selector("#model option[value='tiny']", state="attached")
    assert generate(page, "the quick", **{"max-tokens": 1000, "temperature": 0}) == "error"
    bad = completion(s.url, {"prompt": "the quick", "max_tokens": 1000, "temperature": 0, "stream": True})
    assert bad.status_code == 400
    assert page.text_content("#error") == bad.json()["error"]["message"] and page.is_visible("#error")
    assert page.text_content("#output") == ""

    # an error event in the middle of a stream (the server's shape), after the text that came before it
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "tiny",
             "choices": [{"text": " fox", "index": 0, "finish_reason": None,
                          "logprobs": {"tokens": [" fox"], "token_logprobs": [-0.5], "top_logprobs": [{" fox": -0.5}],
                                       "text_offset": [0]}}]}
    error = {"error": {"message": "generation failed: <b>boom</b>", "type": "server_error"}}
    page.route("**/v1/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=f"data: {json.dumps(chunk)}\r\n\r\n: a comment\n\ndata: {json.dumps(error)}\n\n"))
    assert generate(page, "the quick", **{"max-tokens": 5}) == "error"
    assert page.text_content("#output") == " fox"
    assert page.text_content("#error") == "generation failed: <b>boom</b>"  # as text, not markup
    assert page.locator("#error b").count() == 0
    page.unroute("**/v1/completions")
    assert generate(page, "the quick", **{"max-tokens": 3, "temperature": 0}) == "done"
    assert page.is_hidden("#error")


def test_stop_aborts_the_stream(tiny, page):
    """Stop aborts the fetch mid-stream (each engine step takes 50 ms here, so the stream is still running): the
    text so far stays, the server sees the hang-up and frees the row, and it answers the next generation."""
    from gpt2_onnx import AsyncEngine

    _, engine, _, _ = tiny
    llm = AsyncEngine(engine, max_batch=4)
    step = llm.core.step

    def slow_step():
        time.sleep(0.05)
        return step()

    llm.core.step = slow_step  # this test's own engine only
    s = Server(create_app(llm, model_id="tiny"))
    try:
        open_page(page, s.url).wait_for_selector("#model option[value='tiny']", state="attached")
        page.fill("#prompt", "the quick")
        page.fill("#max-tokens", "100")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_selector("#output .tok >> nth=2", state="attached")
        assert page.is_disabled("#generate") and page.is_enabled("#stop-button")
        assert httpx.get(s.url + "/health").json()["active"] == 1
        page.click("#stop-button")
        page.wait_for_selector("#stats[data-state='stopped']", state="attached")
        shown = page.text_content("#output")
        assert shown and page.is_enabled("#generate") and page.is_disabled("#stop-button")
        assert "stopped" in page.text_content("#stats") and page.is_hidden("#error")
        deadline = time.time() + 3  # the 100 tokens would take 5 s
        while httpx.get(s.url + "/health").json()["active"]:
            assert time.time() < deadline, "the server did not free the aborted stream's row"
            time.sleep(0.05)
        assert generate(page, "the quick", **{"max-tokens": 4}) == "done"
        full = engine.generate("the quick", max_new_tokens=100).text  # what the API answers (test_server)
        assert full.startswith(shown) and len(shown) < len(full)
    finally:
        s.stop()


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(served, page):
    _, s = served
    open_page(page, s.url).wait_for_selector("#key-form", state="visible")
    assert page.is_disabled("#model") and page.is_hidden("#error")
    page.fill("#api-key", "wrong")
    page.click("#api-key-save")
    refused = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["message"]
    page.wait_for_selector("#error", state="visible")
    assert page.text_content("#error") == refused and page.is_visible("#key-form")

    page.fill("#api-key", "k")
    page.press("#api-key", "Enter")
    page.wait_for_selector("#model option[value='tiny']", state="attached")
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    assert generate(page, "to be", **{"max-tokens": 8, "temperature": 0}) == "done"
    want = completion(s.url, {"prompt": "to be", "max_tokens": 8, "temperature": 0}, key="k").json()
    assert page.text_content("#output") == want["choices"][0]["text"]

    page.reload()  # the key is remembered for the tab's session
    page.wait_for_selector("#model option[value='tiny']", state="attached")
    assert page.is_hidden("#key-form")


# ---- the README's screenshot ------------------------------------------------------------------------
def screenshot(out: Path) -> None:
    """docs/playground.png: the bundled model's page after a generation from "ROMEO:", a token hovered."""
    from playwright.sync_api import sync_playwright

    from gpt2_onnx import Engine

    s = Server(create_app(Engine.load(provider="cpu")))
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1280, "height": 760}, color_scheme="light")
            page.goto(s.url + "/")
            page.wait_for_selector("#model option", state="attached")
            assert generate(page, "ROMEO:", **{"max-tokens": 96, "temperature": 0.8, "seed": 3}) == "done"
            page.hover("#output .tok >> nth=6")
            page.screenshot(path=str(out))
            b.close()
    finally:
        s.stop()
    print(f"{out}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "playground.png"))
