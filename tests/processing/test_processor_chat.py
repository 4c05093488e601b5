"""Chat template rendering and apply_chat_template(tokenize=True) against the reference; message errors; sandbox."""

import base64
import io

import pytest

from processing_reference import assert_same_inputs, photo
from smolvlm.errors import ConfigError, InputError

SMALL = dict(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image"}  # for rendering only: the template never reads the source

CONVERSATIONS = {
    "system": [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [text("Hi!")]}],
    "multi-turn": [
        {"role": "user", "content": [text("What do these images show?"), IMAGE, IMAGE]},
        {"role": "assistant", "content": [text("The first image shows the statue of liberty.")]},
        {"role": "user", "content": [text("And who is that?")]},
    ],
    "image-first": [{"role": "user", "content": [IMAGE, text("Describe.")]}],
    "text-first": [{"role": "user", "content": [text("Look: "), IMAGE, text(" What is it?")]}],
    "several-images": [{"role": "user", "content": [IMAGE, text("vs"), IMAGE, IMAGE, text("Compare.")]}],
    "unicode-and-newlines": [{"role": "user", "content": [text("Ça va?\n\nLine two — ok 😀")]}],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_matches_the_reference(pair, name, generation_prompt):
    ours, ref = pair
    messages = CONVERSATIONS[name]
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected


def test_known_strings(processors):
    ours, _ = processors["v2"]
    assert ours.apply_chat_template(CONVERSATIONS["image-first"]) == (
        "<|im_start|>User:<image>Describe.<end_of_utterance>\nAssistant:"
    )
    assert ours.apply_chat_template(CONVERSATIONS["system"], add_generation_prompt=False) == (
        "<|im_start|>System: Be brief.<end_of_utterance>\nUser: Hi!<end_of_utterance>\n"
    )


def test_batch_of_conversations(pair):
    ours, ref = pair
    batch = [CONVERSATIONS["system"], CONVERSATIONS["image-first"]]
    assert ours.apply_chat_template(batch) == ref.apply_chat_template(batch, add_generation_prompt=True)


def test_plain_string_content_is_one_text_block(pair):
    """The deliberate difference: the reference's template drops string content; we render it as text."""
    ours, ref = pair
    as_string = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    as_blocks = CONVERSATIONS["system"]
    assert ours.apply_chat_template(as_string) == ref.apply_chat_template(as_blocks, add_generation_prompt=True)
    assert "Be brief." not in ref.apply_chat_template(as_string, add_generation_prompt=True)


def test_none_values_are_dropped_and_openai_image_url(pair):
    ours, ref = pair
    messages = [{"role": "user", "name": None, "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                          text("Hi")]}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages, add_generation_prompt=True)


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_tokenize_with_images_from_every_kind_of_block(pair, tmp_path, image_server):
    ours, ref = pair
    path = tmp_path / "b.png"
    photo(30, 40, 2).save(path)
    b64 = base64.b64encode(_png_bytes(photo(25, 25, 3))).decode()
    url = image_server({"/d.png": _png_bytes(photo(50, 20, 4))}) + "/d.png"
    messages = [
        {"role": "system", "content": [text("Answer in one word.")]},
        {"role": "user", "content": [
            {"type": "image", "image": photo(40, 30, 1)},
            {"type": "image", "path": str(path)},
            text("Compare these"),
            {"type": "image", "base64": b64},
            {"type": "image", "url": url},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        ]},
    ]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", processor_kwargs=SMALL)
    got = ours.apply_chat_template(messages, tokenize=True, **SMALL)
    assert_same_inputs(got, expected)
    assert got["pixel_values"].shape == (1, 5 + 5 + 5 + 3 + 5, 3, 64, 64)  # 2x2 tiles + 1, but 1x2 + 1 for 50x20


def test_tokenize_batch_with_left_padding_and_real_settings(pair):
    ours, ref = pair
    batch = [
        [{"role": "user", "content": [{"type": "image", "image": photo(300, 200, 5)}, text("What is this?")]}],
        [{"role": "user", "content": [text("No image, just a longer question about something.")]}],
    ]
    kw = dict(padding=True, padding_side="left")
    expected = ref.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", processor_kwargs=kw)
    got = ours.apply_chat_template(batch, tokenize=True, **kw)
    assert_same_inputs(got, expected)
    assert got["pixel_values"].shape == (2, 13, 3, 512, 512)


def test_tokenize_text_only(pair):
    ours, ref = pair
    expected = ref.apply_chat_template(CONVERSATIONS["system"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
    assert_same_inputs(ours.apply_chat_template(CONVERSATIONS["system"], tokenize=True), expected)


@pytest.mark.parametrize(
    "messages,message",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "no role"}], "message 0: expected a dict with a string 'role'"),
        ([{"role": "user", "content": 5}], "message 0: content must be a string or a list"),
        ([{"role": "user", "content": ["not a dict"]}], "message 0, item 0: expected a dict with a string 'type'"),
        ([{"role": "user", "content": [text("a"), {"type": "image_url", "image_url": {}}]}], "item 1: an image_url"),
        ([{"role": "user", "content": [{"type": "text"}]}], "a text block needs a string 'text'"),
        ([[{"role": "user", "content": "ok"}], []], "conversation 1: expected a non-empty list"),
    ],
)
def test_bad_messages(processors, messages, message):
    ours, _ = processors["v2"]
    with pytest.raises(InputError, match=message):
        ours.apply_chat_template(messages)


def test_image_blocks_need_a_source_to_tokenize(processors):
    ours, _ = processors["v2"]
    messages = [{"role": "user", "content": [text("Hi"), {"type": "image"}]}]
    assert ours.apply_chat_template(messages) == "<|im_start|>User: Hi<image><end_of_utterance>\nAssistant:"
    with pytest.raises(InputError, match="message 0, item 1: an image block needs one of the keys image, url"):
        ours.apply_chat_template(messages, tokenize=True)


def test_template_errors_and_arguments(processors):
    ours, _ = processors["v2"]
    messages = CONVERSATIONS["system"]
    with pytest.raises(ConfigError, match="not valid Jinja"):
        ours.apply_chat_template(messages, chat_template="{% for m in messages %}")
    with pytest.raises(InputError, match="Only user turns"):
        ours.apply_chat_template(messages, chat_template="{{ raise_exception('Only user turns') }}")
    with pytest.raises(InputError, match="only apply with tokenize=True"):
        ours.apply_chat_template(messages, padding_side="left")
    assert ours.apply_chat_template(messages, chat_template="{{ bos_token }}{{ greeting }}", greeting="hey") == (
        "<|im_start|>hey"
    )


def test_the_template_is_sandboxed(processors, tmp_path):
    ours, _ = processors["v2"]
    target = tmp_path / "written.png"
    messages = [{"role": "user", "content": [{"type": "image", "image": photo(4, 4)}]}]
    write = "{{ messages[0]['content'][0]['image'].save('" + str(target) + "') }}"
    with pytest.raises(InputError):
        ours.apply_chat_template(messages, chat_template=write)  # the image is an inert "<Image>" string there
    assert not target.exists()
    with pytest.raises(InputError):
        ours.apply_chat_template(messages, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InputError, match="namespace attribute"):
        ours.apply_chat_template(messages, chat_template="{% set ns = namespace(_x=1) %}")
