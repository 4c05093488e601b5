"""The OpenAI-compatible server, end to end: the official `openai` client against a real `smolvlm serve` process,
compared with the Python API on the same requests (greedy, so answers must be identical)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import CONTEXT, KEY, MAX_TOKENS, MODEL, data_url, exif_jpeg_data_url, png_data_url, user
from smolvlm.generation import prepare

CONVERSATIONS = {
    "text": user("Tell me about cats."),
    "system_and_string_content": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ],
    "two_turns_and_developer": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "image": user("What is in this image?", png_data_url(100, 70, seed=1)),
    "two_images": user("Compare them.", png_data_url(64, 64, seed=2), png_data_url(90, 120, seed=3)),
    # decoded by the server, then by the processor: alpha, palette transparency and EXIF rotation must survive as
    # when the processor decodes the bytes itself
    "alpha_and_palette": user("And these?", png_data_url(70, 50, seed=4, mode="RGBA"),
                              png_data_url(60, 40, seed=5, mode="P")),
    "exif_rotated_jpeg": user("Which way up?", exif_jpeg_data_url(80, 40, seed=6)),
}


def python_api_messages(messages: list[dict]) -> list[dict]:
    """The same conversation for smolvlm.load(...).generate: the API reads developer as the role name it is, the
    server maps it to system (OpenAI's meaning)."""
    return [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_answers_and_usage_match_the_python_api(server, client, vlm, name):
    messages = CONVERSATIONS[name]
    expected = vlm.complete(python_api_messages(messages), max_new_tokens=12)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert expected.text.strip()
    assert choice.finish_reason == expected.finish_reason
    assert response.model == MODEL and response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    prompt_tokens = len(prepare(vlm.processor, python_api_messages(messages)))
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids) == expected.completion_tokens
    assert response.usage.total_tokens == prompt_tokens + len(expected.token_ids)


@pytest.mark.parametrize("name", ["text", "image"])
def test_stream_matches_the_python_api(server, client, vlm, name):
    messages = CONVERSATIONS[name]
    expected = vlm.complete(messages, max_new_tokens=15)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=15,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert list(vlm.stream(messages, max_new_tokens=15)) == [c.choices[0].delta.content for c in chunks[1:-2]]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [expected.finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(prepare(vlm.processor, messages))
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_raw_event_stream_format(server):
    body = {"model": MODEL, "messages": user("Hi"), "max_tokens": 3, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines()]
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) >= 1


def test_stop_strings_and_seeded_sampling_match_the_python_api(client, vlm):
    messages = CONVERSATIONS["text"]
    full = vlm.generate(messages, max_new_tokens=20)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == vlm.generate(messages, max_new_tokens=20, stop=[stop])
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"

    sampled = dict(max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    first, second = (client.chat.completions.create(model=MODEL, messages=messages, **sampled) for _ in range(2))
    expected = vlm.generate(messages, max_new_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    assert first.choices[0].message.content == second.choices[0].message.content == expected
    assert expected != full


def test_concurrent_requests_share_batches_and_match_their_solo_answers(server, vlm):
    words = ["cats", "dogs", "the sea", "mountains", "bread", "trains", "music", "rain"]
    requests = [
        (user(f"Tell me about {words[i % 8]}" + " please" * (i % 5)), 2 + (i * 5) % 13)  # different lengths
        for i in range(32)
    ]
    solo = [vlm.complete(messages, max_new_tokens=n) for messages, n in requests]
    before = server.health()
    barrier = threading.Barrier(len(requests))
    client = server.openai()

    def ask(request):
        messages, n = request
        barrier.wait(timeout=30)
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(ask, requests))
    assert [a.choices[0].message.content for a in answers] == [r.text for r in solo]
    assert [a.usage.completion_tokens for a in answers] == [len(r.token_ids) for r in solo]
    after = server.wait_idle()
    assert after["finished"] - before["finished"] == 32
    assert after["tokens"] - before["tokens"] == sum(len(r.token_ids) for r in solo)
    # Requests were decoded side by side (all 16 slots at once), not one after another.
    assert after["shared_steps"] - before["shared_steps"] > 0
    assert after["max_decode_batch"] == 16
    assert after["steps"] - before["steps"] < (after["tokens"] - before["tokens"]) / 4
    assert after["running"] == after["waiting"] == 0


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL
    assert health["max_batch"] == 16 and health["context"] == CONTEXT


def test_video_matches_the_python_api(server, client, vlm, tmp_path):
    from video_files import SPECS, make_video

    data = make_video(tmp_path / "clock.mp4", SPECS["clock_25fps_4s.mp4"]).read_bytes()
    url = data_url(data, "video/mp4")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    expected = vlm.complete([{"role": "user", "content": [{"type": "video", "url": url},
                                                          {"type": "text", "text": "What happens?"}]}],
                            max_new_tokens=10)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens > 4 * 16  # four frames of 16 image tokens


def test_openai_client_raises_the_errors(server):
    with pytest.raises(openai.BadRequestError, match=f"context length is {CONTEXT} tokens") as e:
        server.openai().chat.completions.create(model=MODEL, messages=user("word " * CONTEXT), max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        server.openai(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist"):
        server.openai().chat.completions.create(model="gpt-4o", messages=user("Hi"))


def test_disconnected_stream_frees_its_slot(server):
    before = server.wait_idle()
    body = {"model": MODEL, "messages": user("Tell me a long story"), "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line)
            received = [next(events) for _ in range(3)]
    assert all(line.startswith("data: ") for line in received)
    after = server.wait_idle()
    assert after["running"] == after["waiting"] == 0
    assert after["finished"] == before["finished"]  # aborted, not run to the end
    assert after["tokens"] - before["tokens"] < MAX_TOKENS


def test_disconnected_non_streaming_client_frees_its_slot(server):
    before = server.wait_idle()
    body = {"model": MODEL, "messages": user("Tell me a long story"), "max_tokens": MAX_TOKENS}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # gives up long before the answer is done
        httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=httpx.Timeout(5, read=0.2))
    after = server.wait_idle()
    assert after["running"] == after["waiting"] == 0
    assert after["finished"] == before["finished"]
    assert after["tokens"] - before["tokens"] < MAX_TOKENS


def test_a_repeated_prompt_reports_cached_tokens_and_health_counts_them(server, client):
    messages = user("Tell me everything about this picture, in detail please.", png_data_url(120, 90, seed=11))
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].message.content == first.choices[0].message.content
    health = httpx.get(f"{server.url}/health").json()
    assert health["caches"]["prefix"]["reused_tokens"] >= second.usage.prompt_tokens_details.cached_tokens
    assert health["cached_tokens"] >= second.usage.prompt_tokens_details.cached_tokens
    metrics = {s.name: s.value for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
               for s in family.samples if s.labels.get("model") == MODEL}
    assert metrics["smolvlm_engine_cached_tokens_total"] == health["cached_tokens"]
    assert metrics["smolvlm_engine_image_cache_misses_total"] == health["caches"]["image_features"]["misses"] >= 1
    caches = health["caches"]
    assert metrics["smolvlm_engine_cache_bytes"] == sum(caches[k]["bytes"] for k in caches) > 0
    assert caches["processed_images"]["hits"] >= 1  # the resent picture was not tiled again
