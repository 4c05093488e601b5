// CPU kernels for the text decoder (AVX512-F + AVX512-BF16), built on first use by smolvlm/model/kernels.py.
//
// Why: batch-1 decoding reads every decoder weight once per token, so it runs at the speed memory is read. torch's
// matrix-vector products (oneDNN) read ~20 GB/s of this machine's ~33 from a model's many small matrices, and an eager
// decode step dispatches ~1200 aten ops (~5 ms). Here weights are packed so that each block of 16 output rows is one
// contiguous stream, and a whole decode step (30 layers: norms, projections, RoPE, cache writes, attention, MLP,
// lm_head) is one call.
//
// Packed layouts (kernels.py packs; N padded to a multiple of 16 with zero rows):
//   bf16 W [N, K] -> [N/16, K/2, 16, 2]: per pair of input channels, the 16 rows' two weights (VDPBF16PS's operand).
//   fp32 W [N, K] -> [N/16, K, 16].
//   int8 W [N, K] -> the bf16 layout, with fp32 scales [N] (weight-only quantization: activations stay bf16).
// Rounding follows the plain torch path op by op (each bf16 op rounds its fp32 result to nearest-even), so the
// results differ from it only by summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16 = uint16_t;

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
template <typename T> T from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline bf16 from_f<bf16>(float f) {  // round to nearest even, as torch's cast
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return bf16((u >> 16) | 0x40);  // NaN stays NaN
  return bf16((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
template <typename T> inline float rnd(float f) { return to_f(from_f<T>(f)); }  // f rounded to T

inline void store16(float* y, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(y, m, v); }
inline void store16(bf16* y, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(v)); }

// 32 packed weights (16 rows x 2 input channels) as bf16: loaded, or converted from int8 (small integers are exact
// in bf16; the scale is applied to the sums).
inline __m512bh weights32(const bf16* w) { return (__m512bh)_mm512_loadu_si512(w); }
inline __m512bh weights32(const int8_t* q) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// y[m, 0:16] = (x[m, :] . W-block) * scale for MT rows of bf16 x (scale: per output row, or null), W bf16 or int8
// (converted once per 32 weights for all MT rows). Rows <= 2 keep two accumulators each (even/odd k) to hide the
// multiply-add latency; more rows already give enough independent chains.
template <int MT, typename W, typename O>
void tile(const bf16* x, int64_t ldx, const W* w, int64_t K, O* y, int64_t ldy, __mmask16 mask, const float* scale) {
  constexpr int U = MT <= 2 ? 2 : 1;
  __m512 acc[MT][U];
  for (int m = 0; m < MT; ++m) for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  for (int64_t k = 0; k < K2; k += U)
    for (int u = 0; u < U && k + u < K2; ++u) {
      const __m512bh wv = weights32(w + (k + u) * 32);
      for (int m = 0; m < MT; ++m) {
        uint32_t pair; std::memcpy(&pair, x + m * ldx + 2 * (k + u), 4);
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
  for (int m = 0; m < MT; ++m) {
    __m512 s = U == 2 ? _mm512_add_ps(acc[m][0], acc[m][U - 1]) : acc[m][0];
    store16(y + m * ldy, scale ? _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, scale)) : s, mask);
  }
}

template <int MT, typename O>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, O* y, int64_t ldy, __mmask16 mask, const float*) {
  constexpr int U = MT <= 2 ? 2 : 1;
  __m512 acc[MT][U];
  for (int m = 0; m < MT; ++m) for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += U)
    for (int u = 0; u < U && k + u < K; ++u) {
      __m512 wv = _mm512_loadu_ps(w + (k + u) * 16);
      for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[m * ldx + k + u]), acc[m][u]);
    }
  for (int m = 0; m < MT; ++m) store16(y + m * ldy, U == 2 ? _mm512_add_ps(acc[m][0], acc[m][U - 1]) : acc[m][0], mask);
}

// One packed block of 16 int8 rows -> the same block in bf16, for many rows of x (converted once, not per tile).
void dequantize_block(const int8_t* q, int64_t K, bf16* out) {
  for (int64_t i = 0; i < 16 * K; i += 32) _mm512_storeu_si512(out + i, (__m512i)weights32(q + i));
}

constexpr int64_t MT_MAX = 8;  // rows of x per register tile
constexpr int64_t M_CHUNK = 128;  // rows of x per pass over the weights (their rows stay in L2 across the N blocks)

template <typename X, typename W, typename O>
void tiles(const X* x, int64_t ldx, const W* w, int64_t K, O* y, int64_t ldy, int64_t rows, __mmask16 mask,
           const float* scale) {
  switch (rows) {
    case 1: return tile<1>(x, ldx, w, K, y, ldy, mask, scale);
    case 2: return tile<2>(x, ldx, w, K, y, ldy, mask, scale);
    case 3: return tile<3>(x, ldx, w, K, y, ldy, mask, scale);
    case 4: return tile<4>(x, ldx, w, K, y, ldy, mask, scale);
    case 5: return tile<5>(x, ldx, w, K, y, ldy, mask, scale);
    case 6: return tile<6>(x, ldx, w, K, y, ldy, mask, scale);
    case 7: return tile<7>(x, ldx, w, K, y, ldy, mask, scale);
    default: return tile<8>(x, ldx, w, K, y, ldy, mask, scale);
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// A packed weight: bf16/fp32, or int8 with fp32 scales [NB * 16] (per output row).
struct Weight {
  torch::Tensor w, scale;
  bool int8() const { return w.scalar_type() == torch::kChar; }
};

// y [M, N] = x [M, K] @ W^T. Threads split W's blocks of 16 rows (NB = ceil(N / 16)).
template <typename X, typename O>
void matmul(const X* x, int64_t M, int64_t K, const Weight& W, O* y, int64_t N) {
  const int64_t NB = W.w.size(0), block = 16 * K;  // elements per packed block
  const float* scale = W.int8() ? W.scale.data_ptr<float>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
    const int64_t mc = std::min(M_CHUNK, M - m0);
    at::parallel_for(0, NB, 1, [&](int64_t b, int64_t e) {
      // int8 weights: converted inside the tile for a few rows of x; for more, once per block into a bf16 buffer
      std::vector<X> buffer(scale && mc > MT_MAX ? block : 0);
      for (int64_t nb = b; nb < e; ++nb) {
        const int64_t n0 = nb * 16;
        const __mmask16 mask = N - n0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n0)) - 1);
        auto run = [&](const auto* wb) {
          for (int64_t m = 0; m < mc; m += MT_MAX)
            tiles(x + (m0 + m) * K, K, wb, K, y + (m0 + m) * N + n0, N, std::min(MT_MAX, mc - m), mask,
                  scale ? scale + n0 : nullptr);
        };
        if constexpr (std::is_same_v<X, bf16>) {
          if (scale && buffer.empty()) { run(ptr<int8_t>(W.w) + nb * block); continue; }
          if (scale) { dequantize_block(ptr<int8_t>(W.w) + nb * block, K, buffer.data()); run(buffer.data()); continue; }
        }
        run(ptr<X>(W.w) + nb * block);
      }
    });
  }
}

torch::Tensor linear(const torch::Tensor& x, const Weight& W, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "linear: x must be [M, K] and contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(W.w.numel() == W.w.size(0) * 16 * K && N <= 16 * W.w.size(0), "linear: packed weight doesn't match x");
  auto y = torch::empty({M, N}, x.options());
  if (W.int8()) {  // bf16 activations (an fp32 x is rounded to bf16), output in x's dtype
    auto xb = x.to(torch::kBFloat16);
    if (x.scalar_type() == torch::kBFloat16)
      matmul(ptr<bf16>(xb), M, K, W, ptr<bf16>(y), N);
    else
      matmul(ptr<bf16>(xb), M, K, W, ptr<float>(y), N);
  } else if (x.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(W.w.scalar_type() == torch::kBFloat16, "linear: bf16 x needs a bf16 or int8 weight");
    matmul(ptr<bf16>(x), M, K, W, ptr<bf16>(y), N);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && W.w.scalar_type() == torch::kFloat, "linear: fp32 x needs fp32 W");
    matmul(ptr<float>(x), M, K, W, ptr<float>(y), N);
  }
  return y;
}

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes' range reduction and degree-5 polynomial (~1 ulp);
// 0 below -87.3 (where fp32's exp leaves the normal range), so masked keys (-inf) weigh exactly nothing.
inline __m512 exp_ps(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

// Key/value blocks of one head in the layouts `tile` reads as weights. K [L, Dh] (row stride ld) -> "rows" = keys,
// reduction over Dh; V [L, Dh] -> V^T: "rows" = head dims, reduction over keys (Lp = L padded to 16, zeros).
void pack_keys(const bf16* k, int64_t ld, int64_t L, int64_t Dh, bf16* out) {
  for (int64_t j = 0; j < L; ++j) {  // key j's (d, d+1) pairs go to lane j % 16 of its block
    const uint32_t* src = reinterpret_cast<const uint32_t*>(k + j * ld);
    uint32_t* dst = reinterpret_cast<uint32_t*>(out + (j / 16) * 16 * Dh) + j % 16;
    for (int64_t p = 0; p < Dh / 2; ++p) dst[p * 16] = src[p];
  }
}
void pack_values(const bf16* v, int64_t ld, int64_t L, int64_t Lp, int64_t Dh, bf16* out) {
  for (int64_t j = 0; j < L; ++j) {  // value j's dim d goes to lane d % 16, slot j % 2, of pair j / 2 in block d / 16
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

inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store16(bf16* y, __m512 v) { _mm256_storeu_si256((__m256i*)y, (__m256i)_mm512_cvtneps_pbh(v)); }

// y [M, N] (fp32, row stride ldy) = x [M, K] (row stride ldx) @ W^T for W packed, on this thread.
template <typename T>
void matmul_serial(const T* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    const __mmask16 mask = N - n0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (N - n0)) - 1);
    for (int64_t m = 0; m < M; m += MT_MAX)
      tiles(x + m * ldx, ldx, w + n0 * K, K, y + m * ldy + n0, ldy, std::min(MT_MAX, M - m), mask, nullptr);
  }
}

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
    std::vector<T> keys(Lp * Dh, T(0)), values(Dp * Lp, T(0)), probs(Q_BLOCK * Lp);
    std::vector<float> scores(Q_BLOCK * Lp), o(Q_BLOCK * Dh), inv(Q_BLOCK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, base = b * L * D + h * Dh;
      pack_keys(k + base, D, L, Dh, keys.data());
      pack_values(v + base, D, L, Lp, Dh, values.data());
      for (int64_t i0 = 0; i0 < L; i0 += Q_BLOCK) {
        const int64_t rows = std::min(Q_BLOCK, L - i0);
        matmul_serial(q + base + i0 * D, D, rows, Dh, keys.data(), Lp, scores.data(), Lp);  // [rows, Lp]
        for (int64_t i = 0; i < rows; ++i) {  // softmax numerators (padded keys 0), rounded to T; 1 / denominators
          float* s = scores.data() + i * Lp;
          __m512 mx = _mm512_set1_ps(-INFINITY);
          for (int64_t j = 0; j < Lp; j += 16) {  // scaled and masked scores; padded keys -inf
            const __mmask16 m = L - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (L - j)) - 1);
            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(scale));
            if (mask) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, mask + b * L + j));
            x = _mm512_mask_blend_ps(m, _mm512_set1_ps(-INFINITY), x);
            _mm512_storeu_ps(s + j, x);
            mx = _mm512_max_ps(mx, x);
          }
          const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
          __m512 sum = _mm512_setzero_ps();
          T* p = probs.data() + i * Lp;
          for (int64_t j = 0; j < Lp; j += 16) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), top));  // exp(-inf) = 0
            sum = _mm512_add_ps(sum, e);
            store16(p + j, e);
          }
          inv[i] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        matmul_serial(probs.data(), Lp, rows, Lp, values.data(), Dh, o.data(), Dh);  // [rows, Dh]
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < Dh; ++d) out[base + (i0 + i) * D + d] = from_f<T>(o[i * Dh + d] * inv[i]);
      }
    }
  });
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) { return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 round16(__m512 v, float) { return v; }
inline __m512 round16(__m512 v, bf16) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

// h = x + y rounded to T (the residual stream), and LayerNorm(h) * weight + bias in fp32, rounded once; per row.
template <typename T>
void add_layer_norm(const T* x, const T* y, const T* weight, const T* bias, T* h, T* out, int64_t R, int64_t D,
                    float eps) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D + 16);
    for (int64_t r = begin; r < end; ++r) {
      __m512 sum = _mm512_setzero_ps(), sq = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = D - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - i)) - 1);
        const __m512 v = round16(_mm512_add_ps(load16(x + r * D + i, m), load16(y + r * D + i, m)), T());
        store16(h + r * D + i, v, m);
        _mm512_storeu_ps(row.data() + i, v);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, v));
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / D);
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = D - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - i)) - 1);
        const __m512 c = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(row.data() + i), mean);
        sq = _mm512_fmadd_ps(c, c, sq);
      }
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / D + eps));
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = D - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (D - i)) - 1);
        const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row.data() + i), mean), rstd);
        store16(out + r * D + i, _mm512_fmadd_ps(c, load16(weight + i, m), load16(bias + i, m)), m);
      }
    }
  });
}

std::vector<torch::Tensor> add_layer_norm_op(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& weight,
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
  if (q.scalar_type() == torch::kBFloat16)
    attention(ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), m, ptr<bf16>(out), B, L, n_heads, Dh);
  else
    attention(ptr<float>(q), ptr<float>(k), ptr<float>(v), m, ptr<float>(out), B, L, n_heads, Dh);
  return out;
}

// out = weight * rms_norm(x), rounded like the plain path: normalize in fp32, round, scale, round.
template <typename T>
void rms_norm(const T* x, const T* weight, T* out, int64_t D, float eps) {
  float ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += to_f(x[i]) * to_f(x[i]);
  const float r = 1.0f / std::sqrt(ss / D + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = from_f<T>(to_f(weight[i]) * rnd<T>(to_f(x[i]) * r));
}

constexpr size_t LAYER_TENSORS = 10;  // per decoder layer in decode_step's list (kernels.py: decoder_weights)

struct Shape {
  int64_t D, H, Hkv, Dh, I, V, L, B, S;  // hidden, heads, kv heads, head dim, MLP, vocab, layers, cache rows, max_len
};

// One decode step for n rows, each with one new token at its position pos[b] (keys 0..pos[b] are attended).
template <typename T>
torch::Tensor decode(torch::Tensor h, const torch::Tensor& pos, const std::vector<torch::Tensor>& layers,
                     const torch::Tensor& norm, const Weight& lm_head, const torch::Tensor& inv_freq,
                     torch::Tensor& cache_k, torch::Tensor& cache_v, const Shape& s, float eps) {
  const int64_t n = h.size(0), D = s.D, Dh = s.Dh, half = Dh / 2, QKV = (s.H + 2 * s.Hkv) * Dh, group = s.H / s.Hkv;
  h = h.contiguous().clone();
  auto opts = h.options();
  auto x = torch::empty({n, D}, opts), attn = torch::empty({n, s.H * Dh}, opts), act = torch::empty({n, s.I}, opts);
  T* hp = ptr<T>(h); T* xp = ptr<T>(x); T* ap = ptr<T>(attn); T* actp = ptr<T>(act);
  const int64_t* P = pos.data_ptr<int64_t>();
  const float* F = inv_freq.data_ptr<float>();
  // RoPE tables [n, Dh/2] as the plain path: fp32 angle, cos/sin rounded to the model dtype.
  std::vector<float> cos_t(n * half), sin_t(n * half);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float a = float(P[b]) * F[i];
      cos_t[b * half + i] = rnd<T>(std::cos(a)), sin_t[b * half + i] = rnd<T>(std::sin(a));
    }
  const float scale = 1.0f / std::sqrt(float(Dh));
  for (int64_t l = 0; l < s.L; ++l) {
    // input norm, qkv (weight, scale), o, post-attention norm, gate_up, down
    const torch::Tensor* w = &layers[LAYER_TENSORS * l];
    for (int64_t b = 0; b < n; ++b) rms_norm(hp + b * D, ptr<T>(w[0]), xp + b * D, D, eps);
    auto qkv = linear(x, {w[1], w[2]}, QKV);  // [n, (H + 2 Hkv) Dh]
    T* q = ptr<T>(qkv);
    float* K = ptr<float>(cache_k) + l * s.B * s.Hkv * s.S * Dh;  // [B, Hkv, S, Dh]
    float* Vc = ptr<float>(cache_v) + l * s.B * s.Hkv * s.S * Dh;
    for (int64_t b = 0; b < n; ++b) {  // RoPE on q and k heads (x * cos + rotate_half(x) * sin, each op rounded)
      T* row = q + b * QKV;
      for (int64_t hd = 0; hd < s.H + s.Hkv; ++hd) {
        T* v = row + hd * Dh;
        for (int64_t i = 0; i < half; ++i) {
          const float c = cos_t[b * half + i], sn = sin_t[b * half + i], x1 = to_f(v[i]), x2 = to_f(v[i + half]);
          v[i] = from_f<T>(rnd<T>(x1 * c) + rnd<T>(-x2 * sn));
          v[i + half] = from_f<T>(rnd<T>(x2 * c) + rnd<T>(x1 * sn));
        }
      }
      for (int64_t g = 0; g < s.Hkv; ++g) {  // the new key and value into the cache at pos[b]
        const int64_t off = ((b * s.Hkv + g) * s.S + P[b]) * Dh;
        for (int64_t i = 0; i < Dh; ++i) {
          K[off + i] = to_f(row[(s.H + g) * Dh + i]);
          Vc[off + i] = to_f(row[(s.H + s.Hkv + g) * Dh + i]);
        }
      }
    }
    at::parallel_for(0, n * s.H, 1, [&](int64_t begin, int64_t end) {  // attention, one (row, head) per task
      std::vector<float> qf(Dh), scores;
      std::vector<__m512> out(Dh / 16);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.H, hd = task % s.H, len = P[b] + 1;
        const float* kr = K + (b * s.Hkv + hd / group) * s.S * Dh;
        const float* vr = Vc + (b * s.Hkv + hd / group) * s.S * Dh;
        for (int64_t i = 0; i < Dh; ++i) qf[i] = to_f(q[b * QKV + hd * Dh + i]);
        scores.resize(len);
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t i = 0; i < Dh; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qf.data() + i), _mm512_loadu_ps(kr + j * Dh + i), acc);
          scores[j] = _mm512_reduce_add_ps(acc) * scale;
          mx = std::max(mx, scores[j]);
        }
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= len; j += 16) {
          __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores.data() + j), _mm512_set1_ps(mx)));
          _mm512_storeu_ps(scores.data() + j, e);
          sum = _mm512_add_ps(sum, e);
        }
        if (j < len) {
          const __mmask16 m = __mmask16((1u << (len - j)) - 1);
          __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores.data() + j), _mm512_set1_ps(mx)));
          _mm512_mask_storeu_ps(scores.data() + j, m, e);
          sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        for (auto& o : out) o = _mm512_setzero_ps();
        for (int64_t j2 = 0; j2 < len; ++j2) {
          const __m512 p = _mm512_set1_ps(scores[j2]);
          for (int64_t i = 0; i < Dh / 16; ++i) out[i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + j2 * Dh + 16 * i), out[i]);
        }
        T* dst = ap + b * s.H * Dh + hd * Dh;
        for (int64_t i = 0; i < Dh / 16; ++i) {
          alignas(64) float o[16];
          _mm512_store_ps(o, _mm512_mul_ps(out[i], _mm512_set1_ps(inv)));
          for (int t = 0; t < 16; ++t) dst[16 * i + t] = from_f<T>(o[t]);
        }
      }
    });
    auto o = linear(attn, {w[3], w[4]}, D);
    T* op = ptr<T>(o);
    for (int64_t i = 0; i < n * D; ++i) hp[i] = from_f<T>(to_f(hp[i]) + to_f(op[i]));
    for (int64_t b = 0; b < n; ++b) rms_norm(hp + b * D, ptr<T>(w[5]), xp + b * D, D, eps);
    auto gu = linear(x, {w[6], w[7]}, 2 * s.I);  // [n, 2 I]: gate | up
    T* g = ptr<T>(gu);
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < s.I; ++i) {
        const float gate = to_f(g[b * 2 * s.I + i]), up = to_f(g[b * 2 * s.I + s.I + i]);
        actp[b * s.I + i] = from_f<T>(rnd<T>(gate / (1.0f + std::exp(-gate))) * up);
      }
    auto d = linear(act, {w[8], w[9]}, D);
    T* dp = ptr<T>(d);
    for (int64_t i = 0; i < n * D; ++i) hp[i] = from_f<T>(to_f(hp[i]) + to_f(dp[i]));
  }
  for (int64_t b = 0; b < n; ++b) rms_norm(hp + b * D, ptr<T>(norm), xp + b * D, D, eps);
  return linear(x, lm_head, s.V);
}

torch::Tensor decode_step(const torch::Tensor& h, const torch::Tensor& pos, const std::vector<torch::Tensor>& layers,
                          const torch::Tensor& norm, const torch::Tensor& lm_head, const torch::Tensor& lm_head_scale,
                          const torch::Tensor& inv_freq, torch::Tensor cache_k, torch::Tensor cache_v, int64_t n_heads, int64_t vocab,
                          int64_t intermediate, double eps) {
  const Shape s{h.size(1), n_heads, cache_k.size(2), cache_k.size(4), intermediate, vocab,
                int64_t(layers.size() / LAYER_TENSORS), cache_k.size(1), cache_k.size(3)};
  TORCH_CHECK(cache_k.scalar_type() == torch::kFloat && cache_k.is_contiguous() && cache_v.is_contiguous(),
              "decode_step: the KV cache must be fp32 and contiguous");
  TORCH_CHECK(s.Dh % 16 == 0 && s.H % s.Hkv == 0 && pos.scalar_type() == torch::kLong, "decode_step: bad shapes");
  if (h.scalar_type() == torch::kBFloat16)
    return decode<bf16>(h, pos, layers, norm, {lm_head, lm_head_scale}, inv_freq, cache_k, cache_v, s, float(eps));
  return decode<float>(h, pos, layers, norm, {lm_head, lm_head_scale}, inv_freq, cache_k, cache_v, s, float(eps));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, int64_t n) {
    return linear(x, {w, scale}, n);
  }, "y [M, N] = x [M, K] @ W^T with W packed (int8 W: with its per-row scales)");
  m.def("add_layer_norm", &add_layer_norm_op, "(x + y, LayerNorm(x + y)): a residual add and the next norm");
  m.def("vision_attention", &vision_attention, "bidirectional attention [B, L, H * Dh] (the vision tower's)");
  m.def("decode_step", &decode_step, "logits [n, V] of one decode step (see decode)");
}
