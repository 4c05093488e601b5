"""Decoding videos (smolvlm/processing/video_decode.py via load_video) against the reference's PyAV reader.

The oracle is transformers' own code: `read_video_pyav` (decodes the whole video, keeps the frames at the sampled
positions) driven by `SmolVLMVideoProcessor.sample_frames` (called unbound, with a stand-in `self`: the class itself
needs torchvision to run, the sampling doesn't).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from video_files import SPECS, VideoSpec, make_video, make_videos

import smolvlm.processing.video_decode as video_decode
from smolvlm.errors import InputError
from smolvlm.processing.video import load_video, video_prompt

# (fps, max_frames): the checkpoint default, then per-call overrides (denser than native fps included).
SETTINGS = [(1, 64), (2, 8), (0.5, 64), (4, 16), (3, 300), (8, 200)]
HEADER_COUNT = [n for n in SPECS if n.endswith((".mp4", ".avi"))]  # containers that store the frame count
NO_HEADER_COUNT = [n for n in SPECS if n.endswith((".mkv", ".webm"))]


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, Path]:
    return make_videos(tmp_path_factory.mktemp("videos"))


def reference_sampler(fps, max_frames):
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    return partial(SmolVLMVideoProcessor.sample_frames, SimpleNamespace(), num_frames=max_frames, fps=fps)


def reference_read(path: Path, fps, max_frames):
    """transformers' PyAV backend + SmolVLM sampling: (frames [T, H, W, 3] uint8, VideoMetadata with frames_indices)."""
    from transformers.video_utils import read_video_pyav

    return read_video_pyav(str(path), reference_sampler(fps, max_frames))


def decode_all(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame (decode order, as the reference numbers them) and the stream's average rate."""
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)], rate


def assert_frames_equal(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.array_equal(np.asarray(a), b), f"frame {i} differs"


@pytest.mark.parametrize("fps,max_frames", SETTINGS)
@pytest.mark.parametrize("name", HEADER_COUNT)
def test_decode_matches_reference(videos, name, fps, max_frames):
    video = load_video(videos[name], fps=fps, max_frames=max_frames)
    frames, meta = reference_read(videos[name], fps, max_frames)
    assert video.indices == meta.frames_indices.tolist()
    assert video.metadata.total_num_frames == meta.total_num_frames == SPECS[name].frames
    assert video.metadata.fps == meta.fps
    assert video.metadata.duration == meta.duration
    assert (video.metadata.width, video.metadata.height) == (meta.width, meta.height)
    assert video.timestamps == meta.timestamps
    assert_frames_equal(video.frames, frames)


@pytest.mark.parametrize("fps,max_frames", SETTINGS)
@pytest.mark.parametrize("name", NO_HEADER_COUNT)
def test_decode_counts_frames_when_header_has_none(videos, name, fps, max_frames):
    """Matroska/WebM store no frame count: the reference's PyAV reader sees 0 frames (and keeps only frame 0); we
    count the frames, which gives the reference's sampling on the true count and exactly those frames."""
    from transformers.video_utils import VideoMetadata

    with av.open(str(videos[name])) as container:
        assert container.streams.video[0].frames == 0
    all_frames, rate = decode_all(videos[name])
    n = len(all_frames)
    meta = VideoMetadata(total_num_frames=n, fps=float(rate), duration=float(n / rate))
    indices = reference_sampler(fps, max_frames)(meta).tolist()

    video = load_video(videos[name], fps=fps, max_frames=max_frames)
    assert n == SPECS[name].frames
    got = video.metadata
    assert (got.total_num_frames, got.fps, got.duration) == (n, meta.fps, meta.duration)
    assert video.indices == indices
    assert_frames_equal(video.frames, [all_frames[i] for i in indices])


def test_transformers_integration_example(videos):
    """transformers' SmolVLM2 video integration test: 559 frames at 60 fps -> these nine frames and timestamps."""
    video = load_video(videos["sixty_60fps_9.3s.mkv"])
    assert video.indices == [0, 69, 139, 209, 279, 348, 418, 488, 558]
    text = video_prompt(video, len(video.frames), "<img>")
    assert text.startswith("You are provided the following series of nine frames from a 0:00:09 [H:MM:SS] video.\n")
    stamps = [line.split("Frame from ")[1][:5] for line in text.split("\n") if line.startswith("Frame from")]
    assert stamps == ["00:00", "00:01", "00:02", "00:03", "00:04", "00:05", "00:06", "00:08", "00:09"]


def test_long_video_skips_first_and_last_second(videos):
    video = load_video(videos["shapes_30fps_70s.mp4"])  # 70 s > 64 frames / 1 fps + 2 s
    assert len(video.indices) == 64
    assert video.indices[0] == 30 and video.indices[-1] == 2070  # 1 s in, 1 s before the end


@pytest.mark.parametrize("fps,max_frames", SETTINGS)
@pytest.mark.parametrize("name", HEADER_COUNT)
def test_prompt_matches_reference(videos, name, fps, max_frames):
    """The text for a `<video>`: the reference's `replace_video_token` (called unbound), also with a padded count."""
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor, _prompt_single_image

    _, meta = reference_read(videos[name], fps, max_frames)
    video = load_video(videos[name], fps=fps, max_frames=max_frames)
    ref = SimpleNamespace(image_seq_len=3, fake_image_token="<fake_token_around_image>", image_token="<image>",
                          global_image_token="<global-img>")
    block = _prompt_single_image(3, "<fake_token_around_image>", "<image>", "<global-img>")
    for frames_announced in (len(video.frames), len(video.frames) + 5):  # + 5: a longer video padded the batch
        inputs = {"pixel_values": torch.zeros(1, frames_announced, 3, 1, 1), "video_metadata": [meta]}
        expected = SmolVLMProcessor.replace_video_token(ref, inputs, 0)
        assert video_prompt(video, frames_announced, block) == expected


def count_decoded(monkeypatch) -> list[int]:
    """Spy: how many frames the decoder produced while load_video ran."""
    count = [0]
    advance = video_decode._advance

    def counting(decoded, number, i):
        def frames():
            for frame in decoded:
                count[0] += 1
                yield frame

        return advance(frames(), number, i)

    monkeypatch.setattr(video_decode, "_advance", counting)
    return count


def test_seeks_instead_of_decoding_everything(videos, monkeypatch):
    """Each kept frame costs at most one GOP of decoding, whatever the length of the video."""
    spec = SPECS["colours_10fps_120s.avi"]
    decoded = count_decoded(monkeypatch)
    video = load_video(videos["colours_10fps_120s.avi"], fps=1, max_frames=8)
    assert len(video.frames) == 8
    assert decoded[0] <= 8 * spec.gop < spec.frames / 4
    frames, _ = reference_read(videos["colours_10fps_120s.avi"], 1, 8)
    assert_frames_equal(video.frames, frames)


def test_raw_stream_without_timestamps(tmp_path):
    """A raw H.264 stream has no timestamps and can't seek (the reference's reader fails on it): frames are counted
    from the start instead."""
    from transformers.video_utils import VideoMetadata

    path = make_video(tmp_path / "clip.h264", VideoSpec(64, 48, 25, 80, options={"x264-params": "keyint=10"}))
    all_frames, _ = decode_all(path)
    video = load_video(path, fps=2, max_frames=64)
    assert (video.metadata.total_num_frames, video.metadata.fps, video.metadata.duration) == (80, 25.0, 3.2)
    expected = reference_sampler(2, 64)(VideoMetadata(total_num_frames=80, fps=25.0, duration=3.2))
    assert video.indices == expected.tolist()
    assert_frames_equal(video.frames, [all_frames[i] for i in video.indices])


MEMORY_PROBE = """
import json, resource, sys
from smolvlm.processing.video import load_video
load_video(sys.argv[2], fps=1)  # warm up: libraries, codec, threads
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
video = load_video(sys.argv[1], fps=1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = sum(f.width * f.height * 3 for f in video.frames)
print(json.dumps({"peak_growth": (after - before) * 1024, "kept": kept, "frames": len(video.frames)}))
"""


def test_memory_stays_bounded_by_kept_frames(videos, tmp_path):
    """A 30 s 640x480 video (750 frames = 690 MB of RGB) sampled at 1 fps keeps 30 frames: the peak RSS growth of a
    fresh process stays near those 30 frames, far from the whole video."""
    spec = VideoSpec(640, 480, 25, 750, options={"preset": "ultrafast", "x264-params": "keyint=25"})
    path = make_video(tmp_path / "big.mp4", spec)
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(videos["clock_25fps_4s.mp4"])],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    whole = spec.frames * spec.width * spec.height * 3
    assert m["frames"] == 30
    assert m["peak_growth"] < 1.5 * m["kept"] + 48 * 2**20, m
    assert m["peak_growth"] < whole / 8, m


SHRINK_PROBE = """
import json, resource, sys
from smolvlm.processing.image_processor import ImageProcessor
from smolvlm.processing.video import load_video
shrink = ImageProcessor(size={"longest_edge": 512}, max_image_size=512, do_image_splitting=False).shrink
load_video(sys.argv[2], fps=1, shrink=shrink)  # warm up: libraries, codec, threads
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
video = load_video(sys.argv[1], fps=4, shrink=shrink)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_growth": (after - before) * 1024, "sizes": sorted({f.size for f in video.frames}),
                  "frames": len(video.frames)}))
"""


def test_frames_shrunk_as_read_bound_memory_by_their_shrunk_size(videos, tmp_path):
    """32 frames of 1920x1080 kept (190 MB of RGB at full size), each shrunk to the processor's 512x288 as it is
    decoded: the peak RSS growth of a fresh process stays far below the full-size frames."""
    spec = VideoSpec(1920, 1080, 8, 64, options={"preset": "ultrafast", "x264-params": "keyint=8"})
    path = make_video(tmp_path / "hd.mp4", spec)
    out = subprocess.run([sys.executable, "-c", SHRINK_PROBE, str(path), str(videos["clock_25fps_4s.mp4"])],
                         capture_output=True, text=True, check=True)
    m = json.loads(out.stdout)
    assert m["frames"] == 32 and m["sizes"] == [[512, 288]]
    assert m["peak_growth"] < 32 * 1920 * 1080 * 3 / 3, m


# ---- errors: an InputError that names the file and the problem ----


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def zero_frames(path: Path) -> Path:
    """An AVI whose video stream holds no frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def truncated(path: Path, source: Path, faststart: bool) -> Path:
    """The first half of an MP4: with the index (moov) at the end it is lost; with it first (faststart) frames are."""
    full = path.with_suffix(".full.mp4")
    with av.open(str(full), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(50):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 5, np.uint8))))
        container.mux(stream.encode())
    data = full.read_bytes()
    return write_bytes(path, data[: len(data) // 2])


def png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(path)
    return path


ERROR_CASES = {
    "not a video": (lambda d: write_bytes(d / "notes.mp4", b"hello, this is text, not a video " * 20),
                    "is not a video file"),
    "empty file": (lambda d: write_bytes(d / "empty.mp4", b""), "is empty"),
    "missing file": (lambda d: d / "missing.mp4", "not found"),
    "a folder": (lambda d: (d / "folder.mp4").mkdir() or d / "folder.mp4", "is a folder"),
    "an image": (lambda d: png(d / "picture.png"), "is an image"),
    "audio only": (lambda d: audio_only(d / "sound.m4a"), "has no video stream (it holds: audio)"),
    "zero frames": (lambda d: zero_frames(d / "nothing.avi"), "zero frames"),
    "truncated, index lost": (lambda d: truncated(d / "cut.mp4", d, faststart=False),
                              "damaged or truncated MP4/MOV"),
    "truncated, frames lost": (lambda d: truncated(d / "cutfast.mp4", d, faststart=True),
                               "is truncated: its header says 50 frames but only"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_name_the_file(tmp_path, case):
    make, phrase = ERROR_CASES[case]
    path = make(tmp_path)
    with pytest.raises(InputError) as e:
        load_video(path)
    assert str(path) in str(e.value) and phrase in str(e.value)
