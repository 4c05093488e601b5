"""Videos the tests make themselves, and the reference's video pipeline to compare against.

PyAV encodes synthetic frames (a colour that changes every frame, a moving square, a clock hand that turns), so every
frame differs and a wrong frame number shows in the pixels. Sizes are tiny (tens of pixels) so a 70-second video
encodes in a fraction of a second.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class VideoSpec:
    width: int
    height: int
    fps: Fraction | int
    frames: int
    codec: str = "libx264"
    pix_fmt: str = "yuv420p"
    options: dict = field(default_factory=dict)  # codec options (x264 preset, GOP...)
    gop: int | None = None

    @property
    def duration(self) -> float:
        return self.frames / float(self.fps)


# name (its extension picks the container) -> spec. Picked to cover: B-frames and short GOPs (seeking), a video over
# 66 s (the 1-second skip at both ends), videos under 1 s, an NTSC rate, containers with and without a frame count in
# their header (MP4/AVI vs Matroska/WebM), portrait and landscape frames, several codecs.
SPECS = {
    "clock_25fps_4s.mp4": VideoSpec(64, 48, 25, 100,
                                    options={"preset": "medium", "x264-params": "keyint=12:bframes=3"}),
    "shapes_30fps_70s.mp4": VideoSpec(64, 48, 30, 2100, options={"preset": "ultrafast", "x264-params": "keyint=60"}),
    "colours_10fps_120s.avi": VideoSpec(48, 32, 10, 1200, codec="mpeg4", gop=25),
    "short_30fps_0.67s.mp4": VideoSpec(64, 48, 30, 20, options={"preset": "medium"}),
    "short_24fps_0.58s.webm": VideoSpec(48, 64, 24, 14, codec="libvpx-vp9"),
    "ntsc_29.97fps_10s.mp4": VideoSpec(80, 48, Fraction(30000, 1001), 300, options={"preset": "veryfast"}),
    "sixty_60fps_9.3s.mkv": VideoSpec(64, 36, 60, 559, codec="mpeg4", gop=30),
    "mjpeg_12fps_5s.avi": VideoSpec(96, 54, 12, 60, codec="mjpeg", pix_fmt="yuvj420p"),
}


def synthetic_frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: [H, W, 3] uint8 with a changing background colour, a moving square and a turning clock hand."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[...] = ((i * 7) % 256, (i * 13 + 80) % 256, (255 - i * 3) % 256)
    side = max(4, height // 4)
    x = (i * 2) % max(1, width - side)
    y = (i // 3) % max(1, height - side)
    frame[y : y + side, x : x + side] = (255, 255, 255)
    cx, cy, r = width // 2, height // 2, min(width, height) // 2 - 1
    angle = 2 * np.pi * (i % 60) / 60
    t = np.linspace(0, 1, 2 * r)
    xs = (cx + t * r * np.sin(angle)).astype(int)
    ys = (cy - t * r * np.cos(angle)).astype(int)
    frame[ys, xs] = (0, 0, 0)
    return frame


def make_video(path: Path, spec: VideoSpec) -> Path:
    """Encode `spec` into `path` (container from the extension)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(spec.codec, rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, spec.pix_fmt
        if spec.gop:
            stream.codec_context.gop_size = spec.gop
        stream.options = dict(spec.options)
        for i in range(spec.frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, spec.width, spec.height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def make_videos(folder: Path, specs: dict[str, VideoSpec] = SPECS) -> dict[str, Path]:
    return {name: make_video(folder / name, spec) for name, spec in specs.items()}


def reference_video_processor(folder: Path):
    """transformers' SmolVLMProcessor with a SmolVLMVideoProcessor that decodes with PyAV and makes frame pixels
    with the PIL image processor (splitting off, size = video_sampling.video_size)."""
    from transformers import AutoTokenizer
    from transformers.image_processing_utils import BatchFeature
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import load_video as reference_load_video

    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    video_size = dict(preprocessor["video_sampling"]["video_size"])  # before the video processor overwrites it
    images = SmolVLMImageProcessorPil.from_pretrained(folder)

    class PyAVPilVideoProcessor(SmolVLMVideoProcessor):
        def fetch_videos(self, video_url_or_urls, sample_indices_fn=None):
            if isinstance(video_url_or_urls, list):
                return list(zip(*[self.fetch_videos(x, sample_indices_fn) for x in video_url_or_urls]))
            return reference_load_video(video_url_or_urls, backend="pyav", sample_indices_fn=sample_indices_fn)

        def convert_to_rgb(self, video):
            return video  # decoded frames are RGB; the image processor converts PIL frames itself

        def _preprocess(self, videos, return_tensors=None, **kwargs):
            frames = [[Image.fromarray(f.permute(1, 2, 0).numpy()) for f in video] for video in videos]
            out = images(frames, do_image_splitting=False, size=video_size, return_tensors=return_tensors)
            return BatchFeature({k: out[k] for k in ("pixel_values", "pixel_attention_mask")},
                                tensor_type=return_tensors)

    class ReferenceProcessor(SmolVLMProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None  # the video processor subclass isn't registered with transformers' auto classes

    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    return ReferenceProcessor(images, AutoTokenizer.from_pretrained(folder),
                              PyAVPilVideoProcessor(**copy.deepcopy(preprocessor)), image_seq_len=seq_len,
                              chat_template=template)
