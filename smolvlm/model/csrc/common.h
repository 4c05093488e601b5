// Shared by the C++ CPU kernels (AVX512-F + AVX512-BF16 + AVX512-VNNI, and AMX where present; built on first use by
// smolvlm/model/kernels.py): bf16 conversions, the packed-weight register tiles every matmul here runs on, and the
// vectorized exp.
//
// Packed layouts (kernels.py packs; N padded to a multiple of 16 with zero rows), so that each block of 16 output rows
// is one contiguous stream:
//   bf16 W [N, K] -> [N/16, K/2, 16, 2]: per pair of input channels, the 16 rows' two weights (VDPBF16PS's operand).
//   fp32 W [N, K] -> [N/16, K, 16].
//   int8 W [N, K] -> the bf16 layout, with fp32 scales [N/16, ceil(K/GROUP), 16], one per row and group of GROUP
//   input channels.
// Rounding follows the plain torch path op by op (each bf16 op rounds its fp32 result to nearest-even), so the
// results differ from it only by summation order.
#pragma once

#include <torch/types.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace smolvlm {

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

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) { return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 round16(__m512 v, float) { return v; }
inline __m512 round16(__m512 v, bf16) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }
// The lanes of a 16-wide step that hold data when `remaining` elements are left.
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? __mmask16(0xffff) : __mmask16((1u << remaining) - 1);
}

// The packed weights stream through the tiles once per token at batch 1; asking for them this far ahead keeps more
// of memory's latency covered than the hardware prefetcher does alone (A/B on the Intel VM of 2026-12-04: the bf16
// batch-1 step ~14.7 -> ~13.1 ms with 2 KB, flat from 2 to 16 KB; int8 ~9.6 -> ~7.5 ms with 2 KB, ~6.6 with 16 KB).
template <int64_t BYTES>
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + BYTES, _MM_HINT_T0); }

// Batch invariance: every row's sum runs in one order fixed by K alone (two accumulators, even and odd input pairs,
// added at the end), never by how many rows share the tile (MT), so a row's result doesn't depend on its batch.

// y[m, 0:16] = x[m, :] . W-block for MT rows of bf16 x and a bf16 W-block.
template <int MT, typename O>
void tile(const bf16* x, int64_t ldx, const bf16* w, int64_t K, O* y, int64_t ldy, __mmask16 mask) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t K2 = K / 2;
  for (int64_t k = 0; k < K2; k += 2)
    for (int u = 0; u < 2 && k + u < K2; ++u) {
      prefetch<2048>(w + (k + u) * 32);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (k + u) * 32);
      for (int m = 0; m < MT; ++m) {
        uint32_t pair; std::memcpy(&pair, x + m * ldx + 2 * (k + u), 4);
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
  for (int m = 0; m < MT; ++m) store16(y + m * ldy, _mm512_add_ps(acc[m][0], acc[m][1]), mask);
}

// int8 weights (one scale per row and group of GROUP input channels, llama.cpp's Q8_0) run
// on activations quantized the same way to int16 (one scale per row and group: max |x| / 32767, i.e. 15 bits against
// bf16's 8): the products are VPDPWSSD's exact integer sums, and the weights need one sign extension per 32 (no
// conversion to float), so batch-1 decoding runs at the speed memory is read. A group's integer sum is exact in any
// order; the groups' scaled sums are added in order of K.
constexpr int64_t GROUP = 32;

// y[m, 0:16] = x[m, :] . W-block for MT rows of int16 x (xs: their group scales [MT, G], row stride G) and an int8
// W-block with its group scales ws [G, 16].
template <int MT, typename O>
void tile(const int16_t* x, int64_t ldx, const float* xs, const int8_t* w, const float* ws, int64_t K, O* y,
          int64_t ldy, __mmask16 mask) {
  const int64_t K2 = K / 2, G = (K + GROUP - 1) / GROUP;
  __m512 total[MT];
  for (int m = 0; m < MT; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    for (int64_t k = g * GROUP / 2, end = std::min(K2, k + GROUP / 2); k < end; ++k) {
      prefetch<16384>(w + k * 32);
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + k * 32)));  // 16 rows x 2
      for (int m = 0; m < MT; ++m) {
        int32_t pair; std::memcpy(&pair, x + m * ldx + 2 * k, 4);
        acc[m][k & 1] = _mm512_dpwssd_epi32(acc[m][k & 1], _mm512_set1_epi32(pair), wv);
      }
    }
    const __m512 s = _mm512_loadu_ps(ws + g * 16);
    for (int m = 0; m < MT; ++m)
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][0], acc[m][1])),
                                 _mm512_mul_ps(s, _mm512_set1_ps(xs[m * G + g])), total[m]);
  }
  for (int m = 0; m < MT; ++m) store16(y + m * ldy, total[m], mask);
}

template <int MT, typename O>
void tile(const float* x, int64_t ldx, const float* w, int64_t K, O* y, int64_t ldy, __mmask16 mask) {
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2)
    for (int u = 0; u < 2 && k + u < K; ++u) {
      prefetch<2048>(w + (k + u) * 16);
      __m512 wv = _mm512_loadu_ps(w + (k + u) * 16);
      for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[m * ldx + k + u]), acc[m][u]);
    }
  for (int m = 0; m < MT; ++m) store16(y + m * ldy, _mm512_add_ps(acc[m][0], acc[m][1]), mask);
}
constexpr int64_t MT_MAX = 8;  // rows of x per register tile
constexpr int64_t M_CHUNK = 128;  // rows of x per pass over the weights (their rows stay in L2 across the N blocks)

// tile<rows>(args...) for 1 <= rows <= MT_MAX (args: tile's after ldx's... as tile takes them).
template <typename... Args>
void tiles(int64_t rows, Args... args) {
  switch (rows) {
    case 1: return tile<1>(args...);
    case 2: return tile<2>(args...);
    case 3: return tile<3>(args...);
    case 4: return tile<4>(args...);
    case 5: return tile<5>(args...);
    case 6: return tile<6>(args...);
    case 7: return tile<7>(args...);
    default: return tile<8>(args...);
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// A packed weight: bf16/fp32, or int8 with fp32 group scales [NB, ceil(K / GROUP), 16].
struct Weight {
  torch::Tensor w, scale;
  bool int8() const { return w.scalar_type() == torch::kChar; }
};

// exp(x): Cephes' range reduction and degree-5 polynomial (~1 ulp); +inf past fp32's range, and 0 below -87.3 (where
// fp32's exp leaves the normal range), so masked keys (-inf) weigh exactly nothing in a softmax.
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

// The sum of a vector's 16 lanes in one fixed order: halves, quarters, then pairs (gcc's _mm512_reduce_add_ps, spelled
// out so that no compiler's choice can change it): the prefill's attention (attention.cpp) adds the same numbers in
// the same order for 16 queries at once (sum16_lanes), and so gets the decode step's bits.
inline float sum16(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)),
                                 _mm512_castps512_ps256(a));                                    // a[i + 8] + a[i]
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));        // h[i + 4] + h[i]
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));             // q[0] + q[2], q[1] + q[3]
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 1, 1, 1))));       // p[0] + p[1]
}

// Lane r of the result = sum16 of (a[0][r], ..., a[15][r]): the same additions in the same order, 16 sums at once.
inline __m512 sum16_lanes(const __m512* a) {
  __m512 h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = _mm512_add_ps(a[i + 8], a[i]);
  for (int i = 0; i < 4; ++i) q[i] = _mm512_add_ps(h[i + 4], h[i]);
  return _mm512_add_ps(_mm512_add_ps(q[0], q[2]), _mm512_add_ps(q[1], q[3]));
}

// A softmax's numerators: out[0:len] = exp(x - max(x)) with x = s * scale (+ additive mask), x kept in s; returns
// 1 / their sum. Two passes over the row, the second writing the numerators in out's type.
template <typename T>
float softmax_numerators(float* s, int64_t len, float scale, const float* mask, T* out) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = tail_mask(len - j);
    __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(scale));
    if (mask) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, mask + j));
    _mm512_mask_storeu_ps(s + j, m, x);
    mx = _mm512_mask_max_ps(mx, m, mx, x);
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = tail_mask(len - j);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top)));
    store16(out + j, e, m);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / sum16(sum);
}

// One query's attention over keys 0..len-1 of a cached head: dst[0:Dh] = softmax(q . k_j * scale) . v_j, with q [Dh]
// fp32 and K, V [len, Dh] fp32 rows. The decode step and the prefill (cached_attention) both run this, per query
// and head, so a token's attention is the same whatever the batch, the padding, or whether it was prefilled or
// decoded.
template <typename T>
void attend(const float* q, const float* K, const float* V, int64_t len, int64_t Dh, float scale,
            std::vector<float>& scores, T* dst) {
  scores.resize(len);
  for (int64_t j = 0; j < len; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < Dh; i += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(K + j * Dh + i), acc);
    scores[j] = sum16(acc);
  }
  const float inv = softmax_numerators(scores.data(), len, scale, nullptr, scores.data());
  __m512 out[16];  // Dh <= 256
  for (int64_t i = 0; i < Dh / 16; ++i) out[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; ++j) {
    const __m512 p = _mm512_set1_ps(scores[j]);
    for (int64_t i = 0; i < Dh / 16; ++i) out[i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(V + j * Dh + 16 * i), out[i]);
  }
  for (int64_t i = 0; i < Dh / 16; ++i) store16(dst + 16 * i, _mm512_mul_ps(out[i], _mm512_set1_ps(inv)), 0xffff);
}

// y [M, N] (fp32, row stride ldy) = x [M, K] (row stride ldx) @ W^T for W packed, on this thread.
template <typename T>
void matmul_serial(const T* x, int64_t ldx, int64_t M, int64_t K, const T* w, int64_t N, float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    for (int64_t m = 0; m < M; m += MT_MAX)
      tiles(std::min(MT_MAX, M - m), x + m * ldx, ldx, w + n0 * K, K, y + m * ldy + n0, ldy, tail_mask(N - n0));
  }
}

// amx.cpp: y [M, N] = x [M, K] @ W^T for bf16 x and W packed, on AMX tiles (K % 32 == 0); linear runs it for every
// bf16 matmul while amx_enabled (set from Python where the CPU has AMX and the OS lets this process use it).
extern bool amx_enabled;
void matmul_amx(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, bf16* y);
// vision.cpp: one head's keys and values [L, Dh] (row stride ld) packed as weights for scores and for probabilities
// times values (Lp: L padded; the padding left as the caller zeroed it).
void pack_keys(const bf16* k, int64_t ld, int64_t L, int64_t Dh, bf16* out);
void pack_values(const bf16* v, int64_t ld, int64_t L, int64_t Lp, int64_t Dh, bf16* out);
// amx.cpp: the vision tower's bidirectional attention (vision.cpp's, same arguments) on AMX tiles, Dh % 32 == 0;
// vision_attention runs it for bf16 while amx_enabled.
void attention_amx(const bf16* q, const bf16* k, const bf16* v, const float* mask, bf16* out, int64_t B, int64_t L,
                   int64_t H, int64_t Dh);

// The ops (matmul.cpp, vision.cpp, attention.cpp, decode.cpp), bound to Python in module.cpp.
torch::Tensor linear(const torch::Tensor& x, const Weight& W, int64_t N);
torch::Tensor vision_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, int64_t n_heads);
void gelu_tanh_(torch::Tensor& y);
std::vector<torch::Tensor> add_layer_norm(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& weight,
                                          const torch::Tensor& bias, double eps);
torch::Tensor cached_attention(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                               const torch::Tensor& pos);
torch::Tensor silu_mul(const torch::Tensor& gu);
torch::Tensor decode_step(const torch::Tensor& h, const torch::Tensor& pos, const std::vector<torch::Tensor>& layers,
                          const torch::Tensor& norm, const torch::Tensor& lm_head, const torch::Tensor& lm_head_scale,
                          const torch::Tensor& inv_freq, torch::Tensor cache_k, torch::Tensor cache_v, int64_t n_heads,
                          int64_t vocab, int64_t intermediate, double eps);

}  // namespace smolvlm
