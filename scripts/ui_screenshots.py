"""Screenshots of the chat page for the README (docs/ui-desktop.png, docs/ui-phone.png).

    python -m smolvlm.cli serve --model CHECKPOINT --port 8000 --api-key KEY &
    python scripts/ui_screenshots.py http://127.0.0.1:8000 KEY

Attaches a drawn test image, asks a question, waits for the streamed answer, and shoots the page at desktop and phone
width with Debian's chromium (as tests/serving/test_ui.py drives it).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parents[1] / "docs"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def picture() -> bytes:
    """A 640x420 scene (sky, sun, hills, a house) to attach."""
    image = Image.new("RGB", (640, 420), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((480, 40, 570, 130), fill=(250, 210, 60))
    draw.polygon([(0, 300), (200, 190), (420, 300), (640, 220), (640, 420), (0, 420)], fill=(80, 150, 70))
    draw.rectangle((250, 250, 370, 340), fill=(200, 80, 60))
    draw.polygon([(240, 250), (310, 195), (380, 250)], fill=(110, 60, 40))
    draw.rectangle((295, 290, 325, 340), fill=(90, 50, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(url: str, key: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        for name, viewport in (("desktop", {"width": 1280, "height": 800}), ("phone", {"width": 390, "height": 844})):
            context = browser.new_context(viewport=viewport, device_scale_factor=1)
            context.add_init_script(f"localStorage.setItem('smolvlm.apiKey', {json.dumps(key)})")
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('processor').textContent")
            page.set_input_files("#file", files=[{"name": "house.png", "mimeType": "image/png", "buffer": picture()}])
            page.wait_for_selector(".attachment")
            page.evaluate("document.getElementById('max-tokens').value = 40")  # hidden at phone width
            page.fill("#prompt", "What is in this picture?")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg.streaming", state="detached", timeout=120_000)
            page.set_input_files("#file", files=[{"name": "house.png", "mimeType": "image/png", "buffer": picture()}])
            page.fill("#prompt", "Describe the house.")
            page.wait_for_selector(".attachment canvas")
            page.screenshot(path=str(DOCS / f"ui-{name}.png"))
            context.close()
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
