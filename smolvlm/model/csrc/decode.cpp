// A whole text-decoder step in one call (30 layers: norms, projections, RoPE, cache writes, attention, MLP, lm_head):
// an eager torch step dispatches ~1200 aten ops, ~5 ms per token on this CPU.
#include "common.h"

namespace smolvlm {
namespace {

// out = weight * rms_norm(x), rounded like the plain path: normalize in fp32, round, scale, round.
template <typename T>
void rms_norm(const T* x, const T* weight, T* out, int64_t D, float eps) {
  float ss = 0;
  for (int64_t i = 0; i < D; ++i) ss += to_f(x[i]) * to_f(x[i]);
  const float r = 1.0f / std::sqrt(ss / D + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = from_f<T>(to_f(weight[i]) * rnd<T>(to_f(x[i]) * r));
}

// out[0:I] = silu(gate) rounded, times up, rounded (as the plain path's two bf16 ops) for gu = [gate | up] [2 I]: the
// MLP's activation, in the decode step and in the prefill (silu_mul), so that both give the same bits.
template <typename T>
void silu_mul_row(const T* gu, T* out, int64_t I) {
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = tail_mask(I - i);
    const __m512 gate = load16(gu + i, m), up = load16(gu + I + i, m);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate));  // exp(-gate)
    const __m512 silu = _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    store16(out + i, _mm512_mul_ps(round16(silu, T()), up), m);
  }
}

constexpr size_t LAYER_TENSORS = 10;  // per decoder layer in decode_step's list (fast.py: decoder_weights)

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
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.H, hd = task % s.H, kv = (b * s.Hkv + hd / group) * s.S * Dh;
        for (int64_t i = 0; i < Dh; ++i) qf[i] = to_f(q[b * QKV + hd * Dh + i]);
        attend(qf.data(), K + kv, Vc + kv, P[b] + 1, Dh, scale, scores, ap + b * s.H * Dh + hd * Dh);
      }
    });
    auto o = linear(attn, {w[3], w[4]}, D);
    T* op = ptr<T>(o);
    for (int64_t i = 0; i < n * D; ++i) hp[i] = from_f<T>(to_f(hp[i]) + to_f(op[i]));
    for (int64_t b = 0; b < n; ++b) rms_norm(hp + b * D, ptr<T>(w[5]), xp + b * D, D, eps);
    auto gu = linear(x, {w[6], w[7]}, 2 * s.I);  // [n, 2 I]: gate | up
    T* g = ptr<T>(gu);
    for (int64_t b = 0; b < n; ++b) silu_mul_row(g + b * 2 * s.I, actp + b * s.I, s.I);
    auto d = linear(act, {w[8], w[9]}, D);
    T* dp = ptr<T>(d);
    for (int64_t i = 0; i < n * D; ++i) hp[i] = from_f<T>(to_f(hp[i]) + to_f(dp[i]));
  }
  for (int64_t b = 0; b < n; ++b) rms_norm(hp + b * D, ptr<T>(norm), xp + b * D, D, eps);
  return linear(x, lm_head, s.V);
}

}  // namespace

torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.is_contiguous() && gu.size(-1) % 2 == 0, "silu_mul: a contiguous [..., 2 I] (gate | up)");
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  auto run = [&](auto* g, auto* o) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(g + r * 2 * I, o + r * I, I);
    });
  };
  if (gu.scalar_type() == torch::kBFloat16)
    run(ptr<bf16>(gu), ptr<bf16>(out));
  else
    run(ptr<float>(gu), ptr<float>(out));
  return out;
}

torch::Tensor decode_step(const torch::Tensor& h, const torch::Tensor& pos, const std::vector<torch::Tensor>& layers,
                          const torch::Tensor& norm, const torch::Tensor& lm_head, const torch::Tensor& lm_head_scale,
                          const torch::Tensor& inv_freq, torch::Tensor cache_k, torch::Tensor cache_v, int64_t n_heads,
                          int64_t vocab, int64_t intermediate, double eps) {
  const Shape s{h.size(1), n_heads, cache_k.size(2), cache_k.size(4), intermediate, vocab,
                int64_t(layers.size() / LAYER_TENSORS), cache_k.size(1), cache_k.size(3)};
  TORCH_CHECK(cache_k.scalar_type() == torch::kFloat && cache_k.is_contiguous() && cache_v.is_contiguous(),
              "decode_step: the KV cache must be fp32 and contiguous");
  TORCH_CHECK(s.Dh % 16 == 0 && s.Dh <= 256 && s.H % s.Hkv == 0 && pos.scalar_type() == torch::kLong,
              "decode_step: bad shapes");
  TORCH_CHECK(h.size(0) == pos.numel() && h.size(0) <= s.B && pos.is_contiguous(),
              "decode_step: one contiguous position per row, and no more rows than the cache");
  const int64_t* P = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < pos.numel(); ++b)  // the cache is written at these positions: never outside it
    TORCH_CHECK(P[b] >= 0 && P[b] < s.S, "decode_step: position ", P[b], " is outside the cache's ", s.S);
  if (h.scalar_type() == torch::kBFloat16)
    return decode<bf16>(h, pos, layers, norm, {lm_head, lm_head_scale}, inv_freq, cache_k, cache_v, s, float(eps));
  return decode<float>(h, pos, layers, norm, {lm_head, lm_head_scale}, inv_freq, cache_k, cache_v, s, float(eps));
}

}  // namespace smolvlm
