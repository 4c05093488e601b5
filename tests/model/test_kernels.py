"""The C++ CPU kernels (smolvlm/model/kernels.py): packing, packed matmuls against float64 products, and the one-call
decode step against the plain text model's step over the same cache."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from smolvlm import Model, cpp_build
from smolvlm.model import kernels
from smolvlm.model.kv_cache import KVCache
from tiny import decode_step_both

pytestmark = pytest.mark.skipif(
    kernels.load() is None, reason="the C++ kernels don't run here (they need a C++ compiler and an AVX512-BF16 CPU)"
)

SHAPES = [(1, 48, 64), (3, 50, 6), (8, 16, 128), (9, 33, 64), (130, 40, 96)]  # (M, N, K): tails of every loop


@pytest.fixture(params=["avx512", "amx"])
def bf16_path(request):
    """Each path of the bf16 matmuls: AVX512-BF16 register tiles, and AMX tiles (where the CPU has them)."""
    if request.param == "amx" and not kernels.amx():
        pytest.skip("this CPU has no AMX tiles (Intel Sapphire Rapids or newer)")
    kernels.load().set_amx(request.param == "amx")
    yield request.param
    kernels.load().set_amx(kernels.amx())


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    cpp_build.clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running: torch's builder waits for it
    old = time.time() - cpp_build.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    cpp_build.clear_stale_lock(tmp_path)
    assert not lock.exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_pack_then_unpack_gives_the_weight_back(dtype):
    w = (torch.randn(50, 64) * 40).to(dtype)  # N not a multiple of 16: padded with zero rows
    packed = kernels.pack(w)
    assert packed.shape[0] == 4 and packed.dtype == dtype
    assert torch.equal(kernels.unpack(packed, 50), w)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 8e-3), (torch.float32, 1e-5)])
def test_linear_is_x_times_w_transposed(m, n, k, dtype, tol, bf16_path):
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(2, m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    y = kernels.linear(x, kernels.pack(w), torch.empty(0), n)
    assert y.shape == (2, m, n) and y.dtype == dtype
    ref = x.double() @ w.double().T
    assert ((y.double() - ref).abs() <= tol * (ref.abs() + ref.abs().mean())).all()


def quantize_int16(x: torch.Tensor) -> torch.Tensor:
    """What the int8 matmul multiplies its weights with: each row's groups of 32 inputs as int16 times one fp32 scale
    (max |x| / 32767), computed in fp32 as the kernel does."""
    m, k = x.shape
    groups = -(-k // 32)
    g = F.pad(x.float(), (0, groups * 32 - k)).view(m, groups, 32)
    top = g.abs().amax(dim=2, keepdim=True)
    inv = torch.where(top > 0, 32767 / top, torch.zeros_like(top))
    q = torch.round(g * inv).clamp(-32767, 32767)
    return (q * (top / 32767)).view(m, groups * 32)[:, :k]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_is_int16_x_times_the_dequantized_weight(m, n, k, dtype):
    g = torch.Generator().manual_seed(m + n * k)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g)
    w[0, 0] = 50.0  # an outlier: it coarsens only its own group of 32 inputs
    x[-1, :32] = 0.0  # an all-zero group of activations: scale 0, no division by it
    q, scale = kernels.quantize_int8(w)
    assert scale.shape == (n, -(-k // 32))
    step = scale.repeat_interleave(32, dim=1)[:, :k]  # [n, k]: each weight's quantization step
    assert ((q.float() * step - w).abs() <= step / 2 + 1e-6).all()  # half a step at most
    assert k <= 32 or (step[0, 32:] < 1).all()
    packed, packed_scale = kernels.pack(q), kernels.pack_scales(scale)
    torch.testing.assert_close(kernels.dequantize_int8(packed, packed_scale, n), q.float() * step)
    y = kernels.linear(x, packed, packed_scale, n)
    assert y.dtype == dtype
    xq = quantize_int16(x)
    assert ((xq - x.float()).abs() <= x.float().abs().max() / 32767).all()  # 15 bits: far finer than bf16's 8
    ref = xq.double() @ (q.double() * step.double()).T
    out_rounding = 8e-3 if dtype == torch.bfloat16 else 1e-5
    assert ((y.double() - ref).abs() <= out_rounding * (ref.abs() + ref.abs().mean())).all()


@pytest.mark.parametrize("kind", ["bf16", "fp32", "int8"])
def test_linear_rows_dont_depend_on_the_batch(kind, bf16_path):
    """Batch invariance: a row's output is bit-identical whatever rows share its matmul (1..130 of them: every
    register-tile height, AMX's 16 and 32 rows and their tails, and more rows than one pass over the weights
    takes)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    x, w = torch.randn(130, 192, generator=g).to(dtype), torch.randn(40, 192, generator=g).to(dtype)
    if kind == "int8":
        q, scale = kernels.quantize_int8(w)
        packed, scale = kernels.pack(q), kernels.pack_scales(scale)
    else:
        packed, scale = kernels.pack(w), torch.empty(0)
    alone = torch.cat([kernels.linear(x[i : i + 1], packed, scale, 40) for i in range(130)])
    for m in (2, 3, 5, 8, 9, 16, 17, 32, 33, 130):
        assert torch.equal(kernels.linear(x[:m], packed, scale, 40), alone[:m]), m


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_cached_attention_is_causal_sdpa_over_each_rows_own_keys(dtype, tol):
    """The prefill's attention: query (b, t) over keys 0..pos[b, t] of cache row b; against SDPA under that mask,
    and bit-identical for a row alone, with more padding, or beside other rows."""
    g = torch.Generator().manual_seed(3)
    b, heads, kv_heads, t, dh, s = 3, 6, 2, 20, 32, 40
    q = torch.randn(b, heads, t, dh, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, s, dh, generator=g).to(dtype).float() for _ in range(2))
    pos = torch.arange(t).expand(b, t).contiguous()
    pos[1] += 7  # a row continuing at position 7 (its first 7 keys were cached before)
    got = kernels.cached_attention(q, k, v, pos)
    assert got.shape == (b, t, heads * dh) and got.dtype == dtype
    mask = torch.arange(s) <= pos[:, None, :, None]  # [B, 1, T, S]
    ref = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got.float(), ref.transpose(1, 2).reshape(b, t, -1), rtol=tol, atol=tol)
    alone = kernels.cached_attention(q[2:, :, :9], k[2:], v[2:], pos[2:, :9])  # row 2, 9 tokens, no padding
    assert torch.equal(alone, got[2:, :9])
    with pytest.raises(RuntimeError, match="position 40 is outside the cache's 40"):
        kernels.cached_attention(q, k, v, pos + 20)


@pytest.mark.parametrize("dh", [16, 64, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_attention_gives_each_query_the_bits_of_the_decode_steps_attention(dtype, dh):
    """The prefill runs 16 queries of a head at a time; a lone query runs the decode step's per-query attention.
    Every query of a long prefill gets exactly the lone query's bits: blocks of 16 and their tails, consecutive
    positions (a prompt, a continued row) and any others (padding repeats positions), head dims of 1 to 5 vectors."""
    g = torch.Generator().manual_seed(4)
    b, heads, kv_heads, t, s = 3, 4, 2, 37, 90
    q = torch.randn(b, heads, t, dh, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, s, dh, generator=g).to(dtype).float() for _ in range(2))
    pos = torch.stack([torch.arange(t), torch.arange(t) + 40, torch.randint(0, s, (t,), generator=g)]).contiguous()
    got = kernels.cached_attention(q, k, v, pos)
    alone = torch.cat([kernels.cached_attention(q[:, :, i : i + 1].contiguous(), k, v, pos[:, i : i + 1].contiguous())
                       for i in range(t)], dim=1)
    assert torch.equal(got, alone)


@pytest.mark.parametrize("b,length,heads,dh",
                         [(1, 64, 4, 8), (2, 100, 3, 72), (3, 17, 2, 16), (2, 100, 3, 64), (3, 33, 2, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_vision_attention_is_the_references_sdpa(b, length, heads, dh, dtype, tol, bf16_path):
    """Against torch's SDPA as the reference calls it: heads split from [B, L, D], additive key mask or none. On AMX
    the bf16 heads of 32 and 64 dims run on the tiles (lengths off 16 and 32: padded keys and queries)."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(b, length, heads * dh, generator=g).to(dtype) for _ in range(3))
    mask = torch.zeros(b, 1, 1, length, dtype=dtype)
    mask[0, ..., length // 3 :] = torch.finfo(dtype).min  # frame 0: only its first third of patches are image
    mask[-1] = torch.finfo(dtype).min  # the last frame: no key allowed, so every key weighs the same (not NaN)

    def split(t):
        return t.view(b, length, heads, dh).transpose(1, 2)

    for m in (None, mask):
        got = kernels.vision_attention(q, k, v, m, heads)
        ref = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=m)
        torch.testing.assert_close(got, ref.transpose(1, 2).reshape(b, length, -1), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
def test_add_layer_norm_is_the_residual_add_then_the_norm(dtype, tol):
    g = torch.Generator().manual_seed(5)
    norm = torch.nn.LayerNorm(40, eps=1e-6).to(dtype)  # 40: a 16-wide tail
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    x, y = (torch.randn(3, 7, 40, generator=g).to(dtype) for _ in range(2))
    h, out = kernels.add_layer_norm(x, y, norm)
    assert torch.equal(h, x + y)  # the residual stream is exactly the plain path's
    with torch.no_grad():
        torch.testing.assert_close(out, norm(x + y), rtol=tol, atol=tol)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_decode_step_gives_the_plain_steps_logits_and_cache_in_fp32(family, request):
    folder = request.getfixturevalue(f"tiny_{family}")
    positions = torch.tensor([5, 17, 0])  # rows at different lengths, one at its first position
    fast, plain, cache, plain_cache = decode_step_both(folder, torch.float32, positions)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.k, plain_cache.k, rtol=1e-5, atol=1e-5)  # the new keys (RoPE'd) and values
    torch.testing.assert_close(cache.v, plain_cache.v, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cache.k[:, 2, :, 0], torch.zeros_like(cache.k[:, 2, :, 0]))  # position 0 was written


def test_decode_step_refuses_a_position_outside_the_cache(tiny_v2):
    model = Model.from_pretrained(tiny_v2, fuse=True)
    t = model.config.text_config
    cache = KVCache(t.num_hidden_layers, 2, t.num_key_value_heads, 16, t.head_dim)
    with pytest.raises(RuntimeError, match="position 16 is outside the cache's 16"):
        model.decode(torch.tensor([1, 2]), torch.tensor([3, 16]), cache, keys=16)


@pytest.mark.skipif(not kernels.amx(), reason="this CPU has no AMX tiles (Intel Sapphire Rapids or newer)")
def test_bf16_matmuls_run_on_amx_tiles_where_the_cpu_has_them():
    """Both paths are within bf16 rounding of the exact product, and they are two paths: their sums run in different
    orders (AVX512: even and odd input pairs apart; AMX: chunks of 32 in turn), so a few outputs in 10^4 differ in
    the last bit."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(128, 1536, generator=g).bfloat16(), torch.randn(256, 1536, generator=g).bfloat16()
    packed, ref = kernels.pack(w), x.double() @ w.double().T
    y = {}
    for amx in (False, True):
        kernels.load().set_amx(amx)
        y[amx] = kernels.linear(x, packed, torch.empty(0), 256)
        assert ((y[amx].double() - ref).abs() <= 8e-3 * (ref.abs() + ref.abs().mean())).all()
    kernels.load().set_amx(True)
    assert not torch.equal(y[False], y[True])


def test_decode_step_in_bf16_stays_within_bf16_rounding(tiny_v2, bf16_path):
    fast, plain, cache, plain_cache = decode_step_both(tiny_v2, torch.bfloat16, torch.tensor([9, 30]))
    assert ((fast - plain).norm() / plain.norm()) < 0.01
    assert (fast.argmax(-1) == plain.argmax(-1)).all()
    torch.testing.assert_close(cache.k, plain_cache.k, rtol=0.02, atol=0.02)


def decode_then_layers(folder, quantize):
    """Logits of one decode step by the C++ step and by the fused model's layers run token by token (the same
    matmuls and cached attention, torch's norms and elementwise ops), after one prefill of a 13-token prompt."""
    model = Model.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantize, fuse=True)
    t = model.config.text_config
    caches = [KVCache(t.num_hidden_layers, 2, t.num_key_value_heads, 32, t.head_dim) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    prompt, tokens = torch.randint(0, t.vocab_size, (2, 13), generator=g), torch.tensor([5, 7])
    steps, positions = torch.arange(13).expand(2, 13), torch.tensor([13, 13])
    with torch.inference_mode():
        for cache in caches:
            model.model.text_model(model.embed(prompt), steps, cache=cache, cache_positions=steps)
        fast = model.decode(tokens, positions, caches[0], keys=32).float()
        hidden = model.model.text_model(model.embed(tokens[:, None]), positions[:, None], cache=caches[1],
                                        cache_positions=positions[:, None])  # fmt: skip
        return fast, model.lm_head(hidden[:, 0]).float()


def test_int8_decode_step_runs_the_int8_weights(tiny_v2):
    fast, layers = decode_then_layers(tiny_v2, "int8")
    unquantized, _ = decode_then_layers(tiny_v2, None)
    assert ((fast - layers).norm() / layers.norm()) < 0.005
    assert (fast - layers).norm() < 0.2 * (unquantized - layers).norm()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, None), (torch.float32, 3e-7)])
def test_gelu_is_torchs_tanh_gelu(dtype, tol):
    """fc1's GELU pass: torch's tanh GELU to float rounding (bf16: within one rounding step), both sides of
    the polynomial/exponential switch of tanh, the saturated ends and IEEE specials; a 16-wide tail."""
    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(4099, generator=g) * 4, torch.linspace(-12, 12, 997),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 60.0, -60.0, 1e4, -1e4, float("inf"), -float("inf")])])
    x = x.to(dtype)
    ref = F.gelu(x, approximate="tanh")
    got = kernels.gelu_tanh_(x.clone())
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol, equal_nan=True)
    nan = kernels.gelu_tanh_(torch.tensor([float("nan")], dtype=dtype))
    assert nan.isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul_is_the_mlps_activation(dtype):
    """The prefill MLP's silu(gate) * up (the decode step's arithmetic) against torch's two ops, to float rounding;
    an intermediate size with a 16-wide tail."""
    g = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(2, 5, 2 * 40, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernels.silu_mul(gate_up)
    assert got.shape == (2, 5, 40) and got.dtype == dtype
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=1e-6 if dtype == torch.float32 else None,
                               atol=1e-6 if dtype == torch.float32 else None)
