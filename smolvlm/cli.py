"""The `smolvlm` command: `smolvlm generate`, `smolvlm chat` (and the subcommands other modules register).

A subcommand is a function `add(subparsers)` that adds its parser (with `model_options` / `sampling_options` if it
loads a model) and sets `run=handler(args) -> exit code`; list it in COMMANDS as "module:function". Building the
parser imports no torch (`smolvlm --help` answers at once): import heavy dependencies (torch, fastapi, peft...)
inside the handler. Check what is cheap to check (files, values) before loading the model. Errors a user can cause
(SmolVLMError) print one line on stderr and exit with code 1; argparse's usage errors exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import InputError, SmolVLMError

COMMANDS = [
    "smolvlm.cli:add_generate",
    "smolvlm.chat_cli:add_chat",
    "smolvlm.serving.cli:add_serve",
    "smolvlm.training.cli:add_finetune",
    "smolvlm.batch.cli:add_run_batch",
]

def model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --revision, --dtype, --quantize, --device: shared by every command that loads a model."""
    from .hub import DEFAULT_MODEL
    from .defaults import DEFAULT_CACHE_MB

    parser.add_argument("--model", "-m", default=os.environ.get("SMOLVLM_MODEL") or DEFAULT_MODEL,
                        help="checkpoint folder, hub repo id, or a LoRA adapter folder (its base model comes from its "
                             "adapter_config.json) (default: $SMOLVLM_MODEL or %(default)s)")
    parser.add_argument("--adapter", help="a LoRA adapter folder (smolvlm finetune's output) applied to --model")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    parser.add_argument("--quantize", choices=["int8"], help="int8: int8 text-decoder weights, faster CPU decoding")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")
    parser.add_argument("--cache-mb", type=positive(float, zero=True), default=DEFAULT_CACHE_MB,
                        help="memory for the image-feature and prompt (KV prefix) caches; 0 turns them off "
                             "(default: %(default)s)")


def positive(kind, zero: bool = False):
    """An argparse type: a number of `kind` above 0 (or 0 too, with `zero`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value >= 0 if zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} {'>=' if zero else '>'} 0, got {text!r}")
        return value

    return parse


def image_options(parser) -> None:
    """Image splitting and the resize before it (the checkpoint's preprocessor_config.json by default)."""
    parser.add_argument("--image-splitting", dest="do_image_splitting", action=argparse.BooleanOptionalAction,
                        help="--no-image-splitting: one tile per image instead of up to 17: much faster on a CPU, "
                             "less detail (default: the checkpoint's, on)")
    parser.add_argument("--image-longest-edge", type=positive(int), metavar="PIXELS",
                        help="resize images so their longest edge is this before tiling (default: the checkpoint's, "
                             "e.g. 1536 = up to 4x4 tiles of 384 + the global image)")


def media_options(parser: argparse.ArgumentParser) -> None:
    """Per-call processor settings: video frame sampling and image splitting."""
    parser.add_argument("--fps", type=positive(float),
                        help="video frames sampled per second (default: the checkpoint's, 1)")
    parser.add_argument("--max-frames", type=positive(int),
                        help="at most this many video frames (default: the checkpoint's, 64)")
    image_options(parser)


def image_overrides(args) -> dict:
    """The processor overrides of image_options (None: the checkpoint's)."""
    size = {"longest_edge": args.image_longest_edge} if args.image_longest_edge else None
    return dict(do_image_splitting=args.do_image_splitting, size=size)


def sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all, default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1 = off)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="drop tokens below this fraction of the likeliest one's probability (default: 0 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeats "
                                                                                 "(default: 1 = off)")
    parser.add_argument("--stop", action="append", default=[], help="stop before this text (repeat for several)")
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")
    parser.add_argument("--system", help="a system prompt before the conversation")


def constraint_options(parser: argparse.ArgumentParser) -> None:
    """Structured output: one of --json-schema, --regex, --choice."""
    parser.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid under this JSON schema file")
    parser.add_argument("--regex", help="the answer matches this regular expression (the whole answer)")
    parser.add_argument("--choice", action="append", dest="choices",
                        help="the answer is one of these strings (repeat: --choice yes --choice no)")


def _constraint(args) -> dict:
    if args.json_schema is None:
        return dict(regex=args.regex, choices=args.choices)
    try:
        schema = Path(args.json_schema).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--json-schema {args.json_schema}: can't read the file ({e})") from None
    try:
        return dict(json_schema=json.loads(schema), regex=args.regex, choices=args.choices)
    except json.JSONDecodeError as e:
        raise InputError(f"--json-schema {args.json_schema}: not valid JSON ({e})") from None


def add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="answer one prompt, streaming the answer to stdout")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt; '-' or none: read it from stdin")
    p.add_argument("--image", "-i", action="append", default=[], help="an image path or URL (repeat for several)")
    p.add_argument("--video", "-v", action="append", default=[],
                   help="a video path or URL (repeat for several; SmolVLM2 checkpoints only)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming: text, finish_reason, token counts, timings")
    model_options(p)
    sampling_options(p)
    media_options(p)
    constraint_options(p)
    p.set_defaults(run=run_generate)


def load_model(args):
    """The model of model_options: --model (a checkpoint or an adapter folder), with --adapter applied if given."""
    from .api import load

    return load(args.model, dtype=args.dtype, device=args.device, revision=args.revision, quantize=args.quantize,
                adapter=args.adapter, cache_mb=args.cache_mb)


def sampling_params(args) -> dict:
    """The generation parameters of sampling_options and media_options, checked (InputError) without the model."""
    from .generation import SamplingParams

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop=tuple(args.stop))
    SamplingParams(**sampling)
    return dict(sampling, fps=args.fps, max_frames=args.max_frames, **image_overrides(args))


def check_files(option: str, sources: list[str]) -> None:
    """A local path that is not there, named (with the option that gave it) before the model loads; URLs are
    fetched later."""
    for source in sources:
        if "://" not in source and not source.startswith("data:") and not Path(source).is_file():
            raise InputError(f"{option} {source}: file not found")


def messages(text: str, images: list[str] = (), videos: list[str] = (), system: str | None = None) -> list[dict]:
    """A conversation of one user turn (images, videos, then the text), after the system prompt if any."""
    media = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    turn = {"role": "user", "content": media + [{"type": "text", "text": text}]}
    return ([{"role": "system", "content": system}] if system else []) + [turn]


def print_stream(pieces) -> str:
    answer = ""
    for piece in pieces:
        answer += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return answer


def _prompt(args) -> str:
    if args.prompt != "-":
        return args.prompt
    if sys.stdin.isatty():
        raise InputError("no prompt: give it as an argument, or pipe it in (`echo 'Describe it' | smolvlm generate "
                         "-i photo.jpg`)")
    return sys.stdin.read().strip()


def run_generate(args) -> int:
    check_files("--image", args.image)
    check_files("--video", args.video)
    params, constraint = sampling_params(args), _constraint(args)
    conversation = messages(_prompt(args), args.image, args.video, args.system)
    start = time.perf_counter()
    vlm = load_model(args)
    if not args.json:
        print_stream(vlm.stream(conversation, **params, **constraint))
        return 0
    loaded, first, text = time.perf_counter(), None, ""
    for last in vlm.steps(conversation, **params, **constraint):
        if first is None:  # the prefill's step: it samples the first token
            first = time.perf_counter()
        text += last.text
    end = time.perf_counter()
    decode = end - first  # the other completion_tokens - 1 tokens
    print(json.dumps({
        "text": text, "finish_reason": last.finish_reason, "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "timings": {"load_s": round(loaded - start, 3), "time_to_first_token_s": round(first - loaded, 3),
                    "total_s": round(end - loaded, 3),
                    "decode_tokens_per_s": round((last.completion_tokens - 1) / decode, 2) if decode > 0 else None},
    }, ensure_ascii=False))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolvlm", description="Run the SmolVLM family of vision-language models.")
    parser.add_argument("--version", action="version", version=f"smolvlm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module, function = entry.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SmolVLMError as e:
        print(f"smolvlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`smolvlm generate ... | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush doesn't fail again
        return 141


if __name__ == "__main__":
    sys.exit(main())
