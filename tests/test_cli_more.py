"""The `smolvlm` command's newer options in a subprocess (generate --json, --system, sampling options, a prompt from
stdin, errors before the model loads), and `smolvlm chat` on a real terminal (a pty): line editing, Ctrl-C stopping
an answer, /system, /save, /help, and a video after an image turn."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import one_error_line, run

import smolvlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vlm(tiny_v2):
    return smolvlm.load(tiny_v2, progress=False)


def test_generate_json_system_sampling_options_and_stdin(tiny_v2, vlm):
    options = ["--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "20", "--min-p", "0.05",
               "--repetition-penalty", "1.3", "--seed", "3", "--stop", "zzz", "--system", "Answer briefly."]
    out = run("generate", "-m", tiny_v2, *options, "--json", stdin="Describe a cat.\n")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Describe a cat."}]
    expected = vlm.complete(messages, max_new_tokens=12, temperature=0.9, top_k=20, min_p=0.05,
                            repetition_penalty=1.3, seed=3, stop=["zzz"])
    assert (got["text"], got["finish_reason"], got["prompt_tokens"], got["completion_tokens"]) == (
        expected.text, expected.finish_reason, expected.prompt_tokens, expected.completion_tokens)
    timings = got["timings"]
    assert 0 < timings["time_to_first_token_s"] <= timings["total_s"] and timings["load_s"] > 0
    piped = run("generate", "-m", tiny_v2, "--max-new-tokens", "5", "-", stdin="Hi\n")
    assert piped.stdout == vlm.generate("Hi", max_new_tokens=5) + "\n"


def test_cheap_errors_come_before_the_model_loads(tmp_path):
    missing_model = tmp_path / "no-model"  # loading would fail on it: these errors must come first
    started = time.perf_counter()
    one_error_line(run("generate", "-m", missing_model, "-i", tmp_path / "gone.png", "hi"), "--image", "gone.png",
                   "file not found")
    one_error_line(run("generate", "-m", missing_model, "--top-p", "3", "hi"), "top_p")
    assert time.perf_counter() - started < 30
    usage = run("generate", "--fps", "0", "hi")
    assert usage.returncode == 2 and "--fps" in usage.stderr  # argparse's usage errors exit 2 (README)
    usage = run("chat", "--cache-mb", "-1")
    assert usage.returncode == 2 and "--cache-mb: expected a float >= 0, got '-1'" in usage.stderr
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    one_error_line(run("generate", "-m", adapter, "hi"), "base_model_name_or_path", "--adapter")


def test_finetune_has_the_same_model_default():
    help_text = run("finetune", "--help").stdout
    assert "default: $SMOLVLM_MODEL or HuggingFaceTB/SmolVLM2-256M-Video-Instruct" in " ".join(help_text.split())


class Terminal:
    """`smolvlm chat` on a pseudo-terminal: what a user types, what the screen shows."""

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the pty as its controlling terminal
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "smolvlm.cli", "chat", *map(str, args)],
                      {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"})
        self.screen = ""

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, f"{text!r} never appeared; the screen:\n{self.screen}"
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the child has exited
                    break
        assert text in self.screen, f"{text!r} never appeared (the chat exited); the screen:\n{self.screen}"
        return self.screen

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def test_chat_on_a_terminal(tiny_v2, tmp_path):
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(image)
    (tmp_path / "clip.mp4").write_bytes(b"")
    saved = tmp_path / "chat.json"
    term = Terminal("--model", tiny_v2, "--max-new-tokens", "100000")
    term.wait_for("/help lists the commands")
    term.type("/help\n")
    term.wait_for("/save FILE")
    term.type("/system Be brief.\n")
    term.wait_for("(system prompt set)")
    term.type(f"/image {image}\n")
    term.wait_for("attached to your next message")
    term.type("Describe it at length\n")
    shown = len(term.wait_for("Describe it at length\r\n"))
    deadline = time.monotonic() + 60
    while len(term.screen) < shown + 40:  # some of the answer has streamed (it would run until the context is full)
        assert time.monotonic() < deadline, term.screen
        if select.select([term.fd], [], [], 0.1)[0]:
            term.screen += os.read(term.fd, 4096).decode(errors="replace")
    term.type("\x03")  # Ctrl-C while it streams: stops the answer, not the chat
    term.wait_for("(answer stopped)")
    term.type(f"/video {tmp_path / 'clip.mp4'}\n")
    term.wait_for("/reset first")
    # Line editing: type the path without its dot, move left 4 characters, insert it.
    term.type(f"/save {tmp_path / 'chatjson'}" + "\x1b[D" * 4 + ".\n")
    term.wait_for("conversation saved")
    term.type("/quit\n")
    assert term.exit_code() == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Be brief."
    assert messages[1]["content"] == [{"type": "image", "image": str(image)},
                                      {"type": "text", "text": "Describe it at length"}]
    answer = messages[2]["content"][0]["text"]
    assert answer and len(answer) < 100000  # a partial answer, kept in the history


def test_serve_reads_the_smolvlm_environment_variables():
    env = {"SMOLVLM_MODEL": "/models/mine", "SMOLVLM_HOST": "0.0.0.0", "SMOLVLM_PORT": "9001",
           "SMOLVLM_API_KEY": "k", "SMOLVLM_SERVED_MODEL_NAME": "mine", "SMOLVLM_ALLOWED_ORIGINS": "http://a.example"}
    probe = ("from smolvlm import cli; a = cli.build_parser().parse_args(['serve']); "
             "print(a.model, a.host, a.port, a.api_key, a.served_model_name, a.allowed_origins)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env})
    assert out.stdout.split() == ["/models/mine", "0.0.0.0", "9001", "k", "mine", "http://a.example"], out.stderr
    probe = probe.replace("['serve']", "['serve', '--port', '7000']")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **env})
    assert out.stdout.split()[2] == "7000"  # a flag wins over the environment


def test_the_first_kernel_build_says_so(tmp_path):
    from smolvlm.model import kernels

    if not kernels.cpu_supported():
        pytest.skip("this CPU runs torch's kernels: nothing is built")
    # A fresh cache folder (so a build starts) and a compiler that fails at once (so it ends quickly).
    out = subprocess.run([sys.executable, "-c", "from smolvlm.model import kernels; kernels.load()"],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CXX": "/bin/false"})
    assert "smolvlm: building CPU kernels, once, ~30 s" in out.stderr
