"""QLoRA: the 4-bit NF4 base computes what its dequantized weights compute, the dequantized weights are within NF4's
rounding of the originals, and a QLoRA run writes an adapter (and merged model) that smolvlm and transformers + peft
load with the same logits; the errors a QLoRA request can hit name the problem."""

import json

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from smolvlm import InputError, Model
from smolvlm.training import finetune
from smolvlm.training.qlora import QUANTIZED_PARTS, dequantized, load_quantized, quantize_linears
from test_outputs import logits, reference

# The tolerance NF4 implies: its 16 levels (in units of a 64-weight block's absmax) are at most 1 - 0.7230 apart, so
# rounding moves a weight by up to half of that, 0.139 x absmax; the absmax itself is stored in 8 bits (double
# quantization) and the dequantized weight in bf16, which together add up to ~10% of that (measured: <= 0.153).
NF4_BOUND = (1 - 0.7229568362236023) / 2 * 1.15


def test_nf4_forward_equals_its_dequantized_weights(tiny_v2, inputs):
    original = Model.from_pretrained(tiny_v2, dtype="bfloat16")
    quantized = load_quantized(tiny_v2, torch.bfloat16, torch.device("cpu"))
    linears = {n for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    parts = {n.split(".")[1] for n in linears}
    assert parts == {"text_model", "vision_model", "connector"} and "lm_head" not in linears
    assert all(m.weight.quant_state.nested and m.weight.quant_type == "nf4"  # double quantization, NF4
               for n, m in quantized.named_modules() if n in linears)
    for name in linears:  # two 4-bit weights per byte (rows padded to whole 64-weight blocks: see PaddedLinear4bit)
        m = quantized.get_submodule(name)
        assert m.weight.numel() * 2 == m.out_features * (m.in_features + -m.in_features % 64), name

    plain = dequantized(load_quantized(tiny_v2, torch.bfloat16, torch.device("cpu")))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    # The 4-bit model computes exactly what its dequantized weights compute in bf16 (both matmuls run in bf16 on the
    # same bf16 weights; the only differences are bf16 rounding of the accumulation order).
    torch.testing.assert_close(logits(quantized, inputs), logits(plain, inputs), rtol=2e-2, atol=2e-2)

    # And those weights are the originals within NF4 rounding, block by block.
    for name in linears:
        w = original.get_submodule(name).weight.float().flatten()
        d = plain.get_submodule(name).weight.float().flatten()
        pad = -len(w) % 64
        absmax = torch.nn.functional.pad(w.abs(), (0, pad)).view(-1, 64).amax(1).repeat_interleave(64)[: len(w)]
        assert ((d - w).abs() <= NF4_BOUND * absmax + 1e-6).all(), name
        assert (d - w).abs().max() > 0  # it was quantized, not copied


def test_quantized_while_read_equals_quantized_after_loading(tiny_v2):
    """load_quantized reads and quantizes one weight at a time; the model is the one that quantizing the whole loaded
    bf16 model gives: the same 4-bit codes, the same scales, the same unquantized weights."""
    after = Model.from_pretrained(tiny_v2, dtype="bfloat16")
    for part in QUANTIZED_PARTS:
        quantize_linears(getattr(after.model, part), torch.bfloat16)
    read = load_quantized(tiny_v2, torch.bfloat16, torch.device("cpu"))
    expected = dict(after.named_parameters())
    assert set(dict(read.named_parameters())) == set(expected)
    for name, p in read.named_parameters():
        assert not p.requires_grad and p.dtype == expected[name].dtype and torch.equal(p, expected[name]), name
        if isinstance(p, bnb.nn.Params4bit):
            q, e = p.quant_state, expected[name].quant_state
            assert torch.equal(q.absmax, e.absmax) and torch.equal(q.state2.absmax, e.state2.absmax), name
            assert q.shape == e.shape and q.offset == e.offset, name
    assert read.is_loaded_in_4bit and sum(isinstance(p, bnb.nn.Params4bit) for p in read.parameters()) > 0


def run(tiny, dataset, output, **options):
    return finetune(model=str(tiny), data=str(dataset), output=str(output), steps=3, batch_size=2, progress=False,
                    qlora=True, **options)


def test_qlora_adapter_and_merge_load_in_smolvlm_and_transformers(tiny_v2, dataset, tmp_path, inputs):
    from peft import PeftModel

    result = run(tiny_v2, dataset, tmp_path / "out", lora_r=4, lr=1e-2, lora_targets="text,connector,vision",
                 merge=True)
    out, adapter = result.output, result.adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_v2)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert {v.dtype for v in tensors.values()} == {torch.float32}  # adapters train in fp32 over the bf16 compute
    for part in ("text_model", "connector", "vision_model"):
        assert any(part in k and "lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items()), part

    # The merged checkpoint is the full-precision base (fp32 here, its own dtype) with the adapters folded in: it
    # equals the adapter on the plain base, in smolvlm and in transformers + peft.
    written = load_file(out / "model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float32}
    merged = logits(Model.from_pretrained(out), inputs)
    ours = logits(PeftModel.from_pretrained(Model.from_pretrained(tiny_v2), str(adapter)).eval(), inputs)
    theirs = logits(PeftModel.from_pretrained(reference(tiny_v2), str(adapter)).eval(), inputs)
    torch.testing.assert_close(merged, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, logits(reference(out), inputs), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, logits(Model.from_pretrained(tiny_v2), inputs), atol=1e-3)

    # smolvlm.load (what `smolvlm serve` and `smolvlm generate` load) takes the adapter folder: its base + adapter.
    import smolvlm

    question = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), (200, 30, 30))},
                                             {"type": "text", "text": "Colour?"}]}]
    answers = [smolvlm.load(f, progress=False).complete(question, max_new_tokens=8).token_ids for f in (adapter, out)]
    assert answers[0] == answers[1]


def test_qlora_errors_name_the_problem(tiny_v2, dataset, tmp_path):
    with pytest.raises(InputError, match="--qlora .* can't be combined with --full"):
        run(tiny_v2, dataset, tmp_path / "a", full=True)
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    for f in tiny_v2.iterdir():
        (quantized / f.name).write_bytes(f.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"already quantized \(bitsandbytes\); --qlora quantizes the base itself"):
        run(quantized, dataset, tmp_path / "b")


def test_missing_training_extra_is_named(tiny_v2, dataset, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: import raises ImportError
    with pytest.raises(InputError, match=r"--qlora .* needs the Python package 'bitsandbytes'.*smolvlm\[train\]"):
        run(tiny_v2, dataset, tmp_path / "out")
