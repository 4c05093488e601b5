"""Structured output through a real `smolvlm serve` process: response_format, vLLM's guided fields, tools, streaming,
and the official openai client and LangChain on top (the tiny random model writes garbage unless constrained)."""

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from server_process import KEY, MODEL, Server, user


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict mode makes it
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")
    qty: int = Field(ge=1, le=9)


class Receipt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shop: str = Field(max_length=16)
    paid: bool
    items: list[Item] = Field(min_length=1, max_length=3)
    kind: Literal["food", "tools", "books"]


SCHEMA = Receipt.model_json_schema()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "pattern": "^UTC[+-][0-9]$"}}, "required": ["zone"],
    "additionalProperties": False}}}  # fmt: skip


def body(**fields) -> dict:
    return {"messages": user("Read the receipt."), "max_tokens": 150, "temperature": 1.0, **fields}


def answer(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_json_schema_response_format_sampled_answers_validate(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA, "strict": True}}
    with ThreadPoolExecutor(8) as pool:  # decoded together in the server's batch
        choices = list(pool.map(lambda seed: answer(server.chat(**body(response_format=fmt, seed=seed))), range(8)))
    for choice in choices:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert len({c["message"]["content"] for c in choices}) > 4


def test_vllm_fields(server):
    for fields, check in [
        (dict(guided_regex=r"[a-z]{2,4}-[0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{2,4}-[0-9]{2}", t)),
        (dict(guided_choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
        (dict(structured_outputs={"choice": ["yes", "no"]}), lambda t: t in ("yes", "no")),
        (dict(structured_outputs={"regex": r"[0-9]{4}"}), lambda t: re.fullmatch(r"[0-9]{4}", t)),
        (dict(guided_json=json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        (dict(structured_outputs={"json": SCHEMA}), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ]:
        for seed in range(3):
            choice = answer(server.chat(**body(**fields, seed=seed)))
            assert choice["finish_reason"] == "stop" and check(choice["message"]["content"]), (fields, choice)


def test_streamed_constrained_answer_joins_to_a_valid_answer(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA}}
    stream = client.chat.completions.create(model=MODEL, messages=user("Read it."), max_tokens=150, temperature=1.0,
                                            seed=3, response_format=fmt, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 3  # streamed in pieces
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_cut_by_max_tokens_gives_length_and_a_prefix(server):
    choice = answer(server.chat(**body(guided_choice=["antidisestablishmentarianism"], max_tokens=2)))
    assert choice["finish_reason"] == "length"
    assert "antidisestablishmentarianism".startswith(choice["message"]["content"])


def test_a_tool_call_cut_by_max_tokens_comes_back_as_text(server):
    choice = answer(server.chat(**body(tools=[WEATHER], max_tokens=3,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})))
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('{"')


def test_unconstrained_request_beside_constrained_ones_keeps_its_answer(server):
    plain = body(messages=user("Tell me a story."), max_tokens=40, temperature=0)
    alone = answer(server.chat(**plain))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.chat, **body(guided_json=SCHEMA, seed=i)) for i in range(3)]
        mixed = answer(server.chat(**plain))
        constrained = [answer(f.result()) for f in futures]
    assert mixed["message"] == alone["message"]
    assert all(jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA) is None for c in constrained)


def test_openai_client_parse_returns_the_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model=MODEL, messages=user("Read the receipt."),
                                                   response_format=Receipt, max_tokens=150, temperature=1.0, seed=seed)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Receipt) and 1 <= len(parsed.items) <= 3


def test_named_tool_choice_gives_tool_calls(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=user("Weather in Oslo?"), tools=[WEATHER, TIME], temperature=1.0, seed=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_one_of_the_tools(client):
    names = set()
    for seed in range(6):
        completion = client.chat.completions.create(
            model=MODEL, messages=user("What now?"), tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=80)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        names.add(call.function.name)
    assert names == {"get_weather", "get_time"}


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("Weather?"), tools=[WEATHER], stream=True, seed=1, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60)
    chunks = [c for c in stream if c.choices]
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_tool_turns_in_the_history_are_accepted_and_rendered(server, vlm):
    history = [*user("Weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 C"}]  # fmt: skip
    choice = answer(server.chat(messages=history, max_tokens=8))
    assert choice["finish_reason"] in ("stop", "length")
    # the same turns, written out the documented way, give the same greedy answer through the Python API
    written = [*user("Weather in Paris?"),
               {"role": "assistant", "content": '[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]'},
               {"role": "tool", "content": "Sunny, 25 C"}]
    assert choice["message"]["content"] == vlm.generate(written, max_new_tokens=8)


def chat_model(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model=MODEL, temperature=1.0, max_tokens=150,
                      max_retries=0, seed=2)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, method):
    structured = chat_model(server).with_structured_output(Receipt, method=method)
    for question in ["Read the receipt.", "Again, please."]:
        assert isinstance(structured.invoke(question), Receipt)


@pytest.fixture(scope="module")
def closing_server(tiny_v2, tmp_path_factory):
    """A server over the tiny model with the tokens that close JSON strings and objects ('"', '}', '"}', '",'...)
    made likely. A JSON object without a schema has free keys and strings, which a random model (to which a closing
    quote is one token in 49k) never ends; this one closes them soon, like a trained model."""
    folder = tmp_path_factory.mktemp("closing")
    shutil.copytree(tiny_v2, folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    closing = [i for token, i in vocab.items() if set(token) & set('"}') and set(token) <= set('{}[]",:')]
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head][closing] *= 8
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    server = Server(folder, folder / "server.log")
    yield server
    server.stop()


def test_json_object_answers(closing_server):
    for seed in range(4):
        choice = answer(closing_server.chat(**body(response_format={"type": "json_object"}, seed=seed)))
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["message"]["content"]), dict)
    # LangChain's json_mode sends only response_format json_object, and returns the parsed object
    structured = chat_model(closing_server).with_structured_output(SCHEMA, method="json_mode")
    assert isinstance(structured.invoke("Read the receipt as JSON."), dict)
