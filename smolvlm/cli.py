"""The `smolvlm` command: `smolvlm generate`, `smolvlm chat` (and the subcommands other modules register).

A subcommand is a function `add(subparsers)` that adds its parser (with `model_options` / `sampling_options` if it
loads a model) and sets `run=handler(args) -> exit code`; list it in COMMANDS as "module:function". Import heavy
dependencies (fastapi, peft...) inside the handler, so other commands don't pay for them. Errors a user can cause
(SmolVLMError) print one line on stderr and exit with code 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .errors import InputError, SmolVLMError

COMMANDS = [
    "smolvlm.cli:add_generate",
    "smolvlm.cli:add_chat",
    "smolvlm.serving.cli:add_serve",
    "smolvlm.training.cli:add_finetune",
]

CHAT_HELP = ("/image PATH or /video PATH attaches a file to your next message, /reset clears the history, "
             "/quit exits")


def model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --revision, --dtype, --quantize, --device: shared by every command that loads a model."""
    from .api import DEFAULT_MODEL

    parser.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help="checkpoint folder or hub repo id (default: %(default)s)"
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own)")
    parser.add_argument("--quantize", choices=["int8"], help="int8: int8 text-decoder weights, faster CPU decoding")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available, else cpu)")


def media_options(parser: argparse.ArgumentParser) -> None:
    """Per-call processor settings: video frame sampling and image splitting."""
    parser.add_argument("--fps", type=float, help="video frames sampled per second (default: the checkpoint's, 1)")
    parser.add_argument("--max-frames", type=int, help="at most this many video frames (default: the checkpoint's, 64)")
    parser.add_argument("--no-image-splitting", dest="do_image_splitting", action="store_false", default=None,
                        help="one tile per image instead of up to 17: much faster on a CPU, less detail")


def sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int = 512) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="makes sampling reproducible")


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
    p.add_argument("prompt")
    p.add_argument("--image", "-i", action="append", default=[], help="an image path or URL (repeat for several)")
    p.add_argument("--video", "-v", action="append", default=[],
                   help="a video path or URL (repeat for several; SmolVLM2 checkpoints only)")
    model_options(p)
    sampling_options(p)
    media_options(p)
    constraint_options(p)
    p.set_defaults(run=run_generate)


def add_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", help=f"multi-turn chat in the terminal ({CHAT_HELP})")
    model_options(p)
    sampling_options(p)
    media_options(p)
    p.set_defaults(run=run_chat)


def _load(args):
    from .api import load

    return load(args.model, dtype=args.dtype, device=args.device, revision=args.revision, quantize=args.quantize)


def _params(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                fps=args.fps, max_frames=args.max_frames, do_image_splitting=args.do_image_splitting)


def _user(text: str, images: list[str], videos: list[str] = ()) -> dict:
    media = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    return {"role": "user", "content": media + [{"type": "text", "text": text}]}


def _print_stream(pieces) -> str:
    answer = ""
    for piece in pieces:
        answer += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return answer


def run_generate(args) -> int:
    vlm = _load(args)
    _print_stream(vlm.stream([_user(args.prompt, args.image, args.video)], **_params(args), **_constraint(args)))
    return 0


def run_chat(args) -> int:
    vlm = _load(args)
    tty = sys.stdin.isatty()
    if tty:
        print(f"Chatting with {args.model}: {CHAT_HELP}.", file=sys.stderr)
    history: list[dict] = []
    media: dict[str, list[str]] = {"image": [], "video": []}  # attached to the next message
    while True:
        try:
            line = input("> " if tty else "")
        except EOFError:
            return 0
        line = line.strip()
        command = line.split(maxsplit=1)[0] if line.startswith("/") else ""
        if command == "/quit":
            return 0
        if command == "/reset":
            history, media = [], {"image": [], "video": []}
            print("(history cleared)", file=sys.stderr)
        elif command in ("/image", "/video"):
            kind, path = command[1:], line[len(command) :].strip()
            if path:
                media[kind].append(path)
                print(f"({kind} {path} attached to your next message)", file=sys.stderr)
            else:
                print(f"usage: {command} PATH", file=sys.stderr)
        elif command:
            print(f"unknown command {command}: {CHAT_HELP}", file=sys.stderr)
        elif line:
            turn = _user(line, media["image"], media["video"])
            try:
                answer = _print_stream(vlm.stream(history + [turn], **_params(args)))
            except SmolVLMError as e:  # e.g. an unreadable image: say so and keep chatting without that turn
                print(f"smolvlm: error: {e}", file=sys.stderr)
            else:
                history += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]}]
            media = {"image": [], "video": []}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolvlm", description="Run the SmolVLM family of vision-language models.")
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
