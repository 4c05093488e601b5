"""The main job: ask SmolVLM about an image with `smolvlm generate` (the answer streams to stdout).

    python scripts/demo.py [--image PATH] [--model FOLDER_OR_REPO_ID]

With network access the model comes from the Hugging Face Hub (default HuggingFaceTB/SmolVLM2-256M-Video-Instruct).
Without it (as on our CI machines) the real weights can't be had: the demo then says so and runs the same command on
a model of the exact SmolVLM2-256M shape with random weights (benchmarks/checkpoint.py), so the whole path
(download/load, image tiling, prompt, vision, generation, streaming) runs, and the answer is gibberish.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from checkpoint import make_random_checkpoint  # noqa: E402

from smolvlm import hub  # noqa: E402
from smolvlm.api import DEFAULT_MODEL  # noqa: E402
from smolvlm.errors import CheckpointError  # noqa: E402


def sample_image(path: Path) -> Path:
    """A 1024x768 picture: a red sun over green hills under a blue sky."""
    img = Image.new("RGB", (1024, 768), (110, 170, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse((700, 80, 880, 260), fill=(230, 60, 40))
    draw.polygon([(0, 768), (0, 520), (300, 420), (620, 540), (1024, 430), (1024, 768)], fill=(60, 150, 70))
    img.save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="default: a generated picture")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="Describe this image.")
    args = parser.parse_args()
    work = ROOT / ".bench"
    work.mkdir(exist_ok=True)
    image = args.image or sample_image(work / "demo.png")
    model = args.model
    try:
        hub.resolve(model)
    except CheckpointError as e:
        if model != DEFAULT_MODEL:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"note: {e}", file=sys.stderr)
        print("note: running on a random-weight model of the exact SmolVLM2-256M shape instead; its answer is "
              "gibberish, but every step is the real one.", file=sys.stderr)  # fmt: skip
        model = str(make_random_checkpoint("smolvlm2-256m", work / "random-smolvlm2-256m", dtype="bfloat16"))
    cmd = ["smolvlm", "generate", "--model", model, "--image", str(image), "--max-new-tokens", "48", args.prompt]
    print("$ " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
