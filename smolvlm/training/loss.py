"""The training loss: next-token cross-entropy on the labelled tokens, computed without full-vocabulary logits for the
tokens that carry no loss (image and prompt tokens are most of a multimodal sequence)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model import Model
from .data import IGNORE


def loss_sum(model: Model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses, number of labelled tokens) for a right-padded batch from `data.collate`.

    The reference's loss (shift by one, mean over labels != -100) is loss_sum / count. Right padding needs no
    attention mask: causal attention never lets a real token see the padding after it.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    features = None
    if batch["pixel_values"] is not None:
        features = model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
    embeds = model.embed(input_ids, features)  # [B, T, D]
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).expand(b, t)
    hidden = model.model.text_model(embeds, positions)  # [B, T, D]
    targets = labels[:, 1:]  # token t predicts token t + 1
    scored = targets != IGNORE  # [B, T-1]
    logits = model.lm_head(hidden[:, :-1][scored]).float()  # [N, V], only where there is a label
    return F.cross_entropy(logits, targets[scored], reduction="sum"), scored.sum()


def label_count(batch: dict) -> int:
    """Labelled tokens of a batch (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def enable_gradient_checkpointing(model: Model) -> None:
    """Recompute each decoder and vision encoder layer in the backward pass instead of keeping its activations."""
    layers = [*model.model.text_model.layers, *model.model.vision_model.encoder.layers]
    for layer in layers:
        # An instance attribute shadows the class's forward for nn.Module.__call__ (hooks and peft still apply).
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
