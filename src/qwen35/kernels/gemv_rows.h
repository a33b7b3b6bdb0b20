// What the decode GEMV sources (gemv_cpu.cpp, int4_cpu.cpp, fp8_cpu.cpp, head_screen_cpu.cpp)
// share: the row limits, the scalar bf16 -> fp32 widening, 8-lane horizontal sum / max, the 16-bit
// rounding of an input group for the AVX2 integer GEMVs (int8, int4), the AVX2 int8 rows
// (int8_rows_i16: linear_int8's and the head screen's) and the dispatch of a pass over up to kMR input
// rows (also attention_cpu.cpp's, over up to 4 query heads of a KV group).
// (kernels/__init__.py's Native hashes this header with each source of this folder.)
#pragma once
#include <ATen/Parallel.h>
#include "torch_ext.h"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace gemv_rows {

constexpr int64_t kMaxRows = 16;  // input rows the kernels take; more are a GEMM
constexpr int kMR = 4;            // input rows per pass over a weight row / block

struct NoGuard {};

// fn(c, n) for every output row n < N of C products (a MoE layer's picked experts: C weights of
// one shape), all in one parallel_for over C * N, so a layer pays one fork / join (tasks of at
// least 64 rows). A Guard is constructed once per task and lives while the task runs (fp8's
// MXCSR setting). A row's result does not depend on the split over threads.
template <typename Guard = NoGuard, typename Fn>
void for_product_rows(int64_t C, int64_t N, Fn&& fn) {
  at::parallel_for(0, C * N, 64, [&](int64_t i0, int64_t i1) {
    const Guard guard;
    int64_t c = i0 / N, n = i0 % N;  // (one division a task: a short row is ~100 cycles)
    for (int64_t i = i0; i < i1; ++i) {
      fn(c, n);
      if (++n == N) n = 0, ++c;
    }
  });
}

inline float bf16_to_float(uint16_t v) {  // exact: bf16 is the high half of fp32's bits
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// the sum of 8 fp32 lanes (AVX)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the largest of 8 fp32 lanes (no NaNs)
inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// a weight row w [K] (fp32 / bf16 / fp16) into fp32, exactly: the quantizers' input
template <typename T>
inline void row_to_float(const T* w, int64_t K, float* out) {
  if constexpr (std::is_same_v<T, float>)
    std::memcpy(out, w, K * sizeof(float));
  else
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(w[k]);
}

// fn(w's data as const T*) for the quantizers' weight dtypes (fp32 / bf16 / fp16), else an error
// naming the quantizer `who`
template <typename Fn>
void with_weight_dtype(const at::Tensor& w, const char* who, Fn&& fn) {
  switch (w.scalar_type()) {
    case at::kFloat: fn(w.data_ptr<float>()); break;
    case at::kBFloat16: fn(w.data_ptr<at::BFloat16>()); break;
    case at::kHalf: fn(w.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, who, ": w must be fp32, bf16 or fp16");
  }
}

// max(m, |x[0]|, ..., |x[n - 1]|) (no NaNs; exact in any order): the quantizers' amax
inline float abs_max(const float* x, int64_t n, float m) {
  int64_t k = 0;
  if (n >= 8) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v = _mm256_setzero_ps();
    for (; k + 8 <= n; k += 8) v = _mm256_max_ps(v, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
    m = std::max(m, hmax8(v));
  }
  for (; k < n; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

// One group of n inputs rounded to 16-bit integers for the AVX2 integer GEMVs (int8 in
// gemv_cpu.cpp, int4 in int4_cpu.cpp): q[k] = round(x[k] / xs) (nearest even, as torch.round),
// |q| <= qmax, and returns xs = amax / qmax. A group with a NaN or an inf returns NaN (its outputs
// become NaN), an all-zero group or one so small (amax < ~1e-34) that qmax / amax overflows
// returns 0; q is all zeros for both. The PyTorch twin: quant/formats.py quantize_rows_i16.
inline float quantize_group_i16(const float* x, int64_t n, int qmax, int16_t* q) {
  const int64_t n8 = n / 8 * 8;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps(), vbad = vmax;
  for (int64_t k = 0; k < n8; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));  // NaN
  }
  float amax = hmax8(vmax);
  bool bad = _mm256_movemask_ps(vbad) != 0;
  for (int64_t k = n8; k < n; ++k) {
    amax = std::max(amax, std::fabs(x[k]));
    bad = bad || std::isnan(x[k]);
  }
  const float inv = static_cast<float>(qmax) / amax;
  if (bad || !std::isfinite(amax) || amax == 0.f || !std::isfinite(inv)) {
    std::memset(q, 0, n * sizeof(int16_t));
    return bad || !std::isfinite(amax) ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i hi = _mm256_set1_epi32(qmax), lo = _mm256_set1_epi32(-qmax);
  int64_t k = 0;
  for (; k < n8; k += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
    v = _mm256_max_epi32(lo, _mm256_min_epi32(hi, v));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                     _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  for (; k < n; ++k)
    q[k] = static_cast<int16_t>(
        std::min(qmax, std::max(-qmax, static_cast<int>(std::nearbyint(x[k] * inv)))));
  return amax / static_cast<float>(qmax);
}

// int8 weight rows are software-prefetched this many bytes ahead (the next rows' near a row's
// end): at 1 row the AVX2 / FMA path 1.01-1.45x, the byte-table path 0.98-1.24x (README "Decode
// GEMVs"); bf16 / fp32 weights measured 0.75-1.03x with it and go without. fp8_cpu.cpp's FP8
// rows (one byte a weight too) prefetch as far (1.00-1.18x).
constexpr int kInt8Prefetch = 2048;

// ---- int8, AVX2 CPUs: activations as 16-bit integers ---------------------------------------
// gemv_cpu.cpp's FMA path spends 3 instructions on 8 int8 weights (sign-extend, convert, FMA): on a
// Zen 3 it streamed int8 at 11-12 GB/s where fp32 weights stream at 17.5, compute-bound. On CPUs
// without AVX512 (and avx2_only) each input row is rounded per group of 128 inputs to 16-bit
// integers (xs = amax / 32767, |x - xs xq| <= amax / 65534: finer than bf16's rounding of the
// group's largest value) and the dot products run in integers: vpmovsxbw (16 weights -> int16)
// + vpmaddwd (pairs summed into int32, exact) + vpaddd, 6 instructions per 32 weights; per group
// y += xs * sum xq w in fp32. Integer sums make a row's result independent of the rows beside it
// (batched == alone). A non-finite value makes its group's xs NaN (the row's outputs NaN); a
// group so small that 1 / xs overflows counts as zeros. PyTorch twin: quant/formats.py
// int8_linear_i16_reference. AVX512 CPUs keep the exact FMA path (fp32 rows) or the byte tables.
constexpr int64_t kI16Group = 128;
constexpr int kI16Max = 32767;  // |xq| (quant/formats.py INT8_X_MAX)

// x rows [M, K] fp32 -> xq [M, K] int16 and xs [M, ceil(K / 128)]
struct RowsI16 {
  std::vector<int16_t> xq;
  std::vector<float> xs;
  int64_t K, ng;
};

inline RowsI16 quantize_rows_i16(const float* X, int64_t M, int64_t K) {
  RowsI16 r{std::vector<int16_t>(M * K, 0), {}, K, (K + kI16Group - 1) / kI16Group};
  r.xs.assign(M * r.ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < r.ng; ++g) {
      const int64_t k0 = m * K + g * kI16Group, n = std::min(K - g * kI16Group, kI16Group);
      r.xs[m * r.ng + g] = quantize_group_i16(X + k0, n, kI16Max, r.xq.data() + k0);
    }
  return r;
}

// w [32] int8 against MR rows' xq at k (int16): pairs summed into a0 / a1 (int32, exact)
template <int MR>
inline void madd32(const int16_t* const* xq, int64_t k, const int8_t* w, __m256i* a0, __m256i* a1) {
  const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256i w1 =
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
  for (int i = 0; i < MR; ++i) {
    const auto* q = reinterpret_cast<const __m256i*>(xq[i] + k);
    a0[i] = _mm256_add_epi32(a0[i], _mm256_madd_epi16(w0, _mm256_loadu_si256(q)));
    a1[i] = _mm256_add_epi32(a1[i], _mm256_madd_epi16(w1, _mm256_loadu_si256(q + 1)));
  }
}

// MR input rows' sums against one int8 weight row: full groups of 128 unrolled, then the last
// partial group (16 at a time, then scalar)
template <int MR>
inline void int8_rows_i16(const RowsI16& x, int64_t m0, const int8_t* w, float* out) {
  const int64_t K = x.K, nfull = K / kI16Group;
  const int16_t* xq[MR];
  const float* xs[MR];
  __m256 f[MR];
  for (int i = 0; i < MR; ++i) {
    xq[i] = x.xq.data() + (m0 + i) * K;
    xs[i] = x.xs.data() + (m0 + i) * x.ng;
    f[i] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < nfull; ++g) {
    const int64_t k0 = g * kI16Group;
    // the group's two cache lines, 2 KB ahead
    _mm_prefetch(reinterpret_cast<const char*>(w + k0) + kInt8Prefetch, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + k0) + kInt8Prefetch + 64, _MM_HINT_T0);
    __m256i a0[MR], a1[MR];
    for (int i = 0; i < MR; ++i) a0[i] = a1[i] = _mm256_setzero_si256();
    for (int j = 0; j < kI16Group; j += 32) madd32<MR>(xq, k0 + j, w + k0 + j, a0, a1);
    for (int i = 0; i < MR; ++i)
      f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[i], a1[i])),
                             _mm256_set1_ps(xs[i][g]), f[i]);
  }
  if (nfull * kI16Group < K) {  // the last group, shorter
    const int64_t k0 = nfull * kI16Group;
    __m256i a0[MR], a1[MR];
    for (int i = 0; i < MR; ++i) a0[i] = a1[i] = _mm256_setzero_si256();
    int64_t k = k0;
    for (; k + 32 <= K; k += 32) madd32<MR>(xq, k, w + k, a0, a1);
    for (; k + 16 <= K; k += 16) {
      const __m256i w0 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
      for (int i = 0; i < MR; ++i)
        a0[i] = _mm256_add_epi32(
            a0[i], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + k))));
    }
    for (int i = 0; i < MR; ++i) {
      int32_t t = 0;  // the last < 16 inputs
      for (int64_t j = k; j < K; ++j) t += static_cast<int32_t>(w[j]) * xq[i][j];
      const __m256i a = _mm256_add_epi32(_mm256_add_epi32(a0[i], a1[i]),
                                         _mm256_setr_epi32(t, 0, 0, 0, 0, 0, 0, 0));
      f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(xs[i][nfull]), f[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = hsum8(f[i]);
}

}  // namespace gemv_rows

// Calls ROW<mr>(...) for the runtime mr in 1..kMR.
#define DISPATCH_MR(mr, ROW, ...)       \
  switch (mr) {                         \
    case 1: ROW<1>(__VA_ARGS__); break; \
    case 2: ROW<2>(__VA_ARGS__); break; \
    case 3: ROW<3>(__VA_ARGS__); break; \
    default: ROW<4>(__VA_ARGS__); break; \
  }
