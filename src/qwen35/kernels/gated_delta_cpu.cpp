// The gated delta rule's decode step on the CPU, fused: two passes over each head's state.
//
// Per head (state S [dk, dv] fp32, a = exp(g)):
//   u_k = S^T k, u_q = S^T q            (one read of S)
//   delta = beta (v - a u_k),  o = a u_q + (k . q) delta
//   S = a S + k delta^T                 (one read-modify-write of S, still in L2: 64 KiB)
// The PyTorch path (ops/gated_delta.py gated_delta_step_) makes five passes over the whole
// batch's states, which at batch 32 of Qwen3.5-0.8B are 32 MiB per layer: memory-bound.
// Heads are independent and split across torch's intra-op threads; each head's arithmetic is
// the same whatever the batch, so batched and single-sequence results are bitwise equal.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

void gated_delta_step(const torch::Tensor& q,     // [NH, dk] fp32, normalised and scaled
                      const torch::Tensor& k,     // [NH, dk] fp32, normalised
                      const torch::Tensor& v,     // [NH, dv] fp32
                      const torch::Tensor& a,     // [NH] fp32 decay exp(g)
                      const torch::Tensor& beta,  // [NH] fp32
                      torch::Tensor& state,       // [NH, dk, dv] fp32, updated in place
                      torch::Tensor& out) {       // [NH, dv] fp32
  for (const torch::Tensor* t : {&q, &k, &v, &a, &beta, static_cast<const torch::Tensor*>(&state),
                                 static_cast<const torch::Tensor*>(&out)}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "gated_delta_step: contiguous fp32 CPU tensors expected");
  }
  const int64_t NH = state.size(0), dk = state.size(1), dv = state.size(2);
  TORCH_CHECK(q.numel() == NH * dk && k.numel() == NH * dk && v.numel() == NH * dv &&
                  a.numel() == NH && beta.numel() == NH && out.numel() == NH * dv,
              "gated_delta_step: shapes do not match the state [NH, dk, dv]");
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  const float* B = beta.data_ptr<float>();
  float* S = state.data_ptr<float>();
  float* O = out.data_ptr<float>();

  at::parallel_for(0, NH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> uk(dv), uq(dv), delta(dv);
    for (int64_t h = begin; h < end; ++h) {
      const float* __restrict qh = Q + h * dk;
      const float* __restrict kh = K + h * dk;
      float* __restrict sh = S + h * dk * dv;
      float* __restrict ukp = uk.data();
      float* __restrict uqp = uq.data();
      float* __restrict dp = delta.data();
      for (int64_t j = 0; j < dv; ++j) ukp[j] = uqp[j] = 0.f;
      float kq = 0.f;
      for (int64_t i = 0; i < dk; ++i) {
        const float ki = kh[i], qi = qh[i];
        const float* __restrict row = sh + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          ukp[j] += row[j] * ki;
          uqp[j] += row[j] * qi;
        }
        kq += ki * qi;
      }
      const float ah = A[h], bh = B[h];
      const float* __restrict vh = V + h * dv;
      float* __restrict oh = O + h * dv;
      for (int64_t j = 0; j < dv; ++j) {
        dp[j] = bh * (vh[j] - ah * ukp[j]);
        oh[j] = ah * uqp[j] + kq * dp[j];
      }
      for (int64_t i = 0; i < dk; ++i) {
        const float ki = kh[i];
        float* __restrict row = sh + i * dv;
        for (int64_t j = 0; j < dv; ++j) row[j] = ah * row[j] + ki * dp[j];
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gated_delta_step", &gated_delta_step, "fused gated delta rule decode step (in place)");
}
