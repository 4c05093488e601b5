"""Loading checkpoints saved by the reference: shards, dtypes, tied heads, and every broken-checkpoint error."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smolvlm import CheckpointError, InputError, Model
from smolvlm.model.text import rope_inv_freq
from smolvlm.weights import resolve_device, resolve_dtype
from tiny import make_tiny_checkpoint, reference_config, reference_model

IDS = torch.tensor([[1, 520, 3000, 49190, 77, 15, 9, 4000]])


def copy(folder, tmp_path, name="ckpt"):
    return shutil.copytree(folder, tmp_path / name)


def file_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_matches_files(model, folder, dtype):
    tensors = file_tensors(folder)
    state = model.state_dict()
    for key, tensor in tensors.items():
        assert state[key].dtype == dtype, key
        assert torch.equal(state[key], tensor.to(dtype)), key


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def test_loads_reference_checkpoint_into_released_format(tiny_v2):
    model = Model.from_pretrained(tiny_v2)
    tensors = file_tensors(tiny_v2)
    assert set(model.state_dict()) == set(tensors)  # state_dict() is the released key set
    assert_matches_files(model, tiny_v2, torch.float32)
    rotary = model.model.text_model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32 and not rotary.inv_freq.is_meta
    torch.testing.assert_close(rotary.inv_freq, rope_inv_freq(100000.0, 16), rtol=0, atol=0)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


def test_module_is_built_on_meta_then_filled(tiny_v2, monkeypatch):
    # No random init on a real device and no second copy: modules are created on the meta device, then each tensor
    # from the file replaces its meta parameter.
    devices = []
    reset = torch.nn.Linear.reset_parameters

    def spy(self):
        devices.append(self.weight.device.type)
        return reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    Model.from_pretrained(tiny_v2)
    assert devices and set(devices) == {"meta"}


def test_state_dict_round_trips_through_the_reference(tiny_v2, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = Model.from_pretrained(tiny_v2)
    folder = tmp_path / "saved"
    folder.mkdir()
    shutil.copyfile(tiny_v2 / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors", {"format": "pt"})
    ref, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(Model.from_pretrained(folder)), ref.eval()(input_ids=IDS).logits.detach())


def test_sharded_checkpoint(tiny_v2, tmp_path):
    model = reference_model(reference_config("smolvlm"), init_std=0.15)
    model.save_pretrained(tmp_path, max_shard_size="5MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    ours = Model.from_pretrained(tmp_path)
    assert_matches_files(ours, tmp_path, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours), model(input_ids=IDS).logits)


def test_bf16_file_loads_as_bf16_by_default_and_as_fp32_on_request(tmp_path):
    folder = make_tiny_checkpoint(tmp_path, "idefics3", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    assert Model.from_pretrained(folder).dtype == torch.bfloat16  # the checkpoint's own dtype
    fp32 = Model.from_pretrained(folder, dtype="float32")
    assert_matches_files(fp32, folder, torch.float32)
    assert logits(fp32).dtype == torch.float32


def test_fp32_file_loads_as_bf16(tiny_v2):
    model = Model.from_pretrained(tiny_v2, dtype=torch.bfloat16)
    assert_matches_files(model, tiny_v2, torch.bfloat16)
    assert model.model.text_model.rotary_emb.inv_freq.dtype == torch.float32  # computed, kept in fp32
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert Model.from_pretrained(tiny_v2, dtype="float16").dtype == torch.float16


def test_default_dtype_is_fp32_when_the_config_names_none(tiny_v2, tmp_path):
    folder = copy(tiny_v2, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert Model.from_pretrained(folder).dtype == torch.float32


def test_resolve_dtype():
    assert resolve_dtype(None, "bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    for bad in ("float64", torch.float64, "int8"):
        with pytest.raises(InputError, match="use one of float32, bfloat16, float16"):
            resolve_dtype(bad)


def test_resolve_device():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for bad in ("bogus", "meta") + (() if torch.cuda.is_available() else ("cuda",)):
        with pytest.raises(InputError, match="can't be used"):
            resolve_device(bad)


@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
def test_tied_head_shares_embeddings(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    folder = make_tiny_checkpoint(tmp_path, family, tie_word_embeddings=True)
    assert "lm_head.weight" not in file_tensors(folder)  # the reference saves a tied head once
    model = Model.from_pretrained(folder)
    assert model.lm_head.weight is model.model.text_model.embed_tokens.weight
    ref = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(model), ref(input_ids=IDS).logits)
    # A tied checkpoint that also stores lm_head.weight loads too (the copy is ignored, as the reference ties).
    tensors = file_tensors(folder)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.text_model.embed_tokens.weight"])
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    model = Model.from_pretrained(folder)
    assert model.lm_head.weight is model.model.text_model.embed_tokens.weight and model.lm_head.weight.abs().sum() > 0


def test_untied_head_is_its_own_tensor(tiny_v1):
    model = Model.from_pretrained(tiny_v1)
    head, embed = model.lm_head.weight, model.model.text_model.embed_tokens.weight
    assert head is not embed and not torch.equal(head, embed)
    assert torch.equal(head, file_tensors(tiny_v1)["lm_head.weight"])


# --- broken checkpoints -------------------------------------------------------------------------------------------


def rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        Model.from_pretrained(folder)
    return str(e.value)


def test_missing_unexpected_and_misshaped_keys_in_one_error(tiny_v2, tmp_path):
    folder = copy(tiny_v2, tmp_path)

    def edit(t):
        del t["model.text_model.norm.weight"]
        del t["model.vision_model.post_layernorm.bias"]
        t["model.extra.weight"] = torch.zeros(3)
        t["model.connector.modality_projection.proj.weight"] = torch.zeros(64, 100)

    rewrite(folder, edit)
    message = load_error(folder)
    assert f"The weights in {folder} don't match" in message
    assert "missing keys (2): model.text_model.norm.weight, model.vision_model.post_layernorm.bias" in message
    assert "unexpected keys (1): model.extra.weight (in model.safetensors)" in message
    assert "wrong shape: model.connector.modality_projection.proj.weight is [64, 100] in model.safetensors, the config needs [64, 128]" in message


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("lm_head.weight"), "missing keys (1): lm_head.weight"),
        (lambda t: t.update({"lm_head.bias": torch.zeros(49280)}), "unexpected keys (1): lm_head.bias (in model.safetensors)"),
        (lambda t: t.update({"model.text_model.embed_tokens.weight": torch.zeros(100, 64)}),
         "wrong shape: model.text_model.embed_tokens.weight is [100, 64] in model.safetensors, the config needs [49280, 64]"),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_each_key_problem(tiny_v2, tmp_path, edit, words):
    folder = copy(tiny_v2, tmp_path)
    rewrite(folder, edit)
    assert words in load_error(folder)


def test_key_errors_name_the_shard(tmp_path):
    reference_model(reference_config("smolvlm")).save_pretrained(tmp_path, max_shard_size="5MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.text_model.norm.weight"]
    tensors = load_file(tmp_path / shard)
    tensors["model.text_model.norm.weight"] = torch.zeros(65)
    tensors["model.text_model.extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / shard, {"format": "pt"})
    message = load_error(tmp_path)
    assert f"model.text_model.norm.weight is [65] in {shard}" in message
    assert f"model.text_model.extra (in {shard})" in message


def test_truncated_weight_file(tiny_v2, tmp_path):
    folder = copy(tiny_v2, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(folder)
    assert message.startswith(f"{path}: not a readable safetensors file") and "incomplete metadata" in message


def test_corrupt_header(tiny_v2, tmp_path):
    folder = copy(tiny_v2, tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"
    path.write_bytes(bytes(data))
    message = load_error(folder)
    assert message.startswith(f"{path}: not a readable safetensors file") and "header" in message


def test_missing_shard_and_bad_index(tmp_path):
    reference_model(reference_config("smolvlm")).save_pretrained(tmp_path, max_shard_size="5MB")
    index = tmp_path / "model.safetensors.index.json"
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    assert load_error(tmp_path) == f"{index} names weight files that are not in {tmp_path}: {shard}"
    index.write_text("{")
    assert load_error(tmp_path).startswith(f"{index}: not a valid safetensors index")


def test_no_weights(tiny_v2, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copyfile(tiny_v2 / "config.json", folder / "config.json")
    assert load_error(folder) == f"No weights in {folder}: expected model.safetensors or model.safetensors.index.json"
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert "found only pytorch_model.bin; only model.safetensors or sharded safetensors" in load_error(folder)


def test_missing_config_and_missing_folder(tiny_v2, tmp_path):
    folder = copy(tiny_v2, tmp_path)
    (folder / "config.json").unlink()
    assert load_error(folder) == f"No config.json in {folder}: not a SmolVLM checkpoint folder"
    missing = tmp_path / "nowhere"
    assert str(missing) in load_error(missing)


def test_model_code_never_imports_transformers():
    import subprocess
    import sys

    code = "import sys, smolvlm; smolvlm.Model, smolvlm.SmolVLMConfig; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=__file__.rsplit("/tests/", 1)[0])


# In a fresh process (malloc's settings are per process): page faults taken by allocating, filling and freeing a
# 6 MB tensor 20 times after the load (a vision tile's fc1 output is that size).
FAULTS = """
import ctypes, resource, sys, torch
from smolvlm import Model
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages whatever the system's huge-page setting
Model.from_pretrained(sys.argv[1], fuse=sys.argv[2] == "fused")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(1536 * 1024, dtype=torch.float32).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("load", ["fused", "plain"])
def test_an_inference_model_reuses_large_temporaries_a_training_one_returns_them(tiny_v2, load):
    """Loading returns every freed block of 1 MiB or more to the OS (no heap holes under the weights); a model loaded
    fused for inference then keeps large temporaries for reuse (a fresh mmap per call faults in every page: vision
    matmuls ran at half speed), while a plain (training) load keeps returning them."""
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    faults = int(subprocess.run([sys.executable, "-c", FAULTS, str(tiny_v2), load], check=True, cwd=root,
                                capture_output=True, text=True).stdout)
    pages = 20 * 1536 * 1024 * 4 // 4096  # every page of every allocation
    if load == "fused":
        assert faults < pages // 10
    else:
        assert faults > pages // 2
