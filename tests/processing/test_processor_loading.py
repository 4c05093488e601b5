"""Processor.from_pretrained on both checkpoint families, and an error naming the file and field for every broken or
missing file."""

import json
import shutil

import pytest

from processing_reference import FOLDERS, assert_same_inputs, photo
from smolvlm import CheckpointError, ConfigError, InputError
from smolvlm.processing import Processor
from tiny import needs_shared

pytestmark = needs_shared


def test_both_families_load_their_settings():
    v1, v2 = Processor.from_pretrained(FOLDERS["v1"]), Processor.from_pretrained(FOLDERS["v2"])
    assert (v1.family, v2.family) == ("idefics3", "smolvlm")
    for p in (v1, v2):
        assert p.image_seq_len == 64 and p.image_token_id == 49190 and p.pad_token_id == 2
        settings = p.image_processor
        assert (settings.size, settings.max_image_size, settings.resample) == ({"longest_edge": 2048}, 512, 1)
        assert p.settings.truncation_side == "left" and p.settings.padding_side == "right"
        assert p.settings.special_tokens["eos_token"] == "<end_of_utterance>"  # tokenizer_config wins (v1's map says
        assert p.chat_template.startswith("<|im_start|>{% for message in messages %}")  # <|im_end|>)


@pytest.fixture
def folder(tmp_path):
    """A writable copy of the v2 checkpoint files."""
    dst = tmp_path / "ckpt"
    shutil.copytree(FOLDERS["v2"], dst)
    return dst


def _edit(folder, name, **changes):
    data = json.loads((folder / name).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (folder / name).write_text(json.dumps(data))


@pytest.mark.parametrize("name", ["preprocessor_config.json", "processor_config.json", "tokenizer.json"])
def test_missing_files(folder, name):
    (folder / name).unlink()
    with pytest.raises(CheckpointError, match=name):
        Processor.from_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint folder"):
        Processor.from_pretrained(tmp_path / "absent")


@pytest.mark.parametrize("name", ["preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "chat_template.json"])
def test_broken_json(folder, name):
    (folder / name).write_text('{"size": ')
    with pytest.raises(ConfigError, match=rf"{name}: not valid JSON"):
        Processor.from_pretrained(folder)


def test_broken_tokenizer_json(folder):
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nope"}}')
    with pytest.raises(ConfigError, match="tokenizer.json: not a valid tokenizers file"):
        Processor.from_pretrained(folder)


@pytest.mark.parametrize(
    "name,changes,message",
    [
        ("processor_config.json", dict(image_seq_len=None), "processor_config.json: field 'image_seq_len' = None"),
        ("processor_config.json", dict(image_seq_len="64"), "field 'image_seq_len' = '64'"),
        ("processor_config.json", dict(processor_class="LlavaProcessor"), "field 'processor_class' = 'LlavaProcessor'"),
        ("preprocessor_config.json", dict(size={"longest_edge": "big"}), "preprocessor_config.json: field 'size'"),
        ("preprocessor_config.json", dict(max_image_size=512), "field 'max_image_size' = 512"),
        ("preprocessor_config.json", dict(resample=9), "field 'resample' = 9"),
        ("preprocessor_config.json", dict(image_mean=[0.5, 0.5]), "field 'image_mean'.*3 numbers"),
        ("preprocessor_config.json", dict(image_std=[0.5, 0, 0.5]), "field 'image_std'.*std is 0"),
        ("preprocessor_config.json", dict(rescale_factor="1/255"), "field 'rescale_factor'"),
        ("preprocessor_config.json", dict(do_image_splitting="yes"), "field 'do_image_splitting' = 'yes'"),
        ("tokenizer_config.json", dict(padding_side="middle"), "tokenizer_config.json: field 'padding_side'"),
        ("tokenizer_config.json", dict(model_max_length="long"), "field 'model_max_length'"),
        ("tokenizer_config.json", dict(pad_token="<pad>"), "pad_token '<pad>' is not in tokenizer.json"),
        ("tokenizer_config.json", dict(image_token="<img>"), "tokenizer.json has no token '<img>'"),
        ("tokenizer_config.json", dict(chat_template=[{"template": "x"}], eos_token=None), "items are not"),
    ],
)
def test_bad_fields(folder, name, changes, message):
    if name == "tokenizer_config.json" and "chat_template" in changes:
        (folder / "chat_template.json").unlink()
    _edit(folder, name, **changes)
    with pytest.raises(ConfigError, match=message):
        Processor.from_pretrained(folder)


def test_family_from_config_json_when_no_processor_class(folder):
    _edit(folder, "processor_config.json", processor_class=None)
    _edit(folder, "preprocessor_config.json", processor_class=None)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="can't tell the checkpoint family"):
        Processor.from_pretrained(folder)
    shutil.copyfile(FOLDERS["v1"] / "config.json", folder / "config.json")  # model_type idefics3
    assert Processor.from_pretrained(folder).family == "idefics3"


def test_chat_template_sources(folder):
    messages = [{"role": "user", "content": "Hi"}]
    (folder / "chat_template.jinja").write_text("jinja:{{ messages[0]['content'][0]['text'] }}")
    assert Processor.from_pretrained(folder).apply_chat_template(messages) == "jinja:Hi"
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").unlink()  # falls back to tokenizer_config.json's
    expected = "<|im_start|>User: Hi<end_of_utterance>\nAssistant:"
    assert Processor.from_pretrained(folder).apply_chat_template(messages) == expected
    _edit(folder, "tokenizer_config.json", chat_template=[{"name": "default", "template": "d"},
                                                          {"name": "tool_use", "template": "t"}])
    processor = Processor.from_pretrained(folder)
    assert processor.apply_chat_template(messages) == "d"
    assert processor.apply_chat_template(messages, chat_template="tool_use") == "t"
    _edit(folder, "tokenizer_config.json", chat_template=None)
    with pytest.raises(ConfigError, match="has no chat template"):
        Processor.from_pretrained(folder).apply_chat_template(messages)


def test_without_tokenizer_config_and_special_tokens_map(folder):
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").unlink()
    processor = Processor.from_pretrained(folder)
    assert processor.pad_token_id is None
    assert processor(text="one prompt")["input_ids"].shape == (1, 2)
    with pytest.raises(InputError, match="no pad token"):
        processor(text=["one", "two three"])


def test_tiny_checkpoint_matches_the_reference(tiny_v1):
    """The tiny fixtures shrink the image settings (128 px, 64 px tiles, 16 tokens per tile)."""
    from transformers import AutoProcessor

    ours, ref = Processor.from_pretrained(tiny_v1), AutoProcessor.from_pretrained(tiny_v1, backend="pil")
    assert ours.image_seq_len == 16 and ours.image_processor.max_image_size == 64
    texts, images = ["<image>Describe.", "And <image>?"], [[photo(100, 60, 1)], [photo(20, 90, 2)]]
    assert_same_inputs(ours(text=texts, images=images, padding=True),
                       ref(text=texts, images=images, padding=True, return_tensors="pt"))
