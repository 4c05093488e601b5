// Packed matmuls (the text decoder's and lm_head's weights): batch-1 decoding reads every weight once per token, so
// it runs at the speed memory is read; torch's matrix-vector products (oneDNN) read ~20 GB/s of this machine's ~33
// from a model's many small matrices, these ~29. Large M (prefill) runs at oneDNN's speed (~440 GFLOP/s in bf16).
#include "common.h"

namespace smolvlm {
namespace {

// One packed block of 16 int8 rows -> the same block in bf16, for many rows of x (converted once, not per tile).
void dequantize_block(const int8_t* q, int64_t K, bf16* out) {
  for (int64_t i = 0; i < 16 * K; i += 32) _mm512_storeu_si512(out + i, (__m512i)weights32(q + i));
}

// y [M, N] = x [M, K] @ W^T. Threads split W's blocks of 16 rows (NB = ceil(N / 16)).
template <typename X, typename O>
void matmul(const X* x, int64_t M, int64_t K, const Weight& W, O* y, int64_t N) {
  const int64_t NB = W.w.size(0), block = 16 * K;  // elements per packed block
  const float* scale = W.int8() ? W.scale.data_ptr<float>() : nullptr;
  const int64_t scales = (K + GROUP - 1) / GROUP * 16;  // int8: group scales per packed block
  for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
    const int64_t mc = std::min(M_CHUNK, M - m0);
    at::parallel_for(0, NB, 1, [&](int64_t b, int64_t e) {
      // int8 weights: converted inside the tile for a few rows of x; for more, once per block into a bf16 buffer
      std::vector<X> buffer(scale && mc > MT_MAX ? block : 0);
      for (int64_t nb = b; nb < e; ++nb) {
        const int64_t n0 = nb * 16;
        const __mmask16 mask = tail_mask(N - n0);
        auto run = [&](const auto* wb) {
          for (int64_t m = 0; m < mc; m += MT_MAX)
            tiles(x + (m0 + m) * K, K, wb, K, y + (m0 + m) * N + n0, N, std::min(MT_MAX, mc - m), mask,
                  scale ? scale + nb * scales : nullptr);
        };
        if constexpr (std::is_same_v<X, bf16>) {
          if (scale && buffer.empty()) { run(ptr<int8_t>(W.w) + nb * block); continue; }
          if (scale) {
            dequantize_block(ptr<int8_t>(W.w) + nb * block, K, buffer.data());
            run(buffer.data());
            continue;
          }
        }
        run(ptr<X>(W.w) + nb * block);
      }
    });
  }
}

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const Weight& W, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "linear: x must be [M, K] and contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(W.w.numel() == W.w.size(0) * 16 * K && N <= 16 * W.w.size(0), "linear: packed weight doesn't match x");
  TORCH_CHECK(!W.int8() || W.scale.numel() == W.w.size(0) * ((K + GROUP - 1) / GROUP) * 16,
              "linear: int8 weight needs [blocks, ceil(K / ", GROUP, "), 16] scales");
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

}  // namespace smolvlm
