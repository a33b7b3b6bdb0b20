// The gated delta rule's decode step on the CPU, fused: two passes over each head's state.
//
// Per head (state S [dk, dv] fp32, a = exp(g)):
//   u_k = S^T k, u_q = S^T q            (one read of S)
//   delta = beta (v - a u_k),  o = a u_q + (k . q) delta
//   S = a S + k delta^T                 (one read-modify-write of S, still in L2: 64 KiB)
// The PyTorch path (layers/deltanet.py _decode_torch) makes five passes over the whole
// batch's states, which at batch 32 of Qwen3.5-0.8B are 32 MiB per layer: memory-bound.
// Heads are independent and split across torch's intra-op threads; each head's arithmetic is
// the same whatever the batch, so batched and single-sequence results are bitwise equal.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

// The whole DeltaNet decode step after the input projections, for one run of consecutive state
// slots: causal conv update (state shifted in place), SiLU, l2-normalised q (times dk^-0.5) and k,
// then the recurrent step at the top of this file. Rounding follows the PyTorch path: the conv accumulates in fp32
// and is rounded to the model dtype, SiLU runs on that value and is rounded again; q, k, v are
// those rounded values in fp32. Returns o [n, nv, dv] fp32.
template <typename T>
void deltanet_decode_impl(const T* X, int64_t x_stride, T* CS, const T* W, const float* G,
                          const T* Bt, float* S, float* O, int64_t n, int64_t C, int64_t Kc,
                          int64_t nk, int64_t nv, int64_t dk, int64_t dv) {
  const int64_t kd = nk * dk, r = nv / nk;
  std::vector<float> u(n * C);  // conv outputs after SiLU, rounded to T, as fp32
  at::parallel_for(0, n * C, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / C, c = idx % C;
      T* st = CS + (i * C + c) * (Kc - 1);
      const T xv = X[i * x_stride + c];
      const T* w = W + c * Kc;
      float y = 0.f;
      for (int64_t j = 0; j < Kc - 1; ++j) y += static_cast<float>(st[j]) * static_cast<float>(w[j]);
      y += static_cast<float>(xv) * static_cast<float>(w[Kc - 1]);
      for (int64_t j = 0; j + 1 < Kc - 1; ++j) st[j] = st[j + 1];
      st[Kc - 2] = xv;
      const float yr = static_cast<float>(static_cast<T>(y));
      u[idx] = static_cast<float>(static_cast<T>(yr / (1.f + std::exp(-yr))));
    }
  });
  const float scale = 1.f / std::sqrt(static_cast<float>(dk));
  at::parallel_for(0, n * nv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dk), k(dk), uk(dv), uq(dv), delta(dv);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / nv, h = idx % nv, kh = h / r;
      const float* ui = u.data() + i * C;
      float sq = 0.f, sk = 0.f;
      for (int64_t t = 0; t < dk; ++t) {
        q[t] = ui[kh * dk + t];
        k[t] = ui[kd + kh * dk + t];
        sq += q[t] * q[t];
        sk += k[t] * k[t];
      }
      const float iq = 1.f / std::sqrt(sq + 1e-6f), ik = 1.f / std::sqrt(sk + 1e-6f);
      for (int64_t t = 0; t < dk; ++t) {
        q[t] = q[t] * iq * scale;
        k[t] = k[t] * ik;
      }
      const float* v = ui + 2 * kd + h * dv;
      const float a = std::exp(G[idx]), b = static_cast<float>(Bt[idx]);
      float* sh = S + idx * dk * dv;
      float* oh = O + idx * dv;
      for (int64_t j = 0; j < dv; ++j) uk[j] = uq[j] = 0.f;
      float kq = 0.f;
      for (int64_t t = 0; t < dk; ++t) {
        const float kt = k[t], qt = q[t];
        const float* __restrict row = sh + t * dv;
        for (int64_t j = 0; j < dv; ++j) {
          uk[j] += row[j] * kt;
          uq[j] += row[j] * qt;
        }
        kq += kt * qt;
      }
      for (int64_t j = 0; j < dv; ++j) {
        delta[j] = b * (v[j] - a * uk[j]);
        oh[j] = a * uq[j] + kq * delta[j];
      }
      for (int64_t t = 0; t < dk; ++t) {
        const float kt = k[t];
        float* __restrict row = sh + t * dv;
        for (int64_t j = 0; j < dv; ++j) row[j] = a * row[j] + kt * delta[j];
      }
    }
  });
}

torch::Tensor deltanet_decode(const torch::Tensor& qkv,   // [n, C] model dtype, rows may be strided
                              torch::Tensor& conv_state,  // [n, C, K-1] model dtype, in place
                              const torch::Tensor& conv_w,  // [C, K] model dtype
                              const torch::Tensor& g,       // [n, nv] fp32 log-decay
                              const torch::Tensor& beta,    // [n, nv] model dtype
                              torch::Tensor& state,         // [n, nv, dk, dv] fp32, in place
                              int64_t nk) {
  const int64_t n = qkv.size(0), C = qkv.size(1), Kc = conv_w.size(1);
  const int64_t nv = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(qkv.stride(1) == 1 && conv_state.is_contiguous() && conv_w.is_contiguous() &&
                  state.is_contiguous() && state.scalar_type() == at::kFloat &&
                  g.scalar_type() == at::kFloat,
              "deltanet_decode: layouts or dtypes not as expected");
  TORCH_CHECK(qkv.scalar_type() == conv_state.scalar_type() &&
                  qkv.scalar_type() == conv_w.scalar_type() && qkv.scalar_type() == beta.scalar_type(),
              "deltanet_decode: qkv, conv state, conv weight and beta must share the model dtype");
  TORCH_CHECK(conv_state.size(0) == n && conv_state.size(1) == C && conv_state.size(2) == Kc - 1 &&
                  state.size(0) == n && C == 2 * nk * dk + nv * dv && nv % nk == 0,
              "deltanet_decode: shapes do not match");
  auto gc = g.contiguous();
  auto bc = beta.contiguous();
  auto out = torch::empty({n, nv, dv}, state.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "deltanet_decode", [&] {
    deltanet_decode_impl<scalar_t>(qkv.data_ptr<scalar_t>(), qkv.stride(0),
                                   conv_state.data_ptr<scalar_t>(), conv_w.data_ptr<scalar_t>(),
                                   gc.data_ptr<float>(), bc.data_ptr<scalar_t>(),
                                   state.data_ptr<float>(), out.data_ptr<float>(), n, C, Kc, nk,
                                   nv, dk, dv);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("deltanet_decode", &deltanet_decode, "DeltaNet decode after the projections (in place)");
}
