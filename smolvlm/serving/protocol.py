"""The OpenAI chat-completions wire format: request models (validated with pydantic) and response builders.

Requests follow https://platform.openai.com/docs/api-reference/chat/create. Fields we don't know are ignored, as
OpenAI ignores them; fields OpenAI knows but we can't honour (n > 1, logprobs, penalties) are refused with a
clear error rather than silently dropped. Extensions (as vLLM accepts them): top_k, min_p, repetition_penalty, and the
structured-output fields guided_json, guided_regex, guided_choice and structured_outputs (structured.py).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..generation.sampling import REPETITION_PENALTY_MAX, SEED_RANGE, TOP_K_MAX

MAX_STOP_STRINGS = 16  # stop checking costs (new text x stop strings) per token, on the engine thread
MAX_STOP_CHARS = 256


def _unicode(text: str) -> str:
    """JSON can escape lone UTF-16 surrogates ("\\ud800"), which are not text: no tokenizer or encoder takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Base):
    type: Literal["text"]
    text: Text


class URL(_Base):
    url: Text
    detail: Literal["auto", "low", "high"] | None = None  # images: "low" = one tile (detail.py)


class ImagePart(_Base):
    type: Literal["image_url"]
    image_url: URL


class VideoPart(_Base):
    type: Literal["video_url"]
    video_url: URL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class FunctionCall(_Base):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Base):
    id: Text
    type: Literal["function"]
    function: FunctionCall


class Message(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[Part], Field(min_length=1)] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: Text | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _content(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self


class TextFormat(_Base):
    type: Literal["text"]


class JSONObjectFormat(_Base):
    type: Literal["json_object"]


class JSONSchema(_Base):
    name: str | None = None
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # {} = any JSON value
    strict: bool | None = None  # the schema is always enforced


class JSONSchemaFormat(_Base):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(_Base):
    """vLLM's structured_outputs: one of json (a schema), regex, choice, json_object."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.grammar is not None:
            raise ValueError("grammar is not supported; use json, regex or choice")
        return self


class Function(_Base):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # the schema is always enforced


class Tool(_Base):
    type: Literal["function"]
    function: Function


class FunctionName(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Base):
    include_usage: bool = False


class ChatCompletionRequest(_Base):
    messages: Annotated[list[Message], Field(min_length=1)]
    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = 1
    logprobs: Literal[False] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: Annotated[dict, Field(max_length=0)] | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    top_k: Annotated[int, Field(ge=0, le=TOP_K_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=REPETITION_PENALTY_MAX)] | None = None

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_completion_tokens or max_tokens (its older name), not two different values")
        return self

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class APIError(Exception):
    """A request the server won't run, as the HTTP status and OpenAI error fields to send back."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def __reduce__(self):  # raised in the parser process (parsing.py): it crosses back pickled, every field kept
        return APIError, (self.message, self.status, self.param, self.code, self.type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The JSON body as a validated request (APIError 400 naming the problem otherwise)."""
    data = parse_json(body)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_error(e)
        raise APIError(message, 400, param) from None


def parse_json(body: bytes) -> dict:
    """The JSON object of a body (APIError 400 invalid_json otherwise)."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"The request body is not valid JSON: {e}", 400, None, "invalid_json") from None
    except RecursionError:
        raise APIError("The request body nests JSON arrays/objects too deeply to parse", 400, None,
                       "invalid_json") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits), NaN
        raise APIError(f"The request body holds an unusable number: {str(e).partition(': value')[0]}", 400, None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"The request body must be a JSON object, got a JSON {type(data).__name__}", 400, None,
                       "invalid_json")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


UNSUPPORTED = {  # field -> why a non-default value is refused
    "n": "only n=1 is supported",
    "logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "frequency_penalty": "frequency_penalty is not supported (use repetition_penalty)",
    "presence_penalty": "presence_penalty is not supported (use repetition_penalty)",
}


def validation_error(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most specific problem pydantic found; param is its path, e.g. messages[0].content."""
    errors = [(_param(err["loc"]), err) for err in e.errors(include_url=False)]
    # The deepest union branch; at equal depth, a branch of the right type (e.g. stop: a list of too many strings,
    # not "should be a string").
    param, err = max(errors, key=lambda pe: (pe[0].count(".") + pe[0].count("["), not pe[1]["type"].endswith("_type")))
    field = param.split(".")[0].split("[")[0]  # the top-level field
    if field in UNSUPPORTED:
        return f"{field}: {UNSUPPORTED[field]}", field
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_not_found" and ".content" in param:
        message = "a content part needs a 'type': 'text', 'image_url' or 'video_url'"
    elif err["type"] not in ("missing", "union_tag_invalid", "value_error"):
        message += f" (got {err['input']!r:.100})"
    return f"{param or 'request'}: {message}", param or None


def _param(loc: tuple) -> str:
    """A pydantic error location as a path. Union branches add labels ("str", "list[...]", and a tagged union's tag,
    which equals the part's field name here); they are left out."""
    param, last = "", None
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool") and part != last:
            param += f".{part}" if param else part
        last = part
    return param


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose keys/values came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               tool_calls: list[dict] | None = None, cached_tokens: int = 0) -> dict:
    """A chat.completion; with tool_calls, the message holds them instead of text (finish_reason "tool_calls")."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message, finish_reason = {"role": "assistant", "content": None, "tool_calls": tool_calls}, "tool_calls"
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }  # fmt: skip


def chunk(id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          with_usage: bool = False) -> dict:
    """One streamed chunk; with stream_options.include_usage every chunk carries "usage": null (OpenAI)."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(id: str, model: str, created: int, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the request's usage."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": None,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def model_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "smolvlm"}]}
