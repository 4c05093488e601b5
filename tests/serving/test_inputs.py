"""Sampling parameters from a request: defaults, the max_tokens limit and the context."""

import base64
import re

import pytest
import torch

from smolvlm.serving.inputs import sampling_params
from smolvlm.serving.limits import Limits
from smolvlm.serving.protocol import APIError, ChatCompletionRequest

LIMITS = Limits(max_tokens=100)


def params(prompt_tokens=10, context=200, **fields):
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **fields})
    return sampling_params(request, prompt_tokens, context, LIMITS)


def test_defaults_are_greedy_and_fill_the_room_up_to_the_limit():
    p = params()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.stop) == (0, 1, 0, 0, 1, None, ())
    assert p.max_new_tokens == 100  # the server's --max-tokens
    assert params(prompt_tokens=150).max_new_tokens == 50  # what is left of the context


def test_request_fields_reach_the_sampler():
    p = params(max_completion_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.2,
               seed=3, stop="END")
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.stop) == (
        7, 0.5, 0.9, 40, 0.05, 1.2, 3, ("END",))
    assert params(max_tokens=9, stop=["a", "b"]).stop == ("a", "b")


def test_max_tokens_above_the_servers_cap_is_clamped_to_it_as_vllm_does():
    assert params(max_tokens=101, prompt_tokens=10).max_new_tokens == 100
    assert params(max_completion_tokens=10**6, prompt_tokens=10).max_new_tokens == 100


@pytest.mark.parametrize("fields, prompt_tokens, param, code, message", [
    ({}, 200, "messages", "context_length_exceeded", "maximum context length is 200 tokens, but the messages hold 200"),
    ({"max_tokens": 100}, 150, "max_tokens", "context_length_exceeded", "you requested 250 tokens (150 in the messages"),
])  # fmt: skip
def test_refusals(fields, prompt_tokens, param, code, message):
    with pytest.raises(APIError, match=re.escape(message)) as e:
        params(prompt_tokens=prompt_tokens, **fields)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)


def media_request(*urls: tuple[str, str]) -> ChatCompletionRequest:
    parts = [{"type": kind, kind: {"url": url}} for kind, url in urls]
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": parts}]})


@pytest.mark.parametrize("budget, refused", [(20_000, None), (19_999, "messages[0].content[1].image_url.url"),
                                              (9_999, "messages[0].content[0].image_url.url")])
def test_the_decoded_pixels_of_a_request_are_budgeted_from_the_headers(vlm, budget, refused):
    from server_process import png_data_url

    from smolvlm.serving.inputs import build_prompt

    request = media_request(("image_url", png_data_url(100, 100)), ("image_url", png_data_url(125, 80, seed=1)))
    media = {f"messages[0].content[{j}].image_url.url": base64.b64decode(p.image_url.url.partition(",")[2])
             for j, p in enumerate(request.messages[0].content)}
    limits = Limits(max_request_pixels=budget)
    if refused is None:
        assert build_prompt(vlm.processor, request, media, limits).pixel_values is not None
        return
    with pytest.raises(APIError) as e:
        build_prompt(vlm.processor, request, media, limits)
    assert (e.value.status, e.value.code, e.value.param) == (400, "media_too_large", refused)
    assert f"at most {budget} per request (--max-request-pixels)" in e.value.message


def test_kept_video_frames_count_against_the_budget_before_decoding(vlm, tmp_path, monkeypatch):
    from video_files import VideoSpec, make_video

    import smolvlm.processing.video_decode as video_decode
    from smolvlm.serving.inputs import build_prompt

    data = make_video(tmp_path / "v.mp4", VideoSpec(64, 48, 10, 40)).read_bytes()  # 4 s: 4 frames kept at 1 fps
    request = media_request(("video_url", "data:video/mp4;base64,"))
    media = {"messages[0].content[0].video_url.url": data}
    monkeypatch.setattr(video_decode, "_decode", lambda *a: pytest.fail("decoded despite the budget"))
    with pytest.raises(APIError) as e:
        build_prompt(vlm.processor, request, media, Limits(max_request_pixels=4 * 64 * 48 - 1))
    assert e.value.code == "media_too_large" and "4 frames of 64x48" in e.value.message


def test_media_are_shrunk_as_decoded_to_the_pixels_of_the_originals(vlm, tmp_path, monkeypatch):
    """Each image and kept video frame reaches the processor already through its first resize (the large decoded
    original is freed at once), and the request's pixel values are exactly the processor's on the originals."""
    from server_process import png_data_url
    from video_files import VideoSpec, make_video

    import smolvlm.serving.inputs as inputs
    from smolvlm.generation import prepare
    from smolvlm.processing.images import load_image
    from smolvlm.processing.video import load_video

    seen = []
    monkeypatch.setattr(inputs, "prepare", lambda p, messages, **kw: seen.append(messages) or
                        prepare(p, messages, **kw))
    images = [base64.b64decode(png_data_url(w, h, seed=w).partition(",")[2]) for w, h in [(640, 400), (60, 40)]]
    request = media_request(("image_url", "data:,"), ("image_url", "data:,"))
    media = {f"messages[0].content[{j}].image_url.url": data for j, data in enumerate(images)}
    got = inputs.build_prompt(vlm.processor, request, media, Limits())
    originals = [{"type": "image", "image": load_image(data)} for data in images]
    expected = prepare(vlm.processor, [{"role": "user", "content": originals}])
    assert [part["image"].size for part in seen[0][0]["content"]] == [(128, 80), (60, 40)]  # the 2nd: enlarged later
    assert torch.equal(got.pixel_values, expected.pixel_values) and torch.equal(got.input_ids, expected.input_ids)

    video = make_video(tmp_path / "v.mp4", VideoSpec(320, 240, 10, 30)).read_bytes()
    request = media_request(("video_url", "data:,"))
    got = inputs.build_prompt(vlm.processor, request, {"messages[0].content[0].video_url.url": video}, Limits())
    sampling = vlm.processor.video_sampling
    full = load_video(video, sampling.fps, sampling.max_frames)  # a Video of full-size frames, taken as it is
    assert {f.size for f in seen[1][0]["content"][0]["video"].frames} == {(128, 96)} != {f.size for f in full.frames}
    expected = prepare(vlm.processor, [{"role": "user", "content": [{"type": "video", "video": full}]}])
    assert torch.equal(got.pixel_values, expected.pixel_values) and torch.equal(got.input_ids, expected.input_ids)
