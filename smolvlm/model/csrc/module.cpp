// The Python module of the C++ CPU kernels (smolvlm/model/kernels.py builds and loads it).
#include <torch/extension.h>

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", [](const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, int64_t n) {
    return smolvlm::linear(x, {w, scale}, n);
  }, "y [M, N] = x [M, K] @ W^T with W packed (int8 W: with its per-row scales)");
  m.def("set_amx", [](bool on) { smolvlm::amx_enabled = on; },
        "bf16 matmuls on AMX tiles (only where the CPU has them and the process may use them)");
  m.def("add_layer_norm", &smolvlm::add_layer_norm, "(x + y, LayerNorm(x + y)): a residual add and the next norm");
  m.def("gelu_tanh_", &smolvlm::gelu_tanh_, "y = GELU(y), tanh approximation, in place");
  m.def("vision_attention", &smolvlm::vision_attention, "bidirectional attention [B, L, H * Dh] (the vision tower's)");
  m.def("cached_attention", &smolvlm::cached_attention,
        "causal attention of q [B, H, T, Dh] over the cache rows' keys 0..pos[b, t] (the prefill's)");
  m.def("silu_mul", &smolvlm::silu_mul, "silu(gate) * up of [..., 2 I] = [gate | up] (the decode step's)");
  m.def("decode_step", &smolvlm::decode_step, "logits [n, V] of one decode step (see decode)");
}

