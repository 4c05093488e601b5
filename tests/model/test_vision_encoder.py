import pytest
import torch

from smolvlm.config import VisionConfig
from smolvlm.model.vision import VisionEmbeddings, VisionTransformer


def top_left_mask(frames: int, h: int, w: int, valid: list[tuple[int, int]]) -> torch.Tensor:
    mask = torch.zeros(frames, h, w, dtype=torch.bool)
    for f, (vh, vw) in enumerate(valid):
        mask[f, :vh, :vw] = True
    return mask


@pytest.mark.parametrize("n", [8, 16, 24, 26, 27, 28, 30, 32])
def test_position_ids_match_reference(n):
    # Same float32 bucketize arithmetic as the reference, on full, padded and odd grids (the 2.2B models use n=27).
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionEmbeddings

    kw = dict(hidden_size=4, image_size=n * 2, patch_size=2)
    ref, ours = SmolVLMVisionEmbeddings(SmolVLMVisionConfig(**kw)), VisionEmbeddings(VisionConfig(**kw))
    ours.load_state_dict(ref.state_dict())
    valid = [(n, n), (n - 1, n), (n // 2 + 1, n - 3), (1, 1), (3, n), (n, 5)]
    mask = top_left_mask(len(valid), n, n, valid)
    pixels = torch.randn(len(valid), 3, n * 2, n * 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels, mask), ref(pixels, mask), rtol=0, atol=0)


def test_vision_tower_matches_reference_with_padded_patches(pair):
    ref_tower, tower = pair.ref.model.vision_model, pair.ours.model.vision_model
    assert isinstance(tower, VisionTransformer)
    pixels = torch.rand(3, 3, 64, 64) * 2 - 1
    mask = top_left_mask(3, 8, 8, [(8, 8), (5, 8), (8, 3)])
    with torch.no_grad():
        full = tower(pixels, torch.ones(3, 8, 8, dtype=torch.bool))
        padded = tower(pixels, mask)
        torch.testing.assert_close(padded, ref_tower(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state)
        torch.testing.assert_close(full, ref_tower(pixel_values=pixels).last_hidden_state)
    # The fully valid frame is unaffected by the others' key masks; padded keys change the padded frames.
    torch.testing.assert_close(padded[0], full[0])
    assert not torch.allclose(padded[1], full[1])
