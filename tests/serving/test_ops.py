"""Server operations over a real `smolvlm serve`: image `detail` through the official openai client, /metrics
(parsed by prometheus_client's parser), CORS preflight, /tokenize and /detokenize, a LoRA adapter served by name
(--lora-modules) against the merged model, and the request log."""

import os
import subprocess
import sys

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from server_process import MODEL, ROOT, Server, png_data_url, user

import smolvlm.api
from smolvlm.training.export import copy_processor_files, save_released
from smolvlm.training.lora import add_lora, merge, save_adapter

ORIGIN = "http://app.example"
IMAGE = png_data_url(120, 90, seed=4)  # the tiny checkpoint splits it into 2x2 tiles + the global image


@pytest.fixture(scope="module")
def adapter(tiny_v2, tmp_path_factory):
    """(adapter folder, merged checkpoint folder) of a LoRA adapter with non-zero random weights on tiny_v2."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    peft_model = add_lora(smolvlm.Model.from_pretrained(tiny_v2), 4, 8.0, 0.0, ("text",), str(tiny_v2))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    copy_processor_files(tiny_v2, root / "adapter")
    save_adapter(peft_model, root / "adapter")
    save_released(merge(peft_model), root / "merged", tiny_v2)
    return root / "adapter", root / "merged"


@pytest.fixture(scope="module")
def server(tiny_v2, adapter, tmp_path_factory):
    server = Server(tiny_v2, tmp_path_factory.mktemp("ops") / "server.log", "--allowed-origins", ORIGIN,
                    "--lora-modules", f"mine={adapter[0]}", "--max-tokens", "40", "--log-level", "info")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vlm(tiny_v2):
    return smolvlm.api.load(tiny_v2, progress=False)


def image_turn(detail=None):
    image_url = {"url": IMAGE, **({"detail": detail} if detail else {})}
    return [{"role": "user", "content": [{"type": "image_url", "image_url": image_url},
                                         {"type": "text", "text": "What is it?"}]}]


def test_detail_low_is_one_tile_and_high_auto_the_checkpoints_tiling(server, vlm):
    client = server.openai()
    api_messages = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text",
                                                                                      "text": "What is it?"}]}]
    split = vlm.complete(api_messages, max_new_tokens=8)
    one_tile = vlm.complete(api_messages, max_new_tokens=8, do_image_splitting=False)
    assert one_tile.prompt_tokens < split.prompt_tokens
    for detail, expected in (("low", one_tile), ("high", split), ("auto", split), (None, split)):
        answer = client.chat.completions.create(model=MODEL, messages=image_turn(detail), max_tokens=8)
        assert answer.usage.prompt_tokens == expected.prompt_tokens, detail
        assert answer.choices[0].message.content == expected.text, detail
    mixed = [{"role": "user", "content": image_turn("low")[0]["content"][:1] + image_turn("high")[0]["content"]}]
    refused = server.chat(messages=mixed, max_tokens=2)
    assert refused.status_code == 400 and "share one detail" in refused.json()["error"]["message"]


def test_max_tokens_above_the_cap_is_clamped(server):
    answer = server.chat(messages=user("Tell me a long story"), max_tokens=10**6, stop=None).json()
    assert answer["usage"]["completion_tokens"] == 40 and answer["choices"][0]["finish_reason"] == "length"


def test_cors_preflight_and_answers(server):
    preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    answer = server.http.get("/v1/models", headers={"Origin": ORIGIN})
    assert answer.headers["access-control-allow-origin"] == ORIGIN


def test_tokenize_and_detokenize(server, vlm):
    text = server.http.post("/tokenize", json={"prompt": "Hello there"}).json()
    assert text["tokens"] == vlm.processor(text=["Hello there"])["input_ids"][0].tolist()
    assert text["count"] == len(text["tokens"]) and text["max_model_len"] > 0
    chat = server.http.post("/tokenize", json={"messages": image_turn()}).json()
    usage = server.chat(messages=image_turn(), max_tokens=1).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]  # the exact prompt a completion runs, image tiles included
    back = server.http.post("/detokenize", json={"tokens": text["tokens"]}).json()
    assert back["prompt"] == vlm.processor.decode(text["tokens"])
    bad = server.http.post("/detokenize", json={"tokens": ["x"]})
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]


def test_a_lora_adapter_served_by_name_answers_as_the_merged_model(server, adapter, vlm):
    merged = smolvlm.api.load(adapter[1], progress=False)
    from_adapter = smolvlm.api.load(adapter[0], progress=False)  # the base from adapter_config.json
    ids = merged.processor(text=["Hello there, how are you?"])["input_ids"]
    with torch.no_grad():
        expected = merged.model(input_ids=ids)
        torch.testing.assert_close(from_adapter.model(input_ids=ids), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(vlm.model(input_ids=ids), expected, atol=1e-3)  # the adapter matters
    client = server.openai()
    assert [m.id for m in client.models.list().data] == [MODEL, "mine"]
    assert client.models.retrieve("mine").id == "mine"
    for name, model in ((MODEL, vlm), ("mine", merged)):
        answer = client.chat.completions.create(model=name, messages=image_turn(), max_tokens=12)
        assert answer.choices[0].message.content == model.generate(image_turn(), max_new_tokens=12), name
    assert server.chat(messages=user("Hi"), model="nobody").status_code == 404


def test_metrics_scrape_counts_requests_tokens_and_latencies(server):
    before = scrape(server)
    answers = [server.chat(messages=user(f"Hi {i}"), max_tokens=5).json() for i in range(3)]
    server.chat(messages=user("Hi"), temperature=5)  # a 400
    after = scrape(server)
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    prompts = sum(a["usage"]["prompt_tokens"] for a in answers)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta[("smolvlm_generation_tokens_total", (("model", MODEL),))] == generated
    assert delta[("smolvlm_prompt_tokens_total", (("model", MODEL),))] == prompts
    assert delta[("smolvlm_time_to_first_token_seconds_count", (("model", MODEL),))] == 3
    assert delta[("smolvlm_inter_token_latency_seconds_count", (("model", MODEL),))] == generated - 3
    route = ("route", "/v1/chat/completions")
    assert delta[("smolvlm_http_requests_total", (route, ("status", "200")))] == 3
    assert delta[("smolvlm_http_requests_total", (route, ("status", "400")))] == 1
    assert after[("smolvlm_engine_running", (("model", MODEL),))] == 0
    assert ("smolvlm_engine_waiting", (("model", "mine"),)) in after  # every served model's engine
    log = server.log.read_text()
    assert "POST /v1/chat/completions 400" in log and "temperature" in log  # the 4xx reason
    assert "cached) + 5 completion tokens, finish length, first token" in log


def scrape(server) -> dict:
    text = server.http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_generate_loads_an_adapter_folder_or_base_plus_adapter(tiny_v2, adapter):
    expected = smolvlm.api.load(adapter[1], progress=False).generate("Hi", max_new_tokens=8) + "\n"
    for model in (["-m", str(adapter[0])], ["-m", str(tiny_v2), "--adapter", str(adapter[0])]):
        out = subprocess.run([sys.executable, "-m", "smolvlm.cli", "generate", *model, "--max-new-tokens", "8", "Hi"],
                             capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0 and out.stdout == expected, out.stderr
    with pytest.raises(smolvlm.CheckpointError, match="is a LoRA adapter folder"):
        smolvlm.Model.from_pretrained(adapter[0])
