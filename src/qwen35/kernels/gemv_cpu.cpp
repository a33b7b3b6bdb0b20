// Decode GEMVs on the CPU: y [M, N] = x [M, K] @ W^T for a few rows (M <= 16), W [N, K] read
// from memory once. Batch-1 decode is memory-bound, so the only goal is to stream the weight at
// the machine's bandwidth: one output row at a time against up to 4 input rows, several
// independent accumulators along K, output rows split over threads in contiguous ranges, one
// horizontal sum per output at the end. (Tiles of 4 output rows streamed 4 interleaved
// sequences and reached half the bandwidth one sequential row does: bench/gemv.py.)
//
// - linear_bf16: bf16 weights. AVX512-BF16 CPUs (Zen 4, Sapphire Rapids) multiply bf16 pairs
//   straight into fp32 (vdpbf16ps); other x86 CPUs widen bf16 to fp32 (a 16-bit shift) + FMA.
//   fp32 rows (fp32 compute on bf16-stored weights) take the widening path on every CPU.
// - linear_fp32: fp32 weights and rows, FMA.
// - linear_int8: int8 weights with one scale per output row (weight-only: activations keep their
//   precision). bf16 rows on AVX512-VBMI + BF16 CPUs: the FP8 scheme below with tables for the
//   two's-complement values (sign bit set / clear, blended); fp32 rows on other AVX512 CPUs:
//   int8 -> fp32 + FMA, 8 weights a step (the 16-wide AVX512 sign extension measured slower on
//   Zen 4: bench/gemv.py); CPUs without AVX512: x rounded to 16 bits per group of 128 and
//   integer dot products (int8_rows_i16 below).
// - linear_fp8: block-FP8 (e4m3, one fp32 scale per bo x bi block) for bf16 activations on
//   AVX512-VBMI + BF16 CPUs: each weight byte becomes its exact bf16 through two 128-entry byte
//   tables (vpermi2b: low and high byte), then vdpbf16ps. The byte unpack interleaves within
//   128-bit lanes, so the activations are permuted the same way once per call. Other AVX512
//   CPUs (cvt = true): each byte's bits moved into an fp16, converted exactly, then FMA.
// Above 4 rows the table paths convert each weight row once and run two at a time
// (for_row_pairs); bf16 rows from 5 on AVX512-BF16 CPUs run in register tiles of 2 input rows
// x 3 weight rows (bf16_rows_tiled: the same bits as the passes). Full 64-byte chunks load unmasked (load64: masks cost 3x on Zen 5).
// Every path but the int8 AVX2 one accumulates exact products in fp32; results equal F.linear up
// to summation order (the int8 AVX2 one: F.linear on x rounded to 16 bits, its PyTorch twin).
// The PyTorch twins: F.linear on the (dequantised) weight (layers/linear.py, quant/matmul.py).
#include <ATen/Parallel.h>
#include <ATen/ops/cat.h>
#include <immintrin.h>
#include "torch_ext.h"

#include "cpu_isa.h"
#include "gemv_rows.h"
#include "moe_block.h"
#include "small_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#define TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define TARGET_AVX512_FP8 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

namespace {

using gemv_rows::kMaxRows;
using gemv_rows::kMR;
using gemv_rows::bf16_to_float;

// independent accumulators along K per input row, the same for every row count: a row's sum
// is then the same bits whichever rows share its pass (batched == alone). 4 chains a row hide
// the FMA latency at one row (fma_row: how the AVX2 build fits them in its registers).
constexpr int kU = 4;
using gemv_rows::kInt8Prefetch;  // the int8 rows' software prefetch (gemv_rows.h)

bool cpu_avx512() { return cpu_isa::avx512(); }
bool cpu_avx512_bf16() { return cpu_isa::avx512_bf16(); }
bool cpu_avx512_fp8() { return cpu_isa::avx512_bf16_vbmi(); }


// Output rows a tile where M input rows of x_bytes in all take several passes of kMR and x is
// past ~16 KiB: ~32 KiB of weights (row_bytes a row), so that a pass's input rows stay in L1
// across the tile and the tile is read again from L2, where row by row every weight row walks
// all M input rows (8 rows of 3,584 bf16 inputs: 57 KiB, past L1 with the weights streaming
// through). `python bench/gemv.py --baseline REV --formats bf16 --rows 8` (Zen 5, 2 threads):
// 1,024 x 3,584 1.19x, 1,024 x 2,048 1.47x; x of 16 KiB (8 rows of 1,024) untiled (0.89-0.92x
// tiled). Loop order only: the same bits.
inline int64_t tile_rows(int64_t M, int64_t x_bytes, int64_t row_bytes,
                         int64_t x_max = 16 << 10, int64_t tile_bytes = 32 << 10) {
  return M > kMR && x_bytes > x_max ? std::max<int64_t>(1, tile_bytes / row_bytes) : 1;
}

// fn(n, out) for every output row n, out[i] = its dot product with input row i (i < mr); the
// rows are split over threads in contiguous ranges (at least 64 rows a task, so small matrices
// don't pay a fork per row); store(n, i, value) writes the result. tile (tile_rows) > 1: output
// rows in tiles of that many, each tile's passes of kMR input rows one after the other.
template <typename Row, typename Store>
void for_rows(int64_t M, int64_t N, Row&& row, Store&& store, int64_t tile = 1) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    float out[kMR];
    for (int64_t t0 = n0; t0 < n1; t0 += tile)
      for (int64_t m = 0; m < M; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m));
        for (int64_t n = t0; n < std::min(n1, t0 + tile); ++n) {
          row(n, m, mr, out);
          for (int i = 0; i < mr; ++i) store(m + i, n, out[i]);
        }
      }
  });
}

// for_rows over C products of N output rows each (product c has M[c] <= kMR input rows), all
// their rows in one parallel_for: row(c, n, m, mr, out) and store(c, m, n, v) as above. A row's
// result is the one for_rows gives it (the same calls), only the split over threads differs.
template <typename Row, typename Store>
void for_rows_many(int64_t C, const std::vector<int64_t>& M, int64_t N, Row&& row, Store&& store) {
  gemv_rows::for_product_rows(C, N, [&](int64_t c, int64_t n) {
    float out[kMR];
    row(c, n, 0, static_cast<int>(M[c]), out);
    for (int64_t r = 0; r < M[c]; ++r) store(c, r, n, out[r]);
  });
}

// More than kMR rows on the byte-table paths: per thread, weight rows n, n + 1 converted once
// (convert(n, buf [Kp] bf16)), then pair(n, m, mr, w0, w1, out0, out1) for each group of input
// rows; a range's odd last row takes single(n, m, mr, out), which must give the same results.
template <typename Convert, typename Pair, typename Single, typename Store>
void for_row_pairs(int64_t M, int64_t N, int64_t Kp, Convert&& convert, Pair&& pair,
                   Single&& single, Store&& store) {
  // pairs a tile: tile_rows on the converted rows, a tile's passes one after the other, where
  // all M rows are past 32 KiB (`python bench/gemv.py --formats int8,fp8 --rows 8,16
  // --baseline REV`, Zen 5, 2 threads: 1,024 inputs x 16 rows, 32 KiB, 0.75x tiled; 3,584 x 16
  // 1.19x / 1.18x (int8 / FP8), 2,048 x 16 1.16x / 1.15x tiled)
  const int64_t pairs = std::max<int64_t>(1, tile_rows(M, 2 * M * Kp, 2 * Kp, 32 << 10) / 2);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    std::vector<uint16_t> wbuf(2 * pairs * Kp);
    float out[2][kMR];
    int64_t n = n0;
    while (n + 1 < n1) {
      const int64_t np = std::min(pairs, (n1 - n) / 2);  // whole pairs in this tile
      for (int64_t j = 0; j < 2 * np; ++j) convert(n + j, wbuf.data() + j * Kp);
      for (int64_t m = 0; m < M; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m));
        for (int64_t p = 0; p < np; ++p) {
          const uint16_t* w0 = wbuf.data() + 2 * p * Kp;
          pair(n + 2 * p, m, mr, w0, w0 + Kp, out[0], out[1]);
          for (int i = 0; i < mr; ++i)
            store(m + i, n + 2 * p, out[0][i]), store(m + i, n + 2 * p + 1, out[1][i]);
        }
      }
      n += 2 * np;  // (then a range's odd last row, if any, below)
    }
    for (; n < n1; ++n)
      for (int64_t m = 0; m < M; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m));
        single(n, m, mr, out[0]);
        for (int i = 0; i < mr; ++i) store(m + i, n, out[0][i]);
      }
  });
}

// ---- bf16, AVX512-BF16 --------------------------------------------------------------------

template <int MR>
TARGET_AVX512_BF16 void bf16_row_avx512(const uint16_t* X, const uint16_t* w, float* out,
                                        int64_t K) {
  constexpr int U = kU;
  __m512 acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U)
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int i = 0; i < MR; ++i)
        acc[i][u] = _mm512_dpbf16_ps(acc[i][u], (__m512bh)_mm512_loadu_si512(X + i * K + k + 32 * u),
                                     wv);
    }
  for (; k < K; k += 32) {  // the rest, the last K % 32 inputs masked (zeros past the end)
    const __mmask32 mk = K - k >= 32 ? ~0u : static_cast<__mmask32>((1u << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
    for (int i = 0; i < MR; ++i)
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_maskz_loadu_epi16(mk, X + i * K + k),
                                   wv);
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < U; ++u) acc[i][0] = _mm512_add_ps(acc[i][0], acc[i][u]);
    out[i] = _mm512_reduce_add_ps(acc[i][0]);
  }
}

// Several bf16 input rows: register tiles of MR input rows x NR weight rows, each of the MR x NR
// sums in bf16_row_avx512's kU chains, order and final sum (the same bits: batched == alone),
// so a 32-input chunk of a weight row, once loaded, meets MR input rows and a chunk of an input
// row NR weight rows: (MR + NR) loads for MR x NR dot products, where bf16_row_avx512 has 1 + MR
// for MR. 2 x 3 tiles: 24 accumulators + 3 weight chunks + 1 input chunk of the 32 registers.
// Inputs [k0, k1) of rows of K (k0 a multiple of 128; k1 too, or K: the rest, as
// bf16_row_avx512 takes it); state: the chains between calls on consecutive ranges (read
// unless k0 == 0, written unless k1 == K, where the sums go to out [MR][NR] instead). (A twin
// of bf16_row_avx512, which is the NR = 1 case: the one-row kernel kept as it is, since calling
// this one for it ran 0.91-0.99x at 1-4 rows, `bench/gemv.py --baseline`.)
template <int MR, int NR>
TARGET_AVX512_BF16 void bf16_tile_avx512(const uint16_t* X, const uint16_t* W, int64_t K,
                                         int64_t k0, int64_t k1, float* state, float* out) {
  constexpr int U = kU;
  __m512 acc[MR][NR][U];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      for (int u = 0; u < U; ++u)
        acc[i][j][u] = k0 == 0 ? _mm512_setzero_ps()
                                : _mm512_loadu_ps(state + ((i * NR + j) * U + u) * 16);
  int64_t k = k0;
  for (; k + 32 * U <= k1; k += 32 * U) {
    for (int u = 0; u < U; ++u) {
      __m512bh wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(W + j * K + k + 32 * u);
      for (int i = 0; i < MR; ++i) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(X + i * K + k + 32 * u);
        for (int j = 0; j < NR; ++j) acc[i][j][u] = _mm512_dpbf16_ps(acc[i][j][u], xv, wv[j]);
      }
    }
  }
  if (k1 < K) {
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        for (int u = 0; u < U; ++u)
          _mm512_storeu_ps(state + ((i * NR + j) * U + u) * 16, acc[i][j][u]);
    return;
  }
  for (; k < K; k += 32) {  // bf16_row_avx512's rest: chain 0, the last K % 32 inputs masked
    const __mmask32 mk = K - k >= 32 ? ~0u : static_cast<__mmask32>((1u << (K - k)) - 1);
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mk, W + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, X + i * K + k);
      for (int j = 0; j < NR; ++j) acc[i][j][0] = _mm512_dpbf16_ps(acc[i][j][0], xv, wv[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      for (int u = 1; u < U; ++u) acc[i][j][0] = _mm512_add_ps(acc[i][j][0], acc[i][j][u]);
      out[i * NR + j] = _mm512_reduce_add_ps(acc[i][j][0]);
    }
}

// y [M, N] = X [M, K] @ W [N, K]^T by bf16_tile_avx512, from kTiledMinRows input rows: output
// rows in tasks of kTileRows, a task's tiles pass by pass of 2 input rows (the task's weights
// stay in L1 / L2 across its passes). Input rows past kTileBlock bytes in all are taken in
// even blocks of inputs (multiples of 128) under that size, each block through every tile of
// the task before the next (the chains kept between blocks in `state`), so a block's input rows
// stay in the caches. Under each block, the weights the next one reads (the task's next
// inputs, or the next task's first block) are prefetched, a share before each tile: into L1
// where they fit in kTilePrefetchL1, else into L2. `python bench/gemv.py --formats bf16
// --baseline REV --rows 2,3,4,6,8,12,16 --shapes ...` (Zen 5, 2 threads) set these: 6 rows a
// task against 12 and 24, 64 KiB blocks against 24-96 KiB and none, passes outermost against
// tiles outermost; below 5 rows the row-by-row passes (for_rows) are as fast or faster.
constexpr int64_t kTiledMinRows = 5;
constexpr int64_t kTileRows = 6;
constexpr int64_t kTileBlock = 64 << 10;
constexpr int64_t kTilePrefetchL1 = 24 << 10;

template <typename Store>
void bf16_rows_tiled(const uint16_t* X, const uint16_t* W, int64_t M, int64_t N, int64_t K,
                     Store&& store) {
  constexpr int NR = 3;
  const int64_t nb = std::max<int64_t>(1, (2 * M * K + kTileBlock - 1) / kTileBlock);
  const int64_t kb = std::max<int64_t>(128, ((K + nb - 1) / nb + 127) / 128 * 128);
  const int64_t tasks = (N + kTileRows - 1) / kTileRows;
  const int64_t blocks = (K + kb - 1) / kb, passes = (M + 1) / 2;
  at::parallel_for(0, tasks, std::max<int64_t>(1, 64 / kTileRows), [&](int64_t t0, int64_t t1) {
    const int64_t subtiles = (kTileRows + NR - 1) / NR;  // per task
    std::vector<float> state(blocks > 1 ? passes * subtiles * 2 * NR * kU * 16 : 0);
    float out[2 * NR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileRows, n1 = std::min(N, n0 + kTileRows);
      const int64_t nsub = (n1 - n0 + NR - 1) / NR;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kb, k1 = b + 1 == blocks ? K : k0 + kb;
        // the weights the next block reads (this task's next inputs, or the next task's first),
        // prefetched a share a call while this block runs
        const bool last = b + 1 == blocks;
        const int64_t next_n1 = t + 1 < t1 ? std::min(N, n1 + kTileRows) : n1;
        const int64_t pn0 = last ? n1 : n0, pn1 = last ? next_n1 : n1;
        const int64_t pk0 = last ? 0 : k1, pk1 = std::min(K, pk0 + kb);
        const int64_t lpr = (pk1 - pk0) * 2 / 64, lines = (pn1 - pn0) * lpr;
        const bool l1 = lines * 64 <= kTilePrefetchL1;
        const char* pbase = reinterpret_cast<const char*>(W + pn0 * K + pk0);
        const int64_t calls = nsub * passes, per = (lines + calls - 1) / calls;
        for (int64_t q = 0; q < calls; ++q) {
          for (int64_t L = q * per; L < std::min(lines, (q + 1) * per); ++L) {
            const char* a = pbase + (L / lpr) * K * 2 + (L % lpr) * 64;
            if (l1) _mm_prefetch(a, _MM_HINT_T0); else _mm_prefetch(a, _MM_HINT_T1);
          }
          const int64_t n = n0 + NR * (q % nsub), m = 2 * (q / nsub);  // passes outermost
          const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
          const int mr = static_cast<int>(std::min<int64_t>(2, M - m));
          const uint16_t *x = X + m * K, *w = W + n * K;
          const int64_t tile = (m / 2) * subtiles + (n - n0) / NR;  // its state (blocks > 1)
          float* st = blocks == 1 ? nullptr : state.data() + tile * 2 * NR * kU * 16;
          switch (mr * 4 + nr) {
            case 5: bf16_tile_avx512<1, 1>(x, w, K, k0, k1, st, out); break;
            case 6: bf16_tile_avx512<1, 2>(x, w, K, k0, k1, st, out); break;
            case 7: bf16_tile_avx512<1, 3>(x, w, K, k0, k1, st, out); break;
            case 9: bf16_tile_avx512<2, 1>(x, w, K, k0, k1, st, out); break;
            case 10: bf16_tile_avx512<2, 2>(x, w, K, k0, k1, st, out); break;
            default: bf16_tile_avx512<2, 3>(x, w, K, k0, k1, st, out); break;
          }
          if (k1 == K)
            for (int i = 0; i < mr; ++i)
              for (int j = 0; j < nr; ++j) store(m + i, n + j, out[i * nr + j]);
        }
      }
    }
  });
}

// ---- bf16 / int8 via fp32 FMA, AVX2 (any x86-64 of the last decade) and AVX512 -------------

// 8 weights -> fp32
inline __m256 load8_avx2(const uint16_t* p) {  // bf16
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8_avx2(const int8_t* p) {  // int8
  int64_t b;
  std::memcpy(&b, p, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b)));
}
inline __m256 load8_avx2(const float* p) { return _mm256_loadu_ps(p); }  // fp32
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }

// MR rows' sums, kU chains a row (inlined into the two builds below)
template <int MR, typename WT>
__attribute__((always_inline)) inline void fma_rows(const float* X, const WT* w, float* out,
                                                    int64_t K) {
  constexpr int U = kU;
  __m256 acc[MR][U];
  for (int i = 0; i < MR; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    if constexpr (std::is_same_v<WT, int8_t>)
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + kInt8Prefetch, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8_avx2(w + k + 8 * u);
      for (int i = 0; i < MR; ++i)
        acc[i][u] = _mm256_fmadd_ps(_mm256_loadu_ps(X + i * K + k + 8 * u), wv, acc[i][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8_avx2(w + k);
    for (int i = 0; i < MR; ++i)
      acc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(X + i * K + k), wv, acc[i][0]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int u = 1; u < U; ++u) acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
    float s = gemv_rows::hsum8(acc[i][0]);
    for (int64_t t = k; t < K; ++t) s += X[i * K + t] * load1(w + t);
    out[i] = s;
  }
}

// AVX512 CPUs: the same instructions, with VL's 32 ymm registers for every row count's chains
template <int MR, typename WT>
TARGET_AVX512 void fma_rows_vl(const float* X, const WT* w, float* out, int64_t K) {
  fma_rows<MR>(X, w, out, K);
}

// One output row against MR input rows in fp32 FMA: vl (AVX512 CPUs) in one pass; else AVX2's
// 16 registers hold 2 rows x kU chains, so 3-4 rows run as 2 + the rest (the weight row read
// again from L1). The same bits either way.
template <int MR, typename WT>
void fma_row(bool vl, const float* X, const WT* w, float* out, int64_t K) {
  if (vl) {
    fma_rows_vl<MR>(X, w, out, K);
  } else if constexpr (MR > 2) {
    fma_rows<2>(X, w, out, K);
    fma_rows<MR - 2>(X + 2 * K, w, out + 2, K);
  } else {
    fma_rows<MR>(X, w, out, K);
  }
}

// ---- int8, AVX2 CPUs: activations as 16-bit integers (gemv_rows.h int8_rows_i16) -----------

// ---- fp32 rows, more than kMR of them ------------------------------------------------------
// Above 4 rows an fp32 GEMV is compute-bound (the one-weight-row path ran at ~75 GFLOP/s on the
// Zen 5 VM, torch's GEMM no faster): NW = 2 weight rows against up to 8 input rows per pass on
// AVX512 (16 lanes), 4 on AVX2, each activation chunk loaded once for both weight rows
// (bench/gemv.py --formats fp32). WT: fp32 weights, or bf16 ones (fp32 compute on bf16-stored
// weights) widened once per chunk for all the pass's rows.

TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TARGET_AVX512 inline __m512 load16(const uint16_t* p) {  // bf16 -> fp32: the high half
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
TARGET_AVX512 inline __m512 load16(__mmask16 mk, const float* p) {
  return _mm512_maskz_loadu_ps(mk, p);
}
TARGET_AVX512 inline __m512 load16(__mmask16 mk, const uint16_t* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

template <int MR, int NW, typename WT>
TARGET_AVX512 void fp32_rows_avx512(const float* X, int64_t K, const WT* w, float* out0,
                                    float* out1) {
  __m512 acc[NW][MR];
  for (int j = 0; j < NW; ++j)
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // unmasked loads (masks on every load cost 3x on Zen 5)
    __m512 wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load16(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_loadu_ps(X + i * K + k);
      for (int j = 0; j < NW; ++j) acc[j][i] = _mm512_fmadd_ps(xv, wv[j], acc[j][i]);
    }
  }
  if (k < K) {  // the last K % 16 inputs, masked (zeros past the end)
    const __mmask16 mk = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load16(mk, w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, X + i * K + k);
      for (int j = 0; j < NW; ++j) acc[j][i] = _mm512_fmadd_ps(xv, wv[j], acc[j][i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    out0[i] = _mm512_reduce_add_ps(acc[0][i]);
    if constexpr (NW == 2) out1[i] = _mm512_reduce_add_ps(acc[1][i]);
  }
}

template <int NW, typename WT>
void fp32_rows_dispatch(int mr, const float* X, int64_t K, const WT* w, float* o0, float* o1) {
  switch (mr) {
    case 1: fp32_rows_avx512<1, NW>(X, K, w, o0, o1); break;
    case 2: fp32_rows_avx512<2, NW>(X, K, w, o0, o1); break;
    case 3: fp32_rows_avx512<3, NW>(X, K, w, o0, o1); break;
    case 4: fp32_rows_avx512<4, NW>(X, K, w, o0, o1); break;
    case 5: fp32_rows_avx512<5, NW>(X, K, w, o0, o1); break;
    case 6: fp32_rows_avx512<6, NW>(X, K, w, o0, o1); break;
    case 7: fp32_rows_avx512<7, NW>(X, K, w, o0, o1); break;
    default: fp32_rows_avx512<8, NW>(X, K, w, o0, o1); break;
  }
}

// The AVX2 twin (16 ymm registers: up to 4 input rows x 2 weight rows, 8 lanes)
template <int MR, int NW, typename WT>
void fp32_rows_avx2(const float* X, int64_t K, const WT* w, float* out0, float* out1) {
  __m256 acc[NW][MR];
  for (int j = 0; j < NW; ++j)
    for (int i = 0; i < MR; ++i) acc[j][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load8_avx2(w + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(X + i * K + k);
      for (int j = 0; j < NW; ++j) acc[j][i] = _mm256_fmadd_ps(xv, wv[j], acc[j][i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float s0 = gemv_rows::hsum8(acc[0][i]), s1 = 0.f;
    if constexpr (NW == 2) s1 = gemv_rows::hsum8(acc[1][i]);
    for (int64_t t = k; t < K; ++t) {  // the last K % 8 inputs
      s0 += X[i * K + t] * load1(w + t);
      if constexpr (NW == 2) s1 += X[i * K + t] * load1(w + K + t);
    }
    out0[i] = s0;
    if constexpr (NW == 2) out1[i] = s1;
  }
}

template <int NW, typename WT>
void fp32_rows_dispatch_avx2(int mr, const float* X, int64_t K, const WT* w, float* o0,
                             float* o1) {
  switch (mr) {
    case 1: fp32_rows_avx2<1, NW>(X, K, w, o0, o1); break;
    case 2: fp32_rows_avx2<2, NW>(X, K, w, o0, o1); break;
    case 3: fp32_rows_avx2<3, NW>(X, K, w, o0, o1); break;
    default: fp32_rows_avx2<4, NW>(X, K, w, o0, o1); break;
  }
}

// y [M > kMR, N] fp32: weight rows in pairs (an odd last row of a range alone), input rows in
// groups of 8 (AVX512) or 4 (AVX2)
template <typename WT>
void linear_fp32_rows(const float* X, const WT* W, float* Y, int64_t M, int64_t N, int64_t K,
                      bool avx512) {
  const int64_t group = avx512 ? 8 : 4;
  // tiles of output rows (tile_rows; an even count, so the pairs are the untiled loop's)
  const int64_t tile = std::max<int64_t>(2, tile_rows(M, 4 * M * K, sizeof(WT) * K) / 2 * 2);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    float o0[8], o1[8];
    for (int64_t t0 = n0; t0 < n1; t0 += tile)
    for (int64_t m = 0; m < M; m += group)
    for (int64_t n = t0, t1 = std::min(n1, t0 + tile); n < t1; n += 2) {
      const bool pair = n + 1 < t1;
      const int mr = static_cast<int>(std::min<int64_t>(group, M - m));
      const float* xm = X + m * K;
      const WT* wn = W + n * K;
      if (avx512)
        pair ? fp32_rows_dispatch<2>(mr, xm, K, wn, o0, o1)
             : fp32_rows_dispatch<1>(mr, xm, K, wn, o0, o1);
      else
        pair ? fp32_rows_dispatch_avx2<2>(mr, xm, K, wn, o0, o1)
             : fp32_rows_dispatch_avx2<1>(mr, xm, K, wn, o0, o1);
      for (int i = 0; i < mr; ++i) {
        Y[(m + i) * N + n] = o0[i];
        if (pair) Y[(m + i) * N + n + 1] = o1[i];
      }
    }
  });
}

// ---- block FP8, AVX512-VBMI + BF16 --------------------------------------------------------

// 64 bytes, or the first `left` of them and zeros (masked loads only for the last chunk: with a
// mask on every chunk the int8 / FP8 paths ran at a third of the bandwidth on AMD Zen 5)
template <typename B>
TARGET_AVX512_FP8 inline __m512i load64(const B* p, int64_t left) {
  if (left >= 64) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi8((1ull << left) - 1, p);
}

struct Fp8Tables {  // byte tables: e4m3 bits 0..6 -> low / high byte of the exact bf16
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  Fp8Tables() {
    for (int v = 0; v < 128; ++v) {
      const int e = (v >> 3) & 0xF, m = v & 0x7;
      const float f = v == 0x7F ? NAN : e == 0 ? std::ldexp(static_cast<float>(m), -9)
                                               : std::ldexp(1.f + m / 8.f, e - 7);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      const uint16_t b = static_cast<uint16_t>(u >> 16);  // exact: 4 mantissa bits at most
      lo[v] = static_cast<uint8_t>(b & 0xFF);
      hi[v] = static_cast<uint8_t>(b >> 8);
    }
  }
};
const Fp8Tables kFp8;

struct Int8Tables {  // int8 bits 0..6 -> low / high byte of the exact bf16, sign bit clear / set
  alignas(64) uint8_t lo[2][128];
  alignas(64) uint8_t hi[2][128];
  Int8Tables() {
    for (int neg = 0; neg < 2; ++neg)
      for (int v = 0; v < 128; ++v) {
        const float f = static_cast<float>(v - 128 * neg);  // two's complement
        uint32_t u;
        std::memcpy(&u, &f, 4);
        lo[neg][v] = static_cast<uint8_t>((u >> 16) & 0xFF);  // exact: |f| <= 128
        hi[neg][v] = static_cast<uint8_t>(u >> 24);
      }
  }
};
const Int8Tables kInt8;

// 64 int8 bytes -> two vectors of 32 exact bf16 (same lane-interleaved order as fp8x64)
TARGET_AVX512_FP8 inline void int8x64(__m512i raw, const __m512i* t, __m512bh& a, __m512bh& b) {
  const __mmask64 neg = _mm512_movepi8_mask(raw);
  const __m512i lo = _mm512_mask_blend_epi8(neg, _mm512_permutex2var_epi8(t[0], raw, t[1]),
                                            _mm512_permutex2var_epi8(t[2], raw, t[3]));
  const __m512i hi = _mm512_mask_blend_epi8(neg, _mm512_permutex2var_epi8(t[4], raw, t[5]),
                                            _mm512_permutex2var_epi8(t[6], raw, t[7]));
  a = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
  b = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

// the byte tables of int8x64 in registers
TARGET_AVX512_FP8 inline void int8_tables(__m512i* t) {
  for (int j = 0; j < 2; ++j) {
    t[2 * j] = _mm512_load_si512(kInt8.lo[j]);
    t[2 * j + 1] = _mm512_load_si512(kInt8.lo[j] + 64);
    t[4 + 2 * j] = _mm512_load_si512(kInt8.hi[j]);
    t[4 + 2 * j + 1] = _mm512_load_si512(kInt8.hi[j] + 64);
  }
}

// acc[i][0 / 1] += the 64-input chunk's products (x row i at Xp + i * Kp, in permute64's order)
template <int MR>
TARGET_AVX512_FP8 inline void dp_chunk(__m512 (*acc)[2], const uint16_t* Xp, int64_t Kp,
                                       __m512bh wa, __m512bh wb) {
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(Xp + i * Kp), wa);
    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(Xp + i * Kp + 32), wb);
  }
}

template <int MR>
TARGET_AVX512_FP8 void int8_row_table(const uint16_t* Xp, int64_t Kp, const int8_t* w, int64_t K,
                                      float* out) {
  __m512i t[8];
  int8_tables(t);
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kInt8Prefetch, _MM_HINT_T0);
    __m512bh wa, wb;
    int8x64(load64(w + k, K - k), t, wa, wb);
    dp_chunk<MR>(acc, Xp + k, Kp, wa, wb);
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

// More than kMR rows: weight rows converted once into bf16 buffers [Kp] (int8x64's order), two
// at a time against each group of rows (for_row_pairs)
TARGET_AVX512_FP8 void int8_row_to_bf16(const int8_t* w, int64_t K, uint16_t* wbuf) {
  __m512i t[8];
  int8_tables(t);
  for (int64_t k = 0; k < K; k += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kInt8Prefetch, _MM_HINT_T0);
    __m512bh wa, wb;
    int8x64(load64(w + k, K - k), t, wa, wb);
    _mm512_storeu_si512(wbuf + k, (__m512i)wa);
    _mm512_storeu_si512(wbuf + k + 32, (__m512i)wb);
  }
}

// a0 / a1 [MR][2] += the products of the 64-input chunk of two converted weight rows (bf16 in
// permute64's order) with MR activation rows, each activation chunk loaded once for both
template <int MR>
TARGET_AVX512_FP8 inline void dp_chunk2(__m512 (*a0)[2], __m512 (*a1)[2], const uint16_t* Xp,
                                        int64_t Kp, const uint16_t* w0, const uint16_t* w1) {
  const __m512bh w0a = (__m512bh)_mm512_loadu_si512(w0);
  const __m512bh w0b = (__m512bh)_mm512_loadu_si512(w0 + 32);
  const __m512bh w1a = (__m512bh)_mm512_loadu_si512(w1);
  const __m512bh w1b = (__m512bh)_mm512_loadu_si512(w1 + 32);
  for (int i = 0; i < MR; ++i) {
    const __m512bh xa = (__m512bh)_mm512_loadu_si512(Xp + i * Kp);
    const __m512bh xb = (__m512bh)_mm512_loadu_si512(Xp + i * Kp + 32);
    a0[i][0] = _mm512_dpbf16_ps(a0[i][0], xa, w0a);
    a0[i][1] = _mm512_dpbf16_ps(a0[i][1], xb, w0b);
    a1[i][0] = _mm512_dpbf16_ps(a1[i][0], xa, w1a);
    a1[i][1] = _mm512_dpbf16_ps(a1[i][1], xb, w1b);
  }
}

// two converted weight rows against a group of MR rows: each activation chunk loaded once for
// both (the buffered path is bound by loads); per (row, weight row) int8_row_table's arithmetic
// (same chunks, accumulators and sums: bitwise its results, so a row's output does not depend on
// the batch)
template <int MR>
TARGET_AVX512_FP8 void bf16buf_row2(const uint16_t* Xp, int64_t Kp, const uint16_t* w0,
                                    const uint16_t* w1, int64_t K, float* out0, float* out1) {
  __m512 a0[MR][2], a1[MR][2];
  for (int i = 0; i < MR; ++i) a0[i][0] = a0[i][1] = a1[i][0] = a1[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) dp_chunk2<MR>(a0, a1, Xp + k, Kp, w0 + k, w1 + k);
  for (int i = 0; i < MR; ++i) {
    out0[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i][0], a0[i][1]));
    out1[i] = _mm512_reduce_add_ps(_mm512_add_ps(a1[i][0], a1[i][1]));
  }
}

// 64 FP8 bytes -> two vectors of 32 bf16 (in the lane-interleaved order of `permute64`)
TARGET_AVX512_FP8 inline void fp8x64(__m512i raw, __m512i tlo0, __m512i tlo1, __m512i thi0,
                                     __m512i thi1, __m512bh& a, __m512bh& b) {
  const __m512i lo = _mm512_permutex2var_epi8(tlo0, raw, tlo1);  // bit 7 (sign) is ignored
  __m512i hi = _mm512_permutex2var_epi8(thi0, raw, thi1);
  hi = _mm512_or_si512(hi, _mm512_and_si512(raw, _mm512_set1_epi8(static_cast<char>(0x80))));
  a = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
  b = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

// x [K] bf16 -> the order fp8x64 produces, per 64-input chunk, zero-padded to whole chunks
void permute64(const uint16_t* x, uint16_t* out, int64_t K) {
  const int64_t chunks = (K + 63) / 64;
  for (int64_t c = 0; c < chunks; ++c)
    for (int half = 0; half < 2; ++half)
      for (int lane = 0; lane < 4; ++lane)
        for (int j = 0; j < 8; ++j) {
          const int64_t src = c * 64 + lane * 16 + half * 8 + j;
          out[c * 64 + half * 32 + lane * 8 + j] = src < K ? x[src] : 0;
        }
}

// bf16 rows x [M, K] -> [M, Kp] in permute64's order (Kp: K rounded up to whole 64-chunks)
std::vector<uint16_t> permuted_rows(const torch::Tensor& x, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<uint16_t> xp(M * Kp);
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  for (int64_t m = 0; m < M; ++m) permute64(X + m * K, xp.data() + m * Kp, K);
  return xp;
}

// one output row: per input block of bi (a multiple of 64), the exact bf16 products summed in
// fp32, then scaled by the block's scale; srow = the row's scales [ceil(K / bi)]
template <int MR>
TARGET_AVX512_FP8 void fp8_row(const uint16_t* Xp, int64_t Kp, const uint8_t* w, int64_t K,
                               const float* srow, int64_t bi, float* out) {
  const __m512i tlo0 = _mm512_load_si512(kFp8.lo), tlo1 = _mm512_load_si512(kFp8.lo + 64);
  const __m512i thi0 = _mm512_load_si512(kFp8.hi), thi1 = _mm512_load_si512(kFp8.hi + 64);
  __m512 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm512_setzero_ps();
  const int64_t nbi = (K + bi - 1) / bi;
  for (int64_t blk = 0; blk < nbi; ++blk) {
    const int64_t k0 = blk * bi, k1 = std::min(K, k0 + bi);
    __m512 acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 64) {
      __m512bh wa, wb;
      fp8x64(load64(w + k, k1 - k), tlo0, tlo1, thi0, thi1, wa, wb);
      for (int i = 0; i < MR; ++i) {
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(Xp + i * Kp + k), wa);
        acc[i][1] =
            _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(Xp + i * Kp + k + 32), wb);
      }
    }
    const __m512 s = _mm512_set1_ps(srow[blk]);
    for (int i = 0; i < MR; ++i) tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[i][0], acc[i][1]), s, tot[i]);
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(tot[i]);
}

// More than kMR rows: two weight rows converted once into bf16 buffers (fp8x64's order), then
// each group of rows against both, with fp8_row's arithmetic per (row, weight row): same chunks,
// accumulators, block scaling and sums, so every row's result is bitwise what it gets alone.
TARGET_AVX512_FP8 void fp8_row_to_bf16(const uint8_t* w, int64_t K, uint16_t* wbuf) {
  const __m512i tlo0 = _mm512_load_si512(kFp8.lo), tlo1 = _mm512_load_si512(kFp8.lo + 64);
  const __m512i thi0 = _mm512_load_si512(kFp8.hi), thi1 = _mm512_load_si512(kFp8.hi + 64);
  for (int64_t k = 0; k < K; k += 64) {
    __m512bh wa, wb;
    fp8x64(load64(w + k, K - k), tlo0, tlo1, thi0, thi1, wa, wb);
    _mm512_storeu_si512(wbuf + k, (__m512i)wa);
    _mm512_storeu_si512(wbuf + k + 32, (__m512i)wb);
  }
}

template <int MR>
TARGET_AVX512_FP8 void fp8buf_row2(const uint16_t* Xp, int64_t Kp, const uint16_t* w0,
                                   const uint16_t* w1, int64_t K, const float* s0,
                                   const float* s1, int64_t bi, float* out0, float* out1) {
  __m512 t0[MR], t1[MR];
  for (int i = 0; i < MR; ++i) t0[i] = t1[i] = _mm512_setzero_ps();
  const int64_t nbi = (K + bi - 1) / bi;
  for (int64_t blk = 0; blk < nbi; ++blk) {
    const int64_t k0 = blk * bi, k1 = std::min(K, k0 + bi);
    __m512 a0[MR][2], a1[MR][2];
    for (int i = 0; i < MR; ++i) a0[i][0] = a0[i][1] = a1[i][0] = a1[i][1] = _mm512_setzero_ps();
    // dp_chunk2's step written out: through the helper this loop measured 15-20% slower (GCC
    // 12, 30 of 32 vector registers live at MR = 4)
    for (int64_t k = k0; k < k1; k += 64) {
      const __m512bh w0a = (__m512bh)_mm512_loadu_si512(w0 + k);
      const __m512bh w0b = (__m512bh)_mm512_loadu_si512(w0 + k + 32);
      const __m512bh w1a = (__m512bh)_mm512_loadu_si512(w1 + k);
      const __m512bh w1b = (__m512bh)_mm512_loadu_si512(w1 + k + 32);
      for (int i = 0; i < MR; ++i) {
        const __m512bh xa = (__m512bh)_mm512_loadu_si512(Xp + i * Kp + k);
        const __m512bh xb = (__m512bh)_mm512_loadu_si512(Xp + i * Kp + k + 32);
        a0[i][0] = _mm512_dpbf16_ps(a0[i][0], xa, w0a);
        a0[i][1] = _mm512_dpbf16_ps(a0[i][1], xb, w0b);
        a1[i][0] = _mm512_dpbf16_ps(a1[i][0], xa, w1a);
        a1[i][1] = _mm512_dpbf16_ps(a1[i][1], xb, w1b);
      }
    }
    const __m512 c0 = _mm512_set1_ps(s0[blk]), c1 = _mm512_set1_ps(s1[blk]);
    for (int i = 0; i < MR; ++i) {
      t0[i] = _mm512_fmadd_ps(_mm512_add_ps(a0[i][0], a0[i][1]), c0, t0[i]);
      t1[i] = _mm512_fmadd_ps(_mm512_add_ps(a1[i][0], a1[i][1]), c1, t1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    out0[i] = _mm512_reduce_add_ps(t0[i]);
    out1[i] = _mm512_reduce_add_ps(t1[i]);
  }
}

// ---- block FP8 via fp16 bits, AVX512 (F + BW + VL) --------------------------------------
// e4m3 -> fp16 is a bit move (as fp8_cpu.cpp's AVX2 path): sign-extend the byte to 16 bits,
// shift left by 7 and clear bit 14: the fp16 value is the e4m3 value times 2^-8, subnormals
// included, and converts exactly to fp32 (vcvtph2ps); the 2^8 goes into the block scale. Weights
// stay in their natural order, so fp32 rows need no permutation. Taken on AVX512 CPUs without
// VBMI + BF16 (quant/matmul.py fp8_linear); where both run the byte tables measured faster.

// 32 e4m3 bytes -> two vectors of 16 fp32 (value * 2^-8), in order
TARGET_AVX512 inline void fp8x32_cvt(__m256i raw, __m512& lo, __m512& hi) {
  const __m512i h = _mm512_cvtepi8_epi16(raw);  // bit 15 = sign, bits 7..0 = the byte
  const __m512i f16 = _mm512_and_si512(_mm512_slli_epi16(h, 7),
                                       _mm512_set1_epi16(static_cast<int16_t>(0xBFFF)));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(f16));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(f16, 1));
}

template <int MR>
TARGET_AVX512 void fp8_row_cvt(const float* X, int64_t K, const uint8_t* w, const float* srow,
                               int64_t bi, float* out) {
  constexpr int U = MR <= 2 ? 2 : 1;  // 32-weight chunks an iteration: >= 4 FMA chains
  __m512 tot[MR];
  for (int i = 0; i < MR; ++i) tot[i] = _mm512_setzero_ps();
  const int64_t nbi = (K + bi - 1) / bi;
  for (int64_t blk = 0; blk < nbi; ++blk) {
    const int64_t k0 = blk * bi, k1 = std::min(K, k0 + bi);
    __m512 acc[MR][2 * U];
    for (int i = 0; i < MR; ++i)
      for (int u = 0; u < 2 * U; ++u) acc[i][u] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k + 32 * u;
        if (kk >= k1) break;
        __m512 lo, hi;
        if (kk + 32 <= k1) {  // unmasked loads: masked ones measured slower (Zen 5)
          fp8x32_cvt(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + kk)), lo, hi);
          for (int i = 0; i < MR; ++i) {
            const float* xi = X + i * K + kk;
            acc[i][2 * u] = _mm512_fmadd_ps(_mm512_loadu_ps(xi), lo, acc[i][2 * u]);
            acc[i][2 * u + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 16), hi, acc[i][2 * u + 1]);
          }
          continue;
        }
        const __mmask32 mk = static_cast<__mmask32>((1u << (k1 - kk)) - 1);
        fp8x32_cvt(_mm256_maskz_loadu_epi8(mk, w + kk), lo, hi);
        const __mmask16 m0 = static_cast<__mmask16>(mk), m1 = static_cast<__mmask16>(mk >> 16);
        for (int i = 0; i < MR; ++i) {
          const float* xi = X + i * K + kk;
          acc[i][2 * u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, xi), lo, acc[i][2 * u]);
          acc[i][2 * u + 1] =
              _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, xi + 16), hi, acc[i][2 * u + 1]);
        }
      }
    const __m512 sc = _mm512_set1_ps(srow[blk] * 256.f);  // exact: a power of two
    for (int i = 0; i < MR; ++i) {
      __m512 a = acc[i][0];
      for (int u = 1; u < 2 * U; ++u) a = _mm512_add_ps(a, acc[i][u]);
      tot[i] = _mm512_fmadd_ps(a, sc, tot[i]);
    }
  }
  for (int i = 0; i < MR; ++i) out[i] = _mm512_reduce_add_ps(tot[i]);
}

void check_x(const torch::Tensor& x, const torch::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.size(1) == K && x.is_contiguous(),
              "x: [M <= 16, K] contiguous");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "w: [N, K] contiguous");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
}

}  // namespace

// y [M, N] = x [M, K] @ w [N, K] bf16 ^T in x's dtype. bf16 x: AVX512-BF16 CPUs multiply the
// pairs directly; avx2_only takes the path of CPUs without it (tests and benchmarks run both on
// one machine). fp32 x (fp32 compute on bf16-stored weights, `--quantization bf16`): every CPU
// widens the weights and FMAs in fp32, the rows as given.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, bool avx2_only) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, w, K);
  const bool rows32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK((rows32 || x.scalar_type() == at::kBFloat16) && w.scalar_type() == at::kBFloat16,
              "linear_bf16: bf16 w, bf16 or fp32 x");
  auto y = torch::empty({M, N}, x.options());
  const auto* W = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const bool vl = !avx2_only && cpu_avx512();
  if (rows32) {
    const float* X = x.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    if (M > kMR) {  // compute-bound: linear_fp32's pairs of weight rows, widened once a pass
      linear_fp32_rows(X, W, Y, M, N, K, vl);
      return y;
    }
    for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, fma_row, vl, X + m * K, W + n * K, out, K);
    }, [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v; });
    return y;
  }
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* Y = y.data_ptr<at::BFloat16>();
  const auto store = [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v; };
  if (!avx2_only && cpu_avx512_bf16()) {
    if (M >= kTiledMinRows) {  // (the same bits as for_rows' passes)
      bf16_rows_tiled(X, W, M, N, K, store);
      return y;
    }
    for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, bf16_row_avx512, X + m * K, W + n * K, out, K);
    }, store, tile_rows(M, 2 * M * K, 2 * K));
    return y;
  }
  const auto xf = x.to(at::kFloat);
  const float* XF = xf.data_ptr<float>();
  for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
    DISPATCH_MR(mr, fma_row, vl, XF + m * K, W + n * K, out, K);
  }, store, tile_rows(M, 4 * M * K, 2 * K));
  return y;
}

// y [M, N] fp32 = x [M, K] fp32 @ w [N, K] fp32 ^T (4 bytes a weight, so the AVX2 FMA path
// already streams faster than the memory delivers)
torch::Tensor linear_fp32(const torch::Tensor& x, const torch::Tensor& w, bool avx2_only) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, w, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "linear_fp32: fp32 x and w");
  auto y = torch::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  if (M > kMR) {  // (rows computed here differ from the same rows computed alone)
    linear_fp32_rows(X, W, Y, M, N, K, !avx2_only && cpu_avx512());
    return y;
  }
  const bool vl = !avx2_only && cpu_avx512();
  for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
    DISPATCH_MR(mr, fma_row, vl, X + m * K, W + n * K, out, K);
  }, [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v; });
  return y;
}

// y [M, N] (x's dtype) = x [M, K] @ (q [N, K] int8 * scale [N])^T
torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& q,
                          const torch::Tensor& scale, bool avx2_only) {
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1);
  check_x(x, q, K);
  TORCH_CHECK(q.scalar_type() == at::kChar, "linear_int8: q must be int8");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.is_contiguous() &&
                  scale.scalar_type() == x.scalar_type(),
              "linear_int8: scale [N] in x's dtype");
  auto y = torch::empty({M, N}, x.options());
  const auto* W = q.data_ptr<int8_t>();
  if (!avx2_only && x.scalar_type() == at::kBFloat16 && cpu_avx512_fp8()) {
    // exact bf16 weights from byte tables + vdpbf16ps (the activations permuted like FP8's)
    const int64_t Kp = (K + 63) / 64 * 64;
    const std::vector<uint16_t> xp = permuted_rows(x, Kp);
    auto* Y = y.data_ptr<at::BFloat16>();
    const auto* S = scale.data_ptr<at::BFloat16>();
    const auto store = [&](int64_t m, int64_t n, float v) {
      Y[m * N + n] = v * static_cast<float>(S[n]);
    };
    const auto row = [&](int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, int8_row_table, xp.data() + m * Kp, Kp, W + n * K, K, out);
    };
    if (M <= kMR) {
      for_rows(M, N, row, store);
      return y;
    }
    for_row_pairs(M, N, Kp, [&](int64_t n, uint16_t* buf) { int8_row_to_bf16(W + n * K, K, buf); },
                  [&](int64_t n, int64_t m, int mr, const uint16_t* w0, const uint16_t* w1,
                      float* o0, float* o1) {
                    DISPATCH_MR(mr, bf16buf_row2, xp.data() + m * Kp, Kp, w0, w1, K, o0, o1);
                  }, row, store);
    return y;
  }
  const auto xf = x.to(at::kFloat).contiguous();
  const float* XF = xf.data_ptr<float>();
  const bool vl = !avx2_only && cpu_avx512();
  const gemv_rows::RowsI16 xq = vl ? gemv_rows::RowsI16{} : gemv_rows::quantize_rows_i16(XF, M, K);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "linear_int8", [&] {
    auto* Y = y.data_ptr<scalar_t>();
    const auto* S = scale.data_ptr<scalar_t>();
    for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
      if (vl) {
        DISPATCH_MR(mr, fma_row, vl, XF + m * K, W + n * K, out, K);
      } else {
        DISPATCH_MR(mr, gemv_rows::int8_rows_i16, xq, m, W + n * K, out);
      }
    }, [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v * static_cast<float>(S[n]); },
    tile_rows(M, (vl ? 4 : 2) * M * K, K));
  });
  return y;
}

// ---- several products of one shape in one call (a MoE layer's picked experts) ---------------
// [x_c @ w_c^T] with every x_c [M_c <= 4, K] and w_c [N, K] of one N, K and dtype, stacked in
// one y [sum M_c, N] (product c's rows after product c - 1's: the caller's next op takes them
// all at once): each output row computed as linear_bf16 / linear_int8 compute it (the same
// bits), all products' rows in one parallel_for: one fork / join instead of one a product, and
// the threads stream on from one matrix to the next.
namespace {

std::vector<int64_t> check_many(const std::vector<torch::Tensor>& xs,
                                const std::vector<torch::Tensor>& ws, const char* name) {
  TORCH_CHECK(!xs.empty() && xs.size() == ws.size(), name, ": as many x as weights");
  const int64_t N = ws[0].size(0), K = ws[0].size(1);
  std::vector<int64_t> M;
  for (size_t c = 0; c < xs.size(); ++c) {
    check_x(xs[c], ws[c], K);
    TORCH_CHECK(ws[c].size(0) == N && ws[c].scalar_type() == ws[0].scalar_type() &&
                    xs[c].scalar_type() == xs[0].scalar_type() && xs[c].size(0) >= 1 &&
                    xs[c].size(0) <= kMR,
                name, ": weights of one shape and dtype, x of one dtype and 1 to 4 rows");
    M.push_back(xs[c].size(0));
  }
  return M;
}

// each tensor's data pointer, read once before the rows' loop: Tensor::data_ptr() checks the
// dtype and the copy-on-write state on every call, which per output row cost a MoE layer's int8
// down projections (2,048 rows of 512 a product) a third of their time
template <typename T>
std::vector<T*> data_ptrs(const std::vector<torch::Tensor>& ts) {
  std::vector<T*> p;
  for (const auto& t : ts) p.push_back(static_cast<T*>(t.data_ptr()));
  return p;
}

// the first output row of each product in the stacked y, and y's row count last
std::vector<int64_t> row_starts(const std::vector<int64_t>& M) {
  std::vector<int64_t> start{0};
  for (int64_t m : M) start.push_back(start.back() + m);
  return start;
}

}  // namespace

torch::Tensor linear_bf16_many(const std::vector<torch::Tensor>& xs,
                               const std::vector<torch::Tensor>& ws, bool avx2_only) {
  const std::vector<int64_t> M = check_many(xs, ws, "linear_bf16_many");
  const bool rows32 = xs[0].scalar_type() == at::kFloat;  // fp32 compute on bf16 weights
  TORCH_CHECK((rows32 || xs[0].scalar_type() == at::kBFloat16) &&
                  ws[0].scalar_type() == at::kBFloat16,
              "linear_bf16_many: bf16 w, bf16 or fp32 x");
  const int64_t C = xs.size(), N = ws[0].size(0), K = ws[0].size(1);
  const std::vector<int64_t> start = row_starts(M);
  torch::Tensor y = torch::empty({start[C], N}, xs[0].options());
  std::vector<torch::Tensor> xf;
  const std::vector<const uint16_t*> W = data_ptrs<const uint16_t>(ws);
  const bool avx512 = !rows32 && !avx2_only && cpu_avx512_bf16();
  for (int64_t c = 0; c < C; ++c) xf.push_back(avx512 || rows32 ? xs[c] : xs[c].to(at::kFloat));
  auto* Y = rows32 ? nullptr : y.data_ptr<at::BFloat16>();
  float* Y32 = rows32 ? y.data_ptr<float>() : nullptr;
  const auto store = [&](int64_t c, int64_t m, int64_t n, float v) {
    if (rows32)
      Y32[(start[c] + m) * N + n] = v;
    else
      Y[(start[c] + m) * N + n] = v;
  };
  if (avx512) {
    const std::vector<const uint16_t*> X = data_ptrs<const uint16_t>(xs);
    for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, bf16_row_avx512, X[c] + m * K, W[c] + n * K, out, K);
    }, store);
  } else {
    const bool vl = !avx2_only && cpu_avx512();
    const std::vector<const float*> X = data_ptrs<const float>(xf);
    for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, fma_row, vl, X[c] + m * K, W[c] + n * K, out, K);
    }, store);
  }
  return y;
}

torch::Tensor linear_int8_many(const std::vector<torch::Tensor>& xs,
                               const std::vector<torch::Tensor>& qs,
                               const std::vector<torch::Tensor>& scales, bool avx2_only) {
  const std::vector<int64_t> M = check_many(xs, qs, "linear_int8_many");
  const int64_t C = xs.size(), N = qs[0].size(0), K = qs[0].size(1);
  TORCH_CHECK(qs[0].scalar_type() == at::kChar && scales.size() == xs.size(),
              "linear_int8_many: int8 weights, one scale [N] each");
  for (const auto& sc : scales)
    TORCH_CHECK(sc.dim() == 1 && sc.size(0) == N && sc.is_contiguous() &&
                    sc.scalar_type() == xs[0].scalar_type(),
                "linear_int8_many: scale [N] in x's dtype");
  const std::vector<int64_t> start = row_starts(M);
  torch::Tensor y = torch::empty({start[C], N}, xs[0].options());
  const std::vector<const int8_t*> Q = data_ptrs<const int8_t>(qs);
  if (!avx2_only && xs[0].scalar_type() == at::kBFloat16 && cpu_avx512_fp8()) {
    const int64_t Kp = (K + 63) / 64 * 64;
    std::vector<std::vector<uint16_t>> xp;
    for (int64_t c = 0; c < C; ++c) xp.push_back(permuted_rows(xs[c], Kp));
    auto* Y = y.data_ptr<at::BFloat16>();
    const std::vector<const at::BFloat16*> S = data_ptrs<const at::BFloat16>(scales);
    for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, int8_row_table, xp[c].data() + m * Kp, Kp, Q[c] + n * K, K, out);
    }, [&](int64_t c, int64_t m, int64_t n, float v) {
      Y[(start[c] + m) * N + n] = v * static_cast<float>(S[c][n]);
    });
    return y;
  }
  std::vector<torch::Tensor> xf;
  for (int64_t c = 0; c < C; ++c) xf.push_back(xs[c].to(at::kFloat).contiguous());
  const bool vl = !avx2_only && cpu_avx512();
  std::vector<gemv_rows::RowsI16> xq;  // (AVX2: the rows quantised, as linear_int8 does)
  for (int64_t c = 0; c < C && !vl; ++c)
    xq.push_back(gemv_rows::quantize_rows_i16(xf[c].data_ptr<float>(), M[c], K));
  const std::vector<const float*> X = data_ptrs<const float>(xf);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xs[0].scalar_type(), "linear_int8_many", [&] {
    auto* Y = y.data_ptr<scalar_t>();
    const std::vector<const scalar_t*> S = data_ptrs<const scalar_t>(scales);
    for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
      if (vl) {
        DISPATCH_MR(mr, fma_row, vl, X[c] + m * K, Q[c] + n * K, out, K);
      } else {
        DISPATCH_MR(mr, gemv_rows::int8_rows_i16, xq[c], m, Q[c] + n * K, out);
      }
    }, [&](int64_t c, int64_t m, int64_t n, float v) {
      Y[(start[c] + m) * N + n] = v * static_cast<float>(S[c][n]);
    });
  });
  return y;
}

bool fp8_supported(int64_t bi) { return cpu_avx512_fp8() && bi % 64 == 0; }
bool fp8_cvt_supported() { return cpu_avx512(); }

// y [M, N] bf16 = x [M, K] bf16 @ dequant(w [N, K] e4m3, scale [ceil(N/bo), ceil(K/bi)] fp32)^T
// cvt = false: the byte tables (callers check fp8_supported(bi) first); cvt = true: the fp16-bit
// path (fp8_cvt_supported(), any block size)
namespace {

// linear_fp8 / linear_fp8_many's inputs: the path this CPU runs, bf16 x, one-byte w [N, K], and
// its fp32 block scale [ceil(N/bo), ceil(K/bi)]
void check_fp8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
               int64_t bo, int64_t bi, bool cvt, const char* name) {
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(cvt ? fp8_cvt_supported() : fp8_supported(bi), name,
              cvt ? ": the fp16-bit path needs AVX512 (F, BW, VL, DQ)"
                  : ": needs AVX512-VBMI + BF16 and bi % 64 == 0");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.element_size() == 1, name, ": x bf16, w fp8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == (N + bo - 1) / bo && scale.size(1) == (K + bi - 1) / bi,
              name, ": scale [ceil(N/bo), ceil(K/bi)] fp32 contiguous");
}

}  // namespace

torch::Tensor linear_fp8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                         int64_t bo, int64_t bi, bool cvt) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, w, K);
  check_fp8(x, w, scale, bo, bi, cvt, "linear_fp8");
  auto y = torch::empty({M, N}, x.options());
  auto* Y = y.data_ptr<at::BFloat16>();
  const auto* W = reinterpret_cast<const uint8_t*>(w.data_ptr());
  const float* S = scale.data_ptr<float>();
  const int64_t nbi = scale.size(1);
  const auto store = [&](int64_t m, int64_t n, float v) { Y[m * N + n] = v; };
  if (cvt) {
    const auto xf = x.to(at::kFloat);  // exact
    const float* XF = xf.data_ptr<float>();
    for_rows(M, N, [&](int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, fp8_row_cvt, XF + m * K, K, W + n * K, S + (n / bo) * nbi, bi, out);
    }, store);
    return y;
  }
  const int64_t Kp = (K + 63) / 64 * 64;
  const std::vector<uint16_t> xp = permuted_rows(x, Kp);
  const auto row = [&](int64_t n, int64_t m, int mr, float* out) {
    DISPATCH_MR(mr, fp8_row, xp.data() + m * Kp, Kp, W + n * K, K, S + (n / bo) * nbi, bi, out);
  };
  if (M <= kMR) {
    for_rows(M, N, row, store);
    return y;
  }
  for_row_pairs(M, N, Kp, [&](int64_t n, uint16_t* buf) { fp8_row_to_bf16(W + n * K, K, buf); },
                [&](int64_t n, int64_t m, int mr, const uint16_t* w0, const uint16_t* w1, float* o0,
                    float* o1) {
                  DISPATCH_MR(mr, fp8buf_row2, xp.data() + m * Kp, Kp, w0, w1, K,
                              S + (n / bo) * nbi, S + ((n + 1) / bo) * nbi, bi, o0, o1);
                }, row, store);
  return y;
}

// [linear_fp8(x_c, w_c, scale_c)] stacked [sum M_c, N], every x_c [M_c <= 4, K] bf16, every
// w_c [N, K] fp8 with its scale of one shape: each row as linear_fp8 computes it (the same
// bits), all products' rows in one parallel_for (a MoE layer's picked FP8 experts).
torch::Tensor linear_fp8_many(const std::vector<torch::Tensor>& xs,
                              const std::vector<torch::Tensor>& ws,
                              const std::vector<torch::Tensor>& scales, int64_t bo, int64_t bi,
                              bool cvt) {
  const std::vector<int64_t> M = check_many(xs, ws, "linear_fp8_many");
  const int64_t C = xs.size(), N = ws[0].size(0), K = ws[0].size(1);
  TORCH_CHECK(scales.size() == xs.size(), "linear_fp8_many: one scale each");
  for (int64_t c = 0; c < C; ++c)
    check_fp8(xs[c], ws[c], scales[c], bo, bi, cvt, "linear_fp8_many");
  const std::vector<int64_t> start = row_starts(M);
  torch::Tensor y = torch::empty({start[C], N}, xs[0].options());
  auto* Y = y.data_ptr<at::BFloat16>();
  const int64_t nbi = scales[0].size(1);
  const std::vector<const uint8_t*> Ws = data_ptrs<const uint8_t>(ws);
  const std::vector<const float*> Ss = data_ptrs<const float>(scales);
  const auto W = [&](int64_t c) { return Ws[c]; };
  const auto S = [&](int64_t c, int64_t n) { return Ss[c] + (n / bo) * nbi; };
  const auto store = [&](int64_t c, int64_t m, int64_t n, float v) {
    Y[(start[c] + m) * N + n] = v;
  };
  if (cvt) {
    std::vector<torch::Tensor> xf;
    for (const auto& x : xs) xf.push_back(x.to(at::kFloat));  // exact
    const std::vector<const float*> X = data_ptrs<const float>(xf);
    for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
      DISPATCH_MR(mr, fp8_row_cvt, X[c] + m * K, K, W(c) + n * K, S(c, n), bi, out);
    }, store);
    return y;
  }
  const int64_t Kp = (K + 63) / 64 * 64;
  std::vector<std::vector<uint16_t>> xp;
  for (const auto& x : xs) xp.push_back(permuted_rows(x, Kp));
  for_rows_many(C, M, N, [&](int64_t c, int64_t n, int64_t m, int mr, float* out) {
    DISPATCH_MR(mr, fp8_row, xp[c].data() + m * Kp, Kp, W(c) + n * K, K, S(c, n), bi, out);
  }, store);
  return y;
}

// ---- a MoE block's decode step in one call (bf16) --------------------------------------------
// layers/moe.py SparseMoE.forward for a few bf16 rows with plain bf16 weights, its ops in its
// order and rounded where its bf16 tensors round (logits, routing weights, every product,
// silu(gate), silu * up, sigmoid(gate), the weighted shared output, the final sum), in three
// passes over the weights: (router, shared gate, shared gate_up), (the picked experts' gate_up),
// (their down, shared down), each one parallel_for over all its products' output rows; the
// routing, sort by expert, SwiGLU and weighted sums between them on the calling thread. The
// routing is the reference's (softmax over the logits in fp32, top-k, renormalised) with ties
// going to the lower expert id; the routed pairs are summed per token in fp32 (the reference adds
// them in bf16 one by one, in expert order: this rounds once). A row's products are linear_bf16's
// bits for that row whichever rows share the step (batched == alone). PyTorch twin: the module
// with backend None (tests/test_moe_cpu.py).
namespace {

struct Product {  // Y [M, N] (bf16) = X [M, K] @ W [N, K] ^T; XF: X widened (FMA paths)
  const uint16_t* X;
  const float* XF;
  int64_t M;
  const uint16_t* W;
  int64_t N, K;
  uint16_t* Y;
};

inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // rounded to nearest even
inline float round_bf16(float v) { return bf16_to_float(bf16_bits(v)); }

void run_products(const std::vector<Product>& ps, bool dpbf16, bool vl) {
  std::vector<int64_t> end;
  int64_t total = 0;
  for (const auto& p : ps) end.push_back(total += p.N);
  at::parallel_for(0, total, 64, [&](int64_t i0, int64_t i1) {
    float out[kMR];
    size_t c = std::upper_bound(end.begin(), end.end(), i0) - end.begin();
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= end[c]) ++c;
      const Product& p = ps[c];
      const int64_t n = i - (end[c] - p.N), K = p.K;
      for (int64_t m = 0; m < p.M; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, p.M - m));
        if (dpbf16) {
          DISPATCH_MR(mr, bf16_row_avx512, p.X + m * K, p.W + n * K, out, K);
        } else {
          DISPATCH_MR(mr, fma_row, vl, p.XF + m * K, p.W + n * K, out, K);
        }
        for (int r = 0; r < mr; ++r) p.Y[(m + r) * p.N + n] = bf16_bits(out[r]);
      }
    }
  });
}

// rows of bf16 bits, widened to fp32 beside them where the FMA paths read them
struct Buf {
  std::vector<uint16_t> b;
  std::vector<float> f;
  Buf(int64_t n, bool widen) : b(n), f(widen ? n : 0) {}
  void widen() {
    for (size_t i = 0; i < f.size(); ++i) f[i] = bf16_to_float(b[i]);
  }
  const float* fp(int64_t off) const { return f.empty() ? nullptr : f.data() + off; }
};

void check_bf16(const torch::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK(t.dim() == dim && t.scalar_type() == at::kBFloat16 && t.is_contiguous() &&
                  t.device().is_cpu(),
              "moe_bf16: ", what, " must be a contiguous ", dim, "-D bf16 CPU tensor");
}

// The routing of T rows of router logits [T, E] (the model dtype's values): softmax in fp32,
// the top k (ties: the lower id), renormalised; round(w) gives the weights in the model dtype.
// The T * k (token, choice) pairs sorted by expert (stable, so each expert's rows are in token
// order): each sorted pair's token and weight, and the runs of pairs one expert takes.
struct Routing {
  struct Run {
    int64_t expert, first, count;  // the run's sorted pairs [first, first + count)
  };
  std::vector<int64_t> token;
  std::vector<float> weight;
  std::vector<Run> runs;
};

template <typename Round>
Routing route_rows(const float* logits, int64_t T, int64_t E, int64_t k, Round&& round) {
  std::vector<int64_t> expert(T * k), order(T * k);  // (by pair t * k + j)
  std::vector<float> weight(T * k), p(E);
  std::vector<char> taken(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    float mx = -INFINITY, sum = 0.f, top = 0.f;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(l[e] - mx));
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
      taken[best] = 1;
      expert[t * k + j] = best;
      top += (weight[t * k + j] = p[best] / sum);
    }
    for (int64_t j = 0; j < k; ++j) weight[t * k + j] = round(weight[t * k + j] / top);
  }
  for (int64_t q = 0; q < T * k; ++q) order[q] = q;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return expert[a] < expert[b]; });
  Routing r;
  for (int64_t q = 0; q < T * k; ++q) {
    const int64_t pair = order[q], e = expert[pair];
    r.token.push_back(pair / k);
    r.weight.push_back(weight[pair]);
    if (r.runs.empty() || r.runs.back().expert != e) r.runs.push_back({e, q, 0});
    ++r.runs.back().count;
  }
  return r;
}

// acc [T, H] += round(ys[q] * w[q]) for every sorted pair q of token[q] (ys rows in sort order,
// T: the element type, bf16 bits as uint16_t or float; round: to the model dtype)
template <typename T, typename Round>
void sum_pairs(const T* ys, int64_t P, int64_t H, const float* w, const int64_t* token,
               float* acc, Round&& round) {
  for (int64_t q = 0; q < P; ++q) {
    float* a = acc + token[q] * H;
    const T* y = ys + q * H;
    for (int64_t j = 0; j < H; ++j) {
      if constexpr (std::is_same_v<T, uint16_t>)
        a[j] += round(bf16_to_float(y[j]) * w[q]);
      else
        a[j] += round(y[j] * w[q]);
    }
  }
}

}  // namespace

// x [T <= 16, H] bf16; router [E, H]; gate_up [E, 2I, H] (gate rows first); down [E, H, I];
// shared_gate [1, H]; shared_gate_up [2Is, H] (gate rows first); shared_down [H, Is] -> [T, H]
torch::Tensor moe_bf16(const torch::Tensor& x, const torch::Tensor& router,
                       const torch::Tensor& gate_up, const torch::Tensor& down, int64_t top_k,
                       const torch::Tensor& shared_gate, const torch::Tensor& shared_gate_up,
                       const torch::Tensor& shared_down, bool avx2_only) {
  check_bf16(x, 2, "x");
  check_bf16(router, 2, "router");
  check_bf16(gate_up, 3, "gate_up");
  check_bf16(down, 3, "down");
  check_bf16(shared_gate, 2, "shared_gate");
  check_bf16(shared_gate_up, 2, "shared_gate_up");
  check_bf16(shared_down, 2, "shared_down");
  const int64_t T = x.size(0), H = x.size(1), E = router.size(0), I = down.size(2);
  const int64_t Is = shared_down.size(1);
  TORCH_CHECK(T >= 1 && T <= kMaxRows, "moe_bf16: 1 to ", kMaxRows, " rows");
  TORCH_CHECK(router.size(1) == H && gate_up.size(0) == E && gate_up.size(1) == 2 * I &&
                  gate_up.size(2) == H && down.size(0) == E && down.size(1) == H &&
                  shared_gate.size(0) == 1 && shared_gate.size(1) == H &&
                  shared_gate_up.size(0) == 2 * Is && shared_gate_up.size(1) == H &&
                  shared_down.size(0) == H,
              "moe_bf16: weight shapes do not match x [T, H]");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_bf16: top_k must be in 1..num_experts");
  const bool dp = !avx2_only && cpu_avx512_bf16(), vl = !avx2_only && cpu_avx512();
  const auto W = [](const torch::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr());
  };
  const auto* X = W(x);
  // pass 1: router logits, the shared expert's gate logit and gate_up
  Buf xb(T * H, !dp);
  std::memcpy(xb.b.data(), X, T * H * sizeof(uint16_t));
  xb.widen();
  std::vector<uint16_t> logits(T * E), sgl(T), sgu(T * 2 * Is);
  run_products({{X, xb.fp(0), T, W(router), E, H, logits.data()},
                {X, xb.fp(0), T, W(shared_gate), 1, H, sgl.data()},
                {X, xb.fp(0), T, W(shared_gate_up), 2 * Is, H, sgu.data()}}, dp, vl);
  // routing (route_rows), weights rounded to bf16; the pairs' rows gathered by expert
  const int64_t P = T * top_k;
  std::vector<float> lf(T * E);
  for (int64_t i = 0; i < T * E; ++i) lf[i] = bf16_to_float(logits[i]);
  const Routing rt = route_rows(lf.data(), T, E, top_k, round_bf16);
  Buf xs(P * H, !dp);
  for (int64_t q = 0; q < P; ++q)
    std::memcpy(xs.b.data() + q * H, X + rt.token[q] * H, H * sizeof(uint16_t));
  xs.widen();
  std::vector<uint16_t> gu(P * 2 * I);
  std::vector<Product> pass;
  for (const auto& [e, q, n] : rt.runs)
    pass.push_back({xs.b.data() + q * H, xs.fp(q * H), n, W(gate_up) + e * 2 * I * H, 2 * I, H,
                    gu.data() + q * 2 * I});
  run_products(pass, dp, vl);  // pass 2: the experts' gate_up
  // SwiGLU: silu(gate) rounded, times up, rounded (routed pairs, then the shared expert's rows)
  Buf h(P * I, !dp), hs(T * Is, !dp);
  const auto swiglu = [](const uint16_t* g, int64_t n, uint16_t* out) {
    for (int64_t j = 0; j < n; ++j)
      out[j] = bf16_bits(round_bf16(rows::silu(bf16_to_float(g[j]))) * bf16_to_float(g[n + j]));
  };
  for (int64_t q = 0; q < P; ++q) swiglu(gu.data() + q * 2 * I, I, h.b.data() + q * I);
  for (int64_t t = 0; t < T; ++t) swiglu(sgu.data() + t * 2 * Is, Is, hs.b.data() + t * Is);
  h.widen();
  hs.widen();
  // pass 3: the experts' down, the shared expert's down
  std::vector<uint16_t> ys(P * H), ysh(T * H);
  pass.clear();
  for (const auto& [e, q, n] : rt.runs)
    pass.push_back({h.b.data() + q * I, h.fp(q * I), n, W(down) + e * H * I, H, I,
                    ys.data() + q * H});
  pass.push_back({hs.b.data(), hs.fp(0), T, W(shared_down), H, Is, ysh.data()});
  run_products(pass, dp, vl);
  // out = routed + sigmoid(shared gate) * shared down, each weighted pair rounded as the
  // reference's mul_, the routed sum in fp32 (expert order) rounded once
  torch::Tensor y = torch::empty({T, H}, x.options());
  auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
  std::vector<float> acc(T * H, 0.f);
  sum_pairs(ys.data(), P, H, rt.weight.data(), rt.token.data(), acc.data(), round_bf16);
  for (int64_t t = 0; t < T; ++t) {
    const float g = round_bf16(rows::sigmoid(bf16_to_float(sgl[t])));
    for (int64_t j = 0; j < H; ++j) {
      const float s = round_bf16(g * bf16_to_float(ysh[t * H + j]));
      Y[t * H + j] = bf16_bits(round_bf16(acc[t * H + j]) + s);
    }
  }
  return y;
}

// The two ends of a MoE block's few-row step for experts of other formats (int8 / int4 / FP8,
// fp32; ops/moe.py few_token_moe runs their products with their own kernels in between):
// moe_route: x [T <= 16, H] bf16 or fp32, router [E, H] of its dtype or bf16 under fp32 x
// (`--quantization bf16`: bf16-stored weights, fp32 compute) -> (xs [T k, H]: each
// (token, choice) pair's row of x, the pairs sorted by expert as moe_bf16 sorts them; the active
// experts, ascending; each one's pair count; the pairs' weights [T k] in x's dtype; their tokens
// [T k] int64). Logits are linear_bf16's / linear_fp32's, the routing moe_bf16's.
// moe_combine: (ys [P, H], weights [P], tokens [P], T) -> [T, H]: per token the sum of its pairs'
// round(ys * w) in fp32, in their order, rounded once (moe_bf16's weighted sum).
std::tuple<torch::Tensor, std::vector<int64_t>, std::vector<int64_t>, torch::Tensor, torch::Tensor>
moe_route(const torch::Tensor& x, const torch::Tensor& router, int64_t top_k) {
  check_x(x, router, router.size(1));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool bf16_router = router.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == at::kFloat) &&
                  (router.scalar_type() == x.scalar_type() || bf16_router),
              "moe_route: bf16 or fp32 x and a router of its dtype (or bf16 under fp32 x)");
  const int64_t T = x.size(0), H = x.size(1), E = router.size(0), P = T * top_k;
  TORCH_CHECK(T >= 1 && top_k >= 1 && top_k <= E, "moe_route: 1 to ", kMaxRows,
              " rows and top_k in 1..num_experts");
  const torch::Tensor logits =
      (bf16_router ? linear_bf16(x, router, false) : linear_fp32(x, router, false)).to(at::kFloat);
  const Routing rt = bf16 ? route_rows(logits.data_ptr<float>(), T, E, top_k, round_bf16)
                          : route_rows(logits.data_ptr<float>(), T, E, top_k, [](float v) { return v; });
  torch::Tensor xs = torch::empty({P, H}, x.options());
  torch::Tensor w = torch::empty({P}, x.options().dtype(at::kFloat));
  torch::Tensor token = torch::empty({P}, x.options().dtype(at::kLong));
  const int64_t row = H * x.element_size();
  const auto* X = static_cast<const char*>(x.data_ptr());
  auto* XS = static_cast<char*>(xs.data_ptr());
  for (int64_t q = 0; q < P; ++q) std::memcpy(XS + q * row, X + rt.token[q] * row, row);
  std::memcpy(w.data_ptr<float>(), rt.weight.data(), P * sizeof(float));
  std::memcpy(token.data_ptr<int64_t>(), rt.token.data(), P * sizeof(int64_t));
  std::vector<int64_t> experts, counts;
  for (const auto& run : rt.runs) experts.push_back(run.expert), counts.push_back(run.count);
  return {xs, experts, counts, w.to(x.scalar_type()), token};
}

torch::Tensor moe_combine(const torch::Tensor& ys, const torch::Tensor& weight,
                          const torch::Tensor& token, int64_t T) {
  const bool bf16 = ys.scalar_type() == at::kBFloat16;
  TORCH_CHECK(ys.dim() == 2 && ys.is_contiguous() && ys.device().is_cpu() &&
                  (bf16 || ys.scalar_type() == at::kFloat),
              "moe_combine: ys must be a contiguous [P, H] bf16 or fp32 CPU tensor");
  const int64_t P = ys.size(0), H = ys.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == P && weight.scalar_type() == ys.scalar_type() &&
                  token.dim() == 1 && token.size(0) == P && token.scalar_type() == at::kLong,
              "moe_combine: weights [P] of ys's dtype and tokens [P] int64 expected");
  const torch::Tensor wf = weight.to(at::kFloat).contiguous(), tk = token.contiguous();
  const int64_t* tok = tk.data_ptr<int64_t>();
  for (int64_t q = 0; q < P; ++q)
    TORCH_CHECK(tok[q] >= 0 && tok[q] < T, "moe_combine: a token index outside 0..T-1");
  std::vector<float> acc(T * H, 0.f);
  torch::Tensor y = torch::empty({T, H}, ys.options());
  if (bf16) {
    sum_pairs(reinterpret_cast<const uint16_t*>(ys.data_ptr()), P, H, wf.data_ptr<float>(), tok,
              acc.data(), round_bf16);
    auto* Y = reinterpret_cast<uint16_t*>(y.data_ptr());
    for (int64_t i = 0; i < T * H; ++i) Y[i] = bf16_bits(acc[i]);
  } else {
    sum_pairs(ys.data_ptr<float>(), P, H, wf.data_ptr<float>(), tok, acc.data(),
              [](float v) { return v; });
    std::memcpy(y.data_ptr<float>(), acc.data(), T * H * sizeof(float));
  }
  return y;
}

// A held MoE block's routed products (Int8Moe, Bf16Moe) as the module path makes them: one
// many() call where every expert's part has at most kMR rows (the many-kernels' limit), else
// one one(i) call a part, stacked.
template <typename Many, typename One>
torch::Tensor many_or_each(const std::vector<torch::Tensor>& parts, Many&& many, One&& one) {
  for (const auto& p : parts) {
    if (p.size(0) <= kMR) continue;
    std::vector<torch::Tensor> ys;
    for (size_t i = 0; i < parts.size(); ++i) ys.push_back(one(i));
    return at::cat(ys);
  }
  return many();
}

// A MoE block's int8 experts for a decode step, their tensors held once (moe_block.h; its
// products as the module path makes them: the routed pairs' by one linear_int8_many call where
// every expert has at most 4 rows (its kMR), else one linear_int8 call an expert; the shared
// expert's by linear_int8). Up to 16 rows (linear_int8's).
class Int8Moe {
 public:
  Int8Moe(std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> gate_up_scale,
          std::vector<torch::Tensor> down, std::vector<torch::Tensor> down_scale,
          torch::Tensor shared_gate_up, torch::Tensor shared_gate_up_scale,
          torch::Tensor shared_down, torch::Tensor shared_down_scale)
      : h_(std::move(gate_up), std::move(gate_up_scale), std::move(down), std::move(down_scale),
           std::move(shared_gate_up), std::move(shared_gate_up_scale), std::move(shared_down),
           std::move(shared_down_scale), "Int8Moe",
           [](const torch::Tensor& q, const torch::Tensor& sc, int64_t N, int64_t K) {
             return q.dim() == 2 && q.size(0) == N && q.size(1) == K && q.is_contiguous() &&
                    q.scalar_type() == at::kChar && q.device().is_cpu() && sc.dim() == 1 &&
                    sc.size(0) == N && sc.is_contiguous();
           }) {}

  std::vector<torch::Tensor> run(const torch::Tensor& xs, const std::vector<int64_t>& experts,
                                 const std::vector<int64_t>& counts, const torch::Tensor& x) const {
    const auto many = [&](const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& es,
                          bool down) {
      std::vector<torch::Tensor> q, sc;
      for (int64_t e : es) q.push_back(h_.w[down][e]), sc.push_back(h_.s[down][e]);
      return many_or_each(
          parts, [&] { return linear_int8_many(parts, q, sc, false); },
          [&](size_t i) { return linear_int8(parts[i], q[i], sc[i], false); });
    };
    const auto shared = [&](const torch::Tensor& rows, bool down) {
      return linear_int8(rows, h_.sw[down], h_.ss[down], false);
    };
    return moe_block::run(xs, experts, counts, x, h_.experts(), "Int8Moe", many, shared);
  }

 private:
  moe_block::Held h_;
};

// A MoE block's bf16-stored experts under fp32 rows (`--quantization bf16`, the default on CPUs
// without native bf16) for a decode step, as Int8Moe: the routed pairs' products by one
// linear_bf16_many call where every expert has at most 4 rows, else one linear_bf16 call an
// expert (fp32 rows past 4 take its paired-row path: as the module's calls), the shared
// expert's by linear_bf16. (bf16 rows take moe_bf16's single call.) Up to 16 rows.
class Bf16Moe {
 public:
  Bf16Moe(std::vector<torch::Tensor> gate_up, std::vector<torch::Tensor> down,
          torch::Tensor shared_gate_up, torch::Tensor shared_down)
      : h_(gate_up, std::vector<torch::Tensor>(gate_up.size()), std::move(down),
           std::vector<torch::Tensor>(gate_up.size()), std::move(shared_gate_up), {},
           std::move(shared_down), {}, "Bf16Moe",
           [](const torch::Tensor& w, const torch::Tensor&, int64_t N, int64_t K) {
             return w.dim() == 2 && w.size(0) == N && w.size(1) == K && w.is_contiguous() &&
                    w.scalar_type() == at::kBFloat16 && w.device().is_cpu();
           }) {}

  std::vector<torch::Tensor> run(const torch::Tensor& xs, const std::vector<int64_t>& experts,
                                 const std::vector<int64_t>& counts, const torch::Tensor& x) const {
    const auto many = [&](const std::vector<torch::Tensor>& parts, const std::vector<int64_t>& es,
                          bool down) {
      std::vector<torch::Tensor> w;
      for (int64_t e : es) w.push_back(h_.w[down][e]);
      return many_or_each(
          parts, [&] { return linear_bf16_many(parts, w, false); },
          [&](size_t i) { return linear_bf16(parts[i], w[i], false); });
    };
    const auto shared = [&](const torch::Tensor& rows, bool down) {
      return linear_bf16(rows, h_.sw[down], false);
    };
    return moe_block::run(xs, experts, counts, x, h_.experts(), "Bf16Moe", many, shared);
  }

 private:
  moe_block::Held h_;  // (no scales)
};

std::vector<std::string> isa() {  // the fast paths this CPU takes
  std::vector<std::string> out;
  if (cpu_avx512()) out.emplace_back("avx512");
  if (cpu_avx512_bf16()) out.emplace_back("avx512_bf16");
  if (cpu_avx512_fp8()) out.emplace_back("avx512_vbmi");
  return out;
}

namespace {

// int8_quantize's rows: each to fp32 (exact), amax = max |w|, scale = max(amax / 127, 1e-12)
// rounded to S, q = clamp(round(w / scale), -127, 127) with round half to even: quant/formats.py
// quantize_int8_rows op for op (the same fp32 operations, so the same bits)
template <typename T, typename S>
void quantize_int8_impl(const T* W, int64_t N, int64_t K, int8_t* Q, S* scale) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    for (int64_t n = n0; n < n1; ++n) {
      gemv_rows::row_to_float(W + n * K, K, row.data());
      const float amax = gemv_rows::abs_max(row.data(), K, 0.f);
      const S s = static_cast<S>(std::max(amax / 127.0f, 1e-12f));
      const float sf = static_cast<float>(s);
      scale[n] = s;
      const __m256 sv = _mm256_set1_ps(sf);
      int8_t* q = Q + n * K;
      alignas(32) int32_t t[8];
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(&row[k]), sv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_cvtps_epi32(v));
        for (int i = 0; i < 8; ++i) q[k + i] = static_cast<int8_t>(t[i]);
      }
      for (; k < K; ++k)
        q[k] = static_cast<int8_t>(std::min(std::max(std::nearbyint(row[k] / sf), -127.f), 127.f));
    }
  });
}

template <typename T>
void quantize_int8_to(const T* W, int64_t N, int64_t K, int8_t* Q, const torch::Tensor& scale) {
  if (scale.scalar_type() == at::kFloat)
    quantize_int8_impl(W, N, K, Q, scale.data_ptr<float>());
  else
    quantize_int8_impl(W, N, K, Q, scale.data_ptr<at::BFloat16>());
}

}  // namespace

// w [N, K] (fp32 / bf16 / fp16) -> (q [N, K] int8, scale [N] in scale_dtype: fp32 or bf16)
std::vector<torch::Tensor> int8_quantize(const torch::Tensor& w, at::ScalarType scale_dtype) {
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "int8_quantize: w [N, K] on the CPU");
  TORCH_CHECK(scale_dtype == at::kFloat || scale_dtype == at::kBFloat16,
              "int8_quantize: scales fp32 or bf16");
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto q = torch::empty({N, K}, w.options().dtype(at::kChar));
  auto scale = torch::empty({N}, w.options().dtype(scale_dtype));
  int8_t* Q = q.data_ptr<int8_t>();
  gemv_rows::with_weight_dtype(
      wc, "int8_quantize", [&](const auto* W) { quantize_int8_to(W, N, K, Q, scale); });
  return {q, scale};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_quantize", &int8_quantize, QWEN35_NOGIL,
        "w [N, K] -> (q, scale): quant/formats.py quantize_int8_rows");
  m.def("linear_bf16", &linear_bf16, QWEN35_NOGIL, "x [M<=16, K] bf16 or fp32 @ w [N, K] bf16 ^T",
        py::arg("x"), py::arg("w"), py::arg("avx2_only") = false);
  m.def("linear_fp32", &linear_fp32, QWEN35_NOGIL, "x [M<=16, K] fp32 @ w [N, K] fp32 ^T", py::arg("x"),
        py::arg("w"), py::arg("avx2_only") = false);
  m.def("linear_bf16_many", &linear_bf16_many, QWEN35_NOGIL,  // (bf16 or fp32 rows)
        "[x_c @ w_c^T] stacked [sum M_c, N], bf16 weights of one shape", py::arg("xs"),
        py::arg("ws"), py::arg("avx2_only") = false);
  m.def("linear_int8_many", &linear_int8_many, QWEN35_NOGIL,
        "[x_c @ (q_c * scale_c)^T] stacked [sum M_c, N], one shape", py::arg("xs"),
        py::arg("qs"), py::arg("scales"), py::arg("avx2_only") = false);
  m.def("linear_fp8_many", &linear_fp8_many, QWEN35_NOGIL,
        "[x_c @ block-FP8 w_c ^T] stacked [sum M_c, N], bf16 x, one shape", py::arg("xs"),
        py::arg("ws"), py::arg("scales"), py::arg("bo"), py::arg("bi"), py::arg("cvt") = false);
  m.def("linear_int8", &linear_int8, QWEN35_NOGIL, "x [M<=16, K] @ (q [N, K] int8 * scale [N])^T",
        py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("avx2_only") = false);
  m.def("linear_fp8", &linear_fp8, QWEN35_NOGIL, "x [M<=16, K] bf16 @ block-FP8 w ^T", py::arg("x"),
        py::arg("w"), py::arg("scale"), py::arg("bo"), py::arg("bi"), py::arg("cvt") = false);
  m.def("fp8_supported", &fp8_supported, QWEN35_NOGIL, "linear_fp8's byte tables run here for blocks of bi");
  m.def("fp8_cvt_supported", &fp8_cvt_supported, QWEN35_NOGIL, "linear_fp8's fp16-bit path runs here");
  m.def("moe_bf16", &moe_bf16, QWEN35_NOGIL, "a MoE block's step on x [T<=16, H] bf16: routing, experts, shared",
        py::arg("x"), py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("top_k"),
        py::arg("shared_gate"), py::arg("shared_gate_up"), py::arg("shared_down"),
        py::arg("avx2_only") = false);
  m.def("moe_route", &moe_route, QWEN35_NOGIL, "a MoE block's routing for x [T<=16, H]: (xs, experts, counts, "
        "weights, tokens), the pairs sorted by expert", py::arg("x"), py::arg("router"),
        py::arg("top_k"));
  m.def("moe_combine", &moe_combine, QWEN35_NOGIL, "per token the sum of its pairs' round(ys * w), fp32",
        py::arg("ys"), py::arg("weights"), py::arg("tokens"), py::arg("T"));
  py::class_<Bf16Moe>(m, "Bf16Moe", py::module_local())
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor,
                    torch::Tensor>(),
           py::arg("gate_up"), py::arg("down"), py::arg("shared_gate_up"), py::arg("shared_down"))
      .def("run", &Bf16Moe::run, QWEN35_NOGIL,
           "(xs, experts, counts, x) -> [ys, shared]: a MoE block's bf16 experts, fp32 rows");
  py::class_<Int8Moe>(m, "Int8Moe", py::module_local())
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor,
                    torch::Tensor, torch::Tensor, torch::Tensor>(),
           py::arg("gate_up"), py::arg("gate_up_scale"), py::arg("down"), py::arg("down_scale"),
           py::arg("shared_gate_up"), py::arg("shared_gate_up_scale"), py::arg("shared_down"),
           py::arg("shared_down_scale"))
      .def("run", &Int8Moe::run, QWEN35_NOGIL,
           "(xs, experts, counts, x) -> [ys, shared]: a MoE block's int8 experts, few rows");
  m.def("isa", &isa, QWEN35_NOGIL, "the fast paths this CPU takes");
}
