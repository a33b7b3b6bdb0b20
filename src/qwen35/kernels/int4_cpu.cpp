// int4 weights in torch's packed CPU layout of its AVX512 code, read directly: decode GEMVs
// (linear_int4) and the unpack that feeds prefill's GEMM (int4_dequant). quant/matmul.py
// pack_int4 writes this layout on every CPU, so where torch runs its AVX512 code its
// `_weight_int4pack_mm_for_cpu` takes the same bytes (with AVX2 torch packs 32-row blocks, and
// quant/matmul.py then keeps to these kernels: torch_int4_layout).
//
// Layout: packed [N, K/2] uint8 = [N/64, K, 32]: per block of 64 output rows and input k, byte d
// holds row d in its low nibble and row d + 32 in its high one; scales_and_zeros [K/group, N, 2];
// W = (q - 8) * scale + zero with q in [0, 15].
//
// linear_int4, y [M, N] = x [M, K] @ W^T, the 64-row blocks (and chunks of 128 input rows) split
// over threads in contiguous ranges, each block streamed once per 4 input rows (linear_int4_many:
// several such products of one shape, all their blocks in one parallel_for; a MoE layer's picked
// experts). Decode's rows (up to 16) on every path; with x8 on CPUs without AVX512 also prefill's
// (quant/matmul.py int4_kernel_for: the panel path below, 1.6-2.2x the unpack + fp32 GEMM
// that longer inputs take elsewhere):
// - AVX512-VBMI + BF16 (Zen 4, Sapphire Rapids), bf16 x: one 64-byte load covers k and k + 1 of
//   all 64 rows; two byte permutes (vpermb) put row r's two bytes in the low bytes of one 32-bit
//   lane's two words, and a shift + a ternary-logic op turn each word into the bf16 1 + q/16
//   (0x3F80 | q << 3), low nibbles (rows 0..31) and high ones (rows 32..63), so vdpbf16ps
//   against the broadcast pair (x[k], x[k + 1]) sums x * (1 + q/16) into 4 accumulators (64
//   rows) per input row. At the end of a group, with sx = its sum of x:
//   sum x * (q - 8) = 16 * (acc - 1.5 * sx), and y += scale * that + zero * sx. (q in the top
//   mantissa bits keeps the offset small, 1 against up to 0.94: q + 128 would cost 7 bits.)
//   48 GB/s of int4 at 1 row on 2 Zen 4 cores, as fast as the bf16 GEMV streams: bench/gemv.py.
// - otherwise (AVX2, or fp32 x): x quantised to 16-bit integers per group (within amax / 65024
//   of x: finer than bf16), the sums in integers with vpmaddubsw (nibbles times x's high and
//   low bytes), exact; per group y += scale * xs * sum xq (q - 8) + zero * sum x. 1.1-1.6x the
//   earlier fp32-convert + FMA path (bench/gemv.py, AVX2 path on Zen 4; README "Decode GEMVs").
//   Used for fp32 rows (torch's fp32 int4 kernel is far slower); bf16 rows on CPUs without
//   VBMI + BF16 keep torch's kernel where it reads this layout (it beat the fp32 path on Zen 4),
//   else this path (quant/matmul.py). Its PyTorch twin: quant/formats.py
//   int4_linear_i16_reference.
// - x8 (Int4Linear.x8, the default): x rounded to 8 bits per 32 inputs, as llama.cpp's q8_0,
//   then integer dot products: vpdpbusd on AVX512-VNNI + VBMI CPUs (block_vnni), one vpmaddubsw
//   a nibble vector and row on AVX2 (block_i8); the two give the same bits. Its PyTorch twin:
//   int4_linear_i16_reference(x8=True).
// int4_dequant: W^T [K, N] (K-major, the order the bytes are in: each k's 64 rows of a block are
// 32 contiguous bytes in and 64 contiguous values out, so no transpose; mm(x, W^T) runs as fast
// as F.linear(x, W)); 13 G weights/s on 2 cores vs 0.9 for the scalar row-major [N, K] path
// kept beside it as the reference (bench/quant_linear.py).
// The PyTorch twins: quant/matmul.py unpack_int4 + quant/formats.py dequantize_int4_groups.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_ext.h"

#include "cpu_isa.h"
#include "gemv_rows.h"
#include "moe_block.h"
#include "vec_avx2.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#define TARGET_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")))

namespace {

using gemv_rows::kMR;
using gemv_rows::bf16_to_float;

bool cpu_vbmi_bf16() { return cpu_isa::avx512_bf16_vbmi(); }

inline float as_float(float v) { return v; }
inline float as_float(at::BFloat16 v) { return static_cast<float>(v); }

struct Block {  // one 64-row block and what its pass needs
  const uint8_t* p;  // the block's bytes [K, 32]
  int64_t K, group, ng, N, n0;  // n0: the block's first output row
};

// ---- AVX512-VBMI + BF16 --------------------------------------------------------------------

// inputs k, k + 1 of the block's 64 rows against MR input rows, into acc[MR][4]
template <int MR>
TARGET_VBMI inline void pair_vbmi(const Block& b, const uint16_t* X, int64_t k, __m512i idx0,
                                  __m512i idx1, __m512 (*acc)[4]) {
  const __m512i m78 = _mm512_set1_epi16(0x78), one = _mm512_set1_epi16(0x3F80);
  const __m512i raw = _mm512_loadu_si512(b.p + k * 32);
  // dword i of p_h: row 16h + i's bytes at k and k + 1 in its two words' low bytes
  const __m512i p0 = _mm512_permutexvar_epi8(idx0, raw), p1 = _mm512_permutexvar_epi8(idx1, raw);
  // each word -> 0x3F80 | q << 3 (the bf16 1 + q/16): low nibbles rows 0..31, high 32..63
  const __m512bh w[4] = {
      (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(p0, 3), m78, one, 0xEA),
      (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(p1, 3), m78, one, 0xEA),
      (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(p0, 1), m78, one, 0xEA),
      (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(p1, 1), m78, one, 0xEA)};
  for (int i = 0; i < MR; ++i) {
    int32_t xp;
    std::memcpy(&xp, X + i * b.K + k, 4);
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp);
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], w[j], xv);
  }
}

// X: MR rows of bf16 x (stride K); SX: their group sums [MR][ng]; SZ: bf16 scales_and_zeros;
// out [MR][64] fp32
template <int MR>
TARGET_VBMI void block_vbmi(const Block& b, const uint16_t* X, const float* SX, const uint16_t* SZ,
                            float* out) {
  alignas(64) uint8_t ib[2][64];
  for (int h = 0; h < 2; ++h)  // lane i: (row 16h + i at k, 0x3F, row 16h + i at k + 1, 0x3F)
    for (int i = 0; i < 16; ++i) {
      ib[h][4 * i] = static_cast<uint8_t>(16 * h + i);
      ib[h][4 * i + 2] = static_cast<uint8_t>(32 + 16 * h + i);
      ib[h][4 * i + 1] = ib[h][4 * i + 3] = 0;  // masked off
    }
  const __m512i idx0 = _mm512_load_si512(ib[0]), idx1 = _mm512_load_si512(ib[1]);
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 tot[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < b.ng; ++g) {
    const uint16_t* sz = SZ + (g * b.N + b.n0) * 2;  // 64 (scale, zero) pairs
    if (g + 1 < b.ng)
      for (int c = 0; c < 4; ++c) _mm_prefetch(reinterpret_cast<const char*>(sz + b.N * 2 + 32 * c),
                                               _MM_HINT_T0);
    // one k-pair in flight for every row count (a row's sum is then the same bits whichever
    // rows share its pass: batched == alone); measured against 2 pairs for 1-2 rows and 1 for
    // 3-4 (the earlier choice): 0.99x at one row, 1.06x at four (bench/gemv.py's shapes, int4)
    __m512 acc[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t k1 = (g + 1) * b.group;  // (groups are even: check_packed)
    for (int64_t k = g * b.group; k < k1; k += 2) pair_vbmi<MR>(b, X, k, idx0, idx1, acc);
    for (int j = 0; j < 4; ++j) {  // rows 16j..16j+15: scale * 16 (exact), zero
      const __m512i v = _mm512_loadu_si512(sz + 32 * j);
      const __m512 s = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                                     _mm512_set1_ps(16.f));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      for (int i = 0; i < MR; ++i) {
        const float sx = SX[i * b.ng + g];
        const __m512 t = _mm512_sub_ps(acc[i][j], _mm512_set1_ps(1.5f * sx));
        tot[i][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx), _mm512_fmadd_ps(s, t, tot[i][j]));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * 64 + 16 * j, tot[i][j]);
}

// ---- 8-bit activations: AVX512-VNNI (Zen 4, Sapphire Rapids) ------------------------------
// x8: each input row rounded per block of 32 inputs to 8-bit integers (xq = round(x / xs), xs =
// amax / 127, |x - xs xq| <= amax / 254), as llama.cpp's q8_0 rounds activations for its q4_0 /
// q8_0 dot products (blocks of 32 keep an outlier's coarse step to its own 32 inputs); the sums
// run in integers, exact, per block b: D_b = sum xq (q - 8); per weight group f = sum_b xs_b D_b
// (fp32, in block order) and y += scale * f + zero * sum_b xs_b sum xq (the rounded x's sum, so
// that y is x^ @ W, x^ = xs xq, as prefill's GEMM computes it with x8). Four k of the block (128 bytes) are one byte
// permute a 16 rows (vpermt2b: row r's bytes at k..k + 3 into one 32-bit lane; low nibbles rows
// r, high ones r + 32), an and / a shift + and a nibble, and one vpdpbusd (64 unsigned nibbles
// times the broadcast signed bytes x[k..k + 3], summed by 4 into 16 int32 lanes) per 16 rows and
// input row: 256 weights = 14 vector ops for one row, against 30 for the bf16 path above.
// (Per 32 inputs and 16 rows 3 more a row: D_b to fp32 times xs_b, added.)
// The PyTorch twin: quant/formats.py int4_linear_i16_reference(x8=True).

#define TARGET_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni")))

bool cpu_vnni_vbmi() {
  static const bool ok = cpu_isa::avx512_vnni() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

constexpr int64_t kX8Block = 32;  // x8: inputs that share one xs

// One input row quantised as the integer paths read it: 16-bit xq as (hi, lo) byte pairs split
// over two arrays (a k-pair's two bytes adjacent in each), xs and sum xq per weight group; or
// (x8) 8-bit xq in hi (lo: xq + 128 for the panel path), xs and sum xq per block of kX8Block
// inputs. sx: the exact sum
// of x per weight group.
struct RowI16 {
  const int8_t* hi;  // [K]
  const int8_t* lo;  // [K] (x8: the panel path's xq + 128, unsigned; else unused)
  const float* xs;   // [ng] (x8: [K / kX8Block])
  const int32_t* sq; // [ng] (x8: [K / kX8Block]) sum of xq
  const float* sx;   // [ng] exact sum of x
};

// 16 rows' (scale, zero) pairs -> scales, zeros
TARGET_VNNI inline void scales16(const uint16_t* p, __m512& s, __m512& z) {
  const __m512i v = _mm512_loadu_si512(p);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
TARGET_VNNI inline void scales16(const float* p, __m512& s, __m512& z) {
  const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
  const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  s = _mm512_permutex2var_ps(a, ev, b);
  z = _mm512_permutex2var_ps(a, _mm512_add_epi32(ev, _mm512_set1_epi32(1)), b);
}

// MR input rows against a 64-row block: out [MR][64] fp32
template <int MR, typename ST>
TARGET_VNNI void block_vnni(const Block& b, const RowI16* x, const ST* SZ, float* out) {
  alignas(64) uint8_t ib[2][64];
  for (int h = 0; h < 2; ++h)  // lane i: row 16h + i's bytes at k, k + 1, k + 2, k + 3
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 4; ++j) ib[h][4 * i + j] = static_cast<uint8_t>(32 * j + 16 * h + i);
  const __m512i idx0 = _mm512_load_si512(ib[0]), idx1 = _mm512_load_si512(ib[1]);
  const __m512i m15 = _mm512_set1_epi8(15);
  __m512 tot[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) tot[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < b.ng; ++g) {
    __m512 f[MR][4];  // sum over the group's x blocks of xs_b D_b
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 4; ++j) f[i][j] = _mm512_setzero_ps();
    for (int64_t k0 = g * b.group; k0 < (g + 1) * b.group; k0 += kX8Block) {
      __m512i acc[MR][4];  // [row][j]: rows 16j..16j+15 (j = 0, 1 low nibbles, 2, 3 high)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + kX8Block; k += 4) {
        const uint8_t* p = b.p + k * 32;
        const __m512i r0 = _mm512_loadu_si512(p), r1 = _mm512_loadu_si512(p + 64);
        const __m512i p0 = _mm512_permutex2var_epi8(r0, idx0, r1);
        const __m512i p1 = _mm512_permutex2var_epi8(r0, idx1, r1);
        const __m512i w[4] = {_mm512_and_si512(p0, m15), _mm512_and_si512(p1, m15),
                              _mm512_and_si512(_mm512_srli_epi16(p0, 4), m15),
                              _mm512_and_si512(_mm512_srli_epi16(p1, 4), m15)};
        for (int i = 0; i < MR; ++i) {
          int32_t xp;
          std::memcpy(&xp, x[i].hi + k, 4);
          const __m512i xv = _mm512_set1_epi32(xp);
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], xv);
        }
      }
      const int64_t xb = k0 / kX8Block;
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < 4; ++j) {
          const __m512i d = _mm512_sub_epi32(acc[i][j], _mm512_set1_epi32(8 * x[i].sq[xb]));
          f[i][j] = _mm512_add_ps(f[i][j], _mm512_mul_ps(_mm512_cvtepi32_ps(d),
                                                         _mm512_set1_ps(x[i].xs[xb])));
        }
    }
    const ST* sz = SZ + (g * b.N + b.n0) * 2;
    for (int j = 0; j < 4; ++j) {
      __m512 s, z;
      scales16(sz + 32 * j, s, z);
      for (int i = 0; i < MR; ++i)
        tot[i][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(x[i].sx[g]),
                                    _mm512_fmadd_ps(s, f[i][j], tot[i][j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + i * 64 + 16 * j, tot[i][j]);
}

// ---- AVX2, activations as 16-bit integers --------------------------------------------------
// The float path (nibble -> fp32 convert -> FMA, 64 weights = 28 vector ops) ran at 11 GB/s of
// int4 on Zen 3 where fp32 weights stream at 17.5: compute-bound. Here each input row is first
// quantised per group to 16-bit integers (xq = round(x / xs), xs = amax / 32512, so
// |x - xs xq| <= amax / 65024: finer than bf16's rounding of the group's largest value), split
// into a signed high byte and a low one (xq = 256 hi + lo, hi in [-127, 127], lo in [-128, 127]),
// and the sums run in integers: vpmaddubsw multiplies the unsigned nibbles q by the signed x
// bytes and adds the pair (k, k + 1) per row, exactly (the two k's bytes interleaved by an
// unpack). int16 sums widen to int32 every 8 k-pairs (8 x 2 x 15 x 128 < 2^15), so per group
// and row D = sum xq (q - 8) is exact and y += scale * xs * D + zero * sum x (the zero term
// with the exact fp32 sum of x). 128 weights = ~30 vector ops.
// One or two input rows a pass over the block (4 int16 accumulators a row and half-block loop
// fit the 16 ymm registers); more rows take more passes, the block then read from the cache.
// Integer sums make a row's result independent of the rows beside it (batched == alone).
// x non-finite in a group: that group's xs is NaN (the row's outputs NaN).

constexpr int kXqMax = 32512;  // |xq|: (xq + 128) >> 8 stays within a signed byte
constexpr int64_t kMaxGroupI16 = 2048;  // sum over a group of |xq (q - 8)| within int32
// software prefetch this many k (32 bytes each) ahead
constexpr int64_t PF = 128;

// x rows [M, K] fp32 -> per group: (hi, lo) bytes, xs, sum xq, exact sum x (the rounding itself:
// gemv_rows::quantize_group_i16, shared with the int8 GEMV)
void quantize_rows_i16(const float* X, int64_t M, int64_t K, int64_t group,
                       std::vector<int8_t>& hi, std::vector<int8_t>& lo, std::vector<float>& xs,
                       std::vector<int32_t>& sq, std::vector<float>& sx) {
  const int64_t ng = K / group, g8 = group / 8 * 8;
  hi.assign(M * K, 0);
  lo.assign(M * K, 0);
  xs.assign(M * ng, 0.f);
  sq.assign(M * ng, 0);
  sx.assign(M * ng, 0.f);
  std::vector<int16_t> q(group);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t k0 = m * K + g * group;
      const float* x = X + k0;
      __m256 vsum = _mm256_setzero_ps();
      for (int64_t k = 0; k < g8; k += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(x + k));
      float s = gemv_rows::hsum8(vsum);
      for (int64_t k = g8; k < group; ++k) s += x[k];
      sx[m * ng + g] = s;
      xs[m * ng + g] = gemv_rows::quantize_group_i16(x, group, kXqMax, q.data());
      // hi = (q + 128) >> 8 (floor), lo = q - 256 hi; 16 at a time (q + 128 fits int16)
      __m256i vtot = _mm256_setzero_si256();
      int64_t k = 0;
      for (; k + 16 <= group; k += 16) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.data() + k));
        const __m256i h = _mm256_srai_epi16(_mm256_add_epi16(v, _mm256_set1_epi16(128)), 8);
        const __m256i l = _mm256_sub_epi16(v, _mm256_slli_epi16(h, 8));
        // in-lane pack (h 0-7, l 0-7 | h 8-15, l 8-15) -> (h 0-15 | l 0-15)
        const __m256i hl = _mm256_permute4x64_epi64(_mm256_packs_epi16(h, l), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi.data() + k0 + k), _mm256_castsi256_si128(hl));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo.data() + k0 + k),
                         _mm256_extracti128_si256(hl, 1));
        vtot = _mm256_add_epi32(vtot, _mm256_madd_epi16(v, _mm256_set1_epi16(1)));
      }
      alignas(32) int32_t t8[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t8), vtot);
      int32_t total = 0;
      for (int i = 0; i < 8; ++i) total += t8[i];
      for (; k < group; ++k) {
        const int32_t h = (q[k] + 128) >> 8;  // arithmetic shift: floor
        hi[k0 + k] = static_cast<int8_t>(h);
        lo[k0 + k] = static_cast<int8_t>(q[k] - 256 * h);
        total += q[k];
      }
      sq[m * ng + g] = total;
    }
}

// One block of 32 inputs (fp32 or bf16, read as they are: no widened copy of the rows) rounded
// for x8: xq into i[4] (8 int32 lanes each, in input order), returns xs = amax / 127. The same
// rounding as gemv_rows::quantize_group_i16(x, 32, 127) (the PyTorch twin's quantize_rows_i16),
// specialised to one block of four vectors: the generic group rounding after a widening of the
// rows was most of an x8 call's time. A block with a NaN or an inf: NaN, an all-zero or tiny one
// (127 / amax overflows): 0, both with i all zeros.
template <typename T>
inline float round_block_x8(const T* x, __m256i* i) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 v[4], vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = vec8::load8(x + 8 * j);
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[j], abs_mask));
    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
  }
  const float amax = gemv_rows::hmax8(vmax), inv = 127.f / amax;
  const bool bad = _mm256_movemask_ps(vbad) != 0 || !std::isfinite(amax);
  if (bad || amax == 0.f || !std::isfinite(inv)) {
    for (int j = 0; j < 4; ++j) i[j] = _mm256_setzero_si256();
    return bad ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
  for (int j = 0; j < 4; ++j) {  // round to nearest even, as nearbyint / torch.round
    const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vinv));
    i[j] = _mm256_max_epi32(lo, _mm256_min_epi32(hi, r));
  }
  return amax / 127.f;
}

// x rows [M, K] (fp32 or bf16) -> x8: per block of 32 inputs 8-bit xq (|xq| <= 127), xs and sum
// xq, per group the sum of the rounded x (sum over its blocks of xs sum xq, fp32 in block order:
// the zero term then multiplies what the GEMM of longer inputs multiplies, x^ = xs xq, so a row's
// result does not depend on its call's row count). biased: also xq + 128 as unsigned bytes (the
// panel path's operand), or nullptr.
template <typename T>
void quantize_rows_x8(const T* X, int64_t M, int64_t K, int64_t group, std::vector<int8_t>& q8,
                      std::vector<float>& xs, std::vector<int32_t>& sq, std::vector<float>& sx,
                      std::vector<int8_t>* biased) {
  static_assert(kX8Block == 32, "four 8-lane vectors a block");
  const int64_t ng = K / group, nb = K / kX8Block;
  q8.resize(M * K);
  if (biased) biased->resize(M * K);
  xs.resize(M * nb);
  sq.resize(M * nb);
  sx.resize(M * ng);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // rows apart over threads (prefill's; a decode call's few rows stay on the calling thread)
  at::parallel_for(0, M, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        float gsum = 0.f;
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += kX8Block) {
          const int64_t b = m * nb + k0 / kX8Block;
          __m256i i[4];
          xs[b] = round_block_x8(X + m * K + k0, i);
          const __m256i tot = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
          // packs interleave 128-bit lanes: dwords (a0-3 b0-3 c0-3 d0-3 | a4-7 ..) -> in order
          const __m256i p =
              _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
          const __m256i q = _mm256_permutevar8x32_epi32(p, order);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q8.data() + m * K + k0), q);
          if (biased)  // xq + 128 = xq ^ 0x80 as a byte
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(biased->data() + m * K + k0),
                                _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80))));
          alignas(32) int32_t t8[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(t8), tot);
          sq[b] = t8[0] + t8[1] + t8[2] + t8[3] + t8[4] + t8[5] + t8[6] + t8[7];
          gsum += xs[b] * static_cast<float>(sq[b]);  // (NaN for a bad block)
        }
        sx[m * ng + g] = gsum;
      }
  });
}

// 8 rows' (scale, zero) pairs -> scales, zeros (other dtypes: refused by check_packed)
template <typename T>
inline void scales8(const T* p, __m256& s, __m256& z) {
  alignas(32) float a[8], b[8];
  for (int i = 0; i < 8; ++i) a[i] = as_float(p[2 * i]), b[i] = as_float(p[2 * i + 1]);
  s = _mm256_load_ps(a);
  z = _mm256_load_ps(b);
}
inline void scales8(const at::BFloat16* p, __m256& s, __m256& z) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void scales8(const float* p, __m256& s, __m256& z) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);  // s0 z0 .. s3 z3, s4 ..
  // in-lane shuffles give rows (0 1 4 5 | 2 3 6 7): the 64-bit permute puts them in order
  s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

// first output row of int32 accumulator (j, h): the unpacks' row order (see block_i16)
constexpr int kRow0[8] = {0, 16, 8, 24, 32, 48, 40, 56};

// NR (1 or 2) input rows against a 64-row block: out [NR][64] fp32. The weight bytes are
// unpacked once for the NR rows; integer sums are exact, so a row's result is the same bits
// whichever rows share its pass (batched == alone).
template <int NR, typename ST>
void block_i16(const Block& b, const RowI16* x, const ST* SZ, float* out) {
  const __m256i m15 = _mm256_set1_epi8(15);
  alignas(32) float tot[NR][64] = {};
  for (int64_t g = 0; g < b.ng; ++g) {
    const ST* sz = SZ + (g * b.N + b.n0) * 2;
    // int32 sums: [row][i] rows kRow0[i] .. + 7, sum over k of xq q
    __m256i a32[NR][8];
    for (int m = 0; m < NR; ++m)
      for (int i = 0; i < 8; ++i) a32[m][i] = _mm256_setzero_si256();
    const int64_t kg0 = g * b.group, kg1 = kg0 + b.group;
    for (int64_t kc = kg0; kc < kg1; kc += 16) {  // 8 k-pairs: int16 sums stay exact
      __m256i hi16[NR][4], lo16[NR][4];  // [row][u + 2 * nibble]
      const int64_t kend = std::min(kc + 16, kg1);
      // rows of the low unpack (u = 0), then of the high one over the same 512 bytes (from L1):
      // 4 accumulators a row and loop fit the registers (8 in one loop spilled: 0.8x)
      for (int u = 0; u < 2; ++u) {
        __m256i h0[NR], l0[NR], h1[NR], l1[NR];
        for (int m = 0; m < NR; ++m) h0[m] = l0[m] = h1[m] = l1[m] = _mm256_setzero_si256();
        for (int64_t k = kc; k < kend; k += 2) {
          const uint8_t* p = b.p + k * 32;
          if (u == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(p + PF * 32), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(p + PF * 32 + 32), _MM_HINT_T0);
          }
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
          // per 128-bit lane, byte pairs (k, k + 1) of rows {0..7, 16..23} (u = 0) or
          // {8..15, 24..31} (u = 1) in their low nibbles, the same + 32 in the high ones
          const __m256i v = u == 0 ? _mm256_unpacklo_epi8(b0, b1) : _mm256_unpackhi_epi8(b0, b1);
          const __m256i wl = _mm256_and_si256(v, m15);
          const __m256i wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
          for (int m = 0; m < NR; ++m) {
            int16_t ph, pl;
            std::memcpy(&ph, x[m].hi + k, 2);
            std::memcpy(&pl, x[m].lo + k, 2);
            const __m256i xh = _mm256_set1_epi16(ph), xl = _mm256_set1_epi16(pl);
            h0[m] = _mm256_add_epi16(h0[m], _mm256_maddubs_epi16(wl, xh));
            l0[m] = _mm256_add_epi16(l0[m], _mm256_maddubs_epi16(wl, xl));
            h1[m] = _mm256_add_epi16(h1[m], _mm256_maddubs_epi16(wh, xh));
            l1[m] = _mm256_add_epi16(l1[m], _mm256_maddubs_epi16(wh, xl));
          }
        }
        for (int m = 0; m < NR; ++m)
          hi16[m][u] = h0[m], lo16[m][u] = l0[m], hi16[m][2 + u] = h1[m], lo16[m][2 + u] = l1[m];
      }
      for (int m = 0; m < NR; ++m)
        for (int j = 0; j < 4; ++j) {  // widen: 256 hi + lo, rows of each 128-bit half apart
          const __m256i h0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi16[m][j]));
          const __m256i h1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi16[m][j], 1));
          const __m256i l0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo16[m][j]));
          const __m256i l1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo16[m][j], 1));
          a32[m][2 * j] =
              _mm256_add_epi32(a32[m][2 * j], _mm256_add_epi32(_mm256_slli_epi32(h0, 8), l0));
          a32[m][2 * j + 1] =
              _mm256_add_epi32(a32[m][2 * j + 1], _mm256_add_epi32(_mm256_slli_epi32(h1, 8), l1));
        }
    }
    // y += scale * xs * (sum xq q - 8 sum xq) + zero * sum x
    for (int i = 0; i < 8; ++i) {
      const int r = kRow0[i];
      __m256 sv, zv;
      scales8(sz + 2 * r, sv, zv);
      for (int m = 0; m < NR; ++m) {
        const __m256i sq8 = _mm256_set1_epi32(8 * x[m].sq[g]);
        const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a32[m][i], sq8)),
                                       _mm256_set1_ps(x[m].xs[g]));
        const __m256 t = _mm256_fmadd_ps(sv, d, _mm256_load_ps(tot[m] + r));
        _mm256_store_ps(tot[m] + r, _mm256_fmadd_ps(zv, _mm256_set1_ps(x[m].sx[g]), t));
      }
    }
  }
  std::memcpy(out, tot, sizeof(tot));
}

// x8 on AVX2: 8-bit xq (RowI16::hi), one vpmaddubsw a nibble vector and input row (the int16
// pair sums are xq q themselves, no 256 hi + lo), both unpacks of a k-pair's 64 bytes in one loop
// (8 int16 accumulators a row: NR 1 or 2 fit the 16 ymm registers). Sums exact, as block_i16's;
// the same fp32 steps per x block and group as block_vnni, so the same bits.
template <int NR, typename ST>
void block_i8(const Block& b, const RowI16* x, const ST* SZ, float* out) {
  static_assert(kX8Block % 16 == 0, "x blocks of whole 16-k chunks");
  const __m256i m15 = _mm256_set1_epi8(15);
  alignas(32) float tot[NR][64] = {};
  for (int64_t g = 0; g < b.ng; ++g) {
    const ST* sz = SZ + (g * b.N + b.n0) * 2;
    alignas(32) float f[NR][64] = {};  // sum over the group's x blocks of xs_b D_b
    for (int64_t k0 = g * b.group; k0 < (g + 1) * b.group; k0 += kX8Block) {
      __m256i a32[NR][8];  // [row][i]: rows kRow0[i] .. + 7, as block_i16's
      for (int m = 0; m < NR; ++m)
        for (int i = 0; i < 8; ++i) a32[m][i] = _mm256_setzero_si256();
      for (int64_t kc = k0; kc < k0 + kX8Block; kc += 16) {  // 8 k-pairs: int16 sums stay exact
        __m256i s16[NR][4];  // [row][u + 2 * nibble]
        for (int m = 0; m < NR; ++m)
          for (int j = 0; j < 4; ++j) s16[m][j] = _mm256_setzero_si256();
        for (int64_t k = kc; k < kc + 16; k += 2) {
          const uint8_t* p = b.p + k * 32;
          _mm_prefetch(reinterpret_cast<const char*>(p + PF * 32), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p + PF * 32 + 32), _MM_HINT_T0);
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
          const __m256i v[2] = {_mm256_unpacklo_epi8(b0, b1), _mm256_unpackhi_epi8(b0, b1)};
          __m256i w[4];
          for (int u = 0; u < 2; ++u) {
            w[u] = _mm256_and_si256(v[u], m15);
            w[2 + u] = _mm256_and_si256(_mm256_srli_epi16(v[u], 4), m15);
          }
          for (int m = 0; m < NR; ++m) {
            int16_t px;
            std::memcpy(&px, x[m].hi + k, 2);
            const __m256i xv = _mm256_set1_epi16(px);
            for (int j = 0; j < 4; ++j)
              s16[m][j] = _mm256_add_epi16(s16[m][j], _mm256_maddubs_epi16(w[j], xv));
          }
        }
        for (int m = 0; m < NR; ++m)
          for (int j = 0; j < 4; ++j) {  // widen (a 128-bit half's rows apart)
            a32[m][2 * j] = _mm256_add_epi32(
                a32[m][2 * j], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[m][j])));
            a32[m][2 * j + 1] = _mm256_add_epi32(
                a32[m][2 * j + 1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[m][j], 1)));
          }
      }
      const int64_t xb = k0 / kX8Block;
      for (int m = 0; m < NR; ++m)
        for (int i = 0; i < 8; ++i) {
          const __m256i sq8 = _mm256_set1_epi32(8 * x[m].sq[xb]);
          const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(a32[m][i], sq8)),
                                         _mm256_set1_ps(x[m].xs[xb]));
          float* fr = f[m] + kRow0[i];
          _mm256_store_ps(fr, _mm256_add_ps(_mm256_load_ps(fr), d));
        }
    }
    for (int i = 0; i < 8; ++i) {
      const int r = kRow0[i];
      __m256 sv, zv;
      scales8(sz + 2 * r, sv, zv);
      for (int m = 0; m < NR; ++m) {
        const __m256 t = _mm256_fmadd_ps(sv, _mm256_load_ps(f[m] + r), _mm256_load_ps(tot[m] + r));
        _mm256_store_ps(tot[m] + r, _mm256_fmadd_ps(zv, _mm256_set1_ps(x[m].sx[g]), t));
      }
    }
  }
  std::memcpy(out, tot, sizeof(tot));
}

// ---- x8 on AVX2, many input rows (prefill) ------------------------------------------------
// block_i8 unpacks the nibbles for every pair of input rows: 26 vector ops a k-pair for 8
// vpmaddubsw. With more rows (an item of run_calls: up to kRowChunk of them against one 64-row
// block) the block is unpacked once into a panel in the order vpmaddubsw wants: per 16 output
// rows (a slice) and 4 k, two vectors of 8 rows x (q - 8) at k..k+3, signed bytes. One
// vpmaddubsw then multiplies the broadcast bytes xq + 128 at k..k+3 (unsigned: RowI16::lo here)
// by 8 rows' 4 (q - 8), the weights its memory operand (pair sums in two int16 lanes a row; the
// weights in registers, xq signed, ran 0.85-0.95x as fast: GCC spilled), an x block's 8 of them
// add in int16 (8 x 2 x 255 x 8 < 2^15) and one vpmaddwd against ones widens them into the rows'
// int32 sums, sum (xq + 128)(q - 8) = D + 128 sum (q - 8): the panel keeps 128 sum (q - 8) per
// x block and row (wsum) to take off. Tile: 4 input rows x 16 output rows, 8 int16
// accumulators; per 4 k four broadcasts, 8 vpmaddubsw + 8 adds. The integer sums are exact and
// the fp32 steps per x block and group are block_i8's, in its order: the same bits (a row's
// result does not depend on how many rows its call had).
constexpr int64_t kPanelSlice = 16;  // output rows of a slice (two vectors of 8)

// the 64-row block at p ([K, 32] bytes) -> panel [4 slices][K / 4][2][32] of q - 8 and wsum
// [4 slices][K / 32][2][8]: 128 x the sum of q - 8 over each x block, per output row
void unpack_panel(const uint8_t* p, int64_t K, uint8_t* panel, int32_t* wsum) {
  const __m256i m15 = _mm256_set1_epi8(15), m8 = _mm256_set1_epi8(8);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  constexpr int64_t kQuads = kX8Block / 4;  // 4-k steps an x block
  __m256i ws[8];  // [4 nib + v]: an x block's sums of q - 8, rows of rows8[v] below
  for (int64_t kq = 0; kq < K / 4; ++kq) {
    if (kq % kQuads == 0)
      for (int v = 0; v < 8; ++v) ws[v] = _mm256_setzero_si256();
    const auto* s = reinterpret_cast<const __m256i*>(p + kq * 128);
    const __m256i a0 = _mm256_loadu_si256(s), a1 = _mm256_loadu_si256(s + 1);
    const __m256i a2 = _mm256_loadu_si256(s + 2), a3 = _mm256_loadu_si256(s + 3);
    // words of rows (0-7 | 16-23) and (8-15 | 24-31): (k, k + 1), (k + 2, k + 3)
    const __m256i t0 = _mm256_unpacklo_epi8(a0, a1), t1 = _mm256_unpackhi_epi8(a0, a1);
    const __m256i t2 = _mm256_unpacklo_epi8(a2, a3), t3 = _mm256_unpackhi_epi8(a2, a3);
    // dwords (k .. k + 3) of rows (0-3 | 16-19), (4-7 | 20-23), (8-11 | 24-27), (12-15 | 28-31)
    const __m256i u[4] = {_mm256_unpacklo_epi16(t0, t2), _mm256_unpackhi_epi16(t0, t2),
                          _mm256_unpacklo_epi16(t1, t3), _mm256_unpackhi_epi16(t1, t3)};
    for (int nib = 0; nib < 2; ++nib) {  // low nibbles: rows 0-31, high: 32-63
      __m256i l[4];
      for (int i = 0; i < 4; ++i)
        l[i] = _mm256_sub_epi8(_mm256_and_si256(nib ? _mm256_srli_epi16(u[i], 4) : u[i], m15), m8);
      const __m256i rows8[4] = {_mm256_permute2x128_si256(l[0], l[1], 0x20),   // +0..7
                                _mm256_permute2x128_si256(l[2], l[3], 0x20),   // +8..15
                                _mm256_permute2x128_si256(l[0], l[1], 0x31),   // +16..23
                                _mm256_permute2x128_si256(l[2], l[3], 0x31)};  // +24..31
      for (int v = 0; v < 4; ++v) {
        const int64_t slice = 2 * nib + v / 2;
        auto* o = panel + (slice * (K / 4) + kq) * 64 + (v % 2) * 32;
        _mm256_store_si256(reinterpret_cast<__m256i*>(o), rows8[v]);
        ws[4 * nib + v] = _mm256_add_epi32(
            ws[4 * nib + v], _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, rows8[v]), ones16));
      }
    }
    if (kq % kQuads == kQuads - 1)
      for (int i = 0; i < 8; ++i) {  // i = 4 nib + v: slice 2 nib + v / 2, its vector v % 2
        const int64_t slice = 2 * (i / 4) + (i % 4) / 2;
        auto* o = wsum + ((slice * (K / kX8Block) + kq / kQuads) * 2 + i % 2) * 8;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_slli_epi32(ws[i], 7));
      }
  }
}

// NR (1..4) input rows against one slice (panel: [K / 4][2][32], wsum [K / 32][2][8]; its
// first output row in the block: r0): out [NR][16] fp32
template <int NR, typename ST>
void tile_x8(const uint8_t* panel, const int32_t* wsum, const Block& b, int r0, const RowI16* x,
             const ST* SZ, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float tot[NR][16] = {};
  for (int64_t g = 0; g < b.ng; ++g) {
    alignas(32) float f[NR][16] = {};  // sum over the group's x blocks of xs_b D_b
    for (int64_t k0 = g * b.group; k0 < (g + 1) * b.group; k0 += kX8Block) {
      __m256i acc[NR][2];
      for (int m = 0; m < NR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int64_t k = k0; k < k0 + kX8Block; k += 4) {
        const auto* w = reinterpret_cast<const __m256i*>(panel + k * 16);
        for (int m = 0; m < NR; ++m) {
          int32_t xp;
          std::memcpy(&xp, x[m].lo + k, 4);
          const __m256i xv = _mm256_set1_epi32(xp);
          acc[m][0] = _mm256_add_epi16(acc[m][0], _mm256_maddubs_epi16(xv, _mm256_load_si256(w)));
          acc[m][1] =
              _mm256_add_epi16(acc[m][1], _mm256_maddubs_epi16(xv, _mm256_load_si256(w + 1)));
        }
      }
      const int64_t xb = k0 / kX8Block;
      const auto* wb = reinterpret_cast<const __m256i*>(wsum + xb * 16);
      for (int m = 0; m < NR; ++m) {
        const __m256 xs = _mm256_set1_ps(x[m].xs[xb]);
        for (int v = 0; v < 2; ++v) {  // D = a32 - 128 sum (q - 8), exact
          const __m256i a32 = _mm256_madd_epi16(acc[m][v], ones);
          const __m256i d32 = _mm256_sub_epi32(a32, _mm256_loadu_si256(wb + v));
          const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(d32), xs);
          float* fr = f[m] + 8 * v;
          _mm256_store_ps(fr, _mm256_add_ps(_mm256_load_ps(fr), d));
        }
      }
    }
    const ST* sz = SZ + (g * b.N + b.n0 + r0) * 2;
    for (int v = 0; v < 2; ++v) {
      __m256 sv, zv;
      scales8(sz + 16 * v, sv, zv);
      for (int m = 0; m < NR; ++m) {
        const __m256 t = _mm256_fmadd_ps(sv, _mm256_load_ps(f[m] + 8 * v),
                                         _mm256_load_ps(tot[m] + 8 * v));
        _mm256_store_ps(tot[m] + 8 * v, _mm256_fmadd_ps(zv, _mm256_set1_ps(x[m].sx[g]), t));
      }
    }
  }
  std::memcpy(out, tot, sizeof(tot));
}

void check_packed(const torch::Tensor& packed, const torch::Tensor& sz, int64_t group, int64_t N,
                  int64_t K) {
  TORCH_CHECK(packed.device().is_cpu() && sz.device().is_cpu(), "int4: CPU tensors only");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  N % 64 == 0 && packed.size(0) == N && packed.size(1) * 2 == K,
              "int4: packed [N % 64 == 0, K/2] uint8 contiguous (torch's CPU int4 layout)");
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "int4: K a multiple of an even group");
  TORCH_CHECK(sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == K / group && sz.size(1) == N &&
                  sz.size(2) == 2,
              "int4: scales_and_zeros [K/group, N, 2] contiguous");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 || sz.scalar_type() == at::kFloat,
              "int4: bf16 or fp32 scales_and_zeros");
}

// per input row and group: the sum of x (as the kernels see it: bf16 values in fp32)
template <typename T>
std::vector<float> group_sums(const T* X, int64_t M, int64_t K, int64_t group) {
  const int64_t ng = K / group;
  std::vector<float> sx(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += as_float(X[m * K + k]);
      sx[m * ng + g] = s;
    }
  return sx;
}

// ---- dequant to W^T [K, N], K-major ----------------------------------------------------------

// fp32 -> bf16 bits, round to nearest even (as torch's .to(bfloat16); no NaNs here)
inline __m256i bf16_rne_avx2(__m256 f) {
  const __m256i b = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                           16);
}

// one k of a block: 32 bytes -> 64 values at o (rows n0..n0+63 of W^T's row k); s, z: the
// block's scales and zeros in this group [64] fp32. (q - 8) * s is exact for bf16 scales, so the
// FMA rounds once, like PyTorch's (q - 8) * s + z.
template <typename OT>
inline void dequant_k_avx2(const uint8_t* p, const float* s, const float* z, OT* o) {
  const __m128i m15 = _mm_set1_epi8(15), m8 = _mm_set1_epi8(8);
  for (int half = 0; half < 2; ++half) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half));
    const __m128i q[2] = {_mm_sub_epi8(_mm_and_si128(raw, m15), m8),  // rows 16h..16h+15
                          _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m15), m8)};  // +32
    for (int nib = 0; nib < 2; ++nib) {
      const int r = 32 * nib + 16 * half;
      const __m256 v0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q[nib])),
                                        _mm256_loadu_ps(s + r), _mm256_loadu_ps(z + r));
      const __m256 v1 = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q[nib], 8))),
          _mm256_loadu_ps(s + r + 8), _mm256_loadu_ps(z + r + 8));
      if constexpr (std::is_same_v<OT, float>) {
        _mm256_storeu_ps(o + r, v0);
        _mm256_storeu_ps(o + r + 8, v1);
      } else {  // 16 bf16: pack the two halves' words, undo the in-lane interleave
        const __m256i w = _mm256_permute4x64_epi64(
            _mm256_packus_epi32(bf16_rne_avx2(v0), bf16_rne_avx2(v1)), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + r), w);
      }
    }
  }
}

template <typename ST>
void dequant_t(const uint8_t* P, const ST* SZ, int64_t group, int64_t N, int64_t K, ST* O) {
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    alignas(32) float s[64], z[64];
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t g = 0; g < K / group; ++g) {
        const ST* sz = SZ + (g * N + blk * 64) * 2;
        for (int r = 0; r < 64; ++r) {
          s[r] = as_float(sz[2 * r]);
          z[r] = as_float(sz[2 * r + 1]);
        }
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          dequant_k_avx2(P + (blk * K + k) * 32, s, z, O + k * N + blk * 64);
      }
  });
}

// the scalar reference: row-major W [N, K]
template <typename ST>
void dequant_rows(const uint8_t* P, const ST* SZ, int64_t group, int64_t N, int64_t K, ST* O) {
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int d = 0; d < 64; ++d) {
        const int64_t row = b * 64 + d;
        const int shift = d < 32 ? 0 : 4;
        const uint8_t* p = P + b * K * 32 + (d & 31);
        for (int64_t k = 0; k < K; ++k) {
          const ST* sz = SZ + ((k / group) * N + row) * 2;
          const float q = static_cast<float>(((p[k * 32] >> shift) & 15) - 8);
          O[row * K + k] = static_cast<ST>(q * as_float(sz[0]) + as_float(sz[1]));
        }
      }
  });
}

// How a call's blocks compute: bf16 x against bf16 1 + q/16 (AVX512-VBMI + BF16), 8-bit x with
// vpdpbusd (AVX512-VNNI + VBMI), or on AVX2 16-bit / 8-bit x with vpmaddubsw.
enum class Path { vbmi, vnni8, i16, i8 };

// x8: activations rounded to 8 bits per 32 inputs (faster, llama.cpp's precision) rather than
// kept at bf16 / rounded to 16 bits, where the groups are whole x blocks (else not: make_call
// refuses); avx2_only: the paths of CPUs without AVX512 (tests and benchmarks run every path on
// one machine).
Path pick_path(at::ScalarType dt, int64_t group, bool avx2_only, bool x8) {
  if (x8) {
    TORCH_CHECK(group % kX8Block == 0, "linear_int4: x8 needs groups of a multiple of 32 inputs");
    return !avx2_only && cpu_vnni_vbmi() ? Path::vnni8 : Path::i8;
  }
  return !avx2_only && dt == at::kBFloat16 && cpu_vbmi_bf16() ? Path::vbmi : Path::i16;
}

// input rows a work item of run_calls takes against one 64-row block: more (prefill's) rows are
// split into chunks of these, so that a long input's blocks x chunks keep every thread busy
// (the 0.8B's down projection has 16 blocks); a block (16-112 KB) stays in L2 over a chunk
constexpr int64_t kRowChunk = 128;
// rows from which an item takes the panel (below: block_i8, which unpacks as it goes)
constexpr int64_t kPanelMinRows = 4;

// One (x, W) product of linear_int4 / linear_int4_many: its inputs as the blocks read them.
struct Call {
  const uint8_t* P;     // packed W
  const void* SZ;       // scales_and_zeros (x's dtype)
  const void* X;        // x rows (bf16: the VBMI path)
  std::vector<float> sx;  // per row and group: the sum of x
  std::vector<int8_t> hi, lo;  // the integer paths: x quantised (quantize_rows_i16)
  std::vector<float> xs;
  std::vector<int32_t> sq;
  void* Y;              // y [M, n]
  int64_t M;

  RowI16 row(int64_t m, int64_t K, int64_t ng) const {
    const int64_t nq = static_cast<int64_t>(xs.size()) / M;  // ng, or x8's x blocks
    return RowI16{hi.data() + m * K, lo.data() + m * K, xs.data() + m * nq, sq.data() + m * nq,
                  sx.data() + m * ng};
  }
};

// y: where its [M, n] result goes (rows of the caller's output)
Call make_call(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& sz,
               int64_t group, int64_t n, Path path, void* y) {
  const int64_t M = x.size(0), K = x.size(1);
  check_packed(packed, sz, group, n, K);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "linear_int4: x [M, K] contiguous on the CPU");
  TORCH_CHECK(x.scalar_type() == sz.scalar_type(), "linear_int4: x and scales_and_zeros share a dtype");
  Call c{packed.data_ptr<uint8_t>(), sz.data_ptr(), x.data_ptr(), {}, {}, {}, {}, {}, y, M};
  if (path == Path::vbmi) {
    c.sx = group_sums(x.data_ptr<at::BFloat16>(), M, K, group);
  } else if (path == Path::vnni8 || path == Path::i8) {
    // the panel path's unsigned xq + 128 in lo
    std::vector<int8_t>* biased = path == Path::i8 && M >= kPanelMinRows ? &c.lo : nullptr;
    if (x.scalar_type() == at::kBFloat16)
      quantize_rows_x8(x.data_ptr<at::BFloat16>(), M, K, group, c.hi, c.xs, c.sq, c.sx, biased);
    else
      quantize_rows_x8(x.data_ptr<float>(), M, K, group, c.hi, c.xs, c.sq, c.sx, biased);
  } else {
    TORCH_CHECK(group <= kMaxGroupI16, "linear_int4: groups of at most 2048 inputs");
    std::vector<float> xf;  // bf16 rows widened (exact) without a torch op's overhead
    if (x.scalar_type() == at::kBFloat16) {
      const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr());
      xf.resize(M * K);
      for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(xb[i]);
    }
    const float* X = xf.empty() ? x.data_ptr<float>() : xf.data();  // (else fp32: check_packed)
    quantize_rows_i16(X, M, K, group, c.hi, c.lo, c.xs, c.sq, c.sx);
  }
  return c;
}


// the x8 AVX2 path's rows [m0, m1) of call c against block b through the panel (unpacked here
// into panel: [4 slices][K / 4][2][32] bytes, then wsum [4][K / 32][2][8] int32: 72 K bytes)
template <typename scalar_t>
void panel_rows(const Call& c, const Block& b, int64_t m0, int64_t m1, uint8_t* panel) {
  auto* wsum = reinterpret_cast<int32_t*>(panel + b.K * 64);
  unpack_panel(b.p, b.K, panel, wsum);
  const auto* SZ = static_cast<const scalar_t*>(c.SZ);
  auto* Y = static_cast<scalar_t*>(c.Y);
  alignas(64) float out[4 * kPanelSlice];
  for (int64_t j = 0; j < 64 / kPanelSlice; ++j) {
    const uint8_t* slice = panel + j * (b.K / 4) * 64;
    const int32_t* ws = wsum + j * (b.K / kX8Block) * 16;
    const int r0 = static_cast<int>(j * kPanelSlice);
    for (int64_t m = m0; m < m1; m += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, m1 - m));
      RowI16 rows[4];
      for (int r = 0; r < mr; ++r) rows[r] = c.row(m + r, b.K, b.ng);
      switch (mr) {
        case 4: tile_x8<4>(slice, ws, b, r0, rows, SZ, out); break;
        case 3: tile_x8<3>(slice, ws, b, r0, rows, SZ, out); break;
        case 2: tile_x8<2>(slice, ws, b, r0, rows, SZ, out); break;
        default: tile_x8<1>(slice, ws, b, r0, rows, SZ, out);
      }
      for (int r = 0; r < mr; ++r)
        for (int d = 0; d < kPanelSlice; ++d)
          Y[(m + r) * b.N + b.n0 + r0 + d] = out[r * kPanelSlice + d];
    }
  }
}

// every 64-row block of every call (and, past kRowChunk rows, every chunk of its rows), one
// parallel_for over all of them
template <typename scalar_t>
void run_calls(const std::vector<Call>& calls, int64_t K, int64_t group, int64_t n, Path path) {
  const int64_t ng = K / group, nb = n / 64;
  int64_t chunks = 1;
  for (const Call& c : calls) chunks = std::max(chunks, (c.M + kRowChunk - 1) / kRowChunk);
  const int64_t items = static_cast<int64_t>(calls.size()) * nb * chunks;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float out[kMR * 64];
    std::vector<__m256i> panel;  // the x8 AVX2 path from kPanelMinRows rows: 72 K bytes
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t blk = (i / chunks) % nb, chunk = i % chunks;
      const Call& c = calls[i / chunks / nb];
      const Block b{c.P + blk * K * 32, K, group, ng, n, blk * 64};
      const auto* SZ = static_cast<const scalar_t*>(c.SZ);
      auto* Y = static_cast<scalar_t*>(c.Y);
      const int64_t m1 = std::min(c.M, (chunk + 1) * kRowChunk);
      if (path == Path::i8 && m1 - chunk * kRowChunk >= kPanelMinRows) {
        panel.resize(K * 2 + K / 4);
        panel_rows<scalar_t>(c, b, chunk * kRowChunk, m1, reinterpret_cast<uint8_t*>(panel.data()));
        continue;
      }
      for (int64_t m = chunk * kRowChunk; m < m1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
        if (path == Path::vbmi) {
          const auto* X = static_cast<const uint16_t*>(c.X) + m * K;
          const auto* S = reinterpret_cast<const uint16_t*>(SZ);
          DISPATCH_MR(mr, block_vbmi, b, X, c.sx.data() + m * ng, S, out);
        } else {
          RowI16 rows[kMR];
          for (int r = 0; r < mr; ++r) rows[r] = c.row(m + r, K, ng);
          using S = std::conditional_t<std::is_same_v<scalar_t, float>, float, uint16_t>;
          int r = 0;  // the AVX2 paths: two rows a pass, then one
          switch (path) {
            case Path::vnni8:
              DISPATCH_MR(mr, block_vnni, b, rows, reinterpret_cast<const S*>(SZ), out);
              break;
            case Path::i8:
              for (; r + 2 <= mr; r += 2) block_i8<2>(b, rows + r, SZ, out + r * 64);
              if (r < mr) block_i8<1>(b, rows + r, SZ, out + r * 64);
              break;
            default:
              for (; r + 2 <= mr; r += 2) block_i16<2>(b, rows + r, SZ, out + r * 64);
              if (r < mr) block_i16<1>(b, rows + r, SZ, out + r * 64);
          }
        }
        for (int r = 0; r < mr; ++r)
          for (int d = 0; d < 64; ++d) Y[(m + r) * n + b.n0 + d] = out[r * 64 + d];
      }
    }
  });
}

}  // namespace

bool int4_fast_supported() { return cpu_vbmi_bf16(); }

// y [M, n] (x's dtype) = x [M, K] @ W^T. avx2_only, x8: pick_path (fp32 x without x8 takes
// the 16-bit AVX2 path).
torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& packed,
                          const torch::Tensor& sz, int64_t group, int64_t n, bool avx2_only,
                          bool x8) {
  const Path path = pick_path(x.scalar_type(), group, avx2_only, x8);
  torch::Tensor y = torch::empty({x.size(0), n}, x.options());
  std::vector<Call> calls;
  calls.push_back(make_call(x, packed, sz, group, n, path, y.data_ptr()));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_int4", [&] {
    run_calls<scalar_t>(calls, x.size(1), group, n, path);
  });
  return y;
}

// [x_i @ W_i^T] stacked in one y [sum M_i, n] (product i's rows after product i - 1's):
// several products of one shape (K, n, group, dtype), e.g. the gate_up or the down projections
// of a MoE layer's picked experts, the blocks of all of them in one parallel_for: one fork /
// join instead of one a product, and the threads stream on from one matrix to the next (each
// block is computed as linear_int4 computes it: the same bits).
torch::Tensor linear_int4_many(const std::vector<torch::Tensor>& xs,
                               const std::vector<torch::Tensor>& packed,
                               const std::vector<torch::Tensor>& sz, int64_t group, int64_t n,
                               bool avx2_only, bool x8) {
  TORCH_CHECK(!xs.empty() && xs.size() == packed.size() && xs.size() == sz.size(),
              "linear_int4_many: as many x, packed and scales_and_zeros");
  const int64_t K = xs[0].size(1);
  const auto dt = xs[0].scalar_type();
  const Path path = pick_path(dt, group, avx2_only, x8);
  int64_t rows = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == dt,
                "linear_int4_many: every x [M, K] of one K and dtype");
    rows += x.size(0);
  }
  torch::Tensor y = torch::empty({rows, n}, xs[0].options());
  std::vector<Call> calls;
  calls.reserve(xs.size());
  for (size_t i = 0, row = 0; i < xs.size(); row += xs[i].size(0), ++i)
    calls.push_back(make_call(xs[i], packed[i], sz[i], group, n, path,
                              static_cast<char*>(y.data_ptr()) + row * n * y.element_size()));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "linear_int4_many", [&] {
    run_calls<scalar_t>(calls, K, group, n, path);
  });
  return y;
}

// A MoE block's int4 experts for a decode step, their tensors held once (moe_block.h; the
// experts share a group size, the shared expert's two projections may have their own): every
// routed pair's and the shared expert's gate_up products in one parallel_for (where the shared
// expert has the experts' width and group; else two), the SwiGLUs, the down products likewise.
// Each product is the Call linear_int4 / linear_int4_many makes for it: the same bits. Up to 16
// rows (the int4 kernels').
class Int4Moe {
 public:
  Int4Moe(std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> gate_up_sz,
          std::vector<torch::Tensor> down, std::vector<torch::Tensor> down_sz,
          torch::Tensor shared_gate_up, torch::Tensor shared_gate_up_sz, torch::Tensor shared_down,
          torch::Tensor shared_down_sz, int64_t group, int64_t shared_gate_up_group,
          int64_t shared_down_group, bool x8)
      : gu_(std::move(gate_up)), gu_sz_(std::move(gate_up_sz)), dn_(std::move(down)),
        dn_sz_(std::move(down_sz)), sgu_(std::move(shared_gate_up)),
        sgu_sz_(std::move(shared_gate_up_sz)), sdn_(std::move(shared_down)),
        sdn_sz_(std::move(shared_down_sz)), group_(group), sgu_group_(shared_gate_up_group),
        sdn_group_(shared_down_group), x8_(x8) {
    const int64_t E = static_cast<int64_t>(gu_.size());
    TORCH_CHECK(E >= 1 && gu_sz_.size() == gu_.size() && dn_.size() == gu_.size() &&
                    dn_sz_.size() == gu_.size(),
                "Int4Moe: as many gate_up, down and scales_and_zeros as experts");
    H_ = gu_[0].size(1) * 2, I2_ = gu_[0].size(0), Is2_ = sgu_.size(0);
    TORCH_CHECK(I2_ % 2 == 0 && Is2_ % 2 == 0 && dn_[0].size(0) == H_ &&
                    dn_[0].size(1) * 4 == I2_ && sgu_.size(1) * 2 == H_ && sdn_.size(0) == H_ &&
                    sdn_.size(1) * 4 == Is2_,
                "Int4Moe: gate_up [2I, H], down [H, I], shared [2Is, H] and [H, Is] expected");
    for (int64_t e = 0; e < E; ++e) {  // what make_call checks per call, once
      check_packed(gu_[e], gu_sz_[e], group, I2_, H_);
      check_packed(dn_[e], dn_sz_[e], group, H_, I2_ / 2);
      TORCH_CHECK(gu_[e].sizes() == gu_[0].sizes() && dn_[e].sizes() == dn_[0].sizes() &&
                      gu_sz_[e].scalar_type() == gu_sz_[0].scalar_type() &&
                      dn_sz_[e].scalar_type() == gu_sz_[0].scalar_type(),
                  "Int4Moe: every expert of one shape and scale dtype");
    }
    check_packed(sgu_, sgu_sz_, sgu_group_, Is2_, H_);
    check_packed(sdn_, sdn_sz_, sdn_group_, H_, Is2_ / 2);
    TORCH_CHECK(sgu_sz_.scalar_type() == gu_sz_[0].scalar_type() &&
                    sdn_sz_.scalar_type() == gu_sz_[0].scalar_type(),
                "Int4Moe: the shared expert's scales in the experts' dtype");
  }

  // (xs [P, H]: the pairs' rows sorted by expert, experts: the active ones, counts: each one's
  // pairs (moe_route's), x [T, H]) -> {ys [P, H]: each pair's down(SwiGLU(gate_up)), sh [T, H]:
  // the shared expert's output}, in x's dtype (that of the scales: fp32 or bf16)
  std::vector<torch::Tensor> run(const torch::Tensor& xs, const std::vector<int64_t>& experts,
                                 const std::vector<int64_t>& counts, const torch::Tensor& x) const {
    const int64_t E = static_cast<int64_t>(gu_.size());
    moe_block::check_runs(xs, x, experts, counts, E, "Int4Moe");
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == gu_sz_[0].scalar_type() && x.size(1) == H_,
                "Int4Moe: x [T, H] and xs [P, H] in the scales' dtype");
    const Path path = pick_path(dt, group_, false, x8_);  // (x8: each group a multiple of 32)
    pick_path(dt, sgu_group_, false, x8_), pick_path(dt, sdn_group_, false, x8_);
    const int64_t P = xs.size(0), T = x.size(0), I = I2_ / 2, Is = Is2_ / 2;
    const std::vector<torch::Tensor> xrows = moe_block::runs_of(xs, counts);
    torch::Tensor gu = torch::empty({P, I2_}, x.options()), sgu = torch::empty({T, Is2_}, x.options());
    torch::Tensor ys = torch::empty({P, H_}, x.options()), ysh = torch::empty({T, H_}, x.options());
    const auto body = [&](auto tag) {
      using scalar_t = decltype(tag);
      const auto at_row = [](const torch::Tensor& t, int64_t row) {
        return static_cast<char*>(t.data_ptr()) + row * t.size(1) * t.element_size();
      };
      // pass 1: gate_up (the shared expert's with the routed ones where it has their width
      // and group: run_calls takes products of one shape)
      std::vector<Call> calls, shared;
      for (size_t i = 0, row = 0; i < experts.size(); row += counts[i], ++i)
        calls.push_back(make_call(xrows[i], gu_[experts[i]], gu_sz_[experts[i]], group_, I2_,
                                  path, at_row(gu, row)));
      (Is2_ == I2_ && sgu_group_ == group_ ? calls : shared)
          .push_back(make_call(x, sgu_, sgu_sz_, sgu_group_, Is2_, path, sgu.data_ptr()));
      run_calls<scalar_t>(calls, H_, group_, I2_, path);
      if (!shared.empty()) run_calls<scalar_t>(shared, H_, sgu_group_, Is2_, path);
      const torch::Tensor h = moe_block::swiglu(gu), sh = moe_block::swiglu(sgu);
      const std::vector<torch::Tensor> hrows = moe_block::runs_of(h, counts);
      // pass 2: down (the same)
      calls.clear();
      shared.clear();
      for (size_t i = 0, row = 0; i < experts.size(); row += counts[i], ++i)
        calls.push_back(make_call(hrows[i], dn_[experts[i]], dn_sz_[experts[i]], group_, H_, path,
                                  at_row(ys, row)));
      (Is == I && sdn_group_ == group_ ? calls : shared)
          .push_back(make_call(sh, sdn_, sdn_sz_, sdn_group_, H_, path, ysh.data_ptr()));
      run_calls<scalar_t>(calls, I, group_, H_, path);
      if (!shared.empty()) run_calls<scalar_t>(shared, Is, sdn_group_, H_, path);
    };
    if (dt == at::kFloat)
      body(float{});
    else
      body(at::BFloat16{});
    return {ys, ysh};
  }

 private:
  std::vector<torch::Tensor> gu_, gu_sz_, dn_, dn_sz_;
  torch::Tensor sgu_, sgu_sz_, sdn_, sdn_sz_;
  int64_t group_, sgu_group_, sdn_group_;
  bool x8_;
  int64_t H_ = 0, I2_ = 0, Is2_ = 0;
};

// x [M, K] (bf16 / fp32) -> x rounded as the x8 paths round it (xs_b * xq per block of 32 inputs,
// in x's dtype): what longer inputs (prefill's dequantise + GEMM) multiply with x8, so that a
// row's result does not depend on whether its call had more than 16 rows (batched == alone).
torch::Tensor int4_x8_round(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) % kX8Block == 0 &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "int4_x8_round: x [M, K % 32 == 0] bf16 / fp32, contiguous on the CPU");
  const int64_t n = x.numel() / kX8Block;  // blocks
  torch::Tensor y = torch::empty_like(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const auto* X = static_cast<const char*>(x.data_ptr());
  auto* Y = static_cast<char*>(y.data_ptr());
  at::parallel_for(0, n, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      __m256i i[4];
      const int64_t off = b * kX8Block * x.element_size();
      const float xs = bf16 ? round_block_x8(reinterpret_cast<const at::BFloat16*>(X + off), i)
                            : round_block_x8(reinterpret_cast<const float*>(X + off), i);
      const __m256 vs = _mm256_set1_ps(xs);
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(i[j]), vs);  // NaN * 0: NaN
        if (bf16)  // round to nearest even, as .to(bfloat16)
          vec8::store8(reinterpret_cast<at::BFloat16*>(Y + off) + 8 * j, v);
        else
          vec8::store8(reinterpret_cast<float*>(Y + off) + 8 * j, v);
      }
    }
  });
  return y;
}

// W [N, K] in out's dtype (bf16 or fp32, as scales_and_zeros). out either contiguous (the
// scalar reference) or the transpose of a contiguous [K, N] (the vector path: prefill's GEMM
// input, mm(x, out.t()) = x @ W^T).
void int4_dequant(const torch::Tensor& packed, const torch::Tensor& sz, int64_t group,
                  torch::Tensor& out) {
  const int64_t N = out.size(0), K = out.size(1);
  check_packed(packed, sz, group, N, K);
  TORCH_CHECK(out.dim() == 2 && sz.scalar_type() == out.scalar_type() && out.device().is_cpu(),
              "int4_dequant: out [N, K] in scales_and_zeros' dtype");
  const bool kmajor = out.t().is_contiguous() && !out.is_contiguous();
  TORCH_CHECK(kmajor || out.is_contiguous(),
              "int4_dequant: out [N, K] contiguous, or the transpose of a contiguous [K, N]");
  const uint8_t* P = packed.data_ptr<uint8_t>();
  if (sz.scalar_type() == at::kFloat) {
    const float* SZ = sz.data_ptr<float>();
    kmajor ? dequant_t(P, SZ, group, N, K, out.data_ptr<float>())
           : dequant_rows(P, SZ, group, N, K, out.data_ptr<float>());
  } else {
    const auto* SZ = sz.data_ptr<at::BFloat16>();
    kmajor ? dequant_t(P, SZ, group, N, K, out.data_ptr<at::BFloat16>())
           : dequant_rows(P, SZ, group, N, K, out.data_ptr<at::BFloat16>());
  }
}

namespace {

template <typename S>
inline float round_to(float v) {  // the value as scales_and_zeros' dtype holds it
  return static_cast<float>(static_cast<S>(v));  // (bf16: round to nearest even, as torch's .to)
}

// W [N, K] -> packed [N / 64, K, 32] bytes + scales_and_zeros [K / group, N, 2], one 64-row block
// a task: each row to fp32, per group of `group` inputs lo / hi its min / max, scale = max((hi -
// lo) / 15, 1e-12) and zero = lo + 8 scale each rounded to S, q = clamp(round((w - zero) / scale
// + 8), 0, 15) with round half to even: quant/formats.py quantize_int4_groups op for op (the
// same fp32 operations, so the same bits), then pack_int4's layout.
template <typename T, typename S>
void quantize_impl(const T* W, int64_t N, int64_t K, int64_t group, uint8_t* P, S* SZ) {
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> row(K);
    std::vector<uint8_t> q(64 * K);
    const __m256 eight = _mm256_set1_ps(8.f), fifteen = _mm256_set1_ps(15.f),
                 zero_v = _mm256_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t d = 0; d < 64; ++d) {
        const int64_t n = b * 64 + d;
        gemv_rows::row_to_float(W + n * K, K, row.data());
        uint8_t* qd = q.data() + d;  // q [K, 64]: input k's 64 rows together
        for (int64_t g = 0; g < K / group; ++g) {
          const float* x = row.data() + g * group;
          float lo = x[0], hi = x[0];
          int64_t j0 = 0;
          if (group >= 8) {
            __m256 vlo = _mm256_loadu_ps(x), vhi = vlo;
            for (j0 = 8; j0 + 8 <= group; j0 += 8) {
              const __m256 v = _mm256_loadu_ps(x + j0);
              vlo = _mm256_min_ps(vlo, v), vhi = _mm256_max_ps(vhi, v);
            }
            alignas(32) float l8[8], h8[8];
            _mm256_store_ps(l8, vlo), _mm256_store_ps(h8, vhi);
            for (int i = 0; i < 8; ++i) lo = std::min(lo, l8[i]), hi = std::max(hi, h8[i]);
          }
          for (int64_t j = j0; j < group; ++j) lo = std::min(lo, x[j]), hi = std::max(hi, x[j]);
          const float scale = round_to<S>(std::max((hi - lo) / 15.0f, 1e-12f));
          const float zero = round_to<S>(lo + 8.0f * scale);  // (8 scale is exact)
          SZ[(g * N + n) * 2] = static_cast<S>(scale);
          SZ[(g * N + n) * 2 + 1] = static_cast<S>(zero);
          const __m256 sv = _mm256_set1_ps(scale), zv = _mm256_set1_ps(zero);
          int64_t j = 0;
          for (; j + 8 <= group; j += 8) {
            __m256 v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), zv), sv);
            v = _mm256_round_ps(_mm256_add_ps(v, eight), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm256_min_ps(_mm256_max_ps(v, zero_v), fifteen);
            alignas(32) int32_t t[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(v));
            for (int i = 0; i < 8; ++i) qd[(g * group + j + i) * 64] = static_cast<uint8_t>(t[i]);
          }
          for (; j < group; ++j) {
            const float v = std::nearbyint((x[j] - zero) / scale + 8.0f);
            qd[(g * group + j) * 64] = static_cast<uint8_t>(std::min(std::max(v, 0.f), 15.f));
          }
        }
      }
      uint8_t* out = P + b * K * 32;  // [K, 32]: row d low nibble, row d + 32 high
      for (int64_t k = 0; k < K; ++k) {  // (q <= 15: shifting 16-bit lanes by 4 stays in bytes)
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.data() + k * 64));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.data() + k * 64 + 32));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k * 32),
                            _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)));
      }
    }
  });
}

template <typename T>
void quantize_to(const T* W, int64_t N, int64_t K, int64_t group, uint8_t* P,
                 const torch::Tensor& sz) {
  if (sz.scalar_type() == at::kFloat)
    quantize_impl(W, N, K, group, P, sz.data_ptr<float>());
  else
    quantize_impl(W, N, K, group, P, sz.data_ptr<at::BFloat16>());
}

}  // namespace

// w [N, K] (fp32 / bf16 / fp16; N % 64 == 0, K % group == 0) -> (packed [N, K/2] uint8, this
// file's layout; scales_and_zeros [K / group, N, 2] in sz_dtype: fp32 or bf16)
std::vector<torch::Tensor> int4_quantize(const torch::Tensor& w, int64_t group,
                                         at::ScalarType sz_dtype) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "int4_quantize: w [N, K] on the CPU");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % 64 == 0 && group > 0 && K % group == 0 && K % 2 == 0,
              "int4_quantize: N % 64 == 0 and K % group == 0");
  TORCH_CHECK(sz_dtype == at::kFloat || sz_dtype == at::kBFloat16,
              "int4_quantize: scales_and_zeros fp32 or bf16");
  const auto wc = w.contiguous();
  auto packed = torch::empty({N, K / 2}, w.options().dtype(at::kByte));
  auto sz = torch::empty({K / group, N, 2}, w.options().dtype(sz_dtype));
  uint8_t* P = packed.data_ptr<uint8_t>();
  gemv_rows::with_weight_dtype(
      wc, "int4_quantize", [&](const auto* W) { quantize_to(W, N, K, group, P, sz); });
  return {packed, sz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_quantize", &int4_quantize, QWEN35_NOGIL,
        "w [N, K] -> (packed, scales_and_zeros): quant/formats.py quantize_int4_groups + pack_int4");
  m.def("linear_int4", &linear_int4, QWEN35_NOGIL, "x [M, K] @ W^T, W in torch's packed CPU int4 layout",
        py::arg("x"), py::arg("packed"), py::arg("sz"), py::arg("group"), py::arg("n"),
        py::arg("avx2_only") = false, py::arg("x8") = false);
  m.def("linear_int4_many", &linear_int4_many, QWEN35_NOGIL,
        "[x_i @ W_i^T] stacked [sum M_i, n], products of one shape, one parallel_for",
        py::arg("xs"), py::arg("packed"), py::arg("sz"), py::arg("group"), py::arg("n"),
        py::arg("avx2_only") = false, py::arg("x8") = false);
  py::class_<Int4Moe>(m, "Int4Moe", py::module_local())
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor,
                    torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t,
                    bool>(),
           py::arg("gate_up"), py::arg("gate_up_sz"), py::arg("down"), py::arg("down_sz"),
           py::arg("shared_gate_up"), py::arg("shared_gate_up_sz"), py::arg("shared_down"),
           py::arg("shared_down_sz"), py::arg("group"), py::arg("shared_gate_up_group"),
           py::arg("shared_down_group"), py::arg("x8"))
      .def("run", &Int4Moe::run, QWEN35_NOGIL,
           "(xs, experts, counts, x) -> [ys, shared]: a MoE block's int4 experts, few rows");
  m.def("int4_dequant", &int4_dequant, QWEN35_NOGIL, "torch's packed CPU int4 weight into out [N, K]");
  m.def("int4_x8_round", &int4_x8_round, QWEN35_NOGIL, "x rounded as the x8 paths round it, in x's dtype");
  m.def("int4_fast_supported", &int4_fast_supported, QWEN35_NOGIL, "the AVX512-VBMI + BF16 path runs here");
  m.def("int4_vnni_supported", &cpu_vnni_vbmi, QWEN35_NOGIL, "the AVX512-VNNI 8-bit activation path runs here");
}
