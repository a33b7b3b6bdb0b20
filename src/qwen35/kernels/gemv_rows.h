// What the decode GEMV sources (gemv_cpu.cpp, int4_cpu.cpp, fp8_cpu.cpp) share: the row limits,
// the scalar bf16 -> fp32 widening, 8-lane horizontal sum / max, the 16-bit rounding of an input
// group for the AVX2 integer GEMVs (int8, int4) and the dispatch of a pass over up to kMR input
// rows (also attention_cpu.cpp's, over up to 4 query heads of a KV group).
// (kernels/__init__.py's Native hashes this header with each source of this folder.)
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace gemv_rows {

constexpr int64_t kMaxRows = 16;  // input rows the kernels take; more are a GEMM
constexpr int kMR = 4;            // input rows per pass over a weight row / block

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

}  // namespace gemv_rows

// Calls ROW<mr>(...) for the runtime mr in 1..kMR.
#define DISPATCH_MR(mr, ROW, ...)       \
  switch (mr) {                         \
    case 1: ROW<1>(__VA_ARGS__); break; \
    case 2: ROW<2>(__VA_ARGS__); break; \
    case 3: ROW<3>(__VA_ARGS__); break; \
    default: ROW<4>(__VA_ARGS__); break; \
  }
