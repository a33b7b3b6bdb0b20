// What the decode GEMV sources (gemv_cpu.cpp, int4_cpu.cpp, fp8_cpu.cpp) share: the row limits,
// the scalar bf16 -> fp32 widening, an 8-lane horizontal sum and the dispatch of a pass over up
// to kMR input rows (also attention_cpu.cpp's, over up to 4 query heads of a KV group).
// (kernels/__init__.py's Native hashes this header with each source of this folder.)
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

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

}  // namespace gemv_rows

// Calls ROW<mr>(...) for the runtime mr in 1..kMR.
#define DISPATCH_MR(mr, ROW, ...)       \
  switch (mr) {                         \
    case 1: ROW<1>(__VA_ARGS__); break; \
    case 2: ROW<2>(__VA_ARGS__); break; \
    case 3: ROW<3>(__VA_ARGS__); break; \
    default: ROW<4>(__VA_ARGS__); break; \
  }
