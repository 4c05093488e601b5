"""`smolvlm serve`: the OpenAI-compatible HTTP server (registered in smolvlm/cli.py COMMANDS as
"smolvlm.serving.cli:add_serve")."""

from __future__ import annotations

import argparse
import os

from .limits import MiB, Limits

DEFAULTS = Limits()


def positive(kind):
    """An argparse type: a number of `kind` above 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} > 0, got {text!r}")
        return value

    return parse


def add_serve(subparsers) -> None:
    from ..cli import model_options

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions)")
    model_options(p)
    d = " (default: %(default)s)"
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface" + d)
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SMOLVLM_API_KEY)")
    p.add_argument("--served-model-name", help="the model name clients send and see (default: --model)")
    p.add_argument("--max-batch", type=positive(int), default=8, help="requests decoded together (KV-cache slots)" + d)
    p.add_argument("--max-model-len", type=positive(int),
                   help="context of each slot, prompt + answer (default: the model's, at most 8192)")
    p.add_argument("--max-tokens", type=positive(int), default=DEFAULTS.max_tokens,
                   help="most tokens one request may generate (also the default when it asks for none)" + d)
    p.add_argument("--max-images", type=positive(int), default=DEFAULTS.max_images, help="images per request" + d)
    p.add_argument("--max-image-pixels", type=positive(int), default=DEFAULTS.max_image_pixels,
                   help="width x height of one image" + d)
    p.add_argument("--max-video-seconds", type=positive(float), default=DEFAULTS.max_video_seconds,
                   help="length of one video" + d)
    p.add_argument("--max-body-mb", type=positive(float), default=DEFAULTS.max_body_bytes / MiB,
                   help="size of a request body" + d)
    p.add_argument("--max-media-mb", type=positive(float), default=DEFAULTS.max_media_bytes / MiB,
                   help="size of one fetched or data: URL image or video" + d)
    p.add_argument("--fetch-timeout", type=positive(float), default=DEFAULTS.fetch_timeout,
                   help="seconds allowed to fetch one image or video URL, redirects included" + d)
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let requests make the server fetch loopback, private and link-local addresses")
    p.add_argument("--allow-file-urls", action="store_true", help="let requests read file: URLs on the server")
    p.add_argument("--shutdown-timeout", type=positive(float), default=30.0,
                   help="on Ctrl-C / SIGTERM, seconds in-flight requests get to finish before they are cancelled" + d)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level" + d)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from ..api import load
    from .server import create_app

    limits = Limits(
        max_body_bytes=int(args.max_body_mb * MiB),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_media_bytes=int(args.max_media_mb * MiB),
        max_video_seconds=args.max_video_seconds,
        max_tokens=args.max_tokens,
        fetch_timeout=args.fetch_timeout,
        allow_private_urls=args.allow_private_urls,
        allow_file_urls=args.allow_file_urls,
    )
    api_key = args.api_key or os.environ.get("SMOLVLM_API_KEY") or None
    vlm = load(args.model, dtype=args.dtype, device=args.device, revision=args.revision, quantize=args.quantize)
    app = create_app(vlm, args.served_model_name or str(args.model), limits, args.max_batch, args.max_model_len,
                     api_key)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    uvicorn.Server(config).run()
    return 0
