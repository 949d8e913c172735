"""The chat service: an OpenAI chat request -> the model's chat template -> a completion of the rendered
prompt (server/completions.py: the same engine calls, errors and metrics) -> the chat shapes, for the
response and for each server-sent event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator

from gpt2_onnx.server import completions
from gpt2_onnx.server.completions import Completion, Served
from gpt2_onnx.server.errors import ApiError
from gpt2_onnx.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChatDelta, ChatLogProb, ChatLogProbs,
                                       ChatMessageOut, ChatTokenLogProb, CompletionResponse, LogProbs)


async def start(served: Served, body: ChatCompletionRequest) -> Completion:
    """Render the messages (the server's --chat-template, else the model's), then start their completion."""
    engine = served.llm.engine

    def prompt() -> list[int]:
        text = engine.chat_prompt([m.model_dump(exclude_none=True) for m in body.messages],
                                  chat_template=served.chat_template,
                                  add_generation_prompt=body.add_generation_prompt is not False)
        return engine.tokenizer.encode(text)

    try:
        served.prefix(body.model)
        ids = await asyncio.get_running_loop().run_in_executor(None, prompt)
        completion = body.to_completion(ids, engine.config.n_positions)
    except Exception as e:
        raise ApiError.of(e, body.option_names()) from e
    return await completions.start(served, completion)


def _logprobs(lp: LogProbs | dict | None) -> ChatLogProbs | None:
    """Completions' logprobs (tokens, token_logprobs, top_logprobs) in the chat shape."""
    if lp is None:
        return None
    lp = lp if isinstance(lp, dict) else lp.model_dump()
    tops = lp["top_logprobs"] or [None] * len(lp["tokens"])
    return ChatLogProbs(content=[
        ChatTokenLogProb(token=t, logprob=v, bytes=list(t.encode()), top_logprobs=[
            ChatLogProb(token=a, logprob=b, bytes=list(a.encode())) for a, b in (top or {}).items()])
        for t, v, top in zip(lp["tokens"], lp["token_logprobs"], tops)])


def response(r: CompletionResponse) -> ChatCompletionResponse:
    """A completion of the rendered prompt as the chat completion."""
    return ChatCompletionResponse(
        id="chat" + r.id, created=r.created, model=r.model, usage=r.usage,
        choices=[ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=_logprobs(c.logprobs),
                            finish_reason=c.finish_reason) for c in r.choices])


async def events(source: AsyncGenerator[str, None]) -> AsyncIterator[str]:
    """A completion's server-sent events as chat chunks: each choice opens with the assistant role."""
    opened: set[int] = set()
    try:
        async for event in _chat_chunks(source, opened):
            yield event
    finally:  # the completion's events end too (counted, its rows freed), also when the reader left early
        await source.aclose()


async def _chat_chunks(source: AsyncIterator[str], opened: set[int]) -> AsyncIterator[str]:
    async for event in source:
        data = event.removeprefix("data: ").strip()
        chunk = None if data == "[DONE]" else json.loads(data)
        if chunk is None or "error" in chunk:  # the end, or an error event: as the completion says it
            yield event
            continue

        def out(choices: list[ChatChunkChoice], usage=None) -> str:
            return "data: " + ChatCompletionChunk(id="chat" + chunk["id"], created=chunk["created"],
                                                  model=chunk["model"], choices=choices,
                                                  usage=usage).model_dump_json() + "\n\n"

        for c in chunk["choices"]:
            if c["index"] not in opened:
                opened.add(c["index"])
                yield out([ChatChunkChoice(index=c["index"], delta=ChatDelta(role="assistant", content=""))])
            yield out([ChatChunkChoice(index=c["index"], delta=ChatDelta(content=c["text"]),
                                       logprobs=_logprobs(c["logprobs"]), finish_reason=c["finish_reason"])])
        if not chunk["choices"]:  # stream_options.include_usage: the usage, no choices
            yield out([], chunk.get("usage"))


async def complete_chat(served: Served, body: ChatCompletionRequest) -> tuple[int, dict]:
    """A non-streaming chat completion as (HTTP status, JSON body): what `gpt2-onnx batch` writes per row."""
    try:
        c = await start(served, body)
        return 200, response(await c.response()).model_dump(mode="json")
    except ApiError as e:
        return e.status, e.body()
