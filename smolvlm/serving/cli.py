"""`smolvlm serve`: the OpenAI-compatible HTTP server (registered in smolvlm/cli.py COMMANDS as
"smolvlm.serving.cli:add_serve").

Container deployments set options through the environment: SMOLVLM_MODEL, SMOLVLM_HOST, SMOLVLM_PORT,
SMOLVLM_API_KEY, SMOLVLM_SERVED_MODEL_NAME, SMOLVLM_ALLOWED_ORIGINS (a flag given on the command line wins).
"""

from __future__ import annotations

import argparse
import logging
import os

from .limits import MiB, Limits

DEFAULTS = Limits()


def add_serve(subparsers) -> None:
    from ..cli import image_options, model_options, positive

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions)")
    model_options(p)
    d = " (default: %(default)s)"
    env = os.environ.get
    p.add_argument("--host", default=env("SMOLVLM_HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 = every interface (default: $SMOLVLM_HOST or %(default)s)")
    p.add_argument("--port", type=int, default=env("SMOLVLM_PORT", "8000"),  # argparse applies type to a str default
                   help="default: $SMOLVLM_PORT or %(default)s")
    p.add_argument("--api-key", default=env("SMOLVLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SMOLVLM_API_KEY)")
    p.add_argument("--served-model-name", default=env("SMOLVLM_SERVED_MODEL_NAME") or None,
                   help="the model name clients send and see (default: $SMOLVLM_SERVED_MODEL_NAME or --model)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="also serve these LoRA adapters of --model, each as its own model name (requests choose by "
                        "'model'); each is merged into its own copy of the weights (memory: one model per adapter)")
    p.add_argument("--allowed-origins", default=env("SMOLVLM_ALLOWED_ORIGINS", ""), metavar="ORIGINS",
                   help="comma-separated origins browsers may call the API from (CORS), or * for any "
                        "(default: $SMOLVLM_ALLOWED_ORIGINS or none)")
    image_options(p)
    p.add_argument("--max-batch", type=positive(int), default=8, help="requests decoded together (KV-cache slots)" + d)
    p.add_argument("--max-model-len", type=positive(int),
                   help="context of each slot, prompt + answer (default: the model's, at most 8192)")
    p.add_argument("--max-tokens", type=positive(int), default=DEFAULTS.max_tokens,
                   help="most tokens one request may generate: a larger max_tokens is clamped to it (also the default "
                        "when a request asks for none)" + d)
    p.add_argument("--max-images", type=positive(int), default=DEFAULTS.max_images,
                   help="images per request (video frames sent as images count)" + d)
    p.add_argument("--max-image-pixels", type=positive(int), default=DEFAULTS.max_image_pixels,
                   help="width x height of one image or video frame" + d)
    p.add_argument("--max-request-pixels", type=positive(int), default=DEFAULTS.max_request_pixels,
                   help="decoded pixels of one request's images and kept video frames together" + d)
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
    p.add_argument("--allow-control-tokens", action="store_true",
                   help="let message text contain the tokenizer's special tokens (e.g. <end_of_utterance>), which "
                   "then act as control tokens and can forge turns; by default such text is refused (400)")
    p.add_argument("--shutdown-timeout", type=positive(float), default=30.0,
                   help="on Ctrl-C / SIGTERM, seconds in-flight requests get to finish; those still running then "
                   "end with a 503 / a final error event" + d)
    p.add_argument("--no-ui", dest="page", action="store_false",
                   help="don't serve the browser chat page at / (the API is the same either way)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level" + d)
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    import uvicorn
    from fastapi.middleware.cors import CORSMiddleware

    from ..adapters import is_adapter
    from ..api import load
    from ..cli import image_overrides
    from ..errors import InputError
    from .adapters import Router
    from .metrics import ServerMetrics
    from .server import create_app

    lora = dict(module.partition("=")[::2] for module in args.lora_modules)
    for module, (name, path) in zip(args.lora_modules, lora.items()):
        if not name or not path or not is_adapter(path):
            raise InputError(f"--lora-modules {module}: expected NAME=PATH with PATH a LoRA adapter folder "
                             "(holding adapter_config.json)")
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * MiB),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_media_bytes=int(args.max_media_mb * MiB),
        max_video_seconds=args.max_video_seconds,
        max_tokens=args.max_tokens,
        fetch_timeout=args.fetch_timeout,
        allow_private_urls=args.allow_private_urls,
        allow_file_urls=args.allow_file_urls,
        allow_control_tokens=args.allow_control_tokens,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(dtype=args.dtype, device=args.device, revision=args.revision, quantize=args.quantize,
                   cache_mb=args.cache_mb)
    models = {args.served_model_name or str(args.model): load(args.model, adapter=args.adapter, **options)}
    models.update({name: load(args.model, adapter=path, **options) for name, path in lora.items()})
    metrics = ServerMetrics()
    apps = {}
    for name, vlm in models.items():  # the server's image defaults (a request's image detail may override them)
        vlm.processor.image_processor = vlm.processor.image_processor.with_overrides(**image_overrides(args))
        apps[name] = create_app(vlm, name, limits, args.max_batch, args.max_model_len, args.api_key, metrics,
                                 args.page)
    app = apps[next(iter(apps))] if len(apps) == 1 else Router(apps, limits.max_body_bytes)
    origins = [o.strip() for o in args.allowed_origins.split(",") if o.strip()]
    if origins:  # answers browsers' preflight OPTIONS requests, and marks the answers they may read
        app = CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    timeout = args.shutdown_timeout

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # End what can't finish a little before uvicorn cancels it, so its 503 / final event still goes out.
            for each in apps.values():
                each.state.drain(max(0.0, timeout - min(0.5, timeout / 4)))
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=timeout)
    Server(config).run()
    return 0
