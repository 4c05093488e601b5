"""`smolvlm chat`: a multi-turn chat in the terminal (registered in smolvlm/cli.py COMMANDS).

Lines are read with readline (arrow keys, in-session history) on a terminal, or plainly from a pipe. Ctrl-C while
an answer streams stops that answer at the next token (its request is aborted; the partial answer stays in the
history); Ctrl-C or Ctrl-D at the prompt quits. Attached files are checked when attached, so a bad one is named at
once and never becomes part of the history.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import closing
from pathlib import Path

from .cli import (check_files, load_model, media_options, model_options, print_stream, sampling_options,
                  sampling_params)
from .errors import InputError, SmolVLMError

HELP = """/image PATH   attach an image to your next message
/video PATH   attach a video to your next message (a conversation holds images or videos, not both)
/system TEXT  set the system prompt (/system alone clears it)
/save FILE    write the conversation as JSON ({"messages": [...]}, the format smolvlm finetune reads)
/reset        clear the history (the system prompt stays)
/help         this help
/quit         exit (or Ctrl-D); Ctrl-C stops an answer"""


def add_chat(subparsers) -> None:
    p = subparsers.add_parser("chat", help="multi-turn chat in the terminal (/help lists its commands)")
    model_options(p)
    sampling_options(p)
    media_options(p)
    p.set_defaults(run=run_chat)


class Chat:
    """The conversation: system prompt, turns so far, and the files attached to the next message."""

    def __init__(self, system: str | None):
        self.system = system
        self.history: list[dict] = []
        self.attached: list[tuple[str, str]] = []  # (kind, path) for the next message

    def messages(self, text: str) -> list[dict]:
        """The conversation with `text` (and the attachments) as the next user turn."""
        media = [{"type": kind, kind: path} for kind, path in self.attached]
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": media + [{"type": "text", "text": text}]}]

    def kinds(self) -> set[str]:
        """The kinds of media (image, video) in the history and the attachments."""
        found = {kind for kind, _ in self.attached}
        for turn in self.history:
            found.update(block["type"] for block in turn["content"] if block["type"] != "text")
        return found

    def attach(self, kind: str, path: str) -> None:
        """Check the file now (it exists, an image decodes; a conversation holds one kind of media)."""
        check_files(f"/{kind}", [path])
        other = {"image": "video", "video": "image"}[kind]
        if other in self.kinds():
            raise InputError(f"this conversation holds {other}s; SmolVLM takes images or videos in one conversation, "
                             f"not both: /reset first to attach a {kind}")
        if kind == "image":
            from .processing.images import load_image

            load_image(path)
        self.attached.append((kind, path))

    def save(self, path: str) -> None:
        try:
            Path(path).write_text(json.dumps({"messages": self.messages("")[:-1]}, ensure_ascii=False, indent=1),
                                  encoding="utf-8")
        except OSError as e:
            raise InputError(f"/save {path}: can't write the file ({e.strerror})") from None


def answer(vlm, messages: list[dict], params: dict) -> str:
    """Stream the answer; Ctrl-C stops it after the current step (the model is never interrupted mid-step)."""
    stop = []

    def until_stopped():
        with closing(vlm.stream(messages, **params)) as pieces:  # closing it aborts the request
            for piece in pieces:
                if stop:
                    return
                yield piece

    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    try:
        text = print_stream(until_stopped())
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop:
        print("(answer stopped)", file=sys.stderr)
    return text


def run_chat(args) -> int:
    params = sampling_params(args)  # bad values: refused before the model loads
    chat = Chat(args.system)
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (input() then edits lines and keeps their history)
    vlm = load_model(args)
    if tty:
        print(f"Chatting with {args.model}. /help lists the commands.", file=sys.stderr)
    while True:
        try:
            line = input("> " if tty else "").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        command, _, rest = line.partition(" ") if line.startswith("/") else ("", "", "")
        rest = rest.strip()
        try:
            if command == "/quit":
                return 0
            if command == "/help":
                print(HELP, file=sys.stderr)
            elif command == "/reset":
                chat.history, chat.attached = [], []
                print("(history cleared)", file=sys.stderr)
            elif command == "/system":
                chat.system = rest or None
                print(f"(system prompt {'set' if rest else 'cleared'})", file=sys.stderr)
            elif command == "/save" and rest:
                chat.save(rest)
                print(f"(conversation saved to {rest})", file=sys.stderr)
            elif command in ("/image", "/video") and rest:
                chat.attach(command[1:], rest)
                print(f"({command[1:]} {rest} attached to your next message)", file=sys.stderr)
            elif command in ("/image", "/video", "/save"):
                print(f"usage: {command} {'FILE' if command == '/save' else 'PATH'}", file=sys.stderr)
            elif command:
                print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
            elif line:
                messages, chat.attached = chat.messages(line), []  # used by this turn, even if it fails
                text = answer(vlm, messages, params)
                chat.history = messages[1 if chat.system else 0 :] + [
                    {"role": "assistant", "content": [{"type": "text", "text": text.strip()}]}]
        except SmolVLMError as e:  # a bad file or value: say so and keep chatting
            print(f"smolvlm: error: {e}", file=sys.stderr)
