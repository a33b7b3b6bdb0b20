// The experts of a MoE block's decode step in one call, for the quantized formats' C++ objects
// (gemv_cpu.cpp Int8Moe, fp8_cpu.cpp Fp8Moe, int4_cpu.cpp Int4Moe; models/cpu_decode.py
// `_quant_block` builds one a block): between gemv_cpu.cpp's moe_route (the pairs' rows sorted
// by expert) and moe_combine (their weighted sum), the routed pairs' gate_up products, the
// shared expert's, the SwiGLUs (small_rows.h silu_mul_row: small_ops_cpu.cpp silu_mul's
// arithmetic) and the down products, each product by the call ops/moe.py few_token_moe and the
// shared expert's module make for it (the same bits), without the Python between them.
// (kernels/__init__.py's Native hashes this header with each source.)
#pragma once
#include <cstdint>
#include <vector>

#include "small_rows.h"
#include "torch_ext.h"

namespace moe_block {

// experts / counts (moe_route's) checked against xs [P, H] and E experts
inline void check_runs(const torch::Tensor& xs, const torch::Tensor& x,
                       const std::vector<int64_t>& experts, const std::vector<int64_t>& counts,
                       int64_t E, const char* name) {
  TORCH_CHECK(xs.dim() == 2 && x.dim() == 2 && xs.size(1) == x.size(1) && xs.is_contiguous() &&
                  x.is_contiguous() && xs.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              name, ": contiguous xs [P, H] and x [T, H], fp32 or bf16, one dtype");
  TORCH_CHECK(experts.size() == counts.size() && !experts.empty(), name, ": a count per expert");
  int64_t total = 0;
  for (size_t i = 0; i < experts.size(); ++i) {
    TORCH_CHECK(experts[i] >= 0 && experts[i] < E && counts[i] >= 1, name,
                ": an expert id outside 0..E-1 or an empty run");
    total += counts[i];
  }
  TORCH_CHECK(total == xs.size(0), name, ": the counts must add up to xs's rows");
}

// t's rows split by counts (views)
inline std::vector<torch::Tensor> runs_of(const torch::Tensor& t, const std::vector<int64_t>& counts) {
  std::vector<torch::Tensor> parts;
  int64_t row = 0;
  for (int64_t n : counts) parts.push_back(t.narrow(0, row, n)), row += n;
  return parts;
}

// [R, 2N] (gate columns, then up) -> [R, N]: silu(gate) rounded, times up, rounded
inline torch::Tensor swiglu(const torch::Tensor& gu) {
  const int64_t R = gu.size(0), N = gu.size(1) / 2;
  torch::Tensor h = torch::empty({R, N}, gu.options());
  const auto rows = [&](const auto* G, auto* Y) {
    for (int64_t r = 0; r < R; ++r)
      rows::silu_mul_row(G + r * 2 * N, G + r * 2 * N + N, Y + r * N, N);
  };
  if (gu.scalar_type() == at::kFloat)
    rows(gu.data_ptr<float>(), h.data_ptr<float>());
  else
    rows(gu.data_ptr<at::BFloat16>(), h.data_ptr<at::BFloat16>());
  return h;
}

// (xs [P, H], experts, counts, x [T, H]) -> {ys [P, H], the shared expert's output [T, H]}.
// many(parts, experts, down): the products of parts[i] by expert experts[i]'s gate_up (down
// false) or down weights, stacked; shared(rows, down): the shared expert's product.
template <typename Many, typename Shared>
std::vector<torch::Tensor> run(const torch::Tensor& xs, const std::vector<int64_t>& experts,
                               const std::vector<int64_t>& counts, const torch::Tensor& x,
                               int64_t E, const char* name, Many&& many, Shared&& shared) {
  check_runs(xs, x, experts, counts, E, name);
  const torch::Tensor h = swiglu(many(runs_of(xs, counts), experts, false));
  const torch::Tensor sh = swiglu(shared(x, false));
  return {many(runs_of(h, counts), experts, true), shared(sh, true)};
}

}  // namespace moe_block
