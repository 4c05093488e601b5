"""Helpers for the fine-tuning tests: JSONL writing and a small set of conversations covering the chat format."""

import argparse
import json
from pathlib import Path

from smolvlm.training.cli import add_finetune


def write_jsonl(path: Path, records: list) -> Path:
    """One JSON value per line (strings are written as they are, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def user(text: str, *images: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "path": i} for i in images] + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def conversations() -> list[dict]:
    """Records covering the chat format: images of several sizes (split into different tile grids), string content,
    a system turn, two assistant turns, an image after text, and no image at all."""
    return [
        {"messages": [user("What colour is this?", "imgs/red.png"), assistant("Red.")]},
        {"messages": [{"role": "system", "content": "Answer in one word."},
                      {"role": "user", "content": "Hello"},
                      assistant("Hi there"),
                      user("And these two?", "imgs/wide.png", "imgs/tall.png"),
                      {"role": "assistant", "content": "Green and blue"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image", "image": "imgs/red.png"}]},
                      assistant("A red square.")]},
        {"messages": [{"role": "user", "content": "Count to three."}, assistant("1 2 3")]},
    ]


def finetune_cli(*argv: str) -> int:
    """`smolvlm finetune ARGV` in this process (the subcommand as smolvlm/cli.py registers it)."""
    parser = argparse.ArgumentParser()
    add_finetune(parser.add_subparsers())
    args = parser.parse_args(["finetune", *argv])
    return args.run(args)
