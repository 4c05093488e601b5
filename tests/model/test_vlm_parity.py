"""Logits of smolvlm.Model vs the reference forward (fp32, eager attention) on tiny checkpoints of both families.

Our attention is F.scaled_dot_product_attention. Its fused CPU kernel normalises the softmax after the PV matmul, which
differs from eager attention by a few ulp; two random layers of std-0.15 weights amplify that to ~1e-5 on logits of
magnitude ~6, right at assert_close's fp32 tolerance. SDPA's math backend computes in eager's order, so the parity
checks run under it and must meet the default fp32 tolerances; `test_default_kernel_matches_reference_sdpa` checks
the fused kernel against the reference's own SDPA path.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from smolvlm import InputError
from tiny import TINY_IMAGE_SEQ_LEN as N

IMAGE = 49190  # <image>
SIDE = 64  # tiny tile side


def prompt(images_per_row: list[int], length: int, seed: int = 0) -> torch.Tensor:
    """[B, length] ids: random text with N consecutive <image> tokens per frame, one text token between frames."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (len(images_per_row), length), generator=g)  # plain BPE tokens only
    for row, k in enumerate(images_per_row):
        for f in range(k):
            start = 3 + f * (N + 1)
            ids[row, start : start + N] = IMAGE
    return ids


def frames(images_per_row: list[int], seed: int = 0):
    """pixel_values [B, I, 3, S, S] in [-1, 1] with all-zero padding frames, and the matching pixel_attention_mask."""
    g = torch.Generator().manual_seed(seed)
    b, i = len(images_per_row), max(images_per_row)
    pixels = torch.rand(b, i, 3, SIDE, SIDE, generator=g) * 2 - 1
    mask = torch.ones(b, i, SIDE, SIDE, dtype=torch.long)
    for row, k in enumerate(images_per_row):
        pixels[row, k:] = 0
        mask[row, k:] = 0
    return pixels, mask


def check(pair, **inputs):
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        expected = pair.ref(**inputs).logits
        got = pair.ours(**inputs)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)
    return got


def test_text_only(pair):
    check(pair, input_ids=prompt([0, 0], 24))


def test_one_image(pair):
    pixels, mask = frames([1])
    check(pair, input_ids=prompt([1], N + 12), pixel_values=pixels, pixel_attention_mask=mask)


def test_one_image_without_pixel_mask(pair):
    pixels, _ = frames([1])
    check(pair, input_ids=prompt([1], N + 12), pixel_values=pixels)


def test_rows_with_different_numbers_of_images(pair):
    # Row 0 has one image and two all-zero padding frames, row 1 three images: 4 real frames, one vision batch.
    pixels, mask = frames([1, 3], seed=1)
    ids = prompt([1, 3], 3 * (N + 1) + 8, seed=1)
    check(pair, input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask)
    assert pair.ours.get_image_features(pixels, mask).shape == (4 * N, pair.config.text_config.hidden_size)


def left_padded(seed: int = 2):
    ids = prompt([1, 2], 2 * (N + 1) + 8, seed=seed)
    pad = 7
    ids[0] = torch.cat([torch.full((pad,), 2), ids[0, :-pad]])  # row 0 shifted right behind 7 pad tokens
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :pad] = 0
    pixels, mask = frames([1, 2], seed=seed)
    return ids, attention_mask, pixels, mask


def test_left_padded_batch_with_position_ids(pair):
    ids, attention_mask, pixels, mask = left_padded()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # what generation passes
    check(
        pair,
        input_ids=ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixels,
        pixel_attention_mask=mask,
    )


def test_left_padded_batch_default_positions(pair):
    # position_ids default to arange(T) even with padding, and pad-only query rows (no visible key) attend uniformly
    # like the reference's additive-mask eager attention, instead of producing NaN.
    ids, attention_mask, pixels, mask = left_padded(seed=3)
    check(pair, input_ids=ids, attention_mask=attention_mask, pixel_values=pixels, pixel_attention_mask=mask)


def test_default_kernel_matches_reference_sdpa(pair, tmp_path):
    # The fused kernel we run by default gives what the reference gives with its default (sdpa) attention.
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(pair.folder, dtype=torch.float32, attn_implementation="sdpa")
    pixels, mask = frames([1, 2], seed=6)
    ids = prompt([1, 2], 2 * (N + 1) + 8, seed=6)
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, pixel_values=pixels, pixel_attention_mask=mask).logits
        got = pair.ours(ids, pixel_values=pixels, pixel_attention_mask=mask)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("valid", [(40, 56), (37, 50), (64, 24)])
def test_frame_with_padded_region(pair, valid):
    # A square frame whose image covers only its top-left h x w pixels (the rest is zero and masked), next to a full
    # frame: non-square valid patch grids, fractional position ids, and a key mask in the vision attention.
    h, w = valid
    pixels, mask = frames([2], seed=4)
    pixels[0, 1, :, h:, :] = 0
    pixels[0, 1, :, :, w:] = 0
    mask[0, 1, h:, :] = 0
    mask[0, 1, :, w:] = 0
    check(pair, input_ids=prompt([2], 2 * (N + 1) + 6, seed=4), pixel_values=pixels, pixel_attention_mask=mask)


def test_image_features_match_reference(pair):
    pixels, mask = frames([2, 1], seed=5)
    mask[1, 0, 30:] = 0
    with torch.no_grad():
        expected = torch.cat(pair.ref.model.get_image_features(pixels, mask).pooler_output)
        got = pair.ours.get_image_features(pixels, mask)
    torch.testing.assert_close(got, expected)


def test_all_padding_frames(pair):
    # SmolVLM2 keeps frame 0 when no frame is real (its reference does); Idefics3 keeps none.
    pixels = torch.zeros(1, 2, 3, SIDE, SIDE)
    with torch.no_grad():
        got = pair.ours.get_image_features(pixels)
    assert got.shape[0] == (N if pair.family == "v2" else 0)
    # Either way, text without exactly that many <image> tokens is a count mismatch, as in the reference (v5).
    tokens = 0 if pair.family == "v2" else 1
    with pytest.raises(InputError, match=f"{tokens * N} image tokens but the images give {got.shape[0]} image features"):
        pair.ours(prompt([tokens], N + 4), pixel_values=pixels)


def test_image_token_count_mismatch(pair):
    pixels, mask = frames([1])
    ids = prompt([1], N + 12)
    ids[0, 3] = 100  # one <image> token fewer than the frame's N features
    with pytest.raises(InputError, match=f"{N - 1} image tokens but the images give {N} image features"):
        pair.ours(ids, pixel_values=pixels, pixel_attention_mask=mask)


def test_embed_scatters_features_in_order(pair):
    ids = prompt([2, 1], 2 * (N + 1) + 4)
    d = pair.config.text_config.hidden_size
    features = torch.arange(3 * N, dtype=torch.float32)[:, None].expand(3 * N, d)
    with torch.no_grad():
        embeds = pair.ours.embed(ids, features)
        plain = pair.ours.embed(ids)
    is_image = ids == IMAGE
    assert torch.equal(embeds[is_image][:, 0], torch.arange(3 * N, dtype=torch.float32))  # row-major (batch, position)
    assert torch.equal(embeds[~is_image], plain[~is_image])


def test_bad_shapes_are_input_errors(pair):
    pixels, mask = frames([1])
    with pytest.raises(InputError, match="pixel_values must be"):
        pair.ours.get_image_features(pixels[0])
    with pytest.raises(InputError, match="square"):
        pair.ours.get_image_features(pixels[..., :32])
    with pytest.raises(InputError, match="pixel_attention_mask has shape"):
        pair.ours.get_image_features(pixels, mask[:, :, :32])
    with pytest.raises(InputError, match="attention_mask has shape"):
        pair.ours(prompt([0], 8), attention_mask=torch.ones(1, 9, dtype=torch.long))
