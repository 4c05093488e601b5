"""The text decoder API the generation engine uses: text_model(inputs_embeds, position_ids, attn_mask, cache,
cache_positions) with a KVCache, checked against one full forward (the nanoVLM KV-cache-vs-no-cache test)."""

import pytest
import torch
import torch.nn.functional as F

from smolvlm.model import KVCache
from smolvlm.model.text import RMSNorm, RotaryEmbedding, additive_mask, masked_gqa
from tiny import TINY_IMAGE_SEQ_LEN as N

IMAGE = 49190


def new_cache(model, batch: int, max_len: int) -> KVCache:
    t = model.config.text_config
    return KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, max_len, t.head_dim, model.dtype, model.device)


def image_inputs(seed=0, rows=2, length=N + 14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (rows, length), generator=g)
    ids[:, 2 : 2 + N] = IMAGE
    pixels = torch.rand(rows, 1, 3, 64, 64, generator=g) * 2 - 1
    return ids, pixels


def test_rmsnorm_matches_reference_in_bf16():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ref, ours = LlamaRMSNorm(64, eps=1e-5), RMSNorm(64, 1e-5)
    weight = torch.randn(64).to(torch.bfloat16)
    ref.weight.data, ours.weight.data = weight.clone(), weight.clone()
    x = (torch.randn(3, 5, 64) * 4).to(torch.bfloat16)
    got = ours(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref(x), rtol=0, atol=0)  # upcast, normalise, cast back, then weight


def test_rotary_matches_reference(pair):
    ref = pair.ref.model.text_model.rotary_emb
    ours = pair.ours.model.text_model.rotary_emb
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, rtol=0, atol=0)
    assert ours.inv_freq.dtype == torch.float32
    positions = torch.tensor([[0, 1, 5, 4095], [7, 7, 0, 100]])
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = ours(positions, dtype)
        ref_cos, ref_sin = ref(torch.zeros(1, dtype=dtype), positions)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)


def decode(model, embeds, positions, masks, cache, cache_positions, chunks):
    """Run the decoder through `cache` over the given chunk ends of the sequence; all chunks' logits, concatenated."""
    logits, start = [], 0
    for end in chunks:
        sl = slice(start, end)
        hidden = model.model.text_model(embeds[:, sl], positions[:, sl], masks(start, end), cache, cache_positions[:, sl])
        logits.append(model.lm_head(hidden))
        start = end
    return torch.cat(logits, dim=1)


def test_token_by_token_with_cache_equals_full_forward(pair):
    model = pair.ours
    ids, pixels = image_inputs()
    b, t = ids.shape
    positions = torch.arange(t).expand(b, t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    with torch.no_grad():
        full = model(ids, pixel_values=pixels)
        embeds = model.embed(ids, model.get_image_features(pixels))
        cache = new_cache(model, batch=4, max_len=64)  # more rows and positions than used
        # Prefill the image and some text, then one token at a time; the mask covers keys 0..end-1.
        chunks = [N + 4, *range(N + 5, t + 1)]
        steps = decode(model, embeds, positions, lambda s, e: causal[s:e, :e], cache, positions, chunks)
    torch.testing.assert_close(steps, full)


def test_left_padded_rows_through_cache(pair):
    model = pair.ours
    ids, pixels = image_inputs(seed=1)
    b, t = ids.shape
    ids[0] = torch.cat([torch.full((5,), 2), ids[0, :-5]])
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    slots = torch.arange(t).expand(b, t)
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & attention_mask.bool()[:, None, :]  # [B, T, T]
    with torch.no_grad():
        full = model(ids, attention_mask, pixels, position_ids=positions)
        embeds = model.embed(ids, model.get_image_features(pixels))
        cache = new_cache(model, batch=2, max_len=t)
        chunks = [N + 8, *range(N + 9, t + 1)]
        steps = decode(model, embeds, positions, lambda s, e: allowed[:, None, s:e, :e], cache, slots, chunks)
    real = attention_mask.bool()  # pad-only query rows see no key, their values are irrelevant
    torch.testing.assert_close(steps[real], full[real])


def test_rows_at_different_lengths_share_a_step(pair):
    # Two sequences in cache rows 0 and 1, 9 and 4 tokens in, prefilled together and decoded together: each row
    # writes and reads only its own positions.
    model = pair.ours
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, 49152, (2, 11), generator=g)
    lengths = torch.tensor([9, 4])
    keys = torch.arange(16)
    with torch.no_grad():
        alone = [model(seqs[r : r + 1])[0] for r in range(2)]
        cache = new_cache(model, batch=2, max_len=16)
        # Prefill: row 1's tokens 4..8 are filler, written at positions 4..8 and masked out.
        pos = torch.arange(9).expand(2, 9)
        mask = (keys[:9] <= pos[:, :, None]) & (keys[:9] < lengths[:, None, None])  # [B, T, S]
        hidden = model.model.text_model(model.embed(seqs[:, :9]), pos, mask[:, None], cache, pos)
        prefill = model.lm_head(hidden)
        torch.testing.assert_close(prefill[0], alone[0][:9])
        torch.testing.assert_close(prefill[1, :4], alone[1][:4])
        for step in range(2):
            at = lengths + step  # [9, 4], then [10, 5]
            tokens = seqs.gather(1, at[:, None])
            visible = (keys[: int(at.max()) + 1] <= at[:, None])[:, None, None, :]  # [B, 1, 1, S]
            hidden = model.model.text_model(model.embed(tokens), at[:, None], visible, cache, at[:, None])
            logits = model.lm_head(hidden)[:, 0]
            torch.testing.assert_close(logits[0], alone[0][at[0]])
            torch.testing.assert_close(logits[1], alone[1][at[1]])


def test_cache_without_mask_is_causal_over_cache_positions(pair):
    model = pair.ours
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        embeds = model.embed(ids)
        plain = model.model.text_model(embeds, positions)
        cache = new_cache(model, batch=2, max_len=32)
        first = model.model.text_model(embeds[:, :6], positions[:, :6], cache=cache, cache_positions=positions[:, :6])
        rest = model.model.text_model(embeds[:, 6:], positions[:, 6:], cache=cache, cache_positions=positions[:, 6:])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), plain)


def test_cache_needs_cache_positions(pair):
    model = pair.ours
    with pytest.raises(ValueError, match="cache_positions"):
        model.model.text_model(torch.zeros(1, 2, 64), torch.arange(2)[None], cache=new_cache(model, 1, 4))


@pytest.mark.parametrize("t", [1, 5])
def test_masked_gqa_equals_sdpa_with_enable_gqa(t):
    """The CUDA path's grouped-query attention (folded query heads when decoding, repeated key heads else) is SDPA's
    enable_gqa, run here on the CPU."""
    g = torch.Generator().manual_seed(t)
    b, h, h_kv, s, d = 3, 9, 3, 40, 16
    q, k, v = (torch.randn(b, n, m, d, generator=g) for n, m in ((h, t), (h_kv, s), (h_kv, s)))
    allowed = torch.rand(b, 1, t, s, generator=g) < 0.7
    allowed[..., 0] = True
    mask = additive_mask(allowed, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = masked_gqa(q, k, v, mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # head i reads key head i // 3: changing key head 1 changes only query heads 3..5
    k2 = k.clone()
    k2[:, 1] += 1
    changed = (masked_gqa(q, k2, v, mask) - got).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 3
