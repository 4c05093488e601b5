"""OpenAI's `image_url.detail` -> the processor's image splitting for a request.

"low": one tile per image (the resized global image, as the processor's no-splitting setting makes it: 64 tokens on
the 256M/500M models, about a second of vision on a CPU); "high": the checkpoint's tiling (up to 17 tiles); "auto"
or none: the server's default (`smolvlm serve --image-splitting/--no-image-splitting`, the checkpoint's unless set).
Splitting is a per-request setting of the processor, so the images of one request must agree.
"""

from __future__ import annotations

from .protocol import APIError, ChatCompletionRequest, ImagePart

SPLITTING = {"low": False, "high": True}  # "auto": the server's default


def image_options(request: ChatCompletionRequest) -> dict:
    """The processor overrides the request's `detail` hints ask for ({} for the server's defaults)."""
    wanted = {
        part.image_url.detail for message in request.messages if isinstance(message.content, list)
        for part in message.content if isinstance(part, ImagePart) and part.image_url.detail in SPLITTING
    }  # fmt: skip
    if len(wanted) > 1:
        raise APIError("The images of one request must share one detail ('low' or 'high'): image splitting is a "
                       "per-request setting here", 400, "messages", "invalid_detail")
    return {"do_image_splitting": SPLITTING[wanted.pop()]} if wanted else {}
