"""config.json parsing, checked against transformers' own config classes (the oracle) on real and edited files."""

import copy
import json

import pytest

from smolvlm import CheckpointError, ConfigError
from smolvlm.config import SmolVLMConfig
from tiny import V1_FILES, V2_FILES, needs_shared


def real(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def reference(d: dict, tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(d))
    return AutoConfig.from_pretrained(tmp_path)


def assert_same_as_reference(ours: SmolVLMConfig, ref):
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps"):
        assert getattr(ours.vision_config, name) == getattr(ref.vision_config, name), f"vision_config.{name}"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                 "pad_token_id"):
        assert getattr(ours.text_config, name) == getattr(ref.text_config, name), f"text_config.{name}"
    assert ours.text_config.rope_theta == ref.text_config.rope_parameters["rope_theta"]
    assert ours.model_type == ref.model_type
    assert (ours.scale_factor, ours.image_token_id, ours.tie_word_embeddings) == (
        ref.scale_factor, ref.image_token_id, ref.tie_word_embeddings)
    assert ours.dtype == (None if ref.dtype is None else str(ref.dtype).removeprefix("torch."))


@needs_shared
@pytest.mark.parametrize("folder", [V1_FILES, V2_FILES], ids=["v1", "v2"])
def test_real_config_files(folder, tmp_path):
    ours = SmolVLMConfig.from_pretrained(folder)
    assert_same_as_reference(ours, reference(real(folder), tmp_path))
    assert ours.image_seq_len == 64


@needs_shared
def test_v1_and_v2_values():
    v1, v2 = SmolVLMConfig.from_pretrained(V1_FILES), SmolVLMConfig.from_pretrained(V2_FILES)
    assert (v1.model_type, v1.dtype, v1.text_config.hidden_size, v1.text_config.num_hidden_layers) == (
        "idefics3", "bfloat16", 576, 30)
    assert (v2.model_type, v2.dtype, v2.text_config.hidden_size, v2.text_config.num_key_value_heads) == (
        "smolvlm", "float32", 960, 5)
    # The v2 vision config omits these: the reference defaults apply.
    assert "num_hidden_layers" not in real(V2_FILES)["vision_config"]
    assert (v2.vision_config.num_hidden_layers, v2.vision_config.intermediate_size) == (12, 3072)
    for c in (v1, v2):  # legacy top-level rope_theta, rms_norm_eps 1e-5, 128002 top-level pad ignored
        assert (c.text_config.rope_theta, c.text_config.rms_norm_eps, c.text_config.pad_token_id) == (100000.0, 1e-5, 2)
        assert c.image_token_id == 49190 and c.scale_factor == 4 and not c.tie_word_embeddings


def test_v5_saved_config(tiny_v2, tmp_path):
    d = json.loads((tiny_v2 / "config.json").read_text())
    assert "rope_parameters" in d["text_config"] and "dtype" in d  # the v5 spellings
    ours = SmolVLMConfig.from_pretrained(tiny_v2)
    assert_same_as_reference(ours, reference(d, tmp_path))
    assert ours.text_config.rope_theta == 100000.0 and ours.dtype == "float32" and ours.image_seq_len == 16


# The reference's default vision config (224 px / 32 px patches = 7x7 grid) can't be pixel-shuffled by its default
# scale_factor 2, so every case names a grid; otherwise the keys are left out to get the defaults.
GRID = {"image_size": 512, "patch_size": 16}
BASE = {"model_type": "smolvlm", "image_token_id": 5, "vision_config": GRID}
SO400M = {"image_size": 384, "patch_size": 14}  # the 2.2B models' tower


@pytest.mark.parametrize(
    "d",
    [
        BASE,  # no text_config: every default, eps 1e-5
        {**BASE, "model_type": "idefics3", "text_config": {"hidden_size": 128, "num_attention_heads": 4}},
        {**BASE, "text_config": {"rope_theta": 273768}, "torch_dtype": "bfloat16"},
        {**BASE, "dtype": "float16", "torch_dtype": "bfloat16"},
        {**BASE, "text_config": {"rope_scaling": None, "head_dim": 64}},
        {**BASE, "vision_config": SO400M, "scale_factor": 3},
    ],
    ids=["defaults", "text-defaults", "legacy-keys", "dtype-wins", "null-rope-scaling", "so400m-grid"],
)
def test_defaults_and_legacy_keys_like_reference(d, tmp_path):
    assert_same_as_reference(SmolVLMConfig.from_dict(copy.deepcopy(d)), reference(d, tmp_path))


def test_rms_norm_eps_default_follows_reference():
    # 1e-5 is injected only when there is no text_config; a text_config without the key gets Llama's 1e-6.
    assert SmolVLMConfig.from_dict(BASE).text_config.rms_norm_eps == 1e-5
    assert SmolVLMConfig.from_dict({**BASE, "text_config": {}}).text_config.rms_norm_eps == 1e-6


def test_non_divisible_image_size_is_the_2b_layout():
    # 384 / 14 is not an integer: the 2.2B models use a 27x27 grid and drop 6 pixels, as the reference does.
    c = SmolVLMConfig.from_dict({**BASE, "scale_factor": 3, "vision_config": SO400M})
    assert c.vision_config.patches_per_side == 27 and c.image_seq_len == 81


def edited(**changes) -> dict:
    d = {
        "model_type": "smolvlm",
        "image_token_id": 49190,
        "scale_factor": 2,
        "vision_config": {"hidden_size": 32, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "text_config": {"vocab_size": 49280, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    }
    for path, value in changes.items():
        *parents, key = path.split("__")
        target = d
        for p in parents:
            target = target[p]
        target[key] = value
    return d


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"model_type": "llava"}, "model_type", "expected one of idefics3, smolvlm"),
        ({"model_type": None}, "model_type", "expected one of"),
        ({"vision_config__num_attention_heads": 5}, "vision_config.num_attention_heads", "hidden_size 32 is not divisible"),
        ({"text_config__num_attention_heads": 5}, "text_config.num_attention_heads", "hidden_size 64 is not divisible"),
        ({"text_config__num_key_value_heads": 3}, "text_config.num_key_value_heads", "num_attention_heads 4 is not divisible"),
        ({"scale_factor": 3}, "scale_factor", "8x8 patch grid"),
        ({"vision_config__patch_size": 128}, "vision_config.patch_size", "larger than vision_config.image_size 64"),
        ({"vision_config__hidden_size": "32"}, "vision_config.hidden_size", "expected int"),
        ({"text_config__num_hidden_layers": 0}, "text_config.num_hidden_layers", "positive integer"),
        ({"text_config__rms_norm_eps": "small"}, "text_config.rms_norm_eps", "expected float"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings", "expected bool"),
        ({"text_config__model_type": "mistral"}, "text_config.model_type", "expected 'llama'"),
        ({"text_config__rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "text_config.rope_parameters.rope_type", "only 'default'"),
        ({"text_config__rope_parameters": {"rope_theta": -1}}, "text_config.rope_theta", "positive number"),
        ({"text_config__hidden_act": "gelu"}, "text_config.hidden_act", "only 'silu'"),
        ({"text_config__attention_bias": True}, "text_config.attention_bias", "not supported"),
        ({"image_token_id": 60000}, "image_token_id", "outside the vocabulary"),
        ({"dtype": "float64"}, "dtype", "expected one of float32, bfloat16, float16"),
        ({"vision_config": [1, 2]}, "vision_config", "must be an object"),
    ],
)
def test_bad_values_name_file_and_field(changes, field, words):
    with pytest.raises(ConfigError) as e:
        SmolVLMConfig.from_dict(edited(**changes), source="/ckpt/config.json")
    message = str(e.value)
    assert message.startswith("/ckpt/config.json: field "), message
    assert f"'{field}'" in message and words in message, message


def test_edited_base_is_valid():
    c = SmolVLMConfig.from_dict(edited())
    assert c.image_seq_len == 16 and c.text_config.head_dim == 16


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match=f"No config.json in {tmp_path}"):
        SmolVLMConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        SmolVLMConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        SmolVLMConfig.from_pretrained(tmp_path)
