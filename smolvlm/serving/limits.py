"""What one request may ask of the server. Each limit is a `smolvlm serve` option; a request over one gets a 4xx
error that names the limit and the option that raises it."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * MiB  # the whole JSON request (data: URLs included)
    max_images: int = 32  # image parts in one request (lmms-eval-style clients send a video as 8-32 frames)
    max_image_pixels: int = 7680 * 4320  # width x height of one image or video frame, read from headers before decoding
    max_request_pixels: int = 2**28  # decoded pixels of a request's images and kept video frames together (800 MB RGB)
    max_media_bytes: int = 20 * MiB  # one fetched (or data: URL) image or video, encoded
    max_video_seconds: float = 600.0  # duration of one video
    max_tokens: int = 4096  # the most tokens a request may ask to generate (and the default when it asks none)
    fetch_timeout: float = 10.0  # seconds for each network step of fetching one URL (connect, each read)
    allow_private_urls: bool = False  # fetch URLs on loopback, private and link-local addresses
    allow_file_urls: bool = False  # read file: URLs on the server's disk
    allow_control_tokens: bool = False  # let message text contain the tokenizer's special tokens (<end_of_utterance>...)
