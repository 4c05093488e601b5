"""The `smolvlm` command in a subprocess: generate, chat through stdin, and one clear error line for each failure."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import smolvlm
from smolvlm import cli

N = "12"
SCRIPT = Path(sys.executable).parent / "smolvlm"  # the console script pip installed (smolvlm.cli:main)


def run(*args, stdin="", env=None, script=False):
    """Run smolvlm; stdout/stderr decoded as UTF-8 without newline translation (answers may hold a "\r")."""
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "smolvlm.cli"]
    out = subprocess.run(
        [*cmd, *map(str, args)], input=stdin.encode(), capture_output=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )  # fmt: skip
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


@pytest.fixture(scope="module")
def vlm(tiny_v2):
    return smolvlm.load(tiny_v2, progress=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 120, 3), dtype=np.uint8)).save(path)
    return path


def user(text, *images):
    images = [{"type": "image", "image": str(i)} for i in images]
    return {"role": "user", "content": [*images, {"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text.strip()}]}


def test_generate_streams_the_api_answer(tiny_v2, vlm, image):
    out = run("generate", "--model", tiny_v2, "--image", image, "--max-new-tokens", N, "Describe it.", script=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == vlm.generate([user("Describe it.", image)], max_new_tokens=int(N)) + "\n"
    assert "Traceback" not in out.stderr


def test_generate_options(tiny_v2, vlm):
    args = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5", "--dtype", "float32", "--device", "cpu"]
    out = run("generate", "-m", tiny_v2, "--max-new-tokens", N, *args, "Hi")
    assert out.returncode == 0, out.stderr
    expected = vlm.generate("Hi", max_new_tokens=int(N), temperature=0.8, top_p=0.9, seed=5)
    assert out.stdout == expected + "\n" != vlm.generate("Hi", max_new_tokens=int(N)) + "\n"


def test_chat_keeps_history_attaches_images_and_resets(tiny_v2, vlm, image, tmp_path):
    (tmp_path / "broken.png").write_text("not a png")
    lines = [
        "Hello there",
        f"/image {image}",
        "What is in it?",
        f"/image {tmp_path / 'broken.png'}",
        "And now?",  # the unreadable image was refused when attached: this turn has no image
        "/reset",
        "Hello there",
        "/quit",
        "never read",
    ]
    out = run("chat", "--model", tiny_v2, "--max-new-tokens", N, stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    p = dict(max_new_tokens=int(N))
    first = vlm.generate([user("Hello there")], **p)
    history = [user("Hello there"), assistant(first), user("What is in it?", image)]
    second = vlm.generate(history, **p)
    third = vlm.generate(history + [assistant(second), user("And now?")], **p)
    assert out.stdout == f"{first}\n{second}\n{third}\n{first}\n"
    assert "broken.png" in out.stderr and "Traceback" not in out.stderr


def test_chat_ends_at_end_of_input(tiny_v2, vlm):
    out = run("chat", "--model", tiny_v2, "--max-new-tokens", "3", stdin="Hi\n\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == vlm.generate("Hi", max_new_tokens=3) + "\n"


def one_error_line(out, *expected):
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smolvlm: error: "), out.stderr
    for text in expected:
        assert text in lines[0]


def test_missing_folder_unknown_model_and_unreachable_hub(tmp_path):
    one_error_line(run("generate", "--model", tmp_path / "nowhere", "hi"), "No checkpoint folder", "nowhere")
    # offline: the hub can't be asked; the message says how to use a local folder instead
    one_error_line(run("chat", "--model", "nobody/no-such-model"), "nobody/no-such-model", "--model /path/to/folder")
    unreachable = run(
        "generate", "--model", "nobody/no-such-model", "hi",
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens there
    )
    one_error_line(unreachable, "nobody/no-such-model", "can't be reached", "--model /path/to/folder")


def main(capsys, *args):
    """The same entry point in this process (faster; the hub cases above need a fresh process for their env)."""
    code = cli.main(list(map(str, args)))
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_bad_checkpoint_images_and_options(tiny_v2, tmp_path, capsys):
    one_error_line(main(capsys, "generate", "--model", tmp_path, "hi"), "config.json")
    (tmp_path / "notes.png").write_text("hello")
    one_error_line(main(capsys, "generate", "-m", tiny_v2, "-i", tmp_path / "notes.png", "hi"), "notes.png")
    one_error_line(main(capsys, "generate", "-m", tiny_v2, "-i", tmp_path / "gone.jpg", "hi"), "gone.jpg")
    one_error_line(main(capsys, "generate", "-m", tiny_v2, "--temperature", "-1", "hi"), "temperature")
    one_error_line(main(capsys, "generate", "-m", tiny_v2, "--dtype", "int3", "hi"), "int3")
    with pytest.raises(SystemExit) as usage:
        cli.main(["generate", "--max-new-tokens", "many", "hi"])
    assert usage.value.code == 2 and "usage: smolvlm generate" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback(tiny_v2):
    proc = subprocess.Popen(
        [sys.executable, "-m", "smolvlm.cli", "generate", "-m", str(tiny_v2), "--max-new-tokens", "2000", "Go on"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.stdout.read(5)
    proc.stdout.close()  # like `| head -c 5`
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_video_and_processor_options(tiny_v2, vlm, image, tmp_path):
    from video_files import SPECS, make_video

    video = make_video(tmp_path / "clock.mp4", SPECS["clock_25fps_4s.mp4"])
    clip = {"role": "user", "content": [{"type": "video", "video": str(video)}, {"type": "text", "text": "Describe"}]}
    p = dict(max_new_tokens=int(N))
    out = run("generate", "-m", tiny_v2, "--max-new-tokens", N, "--video", video, "--max-frames", "2", "Describe")
    assert out.returncode == 0, out.stderr
    assert out.stdout == vlm.generate([clip], max_frames=2, **p) + "\n"
    out = run("generate", "-m", tiny_v2, "--max-new-tokens", N, "--image", image, "--no-image-splitting", "Describe.")
    assert out.returncode == 0, out.stderr
    assert out.stdout == vlm.generate([user("Describe.", image)], do_image_splitting=False, **p) + "\n"

    out = run("chat", "--model", tiny_v2, "--max-new-tokens", N, "--fps", "2", stdin=f"/video {video}\nDescribe\n/video\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == vlm.generate([clip], fps=2.0, **p) + "\n"
    assert "usage: /video PATH" in out.stderr
