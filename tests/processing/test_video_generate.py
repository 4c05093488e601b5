"""Videos end to end: `smolvlm.load(...).generate/stream` and `smolvlm generate --video` give the reference's greedy
tokens (transformers SmolVLMForConditionalGeneration, eager attention, fp32, from the same tiny checkpoint, fed the
reference video pipeline's input_ids and pixel_values)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from video_files import SPECS, make_videos, reference_video_processor

from smolvlm import api, cli

MAX_NEW_TOKENS = 16
NAMES = ["clock_25fps_4s.mp4", "shapes_30fps_70s.mp4"]  # 4 frames; 64 frames (over 1000 image tokens)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    return make_videos(tmp_path_factory.mktemp("videos"), {n: SPECS[n] for n in NAMES})


@pytest.fixture(scope="module")
def vlm(tiny_v2):
    return api.load(tiny_v2, progress=False)


@pytest.fixture(scope="module")
def reference(tiny_v2):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_v2, attn_implementation="eager", dtype=torch.float32)
    return model.eval(), reference_video_processor(tiny_v2)


def messages(path: Path, text: str = "Describe this video") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": text}]}]


def reference_greedy(reference, conversation) -> list[int]:
    model, processor = reference
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def alone(vlm, videos):
    """Our greedy result for each video's conversation, generated on its own."""
    return {name: vlm.complete(messages(videos[name]), max_new_tokens=MAX_NEW_TOKENS) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_reference(vlm, reference, videos, alone, name):
    conversation = messages(videos[name])
    assert list(alone[name].token_ids) == reference_greedy(reference, conversation)
    assert "".join(vlm.stream(conversation, max_new_tokens=MAX_NEW_TOKENS)) == alone[name].text


def test_batch_of_video_conversations(vlm, videos, alone):
    """Each conversation in a batch is answered as it is alone (and announces its own frame count)."""
    batch = vlm.generate([messages(videos[n]) for n in NAMES], max_new_tokens=MAX_NEW_TOKENS)
    assert batch == [alone[n].text for n in NAMES]


def test_cli_generate_video(vlm, tiny_v2, videos, capsys):
    path = videos["clock_25fps_4s.mp4"]
    code = cli.main(["generate", "--video", str(path), "Describe this video", "--model", str(tiny_v2),
                     "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert code == 0
    assert capsys.readouterr().out == vlm.generate(messages(path), max_new_tokens=MAX_NEW_TOKENS) + "\n"


def test_cli_video_error_names_the_file(tiny_v2, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    code = cli.main(["generate", "--video", str(missing), "Describe this video", "--model", str(tiny_v2)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("smolvlm: error: ") and str(missing) in err and "not found" in err
    assert "Traceback" not in err
