// int6 weights for lm_head under `--quantization int4` (llama.cpp keeps its q4_0 models' output
// matrix in 6.56-bit q6_K for the same reason: the head is the largest single read of a decode
// step, and 4 bits cost it too much accuracy). 6.5 bits a weight against per-row int8's 8.
//
// Layout (quant/formats.py quantize_int6_groups, its PyTorch twin): u = q + 32 in [1, 63], W = q *
// scale, one bf16 scale per group of 32 inputs ([N, K / 32]); per output row, blocks of two
// groups (64 inputs) of 48 bytes: each group's 16 bytes of low nibbles (byte j: input j in the
// low nibble, j + 16 in the high one), then 16 bytes of top bits (byte r: bits 0-1 input r of
// the first group, 2-3 input r of the second, 4-5 input 16 + r of the first, 6-7 input 16 + r
// of the second). So one 32-byte load and an and / shift give the low nibbles of two 32-byte
// vectors (W1: inputs 0..15 of both groups, W2: inputs 16..31), and a 16-byte broadcast with
// two per-64-bit-lane shifts and an and their top bits in place.
//
// linear_int6: y [M <= 16, N] = x [M, K] @ W^T. Activations rounded to 8 bits per 32 inputs
// (as the int4 GEMVs and llama.cpp's q8 activations: quant/formats.py quantize_rows_i16(x, 32,
// 127)) and laid out as W1 / W2 are; per block and input row two vpmaddubsw (unsigned u times
// signed xq, pairs of products <= 16,002), one 16-bit add (<= 32,004), one vpmaddwd into 8 int32
// lanes (4 per group), minus the rows' precomputed 32 * sum xq per lane (the offset of u):
// sum q * xq exactly; then converted and scaled by scale * xs into 8 fp32 lanes; one horizontal
// sum a row at the end (even and odd blocks in two accumulators). Each input row's arithmetic
// does not depend on the other rows of the call (batched == alone, bit for bit). AVX2 + FMA;
// on AVX512-VNNI CPUs row_dot_vnni (below: the same bits, two blocks a pass, 8 rows a pass).
// Its PyTorch twin: int6_linear_reference. Also int6_quantize (the format, bit for bit the
// PyTorch formula) and int6_rows (an Int6Embedding's looked-up rows).
//
// Measured (bench/int6_head.py, Zen 3, 2 threads): the 0.8B's head at one row 1.06-1.19x the
// per-row int8 GEMV's time, 2,048 inputs 1.26x; near compute-bound on AVX2 (~18 GB/s a core with
// the head in cache against int8's ~27), so 2-16 rows gain less (1.02-1.12x). The VNNI path
// (bench/int6_head.py, Zen 5, 2 threads, 16 rounds; AVX2 / VNNI time): 248,320 x 1,024 at 1 /
// 2 / 4 / 8 rows 1.15 / 1.33 / 1.53 / 1.83x, x 2,048 1.08 / 1.27 / 1.67 / 1.46x (one row is
// bandwidth-bound either way: 55-61 GB/s). Several rows: passes of at most 24 KiB of rounded
// rows, in tiles of output rows (linear_int6): `bench/int6_head.py --baseline REV`, 248,320 x
// 2,048 at 8 / 16 rows 1.57x / 1.65x, x 4,096 at 4 / 16 rows 1.60x / 1.55x, one row the same.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_ext.h"

#include "cpu_isa.h"
#include "gemv_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32, kBlock = 64, kBlockBytes = 48;
constexpr int kXMax = 127;
constexpr int kMR = 4;  // input rows per pass over a weight row (AVX2: 16 registers)
constexpr int kMRVnni = 8;  // (AVX512: 32)

// One input row rounded to 8 bits per group (gemv_rows::quantize_group_i16 with qmax 127, the
// int4 x8 paths' rounding), as the kernel reads it: per block xq [64] in the weights' order
// (W1's 32 bytes: inputs 0..15 of each group; W2's: inputs 16..31), off [8] (32 * the sum of xq
// over each int32 lane's inputs), xs [8] (the groups' steps, 4 lanes each; NaN for a group with
// a NaN or an inf, 0 for one of zeros: its xq all zeros).
// pairs (the VNNI path): two blocks b (even), b + 1 as [x1 of b | x1 of b + 1 | x2 of b | x2 of
// b + 1] (row_dot_vnni's 64-byte loads); an odd last block as above.
void round_row(const float* x, int64_t K, int8_t* xq, int32_t* off, float* xs, bool pairs) {
  alignas(32) int8_t q[kBlock];
  int16_t q16[kGroup];
  const int64_t nb = K / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < 2; ++g) {
      const float step = gemv_rows::quantize_group_i16(x + b * kBlock + g * kGroup, kGroup, kXMax, q16);
      for (int j = 0; j < kGroup; ++j) q[g * kGroup + j] = static_cast<int8_t>(q16[j]);
      for (int l = 0; l < 4; ++l) xs[b * 8 + g * 4 + l] = step;
    }
    int8_t* o = xq + b * kBlock;  // [g0 0..15 | g1 0..15] then [g0 16..31 | g1 16..31]
    std::memcpy(o, q, 16), std::memcpy(o + 16, q + 32, 16);
    std::memcpy(o + 32, q + 16, 16), std::memcpy(o + 48, q + 48, 16);
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o));
    const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + 32));
    const __m256i c32 = _mm256_set1_epi8(32);
    const __m256i sum = _mm256_madd_epi16(
        _mm256_add_epi16(_mm256_maddubs_epi16(c32, x1), _mm256_maddubs_epi16(c32, x2)),
        _mm256_set1_epi16(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(off + b * 8), sum);
  }
  if (!pairs) return;
  for (int64_t i = 0; i < nb * 8; ++i) off[i] = -off[i];  // row_dot_vnni's dot products start from it
  alignas(64) int8_t t[2 * kBlock];
  for (int64_t b = 0; b + 2 <= nb; b += 2) {
    int8_t* o = xq + b * kBlock;
    std::memcpy(t, o, 2 * kBlock);
    std::memcpy(o + 32, t + 64, 32), std::memcpy(o + 64, t + 32, 32);
  }
}

// One block's 64 weights as two vectors of unsigned u (W1: inputs 0..15 of both groups, W2:
// inputs 16..31)
inline void unpack_block(const uint8_t* q, __m256i& w1, __m256i& w2) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i nib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i hb =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32)));
  w1 = _mm256_or_si256(_mm256_and_si256(nib, m4),
                       _mm256_and_si256(_mm256_sllv_epi64(hb, _mm256_set_epi64x(2, 2, 4, 4)), m30));
  w2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nib, 4), m4),
                       _mm256_and_si256(_mm256_srlv_epi64(hb, _mm256_set_epi64x(2, 2, 0, 0)), m30));
}

// acc + (sum q * xq of one block and input row in 8 int32 lanes) * scale * xs
inline __m256 block_row(__m256 acc, __m256i w1, __m256i w2, __m256 s, const int8_t* x,
                        const int32_t* off, const float* xs) {
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
  const __m256i d = _mm256_sub_epi32(
      _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w1, x1), _mm256_maddubs_epi16(w2, x2)),
                        _mm256_set1_epi16(1)),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_loadu_ps(xs)), acc);
}

// one block's two bf16 scales (at sc) as fp32 lanes [s0 x4 | s1 x4]: its groups' lanes
inline __m256 block_scales(const uint16_t* sc) {
  uint32_t s2;
  std::memcpy(&s2, sc, 4);
  const __m128i sv = _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi32_si128(static_cast<int>(s2)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(sv)),
                                  _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
}

struct Rows {  // MR rounded input rows: xq [MR][K], off and xs [MR][nb * 8]
  const int8_t* xq;
  const int32_t* off;
  const float* xs;
  int64_t K, nb;
};

// One output row (nb blocks at p, 2 nb bf16 scales at sc) against MR input rows; the scales of
// four blocks widened at once, then each block's [s0 x4 | s1 x4] by one permute. Even and odd
// blocks into two accumulators a row (more independent work in flight), added at the end: the
// same operations for a row at any MR.
template <int MR>
void row_dot(const uint8_t* p, const uint16_t* sc, const Rows& r, float* out) {
  __m256 acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  const int64_t nb = r.nb, K = r.K;
  const __m256i lo = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  const __m256i hi = _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2);
  int64_t b = 0;
  for (; b + 4 <= nb; b += 4) {  // 4 blocks: 8 scales in one 16-byte load
    const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 2 * b));
    const __m256 sa = _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi16(_mm_setzero_si128(), s8),
                                                           _mm_unpacklo_epi16(_mm_setzero_si128(), s8)));
    for (int h = 0; h < 4; h += 2) {
      __m256i a1, a2, b1, b2;
      unpack_block(p + (b + h) * kBlockBytes, a1, a2);
      unpack_block(p + (b + h + 1) * kBlockBytes, b1, b2);
      // scales of blocks b + h, b + h + 1: lanes (2h, 2h + 1) and (2h + 2, 2h + 3) of sa
      const __m256 s0 = _mm256_permutevar8x32_ps(sa, h == 0 ? lo : _mm256_add_epi32(lo, _mm256_set1_epi32(4)));
      const __m256 s1 = _mm256_permutevar8x32_ps(sa, h == 0 ? hi : _mm256_add_epi32(hi, _mm256_set1_epi32(4)));
      for (int i = 0; i < MR; ++i) {
        const int64_t o = i * nb * 8 + (b + h) * 8;
        acc0[i] = block_row(acc0[i], a1, a2, s0, r.xq + i * K + (b + h) * kBlock, r.off + o, r.xs + o);
        acc1[i] = block_row(acc1[i], b1, b2, s1, r.xq + i * K + (b + h + 1) * kBlock, r.off + o + 8,
                            r.xs + o + 8);
      }
    }
  }
  for (; b < nb; ++b) {  // the last 1-3 blocks (K not a multiple of 256), even / odd as above
    const __m256 s = block_scales(sc + 2 * b);
    __m256i a1, a2;
    unpack_block(p + b * kBlockBytes, a1, a2);
    for (int i = 0; i < MR; ++i) {
      const int64_t o = i * nb * 8 + b * 8;
      __m256& acc = (b % 2 == 0) ? acc0[i] : acc1[i];
      acc = block_row(acc, a1, a2, s, r.xq + i * K + b * kBlock, r.off + o, r.xs + o);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = gemv_rows::hsum8(_mm256_add_ps(acc0[i], acc1[i]));
}

// ---- AVX512-VNNI (Zen 4, Sapphire Rapids): two blocks a 512-bit pass ---------------------
// The same integers and fp32 operations as row_dot, lane for lane: a pass holds block b (even) in
// its low 256 bits and b + 1 in its high ones, so the accumulator's low half is row_dot's acc0
// and its high half acc1; the integer dot products are two vpdpbusd (exact, as maddubs + madd
// are: no 16-bit pair sum reaches the saturation bound); an odd last block goes to the low half.
// So both paths give the same bits (tests/test_int6_head.py compares them).
#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

TARGET_VNNI inline void unpack_pair(const uint8_t* q, __m512i& w1, __m512i& w2) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const __m512i nib = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kBlockBytes)), 1);
  const __m512i hb = _mm512_inserti64x4(
      _mm512_castsi256_si512(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32)))),
      _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kBlockBytes + 32))),
      1);
  w1 = _mm512_or_si512(_mm512_and_si512(nib, m4),
                       _mm512_and_si512(_mm512_sllv_epi64(hb, _mm512_set_epi64(2, 2, 4, 4, 2, 2, 4, 4)), m30));
  w2 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(nib, 4), m4),
                       _mm512_and_si512(_mm512_srlv_epi64(hb, _mm512_set_epi64(2, 2, 0, 0, 2, 2, 0, 0)), m30));
}

template <int MR>
TARGET_VNNI void row_dot_vnni(const uint8_t* p, const uint16_t* sc, const Rows& r, float* out) {
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t nb = r.nb, K = r.K;
  const __m512i sidx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    __m512i w1, w2;
    unpack_pair(p + b * kBlockBytes, w1, w2);
    const __m128i s4 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 2 * b));
    const __m512 s = _mm512_permutexvar_ps(
        sidx, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), s4))));
    for (int i = 0; i < MR; ++i) {
      const int8_t* x = r.xq + i * K + b * kBlock;  // round_row's pair layout: x1 x1' x2 x2'
      const int64_t o = i * nb * 8 + b * 8;
      __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(r.off + o), w1, _mm512_loadu_si512(x));
      d = _mm512_dpbusd_epi32(d, w2, _mm512_loadu_si512(x + 64));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_loadu_ps(r.xs + o)), acc[i]);
    }
  }
  __m256 lo[MR], hi[MR];
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm512_castps512_ps256(acc[i]);
    hi[i] = _mm512_extractf32x8_ps(acc[i], 1);
  }
  if (b < nb) {  // an odd last block: even, so the low half (row_dot's acc0)
    const __m256 s = block_scales(sc + 2 * b);
    __m256i a1, a2;
    unpack_block(p + b * kBlockBytes, a1, a2);
    for (int i = 0; i < MR; ++i) {
      const int64_t o = i * nb * 8 + b * 8;
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.xq + i * K + b * kBlock));
      const __m256i x2 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.xq + i * K + b * kBlock + 32));
      __m256i d = _mm256_dpbusd_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.off + o)), a1, x1);
      d = _mm256_dpbusd_epi32(d, a2, x2);
      lo[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_loadu_ps(r.xs + o)), lo[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = gemv_rows::hsum8(_mm256_add_ps(lo[i], hi[i]));
}

// int6_quantize's rows: each to fp32 (exact); per group of 32 scale = max(amax / 31, 1e-30)
// rounded to bf16, q = clamp(round(w / scale), -31, 31) with round half to even, packed: quant/
// formats.py quantize_int6_groups op for op (the same fp32 operations, so the same bits)
template <typename T>
void quantize_int6_impl(const T* W, int64_t N, int64_t K, uint8_t* P, at::BFloat16* S) {
  const int64_t nb = K / kBlock;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    uint8_t u[kBlock];
    for (int64_t n = n0; n < n1; ++n) {
      gemv_rows::row_to_float(W + n * K, K, row.data());
      for (int64_t b = 0; b < nb; ++b) {
        for (int g = 0; g < 2; ++g) {
          const float* v = row.data() + b * kBlock + g * kGroup;
          const float amax = gemv_rows::abs_max(v, kGroup, 0.f);
          const at::BFloat16 sb = static_cast<at::BFloat16>(std::max(amax / 31.0f, 1e-30f));
          S[n * 2 * nb + 2 * b + g] = sb;
          const float sf = static_cast<float>(sb);
          for (int j = 0; j < kGroup; ++j)
            u[g * kGroup + j] = static_cast<uint8_t>(
                std::min(std::max(std::nearbyint(v[j] / sf), -31.f), 31.f) + 32.f);
        }
        uint8_t* o = P + n * nb * kBlockBytes + b * kBlockBytes;
        for (int g = 0; g < 2; ++g)
          for (int j = 0; j < 16; ++j)
            o[g * 16 + j] = (u[g * kGroup + j] & 15) | ((u[g * kGroup + 16 + j] & 15) << 4);
        for (int r = 0; r < 16; ++r)
          o[32 + r] = (u[r] >> 4) | ((u[kGroup + r] >> 4) << 2) | ((u[16 + r] >> 4) << 4) |
                      ((u[kGroup + 16 + r] >> 4) << 6);
      }
    }
  });
}

}  // namespace

torch::Tensor linear_int6(const torch::Tensor& x, const torch::Tensor& packed,
                          const torch::Tensor& scales, bool avx2_only) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= gemv_rows::kMaxRows && x.is_cpu(),
              "linear_int6: x [M <= 16, K] on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "linear_int6: fp32 or bf16 x");
  const int64_t M = x.size(0), K = x.size(1), nb = K / kBlock, N = packed.size(0);
  TORCH_CHECK(K % kBlock == 0, "linear_int6: K must be a multiple of 64");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) == nb * kBlockBytes,
              "linear_int6: packed [N, K / 64 * 48] uint8, contiguous");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.dim() == 2 &&
                  scales.is_contiguous() && scales.size(0) == N && scales.size(1) == 2 * nb,
              "linear_int6: scales [N, K / 32] bf16, contiguous");
  const bool vnni = !avx2_only && cpu_isa::avx512_vnni();
  const auto xf = x.to(at::kFloat).contiguous();
  std::vector<int8_t> xq(M * K);
  std::vector<int32_t> off(M * nb * 8);
  std::vector<float> xs(M * nb * 8);
  for (int64_t i = 0; i < M; ++i)
    round_row(xf.data_ptr<float>() + i * K, K, xq.data() + i * K, off.data() + i * nb * 8,
              xs.data() + i * nb * 8, vnni);
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  float* Y = y.data_ptr<float>();
  const auto* P = packed.data_ptr<uint8_t>();
  const auto* S = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  // Output rows in tiles of ~32 KiB of weights, each tile's passes of input rows one after the
  // other: a pass's rounded rows stay in L1 across the tile and the tile is read again from L2,
  // where row by row every weight row walked all M rows' bytes (32 KiB at 16 rows of 1,024
  // inputs, past L1 with the weights streaming through). Loop order only: the same bits.
  const int64_t tile = std::max<int64_t>(1, (32 << 10) / (nb * kBlockBytes));
  // rows a pass: up to the path's registers and at most 24 KiB of rounded rows (2 K bytes each;
  // a pass of 30-32 KiB ran at half the speed: K = 2,048 x 8 rows, 4,096 x 4, 5,120 x 3), the
  // passes as even as they go (4,096 x 4 rows: 2 + 2 took 30 ms, 3 + 1 44 ms)
  const int64_t cap = std::max<int64_t>(
      1, std::min<int64_t>(vnni ? kMRVnni : kMR, (12 << 10) / std::max<int64_t>(K, 1)));
  const int64_t passes = std::max<int64_t>(1, (M + cap - 1) / cap);  // (M = 0: none run)
  const int64_t step = std::max<int64_t>(1, (M + passes - 1) / passes);
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    float out[kMRVnni];
    for (int64_t t0 = n0; t0 < n1; t0 += tile)
    for (int64_t m = 0; m < M; m += step)  // input rows in passes of up to step
    for (int64_t n = t0; n < std::min(n1, t0 + tile); ++n) {
      const uint8_t* p = P + n * nb * kBlockBytes;
      const uint16_t* sc = S + n * 2 * nb;
      const int mr = static_cast<int>(std::min<int64_t>(step, M - m));
      const Rows r{xq.data() + m * K, off.data() + m * nb * 8, xs.data() + m * nb * 8, K, nb};
      if (vnni) {
        switch (mr) {
          case 1: row_dot_vnni<1>(p, sc, r, out); break;
          case 2: row_dot_vnni<2>(p, sc, r, out); break;
          case 3: row_dot_vnni<3>(p, sc, r, out); break;
          case 4: row_dot_vnni<4>(p, sc, r, out); break;
          case 5: row_dot_vnni<5>(p, sc, r, out); break;
          case 6: row_dot_vnni<6>(p, sc, r, out); break;
          case 7: row_dot_vnni<7>(p, sc, r, out); break;
          default: row_dot_vnni<8>(p, sc, r, out); break;
        }
      } else {
        switch (mr) {
          case 1: row_dot<1>(p, sc, r, out); break;
          case 2: row_dot<2>(p, sc, r, out); break;
          case 3: row_dot<3>(p, sc, r, out); break;
          default: row_dot<4>(p, sc, r, out); break;
        }
      }
      for (int i = 0; i < mr; ++i) Y[(m + i) * N + n] = out[i];
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

std::vector<torch::Tensor> int6_quantize(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu() && w.size(1) % kBlock == 0,
              "int6_quantize: w [N, K] on the CPU, K a multiple of 64");
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto packed = torch::empty({N, K / kBlock * kBlockBytes}, w.options().dtype(at::kByte));
  auto scales = torch::empty({N, K / kGroup}, w.options().dtype(at::kBFloat16));
  uint8_t* P = packed.data_ptr<uint8_t>();
  auto* S = scales.data_ptr<at::BFloat16>();
  gemv_rows::with_weight_dtype(
      wc, "int6_quantize", [&](const auto* W) { quantize_int6_impl(W, N, K, P, S); });
  return {packed, scales};
}

// int6_rows: rows `ids` of W [N, K] (an Int6Embedding's look-ups) -> [T, K] in `dtype`: q * scale in
// fp32 (exact: a 6-bit integer times a bf16), rounded once to dtype; formats.dequantize_int6's
// values
torch::Tensor int6_rows(const torch::Tensor& packed, const torch::Tensor& scales,
                        const torch::Tensor& ids, at::ScalarType dtype) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
                  packed.size(1) % kBlockBytes == 0,
              "int6_rows: packed [N, K / 64 * 48] uint8, contiguous");
  const int64_t N = packed.size(0), nb = packed.size(1) / kBlockBytes, K = nb * kBlock;
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() &&
                  scales.dim() == 2 && scales.size(0) == N && scales.size(1) == 2 * nb,
              "int6_rows: scales [N, K / 32] bf16, contiguous");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "int6_rows: ids [T] int64");
  const auto idc = ids.contiguous();
  const int64_t T = idc.size(0);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < N, "int6_rows: an id outside 0..", N - 1);
  auto out = torch::empty({T, K}, packed.options().dtype(at::kFloat));
  float* O = out.data_ptr<float>();
  const auto* P = packed.data_ptr<uint8_t>();
  const auto* S = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* p = P + id[t] * nb * kBlockBytes;
      const uint16_t* sc = S + id[t] * 2 * nb;
      float* o = O + t * K;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* q = p + b * kBlockBytes;
        for (int g = 0; g < 2; ++g) {
          const float s = gemv_rows::bf16_to_float(sc[2 * b + g]);
          for (int half = 0; half < 2; ++half)
            for (int r = 0; r < 16; ++r) {
              const int low = half ? q[g * 16 + r] >> 4 : q[g * 16 + r] & 15;
              const int top = (q[32 + r] >> (2 * (2 * half + g))) & 3;
              o[b * kBlock + g * kGroup + half * 16 + r] = static_cast<float>((low | top << 4) - 32) * s;
            }
        }
      }
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int6_rows", &int6_rows, QWEN35_NOGIL, "rows ids of W as [T, K] in dtype: quant/formats.py dequantize_int6's");
  m.def("int6_quantize", &int6_quantize, QWEN35_NOGIL,
        "w [N, K] -> (packed, scales): quant/formats.py quantize_int6_groups");
  m.def("linear_int6", &linear_int6, QWEN35_NOGIL,
        "x [M <= 16, K] @ W^T, W in 6-bit blocks of 64 (quant/formats.py quantize_int6_groups); "
        "avx2_only: the AVX2 path where AVX512-VNNI runs (the same bits)",
        py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("avx2_only") = false);
  m.def("int6_vnni_supported", &cpu_isa::avx512_vnni, QWEN35_NOGIL, "the AVX512-VNNI path runs here");
}
