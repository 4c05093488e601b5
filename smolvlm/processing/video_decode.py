"""Read a video file's metadata and decode only the frames we keep, with PyAV.

The reference (transformers' `read_video_pyav`) opens the file, reads the metadata from the stream header, asks a
sampling function for frame numbers, then decodes the whole video from the start and keeps the frames whose position
in decode output order is one of those numbers. We give the same frames for the same numbers, without decoding what
we don't keep:

1. One demux pass (packets only, nothing decoded) lists every frame's presentation timestamp and the keyframes. Frame
   number i is the i-th smallest timestamp: the order a decoder outputs frames in, i.e. the reference's numbering.
2. For each wanted frame we seek to the keyframe at or before it, unless the decoder is already inside that GOP, and
   decode forward to the frame's timestamp. Only the kept frames are converted to RGB and held, so memory is bounded
   by the kept frames, and time by (kept frames x GOP length) rather than the length of the video.

Metadata follows the reference's PyAV backend: fps = the stream's average frame rate, duration = frames / fps. The
frame count is the number of frames the demuxer finds; it equals the header's count on an intact file (the reference
reads the header, which is 0 for containers that don't store it, such as WebM and Matroska: counting is what makes
those usable).
"""

from __future__ import annotations

import io
import os
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from ..errors import InputError

# First bytes of the containers people send, to tell a damaged video ("truncated or corrupt MP4") from a file that
# isn't a video at all, since FFmpeg reports both as "Invalid data found when processing input".
_CONTAINER_MAGIC = {
    "MP4/MOV": lambda head: head[4:8] == b"ftyp",
    "Matroska/WebM": lambda head: head[:4] == b"\x1a\x45\xdf\xa3",
    "AVI": lambda head: head[:4] == b"RIFF" and head[8:12] == b"AVI ",
}


@dataclass
class VideoMetadata:
    """What the reference's PyAV reader reports about a whole video (before sampling)."""

    total_num_frames: int
    fps: float  # the stream's average frame rate
    duration: float  # seconds, = total_num_frames / fps (the reference's PyAV definition)
    width: int
    height: int


def video_name(source) -> str:
    """How errors name a video source."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return name if not name.startswith("data:") else name[:40] + "..."
    return f"<video {type(source).__name__}>"


def read_video(
    source: str | os.PathLike | bytes | io.IOBase,
    sample: Callable[[VideoMetadata], Sequence[int]],
    name: str | None = None,
    shrink: Callable[[Image.Image], Image.Image] | None = None,
) -> tuple[list[Image.Image], list[int], VideoMetadata]:
    """Decode the frames `sample(metadata)` asks for. Returns (RGB frames, their frame numbers, metadata).

    `source` is a local path, or the bytes / a binary file object of a video (what URLs and data URLs become).
    `shrink` (e.g. ImageProcessor.shrink) is applied to each kept frame as soon as it is decoded, so only one frame
    at a time is held at the video's size.
    """
    import av  # here, not at the top: PyAV's FFmpeg libraries add ~16 MB to a process that never reads a video

    name = name or video_name(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with _open(source, name) as container:
            frame_pts, key_frames, metadata = _index(container, _video_stream(container, name), name)
        indices = [int(i) for i in sample(metadata)]  # sorted, unique, in range
        with _open(source, name) as container:  # a fresh demuxer: some streams (raw H.264) can't seek back
            frames = _decode(container, _video_stream(container, name), frame_pts, key_frames, indices, name,
                             (metadata.width, metadata.height), shrink or (lambda image: image))
    except av.FFmpegError as e:
        raise InputError(f"{name}: the video is damaged or truncated and can't be decoded ({_why(e)})") from e
    return frames, indices, metadata


def _why(e: Exception) -> str:  # an av.FFmpegError
    return e.strerror or type(e).__name__


def _open(source, name: str):
    import av

    if isinstance(source, io.IOBase):
        source.seek(0)
    try:
        container = av.open(source if not isinstance(source, os.PathLike) else os.fspath(source))
    except FileNotFoundError as e:
        raise InputError(f"Video file not found: {name}") from e
    except IsADirectoryError as e:
        raise InputError(f"{name} is a folder, not a video file") from e
    except (av.FFmpegError, OSError) as e:
        kind = _container_kind(source)
        if kind == "empty":
            raise InputError(f"{name} is empty (0 bytes), not a video") from e
        if kind:
            raise InputError(f"{name}: damaged or truncated {kind} file; FFmpeg can't read it ({_why(e)})") from e
        raise InputError(f"{name} is not a video file (FFmpeg can't read it: {_why(e)})") from e
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        container.close()
        raise InputError(f"{name} is an image ({container.format.name.removesuffix('_pipe')}), not a video; "
                         "send it as an image instead")
    return container


def _container_kind(source) -> str | None:
    try:
        if isinstance(source, io.IOBase):
            source.seek(0)
            head = source.read(16)
        else:
            with open(source, "rb") as f:
                head = f.read(16)
    except OSError:
        return None
    if not head:
        return "empty"
    return next((kind for kind, match in _CONTAINER_MAGIC.items() if match(head)), None)


def _video_stream(container, name: str):
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
        raise InputError(f"{name} has no video stream (it holds: {kinds})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads; decoding is bit-exact either way
    return stream


def _index(container, stream, name: str) -> tuple[list[int] | None, list[int], VideoMetadata]:
    """One demux pass: every frame's pts in presentation order, the frame numbers of keyframes, and the metadata.

    Timestamps are None for streams without them (raw elementary streams); those are decoded sequentially.
    """
    packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and not p.is_discard]
    total = len(packets)
    if total == 0:
        raise InputError(f"{name} has a video stream with zero frames")
    if stream.frames > total:
        raise InputError(f"{name} is truncated: its header says {stream.frames} frames but only {total} are in "
                         "the file")
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise InputError(f"{name}: the video stream has no frame rate")
    # duration from the exact fraction, as the reference computes it (frames / Fraction rate, then float)
    metadata = VideoMetadata(total, float(rate), float(total / rate), stream.codec_context.width,
                             stream.codec_context.height)
    if any(pts is None for pts, _ in packets):
        return None, [], metadata
    frame_pts = sorted(pts for pts, _ in packets)
    number = {pts: i for i, pts in enumerate(frame_pts)}
    key_frames = sorted(number[pts] for pts, key in packets if key)
    return frame_pts, key_frames, metadata


def _decode(container, stream, frame_pts, key_frames, indices, name, size: tuple[int, int],
            shrink) -> list[Image.Image]:
    """Decode frames `indices` (sorted frame numbers), seeking to the keyframe before each one when that skips work.
    Every kept frame must have the header's `size` (width, height), which the caller checked against its limits."""

    def rgb(frame, i: int) -> Image.Image:
        if (frame.width, frame.height) != size:
            raise InputError(f"{name}: frame {i} is {frame.width}x{frame.height} but the stream's header says "
                             f"{size[0]}x{size[1]}")
        return shrink(frame.to_image())

    decoded = container.decode(stream)
    if frame_pts is None:  # no timestamps: count frames from the start, as the reference does
        wanted, frames = set(indices), []
        for i, frame in enumerate(decoded):
            if i in wanted:
                frames.append(rgb(frame, i))
                if len(frames) == len(indices):
                    return frames
        raise InputError(f"{name} is truncated: frame {indices[len(frames)]} could not be decoded")

    number = {pts: i for i, pts in enumerate(frame_pts)}
    frames, position = [], -1  # position: number of the last frame the decoder gave
    for i in indices:
        key = key_frames[bisect_right(key_frames, i) - 1] if key_frames and key_frames[0] <= i else 0
        if position < key - 1:  # frame i's GOP starts past the next frame: skip ahead
            decoded = _seek(container, stream, frame_pts[key])
        frame = _advance(decoded, number, i)
        if frame is None:  # the seek landed after frame i (an index by decode time): decode from the start
            frame = _advance(_seek(container, stream, frame_pts[0]), number, i)
        if frame is None:
            raise InputError(f"{name} is truncated or damaged: frame {i} could not be decoded")
        position = i
        frames.append(rgb(frame, i))
    return frames


def _seek(container, stream, pts: int):
    container.seek(pts, stream=stream)  # to the keyframe at or before pts; flushes the decoder
    return container.decode(stream)


def _advance(decoded, number: dict[int, int], i: int):
    """Decode until frame number i and return it; None if the decoder passes it (or ends) without giving it."""
    for frame in decoded:
        n = number.get(frame.pts)
        if n is None:
            continue
        if n == i:
            return frame
        if n > i:
            return None
    return None
