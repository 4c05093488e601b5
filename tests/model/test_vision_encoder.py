import pytest
import torch

from smolvlm import Model
from smolvlm.config import VisionConfig
from smolvlm.model.vision import VisionEmbeddings, VisionTransformer
from tiny import make_tiny_checkpoint, needs_shared


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


@needs_shared
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_pass_in_slices_of_layers_gives_the_bits_of_one_pass(tmp_path, dtype):
    """The engine spreads a tile's vision pass over steps (begin_vision, run_vision..., end_vision): the features are
    get_image_features' bit for bit, in fp32 and in bf16 fused (the C++ kernels' fused add + LayerNorm where they
    run), with padded patches too."""
    folder = make_tiny_checkpoint(tmp_path, vision={"num_hidden_layers": 5})
    model = Model.from_pretrained(folder, dtype=dtype, fuse=dtype != "float32")
    pixels = (torch.rand(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    mask = torch.ones(1, 3, 64, 64, dtype=torch.long)
    mask[0, 1, 40:], mask[0, 2, :, 24:] = 0, 0  # frames 1 and 2 have padded patches
    with torch.inference_mode():
        whole = model.get_image_features(pixels, mask)  # [3 * N, D_t]
        frames, patch_mask = model.image_frames(pixels, mask)
        for slices in ([2, 1, 2], [1, 1, 1, 1, 1], [3, 4]):
            state = model.begin_vision(frames, patch_mask)
            for n in slices:
                assert state.done < 5
                model.run_vision(state, n)
            assert state.done == 5
            assert torch.equal(model.end_vision(state).flatten(0, 1), whole)
    assert whole.dtype == getattr(torch, dtype)
