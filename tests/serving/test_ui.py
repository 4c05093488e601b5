"""The browser chat page, driven in a real browser (Playwright with Debian's chromium) against a real `smolvlm serve`
on the tiny checkpoint: attaching media (file input, drop, paste), streaming, stop, multi-turn requests, server
errors, the tile preview against the processor, sampled video frames, Markdown safety, the API key prompt, phone
width, and `--no-ui`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from server_process import KEY, MAX_IMAGE_PIXELS, Server
from smolvlm.generation import prepare
from smolvlm.processing import Processor
from smolvlm.serving import ui
from smolvlm.serving.limits import Limits
from tiny import CHECKPOINT_FILES, needs_shared

CHROMIUM = os.environ.get("SMOLVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):  # fail, never skip: scripts/setup.sh installs it (apt-get install chromium)
        pytest.fail(f"No chromium at {CHROMIUM}: run scripts/setup.sh (apt-get install -y chromium) or set "
                    "SMOLVLM_CHROMIUM to a Chromium binary")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """The chat page with the API key already stored (as after the user entered it once) and its chat requests
    recorded in page.chat_requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(f"localStorage.setItem('smolvlm.apiKey', {json.dumps(KEY)})")
    page = context.new_page()
    page.chat_requests = []
    page.on("request", lambda r: page.chat_requests.append(r.post_data_json) if r.url.endswith(CHAT) else None)
    page.goto(server.url)
    page.wait_for_function("document.getElementById('processor').textContent")  # the processor settings have loaded
    yield page
    context.close()


@pytest.fixture(scope="module")
def processor(tiny_v2):
    return Processor.from_pretrained(tiny_v2)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def attach(page, data: bytes, name: str = "image.png", mime: str = "image/png") -> None:
    count = page.locator(".attachment").count()
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
    page.wait_for_function(f"document.querySelectorAll('.attachment').length === {count + 1}")


def ask(page, text: str, max_tokens: int) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")  # the keyboard sends


def wait_answered(page) -> None:
    page.wait_for_selector(".msg.streaming", state="detached", timeout=60_000)


def test_page_loads_without_the_key_and_asks_for_it_once(browser, server):
    assert httpx.get(f"{server.url}/").status_code == 200  # the page itself needs no key
    assert httpx.get(f"{server.url}/v1/smolvlm/processor").status_code == 401  # the API does
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url)
    page.wait_for_selector("#key-dialog[open]")
    assert "Missing API key" in page.text_content("#key-reason")
    page.fill("#key-input", KEY)
    page.click("#key-save")
    page.wait_for_function("document.getElementById('processor').textContent")
    assert page.evaluate("localStorage.getItem('smolvlm.apiKey')") == KEY
    page.reload()
    page.wait_for_function("document.getElementById('processor').textContent")
    assert not page.is_visible("#key-dialog")  # kept: not asked again
    context.close()


def test_answer_streams_token_by_token_then_stop_and_continue(page, server, vlm):
    image = png(100, 70, seed=1)
    attach(page, image)
    page.evaluate("""() => {  // every state the streaming answer's text goes through
        window.seen = [];
        new MutationObserver(() => {
            const el = document.querySelector('.msg.streaming .content');
            if (el) window.seen.push(el.textContent);
        }).observe(document.getElementById('chat'), {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, "What is in this image?", 60)
    wait_answered(page)
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 5  # it appeared piece by piece, not at once
    assert all(a == b[: len(a)] for a, b in zip(seen, seen[1:]))  # each state extends the previous one
    first = page.chat_requests[0]
    assert first["stream"] is True and first["max_tokens"] == 60 and first["temperature"] == 0
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    assert first["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
        {"type": "text", "text": "What is in this image?"}]}]
    meta = page.text_content(".msg.assistant .meta")
    assert "first token" in meta and "tokens/s" in meta
    expected = vlm.complete([{"role": "user", "content": [{"type": "image", "url": url},
                                                          {"type": "text", "text": "What is in this image?"}]}],
                            max_new_tokens=60)
    assert f"{expected.completion_tokens} tokens" in meta and f"{expected.prompt_tokens} prompt tokens" in meta

    # Stop a long answer part-way: the stream ends there and the server frees the request.
    before = server.wait_idle()
    ask(page, "Write a long poem.", 1500)  # 1246 tokens unless stopped (greedy); fits the 2048 context
    page.wait_for_function("(document.querySelector('.msg.streaming .content') || {}).textContent?.length > 20")
    page.click("#stop")
    wait_answered(page)
    stopped = page.locator(".msg.assistant").nth(1)
    assert "stopped" in stopped.locator(".meta").text_content()
    partial = stopped.locator(".content").text_content()
    time.sleep(0.3)
    assert stopped.locator(".content").text_content() == partial
    after = server.wait_idle()
    assert after["running"] == 0 and after["tokens"] - before["tokens"] < 1500

    # The next turn carries the whole conversation: the first answer exactly as the server streamed it.
    page.fill("#prompt", "And then?")
    page.click("#send")
    wait_answered(page)
    third = page.chat_requests[2]["messages"]
    assert third[0] == first["messages"][0]
    assert third[1] == {"role": "assistant", "content": expected.text}
    assert third[2] == {"role": "user", "content": "Write a long poem."}
    assert third[3]["role"] == "assistant" and len(third[3]["content"]) > 20  # the stopped answer, as far as it got
    assert third[4] == {"role": "user", "content": "And then?"}
    assert page.locator(".msg.assistant").count() == 3

    # Regenerate replaces the last answer (same request again); New chat starts over.
    page.click(".msg.assistant .regenerate")
    wait_answered(page)
    assert page.chat_requests[3]["messages"] == page.chat_requests[2]["messages"]
    assert page.locator(".msg.assistant").count() == 3
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_drop_and_paste_attach_images(page):
    dropped, pasted = png(90, 60, seed=2), png(40, 50, seed=3)
    for event, data in (("drop", dropped), ("paste", pasted)):
        page.evaluate("""([event, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], event + '.png', {type: 'image/png'}));
            const e = event === 'drop' ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
                                       : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
            document.getElementById(event === 'drop' ? 'chat' : 'prompt').dispatchEvent(e);
        }""", [event, base64.b64encode(data).decode()])
    page.wait_for_function("document.querySelectorAll('.attachment').length === 2")
    ask(page, "Compare them.", 5)
    wait_answered(page)
    parts = page.chat_requests[0]["messages"][0]["content"]
    assert [p["image_url"]["url"] for p in parts[:2]] == [
        "data:image/png;base64," + base64.b64encode(d).decode() for d in (dropped, pasted)]
    assert page.locator(".msg.user img").count() == 2  # thumbnails in the conversation
    assert page.locator(".msg.error").count() == 0


SIZES = [(40, 30), (100, 70), (70, 100), (128, 128), (129, 64), (300, 90), (20, 200), (1000, 33), (4000, 3000)]


def test_tile_preview_matches_the_processor(page, processor):
    tokens_per_tile = processor.image_seq_len
    for i, (width, height) in enumerate(SIZES):
        attach(page, png(width, height, seed=i), f"{width}x{height}.png")
    sees = page.locator(".attachment .sees")
    grids = set()
    for i, (width, height) in enumerate(SIZES):
        frames, rows, cols = processor.image_processor.num_frames(width, height)
        shown = sees.nth(i)
        assert [int(shown.get_attribute(f"data-{k}")) for k in ("frames", "rows", "cols")] == [frames, rows, cols]
        # the tokens the processor's prompt really holds for the image
        prompt = processor(text="<image>", images=[Image.open(io.BytesIO(png(width, height, seed=i)))])
        tokens = int((prompt["input_ids"] == processor.image_token_id).sum())
        assert int(shown.get_attribute("data-tokens")) == tokens == frames * tokens_per_tile
        assert f"{tokens} image tokens" in shown.text_content()
        grids.add((rows, cols))
    # every grid this checkpoint can make (images are first resized to a 128 longest edge, tiles are 64)
    assert grids == {(1, 2), (2, 1), (2, 2)}
    page.uncheck("#splitting")  # no splitting: one frame each, and the request asks for detail "low"
    assert {int(sees.nth(i).get_attribute("data-frames")) for i in range(len(SIZES))} == {1}
    assert processor.image_processor.with_overrides(do_image_splitting=False).num_frames(4000, 3000)[0] == 1


@needs_shared
def test_tiling_arithmetic_matches_the_processor_at_released_and_tiny_settings(page, processor):
    """app.js's tiling() against ImageProcessor.num_frames over many sizes: the tiny server's settings and a released
    checkpoint's (2048 longest edge, 512 tiles: 1 to 17 frames, the 4096 cap)."""
    released = Processor.from_pretrained(CHECKPOINT_FILES / "SmolVLM2-500M-Video-Instruct")
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 6000, (300, 2))] + [(1, 1), (1, 9000), (9000, 1), (512, 512)]
    for proc in (processor, released):
        settings = ui.processor_settings(proc, Limits(), 8192)
        for split in (True, False):
            shown = page.evaluate("([sizes, s, split]) => sizes.map(([w, h]) => tiling(w, h, s, split))",
                                  [sizes, settings, split])
            image_processor = proc.image_processor.with_overrides(do_image_splitting=split)
            expected = [image_processor.num_frames(w, h) for w, h in sizes]
            assert [(t["frames"], t["rows"], t["cols"]) for t in shown] == expected
            assert [t["tokens"] for t in shown] == [f * proc.image_seq_len for f, _, _ in expected]
    assert {f for f, _, _ in expected} == {1}
    assert len({released.image_processor.num_frames(w, h)[0] for w, h in sizes}) >= 4  # 2x2 to 4x4 grids


def test_no_splitting_sends_detail_low_and_the_prompt_has_one_tile(page, processor):
    page.uncheck("#splitting")
    image = png(100, 70, seed=4)
    attach(page, image)
    assert page.get_attribute(".attachment .sees", "data-frames") == "1"
    ask(page, "Hi", 3)
    wait_answered(page)
    part = page.chat_requests[0]["messages"][0]["content"][0]
    assert part["image_url"]["detail"] == "low"
    url = part["image_url"]["url"]
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "Hi"}]}]
    one_tile, split = (len(prepare(processor, messages, do_image_splitting=s)) for s in (False, True))
    frames = processor.image_processor.num_frames(100, 70)[0]  # when split: 4 tiles + the global image
    assert split - one_tile >= (frames - 1) * processor.image_seq_len
    assert f"{one_tile} prompt tokens" in page.text_content(".msg.assistant .meta")


def test_server_error_is_shown_and_the_conversation_goes_on(page):
    attach(page, png(250, 200), "big.png")  # 50000 pixels: over the server's --max-image-pixels
    assert 250 * 200 > MAX_IMAGE_PIXELS
    ask(page, "What is this?", 5)
    page.wait_for_selector(".msg.error")
    error = page.text_content(".msg.error")
    assert "250x200" in error and "--max-image-pixels" in error
    assert page.locator(".msg.user.failed").count() == 1
    ask(page, "Hello?", 5)
    wait_answered(page)
    assert page.chat_requests[-1]["messages"] == [{"role": "user", "content": "Hello?"}]  # not the failed turn
    assert page.locator(".msg.assistant .content").text_content()


def test_video_shows_the_sampled_frames(page, processor, tmp_path):
    from video_files import SPECS, make_video

    from smolvlm.processing.video import load_video

    path = make_video(tmp_path / "clock.mp4", SPECS["clock_25fps_4s.mp4"])
    attach(page, path.read_bytes(), "clock.mp4", "video/mp4")
    page.wait_for_selector(".attachment .frames figure")
    sampling = processor.video_sampling
    expected = load_video(path, sampling.fps, sampling.max_frames)
    captions = page.locator(".frames figcaption")
    assert captions.count() == len(expected.indices) == 4
    assert [captions.nth(i).get_attribute("title") for i in range(4)] == [
        f"{t:.2f} s (frame {i})" for t, i in zip(expected.timestamps, expected.indices)]
    sees = page.locator(".attachment .sees")
    assert int(sees.get_attribute("data-tokens")) == 4 * processor.image_seq_len


def test_model_output_is_rendered_as_markdown_never_as_html(page):
    answer = ('**bold** and `<b>code</b>`\n<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>\n'
              '[link](javascript:window.pwned=3) [ok](https://example.com/?a=1&b="x")\n- item')
    events = [{"choices": [{"index": 0, "delta": {"content": answer[i : i + 7]}, "finish_reason": None}]}
              for i in range(0, len(answer), 7)]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route(f"**{CHAT}", lambda route: route.fulfill(status=200, body=body, content_type="text/event-stream"))
    ask(page, "Say something", 5)
    wait_answered(page)
    content = page.locator(".msg.assistant .content")
    assert content.locator("img, script, b").count() == 0
    assert page.evaluate("window.pwned") is None
    assert content.locator("strong").text_content() == "bold"
    assert content.locator("code").text_content() == "<b>code</b>"
    assert '<img src=x onerror="window.pwned=1">' in content.text_content()
    links = content.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == 'https://example.com/?a=1&b="x"'
    assert content.locator("li").text_content() == "item"


def test_phone_width_layout(page):
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert not page.is_visible("#temperature")  # settings fold away behind a button
    page.click("#settings-toggle")
    assert page.is_visible("#temperature") and page.get_attribute("#settings-toggle", "aria-expanded") == "true"
    assert page.is_visible("#prompt") and page.is_visible("#send")


def test_no_ui_serves_the_api_only(tiny_v2, tmp_path):
    server = Server(tiny_v2, tmp_path / "server.log", "--no-ui")
    try:
        assert httpx.get(f"{server.url}/").status_code == 404
        assert httpx.get(f"{server.url}/ui/app.js").status_code == 404
        assert server.http.get("/v1/models").status_code == 200
        assert server.http.get("/v1/smolvlm/processor").json()["image_seq_len"] > 0
    finally:
        server.stop()
