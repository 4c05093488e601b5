// bf16 on AMX tiles (Intel Sapphire Rapids and newer; kernels.py turns them on where the CPU has them): the packed
// matmul, and the vision tower's attention. oneDNN runs the reference's prefill and vision matmuls there at ~1-2
// TFLOP/s on 2 cores, ~6-10x what the AVX512-BF16 register tiles do (common.h's tile).
//
// The packed bf16 layout [N/16, K/2, 16, 2] is AMX's B operand as it stands: 32 input channels of a block of 16 weight
// rows are one tile of 16 rows x 64 bytes. A C tile [16 rows of x, 16 outputs] sums the K chunks of 32 in turn,
// whatever the number of rows: used for every M where it runs (decoding's M = 1 too), so a row's result does not
// depend on its batch or on whether it was prefilled or decoded.
//
// The attention (attention_amx) packs each head's keys and values into that layout once (vision.cpp's pack_keys,
// pack_values), then per 32 queries: scores
// on the tiles with the queries held in tiles, the softmax on AVX512 (exp2 by a polynomial: the probabilities are
// rounded to bf16 next, as torch's flash attention rounds them), and probabilities times values on the tiles. 4
// frames of 1024 patches, 12 heads of 64, 2 threads: 14.7 ms against torch's flash attention's 19.2.
#include "common.h"

namespace smolvlm {

bool amx_enabled = false;

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: C (fp32 [rows, 16]: (row tile i, weight block j) is tile 2 i + j); 4-5: A (x rows, bf16 [rows, 32]);
// 6-7: B (a weight block's 32 input channels). Loading a configuration zeroes the tiles.
void configure(int rows) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = t < 6 ? rows : 16;
  _tile_loadconfig(&c);
}

// out [MB * 16, NB * 16] fp32 (row stride ldo; the configured rows of each 16) = MB tiles of x's rows (row stride
// ldx) times NB consecutive packed weight blocks (w: the first; each 16 K further on).
template <int MB, int NB>
void block(const bf16* x, int64_t ldx, const bf16* w, int64_t K, float* out, int64_t ldo) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MB > 1) _tile_zero(2);
  if constexpr (MB > 1 && NB > 1) _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    for (int j = 0; j < NB; ++j)  // the weights stream from memory at batch 1: ask for them 2 tiles ahead
      for (int line = 0; line < 16; ++line) prefetch<2048>(w + j * 16 * K + k * 16 + line * 32);
    _tile_loadd(4, x + k, ldx * 2);
    _tile_loadd(6, w + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, w + 16 * K + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MB > 1) {
      _tile_loadd(5, x + 16 * ldx + k, ldx * 2);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, out, ldo * 4);
  if constexpr (NB > 1) _tile_stored(1, out + 16, ldo * 4);
  if constexpr (MB > 1) _tile_stored(2, out + 16 * ldo, ldo * 4);
  if constexpr (MB > 1 && NB > 1) _tile_stored(3, out + 16 * ldo + 16, ldo * 4);
}

}  // namespace

void matmul_amx(const bf16* x, int64_t M, int64_t K, const bf16* w, int64_t N, bf16* y) {
  const int64_t NBLOCKS = (N + 15) / 16;
  for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
    const int64_t mc = std::min(M_CHUNK, M - m0), full = mc / 16 * 16;
    at::parallel_for(0, NBLOCKS, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float out[32 * 32];
      // Rows m.. (rows of them, <= 32) times blocks nb.. (1 or 2) into y.
      auto run = [&](int64_t m, int64_t rows, int64_t nb, int64_t blocks) {
        const bf16* xm = x + m * K;
        const bf16* wb = w + nb * 16 * K;
        const int64_t ld = blocks * 16;
        if (rows > 16)
          blocks > 1 ? block<2, 2>(xm, K, wb, K, out, ld) : block<2, 1>(xm, K, wb, K, out, ld);
        else
          blocks > 1 ? block<1, 2>(xm, K, wb, K, out, ld) : block<1, 1>(xm, K, wb, K, out, ld);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < blocks; ++j)
            store16(y + (m + r) * N + (nb + j) * 16, _mm512_load_ps(out + r * blocks * 16 + j * 16),
                    tail_mask(N - (nb + j) * 16));
      };
      // Whole tiles of 16 rows under one configuration, then the rows left (decoding's 1..15) under another.
      if (full > 0) {
        configure(16);
        for (int64_t nb = begin; nb < end; nb += 2)
          for (int64_t m = m0; m < m0 + full; m += 32)
            run(m, std::min<int64_t>(32, m0 + full - m), nb, std::min<int64_t>(2, end - nb));
      }
      if (mc > full) {
        configure(int(mc - full));
        for (int64_t nb = begin; nb < end; nb += 2) run(m0 + full, mc - full, nb, std::min<int64_t>(2, end - nb));
      }
      _tile_release();
    });
  }
}

namespace {

// 2^t for t <= 0: 2^round(t) times a degree-5 polynomial on [-1/2, 1/2] (relative error ~2e-6, far below the bf16
// rounding the probabilities get next); very negative t gives 0.
inline __m512 exp2_ps(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The softmax of a row of scores s[0:L] with x = s * scale (+ mask: additive, over keys) and top = max x:
// probs[0:L] = exp(x - top) rounded to bf16, as torch's CPU flash attention rounds them for the second product;
// returns 1 / their fp32 sum. Without a mask the exponent is one FMA, (s - top) * scale * log2(e) (top: the max of
// s then); with one, x is formed first so that a row whose keys are all masked stays uniform, and the exponent is
// clamped (a masked key's x - top is about -3e38: -inf once scaled).
template <bool MASKED>
float softmax_bf16(const float* s, int64_t L, float scale, const float* mask, float top, bf16* probs) {
  const float log2e = 1.44269504088896341f;
  const __m512 c = _mm512_set1_ps(MASKED ? log2e : scale * log2e), shift = _mm512_set1_ps(-top * scale * log2e);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < L; j += 16) {
    const __mmask16 m = tail_mask(L - j);
    const __m512 s16 = _mm512_maskz_loadu_ps(m, s + j);
    __m512 t;
    if (MASKED) {  // (x - top) * log2(e), then clamped
      const __m512 x = _mm512_fmadd_ps(s16, _mm512_set1_ps(scale), _mm512_maskz_loadu_ps(m, mask + j));
      t = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(x, _mm512_set1_ps(top)), c), _mm512_set1_ps(-200.0f));
    } else {
      t = _mm512_fmadd_ps(s16, c, shift);
    }
    const __m512 e = exp2_ps(t);
    store16(probs + j, e, m);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// max over keys of s[0:L] * scale + mask.
float masked_max(const float* s, int64_t L, float scale, const float* mask) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < L; j += 16) {
    const __mmask16 m = tail_mask(L - j);
    const __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(scale),
                                     _mm512_maskz_loadu_ps(m, mask + j));
    mx = _mm512_mask_max_ps(mx, m, mx, x);
  }
  return _mm512_reduce_max_ps(mx);
}

constexpr int64_t ROWS = 32;  // queries per block: 2 tiles of rows

// scores [32, L] (row stride lds) = 32 queries (row stride ldq) times the packed keys, KS = Dh / 32 (1 or 2): the
// queries stay in tiles 2-5 (row tile r, dims 32 s.. in tile 2 + 2 r + s) while the keys stream through tiles 6-7,
// 16 keys at a time into tiles 0-1. top[r]: lane-wise maxima of row r's scores over the L real keys, taken while
// each 16 keys' scores are still in L1.
template <int KS>
void score_rows(const bf16* q, int64_t ldq, const bf16* keys, int64_t L, float* scores, int64_t lds, __m512* top) {
  constexpr int64_t Dh = 32 * KS;
  _tile_loadd(2, q, ldq * 2);
  _tile_loadd(4, q + 16 * ldq, ldq * 2);
  if constexpr (KS == 2) {
    _tile_loadd(3, q + 32, ldq * 2);
    _tile_loadd(5, q + 16 * ldq + 32, ldq * 2);
  }
  for (int64_t j = 0; j < L; j += 16) {  // the keys past L (padding) are never read
    const bf16* kj = keys + j * Dh;
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(6, kj, 64);
    _tile_dpbf16ps(0, 2, 6);
    _tile_dpbf16ps(1, 4, 6);
    if constexpr (KS == 2) {
      _tile_loadd(7, kj + 16 * 32, 64);
      _tile_dpbf16ps(0, 3, 7);
      _tile_dpbf16ps(1, 5, 7);
    }
    _tile_stored(0, scores + j, lds * 4);
    _tile_stored(1, scores + 16 * lds + j, lds * 4);
    const __mmask16 m = tail_mask(L - j);  // not the padding keys' scores
    for (int r = 0; r < 32; ++r) top[r] = _mm512_mask_max_ps(top[r], m, top[r], _mm512_loadu_ps(scores + r * lds + j));
  }
}

}  // namespace

void attention_amx(const bf16* q, const bf16* k, const bf16* v, const float* mask, bf16* out, int64_t B, int64_t L,
                   int64_t H, int64_t Dh) {
  // Row strides padded off multiples of 4 KB: rows of scores or probabilities 4 KB apart would share L1 sets.
  const int64_t D = H * Dh, Lp = (L + 31) / 32 * 32, lds = Lp + 16, ldp = Lp + 32;
  const float scale = 1.0f / std::sqrt(float(Dh));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> keys(Lp * Dh, 0), values(Dh * Lp, 0), probs(ROWS * ldp, 0), tail(ROWS * Dh, 0);
    std::vector<float> scores(ROWS * lds), o(ROWS * Dh), inv(ROWS);
    __m512 top[ROWS];
    configure(16);
    for (int64_t task = begin; task < end; ++task) {  // task = (frame b, head h)
      const int64_t b = task / H, h = task % H, base = b * L * D + h * Dh;
      pack_keys(k + base, D, L, Dh, keys.data());
      pack_values(v + base, D, L, Lp, Dh, values.data());
      for (int64_t i0 = 0; i0 < L; i0 += ROWS) {
        const int64_t rows = std::min(ROWS, L - i0);
        const bf16* qb = q + base + i0 * D;
        int64_t ldq = D;
        if (rows < ROWS) {  // the last queries, padded with zero rows to a whole block
          std::fill(tail.begin(), tail.end(), bf16(0));
          for (int64_t r = 0; r < rows; ++r) std::copy_n(qb + r * D, Dh, tail.data() + r * Dh);
          qb = tail.data(), ldq = Dh;
        }
        for (int r = 0; r < ROWS; ++r) top[r] = _mm512_set1_ps(-INFINITY);
        // scores [ROWS, L] = q k^T, and their row maxima
        Dh == 64 ? score_rows<2>(qb, ldq, keys.data(), L, scores.data(), lds, top)
                 : score_rows<1>(qb, ldq, keys.data(), L, scores.data(), lds, top);
        for (int64_t r = 0; r < rows; ++r) {
          const float* sr = scores.data() + r * lds;
          inv[r] = mask ? softmax_bf16<true>(sr, L, scale, mask + b * L, masked_max(sr, L, scale, mask + b * L),
                                             probs.data() + r * ldp)
                        : softmax_bf16<false>(sr, L, scale, nullptr, _mm512_reduce_max_ps(top[r]),
                                              probs.data() + r * ldp);
        }
        for (int64_t d0 = 0; d0 < Dh; d0 += 32)  // o [ROWS, Dh] = probs v
          block<2, 2>(probs.data(), ldp, values.data() + d0 * Lp, Lp, o.data() + d0, Dh);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < Dh; d += 16)
            store16(out + base + (i0 + r) * D + d, _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * Dh + d),
                                                                 _mm512_set1_ps(inv[r])), 0xffff);
      }
    }
    _tile_release();
  });
}

}  // namespace smolvlm
