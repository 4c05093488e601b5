"""Structured output over the wire: a request's constraint as a Grammar, tool calls in the prompt, and answers to
tools as OpenAI tool_calls.

A request has at most one constraint: response_format json_object / json_schema (OpenAI), guided_json / guided_regex /
guided_choice or structured_outputs {json, regex, choice, json_object} (vLLM), or tools with tool_choice "required"
or a named function. A tool answer is constrained, as vLLM does it, to the JSON of a call: for a named function, its
arguments (the function's `parameters` schema); for "required", a list of {"name", "arguments"} objects, one of the
given functions each (one call at most when parallel_tool_calls is false). tool_choice "auto" (OpenAI's default when
tools are given) is refused: it needs a model trained to decide whether to call a tool, and SmolVLM is not.

Prompts. The chat template knows no tools, so: the tools of a request that calls them are described in a system
turn put first ("You answer by calling a function..." with the functions as JSON); an assistant turn's tool_calls
are written after its text as the JSON list a "required" answer has; a tool turn is rendered with role "tool"
("Tool: ..." in the template).
"""

from __future__ import annotations

import json
import uuid

from ..errors import InputError
from ..generation.constraints import Grammar, grammars_for
from .protocol import APIError, ChatCompletionRequest, Message, NamedToolChoice

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def grammar(request: ChatCompletionRequest) -> Grammar | None:
    """The request's one constraint (APIError 400 naming the field if it is malformed, or if there are several)."""
    found = [(param, make()) for param, make in _constraints(request)]
    if len(found) > 1:
        raise APIError(f"Give one constraint, not {' and '.join(p for p, _ in found)}", 400, found[1][0])
    return found[0][1] if found else None


def check(vlm, grammar: Grammar | None, request: ChatCompletionRequest) -> None:
    """Compile the grammar (cached; the engine reuses it): a 400 naming the field for one that can't be compiled,
    before anything is queued."""
    if grammar is None:
        return
    try:
        grammars_for(vlm.processor.tokenizer, vlm.end_ids).compile(grammar)
    except InputError as e:
        param = next(param for param, _ in _constraints(request))
        code = "invalid_schema" if grammar.kind in ("json_schema", "json_object") else None
        raise APIError(f"{param}: {e}", 400, param, code) from None


def _constraints(request: ChatCompletionRequest) -> list:
    """(param, () -> Grammar) for each constraint the request gives."""
    out = []

    def add(param: str, value, make):
        if value is not None and value is not False:
            out.append((param, lambda: _checked(param, make, value)))

    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        add("response_format", True, lambda _: Grammar.json_object())
    elif fmt is not None and fmt.type == "json_schema":
        add("response_format.json_schema.schema", fmt.json_schema.schema_, Grammar.json_schema)
    add("guided_json", request.guided_json, Grammar.json_schema)
    add("guided_regex", request.guided_regex, Grammar.regex)
    add("guided_choice", request.guided_choice, Grammar.choice)
    so = request.structured_outputs
    if so is not None:
        add("structured_outputs.json", so.json_, Grammar.json_schema)
        add("structured_outputs.regex", so.regex, Grammar.regex)
        add("structured_outputs.choice", so.choice, Grammar.choice)
        add("structured_outputs.json_object", so.json_object or None, lambda _: Grammar.json_object())
    schema = _tools_schema(request)
    add("tools", schema, Grammar.json_schema)
    return out


def _checked(param: str, make, value) -> Grammar:
    try:
        return make(value)
    except InputError as e:
        raise APIError(f"{param}: {e}", 400, param) from None


def _tools_schema(request: ChatCompletionRequest) -> dict | None:
    """The JSON schema a tool answer follows (None: no tool call asked for)."""
    choice, tools = request.tool_choice, request.tools or []
    if not tools:
        if choice not in (None, "none"):
            raise APIError("tool_choice needs tools: give the functions in 'tools'", 400, "tool_choice")
        return None
    if choice is None or choice == "auto":
        raise APIError("tool_choice 'auto' (the default when tools are given) is not supported: SmolVLM models are "
                       "not trained to decide whether to call a tool. Send tool_choice 'required' or "
                       "{'type': 'function', 'function': {'name': ...}} to get a call, or 'none'.", 400, "tool_choice")
    if choice == "none":
        return None
    functions = {t.function.name: t.function for t in tools}
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in functions:
            raise APIError(f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                           f"({', '.join(functions)})", 400, "tool_choice")
        return _parameters(functions[choice.function.name])
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, "arguments": _parameters(f)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for name, f in functions.items()
    ]}}  # fmt: skip
    if request.parallel_tool_calls is False:
        calls["maxItems"] = 1
    return calls


def _parameters(function) -> dict:
    return function.parameters if function.parameters is not None else NO_ARGUMENTS


def calls_tools(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and request.tool_choice not in (None, "none", "auto")


def tool_calls(request: ChatCompletionRequest, text: str) -> list[dict] | None:
    """The answer `text` of a tool request as OpenAI tool_calls (None if it is not a complete call: cut by
    max_tokens or a stop string)."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(request.tool_choice, NamedToolChoice):
        calls = [(request.tool_choice.function.name, text)]
    else:
        calls = [(call["name"], json.dumps(call["arguments"], ensure_ascii=False)) for call in answer]
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": n, "arguments": a}}
            for n, a in calls]


def tools_turn(request: ChatCompletionRequest) -> list[dict]:
    """[the system turn describing the tools] for a request that calls them, else []."""
    if not calls_tools(request):
        return []
    functions = [{"name": t.function.name, "description": t.function.description,
                  "parameters": _parameters(t.function)} for t in request.tools]
    if isinstance(request.tool_choice, NamedToolChoice):
        task = f"Answer with the arguments of a call to {request.tool_choice.function.name}, as a JSON object."
    else:
        task = 'Answer with a JSON list of calls: [{"name": ..., "arguments": {...}}].'
    text = f"You answer by calling a function. {task} The functions:\n{json.dumps(functions, ensure_ascii=False)}"
    return [{"role": "system", "content": text}]


def history_content(message: Message, content):
    """A message's content for the chat template, with the tool calls of an assistant turn written after its text
    (the JSON a "required" answer has). `content`: the message's content, its media decoded."""
    if not message.tool_calls:
        return content
    calls = json.dumps([{"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                        for c in message.tool_calls], ensure_ascii=False)
    if content is None or content == "":
        return calls
    if isinstance(content, str):
        return f"{content}\n{calls}"
    return [*content, {"type": "text", "text": f"\n{calls}"}]


def _arguments(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # written as the string it is
