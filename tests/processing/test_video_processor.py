"""Videos through the Processor (`processor(text, videos=...)`, `apply_chat_template` with video blocks) against the
reference's whole SmolVLMProcessor pipeline.

The reference pipeline is transformers' own SmolVLMProcessor and SmolVLMVideoProcessor (template, media collection,
`sample_frames`, `replace_video_token`, tokenizer), with two pieces swapped for what we follow (docs/video.md):
decoding by its PyAV backend (its default, torchcodec, isn't installed) and frame pixels by its PIL image processor
without splitting at the video size (the 4.50/4.51 path; its current torchvision resize can't be imported here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processing_reference import assert_same_inputs
from tiny import V1_FILES, V2_FILES, needs_shared
from video_files import SPECS, make_videos, reference_video_processor, synthetic_frame

from smolvlm.errors import InputError
from smolvlm.processing import Processor
from smolvlm.processing.video import VIDEO_CHAT_TEMPLATE, VideoFrames, load_video

NAMES = ["clock_25fps_4s.mp4", "shapes_30fps_70s.mp4", "short_30fps_0.67s.mp4", "ntsc_29.97fps_10s.mp4",
         "mjpeg_12fps_5s.avi"]  # header frame counts: the reference's PyAV reader reads them right


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    return make_videos(tmp_path_factory.mktemp("videos"), {n: SPECS[n] for n in NAMES})


@pytest.fixture(scope="module")
def tiny_pair(tiny_v2):
    return Processor.from_pretrained(tiny_v2), reference_video_processor(tiny_v2)


@pytest.fixture(scope="module")
def real_pair():
    if not V2_FILES.is_dir():
        pytest.skip(f"the real checkpoint files are not at {V2_FILES}")
    return Processor.from_pretrained(V2_FILES), reference_video_processor(V2_FILES)


def conversation(video: dict, text: str = "Describe this video") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", **video}, {"type": "text", "text": text}]}]


CONVERSATIONS = {
    "video first": lambda v: conversation({"path": v}),
    "text first": lambda v: [{"role": "user", "content": [{"type": "text", "text": "What happens in"},
                                                         {"type": "video", "url": v}, {"type": "text", "text": "?"}]}],
    "multi-turn": lambda v: [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "video", "video": v}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A clock."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
    ],
}


@pytest.mark.parametrize("kind", CONVERSATIONS)
def test_chat_template_text(tiny_pair, videos, kind):
    ours, ref = tiny_pair
    messages = CONVERSATIONS[kind](str(videos["clock_25fps_4s.mp4"]))
    expected = ref.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    assert "<video>" in expected


def test_video_template_is_the_references():
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    assert VIDEO_CHAT_TEMPLATE == DEFAULT_CHAT_TEMPLATE


SETTINGS = [None, (2, 8), (0.5, 64), (4, 16)]  # None: the checkpoint's video_sampling


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_chat_inputs_match_reference(tiny_pair, videos, name, settings):
    """apply_chat_template(tokenize=True): input_ids, attention_mask, pixel_values, pixel_attention_mask."""
    ours, ref = tiny_pair
    messages = CONVERSATIONS["multi-turn"](str(videos[name]))
    kw = {} if settings is None else {"fps": settings[0], "max_frames": settings[1]}
    ref_kw = {} if settings is None else {"processor_kwargs": {"fps": settings[0], "num_frames": settings[1]}}
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", **ref_kw)
    got = ours.apply_chat_template(messages, tokenize=True, **kw)
    assert_same_inputs(got, expected)
    assert ours.decode(got["input_ids"][0]) == ref.tokenizer.decode(expected["input_ids"][0])


def test_batch_matches_reference(tiny_pair, videos):
    """Two prompts, a flat list of videos handed out in order, left padding. Both prompts announce the larger frame
    count of the call, as the reference does."""
    ours, ref = tiny_pair
    text = ["<video>What is this?", "User: and this<video>, compared?"]
    paths = [str(videos["clock_25fps_4s.mp4"]), str(videos["ntsc_29.97fps_10s.mp4"])]
    expected = ref(text=text, videos=paths, do_sample_frames=True, fps=1, num_frames=64, padding=True,
                   padding_side="left", return_tensors="pt")
    got = ours(text=text, videos=paths, padding=True, padding_side="left")
    assert_same_inputs(got, expected)
    assert got["pixel_values"].shape[:2] == (2, 10)
    assert all("series of ten frames" in ours.decode(ids) for ids in got["input_ids"])
    nested = ours(text=text, videos=[[paths[0]], [paths[1]]], padding=True, padding_side="left")
    assert_same_inputs(nested, expected)


def test_frame_pixels_match_reference_image_processor(real_pair, videos):
    """Real settings (frames upscaled to video_size 512, then the 512 tile): our pixels = SmolVLMImageProcessorPil
    without splitting at the video size, on the frames the reference's PyAV reader decodes."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import read_video_pyav

    ours, _ = real_pair
    path = videos["clock_25fps_4s.mp4"]
    frames, meta = read_video_pyav(str(path), lambda metadata: SmolVLMVideoProcessor.sample_frames(
        None, metadata, num_frames=64, fps=1))
    images = SmolVLMImageProcessorPil.from_pretrained(V2_FILES)
    expected = images([[Image.fromarray(f) for f in frames]], do_image_splitting=False, size={"longest_edge": 512},
                      return_tensors="pt")
    got = ours(text="<video>", videos=str(path))
    assert got["pixel_values"].shape == (1, 4, 3, 512, 512)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["pixel_attention_mask"], expected["pixel_attention_mask"])


def test_real_settings_match_reference(real_pair, videos):
    ours, ref = real_pair
    messages = conversation({"path": str(videos["short_30fps_0.67s.mp4"])})
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
    assert_same_inputs(ours.apply_chat_template(messages, tokenize=True), expected)


@pytest.mark.parametrize("as_array", [False, True])
def test_video_frames_match_reference(tiny_pair, as_array):
    """Frames decoded by the caller: VideoFrames(frames, fps) = the reference given the frames and their metadata."""
    ours, ref = tiny_pair
    raw = np.stack([synthetic_frame(i, 40, 30) for i in range(90)])  # 3 s at 30 fps
    frames = raw if as_array else [Image.fromarray(f) for f in raw]
    expected = ref(text="<video>Describe", videos=[raw], video_metadata=[{"total_num_frames": 90, "fps": 30.0,
                                                                          "duration": 3.0}],
                   do_sample_frames=True, fps=2, num_frames=64, return_tensors="pt")
    got = ours(text="<video>Describe", videos=VideoFrames(frames, fps=30), fps=2)
    assert_same_inputs(got, expected)
    assert got["pixel_values"].shape[1] == 6


def test_two_videos_in_one_prompt(tiny_pair, videos):
    """A prompt's videos fill its row in order (the reference gives each video a row): same real frames, same ids."""
    ours, ref = tiny_pair
    paths = [str(videos["short_30fps_0.67s.mp4"]), str(videos["clock_25fps_4s.mp4"])]
    expected = ref(text="A<video>B<video>C", videos=paths, do_sample_frames=True, fps=1, num_frames=64,
                   return_tensors="pt")
    got = ours(text="A<video>B<video>C", videos=paths)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    real = expected["pixel_values"][expected["pixel_values"].flatten(2).any(-1)]  # [real frames, 3, M, M] in order
    assert got["pixel_values"].shape[:2] == (1, 5)
    assert torch.equal(got["pixel_values"][0], real)


def test_videos_without_text(tiny_pair, videos):
    ours, _ = tiny_pair
    got = ours(videos=str(videos["clock_25fps_4s.mp4"]))
    assert sorted(got) == ["pixel_attention_mask", "pixel_values"] and got["pixel_values"].shape[:2] == (1, 4)


def test_errors(tiny_pair, videos, tmp_path):
    ours, _ = tiny_pair
    clip = str(videos["clock_25fps_4s.mp4"])
    image = Image.new("RGB", (8, 8))
    cases = [
        (dict(text="<image><video>", images=[image], videos=[clip]), "images or videos in one call, not both"),
        (dict(text="<video>"), r"Found \[1\] <video> tokens per prompt but no videos were passed"),
        (dict(text="<video><video>", videos=[clip]), r"2 <video> tokens \(\[2\] per prompt\) but 1 videos"),
        (dict(text=["<video>", "x"], videos=[[clip], [clip]]), r"found \[1, 0\] <video> tokens and \[1, 1\] videos"),
        (dict(text="<video>", videos=[image]), r"VideoFrames\(frames, fps\)"),
        (dict(text="<video>", videos=[np.zeros((3, 8, 8, 3), np.uint8)]),
         r"holding ndarray.*VideoFrames\(frames, fps\)"),
        (dict(text="<video>", videos=[clip], fps=0), "fps must be > 0"),
        (dict(text="<video>", videos=[str(tmp_path / "gone.mp4")]), r"Sample 0, video 0: Video file not found: .*gone"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            ours(**kwargs)
    with pytest.raises(InputError, match=r"Sample 0, video 0: .*gone.mp4"):
        ours.apply_chat_template(conversation({"path": str(tmp_path / "gone.mp4")}), tokenize=True)


@needs_shared
def test_v1_checkpoints_have_no_video(videos):
    with pytest.raises(InputError, match="need a SmolVLM2 checkpoint"):
        Processor.from_pretrained(V1_FILES)(text="<video>", videos=str(videos["clock_25fps_4s.mp4"]))


def test_sampling_settings_from_checkpoint(tiny_v2, videos):
    ours = Processor.from_pretrained(tiny_v2)
    assert (ours.video_sampling.fps, ours.video_sampling.max_frames, ours.video_sampling.video_size) == (1.0, 64, 128)
    video = load_video(str(videos["shapes_30fps_70s.mp4"]))
    assert ours(text="<video>", videos=video)["pixel_values"].shape[1] == 64
