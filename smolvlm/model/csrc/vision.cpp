// The vision tower's attention, residual-add + LayerNorm and GELU: the tower's matmuls already run near this CPU's
// bf16 peak in oneDNN, while torch's CPU flash attention reaches ~150 GFLOP/s without AMX; this one ~290. With AMX,
// bf16 attention runs on the tiles (amx.cpp).
#include "common.h"

namespace smolvlm {
// Key/value blocks of one head in the layouts the packed matmuls read as weights (`tile`, and AMX's B operand in
// amx.cpp). K [L, Dh] (row stride ld) -> "rows" = keys, reduction over Dh; V [L, Dh] -> V^T: "rows" = head dims,
// reduction over keys (Lp = L padded to 16 or more; the padding stays as the caller zeroed it).
void pack_keys(const bf16* k, int64_t ld, int64_t L, int64_t Dh, bf16* out) {
  // [Lp/16, Dh/2, 16, 2]: key j's dims 2p, 2p+1 are pair p of lane j % 16 in block j / 16; one gather per pair p of
  // 16 keys
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(int32_t(ld / 2)));  // lane r: key r's offset in pairs
  for (int64_t j0 = 0; j0 < L; j0 += 16) {
    const __mmask16 m = tail_mask(L - j0);
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + j0 * Dh);
    for (int64_t p = 0; p < Dh / 2; ++p)
      _mm512_mask_storeu_epi32(dst + p * 16, m,
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, k + j0 * ld + 2 * p, 4));
  }
}
void pack_values(const bf16* v, int64_t ld, int64_t L, int64_t Lp, int64_t Dh, bf16* out) {
  // [Dh/16, Lp/2, 16, 2]: keys 2i, 2i+1 of dim d are pair i of lane d % 16 in block d / 16
  if (Dh % 32 == 0) {  // dims d..d+31 of keys j, j+1 interleaved: pair j / 2 of blocks d / 16 and d / 16 + 1
    alignas(64) static const int16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                               8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i first = _mm512_load_si512(lo), second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
    for (int64_t j = 0; j < L; j += 2)
      for (int64_t d = 0; d < Dh; d += 32) {
        const __m512i a = _mm512_loadu_si512(v + j * ld + d);
        const __m512i b = j + 1 < L ? _mm512_loadu_si512(v + (j + 1) * ld + d) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + (d / 16) * 16 * Lp + j * 16, _mm512_permutex2var_epi16(a, first, b));
        _mm512_storeu_si512(out + (d / 16 + 1) * 16 * Lp + j * 16, _mm512_permutex2var_epi16(a, second, b));
      }
    return;
  }
  for (int64_t j = 0; j < L; ++j) {
    bf16* dst = out + (j / 2) * 32 + j % 2;
    for (int64_t d = 0; d < Dh; ++d) dst[(d / 16) * 16 * Lp + (d % 16) * 2] = v[j * ld + d];
  }
}
void pack_keys(const float* k, int64_t ld, int64_t L, int64_t Dh, float* out) {
  for (int64_t j = 0; j < L; ++j) {
    float* dst = out + (j / 16) * 16 * Dh + j % 16;
    for (int64_t d = 0; d < Dh; ++d) dst[d * 16] = k[j * ld + d];
  }
}
void pack_values(const float* v, int64_t ld, int64_t L, int64_t Lp, int64_t Dh, float* out) {
  for (int64_t j = 0; j < L; ++j) {
    float* dst = out + j * 16;
    for (int64_t d = 0; d < Dh; ++d) dst[(d / 16) * 16 * Lp + d % 16] = v[j * ld + d];
  }
}

namespace {

constexpr int64_t Q_BLOCK = 64;  // query rows per softmax block (their scores stay in L2)

// Bidirectional multi-head attention as the reference's SDPA: softmax(q k^T / sqrt(Dh) + mask) v, per (frame, head).
// q, k, v: [B, L, H * Dh] (the projections' outputs); mask: additive [B, L] over keys, or empty. Scores and the
// softmax run in fp32; the probabilities are rounded to the input dtype for the second product, as torch's CPU
// flash attention does.
template <typename T>
void attention(const T* q, const T* k, const T* v, const float* mask, T* out, int64_t B, int64_t L, int64_t H,
               int64_t Dh) {
  const int64_t D = H * Dh, Lp = (L + 15) / 16 * 16, Dp = (Dh + 15) / 16 * 16;
  const float scale = 1.0f / std::sqrt(float(Dh));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> keys(Lp * Dh, T(0)), values(Dp * Lp, T(0)), probs(Q_BLOCK * Lp, T(0));
    std::vector<float> scores(Q_BLOCK * Lp), o(Q_BLOCK * Dh), inv(Q_BLOCK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, base = b * L * D + h * Dh;
      pack_keys(k + base, D, L, Dh, keys.data());
      pack_values(v + base, D, L, Lp, Dh, values.data());
      for (int64_t i0 = 0; i0 < L; i0 += Q_BLOCK) {
        const int64_t rows = std::min(Q_BLOCK, L - i0);
        matmul_serial(q + base + i0 * D, D, rows, Dh, keys.data(), Lp, scores.data(), Lp);  // [rows, Lp]
        for (int64_t i = 0; i < rows; ++i)  // numerators rounded to T (padded keys' lanes stay 0); 1 / denominators
          inv[i] = softmax_numerators(scores.data() + i * Lp, L, scale, mask ? mask + b * L : nullptr,
                                      probs.data() + i * Lp);
        matmul_serial(probs.data(), Lp, rows, Lp, values.data(), Dh, o.data(), Dh);  // [rows, Dh]
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < Dh; ++d) out[base + (i0 + i) * D + d] = from_f<T>(o[i * Dh + d] * inv[i]);
      }
    }
  });
}

// h = x + y rounded to T (the residual stream), and LayerNorm(h) * weight + bias in fp32, rounded once; per row.
template <typename T>
void add_layer_norm(const T* x, const T* y, const T* weight, const T* bias, T* h, T* out, int64_t R, int64_t D,
                    float eps) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D + 16);
    for (int64_t r = begin; r < end; ++r) {
      __m512 sum = _mm512_setzero_ps(), sq = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        const __m512 v = round16(_mm512_add_ps(load16(x + r * D + i, m), load16(y + r * D + i, m)), T());
        store16(h + r * D + i, v, m);
        _mm512_storeu_ps(row.data() + i, v);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, v));
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / D);
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        const __m512 c = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(row.data() + i), mean);
        sq = _mm512_fmadd_ps(c, c, sq);
      }
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / D + eps));
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row.data() + i), mean), rstd);
        store16(out + r * D + i, _mm512_fmadd_ps(c, load16(weight + i, m), load16(bias + i, m)), m);
      }
    }
  });
}

// tanh(x) to ~1 ulp: Cephes' odd polynomial below |x| = 0.625, else 1 - 2 / (exp(2|x|) + 1) with x's sign.
inline __m512 tanh_ps(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x), z = _mm512_mul_ps(x, x);
  __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
  // 1 / (e + 1) by a Newton step from the 14-bit reciprocal (a division is ~2x slower here); tanh(20) is 1 in fp32,
  // and the clamp keeps e finite.
  const __m512 d = _mm512_add_ps(exp_ps(_mm512_min_ps(_mm512_add_ps(ax, ax), _mm512_set1_ps(40.0f))),
                                 _mm512_set1_ps(1.0f));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  const __m512 large = _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), r, _mm512_set1_ps(1.0f));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int32_t(0x80000000u)));
  const __m512 signed_large = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(large), sign));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ), signed_large, small);
}

// y = GELU(y) with the tanh approximation, in place, with torch's CPU kernel's operations in its order (fp32, rounded
// once to T): 0.5 y (1 + tanh(sqrt(2 / pi) (y + 0.044715 y^3))). Run after oneDNN's matmul for fc1, whose own fused
// GELU costs ~0.7x the matmul.
template <typename T>
void gelu_tanh(T* y, int64_t n) {
  at::parallel_for(0, (n + 15) / 16, 2048, [&](int64_t begin, int64_t end) {
    const __m512 beta = _mm512_set1_ps(float(M_SQRT2 * M_2_SQRTPI * 0.5)), kappa = _mm512_set1_ps(0.044715f);
    for (int64_t i = begin * 16; i < std::min(n, end * 16); i += 16) {
      const __m512 x = load16(y + i, tail_mask(n - i));
      const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 inner = _mm512_mul_ps(beta, _mm512_add_ps(x, _mm512_mul_ps(kappa, cube)));
      const __m512 res = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                                       _mm512_add_ps(_mm512_set1_ps(1.0f), tanh_ps(inner)));
      store16(y + i, res, tail_mask(n - i));
    }
  });
}

}  // namespace

void gelu_tanh_(torch::Tensor& y) {
  TORCH_CHECK(y.is_contiguous(), "gelu_tanh_: a contiguous tensor");
  if (y.scalar_type() == torch::kBFloat16)
    gelu_tanh(ptr<bf16>(y), y.numel());
  else
    gelu_tanh(ptr<float>(y), y.numel());
}

std::vector<torch::Tensor> add_layer_norm(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& weight,
                                          const torch::Tensor& bias, double eps) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes(), "add_layer_norm: x, y [..., D]");
  const int64_t D = x.size(-1), R = x.numel() / D;
  auto h = torch::empty_like(x), out = torch::empty_like(x);
  if (x.scalar_type() == torch::kBFloat16)
    add_layer_norm(ptr<bf16>(x), ptr<bf16>(y), ptr<bf16>(weight), ptr<bf16>(bias), ptr<bf16>(h), ptr<bf16>(out), R, D,
                   float(eps));
  else
    add_layer_norm(ptr<float>(x), ptr<float>(y), ptr<float>(weight), ptr<float>(bias), ptr<float>(h),
                   ptr<float>(out), R, D, float(eps));
  return {h, out};
}

torch::Tensor vision_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, int64_t n_heads) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "attention: [B, L, D]");
  const int64_t B = q.size(0), L = q.size(1), Dh = q.size(2) / n_heads;
  TORCH_CHECK(Dh % 2 == 0 && k.sizes() == q.sizes() && v.sizes() == q.sizes(), "attention: q, k, v shapes");
  auto out = torch::empty_like(q);
  const float* m = mask.numel() ? mask.data_ptr<float>() : nullptr;
  if (q.scalar_type() == torch::kBFloat16 && amx_enabled && (Dh == 32 || Dh == 64))
    attention_amx(ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), m, ptr<bf16>(out), B, L, n_heads, Dh);
  else if (q.scalar_type() == torch::kBFloat16)
    attention(ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), m, ptr<bf16>(out), B, L, n_heads, Dh);
  else
    attention(ptr<float>(q), ptr<float>(k), ptr<float>(v), m, ptr<float>(out), B, L, n_heads, Dh);
  return out;
}

}  // namespace smolvlm
