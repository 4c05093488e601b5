"""Videos for SmolVLM2: sample frames as the reference does, and build the text that stands for a video.

A video becomes a list of frames (each processed like an unsplit image) and a prompt that announces them:

    You are provided the following series of nine frames from a 0:00:09 [H:MM:SS] video.\n
    \nFrame from 00:00:<image block>\nFrame from 00:01:<image block> ... \n\n

Sampling (`sample_frame_indices`) is the reference's `SmolVLMVideoProcessor.sample_frames`: about `fps` frames per
second of video, at most `max_frames`, evenly spaced, skipping the first and last second of videos longer than
`max_frames / fps + 2` seconds. Defaults come from the checkpoint's preprocessor_config.json `video_sampling`.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from num2words import num2words
from PIL import Image

from ..errors import ConfigError, InputError
from .images import load_image
from .prompt import image_block
from .video_decode import VideoMetadata, read_video, video_name

VIDEO_TOKEN = "<video>"  # the placeholder a prompt holds for each video (plain text to the tokenizer)

FETCH_TIMEOUT_S = 30.0  # per network operation (connect, each read) when downloading a video URL
MAX_VIDEO_BYTES = 1 << 30  # largest video we download (it is held in memory while decoding)
SKIP_SECS = 1  # seconds skipped at both ends of long videos (the reference's default, never changed by its processor)

# The checkpoints' chat template has no video branch; the reference uses this one (processing_smolvlm.py
# DEFAULT_CHAT_TEMPLATE) whenever a conversation holds a video and no template is given explicitly.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@dataclass(frozen=True)
class VideoSampling:
    """preprocessor_config.json `video_sampling`: target frames per second, most frames kept, frame resize size."""

    fps: float = 1.0
    max_frames: int = 64
    video_size: int | None = None  # longest edge frames are first resized to (None: the image `size`)

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "preprocessor_config.json") -> VideoSampling:
        if not d:
            return cls()
        size = (d.get("video_size") or {}).get("longest_edge")
        try:
            return cls(fps=float(d.get("fps", 1.0)), max_frames=int(d.get("max_frames", 64)),
                       video_size=int(size) if size is not None else None).checked(source)
        except (TypeError, ValueError) as e:  # InputError from checked() is a ValueError too
            raise ConfigError(f"{source}: video_sampling must hold numbers fps, max_frames, video_size.longest_edge; "
                              f"got {d}") from e

    def checked(self, where: str = "video sampling") -> VideoSampling:
        if not self.fps > 0:
            raise InputError(f"{where}: fps must be > 0 (frames sampled per second of video), got {self.fps}")
        if int(self.max_frames) != self.max_frames or self.max_frames < 1:
            raise InputError(f"{where}: max_frames must be a whole number >= 1, got {self.max_frames}")
        return self


@dataclass
class VideoFrames:
    """A video you decoded yourself: all its frames (PIL images or HxWxC arrays, or one TxHxWxC array) and its fps.

    It is sampled like a decoded file (`sample_frame_indices`), with duration = len(frames) / fps.
    """

    frames: Sequence
    fps: float

    def __post_init__(self):
        if isinstance(self.fps, bool) or not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise InputError(f"VideoFrames: fps must be a number > 0 (the frame rate of the frames), got {self.fps!r}")
        if isinstance(self.frames, np.ndarray) or hasattr(self.frames, "dim"):  # one [T, H, W, C] array or tensor
            if self.frames.ndim != 4:
                raise InputError(f"VideoFrames: an array of frames must be 4-D [T, H, W, C], got {self.frames.ndim}-D")
            self.frames = list(self.frames)
        if not isinstance(self.frames, Sequence) or isinstance(self.frames, (str, bytes)) or not self.frames:
            raise InputError("VideoFrames: frames must be a non-empty list of PIL images or HxWxC arrays")
        for i, frame in enumerate(self.frames):
            if not isinstance(frame, Image.Image) and getattr(frame, "ndim", None) != 3:
                raise InputError(f"VideoFrames: frame {i} is a {type(frame).__name__}; expected a PIL image or an "
                                 "HxWxC array")

    @property
    def metadata(self) -> VideoMetadata:
        n, first = len(self.frames), self.frames[0]
        w, h = first.size if isinstance(first, Image.Image) else (first.shape[1], first.shape[0])
        return VideoMetadata(total_num_frames=n, fps=float(self.fps), duration=n / self.fps, width=w, height=h)


@dataclass
class Video:
    """The sampled frames of a video, their frame numbers in it, and the metadata of the whole video."""

    frames: list  # PIL images (decoded files) or what VideoFrames held
    indices: list[int]
    metadata: VideoMetadata

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of each kept frame (frame number / fps)."""
        return [i / self.metadata.fps for i in self.indices]


def sample_frame_indices(metadata: VideoMetadata, fps: float, max_frames: int) -> list[int]:
    """Frame numbers to keep: the reference's `SmolVLMVideoProcessor.sample_frames`, step for step."""
    total, duration = metadata.total_num_frames, metadata.duration
    wanted = max(1, min(int(round(fps * duration)), max_frames))  # round() is banker's rounding, as the reference's
    start, end = 0, total - 1
    if SKIP_SECS > 0 and duration - 2 * SKIP_SECS > max_frames * fps:  # long video: skip 1 s at both ends
        start, end = int(SKIP_SECS * metadata.fps), int(total - SKIP_SECS * metadata.fps)
    start, end = max(0, start), min(end, total - 1)
    if start >= end:
        start, end = 0, total - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int)).tolist()  # dtype=int truncates, as the reference


def load_video(source, fps: float = 1.0, max_frames: int = 64, shrink=None) -> Video:
    """Decode (or take) the sampled frames of a video.

    `source`: a path, an http(s) URL, a `data:video/...;base64,` URL, the bytes of a video file, a `VideoFrames`,
    or a `Video` (returned as is: it is already sampled). `shrink`: applied to each decoded frame as it is read
    (`frame_processor(processor).shrink`: the processor's first resize, done early to hold small frames).
    """
    if isinstance(source, Video):
        return source
    sampling = VideoSampling(fps, max_frames).checked()
    if isinstance(source, VideoFrames):
        indices = sample_frame_indices(source.metadata, sampling.fps, sampling.max_frames)
        return Video([source.frames[i] for i in indices], indices, source.metadata)
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise InputError(f"Unsupported video {type(source).__name__}: expected a path, URL, data URL, bytes, "
                         "VideoFrames(frames, fps) or Video")
    name = video_name(source)
    data = _fetch(source, name)
    frames, indices, metadata = read_video(
        data, lambda md: sample_frame_indices(md, sampling.fps, sampling.max_frames), name, shrink
    )
    return Video(frames, indices, metadata)


def _fetch(source, name: str):
    """URLs and data URLs to bytes; paths and bytes unchanged."""
    if not isinstance(source, str):
        return source
    if source.startswith(("http://", "https://")):
        return _download(source, name)
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise InputError(f"{name}: a video data URL must be base64 (data:video/mp4;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as e:
            raise InputError(f"{name}: the data URL's base64 payload is invalid ({e})") from e
    return source


def _download(url: str, name: str) -> bytes:
    import httpx

    data = bytearray()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=FETCH_TIMEOUT_S) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_VIDEO_BYTES:
                    raise InputError(f"The video {name} is larger than the {MAX_VIDEO_BYTES} bytes allowed")
    except httpx.HTTPError as e:
        raise InputError(f"Can't download the video {name}: {e}") from e
    return bytes(data)


def video_prompt(video: Video, num_frames: int, image_block: str) -> str:
    """The text that replaces one `<video>`: the intro, a timestamped `image_block` per frame, then "\\n\\n".

    `num_frames` is the count the intro announces; the reference announces the batch's padded frame count
    (pixel_values.shape[1]), so a shorter video in a batch states the longest one's count. `image_block` is the
    unsplit image prompt (`<fake_token_around_image><global-img><image>*N<fake_token_around_image>`).
    """
    duration = timedelta(seconds=int(video.metadata.duration))
    count = num2words(num_frames)
    text = f"You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
    for t in video.timestamps:
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:" + image_block
    return text + "\n\n"


def expand_videos(processor, texts: list[str] | None, videos, fps: float | None = None,
                  max_frames: int | None = None) -> tuple[list[str] | None, dict]:
    """The `videos` part of `Processor.__call__`: (texts with each `<video>` expanded, pixel inputs).

    `videos`: one video, a flat list (handed out to the prompts in order, as many as each has `<video>`s), or one
    list per prompt; a video is anything `load_video` takes. Frames are processed like unsplit images resized to
    `video_sampling.video_size` (see docs/video.md); a prompt's videos fill its row of `pixel_values` in order.
    """
    if processor.family != "smolvlm":
        raise InputError("Videos need a SmolVLM2 checkpoint (model_type smolvlm); this one is SmolVLM v1 (idefics3)")
    sampling = processor.video_sampling
    fps = sampling.fps if fps is None else fps
    max_frames = sampling.max_frames if max_frames is None else max_frames
    if videos is None:
        counts = [t.count(VIDEO_TOKEN) for t in texts]
        raise InputError(f"Found {counts} {VIDEO_TOKEN} tokens per prompt but no videos were passed")
    batch = _video_layout(videos, texts)
    frames_to = frame_processor(processor)
    loaded = [[_load(source, b, j, fps, max_frames, frames_to.shrink) for j, source in enumerate(sample)]
              for b, sample in enumerate(batch)]
    frames = [[load_image(frame) for video in sample for frame in video.frames] for sample in loaded]
    pixels = frames_to(frames)
    out = {"pixel_values": pixels.pixel_values, "pixel_attention_mask": pixels.pixel_attention_mask}
    if texts is None:
        return None, out
    # The reference announces the padded frame count of the call's video batch (its pixel_values.shape[1]).
    announced = max(len(video.frames) for sample in loaded for video in sample)
    block = image_block(processor.image_seq_len, processor.image_tokens)
    expanded = []
    for text, sample in zip(texts, loaded):
        pieces = text.split(VIDEO_TOKEN)
        expanded.append(pieces[0] + "".join(video_prompt(v, announced, block) + p for v, p in zip(sample, pieces[1:])))
    return expanded, out


def frame_processor(processor):
    """The image processor video frames go through: unsplit, resized to `video_sampling.video_size`."""
    size = processor.video_sampling.video_size
    return processor.image_processor.with_overrides(size=size and {"longest_edge": size}, do_image_splitting=False)


def _is_video(x) -> bool:
    return isinstance(x, (str, os.PathLike, bytes, bytearray, VideoFrames, Video))


def _video_layout(videos, texts: list[str] | None) -> list[list]:
    """Videos as one list per prompt, checked against the prompts' `<video>` counts."""
    if _is_video(videos):
        videos = [videos]
    if not isinstance(videos, (list, tuple)) or not videos:
        raise InputError(f"videos: expected a video, a list of videos or one list of videos per prompt, got "
                         f"{type(videos).__name__}")
    if all(isinstance(sample, (list, tuple)) for sample in videos):
        batch = [list(sample) for sample in videos]
    elif all(_is_video(v) for v in videos):
        counts = [t.count(VIDEO_TOKEN) for t in texts] if texts is not None else [len(videos)]
        if sum(counts) != len(videos):
            raise InputError(f"The prompts hold {sum(counts)} {VIDEO_TOKEN} tokens ({counts} per prompt) but "
                             f"{len(videos)} videos were passed")
        starts = np.cumsum([0] + counts).tolist()
        batch = [list(videos[a:b]) for a, b in zip(starts, starts[1:])]
    else:
        odd = [v for v in videos if not _is_video(v)]
        kinds = sorted({type(v).__name__ for v in odd})
        frames = any(isinstance(v, Image.Image) or hasattr(v, "shape") for v in odd)
        hint = " (frames you decoded yourself go in VideoFrames(frames, fps))" if frames else ""
        raise InputError(f"videos: a list holding {', '.join(kinds)}; expected paths, URLs, bytes, VideoFrames or one "
                         f"list of those per prompt{hint}")
    if texts is not None:
        in_text, given = [t.count(VIDEO_TOKEN) for t in texts], [len(sample) for sample in batch]
        if in_text != given:
            raise InputError(f"Each prompt needs one {VIDEO_TOKEN} per video: found {in_text} {VIDEO_TOKEN} tokens and "
                             f"{given} videos per prompt")
    if not any(batch):
        raise InputError("videos: no videos given")
    return batch


def _load(source, sample: int, index: int, fps: float, max_frames: int, shrink) -> Video:
    try:
        return load_video(source, fps, max_frames, shrink)
    except InputError as e:
        raise InputError(f"Sample {sample}, video {index}: {e}") from e
