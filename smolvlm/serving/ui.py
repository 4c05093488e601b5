"""The browser chat page (`smolvlm serve` serves it at `/`; `--no-ui` turns the page off) and two read-only API
routes it uses to show what the model sees:

- GET /v1/smolvlm/processor: the image and video settings the server's processor uses (tile side, longest edge,
  splitting, image tokens per tile, video sampling) and the request limits. The page tiles an attached image with the
  processor's own arithmetic (web/app.js `tiling`, a port of image_processor.py's geometry).
- POST /v1/smolvlm/video-frames (the video file as the body): the frames the processor samples, their timestamps and
  small thumbnails, decoded exactly as a chat request decodes the video (inputs.load_video).

The page is static files (web/: plain HTML, CSS and JavaScript, no build step, nothing fetched from elsewhere) held
in memory. It talks to /v1/chat/completions like any client; nothing here runs on the API's request path.
"""

from __future__ import annotations

import asyncio
import base64
from io import BytesIO
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..processing.image_processor import MAX_IMAGE_SIZE
from .inputs import PixelBudget, load_video
from .limits import Limits
from .protocol import APIError

WEB = Path(__file__).parent / "web"
ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
THUMBNAIL_SIDE = 96  # longest edge of a sampled frame's preview, pixels


def processor_settings(processor, limits: Limits, context: int) -> dict:
    """What the page needs to predict a request's image tiles and tokens, and the limits it will meet."""
    ip, video = processor.image_processor, processor.video_sampling
    return {
        "do_resize": ip.do_resize,
        "size": ip.size,  # {"longest_edge": N} or {"height": H, "width": W}
        "max_resize": MAX_IMAGE_SIZE,  # the first resize's long side is capped here
        "max_image_size": ip.max_image_size,  # the tile side
        "do_image_splitting": ip.do_image_splitting,
        "image_seq_len": processor.image_seq_len,  # <image> tokens per tile (and per video frame)
        "video": None if processor.family != "smolvlm" else {
            "fps": video.fps, "max_frames": video.max_frames, "video_size": video.video_size},
        "limits": {"max_images": limits.max_images, "max_image_pixels": limits.max_image_pixels,
                   "max_media_bytes": limits.max_media_bytes, "max_video_seconds": limits.max_video_seconds,
                   "max_tokens": limits.max_tokens, "context": context},
    }  # fmt: skip


def video_frames(processor, data: bytes, limits: Limits) -> dict:
    """The sampled frames of a video (as a chat request would decode them) with their times and JPEG thumbnails."""
    if processor.family != "smolvlm":
        raise APIError("Videos need a SmolVLM2 checkpoint; this server's model is SmolVLM v1 (idefics3)", 400, None,
                       "invalid_video")
    video = load_video(processor, data, "video", limits, PixelBudget(limits))
    frames = []
    for index, time, frame in zip(video.indices, video.timestamps, video.frames):
        thumbnail = frame.copy()
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = BytesIO()
        thumbnail.convert("RGB").save(buffer, format="JPEG", quality=80)
        frames.append({"index": index, "time": time,
                       "thumbnail": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()})
    meta = video.metadata
    return {"fps": meta.fps, "total_frames": meta.total_num_frames, "duration": meta.duration, "width": meta.width,
            "height": meta.height, "frames": frames, "image_tokens": len(frames) * processor.image_seq_len}


def router(processor, limits: Limits, context: int, authorize, read_body, page: bool = True) -> APIRouter:
    """The routes above; `authorize` guards the API ones as every /v1 route, `read_body(request, limit, option)`
    reads a size-capped body. The page itself loads without the API key (it asks for one on a 401)."""
    routes = APIRouter()
    settings = processor_settings(processor, limits, context)

    @routes.get("/v1/smolvlm/processor", dependencies=[Depends(authorize)])
    async def processor_info() -> dict:
        return settings

    @routes.post("/v1/smolvlm/video-frames", dependencies=[Depends(authorize)])
    async def sampled_frames(request: Request) -> dict:
        data = await read_body(request, limits.max_media_bytes, "--max-media-mb")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(request.app.state.media_pool, video_frames, processor, data, limits)

    if page:
        files = {name: (WEB / name).read_bytes() for name in [*ASSETS, "index.html"]}
        headers = {"Cache-Control": "no-cache"}

        @routes.get("/", include_in_schema=False)
        async def index() -> Response:
            return Response(files["index.html"], media_type="text/html", headers=headers)

        for name, media_type in ASSETS.items():
            routes.add_api_route(f"/ui/{name}", _asset(files[name], media_type, headers), include_in_schema=False)
    return routes


def _asset(data: bytes, media_type: str, headers: dict):
    async def asset() -> Response:
        return Response(data, media_type=media_type, headers=headers)

    return asset
