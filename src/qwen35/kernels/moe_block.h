// The experts of a MoE block's decode step in one call, for the formats' C++ objects
// (gemv_cpu.cpp Int8Moe / Bf16Moe, fp8_cpu.cpp Fp8Moe; int4_cpu.cpp Int4Moe uses the checks and
// the SwiGLU; models/cpu_decode.py `_held_block` builds one a block): between gemv_cpu.cpp's
// moe_route (the pairs' rows sorted by expert) and moe_combine (their weighted sum), the routed
// pairs' gate_up products, the shared expert's, the SwiGLUs (small_rows.h silu_mul_row:
// small_ops_cpu.cpp silu_mul's arithmetic) and the down products, each product by the call
// ops/moe.py few_token_moe and the shared expert's module make for it (the same bits), without
// the Python between them. (kernels/__init__.py's Native hashes this header with each source.)
#pragma once
#include <cstdint>
#include <vector>

#include "small_rows.h"
#include "torch_ext.h"

namespace moe_block {

// Every expert's [gate_up, down] weights and their scales, and the shared expert's, held for
// the objects' lifetime; ok(w, scale, N, K) checks one projection of [N, K] (gate_up [2I, H],
// down [H, I]; the shared expert's [2Is, H], [H, Is]).
struct Held {
  std::vector<torch::Tensor> w[2], s[2];
  torch::Tensor sw[2], ss[2];

  template <typename Ok>
  Held(std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> gate_up_scale,
       std::vector<torch::Tensor> down, std::vector<torch::Tensor> down_scale,
       torch::Tensor shared_gate_up, torch::Tensor shared_gate_up_scale, torch::Tensor shared_down,
       torch::Tensor shared_down_scale, const char* name, Ok&& ok)
      : w{std::move(gate_up), std::move(down)}, s{std::move(gate_up_scale), std::move(down_scale)},
        sw{std::move(shared_gate_up), std::move(shared_down)},
        ss{std::move(shared_gate_up_scale), std::move(shared_down_scale)} {
    TORCH_CHECK(!w[0].empty() && s[0].size() == w[0].size() && w[1].size() == w[0].size() &&
                    s[1].size() == w[0].size(),
                name, ": as many gate_up, down and scales as experts");
    const int64_t H = w[0][0].size(1), I2 = w[0][0].size(0), Is2 = sw[0].size(0);
    bool shapes = I2 % 2 == 0 && Is2 % 2 == 0 && ok(sw[0], ss[0], Is2, H) &&
                  ok(sw[1], ss[1], H, Is2 / 2);
    for (size_t e = 0; e < w[0].size(); ++e)
      shapes = shapes && ok(w[0][e], s[0][e], I2, H) && ok(w[1][e], s[1][e], H, I2 / 2);
    TORCH_CHECK(shapes, name, ": gate_up [2I, H], down [H, I] (the shared expert's [2Is, H], "
                "[H, Is]) of the format, each with its scales");
  }
  int64_t experts() const { return static_cast<int64_t>(w[0].size()); }
};

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
