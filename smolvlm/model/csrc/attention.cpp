// The prefill's causal attention over the fp32 KV cache (cached_attention), 16 queries of a head at a time, with
// exactly the arithmetic of the decode step's per-query `attend` (common.h): a token's attention has the same bits
// whether it was prefilled (in any chunk, beside any rows) or decoded.
//
// attend sums each q . k_j over Dh as 16 lane partials (lane l: the FMA chain over dims l, l+16, ...) added by sum16.
// Here the 16 lanes hold 16 queries instead: for key j, partial l of all 16 queries is one FMA chain over qt[l + 16c]
// (the queries' dims transposed: [Dh, 16]) times k_j[l + 16c] broadcast, and sum16_lanes adds the 16 partials as
// sum16 adds lanes. So a key row is read once for 16 queries and no horizontal adds are left; the softmax runs
// lane-wise (keys past a query's position masked), and the weighted sum of values runs 4 queries per value row.
// A 900-token prompt's layer (9 heads over 3 KV heads, Dh 64; 2 threads of the AMX VM of 2026-12-05): 8.8 ms with
// attend per query, 5.0 ms so.
#include "common.h"

namespace smolvlm {
namespace {

constexpr int KEYS = 4;     // keys per step of the scores loop: each load of qt serves this many
constexpr int QUERIES = 4;  // queries per pass over the value rows

// P[n] = lane partial l of q . k_n for the 16 queries of qt and NK key rows k (row stride Dh).
template <int NK>
inline void partials(const float* qt, const float* k, int64_t Dh, int64_t l, __m512* P) {
  for (int n = 0; n < NK; ++n) P[n] = _mm512_setzero_ps();
  for (int64_t i = l; i < Dh; i += 16) {
    const __m512 q = _mm512_loadu_ps(qt + i * 16);
    for (int n = 0; n < NK; ++n) P[n] = _mm512_fmadd_ps(q, _mm512_set1_ps(k[n * Dh + i]), P[n]);
  }
}

// sum16's tree over the partials, for NK keys: sums<NK, 1>(0) is the whole sum, sums<NK, 16>(l) partial l, and
// sums<NK, S>(l) = sums<2S>(l + S) + sums<2S>(l) the tree's nodes between (S = 8: P_{l+8} + P_l, the 256-bit halves
// added; S = 4: quarters; S = 2, 1: the last pairs). Each node is formed as its two halves are done, so that few
// partials are live at a time.
template <int NK, int S>
inline void sums(const float* qt, const float* k, int64_t Dh, int64_t l, __m512* out) {
  if constexpr (S == 16) {
    partials<NK>(qt, k, Dh, l, out);
  } else {
    __m512 a[NK], b[NK];
    sums<NK, 2 * S>(qt, k, Dh, l + S, a);
    sums<NK, 2 * S>(qt, k, Dh, l, b);
    for (int n = 0; n < NK; ++n) out[n] = _mm512_add_ps(a[n], b[n]);
  }
}

// S[n][0:16] = (q . k_n) * scale for the 16 queries of qt and NK key rows k, as attend computes each.
template <int NK>
inline void scores(const float* qt, const float* k, int64_t Dh, float scale, float* S) {
  __m512 dot[NK];
  sums<NK, 1>(qt, k, Dh, 0, dot);
  for (int n = 0; n < NK; ++n) _mm512_storeu_ps(S + n * 16, _mm512_mul_ps(dot[n], _mm512_set1_ps(scale)));
}

// Queries r = r0..r0+3 (those below n): dst row r [d0, d0 + 16 NV) = inv[r] * sum_j e[j][r] v_j over keys
// j < len[r] in order (attend's order). The keys all four attend run together, one load of a value row for four
// queries; each query's remaining keys then run alone.
template <int NV, typename T>
void weigh_values(const float* e, int r0, int n, const int32_t* len, const float* V, int64_t Dh, int64_t d0,
                  const float* inv, T* dst, int64_t ldd) {
  __m512 acc[QUERIES][NV];
  for (int r = 0; r < QUERIES; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const int g = std::min(QUERIES, n - r0);
  int64_t common = len[r0];
  for (int r = 1; r < g; ++r) common = std::min<int64_t>(common, len[r0 + r]);
  for (int64_t j = 0; j < common; ++j) {
    __m512 row[NV];
    for (int v = 0; v < NV; ++v) row[v] = _mm512_loadu_ps(V + j * Dh + d0 + 16 * v);
    for (int r = 0; r < QUERIES; ++r) {  // lanes past n hold zero weights; their sums are never stored
      const __m512 p = _mm512_set1_ps(e[j * 16 + r0 + r]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(p, row[v], acc[r][v]);
    }
  }
  for (int r = 0; r < g; ++r) {
    for (int64_t j = common; j < len[r0 + r]; ++j) {
      const __m512 p = _mm512_set1_ps(e[j * 16 + r0 + r]);
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(V + j * Dh + d0 + 16 * v), acc[r][v]);
    }
    for (int v = 0; v < NV; ++v)
      store16(dst + (r0 + r) * ldd + d0 + 16 * v, _mm512_mul_ps(acc[r][v], _mm512_set1_ps(inv[r0 + r])), 0xffff);
  }
}

// Attention of n (2..16) queries of one head: query r (Dh values at q + r * ldq) over keys 0..len[r]-1 of K, V
// [S, Dh] -> dst + r * ldd. Scratch: qt, S.
template <typename T>
void attend16(const T* q, int64_t ldq, const int32_t* len, int n, const float* K, const float* V, int64_t Dh,
              float scale, std::vector<float>& qt, std::vector<float>& S, T* dst, int64_t ldd) {
  const int64_t longest = *std::max_element(len, len + n);
  qt.assign(Dh * 16, 0.0f);
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < Dh; ++i) qt[i * 16 + r] = to_f(q[r * ldq + i]);
  S.resize(longest * 16);
  float* s = S.data();
  const __m512i lens = _mm512_maskz_loadu_epi32(__mmask16((1u << n) - 1), len);  // lanes past n: no keys
  int64_t j = 0;
  for (; j + KEYS <= longest; j += KEYS) scores<KEYS>(qt.data(), K + j * Dh, Dh, scale, s + j * 16);
  for (; j < longest; ++j) scores<1>(qt.data(), K + j * Dh, Dh, scale, s + j * 16);
  // softmax_numerators lane-wise: the max over each query's keys, then exp(x - max) (0 past its keys) summed in
  // sum16's order: attend's sum vector has keys j = l (mod 16) in lane l, each lane adding its keys in order.
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (j = 0; j < longest; ++j) {
    const __mmask16 m = _mm512_cmpgt_epi32_mask(lens, _mm512_set1_epi32(int32_t(j)));
    top = _mm512_mask_max_ps(top, m, top, _mm512_loadu_ps(s + j * 16));
  }
  __m512 sums[16];
  for (int l = 0; l < 16; ++l) sums[l] = _mm512_setzero_ps();
  for (j = 0; j < longest; j += 16) {
    for (int l = 0; l < 16 && j + l < longest; ++l) {
      const __mmask16 m = _mm512_cmpgt_epi32_mask(lens, _mm512_set1_epi32(int32_t(j + l)));
      const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + (j + l) * 16), top)));
      _mm512_storeu_ps(s + (j + l) * 16, e);
      sums[l] = _mm512_add_ps(sums[l], e);
    }
  }
  alignas(64) float inv[16];
  _mm512_store_ps(inv, _mm512_div_ps(_mm512_set1_ps(1.0f), sum16_lanes(sums)));
  for (int r0 = 0; r0 < n; r0 += QUERIES)
    for (int64_t d0 = 0; d0 < Dh; d0 += 64) {  // value dims 64 at a time: the accumulators fit in registers
      switch (std::min<int64_t>(4, (Dh - d0) / 16)) {
        case 1: weigh_values<1>(s, r0, n, len, V, Dh, d0, inv, dst, ldd); break;
        case 2: weigh_values<2>(s, r0, n, len, V, Dh, d0, inv, dst, ldd); break;
        case 3: weigh_values<3>(s, r0, n, len, V, Dh, d0, inv, dst, ldd); break;
        default: weigh_values<4>(s, r0, n, len, V, Dh, d0, inv, dst, ldd);
      }
    }
}

}  // namespace

torch::Tensor cached_attention(const torch::Tensor& q, const torch::Tensor& cache_k, const torch::Tensor& cache_v,
                               const torch::Tensor& pos) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && pos.is_contiguous() && pos.scalar_type() == torch::kLong,
              "cached_attention: q [B, H, T, Dh] and positions [B, T], contiguous");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.scalar_type() == torch::kFloat && cache_k.stride(3) == 1 &&
              cache_k.strides() == cache_v.strides() && cache_k.sizes() == cache_v.sizes(),
              "cached_attention: fp32 caches [B, Hkv, S, Dh] with unit stride along Dh");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3), Hkv = cache_k.size(1), S = cache_k.size(2);
  TORCH_CHECK(Dh % 16 == 0 && Dh <= 256 && Dh == cache_k.size(3) && H % Hkv == 0 && cache_k.size(0) >= B &&
              pos.size(0) == B && pos.size(1) == T, "cached_attention: shapes don't match");
  const int64_t* P = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(P[i] >= 0 && P[i] < S, "cached_attention: position ", P[i], " is outside the cache's ", S);
  auto out = torch::empty({B, T, H * Dh}, q.options());
  const float scale = 1.0f / std::sqrt(float(Dh));
  const int64_t sb = cache_k.stride(0), sh = cache_k.stride(1), ss = cache_k.stride(2);
  TORCH_CHECK(ss == Dh, "cached_attention: cache rows must be contiguous along Dh");
  const int64_t blocks = (T + 15) / 16;
  auto run = [&](auto* qp, auto* op) {
    at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qt, scores;
      for (int64_t task = begin; task < end; ++task) {  // task = (b, h, block): queries 16 * block.. of head h, row b
        const int64_t b = task / (H * blocks), h = task / blocks % H, t0 = task % blocks * 16;
        const int n = int(std::min<int64_t>(16, T - t0));
        const int64_t kv = b * sb + h / (H / Hkv) * sh;
        const float *K = ptr<float>(cache_k) + kv, *V = ptr<float>(cache_v) + kv;
        auto* q0 = qp + ((b * H + h) * T + t0) * Dh;
        auto* dst = op + (b * T + t0) * H * Dh + h * Dh;
        int32_t len[16];
        for (int r = 0; r < n; ++r) len[r] = int32_t(P[b * T + t0 + r] + 1);
        if (n == 1) {  // a lone query (decoding-like chunks): attend itself, without the transposes
          qt.resize(Dh);
          for (int64_t i = 0; i < Dh; ++i) qt[i] = to_f(q0[i]);
          attend(qt.data(), K, V, len[0], Dh, scale, scores, dst);
        } else {
          attend16(q0, Dh, len, n, K, V, Dh, scale, qt, scores, dst, H * Dh);
        }
      }
    });
  };
  if (q.scalar_type() == torch::kBFloat16)
    run(ptr<bf16>(q), ptr<bf16>(out));
  else
    run(ptr<float>(q), ptr<float>(out));
  return out;
}

}  // namespace smolvlm
