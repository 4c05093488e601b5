"""Reference (transformers, fp32, eager attention) and smolvlm models loaded from the same tiny checkpoint folder."""

from types import SimpleNamespace

import pytest
import torch

from smolvlm import Model


@pytest.fixture(scope="session", params=["v1", "v2"])
def pair(request):
    """One tiny checkpoint per family (v1: idefics3, v2: smolvlm), loaded by the reference and by us."""
    from transformers import AutoModelForImageTextToText

    folder = request.getfixturevalue(f"tiny_{request.param}")
    ref = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ours = Model.from_pretrained(folder)
    return SimpleNamespace(family=request.param, folder=folder, ref=ref, ours=ours, config=ours.config)
