"""`smolvlm run-batch`: an offline batch job over an OpenAI Batch JSONL file or a folder/glob/list of images, on this
machine (runner.py) or on a Ray cluster (ray.py). Registered in smolvlm/cli.py COMMANDS."""

from __future__ import annotations

import os
import sys

from ..errors import InputError
from ..serving.limits import MiB, Limits

DEFAULTS = Limits()
MAX_EXIT = 100  # exit code = failed items, capped (exit codes wrap at 256)
SHORT_FORM = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


def add_run_batch(subparsers) -> None:
    from ..cli import media_options, model_options, positive, sampling_options

    p = subparsers.add_parser(
        "run-batch", help="answer a file of OpenAI Batch requests, or one prompt over many images (resumable)",
        description="Resumable: run the same command again after a crash or kill and only the items missing from "
                    "OUTPUT are run. Exit code: the number of failed items (capped at 100), 0 when all succeeded.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-i", help="OpenAI Batch JSONL: one {custom_id, method, url, body} per line")
    source.add_argument("--images", nargs="+", metavar="PATTERN",
                        help="image/video files: folders, globs ('photos/**/*.jpg'), .txt lists of paths, paths")
    p.add_argument("--prompt", help="the prompt for every --images file")
    p.add_argument("--output", "-o", required=True,
                   help="results: .jsonl (OpenAI Batch output lines) or .parquet (flat columns); with --ray a folder")
    model_options(p)
    p.add_argument("--served-model-name", help="the model name in the results (default: --model)")
    d = " (default: %(default)s)"
    p.add_argument("--max-batch", type=positive(int), default=16, help="requests decoded together" + d)
    p.add_argument("--max-model-len", type=positive(int), default=2048,
                   help="context of each batch slot, prompt + answer; longer requests fail" + d)
    p.add_argument("--workers", type=positive(int), default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes decoding and resizing images ahead of the engine" + d)
    sampling_group = p.add_argument_group("the --images requests (JSONL bodies carry their own)")
    sampling_options(sampling_group, max_new_tokens=256)
    media_options(p)
    p.add_argument("--max-tokens", type=positive(int), default=DEFAULTS.max_tokens,
                   help="most tokens one request may generate (the default for bodies that ask for none)" + d)
    p.add_argument("--max-images", type=positive(int), default=DEFAULTS.max_images, help="images per request" + d)
    p.add_argument("--max-image-pixels", type=positive(int), default=DEFAULTS.max_image_pixels,
                   help="width x height of one image" + d)
    p.add_argument("--max-media-mb", type=positive(float), default=DEFAULTS.max_media_bytes / MiB,
                   help="size of one image or video file (or data: URL)" + d)
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let requests fetch loopback, private and link-local http(s) addresses")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run through Ray Data on the cluster at ADDRESS (host:6379, ray://host:10001; default: "
                        "$RAY_ADDRESS or the cluster `ray start` made here, else a new local one); OUTPUT is then a "
                        "folder; needs pip install 'smolvlm[ray]'")
    p.add_argument("--concurrency", type=positive(int), default=1,
                   help="with --ray: engine replicas (actors), one model each" + d)
    p.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per replica" + d)
    p.set_defaults(run=run_batch, short_defaults={n: p.get_default(n) for n in SHORT_FORM})


def short_form_fields(args) -> dict:
    """The body fields of the --images requests; refuses those options with --input, whose bodies set them."""
    if args.input is not None:
        given = [n for n in SHORT_FORM if getattr(args, n) != args.short_defaults[n]]
        if given or args.prompt is not None:
            options = ", ".join("--" + n.replace("_", "-") for n in given + (["prompt"] if args.prompt else []))
            raise InputError(f"{options}: only for --images; with --input each request's body sets these")
        return {}
    if not args.prompt:
        raise InputError("--images needs --prompt (the question asked of every file)")
    return {field: getattr(args, name) for name, field in SHORT_FORM.items() if getattr(args, name) is not None}


def run_batch(args) -> int:
    from .files import count_lines, media_files, media_requests, read_requests

    fields = short_form_fields(args)
    limits = Limits(max_images=args.max_images, max_image_pixels=args.max_image_pixels, max_tokens=args.max_tokens,
                    max_media_bytes=int(args.max_media_mb * MiB), allow_private_urls=args.allow_private_urls,
                    allow_file_urls=True)
    options = dict(do_image_splitting=args.do_image_splitting, fps=args.fps, max_frames=args.max_frames)
    model_name = args.served_model_name or str(args.model)
    if args.ray is not None:
        from .ray import run_on_ray

        return run_on_ray(args, fields, limits, options, model_name)
    if args.input is not None:
        items, total = read_requests(args.input), count_lines(args.input)
    else:
        items, total = media_requests(args.images, args.prompt, fields), sum(1 for _ in media_files(args.images))
    return run_local(args, items, total, limits, options, model_name)


def run_local(args, items, total, limits, options, model_name) -> int:
    from ..api import load
    from .files import write_parquet
    from .journal import Journal
    from .runner import run

    parquet = args.output.endswith(".parquet")
    journal = Journal(args.output + ".journal.jsonl" if parquet else args.output)
    try:
        vlm = load(args.model, dtype=args.dtype, device=args.device, revision=args.revision, quantize=args.quantize,
                   adapter=args.adapter)
        summary = run(vlm, items, journal, model_name=model_name, limits=limits, context=args.max_model_len,
                      max_batch=args.max_batch, workers=args.workers, options=options, total=total)
        if parquet:
            write_parquet(journal.records(), args.output)
    finally:
        journal.close()
    print(summary.lines(), file=sys.stderr)
    failed = journal.failed + summary.duplicates
    where = f"{args.output} (resume journal: {journal.path})" if parquet else args.output
    print(f"{where}: {len(journal.done)} results, {failed} failed", file=sys.stderr)
    return min(failed, MAX_EXIT)
