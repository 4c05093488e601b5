"""A validated chat-completions request -> the engine's inputs: the prompt (media fetched, checked, decoded and
tokenized) and the sampling parameters (with the request's constraint: structured.py).

`fetch_media` runs on the event loop (network I/O); `build_prompt` runs in a worker thread (decoding, resizing and
tokenizing take milliseconds to seconds and must block neither the event loop nor the engine loop). Media reach the
processor decoded (RGB images, sampled video frames), never as URLs or paths, so the processor never fetches or
opens anything a request names, and a bad image or video is reported with the request path of its part.
"""

from __future__ import annotations

import asyncio
import functools
import re
from io import BytesIO

from PIL import Image

from ..errors import InputError
from ..generation import Prompt, SamplingParams, prepare
from ..processing.images import load_image, to_rgb
from ..processing.video import Video, frame_processor, sample_frame_indices
from ..processing.video_decode import read_video
from .detail import image_options
from .fetch import Fetcher
from .limits import Limits
from .protocol import APIError, ChatCompletionRequest, ImagePart, TextPart, VideoPart
from .structured import grammar, history_content, tools_turn

ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def media_parts(request: ChatCompletionRequest) -> list[tuple[str, ImagePart | VideoPart]]:
    """(request path of the URL, part) for every image and video part, in order."""
    return [
        (f"messages[{i}].content[{j}].{part.type}.url", part)
        for i, message in enumerate(request.messages) if isinstance(message.content, list)
        for j, part in enumerate(message.content) if isinstance(part, (ImagePart, VideoPart))
    ]  # fmt: skip


def text_parts(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(request path, text) of every text in the messages."""
    texts = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            texts.append((f"messages[{i}].content", message.content))
        elif message.content is not None:
            texts += [(f"messages[{i}].content[{j}].text", part.text)
                      for j, part in enumerate(message.content) if isinstance(part, TextPart)]
        texts += [(f"messages[{i}].tool_calls[{k}].function.arguments", call.function.arguments)
                  for k, call in enumerate(message.tool_calls or [])]
    return texts


@functools.cache
def _control_tokens(tokenizer) -> re.Pattern:
    """A pattern matching the tokenizer's added tokens (<end_of_utterance>, <image>, <row_1_col_1>, ...): text that
    holds one is tokenized as that control token, not as text."""
    tokens = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)))


def check_text(processor, request: ChatCompletionRequest) -> None:
    """Refuse message text that holds a control token: the chat template renders the conversation as one text, so
    "<end_of_utterance>\nAssistant:" in a message would end the turn and forge the next one."""
    pattern = _control_tokens(processor.tokenizer)
    for where, text in text_parts(request):
        if m := pattern.search(text):
            raise APIError(f"{where}: the text holds the control token {m.group()!r} at character {m.start()}; this "
                           "server doesn't let request text contain the model's special tokens, which would forge "
                           "the conversation's structure (start it with --allow-control-tokens to allow them)", 400,
                           where, "control_token_in_text")


async def fetch_media(request: ChatCompletionRequest, fetcher: Fetcher, limits: Limits) -> dict[str, bytes]:
    """The bytes of every image and video part, by request path (all fetched at once, once every URL was checked:
    one bad URL fails the request before anything is fetched)."""
    parts = media_parts(request)
    images = sum(isinstance(part, ImagePart) for _, part in parts)
    if images > limits.max_images:
        raise APIError(f"The request holds {images} images; this server takes at most {limits.max_images} per request "
                       "(--max-images)", 400, "messages", "too_many_images")
    for where, part in parts:
        fetcher.check(_url(part), where)
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {where: group.create_task(fetcher.fetch(_url(part), where)) for where, part in parts}
    except* APIError as errors:
        raise errors.exceptions[0] from None
    return {where: task.result() for where, task in tasks.items()}


class PixelBudget:
    """The decoded pixels one request may hold (images and kept video frames together), charged from the media's
    headers before each is decoded."""

    def __init__(self, limits: Limits):
        self.left, self.limit = limits.max_request_pixels, limits.max_request_pixels

    def charge(self, pixels: int, where: str, what: str) -> None:
        self.left -= pixels
        if self.left < 0:
            raise APIError(f"{where}: {what} = {pixels} pixels brings the request's decoded media to "
                           f"{self.limit - self.left} pixels; this server decodes at most {self.limit} per request "
                           "(--max-request-pixels)", 400, where, "media_too_large")


def build_prompt(processor, request: ChatCompletionRequest, media: dict[str, bytes], limits: Limits,
                 image_cache=None) -> Prompt:
    """Check the text, check and decode the media, render the chat template and tokenize (in a worker thread);
    `image_cache` (Caches.images): pictures processed before are not tiled again."""
    if not limits.allow_control_tokens:
        check_text(processor, request)
    decoded, budget = {}, PixelBudget(limits)
    for where, part in media_parts(request):
        if isinstance(part, ImagePart):
            image = decode_image(media[where], where, limits, budget)
            decoded[where] = {"type": "image", "image": processor.image_processor.shrink(to_rgb(image, where))}
        else:
            decoded[where] = {"type": "video", "video": load_video(processor, media[where], where, limits, budget)}
    messages = tools_turn(request)
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            content = [
                {"type": "text", "text": part.text} if part.type == "text"
                else decoded[f"messages[{i}].content[{j}].{part.type}.url"]
                for j, part in enumerate(content)
            ]  # fmt: skip
        messages.append({"role": ROLES.get(message.role, message.role), "content": history_content(message, content)})
    try:
        return prepare(processor, messages, image_cache=image_cache, **image_options(request))
    except InputError as e:
        raise APIError(str(e), 400, "messages") from None


def decode_image(data: bytes, where: str, limits: Limits, budget: PixelBudget) -> Image.Image:
    """The RGB image, decoded as the processor decodes encoded images (`load_image`), once its header showed an
    image Pillow knows of at most max_image_pixels, within the request's budget."""
    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception:  # Pillow raises many kinds for data that is not an image
        raise APIError(f"{where}: not an image (Pillow can't identify the {len(data)} bytes)", 400, where,
                       "invalid_image") from None
    if width is None or width * height > limits.max_image_pixels:
        size = f"{width}x{height} = {width * height} pixels" if width else "too many pixels to open safely"
        raise APIError(f"{where}: the image is {size}; this server takes at most {limits.max_image_pixels} pixels "
                       "(--max-image-pixels)", 400, where, "image_too_large")
    budget.charge(width * height, where, f"the image's {width}x{height}")
    try:
        return load_image(data)
    except InputError as e:
        raise APIError(f"{where}: {e}", 400, where, "invalid_image") from None


def load_video(processor, data: bytes, where: str, limits: Limits, budget: PixelBudget) -> Video:
    """Decode the frames the processor's video sampling keeps, after checking the video's length, frame size and
    kept pixels against the limits (from the header and the demux pass, before decoding any frame)."""
    sampling = processor.video_sampling

    def frames_to_keep(metadata):
        if metadata.duration > limits.max_video_seconds:
            raise APIError(f"{where}: the video lasts {metadata.duration:.1f} s; this server takes at most "
                           f"{limits.max_video_seconds:g} s (--max-video-seconds)", 400, where, "video_too_long")
        pixels = metadata.width * metadata.height
        if pixels > limits.max_image_pixels:
            raise APIError(f"{where}: the video's frames are {metadata.width}x{metadata.height} = {pixels} pixels; "
                           f"this server takes at most {limits.max_image_pixels} pixels per frame "
                           "(--max-image-pixels)", 400, where, "video_too_large")
        indices = sample_frame_indices(metadata, sampling.fps, sampling.max_frames)
        budget.charge(len(indices) * pixels, where, f"{len(indices)} frames of {metadata.width}x{metadata.height}")
        return indices

    try:  # each kept frame is shrunk as it is decoded, as the processor would resize it
        frames, indices, metadata = read_video(data, frames_to_keep, where, frame_processor(processor).shrink)
    except InputError as e:
        raise APIError(str(e), 400, where, "invalid_video") from None
    return Video(frames, indices, metadata)


def sampling_params(request: ChatCompletionRequest, prompt_tokens: int, context: int, limits: Limits) -> SamplingParams:
    """The request's sampling settings. Greedy unless `temperature` > 0 (the checkpoints' generation config and the
    Python API default; OpenAI's default is 1). Without max_tokens, the answer may fill the context (up to
    limits.max_tokens)."""
    if prompt_tokens >= context:
        raise APIError(f"This model's maximum context length is {context} tokens, but the messages hold "
                       f"{prompt_tokens} tokens. Please shorten the messages (or images/videos).", 400, "messages",
                       "context_length_exceeded")
    wanted = request.requested_tokens
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if wanted is not None:  # above the server's cap: clamped, as vLLM does (finish_reason "length" says so)
        wanted = min(wanted, limits.max_tokens)
    if wanted is not None and prompt_tokens + wanted > context:
        raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the "
                       f"completion). Please reduce the length of the messages or the completion.", 400, param,
                       "context_length_exceeded")
    stop = request.stop if request.stop is not None else ()
    try:
        return SamplingParams(
            max_new_tokens=wanted or min(limits.max_tokens, context - prompt_tokens),
            temperature=request.temperature or 0.0,
            top_p=request.top_p if request.top_p is not None else 1.0,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            repetition_penalty=request.repetition_penalty or 1.0,
            seed=request.seed,
            stop=stop,
            grammar=grammar(request),
        )
    except InputError as e:
        raise APIError(str(e), 400) from None


def _url(part: ImagePart | VideoPart) -> str:
    return part.image_url.url if isinstance(part, ImagePart) else part.video_url.url
