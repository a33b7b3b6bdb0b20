// The small per-token ops of a forward step on the CPU, each fused into one pass.
//
// At batch-1 decode a Qwen 3.5 layer spends more time in PyTorch dispatch than in its small
// ops' arithmetic: RMSNorm alone is ten ops (cast, norm, square, divide, add, rsqrt, multiply,
// weight cast, multiply, cast back), and the 0.8B model's step ran ~1,500 such ops (~14 ms of
// a 46 ms step). Each function here is one call doing one pass over its rows.
//
// Numerics follow the PyTorch references (layers/norms.py, ops/pointwise.py,
// layers/deltanet.py) step by step: fp32 arithmetic, rounded to the model dtype exactly where
// the reference rounds; only the order of the sum of squares and libm's exp/log1p differ
// (fp32 ulps). Rows are independent, so batched and single-row results are bitwise equal.
//
// And one load-time pass: count_nonfinite, the NaN / inf elements of a checkpoint tensor.
//
// Tensors are [R, D] or [A, B, D] views with a contiguous last dim (the column slices of a
// packed projection's output qualify); outputs are fresh and contiguous.
#include <ATen/Parallel.h>
#include "torch_ext.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "small_rows.h"
#include "vec_avx2.h"

namespace {

using namespace vec8;
using rows::norm_zc_row;
using rows::round_to;
using rows::silu;

// rows of a 2-D or 3-D view with a contiguous last dim: row i starts at i0 * s0 + i1 * s1
struct Rows {
  int64_t n, inner, s0, s1, d;
  Rows(const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.dim() == 2 || t.dim() == 3, what, ": expected a 2-D or 3-D tensor");
    TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, what, ": the last dim must be contiguous");
    d = t.size(-1);
    if (t.dim() == 2) {
      n = t.size(0), inner = 1, s0 = t.stride(0), s1 = 0;
    } else {
      n = t.size(0) * t.size(1), inner = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
    }
  }
  int64_t at(int64_t i) const { return (i / inner) * s0 + (i % inner) * s1; }
};

// rows in parallel; a task of at least ~64 K elements, so a decode row runs inline (no fork)
template <typename F>
void each_row(int64_t n, int64_t d, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f(r);
  });
}

void check_weight(const torch::Tensor& w, const torch::Tensor& x, int64_t d, const char* what) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d && w.is_contiguous(), what,
              ": the weight must be a contiguous [D] vector");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), what, ": weight and input dtypes differ");
}

}  // namespace

// Zero-centred RMSNorm: rms_norm_zc in layers/norms.py.
torch::Tensor rms_norm_zc(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const Rows rx(x, "rms_norm_zc");
  check_weight(w, x, rx.d, "rms_norm_zc");
  auto y = torch::empty(x.sizes(), x.options());
  dispatch(x.scalar_type(), "rms_norm_zc", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    each_row(rx.n, rx.d, [&](int64_t r) {
      norm_zc_row(X + rx.at(r), W, Y + r * rx.d, rx.d, static_cast<float>(eps));
    });
  });
  return y;
}

// h += delta in place (rounded to the model dtype, as h.add_(delta)), then rms_norm_zc(h).
torch::Tensor add_rms_norm_zc_(torch::Tensor& h, const torch::Tensor& delta,
                               const torch::Tensor& w, double eps) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && delta.dim() == 2 && delta.stride(1) == 1 &&
                  h.sizes() == delta.sizes() && h.scalar_type() == delta.scalar_type(),
              "add_rms_norm_zc_: h [T, D] contiguous and delta [T, D] of its dtype expected");
  const int64_t n = h.size(0), d = h.size(1), ds = delta.stride(0);
  check_weight(w, h, d, "add_rms_norm_zc_");
  auto y = torch::empty_like(h);
  dispatch(h.scalar_type(), "add_rms_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* H = h.data_ptr<scalar_t>();
    const scalar_t* D = delta.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    each_row(n, d, [&](int64_t r) {
      scalar_t* hr = H + r * d;
      const scalar_t* dr = D + r * ds;
      for (int64_t j = 0; j < d; ++j)
        hr[j] = round_to<scalar_t>(static_cast<float>(hr[j]) + static_cast<float>(dr[j]));
      norm_zc_row(hr, W, Y + r * d, d, static_cast<float>(eps));
    });
  });
  return y;
}

// The DeltaNet output norm: gated_rms_norm in layers/norms.py (rounding: small_rows.h).
torch::Tensor gated_rms_norm(const torch::Tensor& x, const torch::Tensor& z, const torch::Tensor& w,
                             double eps) {
  const Rows rx(x, "gated_rms_norm"), rz(z, "gated_rms_norm (gate)");
  TORCH_CHECK(x.sizes() == z.sizes() && x.scalar_type() == z.scalar_type(),
              "gated_rms_norm: x and z must have the same shape and dtype");
  check_weight(w, x, rx.d, "gated_rms_norm");
  auto y = torch::empty(x.sizes(), x.options());
  dispatch(x.scalar_type(), "gated_rms", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Z = z.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    const int64_t d = rx.d;
    each_row(rx.n, d, [&](int64_t r) {
      rows::gated_rms_norm_row(X + rx.at(r), Z + rz.at(r), W, Y + r * d, d,
                               static_cast<float>(eps));
    });
  });
  return y;
}

// SwiGLU's activation: silu(gate) rounded to the model dtype, times up, rounded (silu_mul in
// ops/pointwise.py). gate and up are often the two column halves of one packed output.
torch::Tensor silu_mul(const torch::Tensor& gate, const torch::Tensor& up) {
  const Rows rg(gate, "silu_mul"), ru(up, "silu_mul (up)");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
              "silu_mul: gate and up must have the same shape and dtype");
  auto y = torch::empty(gate.sizes(), gate.options());
  dispatch(gate.scalar_type(), "silu_mul", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* G = gate.data_ptr<scalar_t>();
    const scalar_t* U = up.data_ptr<scalar_t>();
    scalar_t* Y = y.data_ptr<scalar_t>();
    const int64_t d = rg.d;
    each_row(rg.n, d,
             [&](int64_t r) { rows::silu_mul_row(G + rg.at(r), U + ru.at(r), Y + r * d, d); });
  });
  return y;
}

// DeltaNet's per-head gates from the projections a, b [T, nv] (layers/deltanet.py;
// small_rows.h): beta in the model dtype, g in fp32.
std::vector<torch::Tensor> deltanet_gates(const torch::Tensor& a, const torch::Tensor& b,
                                          const torch::Tensor& dt_bias,
                                          const torch::Tensor& a_log) {
  const Rows ra(a, "deltanet_gates (a)"), rb(b, "deltanet_gates (b)");
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
                  dt_bias.scalar_type() == a.scalar_type() &&
                  a_log.scalar_type() == a.scalar_type(),
              "deltanet_gates: a, b [T, nv], dt_bias and A_log must share the model dtype");
  const int64_t nv = ra.d;
  TORCH_CHECK(dt_bias.numel() == nv && a_log.numel() == nv && dt_bias.is_contiguous() &&
                  a_log.is_contiguous(),
              "deltanet_gates: dt_bias and A_log must be contiguous [nv] vectors");
  auto g = torch::empty({ra.n, nv}, a.options().dtype(at::kFloat));
  auto beta = torch::empty({ra.n, nv}, a.options());
  dispatch(a.scalar_type(), "dn_gates", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* A = a.data_ptr<scalar_t>();
    const scalar_t* B = b.data_ptr<scalar_t>();
    const scalar_t* DT = dt_bias.data_ptr<scalar_t>();
    const scalar_t* AL = a_log.data_ptr<scalar_t>();
    float* Gp = g.data_ptr<float>();
    scalar_t* Bp = beta.data_ptr<scalar_t>();
    each_row(ra.n, nv, [&](int64_t r) {
      rows::deltanet_gates_row(A + ra.at(r), B + rb.at(r), DT, AL, nv, Gp + r * nv, Bp + r * nv);
    });
  });
  return {g, beta};
}

// NeoX rotary on the first rd dims of every head of q and k, in place (small_rows.h)
template <typename T>
void rotate_rows(T* X, int64_t T_, int64_t heads, int64_t s0, int64_t s1, const T* C, const T* S,
                 int64_t rd) {
  each_row(T_ * heads, rd, [&](int64_t r) {
    const int64_t t = r / heads;
    rows::rotate_row(X + t * s0 + (r % heads) * s1, C + t * rd, S + t * rd, rd);
  });
}

void rotary_qk_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& cos,
                const torch::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 &&
                  q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary_qk_: q [T, nh, hd] and k [T, nkv, hd] with contiguous heads expected");
  const int64_t rd = cos.size(-1);
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.sizes() == sin.sizes() && cos.size(0) == q.size(0) && rd % 2 == 0 &&
                  rd <= q.size(2),
              "rotary_qk_: cos and sin must be contiguous [T, rotary_dim <= head_dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              "rotary_qk_: q, k, cos and sin must share the model dtype");
  dispatch(q.scalar_type(), "rotary_qk_", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* C = cos.data_ptr<scalar_t>();
    const scalar_t* S = sin.data_ptr<scalar_t>();
    rotate_rows(q.data_ptr<scalar_t>(), q.size(0), q.size(1), q.stride(0), q.stride(1), C, S, rd);
    rotate_rows(k.data_ptr<scalar_t>(), k.size(0), k.size(1), k.stride(0), k.stride(1), C, S, rd);
  });
}

// The first index of each row's maximum of fp32 rows [R, V] (torch's max(-1).indices: a NaN
// counts as the maximum, the first one wins). Two vector passes: the maximum, then its first
// occurrence. torch's index-tracking reduction is scalar: ~210 us over a 248K vocabulary on a
// Zen 4, this ~25 us (the greedy sampler's argmax, every decode step).
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && x.size(1) > 0,
              "argmax_rows: fp32 [R, V] rows with a contiguous last dim expected");
  const int64_t n = x.size(0), V = x.size(1), xs = x.stride(0);
  auto out = torch::empty({n}, x.options().dtype(at::kLong));
  const float* X = x.data_ptr<float>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = X + r * xs;
      __m256 vmax = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= V; j += 8) {
        const __m256 v = _mm256_loadu_ps(row + j);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmax = _mm256_max_ps(vmax, v);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      float m = lanes[0];
      for (int k = 1; k < 8; ++k) m = std::max(m, lanes[k]);
      bool has_nan = _mm256_movemask_ps(nan) != 0;
      for (int64_t t = j; t < V; ++t) {
        has_nan = has_nan || std::isnan(row[t]);
        m = std::max(m, row[t]);
      }
      int64_t best = 0;
      if (has_nan) {
        while (!std::isnan(row[best])) ++best;
      } else {
        const __m256 vm = _mm256_set1_ps(m);
        int64_t t = 0;
        int mask = 0;
        for (; t + 8 <= V; t += 8)
          if ((mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + t), vm, _CMP_EQ_OQ))))
            break;
        if (mask) {
          best = t + __builtin_ctz(mask);
        } else {
          while (row[t] != m) ++t;
          best = t;
        }
      }
      O[r] = best;
    }
  });
  return out;
}

// Gated DeltaNet's causal depthwise conv over one sequence's prefill chunk x [T, C], then SiLU
// (ops/conv.py causal_conv1d, the reference): u[t, c] = silu(round(sum_j w[c, j] in[t - (K - 1)
// + j, c])), the inputs before the chunk from state [C, K - 1] (None: zeros). The sums in fp32
// in the reference's order (tap K - 1, then taps 0 .. K - 2, each a product then an add),
// rounded once to x's dtype, SiLU in it: one pass over x where the reference makes 2K - 1 over
// [T, C] (its addcmul_ / mul / silu passes): 4x at 512 tokens of the 0.8B (bench/small_ops.py).
torch::Tensor causal_conv1d_silu(const torch::Tensor& x, const torch::Tensor& w,
                                 const c10::optional<torch::Tensor>& state) {
  const Rows rx(x, "causal_conv1d_silu");
  TORCH_CHECK(x.dim() == 2, "causal_conv1d_silu: x must be [T, C]");
  const int64_t T = rx.n, C = rx.d;
  TORCH_CHECK(w.dim() == 2 && w.size(0) == C && w.size(1) >= 1 && w.size(1) <= 16 &&
                  w.scalar_type() == x.scalar_type(),
              "causal_conv1d_silu: weight [C, K <= 16] in x's dtype");
  const int64_t K = w.size(1);
  if (state.has_value())
    TORCH_CHECK(state->dim() == 2 && state->size(0) == C && state->size(1) == K - 1 &&
                    state->scalar_type() == x.scalar_type(),
                "causal_conv1d_silu: state [C, K - 1] in x's dtype");
  auto y = torch::empty({T, C}, x.options());
  dispatch(x.scalar_type(), "causal_conv1d_silu", [&](auto tag) {
    using scalar_t = decltype(tag);
    // the weight as [K, C] fp32 and the state as [K - 1, C] fp32 rows, oldest first (exact)
    std::vector<float> wt(K * C), prev((K - 1) * C, 0.f);
    const scalar_t* w0 = w.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < K; ++j)
        wt[j * C + c] = static_cast<float>(w0[c * w.stride(0) + j * w.stride(1)]);
    if (state.has_value()) {
      const scalar_t* s0 = state->data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < K - 1; ++j)
          prev[j * C + c] = static_cast<float>(s0[c * state->stride(0) + j * state->stride(1)]);
    }
    const scalar_t* X = x.data_ptr<scalar_t>();
    const float* W = wt.data();
    const float* P = prev.data();
    scalar_t* Y = y.data_ptr<scalar_t>();
    each_row(T, C * K, [&](int64_t t) {
      const scalar_t* src[16];  // tap j's input row (x, or the state's fp32 row)
      const float* srcf[16];
      for (int64_t j = 0; j < K; ++j) {
        const int64_t tt = t - (K - 1) + j;
        src[j] = tt >= 0 ? X + rx.at(tt) : nullptr;
        srcf[j] = tt >= 0 ? nullptr : P + (K - 1 + tt) * C;
      }
      scalar_t* yr = Y + t * C;
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        __m256 acc = _mm256_mul_ps(load8(src[K - 1] + c), load8(W + (K - 1) * C + c));
        for (int64_t j = 0; j < K - 1; ++j) {
          const __m256 in = src[j] ? load8(src[j] + c) : load8(srcf[j] + c);
          acc = _mm256_add_ps(acc, _mm256_mul_ps(in, load8(W + j * C + c)));
        }
        store8(yr + c, silu8(round8<scalar_t>(acc)));
      }
      for (; c < C; ++c) {
        float acc = static_cast<float>(src[K - 1][c]) * W[(K - 1) * C + c];
        for (int64_t j = 0; j < K - 1; ++j) {
          const float in = src[j] ? static_cast<float>(src[j][c]) : srcf[j][c];
          acc += in * W[j * C + c];
        }
        yr[c] = round_to<scalar_t>(silu(static_cast<float>(round_to<scalar_t>(acc))));
      }
    });
  });
  return y;
}

// ---- load time: NaN / inf weights ----------------------------------------------------------
// Elements of p [n] whose bits & mask == value: an exponent of all ones (NaN or +-inf) in
// bf16 / fp16 / fp32 / fp64 / e5m2, e4m3fn's NaN code S.1111.111 (it has no inf). Blocks of
// 64K elements counted in 32 bits, which the compiler vectorises: a pass at memory speed
// (the weights.py check on every tensor a checkpoint load copies).
template <typename U>
int64_t count_bits(const U* p, int64_t n, U mask, U value) {
  return at::parallel_reduce(
      0, n, int64_t(1) << 16, int64_t(0),
      [&](int64_t a, int64_t b, int64_t acc) {
        for (int64_t i = a; i < b; i += int64_t(1) << 16) {
          const int64_t e = std::min(b, i + (int64_t(1) << 16));
          uint32_t c = 0;
          for (int64_t j = i; j < e; ++j) c += (p[j] & mask) == value;
          acc += c;
        }
        return acc;
      },
      [](int64_t x, int64_t y) { return x + y; });
}

int64_t count_nonfinite(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "count_nonfinite: a contiguous CPU tensor");
  const int64_t n = t.numel();
  const void* p = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return count_bits<uint16_t>(static_cast<const uint16_t*>(p), n, 0x7F80, 0x7F80);
    case at::kHalf:
      return count_bits<uint16_t>(static_cast<const uint16_t*>(p), n, 0x7C00, 0x7C00);
    case at::kFloat:
      return count_bits<uint32_t>(static_cast<const uint32_t*>(p), n, 0x7F800000u, 0x7F800000u);
    case at::kDouble:
      return count_bits<uint64_t>(static_cast<const uint64_t*>(p), n, 0x7FF0000000000000ull,
                                  0x7FF0000000000000ull);
    case at::kFloat8_e4m3fn:
      return count_bits<uint8_t>(static_cast<const uint8_t*>(p), n, 0x7F, 0x7F);
    case at::kFloat8_e5m2:
      return count_bits<uint8_t>(static_cast<const uint8_t*>(p), n, 0x7C, 0x7C);
    default:
      TORCH_CHECK(!t.is_floating_point(), "count_nonfinite: unsupported dtype ", t.scalar_type());
      return 0;  // integers are always finite
  }
}

// ---- load time: the int8 screen of lm_head (models/head_screen.py) ---------------------------
// Per row v of w [V, K] (fp32 / bf16): scale = max|w_v| / 127 (1 for a zero row), q = w / scale
// rounded half to even and clamped to +-127 (int8), deq = q * scale (fp32), and the screen's
// bounds from the norms of w_v, deq and w_v - deq and max|deq| (HeadScreen's formulas). One pass
// over the head instead of the reference's dozen tensor ops (a 9B's 1B-weight head: seconds at
// every engine start). q and scale are the reference's bits; the norms accumulate in double
// (the reference's fp32 sums are within K 2^-24 of them, inside the bounds' 2^-8 of room).
inline double hsum_pd(__m256d v) {
  alignas(32) double l[4];
  _mm256_store_pd(l, v);
  return (l[0] + l[2]) + (l[1] + l[3]);
}

inline __m256d sq_pd(__m256 v, __m256d acc) {  // acc + the squares of v's 8 lanes, in double
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  return _mm256_fmadd_pd(hi, hi, _mm256_fmadd_pd(lo, lo, acc));
}

template <typename T>
void quantize_head_rows(const T* w, int64_t V, int64_t K, int8_t* q, float* scale, float* err,
                        float* nq, float* tiny) {
  const double acc = K * std::ldexp(1.0, -22);
  const int64_t K8 = K / 8 * 8;
  at::parallel_for(0, V, 64, [&](int64_t a, int64_t b) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 lim = _mm256_set1_ps(127.f), nlim = _mm256_set1_ps(-127.f);
    for (int64_t v = a; v < b; ++v) {
      const T* wr = w + v * K;
      __m256 m8 = _mm256_setzero_ps();
      for (int64_t j = 0; j < K8; j += 8) m8 = _mm256_max_ps(m8, _mm256_and_ps(load8(wr + j), absmask));
      alignas(32) float ml[8];
      _mm256_store_ps(ml, m8);
      float amax = 0.f;
      for (float m : ml) amax = std::max(amax, m);
      for (int64_t j = K8; j < K; ++j) amax = std::max(amax, std::fabs(static_cast<float>(wr[j])));
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const __m256 s8 = _mm256_set1_ps(s);
      __m256d sw = _mm256_setzero_pd(), sq = _mm256_setzero_pd(), se = _mm256_setzero_pd();
      __m256 d8max = _mm256_setzero_ps();
      int8_t* qr = q + v * K;
      for (int64_t j = 0; j < K8; j += 8) {  // q = clamp(rint(w / s)): the reference's bits
        const __m256 x = load8(wr + j);
        const __m256 r = _mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_round_ps(
            _mm256_div_ps(x, s8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        const __m128i i32lo = _mm_cvtps_epi32(_mm256_castps256_ps128(r));
        const __m128i i32hi = _mm_cvtps_epi32(_mm256_extractf128_ps(r, 1));
        const __m128i i16 = _mm_packs_epi32(i32lo, i32hi);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + j), _mm_packs_epi16(i16, i16));
        const __m256 d = _mm256_mul_ps(r, s8);
        sw = sq_pd(x, sw);
        sq = sq_pd(d, sq);
        se = sq_pd(_mm256_sub_ps(x, d), se);
        d8max = _mm256_max_ps(d8max, _mm256_and_ps(d, absmask));
      }
      double n_w2 = hsum_pd(sw), n_q2 = hsum_pd(sq), n_e2 = hsum_pd(se);
      _mm256_store_ps(ml, d8max);
      float dmax = 0.f;
      for (float m : ml) dmax = std::max(dmax, m);
      for (int64_t j = K8; j < K; ++j) {
        const float x = static_cast<float>(wr[j]);
        const float r = std::min(127.f, std::max(-127.f, std::nearbyint(x / s)));
        qr[j] = static_cast<int8_t>(r);
        const float d = r * s, e = x - d;
        n_w2 += double(x) * x;
        n_q2 += double(d) * d;
        n_e2 += double(e) * e;
        dmax = std::max(dmax, std::fabs(d));
      }
      const double n_w = std::sqrt(n_w2), n_q = std::sqrt(n_q2), n_e = std::sqrt(n_e2);
      const double room = 1.0 + std::ldexp(1.0, -8);
      scale[v] = s;
      err[v] = float((n_e + (acc + std::ldexp(1.0, -7)) * n_q + acc * n_w) * room);
      nq[v] = float(n_q * room);
      tiny[v] = float((K * std::ldexp(1.0, -125) * (double(amax) + dmax) + K * std::ldexp(1.0, -120)) * 2);
    }
  });
}

std::vector<torch::Tensor> quantize_head(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "quantize_head: a contiguous [V, K] CPU tensor");
  const int64_t V = w.size(0), K = w.size(1);
  const auto f32 = w.options().dtype(at::kFloat);
  auto q = torch::empty({V, K}, w.options().dtype(at::kChar));
  auto scale = torch::empty({V}, f32), err = torch::empty({V}, f32);
  auto nq = torch::empty({V}, f32), tiny = torch::empty({V}, f32);
  if (w.scalar_type() == at::kFloat) {
    quantize_head_rows(w.data_ptr<float>(), V, K, q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                       err.data_ptr<float>(), nq.data_ptr<float>(), tiny.data_ptr<float>());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16, "quantize_head: fp32 or bf16, got ", w.scalar_type());
    quantize_head_rows(w.data_ptr<at::BFloat16>(), V, K, q.data_ptr<int8_t>(),
                       scale.data_ptr<float>(), err.data_ptr<float>(), nq.data_ptr<float>(),
                       tiny.data_ptr<float>());
  }
  return {q, scale, err, nq, tiny};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_zc", &rms_norm_zc, QWEN35_NOGIL, "zero-centred RMSNorm");
  m.def("add_rms_norm_zc_", &add_rms_norm_zc_, QWEN35_NOGIL, "h += delta in place, then its RMSNorm");
  m.def("gated_rms_norm", &gated_rms_norm, QWEN35_NOGIL, "DeltaNet's gated RMSNorm");
  m.def("silu_mul", &silu_mul, QWEN35_NOGIL, "silu(gate) * up");
  m.def("deltanet_gates", &deltanet_gates, QWEN35_NOGIL, "DeltaNet's g (fp32) and beta from a and b");
  m.def("rotary_qk_", &rotary_qk_, QWEN35_NOGIL, "NeoX partial rotary of q and k, in place");
  m.def("argmax_rows", &argmax_rows, QWEN35_NOGIL, "first index of each fp32 row's maximum (NaN first)");
  m.def("causal_conv1d_silu", &causal_conv1d_silu, QWEN35_NOGIL,
        "DeltaNet's causal conv over a prefill chunk (state or zeros before it), then SiLU",
        py::arg("x"), py::arg("w"), py::arg("state") = py::none());
  m.def("count_nonfinite", &count_nonfinite, QWEN35_NOGIL, "NaN / inf elements of a contiguous tensor");
  m.def("quantize_head", &quantize_head, QWEN35_NOGIL,
        "lm_head's int8 screen: (q, scale, err, nq, tiny), models/head_screen.py");
}
