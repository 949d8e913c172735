"""The completion service: an OpenAI completion request -> AsyncEngine calls -> choices, SSE events,
logprobs and usage. The HTTP routes, `gpt2-onnx batch` and the Ray replicas all answer with it, so
their answers are the same. Needs pydantic, not fastapi."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gpt2_onnx.async_engine import AsyncEngine, Request
from gpt2_onnx.errors import Cancelled, InvalidInput
from gpt2_onnx.sequence import Sequence
from gpt2_onnx.server.errors import ApiError
from gpt2_onnx.server.protocol import FINISH, CompletionChoice, CompletionRequest, CompletionResponse, LogProbs, Usage
from gpt2_onnx.types import Lora, Prefix, Step


@dataclass
class Served:
    """What a server answers with: an AsyncEngine, the served model id, and prefix and LoRA adapters served as
    more model ids (chosen per request by "model", as vLLM selects adapters)."""

    llm: AsyncEngine
    model_id: str
    prefixes: dict[str, Prefix] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    chat_template: str | None = None  # for /v1/chat/completions; None: the model's own
    loras: dict[str, Lora] = field(default_factory=dict)  # served name -> a LoRA adapter of llm.engine
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload route at a time

    def __post_init__(self) -> None:
        if self.model_id in self.prefixes:
            raise ValueError(f"prefix name {self.model_id!r} is the served model's own id; choose another name")
        taken = sorted(({self.model_id} | set(self.prefixes)) & set(self.loras))
        if taken:
            raise ValueError(f"LoRA adapter name {taken[0]!r} is already served (the model's id or a prefix "
                             "adapter's); choose another name")

    @property
    def models(self) -> list[str]:
        return [self.model_id, *self.prefixes, *self.loras]

    def adapter(self, model: str | None) -> Lora | None:
        """The LoRA adapter of a request's model (None for the others)."""
        return self.loras.get(model)

    def prefix(self, model: str | None) -> Prefix | None:
        """The prefix of a request's model, or None for the served model; ApiError 404 for another."""
        if model not in (None, *self.models):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.models}", "model",
                           "model_not_found")
        return self.prefixes.get(model)


class Completion:
    """One accepted completion request: its engine Request, rendered as a response or as SSE events."""

    def __init__(self, served: Served, body: CompletionRequest, request: Request, echoed: list[str]):
        self.served, self.body, self.request, self.echoed = served, body, request, echoed
        self.options = request.sequences[0].options
        self.model = body.model if body.model in (*served.prefixes, *served.loras) else served.model_id  # an adapter's
        self.id, self.t0 = f"cmpl-{secrets.token_hex(12)}", time.perf_counter()
        self.status = "499"  # until it ends otherwise: the client went away
        self.counted = False  # by the server's metrics
        self.chat = False  # answered in the chat shapes (/v1/chat/completions)

    @property
    def sequences(self) -> list[Sequence]:
        return self.request.sequences

    def usage(self) -> Usage:
        prompt = sum(len(s.context) - s.virtual for s in self.sequences)  # real tokens: a prefix adapter's are not
        done = sum(len(s.tokens) for s in self.sequences)
        return Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)

    def _response(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=int(time.time()), model=self.model, choices=choices,
                                  usage=usage)

    def _head(self, s: Sequence) -> str:  # the text before the completion: the prompt with echo
        return self.echoed[s.row // self.options.rows] if self.body.echo else ""

    def _logprobs(self, s: Sequence, steps: list[Step], at: int, with_prompt: bool) -> LogProbs | None:
        """OpenAI's logprobs of the prompt (with_prompt: echo's first part) and of these steps' tokens, text
        offsets counted from `at` characters into the choice's text."""
        if self.options.logprobs is None:
            return None
        tok, toks, lps, tops, offsets = self.served.llm.engine.tokenizer, [], [], [], []
        if with_prompt:
            real = s.context[s.virtual:]
            toks += real
            lps += s.prompt_logprobs[s.virtual:] or [None] * len(real)
            tops += s.prompt_top_logprobs[s.virtual:] or [None] * len(real)
            offsets += tok.offsets(real)
            at = len(self._head(s))
        for st in steps:
            if st.token_id >= 0:
                toks.append(st.token_id)
                lps.append(st.logprob)
                tops.append(st.top_logprobs)
                offsets.append(at)
            at += len(st.text)
        top = None if not self.options.logprobs else [
            None if t is None else {tok.token_text(i): lp for i, lp in t} for t in tops]
        return LogProbs(tokens=[tok.token_text(t) for t in toks], token_logprobs=lps, top_logprobs=top,
                        text_offset=offsets)

    @staticmethod
    def _failed(step: Step) -> ApiError | None:
        """A row's failure (500), or its cancellation by the engine itself, which is shutting down (503)."""
        if step.finish_reason == "cancelled":  # by the engine: shutting down, or a reader too slow (ReadTimeout)
            return ApiError.of(step.error or Cancelled(f"choice {step.row} was cancelled"))
        if isinstance(step.error, InvalidInput):  # the request's options made the row fail (e.g. every token masked)
            return ApiError.of(step.error)
        if step.error is not None:
            return ApiError(500, f"generation failed: {type(step.error).__name__}: {step.error}", kind="server_error")
        return None

    def _fail(self, e: Exception) -> ApiError:
        """End the request with an error: a row's (ApiError) or one of this code (500, never a text/plain one)."""
        e = e if isinstance(e, ApiError) else ApiError(500, f"internal error: {type(e).__name__}: {str(e)[:300]}",
                                                       kind="server_error")
        self.status = str(e.status)
        self.request.cancel()
        return e

    async def response(self) -> CompletionResponse:
        """The whole completion (ApiError if a row failed)."""
        try:
            try:
                await self.request  # woken once, when every row has ended
            except Exception:  # a row that failed (the others were cancelled then), or the cancellation
                ended = sorted(self.sequences, key=lambda s: s.finish_reason != "error")
                raise next(e for e in map(self._failed, map(_last, ended)) if e is not None) from None
            out = self._response([CompletionChoice(
                text=self._head(s) + s.text, index=s.row, logprobs=self._logprobs(s, _steps(s), 0, bool(self.body.echo)),
                finish_reason=FINISH[s.finish_reason]) for s in self.sequences], self.usage())
        except Exception as e:
            raise self._fail(e) from e
        self.status = "200"
        return out

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: one chunk per Step; with stream_options.include_usage a last chunk with empty
        choices and the usage; then [DONE]. A failure ends the stream with an error event."""
        sent = [0] * len(self.sequences)  # characters of each choice's text sent so far
        started: set[int] = set()
        steps = self.request.__aiter__()
        while True:
            try:
                step = await steps.__anext__()
                e = self._failed(step)
                if e is not None:
                    raise e
                s, text = self.sequences[step.row], step.text
                first = bool(self.body.echo) and step.row not in started  # the prompt first, with its logprobs
                started.add(step.row)
                if first:
                    text = self._head(s) + text
                choice = CompletionChoice(text=text, index=step.row, finish_reason=FINISH.get(step.finish_reason),
                                          logprobs=self._logprobs(s, [step], sent[step.row], first))
                sent[step.row] += len(text)
                event = f"data: {self._response([choice]).model_dump_json()}\n\n"
            except StopAsyncIteration:
                break
            except Exception as e:
                e = self._fail(e)
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
                return
            yield event
        if self.body.include_usage:
            yield f"data: {self._response([], self.usage()).model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
        self.status = "200"


def _steps(s: Sequence) -> list[Step]:
    """A finished sequence's tokens as Steps (what a streaming reader got), for rendering its logprobs."""
    on = s.options.logprobs is not None
    return [Step(s.row, i, t, text, None, 0.0, s.logprobs[i] if on else None, s.top_logprobs[i] if on else None)
            for i, (t, text) in enumerate(zip(s.tokens, s.text_parts))]


def _last(s: Sequence) -> Step:
    """A finished sequence's ending, as its last Step said it."""
    return Step(s.row, len(s.tokens) - 1, -1, "", s.finish_reason, 0.0, error=s.error)


async def start(served: Served, body: CompletionRequest) -> Completion:
    """Validate a completion request and submit it to the engine (encoding in a worker thread: a 1 MiB
    prompt takes a while); ApiError if it is refused."""
    prefix, adapter = served.prefix(body.model), served.adapter(body.model)
    try:
        options = body.to_options()
        prompts = body.prompts()
        request = await asyncio.get_running_loop().run_in_executor(
            None, lambda: served.llm.submit(prompts, options, prefix=prefix, adapter=adapter))
    except Exception as e:
        raise ApiError.of(e, body.option_names()) from e
    tok = served.llm.engine.tokenizer
    echoed = ([p if isinstance(p, str) else tok.decode(list(p)) for p in prompts] if body.echo else [])
    return Completion(served, body, request, echoed)


async def complete(served: Served, body: CompletionRequest) -> tuple[int, dict]:
    """A non-streaming completion as (HTTP status, JSON body): what `gpt2-onnx batch` writes per row."""
    try:
        c = await start(served, body)
        return 200, (await c.response()).model_dump(mode="json")
    except ApiError as e:  # response() turns any other failure into one (a 500)
        return e.status, e.body()
