// Packed matmuls (the text decoder's and lm_head's weights): batch-1 decoding reads every weight once per token, so
// it runs at the speed memory is read; torch's matrix-vector products (oneDNN) read ~20 GB/s of the Zen 4 VM's ~33
// from a model's many small matrices, these ~29. Large M (prefill) runs at oneDNN's speed there (~440 GFLOP/s in
// bf16). Where the CPU has AMX, bf16 runs on its tiles instead (amx.cpp: 1.3-1.9 TFLOP/s on 2 Intel cores).
#include "common.h"

namespace smolvlm {
namespace {

// An int8 matmul's activations (common.h): x [M, K] -> q [M, K] int16 and scales [M, G], G = ceil(K / GROUP);
// q = round(x * (32767 / max |x|)) per row and group, scale = max |x| / 32767 (0 for an all-zero group).
template <typename X>
void quantize_rows(const X* x, int64_t M, int64_t K, int16_t* q, float* scale) {
  const int64_t G = (K + GROUP - 1) / GROUP;
  at::parallel_for(0, M * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / G, k0 = i % G * GROUP;
      const __mmask16 lo = tail_mask(K - k0), hi = K - k0 > 16 ? tail_mask(K - k0 - 16) : 0;
      const __m512 a = load16(x + m * K + k0, lo), b = load16(x + m * K + k0 + 16, hi);
      const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const __m512 inv = _mm512_set1_ps(top > 0 ? 32767.0f / top : 0.0f);
      scale[i] = top / 32767.0f;
      _mm256_mask_storeu_epi16(q + m * K + k0, lo, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
      _mm256_mask_storeu_epi16(q + m * K + k0 + 16, hi,
                               _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
    }
  });
}

// y [M, N] = x [M, K] @ W^T. Threads split W's blocks of 16 rows (NB = ceil(N / 16)), each read once per M_CHUNK
// rows of x. (Blocks taken a few at a time from a shared counter balanced better on paper and ran ~8% slower at
// batch 1.) `tile_args(m, nb)` gives a tile's operands before its output (common.h's tile).
template <typename O, typename TileArgs>
void matmul(int64_t M, int64_t N, int64_t NB, O* y, TileArgs tile_args) {
  for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
    const int64_t mc = std::min(M_CHUNK, M - m0);
    at::parallel_for(0, NB, 1, [&](int64_t b, int64_t e) {
      for (int64_t nb = b; nb < e; ++nb)
        for (int64_t m = m0; m < m0 + mc; m += MT_MAX)
          std::apply([&](auto... args) { tiles(std::min(MT_MAX, m0 + mc - m), args..., y + m * N + nb * 16, N,
                                               tail_mask(N - nb * 16)); }, tile_args(m, nb));
    });
  }
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const Weight& W, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "linear: x must be [M, K] and contiguous");
  const int64_t M = x.size(0), K = x.size(1), NB = W.w.size(0), G = (K + GROUP - 1) / GROUP;
  TORCH_CHECK(W.w.numel() == NB * 16 * K && N <= 16 * NB, "linear: packed weight doesn't match x");
  auto y = torch::empty({M, N}, x.options());
  if (W.int8()) {  // output in x's dtype
    TORCH_CHECK(W.scale.numel() == NB * G * 16, "linear: int8 weight needs [blocks, ceil(K / ", GROUP, "), 16] scales");
    auto q = torch::empty({M, K}, x.options().dtype(torch::kShort));
    auto xs = torch::empty({M, G}, x.options().dtype(torch::kFloat));
    int16_t* qp = ptr<int16_t>(q);
    float* sp = ptr<float>(xs);
    const float* ws = ptr<float>(W.scale);
    const int8_t* wp = ptr<int8_t>(W.w);
    auto args = [&](int64_t m, int64_t nb) {
      return std::make_tuple(qp + m * K, K, sp + m * G, wp + nb * 16 * K, ws + nb * G * 16, K);
    };
    if (x.scalar_type() == torch::kBFloat16) {
      quantize_rows(ptr<bf16>(x), M, K, qp, sp);
      matmul(M, N, NB, ptr<bf16>(y), args);
    } else {
      TORCH_CHECK(x.scalar_type() == torch::kFloat, "linear: int8 W needs a bf16 or fp32 x");
      quantize_rows(ptr<float>(x), M, K, qp, sp);
      matmul(M, N, NB, ptr<float>(y), args);
    }
  } else if (x.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(W.w.scalar_type() == torch::kBFloat16, "linear: bf16 x needs a bf16 or int8 weight");
    const bf16 *xp = ptr<bf16>(x), *wp = ptr<bf16>(W.w);
    if (amx_enabled && K % 32 == 0) {
      matmul_amx(xp, M, K, wp, N, ptr<bf16>(y));
      return y;
    }
    matmul(M, N, NB, ptr<bf16>(y), [&](int64_t m, int64_t nb) {
      return std::make_tuple(xp + m * K, K, wp + nb * 16 * K, K);
    });
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat && W.w.scalar_type() == torch::kFloat, "linear: fp32 x needs fp32 W");
    const float *xp = ptr<float>(x), *wp = ptr<float>(W.w);
    matmul(M, N, NB, ptr<float>(y), [&](int64_t m, int64_t nb) {
      return std::make_tuple(xp + m * K, K, wp + nb * 16 * K, K);
    });
  }
  return y;
}

}  // namespace smolvlm
