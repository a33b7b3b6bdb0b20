// Row-level arithmetic of the small ops, shared by small_ops_cpu.cpp (one op per call),
// gated_delta_cpu.cpp (the DeltaNet decode step fused with its gates and output norm),
// gemv_cpu.cpp's MoE step (silu, sigmoid) and moe_block.h's held MoE blocks (SwiGLU), so all
// round exactly where the PyTorch references (layers/norms.py, layers/deltanet.py,
// layers/moe.py) round.
// (kernels/__init__.py's Native hashes this header with each source that includes it.)
#pragma once
#include <cmath>
#include <cstdint>

#include "vec_avx2.h"

namespace rows {

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }
inline float sigmoid(float v) { return 1.f / (1.f + std::exp(-v)); }

template <typename T>
inline float inv_rms(const T* x, int64_t d, float eps) {
  // Two 8-lane fp32 accumulators (the reference's torch reduction sums in lanes too; neither
  // order is the other's, so callers compare within a rounding, not bitwise).
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 v0 = vec8::load8(x + j), v1 = vec8::load8(x + j + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  for (; j + 8 <= d; j += 8) {
    const __m256 v = vec8::load8(x + j);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  float ss = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
             ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; j < d; ++j) {
    const float v = static_cast<float>(x[j]);
    ss += v * v;
  }
  return 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
}

// SwiGLU's activation of one row: silu(gate) rounded to the model dtype, times up, rounded
// (ops/pointwise.py silu_mul; small_ops_cpu.cpp silu_mul, moe_block.h swiglu).
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* y, int64_t d) {
  using namespace vec8;
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    store8(y + j, _mm256_mul_ps(round8<T>(silu8(load8(g + j))), load8(u + j)));
  for (; j < d; ++j) {
    const float s = static_cast<float>(round_to<T>(silu(static_cast<float>(g[j]))));
    y[j] = round_to<T>(s * static_cast<float>(u[j]));
  }
}

// Zero-centred RMSNorm of one row: y = x * inv_rms(x) * (1 + w), fp32, rounded once.
template <typename T>
inline void norm_zc_row(const T* x, const T* w, T* y, int64_t d, float eps) {
  const float inv = inv_rms(x, d, eps);
  const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    vec8::store8(y + j, _mm256_mul_ps(_mm256_mul_ps(vec8::load8(x + j), vinv), _mm256_add_ps(one, vec8::load8(w + j))));
  for (; j < d; ++j)
    y[j] = round_to<T>(static_cast<float>(x[j]) * inv * (1.f + static_cast<float>(w[j])));
}

// NeoX rotary of one head's first rd dims, in place (apply_rotary in layers/rotary.py):
// x1' = x1 c - x2 s, x2' = x2 c + x1 s over the two halves, each product rounded to the model
// dtype and then their sum, as the reference's ops do.
template <typename T>
inline void rotate_row(T* x, const T* c, const T* s, int64_t rd) {
  const int64_t half = rd / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
    const float a1 = static_cast<float>(round_to<T>(x1 * static_cast<float>(c[j])));
    const float b1 = static_cast<float>(round_to<T>(-x2 * static_cast<float>(s[j])));
    const float a2 = static_cast<float>(round_to<T>(x2 * static_cast<float>(c[j + half])));
    const float b2 = static_cast<float>(round_to<T>(x1 * static_cast<float>(s[j + half])));
    x[j] = round_to<T>(a1 + b1);
    x[j + half] = round_to<T>(a2 + b2);
  }
}

// The DeltaNet output norm of one head's row: the normalised value is rounded to the model
// dtype, multiplied by w and rounded (w * n in the model dtype), then multiplied by silu(z) in
// fp32 and rounded once more (the fp32 model rounds nowhere).
template <typename T>
inline void gated_rms_norm_row(const T* xr, const T* zr, const T* W, T* yr, int64_t d, float eps) {
  using namespace vec8;
  const float inv = inv_rms(xr, d, eps);
  int64_t j = 0;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (; j + 8 <= d; j += 8) {
    const __m256 n = round8<T>(_mm256_mul_ps(load8(xr + j), vinv));
    const __m256 nw = round8<T>(_mm256_mul_ps(n, load8(W + j)));
    store8(yr + j, _mm256_mul_ps(silu8(load8(zr + j)), nw));
  }
  for (; j < d; ++j) {
    const float nw = static_cast<float>(
        round_to<T>(static_cast<float>(round_to<T>(static_cast<float>(xr[j]) * inv)) *
                    static_cast<float>(W[j])));
    yr[j] = round_to<T>(silu(static_cast<float>(zr[j])) * nw);
  }
}

// DeltaNet's per-head gates from one row of the projections a, b [nv]:
//   beta = sigmoid(b) in the model dtype; g = softplus(a + dt_bias) * -exp(A_log) in fp32
// (softplus as torch's: the identity above 20).
template <typename T>
inline void deltanet_gates_row(const T* ar, const T* br, const T* DT, const T* AL, int64_t nv,
                               float* g, T* beta) {
  for (int64_t h = 0; h < nv; ++h) {
    const float x = static_cast<float>(ar[h]) + static_cast<float>(DT[h]);
    const float sp = x > 20.f ? x : std::log1p(std::exp(x));
    g[h] = sp * -std::exp(static_cast<float>(AL[h]));
    beta[h] = round_to<T>(sigmoid(static_cast<float>(br[h])));
  }
}

}  // namespace rows
