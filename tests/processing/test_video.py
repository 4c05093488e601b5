"""Frame sampling, the video prompt, frames you decoded yourself, and where videos come from
(smolvlm/processing/video.py)."""

from __future__ import annotations

import base64
import functools
import http.server
import itertools
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny import V2_FILES, needs_shared
from video_files import SPECS, make_video, synthetic_frame

from smolvlm.errors import ConfigError, InputError
from smolvlm.processing import video
from smolvlm.processing.video import (
    Video,
    VideoFrames,
    VideoMetadata,
    VideoSampling,
    load_video,
    sample_frame_indices,
    video_prompt,
)


def reference_indices(metadata: VideoMetadata, fps, max_frames) -> list[int]:
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata as RefMetadata

    meta = RefMetadata(total_num_frames=metadata.total_num_frames, fps=metadata.fps, duration=metadata.duration)
    return SmolVLMVideoProcessor.sample_frames(SimpleNamespace(), meta, num_frames=max_frames, fps=fps).tolist()


# Native rates (incl. NTSC) x lengths around the interesting edges: under 1 s, x.5 s (banker's rounding of fps x
# duration), 66 s (where the 1-second skip starts for 64 frames at 1 fps), very long.
NATIVE_FPS = [1, 6, 12.5, 24, 30000 / 1001, 60]
SECONDS = [0.04, 0.5, 0.9, 1, 2.5, 3.5, 9.3, 33, 65.9, 66, 66.1, 67, 68, 200, 3600]
TARGETS = [(1, 64), (2, 8), (0.5, 64), (3, 300), (24, 64), (1, 1), (0.1, 3)]


@pytest.mark.parametrize("fps,max_frames", TARGETS)
def test_sampling_matches_reference(fps, max_frames):
    for native, seconds in itertools.product(NATIVE_FPS, SECONDS):
        total = max(1, round(native * seconds))
        meta = VideoMetadata(total, float(native), total / native, 64, 48)
        assert sample_frame_indices(meta, fps, max_frames) == reference_indices(meta, fps, max_frames), (native, total)


def test_sampling_facts():
    """Facts from transformers' tests: max_frames is a maximum; 2 s at 4 fps with fps=3 and 6 frames max gives 6."""
    assert len(sample_frame_indices(VideoMetadata(8, 4.0, 2.0, 1, 1), 3, 6)) == 6
    assert sample_frame_indices(VideoMetadata(10, 24.0, 10 / 24, 1, 1), 1, 3) == [0]  # sub-second: one frame


@needs_shared
def test_checkpoint_video_sampling():
    config = json.loads((V2_FILES / "preprocessor_config.json").read_text())
    assert VideoSampling.from_dict(config["video_sampling"]) == VideoSampling(fps=1.0, max_frames=64, video_size=512)
    assert VideoSampling.from_dict(None) == VideoSampling(1.0, 64, None)
    with pytest.raises(ConfigError, match="video_sampling"):
        VideoSampling.from_dict({"fps": "often", "max_frames": 64})
    with pytest.raises(ConfigError, match="max_frames"):
        VideoSampling.from_dict({"fps": 1, "max_frames": 0})


@pytest.mark.parametrize("fps,max_frames,message", [(0, 64, "fps must be > 0"), (-1, 64, "fps must be > 0"),
                                                    (1, 0, "max_frames must be"), (1, 2.5, "max_frames must be")])
def test_sampling_overrides_are_checked(fps, max_frames, message):
    frames = VideoFrames([np.zeros((4, 4, 3), np.uint8)] * 3, fps=3)
    with pytest.raises(InputError, match=message):
        load_video(frames, fps=fps, max_frames=max_frames)


# ---- frames decoded by the caller ----


@pytest.mark.parametrize("kind", ["pil", "arrays", "one array"])
def test_video_frames_are_sampled_like_a_file(kind):
    """VideoFrames(frames, fps) = the reference's processor given a frame array and metadata {fps, frames, duration}."""
    raw = [synthetic_frame(i, 32, 24) for i in range(150)]  # 6 s at 25 fps
    frames = {"pil": [Image.fromarray(f) for f in raw], "arrays": raw, "one array": np.stack(raw)}[kind]
    video = load_video(VideoFrames(frames, fps=25), fps=2, max_frames=10)
    meta = VideoMetadata(150, 25.0, 6.0, 32, 24)
    assert video.metadata == meta
    assert video.indices == reference_indices(meta, 2, 10)
    assert [np.asarray(f).tolist() for f in video.frames] == [raw[i].tolist() for i in video.indices]


@pytest.mark.parametrize("frames,fps,message", [
    ([], 25, "non-empty list"),
    ("frames", 25, "non-empty list"),
    ([np.zeros((4, 4, 3), np.uint8)], 0, "fps must be a number > 0"),
    ([np.zeros((4, 4, 3), np.uint8)], "25", "fps must be a number > 0"),
    ([np.zeros((4, 4, 3), np.uint8), "frame.png"], 25, "frame 1 is a str"),
    (np.zeros((4, 4, 3), np.uint8), 25, "must be 4-D"),
])
def test_video_frames_errors(frames, fps, message):
    with pytest.raises(InputError, match=message):
        VideoFrames(frames, fps)


# ---- the prompt ----


def test_prompt_text():
    video = Video(frames=[None] * 3, indices=[0, 1500, 3599], metadata=VideoMetadata(3600, 24.0, 150.0, 1, 1))
    assert video_prompt(video, 3, "<I>") == (
        "You are provided the following series of three frames from a 0:02:30 [H:MM:SS] video.\n"
        "\nFrame from 00:00:<I>\nFrame from 01:02:<I>\nFrame from 02:29:<I>\n\n"
    )
    hour = Video([None], [90000], VideoMetadata(100000, 25.0, 4000.0, 1, 1))  # minutes aren't taken modulo 60
    assert video_prompt(hour, 64, "") == ("You are provided the following series of sixty-four frames from a "
                                          "1:06:40 [H:MM:SS] video.\n\nFrame from 60:00:\n\n")


# ---- where videos come from ----


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip") / "clip.mp4", SPECS["clock_25fps_4s.mp4"])


@pytest.fixture
def http_server(clip):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clip.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_sources_give_the_same_video(clip, http_server):
    expected = load_video(str(clip), fps=2)
    data = clip.read_bytes()
    sources = [clip, data, "data:video/mp4;base64," + base64.b64encode(data).decode(), f"{http_server}/clip.mp4"]
    for source in sources:
        video = load_video(source, fps=2)
        assert video.indices == expected.indices and video.metadata == expected.metadata
        assert all(a.tobytes() == b.tobytes() for a, b in zip(video.frames, expected.frames))
    assert load_video(expected) is expected  # already sampled


def test_source_errors(http_server, monkeypatch):
    with pytest.raises(InputError, match=r"Can't download the video http://127.0.0.1:\d+/missing.mp4.*404"):
        load_video(f"{http_server}/missing.mp4")
    monkeypatch.setattr(video, "MAX_VIDEO_BYTES", 1000)
    with pytest.raises(InputError, match=r"The video http://.*/clip.mp4 is larger than the 1000 bytes allowed"):
        load_video(f"{http_server}/clip.mp4")
    with pytest.raises(InputError, match="must be base64"):
        load_video("data:video/mp4,abc")
    with pytest.raises(InputError, match="base64 payload is invalid"):
        load_video("data:video/mp4;base64,@@@")
    with pytest.raises(InputError, match=r"<video bytes> is not a video file"):
        load_video(b"not a video at all" * 10)
    with pytest.raises(InputError, match="Unsupported video int"):
        load_video(42)
