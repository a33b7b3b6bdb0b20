// Block-FP8 (e4m3, one fp32 scale per bo x bi block) weights on the CPU, read directly.
//
// fp8_linear (decode GEMV): e4m3 -> fp32 is a bit move. Sign-extend the byte to 32 bits, shift
// left by 20 (sign to bit 31 over copies of it, exponent to bits 26..23, mantissa to 22..20)
// and clear bits 30..27: the fp32 value is the e4m3 value times 2^-120, e4m3's subnormals
// (exponent 0) becoming fp32 denormals with the same bits, so 3 integer ops per 8 weights
// give every weight exactly. The input rows are scaled by 2^64 (exact; inputs up to 2^64 in
// magnitude), so products are the true ones times 2^-56, normal down to |w x| = 2^-70, and the
// 2^56 goes into the block scale. Denormal inputs must be honoured: the call clears MXCSR's DAZ
// (which the engine sets, engine/runtime.py) in each thread it runs on and restores it after.
// Before (session 31 and earlier) the byte went to fp16 bits and F16C's vcvtph2ps, which reads
// denormals whatever DAZ says: 1.16-1.2x slower streaming on a Zen 3, where it was
// compute-bound (README "FP8 on this Zen 3"). (e4m3fn's NaN byte 0x7f is not expected in weights.)
//
// fp8_linear: y [M, N] = x [M, K] @ W^T for a few rows (decode), W [N, K] read once
// (fp8_linear_many: several such products of one shape, a MoE layer's picked experts, in one
// parallel_for, each row the bits fp8_linear gives it): per output
// row, each 16-weight chunk is converted once and used for up to 4 input rows (gemv_cpu.cpp's
// scheme: accumulators in registers, >= 4 chains); per block the partial dot products are
// scaled; one horizontal sum per row and input row at the end. (A first version kept one
// accumulator per input row in an array indexed at run time: 10 GB/s, latency-bound.)
// fp8_dequant: W [N, K] in the output's dtype (prefill: dequantise into a reused buffer, then a
// regular GEMM) through fp16 bits (fp8x16_f16 below: the fp16 value is the e4m3 value times
// 2^-8, subnormals included, F16C converts it exactly). The PyTorch twins are quant/formats.py
// dequantize_fp8_blocks (+ F.linear).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_ext.h"
#include <c10/util/Float8_e4m3fn.h>

#include "cpu_isa.h"
#include "gemv_rows.h"
#include "moe_block.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using gemv_rows::kMaxRows;

inline float fp8_scalar(uint8_t v) {  // e4m3fn -> float (exact)
  const int s = v >> 7, e = (v >> 3) & 0xF, m = v & 0x7;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9)
                           : std::ldexp(1.f + m / 8.f, e - 7);
  return s ? -mag : mag;
}

// 16 e4m3 bytes -> two __m256 of (value * 2^-8): sign-extended to 16 bits, shifted left by 7
// (sign to bit 15, exponent + mantissa to bits 13..7), bit 14 (a sign copy) cleared
inline void fp8x16_f16(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i f16 =
      _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(f16));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(f16, 1));
}

// 16 e4m3 bytes -> two __m256 of (value * 2^-120) as fp32 bits (denormal for e4m3 subnormals)
inline void fp8x16(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i keep = _mm256_set1_epi32(static_cast<int>(0x87F00000u));
  const __m256i a = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  lo = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(a, 20), keep));
  hi = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(b, 20), keep));
}

constexpr float kXScale = 0x1p64f;    // the input rows' scale (exact)
constexpr float kWScale = 0x1p56f;    // 2^120 / 2^64: what each block scale is multiplied by

// MXCSR's DAZ cleared while alive (fp8x16's denormal weights read as themselves), then restored
struct DenormalInputs {
  unsigned csr = _mm_getcsr();
  DenormalInputs() { _mm_setcsr(csr & ~0x0040u); }
  ~DenormalInputs() { _mm_setcsr(csr); }
};


// One output row against MR <= 4 input rows (fp32 times kXScale, row stride K), accumulators in
// registers (DAZ off: DenormalInputs):
// per block of bi inputs the partial dot products (4 independent chains a row, for every row
// count: a row's sum is then the same bits whichever rows share its pass) are scaled; a block's
// last K % 16 weights are summed in scalar. Inlined into the two builds below.
template <int MR>
__attribute__((always_inline)) inline void fp8_rows(const float* X, int64_t K, const uint8_t* w,
                                                    const float* srow, int64_t bi, float* out) {
  constexpr int U = 2;  // 16-weight chunks an iteration
  __m256 tot[MR];
  float tail[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm256_setzero_ps(), tail[i] = 0.f;
  const int64_t nbi = (K + bi - 1) / bi;
  for (int64_t b = 0; b < nbi; ++b) {
    const int64_t k0 = b * bi, k1 = std::min(K, k0 + bi);
    __m256 acc[MR][2 * U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < 2 * U; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 * U <= k1; k += 16 * U) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + gemv_rows::kInt8Prefetch, _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        __m256 lo, hi;
        fp8x16(w + k + 16 * u, lo, hi);
        for (int i = 0; i < MR; ++i) {
          const float* x = X + i * K + k + 16 * u;
          acc[i][2 * u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), acc[i][2 * u]);
          acc[i][2 * u + 1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 8), acc[i][2 * u + 1]);
        }
      }
    }
    for (; k + 16 <= k1; k += 16) {
      __m256 lo, hi;
      fp8x16(w + k, lo, hi);
      for (int i = 0; i < MR; ++i) {
        const float* x = X + i * K + k;
        acc[i][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 8), acc[i][1]);
      }
    }
    const __m256 sv = _mm256_set1_ps(srow[b] * kWScale);
    for (int i = 0; i < MR; ++i) {
      __m256 a = acc[i][0];
      for (int u = 1; u < 2 * U; ++u) a = _mm256_add_ps(a, acc[i][u]);
      tot[i] = _mm256_fmadd_ps(a, sv, tot[i]);
    }
    for (; k < k1; ++k) {  // a block's last K % 16 weights (x back to its own scale: exact)
      const float wv = fp8_scalar(w[k]) * srow[b];
      for (int i = 0; i < MR; ++i) tail[i] += wv * (X[i * K + k] * (1.f / kXScale));
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = gemv_rows::hsum8(tot[i]) + tail[i];
}

// AVX512 CPUs: the same instructions, with VL's 32 ymm registers for every row count's chains
template <int MR>
__attribute__((target("avx512f,avx512vl,avx2,fma,f16c"))) void fp8_rows_vl(
    const float* X, int64_t K, const uint8_t* w, const float* srow, int64_t bi, float* out) {
  fp8_rows<MR>(X, K, w, srow, bi, out);
}

// vl (AVX512 CPUs): MR rows in one pass; else AVX2's 16 registers hold 2 rows' chains, so 3-4
// rows run as 2 + the rest (the weight row decoded twice). The same bits per row either way.
template <int MR>
void fp8_row(bool vl, const float* X, int64_t K, const uint8_t* w, const float* srow,
             int64_t bi, float* out) {
  if (vl) {
    fp8_rows_vl<MR>(X, K, w, srow, bi, out);
  } else if constexpr (MR > 2) {
    fp8_rows<2>(X, K, w, srow, bi, out);
    fp8_rows<MR - 2>(X + 2 * K, K, w, srow, bi, out + 2);
  } else {
    fp8_rows<MR>(X, K, w, srow, bi, out);
  }
}

// One x [M <= 16, K] (fp32, times kXScale) against one weight: y rows row0 .. row0 + M - 1
struct Product {
  const float* X;
  const uint8_t* W;
  const float* S;
  int64_t M, row0;
};

// every product's rows, all in one parallel_for over (product, output row): one fork / join for
// a MoE layer's picked experts, each row computed as for a product alone (the same bits)
template <typename T>
void linear_impl(const std::vector<Product>& ps, T* Y, int64_t N, int64_t K, int64_t bo,
                 int64_t bi, bool vl) {
  const int64_t nbi = (K + bi - 1) / bi, C = static_cast<int64_t>(ps.size());
  gemv_rows::for_product_rows<DenormalInputs>(C, N, [&](int64_t c, int64_t n) {
    float out[gemv_rows::kMR];
    const Product& p = ps[c];
    for (int64_t m = 0; m < p.M; m += gemv_rows::kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(gemv_rows::kMR, p.M - m));
      DISPATCH_MR(mr, fp8_row, vl, p.X + m * K, K, p.W + n * K, p.S + (n / bo) * nbi, bi, out);
      for (int r = 0; r < mr; ++r) Y[(p.row0 + m + r) * N + n] = static_cast<T>(out[r]);
    }
  });
}

template <typename T>
void dequant_impl(const uint8_t* W, const float* S, T* O, int64_t N, int64_t K, int64_t bo,
                  int64_t bi) {
  const int64_t nbi = (K + bi - 1) / bi;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    alignas(32) float buf[16];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = W + n * K;
      T* o = O + n * K;
      const float* srow = S + (n / bo) * nbi;
      for (int64_t b = 0; b < nbi; ++b) {
        const int64_t k0 = b * bi, k1 = std::min(K, k0 + bi);
        const __m256 sv = _mm256_set1_ps(srow[b] * 256.f);
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) {
          __m256 lo, hi;
          fp8x16_f16(w + k, lo, hi);
          _mm256_store_ps(buf, _mm256_mul_ps(lo, sv));
          _mm256_store_ps(buf + 8, _mm256_mul_ps(hi, sv));
          for (int j = 0; j < 16; ++j) o[k + j] = static_cast<T>(buf[j]);
        }
        for (; k < k1; ++k) o[k] = static_cast<T>(fp8_scalar(w[k]) * srow[b]);
      }
    }
  });
}

void check(const torch::Tensor& w, const torch::Tensor& scale, int64_t bo, int64_t bi) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.element_size() == 1, "w: [N, K] fp8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(), "scale: fp32");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == (w.size(0) + bo - 1) / bo &&
                  scale.size(1) == (w.size(1) + bi - 1) / bi,
              "scale: [ceil(N/bo), ceil(K/bi)]");
}

// y [sum M_c, N] = [x_c @ dequant(w_c)^T] stacked, the x_c [M_c <= 16, K] of one dtype (bf16 or
// fp32), the w_c of one shape
torch::Tensor linear_products(const std::vector<torch::Tensor>& xs,
                              const std::vector<torch::Tensor>& ws,
                              const std::vector<torch::Tensor>& scales, int64_t bo, int64_t bi,
                              bool avx2_only, const char* name) {
  TORCH_CHECK(!xs.empty() && xs.size() == ws.size() && ws.size() == scales.size(), name,
              ": one w and one scale for each x");
  const int64_t N = ws[0].size(0), K = ws[0].size(1);
  const auto dtype = xs[0].scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, name,
              ": x must be bf16 or fp32");
  std::vector<torch::Tensor> xf;  // kept alive while the products point into them
  std::vector<Product> ps;
  int64_t rows = 0;
  for (size_t c = 0; c < xs.size(); ++c) {
    check(ws[c], scales[c], bo, bi);
    TORCH_CHECK(ws[c].size(0) == N && ws[c].size(1) == K, name, ": weights of one shape");
    TORCH_CHECK(xs[c].dim() == 2 && xs[c].size(1) == K && xs[c].size(0) >= 1 &&
                    xs[c].size(0) <= kMaxRows && xs[c].scalar_type() == dtype,
                name, ": x [1..16, K], one dtype");
    xf.push_back(xs[c].to(torch::kFloat32).mul(static_cast<double>(kXScale)).contiguous());  // exact
    ps.push_back({xf.back().data_ptr<float>(), reinterpret_cast<const uint8_t*>(ws[c].data_ptr()),
                  scales[c].data_ptr<float>(), xs[c].size(0), rows});
    rows += xs[c].size(0);
  }
  auto y = torch::empty({rows, N}, xs[0].options());
  const bool vl = !avx2_only && cpu_isa::avx512();
  if (dtype == torch::kBFloat16)
    linear_impl(ps, y.data_ptr<at::BFloat16>(), N, K, bo, bi, vl);
  else
    linear_impl(ps, y.data_ptr<float>(), N, K, bo, bi, vl);
  return y;
}

}  // namespace

torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t bo,
                         int64_t bi, bool avx2_only) {
  check(w, scale, bo, bi);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1) && x.size(0) <= kMaxRows,
              "x: [M<=16, K]");
  if (x.size(0) == 0) return torch::empty({0, w.size(0)}, x.options());
  return linear_products({x}, {w}, {scale}, bo, bi, avx2_only, "fp8_linear");
}

// [fp8_linear(x_c, w_c, scale_c)] stacked: a MoE layer's picked FP8 experts in one call
torch::Tensor fp8_linear_many(const std::vector<torch::Tensor>& xs,
                              const std::vector<torch::Tensor>& ws,
                              const std::vector<torch::Tensor>& scales, int64_t bo, int64_t bi,
                              bool avx2_only) {
  return linear_products(xs, ws, scales, bo, bi, avx2_only, "fp8_linear_many");
}

// A MoE block's FP8 experts for a decode step, their tensors held once (moe_block.h; the
// products by linear_products, as fp8_linear_many / fp8_linear compute them for the module
// path on CPUs whose bf16 rows do not take gemv_cpu.cpp's linear_fp8, and for fp32 rows).
// Every projection of one block size; gate_up in one product (I a multiple of bo).
class Fp8Moe {
 public:
  Fp8Moe(std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> gate_up_scale,
         std::vector<torch::Tensor> down, std::vector<torch::Tensor> down_scale,
         torch::Tensor shared_gate_up, torch::Tensor shared_gate_up_scale,
         torch::Tensor shared_down, torch::Tensor shared_down_scale, int64_t bo, int64_t bi)
      : h_(std::move(gate_up), std::move(gate_up_scale), std::move(down), std::move(down_scale),
           std::move(shared_gate_up), std::move(shared_gate_up_scale), std::move(shared_down),
           std::move(shared_down_scale), "Fp8Moe",
           [&](const torch::Tensor& w, const torch::Tensor& sc, int64_t N, int64_t K) {
             TORCH_CHECK(bo > 0 && bi > 0, "Fp8Moe: positive blocks");
             check(w, sc, bo, bi);
             return w.size(0) == N && w.size(1) == K && w.device().is_cpu();
           }),
        bo_(bo), bi_(bi) {
    TORCH_CHECK(h_.w[0][0].size(0) % (2 * bo) == 0, "Fp8Moe: I must be a multiple of bo");
  }

  std::vector<torch::Tensor> run(const torch::Tensor& xs, const std::vector<int64_t>& experts,
                                 const std::vector<int64_t>& counts, const torch::Tensor& x) const {
    const auto many = [&](const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& es,
                          bool down) {
      std::vector<torch::Tensor> w, sc;
      for (int64_t e : es) w.push_back(h_.w[down][e]), sc.push_back(h_.s[down][e]);
      return linear_products(parts, w, sc, bo_, bi_, false, "Fp8Moe");
    };
    const auto shared = [&](const torch::Tensor& rows, bool down) {
      return linear_products({rows}, {h_.sw[down]}, {h_.ss[down]}, bo_, bi_, false, "Fp8Moe");
    };
    return moe_block::run(xs, experts, counts, x, h_.experts(), "Fp8Moe", many, shared);
  }

 private:
  moe_block::Held h_;
  int64_t bo_, bi_;
};

void fp8_dequant(torch::Tensor w, torch::Tensor scale, torch::Tensor out, int64_t bo, int64_t bi) {
  check(w, scale, bo, bi);
  TORCH_CHECK(out.sizes() == w.sizes() && out.is_contiguous(), "out: [N, K] contiguous");
  const auto* W = reinterpret_cast<const uint8_t*>(w.data_ptr());
  if (out.scalar_type() == torch::kBFloat16) {
    dequant_impl(W, scale.data_ptr<float>(), out.data_ptr<at::BFloat16>(), w.size(0), w.size(1),
                 bo, bi);
  } else if (out.scalar_type() == torch::kFloat32) {
    dequant_impl(W, scale.data_ptr<float>(), out.data_ptr<float>(), w.size(0), w.size(1), bo, bi);
  } else {
    TORCH_CHECK(false, "fp8_dequant: out must be bf16 or fp32");
  }
}

namespace {

// fp32 -> e4m3fn bits for 8 values of at most 448 in magnitude (or NaN), rounded to nearest even:
// c10's fp8e4m3fn_from_fp32_value (torch's .to(float8_e4m3fn)) in 8 lanes, step for step
inline __m128i e4m3_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
  const __m256i f = _mm256_xor_si256(bits, sign);  // |v|
  // below 2^-6 (e4m3's smallest normal): add 2^-5 * 2^... (c10's denorm_mask, 141 << 23) in fp32,
  // the low byte of the sum's bits minus the mask's is the subnormal (or zero) code
  const __m256i denorm_mask = _mm256_set1_epi32(141 << 23);
  const __m256i sub = _mm256_sub_epi32(
      _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(f), _mm256_castsi256_ps(denorm_mask))),
      denorm_mask);
  // normal: rebias the exponent, round half to even on bit 20, take bits 20..27
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(f, 20), _mm256_set1_epi32(1));
  const __m256i nrm = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(f, _mm256_set1_epi32(static_cast<int>(
                                               (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFF))),
                       odd),
      20);
  const __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), f);  // f < 2^-6 (f >= 0)
  const __m256i nan = _mm256_cmpgt_epi32(f, _mm256_set1_epi32((1087 << 20) - 1));  // c10: 0x7f
  __m256i r = _mm256_blendv_epi8(nrm, sub, small);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f), nan);
  r = _mm256_or_si256(_mm256_and_si256(r, _mm256_set1_epi32(0xff)), _mm256_srli_epi32(sign, 24));
  // 8 int32 (each < 256) -> 8 bytes
  const __m256i p16 = _mm256_packus_epi32(r, r);  // [a0..3 a0..3 | a4..7 a4..7] as u16
  const __m256i p8 = _mm256_packus_epi16(p16, p16);
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(p8), _mm256_extracti128_si256(p8, 1));
}

// quant/formats.py quantize_fp8_blocks op for op: per bo x bi block amax = max |w| (fp32),
// scale = max(amax / 448, 1e-12) rounded to S, q = e4m3(clamp(w / scale, -448, 448))
template <typename T, typename S>
void fp8_quantize_impl(const T* W, int64_t N, int64_t K, int64_t bo, int64_t bi, uint8_t* Q,
                       S* SC) {
  const int64_t nbo = (N + bo - 1) / bo, nbi = (K + bi - 1) / bi;
  at::parallel_for(0, nbo, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> row(K), amax(nbi), sf(nbi);
    const __m256 lim = _mm256_set1_ps(448.f), nlim = _mm256_set1_ps(-448.f);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * bo, r1 = std::min(N, r0 + bo);
      std::fill(amax.begin(), amax.end(), 0.f);
      for (int64_t r = r0; r < r1; ++r) {
        gemv_rows::row_to_float(W + r * K, K, row.data());
        for (int64_t c = 0; c < nbi; ++c) {
          const int64_t k0 = c * bi;
          amax[c] = gemv_rows::abs_max(&row[k0], std::min(K, k0 + bi) - k0, amax[c]);
        }
      }
      for (int64_t c = 0; c < nbi; ++c) {
        const S s = static_cast<S>(std::max(amax[c] / 448.0f, 1e-12f));
        SC[b * nbi + c] = s;
        sf[c] = static_cast<float>(s);
      }
      for (int64_t r = r0; r < r1; ++r) {
        gemv_rows::row_to_float(W + r * K, K, row.data());
        uint8_t* q = Q + r * K;
        for (int64_t c = 0; c < nbi; ++c) {
          const int64_t k0 = c * bi, k1 = std::min(K, k0 + bi);
          const __m256 sv = _mm256_set1_ps(sf[c]);
          int64_t k = k0;
          for (; k + 8 <= k1; k += 8) {
            __m256 v = _mm256_div_ps(_mm256_loadu_ps(&row[k]), sv);
            v = _mm256_min_ps(lim, _mm256_max_ps(nlim, v));  // (a NaN stays NaN: e4m3's 0x7f)
            _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), e4m3_bits8(v));
          }
          for (; k < k1; ++k) {
            const float v = std::min(std::max(row[k] / sf[c], -448.f), 448.f);
            q[k] = c10::Float8_e4m3fn(v).x;
          }
        }
      }
    }
  });
}

template <typename T>
void fp8_quantize_to(const T* W, int64_t N, int64_t K, int64_t bo, int64_t bi, uint8_t* Q,
                     const torch::Tensor& scale) {
  if (scale.scalar_type() == at::kFloat)
    fp8_quantize_impl(W, N, K, bo, bi, Q, scale.data_ptr<float>());
  else
    fp8_quantize_impl(W, N, K, bo, bi, Q, scale.data_ptr<at::BFloat16>());
}

}  // namespace

// w [N, K] (fp32 / bf16 / fp16) -> (q [N, K] float8_e4m3fn, scale_inv [ceil(N/bo), ceil(K/bi)]
// in scale_dtype: bf16 or fp32)
std::vector<torch::Tensor> fp8_quantize(const torch::Tensor& w, int64_t bo, int64_t bi,
                                        at::ScalarType scale_dtype) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && bo > 0 && bi > 0,
              "fp8_quantize: w [N, K] on the CPU, positive block sizes");
  TORCH_CHECK(scale_dtype == at::kFloat || scale_dtype == at::kBFloat16,
              "fp8_quantize: scales fp32 or bf16");
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto q = torch::empty({N, K}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scale = torch::empty({(N + bo - 1) / bo, (K + bi - 1) / bi}, w.options().dtype(scale_dtype));
  auto* Q = reinterpret_cast<uint8_t*>(q.data_ptr());
  gemv_rows::with_weight_dtype(
      wc, "fp8_quantize", [&](const auto* W) { fp8_quantize_to(W, N, K, bo, bi, Q, scale); });
  return {q, scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp8_quantize", &fp8_quantize, QWEN35_NOGIL,
        "w [N, K] -> (q e4m3, block scales): quant/formats.py quantize_fp8_blocks");
  m.def("fp8_linear", &fp8_linear, QWEN35_NOGIL, "x [M, K] @ dequant(w [N, K] fp8, block scales)^T",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bo"), py::arg("bi"),
        py::arg("avx2_only") = false);
  m.def("fp8_linear_many", &fp8_linear_many, QWEN35_NOGIL, "[fp8_linear(x_c, w_c, scale_c)] stacked",
        py::arg("xs"), py::arg("ws"), py::arg("scales"), py::arg("bo"), py::arg("bi"),
        py::arg("avx2_only") = false);
  m.def("fp8_dequant", &fp8_dequant, QWEN35_NOGIL, "dequantise block-FP8 w into out");
  py::class_<Fp8Moe>(m, "Fp8Moe", py::module_local())
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor,
                    torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t>(),
           py::arg("gate_up"), py::arg("gate_up_scale"), py::arg("down"), py::arg("down_scale"),
           py::arg("shared_gate_up"), py::arg("shared_gate_up_scale"), py::arg("shared_down"),
           py::arg("shared_down_scale"), py::arg("bo"), py::arg("bi"))
      .def("run", &Fp8Moe::run, QWEN35_NOGIL,
           "(xs, experts, counts, x) -> [ys, shared]: a MoE block's FP8 experts, few rows");
}
