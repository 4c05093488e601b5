"""What a run writes: full fine-tunes and merged LoRA models in the released format (loaded by smolvlm and transformers
with the same logits), LoRA adapters in peft's format (loaded onto either model), and only the adapters trained."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from smolvlm import InputError, Model
from smolvlm.processing import Processor
from smolvlm.training import finetune
from tiny import make_tiny_checkpoint, needs_shared


def reference(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def run(tiny, dataset, output, **options):
    return finetune(model=str(tiny), data=str(dataset), output=str(output), steps=3, batch_size=2, progress=False,
                    **options)


def test_full_finetune_is_a_released_checkpoint(tiny_v2, dataset, tmp_path, inputs):
    result = run(tiny_v2, dataset, tmp_path / "out", full=True, lr=1e-3, freeze_vision=True, eval=str(dataset),
                 gradient_checkpointing=True)
    out = result.output
    assert result.adapter is None and result.eval_loss is not None and result.train_loss is not None
    assert not (out / "checkpoints").exists()  # a finished run leaves the model, not its checkpoints
    for name in ("tokenizer.json", "chat_template.json", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).read_bytes() == (tiny_v2 / name).read_bytes()
    trained, base = load_file(out / "model.safetensors"), load_file(tiny_v2 / "model.safetensors")
    assert sorted(trained) == sorted(base)  # the HF key names, nothing else
    for key in base:  # --freeze-vision: the vision encoder is as it was; the rest trained
        assert torch.equal(trained[key], base[key]) == key.startswith("model.vision_model."), key
    ours = logits(Model.from_pretrained(out), inputs)
    torch.testing.assert_close(ours, logits(reference(out), inputs), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, logits(Model.from_pretrained(tiny_v2), inputs), atol=1e-3)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3] and [e for e in log if "eval_loss" in e][-1]["step"] == 3


def test_bfloat16_training_writes_bfloat16(tiny_v2, dataset, tmp_path):
    out = run(tiny_v2, dataset, tmp_path / "out", full=True, dtype="bfloat16").output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert reference(out).model.text_model.embed_tokens.weight.abs().sum() > 0  # transformers reads it


def test_lora_adapter_merge_and_both_loaders(tiny_v2, dataset, tmp_path, inputs):
    from peft import PeftModel

    result = run(tiny_v2, dataset, tmp_path / "out", lora_r=4, lr=1e-2, lora_targets="text,connector,vision", merge=True,
                 gradient_checkpointing=True)
    out, adapter = result.output, result.adapter
    assert adapter == out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_v2)

    # The adapter trained (peft starts every lora_B at zero) on all three targets.
    tensors = load_file(adapter / "adapter_model.safetensors")
    for part in ("text_model", "connector", "vision_model"):
        assert any(part in k and "lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items()), part

    # Only the adapters changed: base + adapter, merged here, is exactly the merged model the run wrote, and every
    # weight LoRA does not touch is the base's.
    unmerged = PeftModel.from_pretrained(Model.from_pretrained(tiny_v2), str(adapter)).eval()
    merged = Model.from_pretrained(out)
    torch.testing.assert_close(logits(unmerged, inputs), logits(merged, inputs), rtol=1e-4, atol=1e-4)
    ours_merged = unmerged.merge_and_unload().state_dict()
    base = load_file(tiny_v2 / "model.safetensors")
    written = load_file(out / "model.safetensors")
    for key, value in written.items():
        torch.testing.assert_close(value, ours_merged[key], rtol=0, atol=1e-6, msg=key)
        if not key.endswith(("_proj.weight", "fc1.weight", "fc2.weight", "proj.weight")):
            assert torch.equal(value, base[key]), key

    # transformers: the merged folder as a model, and the adapter onto the reference base model.
    ours = logits(merged, inputs)
    torch.testing.assert_close(ours, logits(reference(out), inputs), rtol=1e-4, atol=1e-4)
    ref_adapted = PeftModel.from_pretrained(reference(tiny_v2), str(adapter)).eval()
    torch.testing.assert_close(ours, logits(ref_adapted, inputs), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, logits(Model.from_pretrained(tiny_v2), inputs), atol=1e-3)


def test_lora_without_merge_writes_the_adapter(tiny_v2, dataset, tmp_path):
    out = run(tiny_v2, dataset, tmp_path / "out").output
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").is_file()  # the processor files travel with the adapter
    with pytest.raises(InputError, match="already holds a fine-tuned model"):
        run(tiny_v2, dataset, out)


def test_full_finetuning_never_imports_transformers_or_peft(tiny_v2, dataset, tmp_path):
    """peft (and with it transformers) is imported only for LoRA."""
    code = ("import sys, torch; torch.set_num_threads(1); from smolvlm.training import finetune; "
            f"finetune(model={str(tiny_v2)!r}, data={str(dataset)!r}, output={str(tmp_path / 'out')!r}, full=True, "
            "steps=1, progress=False); assert not {'transformers', 'peft'} & set(sys.modules), 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@needs_shared
def test_tied_embeddings_stay_tied(tmp_path, dataset):
    tied = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    out = finetune(model=str(tied), data=str(dataset), output=str(tmp_path / "out"), full=True, steps=2, lr=1e-3,
                   progress=False).output
    written = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in written  # as save_pretrained writes a tied head
    assert not torch.equal(written["model.text_model.embed_tokens.weight"],
                           load_file(tied / "model.safetensors")["model.text_model.embed_tokens.weight"])
    processor = Processor.from_pretrained(out)
    inputs = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    torch.testing.assert_close(logits(Model.from_pretrained(out), inputs), logits(reference(out), inputs),
                               rtol=1e-4, atol=1e-4)
