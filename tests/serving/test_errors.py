"""Every refusal: its status and OpenAI-format error body, and the server keeps serving after it."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from server_process import (CONTEXT, KEY, MAX_BODY_MB, MAX_IMAGE_PIXELS, MAX_IMAGES, MAX_VIDEO_SECONDS,
                            MODEL, data_url, png_data_url, user)


class Hits(http.server.BaseHTTPRequestHandler):
    """A local web server the requests point at: it must never be asked for anything."""

    count = 0

    def do_GET(self):
        Hits.count += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def png_bytes(width, height):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def video_url(tmp_path_factory, name):
    from video_files import SPECS, make_video

    return data_url(make_video(tmp_path_factory.mktemp("video") / name, SPECS[name]).read_bytes(), "video/mp4")


def image_message(url: str) -> list[dict]:
    return user("What is this?", url)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": user("Hi"), "max_tokens": 2, **fields}


# id -> (request body: a dict sent as JSON, or raw bytes; status, code, param, a piece of the message)
CASES = {
    "malformed_json": (b'{"messages": [', 400, "invalid_json", None, "not valid JSON"),
    "not_an_object": (b"[1, 2]", 400, "invalid_json", None, "must be a JSON object, got a JSON list"),
    "body_too_large": (json.dumps(chat(messages=user("x" * (MAX_BODY_MB * 2**20)))).encode(), 413,
                       "request_too_large", None, f"larger than {MAX_BODY_MB * 2**20} bytes"),
    "no_messages": ({"model": MODEL}, 400, None, "messages", "messages: Field required"),
    "empty_messages": (chat(messages=[]), 400, None, "messages", "at least 1 item"),
    "function_role": (chat(messages=[{"role": "function", "content": "x"}]), 400, None, "messages[0].role",
                      "should be 'system', 'developer', 'user', 'assistant' or 'tool'"),
    "null_user_content": (chat(messages=[{"role": "user", "content": None}]), 400, None, "messages[0]",
                          "content is required (it may be null only in an assistant message with tool_calls)"),
    "audio_part": (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]), 400,
                   None, "messages[0].content[0]", "'input_audio' found using 'type' does not match"),
    "part_without_url": (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
                         None, "messages[0].content[0].image_url.url", "Field required"),
    "n_above_one": (chat(n=2), 400, None, "n", "only n=1 is supported"),
    "unknown_format": (chat(response_format={"type": "yaml"}), 400, None, "response_format",
                       "'yaml' found using 'type' does not match"),
    "uncompilable_schema": (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}}), 400, "invalid_schema",
        "response_format.json_schema.schema", "Can't compile the JSON schema"),
    "unsupported_schema_keyword": (chat(guided_json={"type": "array", "uniqueItems": True}), 400, "invalid_schema",
                                   "guided_json", 'Unimplemented keys: ["uniqueItems"]'),
    "schema_not_an_object": (chat(guided_json="[1, 2]"), 400, None, "guided_json", "must be a JSON object"),
    "bad_regex": (chat(guided_regex="a[b"), 400, None, "guided_regex", "unclosed character class"),
    "empty_choices": (chat(structured_outputs={"choice": []}), 400, None, "structured_outputs.choice",
                      "non-empty list"),
    "lark_grammar": (chat(structured_outputs={"grammar": "start: 'a'"}), 400, None, "structured_outputs",
                     "grammar is not supported"),
    "two_constraints": (chat(guided_regex="a+", guided_choice=["a"]), 400, None, "guided_choice",
                        "Give one constraint, not guided_regex and guided_choice"),
    "tool_choice_auto": (chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None, "tool_choice",
                         "tool_choice 'auto' (the default when tools are given) is not supported"),
    "unknown_tool": (chat(tools=[{"type": "function", "function": {"name": "f"}}],
                          tool_choice={"type": "function", "function": {"name": "g"}}), 400, None, "tool_choice",
                     "names the function 'g', which is not in tools (f)"),
    "tool_choice_without_tools": (chat(tool_choice="required"), 400, None, "tool_choice", "needs tools"),
    "stream_with_bad_schema": (chat(guided_json={"type": "wat"}, stream=True), 400, "invalid_schema", "guided_json",
                               "Can't compile the JSON schema"),
    "zero_max_tokens": (chat(max_tokens=0), 400, None, "max_tokens", "greater than or equal to 1"),
    "conflicting_max_tokens": (chat(max_tokens=2, max_completion_tokens=3), 400, None, None,
                               "not two different values"),
    "temperature_too_high": (chat(temperature=2.5), 400, None, "temperature", "less than or equal to 2"),
    "empty_stop": (chat(stop=["ok", ""]), 400, None, "stop[1]", "at least 1 character"),
    "string_max_tokens": (chat(max_tokens="2"), 400, None, "max_tokens", "valid integer"),
    "prompt_over_context": (chat(messages=user("word " * CONTEXT)), 400, "context_length_exceeded", "messages",
                            f"maximum context length is {CONTEXT} tokens"),
    "answer_over_context": (chat(messages=user("word " * (CONTEXT - 100)), max_tokens=200), 400,
                            "context_length_exceeded", "max_tokens", "in the completion"),
    "unknown_model": (chat(model="gpt-4o"), 404, "model_not_found", "model", "'gpt-4o' does not exist"),
    "too_many_images": (chat(messages=user("x", *[png_data_url(8, 8)] * (MAX_IMAGES + 1))), 400, "too_many_images",
                        "messages", f"at most {MAX_IMAGES} per request"),
    "image_too_many_pixels": (chat(messages=image_message(png_data_url(250, 200))), 400, "image_too_large",
                              "messages[0].content[0].image_url.url",
                              f"250x200 = 50000 pixels; this server takes at most {MAX_IMAGE_PIXELS}"),
    "not_an_image": (chat(messages=image_message(data_url(b"hello", "image/png"))), 400, "invalid_image",
                     "messages[0].content[0].image_url.url", "not an image"),
    "truncated_image": (chat(messages=image_message(data_url(png_bytes(64, 64)[:60], "image/png"))), 400,
                        "invalid_image", "messages[0].content[0].image_url.url", "image file is truncated"),
    "bad_base64": (chat(messages=image_message("data:image/png;base64,@@@@")), 400, None,
                   "messages[0].content[0].image_url.url", "not valid base64"),
    "data_url_not_base64": (chat(messages=image_message("data:image/png,hello")), 400, None,
                            "messages[0].content[0].image_url.url", "must be base64-encoded"),
    "server_file_path": (chat(messages=image_message("/etc/hostname")), 400, None,
                         "messages[0].content[0].image_url.url", "expected an http(s) URL or a data: URL"),
    "file_url": (chat(messages=image_message("file:///etc/hostname")), 400, None,
                 "messages[0].content[0].image_url.url", "file: URLs are not allowed"),
    "ftp_url": (chat(messages=image_message("ftp://127.0.0.1/x.png")), 400, None,
                "messages[0].content[0].image_url.url", "expected an http(s) URL"),
    "stream_with_bad_image": (chat(messages=image_message(data_url(b"x", "image/png")), stream=True), 400,
                              "invalid_image", "messages[0].content[0].image_url.url", "not an image"),
}


@pytest.mark.parametrize("case", CASES)
def test_refusal_then_normal_request(server, case):
    body, status, code, param, message = CASES[case]
    if isinstance(body, bytes):
        response = server.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = server.http.post("/v1/chat/completions", json=body)
    assert_error(response, status, code, param, message)
    assert_serving(server)


def assert_error(response: httpx.Response, status: int, code, param, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"


def assert_serving(server) -> None:
    response = server.chat(messages=user("Hi"), max_tokens=2)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("url", ["{local}/image.png", "http://localhost:{port}/image.png", "http://[::1]:{port}/x"])
def test_private_urls_are_refused_without_any_request(server, local_url, url):
    url = url.format(local=local_url, port=local_url.rsplit(":", 1)[1])
    response = server.chat(messages=image_message(url))
    assert_error(response, 400, "url_not_allowed", "messages[0].content[0].image_url.url",
                 "which is not a public address")
    assert "--allow-private-urls" in response.json()["error"]["message"]
    assert Hits.count == 0
    assert_serving(server)


def test_videos_over_the_length_limit_and_broken_videos(server, tmp_path_factory):
    long_video = video_url(tmp_path_factory, "ntsc_29.97fps_10s.mp4")
    where = "messages[0].content[0].video_url.url"
    for url, code, message in [
        (long_video, "video_too_long", f"lasts 10.0 s; this server takes at most {MAX_VIDEO_SECONDS:g} s"),
        (data_url(b"\x00\x00\x00\x18ftypmp42 not really", "video/mp4"), "invalid_video", "MP4"),
    ]:
        messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                 {"type": "text", "text": "What happens?"}]}]
        assert_error(server.chat(messages=messages), 400, code, where, message)
        assert_serving(server)


@pytest.mark.parametrize("headers, message", [
    ({}, "Missing API key"),
    ({"Authorization": "Bearer wrong"}, "Incorrect API key provided"),
    ({"Authorization": f"Basic {KEY}"}, "Missing API key"),
])  # fmt: skip
def test_api_key(server, headers, message):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
        response = httpx.request(method, server.url + path, headers=headers, json=chat())
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert message in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    assert_serving(server)


def test_unknown_routes_and_methods(server):
    response = server.http.get("/v1/completions/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = server.http.get("/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert_serving(server)


def test_unknown_fields_are_ignored(server):
    body = chat(response_format={"type": "text"}, user="someone", future_option=[1, 2], frequency_penalty=0,
                logprobs=False, n=None, stream=None, logit_bias={}, tool_choice="none", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi", "cache": 1}],
                                           "name": "me", "extra": True}])
    response = server.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    plain = server.chat(messages=user("Hi"), max_tokens=2)
    assert response.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_a_body_without_content_length_is_capped_too(server):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_MB * 2 + 1):
            yield b"x" * 2**19

    response = server.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "request_too_large", None, "larger than")
    assert_serving(server)
