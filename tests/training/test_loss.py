"""The training loss and its gradients equal the reference model's (transformers, fp32, eager, same labels)."""

import pytest
import torch

from smolvlm import Model
from smolvlm.processing import Processor
from smolvlm.training.data import collate, encode, read_jsonl
from smolvlm.training.loss import enable_gradient_checkpointing, label_count, loss_sum


def batch_of(folder, dataset, rows=None):
    processor = Processor.from_pretrained(folder)
    records, _ = read_jsonl(dataset, processor)
    return collate([encode(records[i], processor) for i in (rows or range(len(records)))], processor.pad_token_id)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected)
    scale = max(g.abs().max() for g in expected.values())
    for name in expected:  # atol relative to the largest gradient: some (the key biases') are 0 up to rounding
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_loss_and_gradients_match_reference(family, request, dataset):
    from transformers import AutoModelForImageTextToText

    folder = request.getfixturevalue(f"tiny_{family}")
    batch = batch_of(folder, dataset)
    assert batch["pixel_values"] is not None and (batch["attention_mask"] == 0).any()  # images and padding

    ours = Model.from_pretrained(folder)
    total, count = loss_sum(ours, batch)
    (total / count).backward()

    ref = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    out = ref(**batch)  # labels included: the reference shifts them and averages over labels != -100
    out.loss.backward()

    assert count == label_count(batch)
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(ours), grads(ref))


def test_gradient_accumulation_equals_one_big_batch(tiny_v2, dataset):
    """Token-weighted accumulation over micro-batches gives the gradient of the whole batch."""
    model = Model.from_pretrained(tiny_v2)
    whole = batch_of(tiny_v2, dataset)
    total, count = loss_sum(model, whole)
    (total / count).backward()
    expected = grads(model)
    model.zero_grad()
    parts = [batch_of(tiny_v2, dataset, [0, 1]), batch_of(tiny_v2, dataset, [2, 3])]
    n = sum(label_count(p) for p in parts)
    for part in parts:
        (loss_sum(model, part)[0] / n).backward()
    assert_grads_close(grads(model), expected)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_v2, dataset):
    batch = batch_of(tiny_v2, dataset)
    plain, checkpointed = Model.from_pretrained(tiny_v2), Model.from_pretrained(tiny_v2)
    enable_gradient_checkpointing(checkpointed)
    calls = []
    for model in (plain, checkpointed):
        for layer in (model.model.text_model.layers[0].mlp, model.model.vision_model.encoder.layers[0].mlp):
            layer.register_forward_pre_hook(lambda module, args: calls.append(module))
        total, count = loss_sum(model, batch)
        (total / count).backward()
    assert len(calls) == 2 + 4  # the checkpointed layers ran again in the backward pass
    assert_grads_close(grads(checkpointed), grads(plain))
