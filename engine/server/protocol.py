"""Request and response models of the OpenAI-compatible API (pydantic; FastAPI publishes them as OpenAPI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from gpt2_onnx.tokenizer import check_text
from gpt2_onnx.errors import InvalidInput
from gpt2_onnx.types import GREEDY_BELOW, GenerationOptions, as_prompts

MAX_PROMPTS = 64
MAX_STOPS = 4


def _unsupported(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by this server")


class StreamOptions(BaseModel):
    """OpenAI's stream_options: include_usage adds a last chunk with empty choices and the usage."""

    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = False


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one constraint on the output."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_: dict | str | None = Field(None, alias="json", description="a JSON Schema (object or its JSON text)")
    json_object: bool | None = Field(None, description="any JSON object")
    regex: str | None = Field(None, description="the whole output matches this regex")
    choice: list[str] | None = Field(None, description="the output is one of these strings")
    grammar: str | None = Field(None, description="llguidance's Lark syntax, or GBNF")


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    schema_: dict | None = Field(None, alias="schema", description="the JSON Schema (omitted: any JSON object)")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object or json_schema."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# where a request can put each constraint: (the request's field, the GenerationOptions field)
CONSTRAINT_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                     "guided_grammar": "grammar"}


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model and the decoding options."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="the served model id (GET /v1/models); omitted = the one served")
    max_tokens: int | None = Field(16, ge=0, description="new tokens at most; prompt + max_tokens <= n_positions")
    temperature: float | None = Field(1.0, ge=0, le=2, description="0 (or < 1e-5) = greedy")
    top_p: float | None = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(0, ge=0, description="0 = off")
    repetition_penalty: float | None = Field(1.0, ge=0.01, le=100, description="1 = off")
    n: int | None = Field(1, ge=1, description="choices per prompt (with best_of, beams: up to the server's "
                                                 "--max-batch)")
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings (not returned)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="choice k of a request draws from numpy's default_rng([seed, k])")
    stop_token_ids: list[int] | None = Field(None, description="token ids that end a choice (vLLM's; the id's text "
                                                               "is not returned)")
    ignore_eos: bool | None = Field(False, description="keep generating past <|endoftext|> (vLLM's)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, description="OpenAI's: minus this for each token that "
                                                                         "was generated")
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, description="OpenAI's: minus this x the times a token "
                                                                          "was generated")
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100], added to its "
                                                                  "logit")
    min_p: float | None = Field(0.0, ge=0, le=1, description="drop tokens less likely than min_p x the top one")
    typical_p: float | None = Field(1.0, gt=0, le=1, description="locally typical sampling mass (1 = off)")
    min_tokens: int | None = Field(0, ge=0, description="eos and stop_token_ids are masked until this many new "
                                                        "tokens (vLLM's)")
    no_repeat_ngram_size: int | None = Field(0, ge=0, description="never repeat an n-gram of this size (0 = off)")
    bad_words: list[str] | None = Field(None, description="words never generated, with or without a leading space "
                                                          "(vLLM's)")
    use_beam_search: bool | None = Field(False, description="beam search (vLLM's): width best_of or n, the best n "
                                                            "returned; not with stream")
    length_penalty: float | None = Field(1.0, ge=-50, le=50, description="beam search: score = sum log p / "
                                                                          "length ** this")
    early_stopping: bool | Literal["never"] | None = Field(False, description='beam search: true, false or "never" '
                                                                             "(transformers' meanings)")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: one of json, json_object, "
                                                                           "regex, choice, grammar")
    guided_json: dict | str | None = Field(None, description="vLLM's older name of structured_outputs.json")
    guided_regex: str | None = Field(None, description="vLLM's older name of structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name of structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="vLLM's older name of structured_outputs.grammar")
    response_format: ResponseFormat | None = Field(None, description="OpenAI's: json_object or json_schema")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(v)}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def constraint(self) -> tuple[dict, dict[str, str]]:
        """The request's structured-output constraint as GenerationOptions keywords (at most one), and the
        API's name of that option (for errors)."""
        given: list[tuple[str, str, object]] = []  # (the request's name, the option, value)
        so = self.structured_outputs
        if so is not None:
            for api, opt, v in (("json", "json_schema", so.json_), ("json_object", "json_object", so.json_object),
                                ("regex", "regex", so.regex), ("choice", "choice", so.choice),
                                ("grammar", "grammar", so.grammar)):
                if v is not None and v is not False:
                    given.append((f"structured_outputs.{api}", opt, v))
        for api, opt in CONSTRAINT_FIELDS.items():
            if getattr(self, api) is not None:
                given.append((api, opt, getattr(self, api)))
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", "json_object", True))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise InvalidInput('response_format of type "json_schema" needs json_schema: {"name": ..., '
                                   '"schema": {...}}', "response_format")
            schema = rf.json_schema.schema_
            given.append(("response_format", "json_schema" if schema is not None else "json_object",
                          schema if schema is not None else True))
        if len(given) > 1:
            raise InvalidInput(f"give one constraint, got {given[0][0]} and {given[1][0]}", given[1][0])
        if so is not None and not given:
            raise InvalidInput("structured_outputs needs one of json, json_object, regex, choice, grammar",
                               "structured_outputs")
        return ({given[0][1]: given[0][2]}, {given[0][1]: given[0][0]}) if given else ({}, {})

    def option_names(self) -> dict[str, str]:
        """GenerationOptions' names as this request spells them (the constraint's field), for its errors."""
        try:
            return self.constraint()[1]
        except InvalidInput:
            return {}


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: OpenAI's completions request; `to_options()` gives the engine's options."""

    prompt: str | list[int] | list[str | list[int]] = Field(
        description="text, token ids, or a list of either (at most 64 prompts)")
    echo: bool | None = Field(False, description="return the prompt before the completion (with logprobs: the "
                                                 "prompt tokens' too, the first null); max_tokens 0 scores only")
    logprobs: int | None = Field(None, ge=0, le=20, description="log p of each token, and the N most likely")
    best_of: int | None = Field(None, ge=1, description="sample this many per prompt, return the n with the highest "
                                                        "cumulative log p (not with stream); with use_beam_search: "
                                                        "the beam width")
    suffix: str | None = Field(None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            check_text(text)
        return v

    @field_validator("suffix")
    @classmethod
    def _absent(cls, v, info):
        _unsupported(info.field_name, v, (None,))
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a list of ids is one prompt)."""
        return as_prompts(self.prompt)

    def to_options(self) -> GenerationOptions:
        """The engine's GenerationOptions for this request (None means the API default); InvalidInput if bad."""
        def pick(v, default):
            return default if v is None else v

        n, best_of, beams = pick(self.n, 1), self.best_of, bool(self.use_beam_search)
        temperature = pick(self.temperature, 1.0)
        if beams:
            if "temperature" in self.model_fields_set and temperature >= GREEDY_BELOW:
                raise InvalidInput("use_beam_search is deterministic: omit temperature or send 0", "temperature")
            temperature = 0.0
        options = GenerationOptions(
            max_new_tokens=pick(self.max_tokens, 16), min_new_tokens=pick(self.min_tokens, 0), temperature=temperature,
            top_p=pick(self.top_p, 1.0), top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
            typical_p=pick(self.typical_p, 1.0), repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=pick(self.presence_penalty, 0.0), frequency_penalty=pick(self.frequency_penalty, 0.0),
            logit_bias=self.logit_bias, bad_words=tuple(self.bad_words or ()),
            no_repeat_ngram_size=pick(self.no_repeat_ngram_size, 0), n=n,
            best_of=None if beams else best_of, num_beams=(best_of or n) if beams else 1,
            length_penalty=pick(self.length_penalty, 1.0), early_stopping=pick(self.early_stopping, False),
            stop=self.stop, seed=self.seed, logprobs=self.logprobs, stop_token_ids=self.stop_token_ids or (),
            ignore_eos=bool(self.ignore_eos), prompt_logprobs=self.logprobs if self.echo else None,
            **self.constraint()[0])
        if self.stream and (beams or options.grouped):
            name = "use_beam_search" if beams else "best_of"
            raise InvalidInput(f"{name} cannot stream: the answers are chosen when every candidate has ended; "
                               "send stream: false", name)
        return options


class ChatMessage(BaseModel):
    """One message of a conversation; fields beyond role and content reach the chat template as they are."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[dict] | None = Field(None, description="text, or OpenAI's content parts of type text")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: OpenAI's chat request. The messages are rendered by the model's chat
    template (or the server's --chat-template) into a prompt, answered as a completion of it."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="new tokens at most (default: what n_positions leaves)")
    max_completion_tokens: int | None = Field(None, ge=0, description="OpenAI's newer name of max_tokens")
    logprobs: bool | None = Field(False, description="log p of each chosen token")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: the N most likely tokens too")
    add_generation_prompt: bool | None = Field(True, description="end the prompt with the template's assistant "
                                                                 "turn opening")

    def to_completion(self, prompt: list[int], n_positions: int) -> "CompletionRequest":
        """The completion request of this chat after its rendered prompt (token ids)."""
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidInput("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("top_logprobs needs logprobs: true", "top_logprobs")
        most = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        shared = {k: getattr(self, k) for k in SamplingRequest.model_fields if k in self.model_fields_set}
        return CompletionRequest.model_validate({
            **shared, "prompt": prompt or "",  # an empty prompt starts from <|endoftext|>
            "max_tokens": most if most is not None else max(n_positions - len(prompt), 0),
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None})


FinishReason = Literal["stop", "length"]


class LogProbs(BaseModel):
    """OpenAI's completions logprobs: one entry per token (echoed prompt tokens first)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = Field(description="prompt p, sample i: p * n + i")
    logprobs: LogProbs | None = None
    finish_reason: FinishReason | None = Field(description="stop: a stop string or <|endoftext|>; length: max_tokens")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A completion, or (stream: true) one server-sent event of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogProb(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogProb] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    """What a chunk adds to a choice's message (the fields it does not set are left out)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape): a peft LoRA folder on the server's disk, served as lora_name."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's; ignored


class TokenizeRequest(BaseModel):
    """POST /tokenize (the shape lm-evaluation-harness's remote tokenizer and vLLM use)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(False, description="GPT-2 adds none either way")

    @field_validator("prompt")
    @classmethod
    def _text(cls, v):
        return check_text(v)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: the special tokens (lm-evaluation-harness finds eos by tokenizing eos_token)."""

    eos_token: str | None
    bos_token: str | None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2-onnx"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorBody


FINISH: dict[str, FinishReason] = {"eos": "stop", "stop": "stop", "length": "length"}  # the engine's, in OpenAI's words
