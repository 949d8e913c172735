// The gpt2-onnx playground: GET /v1/models fills the model picker; Generate streams POST /v1/completions
// (server-sent events read from fetch's ReadableStream) into #output, one span per chunk whose title shows
// each token's log-probability and the top alternatives. Model text only ever goes in through textContent.
"use strict";

const KEY_STORE = "gpt2-onnx-api-key";
const TOP = 5; // alternatives asked per token (logprobs: 5)
const INTS = new Set(["max_tokens", "top_k", "seed"]);

const $ = (id) => document.getElementById(id);
const el = {
  model: $("model"), keyForm: $("key-form"), key: $("api-key"), form: $("generate-form"), prompt: $("prompt"),
  options: $("options"), stop: $("stop"), generate: $("generate"), stopButton: $("stop-button"),
  shownPrompt: $("shown-prompt"), output: $("output"), transcript: $("transcript"), stats: $("stats"),
  error: $("error"), tokenInfo: $("token-info"),
};

let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let controller = null; // the AbortController of the running generation

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function showError(message) {
  el.error.textContent = message;
  el.error.hidden = !message;
}

async function errorMessage(response) {
  // the server's OpenAI-shaped {"error": {"message", "type", "param"}}, else whatever the body says
  const text = await response.text().catch(() => "");
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) return e.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}${text ? ": " + text.slice(0, 300) : ""}`;
}

function askForKey(message) {
  el.keyForm.hidden = false;
  if (apiKey) showError(message); // a key was sent and refused
  el.key.focus();
}

async function loadModels() {
  let r;
  try {
    r = await fetch("/v1/models", { headers: headers(false) });
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
    return;
  }
  if (r.status === 401) {
    askForKey(await errorMessage(r));
    return;
  }
  if (!r.ok) {
    showError(await errorMessage(r));
    return;
  }
  const ids = (await r.json()).data.map((m) => m.id);
  const keep = el.model.value;
  el.model.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(keep)) el.model.value = keep;
  el.model.disabled = false;
  el.keyForm.hidden = true;
  showError("");
}

el.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = el.key.value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  loadModels();
});

// ---- the request --------------------------------------------------------------------------------
function unescapeStop(s) {
  return s.replace(/\\(.)/g, (_, c) => ({ n: "\n", t: "\t", r: "\r" })[c] ?? c);
}

function request() {
  const body = { prompt: el.prompt.value, stream: true, logprobs: TOP, stream_options: { include_usage: true } };
  if (el.model.value) body.model = el.model.value;
  for (const input of el.options.querySelectorAll("input")) {
    if (input.value.trim() === "") continue; // the server's default
    body[input.name] = INTS.has(input.name) ? parseInt(input.value, 10) : Number(input.value);
  }
  const stops = el.stop.value.split("\n").filter((s) => s !== "").map(unescapeStop);
  if (stops.length) body.stop = stops;
  return body;
}

// ---- server-sent events ---------------------------------------------------------------------------
async function readEvents(stream, onData) {
  // calls onData(parsed JSON) for each `data:` event; returns at `data: [DONE]`
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the stream ended before [DONE]");
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
      if (data === "") continue; // a comment or keep-alive
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return;
      }
      onData(JSON.parse(data));
    }
  }
}

// ---- rendering ------------------------------------------------------------------------------------
const fmt = (lp) => (Number.isFinite(lp) ? lp.toFixed(3) : String(lp));
const show = (token) => JSON.stringify(token); // quotes make spaces and newlines visible

function describe(entries) {
  return entries.map(({ token, logprob, top }) => {
    const lines = [`${show(token)}  log p ${fmt(logprob)}  (p ${(100 * Math.exp(logprob)).toFixed(1)}%)`];
    const alternatives = Object.entries(top || {}).sort((a, b) => b[1] - a[1]);
    if (alternatives.length) {
      lines.push("alternatives:");
      for (const [t, lp] of alternatives) lines.push(`${t === token ? "▸" : " "} ${show(t)}  ${fmt(lp)}`);
    }
    return lines.join("\n");
  }).join("\n\n");
}

class Run {
  constructor() {
    this.t0 = performance.now();
    this.tFirst = null;
    this.tokens = 0;
    this.pending = []; // tokens whose text has not come yet (a character split across tokens)
    this.lastSpan = null;
    this.finish = null;
    this.usage = null;
  }

  onData(event) {
    if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
    if (event.usage) this.usage = event.usage;
    for (const choice of event.choices || []) {
      if (choice.index !== 0) continue; // the page asks for one choice
      this.append(choice.text || "", choice.logprobs);
      if (choice.finish_reason) this.finish = choice.finish_reason;
    }
    this.stats("running");
  }

  append(text, logprobs) {
    if (logprobs) {
      logprobs.tokens.forEach((token, i) => this.pending.push(
        { token, logprob: logprobs.token_logprobs[i], top: logprobs.top_logprobs ? logprobs.top_logprobs[i] : null }));
      this.tokens += logprobs.tokens.length;
    } else if (text) {
      this.tokens += 1;
    }
    if (this.tokens && this.tFirst === null) this.tFirst = performance.now();
    if (!text) return;
    const follow = el.transcript.scrollTop + el.transcript.clientHeight >= el.transcript.scrollHeight - 4;
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = text;
    if (this.pending.length) {
      span.title = describe(this.pending);
      const p = Math.exp(this.pending[this.pending.length - 1].logprob);
      span.style.setProperty("--p", Number.isFinite(p) ? p.toFixed(3) : "1");
      this.pending = [];
    }
    el.output.append(span);
    this.lastSpan = span;
    if (follow) el.transcript.scrollTop = el.transcript.scrollHeight;
  }

  end(state) {
    if (this.pending.length && this.lastSpan) { // tokens of a stop string, whose text was not sent
      this.lastSpan.title += (this.lastSpan.title ? "\n\n" : "") + describe(this.pending);
      this.pending = [];
    }
    if (this.usage) this.tokens = this.usage.completion_tokens;
    this.stats(state);
  }

  stats(state) {
    const now = performance.now();
    const parts = [`${this.tokens} token${this.tokens === 1 ? "" : "s"}`];
    if (this.tFirst !== null && this.tokens > 1 && now > this.tFirst) {
      parts.push(`${((this.tokens - 1) / ((now - this.tFirst) / 1000)).toFixed(1)} tokens/s`);
    }
    if (this.tFirst !== null) parts.push(`first token ${Math.round(this.tFirst - this.t0)} ms`);
    parts.push(`${((now - this.t0) / 1000).toFixed(2)} s`);
    if (state === "done") {
      if (this.finish) parts.push(`finish: ${this.finish}`);
      if (this.usage) parts.push(`prompt ${this.usage.prompt_tokens} tokens`);
    } else if (state === "stopped") {
      parts.push("stopped");
    }
    el.stats.textContent = parts.join(" · ");
    el.stats.dataset.state = state;
    el.stats.dataset.tokens = String(this.tokens);
  }
}

async function generate() {
  if (controller) return;
  const body = request();
  showError("");
  el.output.replaceChildren();
  el.shownPrompt.textContent = body.prompt;
  el.tokenInfo.textContent = "Hover a token for its log-probability and the alternatives.";
  controller = new AbortController();
  el.generate.disabled = true;
  el.stopButton.disabled = false;
  el.transcript.setAttribute("aria-busy", "true");
  const run = new Run();
  run.stats("running");
  let state = "done";
  try {
    const r = await fetch("/v1/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const message = await errorMessage(r);
      if (r.status === 401) askForKey(message);
      throw new Error(message);
    }
    await readEvents(r.body, (event) => run.onData(event));
  } catch (e) {
    if (e.name === "AbortError") {
      state = "stopped";
    } else {
      state = "error";
      showError(e.message);
    }
  } finally {
    run.end(state);
    controller = null;
    el.transcript.setAttribute("aria-busy", "false");
    el.generate.disabled = false;
    el.stopButton.disabled = true;
  }
}

el.form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
el.stopButton.addEventListener("click", () => controller && controller.abort());
el.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) controller.abort();
});
el.output.addEventListener("mouseover", (event) => {
  const span = event.target.closest(".tok");
  if (span && span.title) el.tokenInfo.textContent = span.title;
});

loadModels();
