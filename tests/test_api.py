"""smolvlm.load -> SmolVLM.generate / complete / stream, end to end (our processor + model), against the reference."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import smolvlm
from smolvlm.errors import CheckpointError, InputError
from smolvlm.generation import GenerationResult

N = 16


@pytest.fixture(scope="module")
def vlm(tiny_v2):
    return smolvlm.load(tiny_v2, progress=False)


@pytest.fixture(scope="module")
def reference(tiny_v2):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_v2, attn_implementation="eager").float().eval()


def picture(seed, size=(90, 140)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def user(text, *images):
    images = [{"type": "image", "image": i} for i in images]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def reference_answers(vlm, reference, conversations):
    """transformers' greedy generate (eos from generation_config) on our processor's left-padded batch."""
    inputs = vlm.processor.apply_chat_template(conversations, tokenize=True, padding=True, padding_side="left")
    out = reference.generate(**inputs, max_new_tokens=N, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    return vlm.processor.batch_decode(out, skip_special_tokens=True)


def test_greedy_answers_match_the_reference_alone_and_as_a_batch(vlm, reference):
    text_only = user("Write a haiku about the sea.")
    two_images = user("What differs between these two pictures? Be precise.", picture(1), picture(2, (200, 80)))
    one_image = [{"role": "system", "content": "Be brief."}, *user("Describe.", picture(3))]
    batch = [text_only, two_images, one_image]
    answers = vlm.generate(batch, max_new_tokens=N)
    assert answers == reference_answers(vlm, reference, batch)
    assert answers == [vlm.generate(c, max_new_tokens=N) for c in batch]
    assert len(set(answers)) == 3 and all(answers)


def test_complete_reports_finish_reason_and_token_counts(vlm):
    conversation = user("Hello", picture(4))
    result = vlm.complete(conversation, max_new_tokens=5)
    assert isinstance(result, GenerationResult)
    prompt_len = vlm.processor.apply_chat_template(conversation, tokenize=True)["input_ids"].shape[1]
    assert (result.finish_reason, result.completion_tokens, result.prompt_tokens) == ("length", 5, prompt_len)
    assert result.text == vlm.generate(conversation, max_new_tokens=5)
    stop = result.text[2:5]
    stopped = vlm.complete([conversation], max_new_tokens=5, stop=[stop])[0]
    assert stopped.finish_reason == "stop" and stopped.text == result.text[: result.text.index(stop)]


def test_stream_pieces_join_to_the_answer(vlm):
    conversation = user("Tell me more", picture(5))
    pieces = list(vlm.stream(conversation, max_new_tokens=N))
    assert len(pieces) > 3 and "".join(pieces) == vlm.generate(conversation, max_new_tokens=N)
    sampled = dict(max_new_tokens=N, temperature=0.9, top_k=40, seed=3)
    assert "".join(vlm.stream(conversation, **sampled)) == vlm.generate(conversation, **sampled)


def test_calls_may_interleave_with_an_open_stream(vlm):
    a, b = user("First conversation", picture(7)), user("Second one")
    expected_a, expected_b = vlm.generate(a, max_new_tokens=N), vlm.generate(b, max_new_tokens=N)
    stream = vlm.stream(a, max_new_tokens=N)
    pieces = [next(stream)]
    assert vlm.generate(b, max_new_tokens=N) == expected_b  # steps the open stream too: its pieces are kept
    longer = vlm.engine.max_len + 100  # doesn't fit the engine the stream is using: a separate one serves it
    assert vlm.complete(b, max_new_tokens=longer).text.startswith(expected_b)
    pieces += list(stream)
    assert "".join(pieces) == expected_a


def test_a_stream_left_early_frees_its_slot(vlm):
    stream = vlm.stream("A long story please", max_new_tokens=200)
    next(stream)
    stream.close()
    assert vlm.generate("hi", max_new_tokens=4) == vlm.generate("hi", max_new_tokens=4)
    assert not vlm.engine.has_unfinished()


def test_string_content_and_every_image_source_give_the_same_answer(vlm, tmp_path):
    image = picture(6)
    image.save(tmp_path / "p.png")
    data = (tmp_path / "p.png").read_bytes()
    answers = {
        vlm.generate(user("What is it?", source), max_new_tokens=8)
        for source in [image, str(tmp_path / "p.png"), data, base64.b64encode(data).decode()]
    }
    openai = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
        {"type": "text", "text": "What is it?"},
    ]}]  # fmt: skip
    answers.add(vlm.generate(openai, max_new_tokens=8))
    assert len(answers) == 1
    assert vlm.generate("Hi there", max_new_tokens=8) == vlm.generate(user("Hi there"), max_new_tokens=8)


def test_sampling_is_reproducible_with_a_seed(vlm):
    params = dict(max_new_tokens=N, temperature=1.0, top_p=0.9, seed=11)
    first = vlm.generate("Invent a word", **params)
    assert vlm.generate("Invent a word", **params) == first
    assert vlm.generate(["Other", "Invent a word"], **params)[1] == first
    assert vlm.generate("Invent a word", **{**params, "seed": 12}) != first


def test_the_engine_grows_for_longer_requests(vlm):
    short = vlm.complete("x", max_new_tokens=2)
    length = vlm.engine.max_len
    long = vlm.complete("x", max_new_tokens=length + 10)
    assert vlm.engine.max_len >= short.prompt_tokens + length + 10
    assert long.token_ids[:2] == short.token_ids
    assert (long.finish_reason, long.completion_tokens) == ("length", length + 10)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "messages must be"),
        ([{"role": "user", "content": "hi"}, "stray"], "messages must be"),
        (42, "messages must be"),
    ],
)
def test_bad_messages_are_refused(vlm, messages, match):
    with pytest.raises(InputError, match=match):
        vlm.generate(messages)


def test_bad_parameters_images_and_streams_are_refused(vlm, tmp_path):
    with pytest.raises(InputError, match="temperature"):
        vlm.generate("hi", temperature=-1)
    with pytest.raises(TypeError):
        vlm.generate("hi", temprature=0.5)
    with pytest.raises(InputError, match="one conversation"):
        next(vlm.stream(["a", "b"]))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InputError, match="bad.png"):
        vlm.generate(user("?", str(tmp_path / "bad.png")))
    with pytest.raises(InputError, match="missing.png"):
        vlm.generate(user("?", str(tmp_path / "missing.png")))
    with pytest.raises(InputError, match="missing.png"):  # a bad conversation in a batch: nothing is queued
        vlm.generate([user("fine", picture(5)), user("?", str(tmp_path / "missing.png")), user("fine too")])
    assert not vlm.engine.has_unfinished()


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint folder"):
        smolvlm.load(tmp_path / "nowhere", progress=False)
    with pytest.raises(CheckpointError, match="config.json"):
        smolvlm.load(tmp_path, progress=False)


def test_dtype_and_device(tiny_v2):
    vlm = smolvlm.load(tiny_v2, dtype="bfloat16", device="cpu", progress=False)
    assert vlm.model.dtype == torch.bfloat16 and vlm.model.device.type == "cpu"
    result = vlm.complete("Hello", max_new_tokens=6)
    assert result.completion_tokens == 6 and result.text


def test_processor_options_per_call(vlm, tmp_path):
    """fps / max_frames / do_image_splitting reach the processor: the prompt is what it makes with them."""
    from video_files import SPECS, make_video

    video = make_video(tmp_path / "clock.mp4", SPECS["clock_25fps_4s.mp4"])
    clip = [{"role": "user", "content": [{"type": "video", "path": str(video)}, {"type": "text", "text": "Describe"}]}]
    photo = user("Describe.", picture(5, (300, 200)))  # 2x2 tiles + the global image when split
    for conversation, options in [(clip, dict(max_frames=2)), (clip, dict(fps=2.0)), (photo, dict(do_image_splitting=False))]:
        expected = vlm.processor.apply_chat_template(conversation, tokenize=True, **options)["input_ids"].shape[1]
        default = vlm.processor.apply_chat_template(conversation, tokenize=True)["input_ids"].shape[1]
        result = vlm.complete(conversation, max_new_tokens=2, **options)
        assert result.prompt_tokens == expected != default, options


def test_a_long_list_is_prepared_a_window_ahead_of_the_engine(vlm, monkeypatch):
    """generate(list) prepares conversations (images decoded and split) at most PREPARE_AHEAD ahead of the engine,
    not all before the first step; the answers are those of each conversation alone."""
    import smolvlm.api
    from smolvlm.generation import Engine

    conversations = [user(f"Describe picture {i}.", picture(i, (60 + 7 * i, 90))) for i in range(20)]
    log, steps, prepare, step = [], [], smolvlm.api.prepare, Engine.step

    def counted_prepare(*args, **kwargs):
        log.append((len(steps), len(vlm.engine.waiting) if vlm.engine is not None else 0))
        return prepare(*args, **kwargs)

    def counted_step(engine):
        out = step(engine)
        steps.append(len(engine.running))
        # pixels are dropped once a row's prefill is done (rows still prefilling in chunks keep theirs)
        assert all(r.prompt.pixel_values is None for r in engine.running[: engine.decoding])
        return out

    monkeypatch.setattr(smolvlm.api, "prepare", counted_prepare)
    monkeypatch.setattr(Engine, "step", counted_step)
    answers = vlm.generate(conversations, max_new_tokens=4)
    monkeypatch.undo()
    before_first_step = sum(n == 0 for n, _ in log)
    assert len(log) == 20 - smolvlm.api.PREPARE_AHEAD and before_first_step == 0  # (the first window: prepare_all)
    assert max(waiting for _, waiting in log) < smolvlm.api.PREPARE_AHEAD and max(steps) == smolvlm.api.MAX_BATCH
    assert answers == [vlm.generate(c, max_new_tokens=4) for c in conversations]


def test_a_later_longer_conversation_gets_room(vlm, tiny_v2):
    """The engine is sized from the first window; a longer conversation after it gets an engine with room."""
    fresh = smolvlm.load(tiny_v2, progress=False)
    short = [user(f"Say {i}.") for i in range(smolvlm.api.PREPARE_AHEAD + 2)]
    batch = short + [user("Tell me everything about this. " * 60)]
    answers = fresh.complete(batch, max_new_tokens=N)
    assert fresh.engine.max_len == 256 and answers[-1].prompt_tokens + N > 256  # it didn't fit the first engine
    assert [a.text for a in answers] == [vlm.generate(c, max_new_tokens=N) for c in batch]
