// The bf16 packed matmul on AMX tiles (Intel Sapphire Rapids and newer; kernels.py turns it on where the CPU has
// them): oneDNN runs the reference's prefill and vision matmuls there at ~1-2 TFLOP/s on 2 cores, ~6-10x what the
// AVX512-BF16 register tiles do (common.h's tile).
//
// The packed bf16 layout [N/16, K/2, 16, 2] is AMX's B operand as it stands: 32 input channels of a block of 16 weight
// rows are one tile of 16 rows x 64 bytes. A C tile [16 rows of x, 16 outputs] sums the K chunks of 32 in turn,
// whatever the number of rows: used for every M where it runs (decoding's M = 1 too), so a row's result does not
// depend on its batch or on whether it was prefilled or decoded.
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

// out [MB * 16, NB * 16] fp32 (row stride NB * 16; the configured rows of each 16) = MB tiles of x's rows (row stride
// ldx) times NB consecutive packed weight blocks (w: the first; each 16 K further on).
template <int MB, int NB>
void block(const bf16* x, int64_t ldx, const bf16* w, int64_t K, float* out) {
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
  constexpr int64_t ld = NB * 16;
  _tile_stored(0, out, ld * 4);
  if constexpr (NB > 1) _tile_stored(1, out + 16, ld * 4);
  if constexpr (MB > 1) _tile_stored(2, out + 16 * ld, ld * 4);
  if constexpr (MB > 1 && NB > 1) _tile_stored(3, out + 16 * ld + 16, ld * 4);
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
        if (rows > 16)
          blocks > 1 ? block<2, 2>(xm, K, wb, K, out) : block<2, 1>(xm, K, wb, K, out);
        else
          blocks > 1 ? block<1, 2>(xm, K, wb, K, out) : block<1, 1>(xm, K, wb, K, out);
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

}  // namespace smolvlm
