// The int8 screen of lm_head for greedy / top-k decode rows (models/head_screen.py), in one call:
//
//   screen(x [M, K] fp32, q [V, K] int8, scale [V], err [V], nq [V], tiny [V], ks [M], rounded,
//          limit, avx2_only) -> candidates [C] int64 (ascending token ids), or empty when more
//          than `limit`
//
// 1. Each input row is rounded to integers, and its exact rounding error ||x - x^||_2 kept:
//    on AVX512-VNNI CPUs to int8 in blocks of 64 (one fp32 scale a block, so an outlier channel
//    costs only its block); elsewhere (AVX2, or avx2_only) to int16 in groups of 128, as
//    linear_int8's AVX2 path rounds them (gemv_rows.h quantize_rows_i16).
// 2. Every head row v: s_v = scale_v * sum_b xs_b * (integer dot of block b). VNNI: vpdpbusd
//    (unsigned x signed bytes: the weight bytes flipped to q + 128, the 128 * sum(x^) this adds
//    taken off exactly, by starting each block's int32 lanes at -128 * their x^ sums). AVX2:
//    gemv_rows.h int8_rows_i16 (vpmaddwd), the same sums as linear_int8 gives. Either reads a
//    byte a weight at the memory bandwidth.
// 3. The bound b_v = ||x|| err_v + ||x - x^|| nq_v (1 + 2^-6) + tiny_v + 2^-18 |s_v|
//    (head_screen.py derives it), T = the ks[m]-th largest s_v - b_v of each input row (lowered
//    by 2^-6 |T| where the exact logits are rounded to bf16), and the tokens with
//    s_v + b_v >= T for some input row, in order (AVX2 for both dots: these passes read 16 bytes
//    a token, memory-bound either way).
// head_screen.py's `candidates_reference` is the PyTorch twin (fp32 input rows, linear_int8, the
// bound's terms in torch ops: ~4 ms a token on the 0.8B's head on a Zen 3, where this takes
// under 1); tests/test_head_screen.py checks all three against the full head's argmax.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include "torch_ext.h"

#include "cpu_isa.h"
#include "gemv_rows.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <vector>

#define TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace {

constexpr int64_t kBlock = 64;
constexpr int kLanesNV = 8;          // head rows a dot_lanes pass
constexpr int64_t kLanesMinRows = 4;  // input rows from which the lanes layout runs (VNNI)
constexpr int64_t kLanesMaxRows = 16;
int64_t lanes_min_rows = kLanesMinRows;  // set_lanes_min_rows: tests and bench/head_screen.py

// VNNI, lanes_min_rows to kLanesMaxRows input rows: the rows in the lanes of one vector
// (dot_lanes). Up to 8 rows: two head rows a vector (lanes 0-7: head row v's input rows, 8-15:
// v + 1's), the input rows' part repeated in both halves (dot_pairs).
struct Lanes {
  bool pairs = false;        // M <= 8: two head rows a vector
  std::vector<int8_t> xt;    // [nb, 16 quads, 16 lanes, 4 bytes] (rows >= M zero)
  std::vector<int32_t> neg;  // [nb, 16]: each row's block correction (its 16 negcor lanes)
  std::vector<float> xs;     // [nb, 16]
};

struct Rows {  // the input rows, rounded to integers
  int64_t M, K;
  bool vnni;  // int8 blocks of 64 (AVX512-VNNI) or int16 groups of 128 (AVX2)
  int64_t nb = 0;
  std::vector<int8_t> xq;       // VNNI: [M, nb * 64], zeros past K
  std::vector<int32_t> negcor;  // VNNI: [M, nb, 16]: -128 * the sum of each lane's 4 x^ bytes
  std::vector<float> xs;        // VNNI: [M, nb]
  gemv_rows::RowsI16 i16;       // AVX2: linear_int8's rounding
  std::vector<float> xn, xe;    // [M]: ||x||, ||x - x^|| (rounded up)
  bool use_lanes = false;       // VNNI rows also laid out for dot_lanes
  Lanes L;
};

void set_norms(Rows& r, int64_t m, double n2, double e2) {
  r.xn[m] = static_cast<float>(std::sqrt(n2) * (1 + 0x1p-10));
  r.xe[m] = static_cast<float>(std::sqrt(e2) * (1 + 0x1p-10));
}

Rows quantise_vnni(const float* X, int64_t M, int64_t K) {
  Rows r{M, K, true};
  r.nb = (K + kBlock - 1) / kBlock;
  r.xq.assign(M * r.nb * kBlock, 0);
  r.negcor.assign(M * r.nb * 16, 0);
  r.xs.assign(M * r.nb, 0.f);
  r.xn.assign(M, 0.f);
  r.xe.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    double n2 = 0, e2 = 0;
    for (int64_t b = 0; b < r.nb; ++b) {
      const int64_t k0 = b * kBlock, k1 = std::min(K, k0 + kBlock);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(X[m * K + k]));
      const float s = amax / 127.f;
      r.xs[m * r.nb + b] = s;
      int8_t* q = r.xq.data() + (m * r.nb + b) * kBlock;
      int32_t* c = r.negcor.data() + (m * r.nb + b) * 16;
      for (int64_t k = k0; k < k1; ++k) {
        const float x = X[m * K + k];
        const int v = s > 0.f ? static_cast<int>(std::nearbyint(std::clamp(x / s, -127.f, 127.f))) : 0;
        q[k - k0] = static_cast<int8_t>(v);
        c[(k - k0) / 4] -= 128 * v;
        const double d = static_cast<double>(x) - static_cast<double>(s) * v;
        n2 += static_cast<double>(x) * x;
        e2 += d * d;
      }
    }
    set_norms(r, m, n2, e2);
  }
  return r;
}

// (x is finite: head_screen.py screens only finite rows)
Rows quantise_i16(const float* X, int64_t M, int64_t K) {
  Rows r{M, K, false};
  r.i16 = gemv_rows::quantize_rows_i16(X, M, K);
  r.xn.assign(M, 0.f);
  r.xe.assign(M, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    double n2 = 0, e2 = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double x = X[m * K + k];
      const double d = x - static_cast<double>(r.i16.xs[m * r.i16.ng + k / gemv_rows::kI16Group]) *
                               r.i16.xq[m * K + k];
      n2 += x * x;
      e2 += d * d;
    }
    set_norms(r, m, n2, e2);
  }
  return r;
}

// s[m] for one head row against one input row (M = 1). One row at a time, front to back: the
// hardware prefetcher streams one sequential read best (gemv_cpu.cpp found interleaved rows
// at half the bandwidth); four accumulators keep the block chain's latency hidden.
TARGET_VNNI void dot_row(const Rows& r, const int8_t* w, float scale, float* s) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = r.K / kBlock;
  const __mmask64 tail = r.K % kBlock ? (~0ull >> (kBlock - r.K % kBlock)) : 0;
  for (int64_t m = 0; m < r.M; ++m) {
    const int8_t* xq = r.xq.data() + m * r.nb * kBlock;
    const int32_t* nc = r.negcor.data() + m * r.nb * 16;
    const float* xs = r.xs.data() + m * r.nb;
    const auto block = [&](int64_t b, __m512i wv, __m512 acc) TARGET_VNNI {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(nc + b * 16),
                                              _mm512_xor_si512(wv, flip),
                                              _mm512_loadu_si512(xq + b * kBlock));
      return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[b]), acc);
    };
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t b = 0;
    for (; b + 4 <= full; b += 4) {
      a0 = block(b, _mm512_loadu_si512(w + b * kBlock), a0);
      a1 = block(b + 1, _mm512_loadu_si512(w + (b + 1) * kBlock), a1);
      a2 = block(b + 2, _mm512_loadu_si512(w + (b + 2) * kBlock), a2);
      a3 = block(b + 3, _mm512_loadu_si512(w + (b + 3) * kBlock), a3);
    }
    for (; b < full; ++b) a0 = block(b, _mm512_loadu_si512(w + b * kBlock), a0);
    if (tail)  // the last partial block: past K both bytes are 0 (x^ = 0 there: nothing adds)
      a1 = block(b, _mm512_maskz_loadu_epi8(tail, w + b * kBlock), a1);
    s[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) *
           scale;
  }
}

// Several input rows against one head row: each weight block loaded and flipped once for all
// of them (MR accumulator chains). Same per-row arithmetic order as any other MR.
template <int MR>
TARGET_VNNI void dot_row_rows(const Rows& r, int64_t m0, const int8_t* w, float scale, float* s) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = r.K / kBlock;
  const __mmask64 tail = r.K % kBlock ? (~0ull >> (kBlock - r.K % kBlock)) : 0;
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < r.nb; ++b) {
    const int8_t* p = w + b * kBlock;
    const __m512i wv = _mm512_xor_si512(
        b < full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(tail, p), flip);
    for (int i = 0; i < MR; ++i) {
      const int64_t mb = (m0 + i) * r.nb + b;
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(r.negcor.data() + mb * 16), wv,
                                              _mm512_loadu_si512(r.xq.data() + mb * kBlock));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(r.xs[mb]), acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) s[m0 + i] = _mm512_reduce_add_ps(acc[i]) * scale;
}

// 4 to 16 input rows (VNNI): the rows in the lanes of one vector instead, so that one vpdpbusd
// gives 16 rows' dots of 4 inputs (one head row's 4 bytes broadcast) and a block's int32 sums
// are scaled once for all rows (struct Lanes).
// Per (row, block) the same exact int32 sum as dot_row's lanes give together; in fp32 one term
// a block instead of 16 (the bound covers any order of at most K terms).
void build_lanes(Rows& r) {
  Lanes& L = r.L;
  r.use_lanes = true;
  L.pairs = r.M <= 8;
  L.xt.assign(r.nb * 16 * 64, 0);
  L.neg.assign(r.nb * 16, 0);
  L.xs.assign(r.nb * 16, 0.f);
  for (int64_t m = 0; m < r.M; ++m)
    for (int64_t b = 0; b < r.nb; ++b) {
      const int8_t* q = r.xq.data() + (m * r.nb + b) * kBlock;
      const int32_t* c = r.negcor.data() + (m * r.nb + b) * 16;
      int32_t neg = 0;
      for (int l = 0; l < 16; ++l) neg += c[l];
      for (const int64_t lane : {m, m + 8}) {
        if (lane != m && !L.pairs) break;
        for (int64_t j = 0; j < 16; ++j)
          for (int t = 0; t < 4; ++t) L.xt[((b * 16 + j) * 16 + lane) * 4 + t] = q[j * 4 + t];
        L.neg[b * 16 + lane] = neg;
        L.xs[b * 16 + lane] = r.xs[m * r.nb + b];
      }
    }
}

// Block b of NW consecutive head rows (w: the first, K bytes each), flipped to unsigned bytes
// (q + 128: vpdpbusd's unsigned side), past K zeros (flipped: 128, against x^ = 0 there); the
// next pass's rows (NW K bytes on) prefetched in order, a line a head row and block.
template <int NW>
TARGET_VNNI inline void load_blocks(const int8_t* w, int64_t K, int64_t b, __m512i* wf) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail = K % kBlock ? (~0ull >> (kBlock - K % kBlock)) : 0;
  for (int v = 0; v < NW; ++v) {
    const int8_t* p = w + v * K + b * kBlock;
    _mm_prefetch(reinterpret_cast<const char*>(w + NW * K + (b * NW + v) * kBlock), _MM_HINT_T0);
    const __m512i wv = b < K / kBlock ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(tail, p);
    wf[v] = _mm512_xor_si512(wv, flip);
  }
}

// NV consecutive head rows (w: the first, K bytes each) against every input row: tile [NV][16]
// (lane m: input row m, already times the head row's scale). Each weight block is loaded and
// flipped once, its 4-byte groups broadcast (vpermd) to the vpdpbusd of all 16 rows.
template <int NV>
TARGET_VNNI void dot_lanes(const Rows& r, const Lanes& L, const int8_t* w, const float* scale,
                           float* tile) {
  __m512 f[NV];
  for (int v = 0; v < NV; ++v) f[v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < r.nb; ++b) {
    __m512i a[NV], wf[NV];
    load_blocks<NV>(w, r.K, b, wf);
    const __m512i neg = _mm512_loadu_si512(L.neg.data() + b * 16);
    for (int v = 0; v < NV; ++v) a[v] = neg;
    const int8_t* xb = L.xt.data() + b * 16 * 64;
    for (int j = 0; j < 16; ++j) {
      const __m512i xv = _mm512_loadu_si512(xb + j * 64);
      const __m512i idx = _mm512_set1_epi32(j);
      for (int v = 0; v < NV; ++v)
        a[v] = _mm512_dpbusd_epi32(a[v], _mm512_permutexvar_epi32(idx, wf[v]), xv);
    }
    const __m512 xs = _mm512_loadu_ps(L.xs.data() + b * 16);
    for (int v = 0; v < NV; ++v) f[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[v]), xs, f[v]);
  }
  for (int v = 0; v < NV; ++v)
    _mm512_store_ps(tile + v * 16, _mm512_mul_ps(f[v], _mm512_set1_ps(scale[v])));
}

// dot_lanes for up to 8 input rows: NP pairs of head rows (2 NP consecutive rows from w), each
// pair in one vector (Lanes::pairs), its two weight blocks' 4-byte groups broadcast into the two
// halves by one two-source permute. Half the vpdpbusd of dot_lanes, the same per-row sums.
template <int NP>
TARGET_VNNI void dot_pairs(const Rows& r, const Lanes& L, const int8_t* w, const float* scale,
                           float* tile) {
  __m512 f[NP];
  for (int p = 0; p < NP; ++p) f[p] = _mm512_setzero_ps();
  for (int64_t b = 0; b < r.nb; ++b) {
    __m512i a[NP], wf[2 * NP];
    load_blocks<2 * NP>(w, r.K, b, wf);
    const __m512i neg = _mm512_loadu_si512(L.neg.data() + b * 16);
    for (int p = 0; p < NP; ++p) a[p] = neg;
    const int8_t* xb = L.xt.data() + b * 16 * 64;
    for (int j = 0; j < 16; ++j) {
      const __m512i xv = _mm512_loadu_si512(xb + j * 64);
      // lanes 0-7: group j of the first block, 8-15: group j of the second (index bit 4)
      const __m512i idx = _mm512_mask_set1_epi32(_mm512_set1_epi32(j), 0xFF00, 16 + j);
      for (int p = 0; p < NP; ++p)
        a[p] = _mm512_dpbusd_epi32(a[p], _mm512_permutex2var_epi32(wf[2 * p], idx, wf[2 * p + 1]),
                                   xv);
    }
    const __m512 xs = _mm512_loadu_ps(L.xs.data() + b * 16);
    for (int p = 0; p < NP; ++p) f[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[p]), xs, f[p]);
  }
  for (int p = 0; p < NP; ++p) {
    const __m512 sc =
        _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(scale[2 * p]), _mm512_set1_ps(scale[2 * p + 1]));
    const __m512 y = _mm512_mul_ps(f[p], sc);
    _mm256_store_ps(tile + 2 * p * 16, _mm512_castps512_ps256(y));
    _mm256_store_ps(tile + (2 * p + 1) * 16, _mm512_extractf32x8_ps(y, 1));
  }
}

// The bound of 8 head rows v..v+7 against input row m (s: their screen values)
inline __m256 bound8(const Rows& r, int64_t m, const float* E, const float* NQ, const float* TI,
                     __m256 s) {
  const __m256 abs_s = _mm256_and_ps(s, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  __m256 b = _mm256_fmadd_ps(_mm256_set1_ps(r.xn[m]), _mm256_loadu_ps(E), _mm256_loadu_ps(TI));
  b = _mm256_fmadd_ps(_mm256_set1_ps(r.xe[m] * (1 + 0x1p-6f)), _mm256_loadu_ps(NQ), b);
  return _mm256_fmadd_ps(_mm256_set1_ps(0x1p-18f), abs_s, b);
}

struct Head {  // the screen's weights and bounds (head_screen.py's tensors)
  const int8_t* Q;
  const float *S, *E, *NQ, *TI;
  int64_t V;
};

constexpr int64_t kGrain = 1024;  // head rows a task (a multiple of 8)

inline float bound1(const Rows& r, const Head& h, int64_t m, int64_t v, float sv) {
  return r.xn[m] * h.E[v] + r.xe[m] * h.NQ[v] * (1 + 0x1p-6f) + h.TI[v] + 0x1p-18f * std::fabs(sv);
}

// head row v's screen values against every input row into one[M]
void dot_head_row(const Rows& r, const Head& h, int64_t v, float* one) {
  const int8_t* w = h.Q + v * r.K;
  const int64_t M = r.M;
  if (!r.vnni) {  // linear_int8's AVX2 rows, then its scale (the same bits)
    for (int64_t m = 0; m < M; m += gemv_rows::kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(gemv_rows::kMR, M - m));
      DISPATCH_MR(mr, gemv_rows::int8_rows_i16, r.i16, m, w, one + m);
    }
    for (int64_t m = 0; m < M; ++m) one[m] *= h.S[v];
  } else if (M == 1) {  // batch-1 decode: four chains along the row
    dot_row(r, w, h.S[v], one);
  } else {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) dot_row_rows<4>(r, m, w, h.S[v], one);
    for (; m + 2 <= M; m += 2) dot_row_rows<2>(r, m, w, h.S[v], one);
    for (; m < M; ++m) dot_row_rows<1>(r, m, w, h.S[v], one);
  }
}

// chunk c: the screen values into s [M, ld] and each input row's max(s - b) into best [M]
void dot_chunk(const Rows& r, const Head& h, int64_t c, float* s, int64_t ld, float* best) {
  const int64_t M = r.M, v0 = c * kGrain, v1 = std::min(h.V, v0 + kGrain);
  if (r.use_lanes) {
    alignas(64) float tile[kLanesNV * 16];
    for (int64_t v = v0; v < v1;) {
      const int nv = v + kLanesNV <= v1 ? kLanesNV : 1;
      if (nv == 1)  // the chunk's last rows (V not a multiple of 8)
        dot_lanes<1>(r, r.L, h.Q + v * r.K, h.S + v, tile);
      else if (r.L.pairs)
        dot_pairs<kLanesNV / 2>(r, r.L, h.Q + v * r.K, h.S + v, tile);
      else
        dot_lanes<kLanesNV>(r, r.L, h.Q + v * r.K, h.S + v, tile);
      for (int i = 0; i < nv; ++i, ++v)
        for (int64_t m = 0; m < M; ++m) s[m * ld + v] = tile[i * 16 + m];
    }
  } else {
    float one[64];
    for (int64_t v = v0; v < v1; ++v) {
      dot_head_row(r, h, v, one);
      for (int64_t m = 0; m < M; ++m) s[m * ld + v] = one[m];
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* sm = s + m * ld;
    __m256 lo = _mm256_set1_ps(-INFINITY);
    int64_t v = v0;
    for (; v + 8 <= v1; v += 8) {
      const __m256 sv = _mm256_loadu_ps(sm + v);
      lo = _mm256_max_ps(lo, _mm256_sub_ps(sv, bound8(r, m, h.E + v, h.NQ + v, h.TI + v, sv)));
    }
    float b = gemv_rows::hmax8(lo);
    for (; v < v1; ++v) b = std::max(b, sm[v] - bound1(r, h, m, v, sm[v]));
    best[m] = b;
  }
}

// chunk c: its tokens whose upper bound reaches T for some input row, in order (stops past limit)
void keep_chunk(const Rows& r, const Head& h, int64_t c, const float* s, int64_t ld,
                const float* T, int64_t limit, std::vector<int64_t>& out) {
  const int64_t M = r.M, v0 = c * kGrain, v1 = std::min(h.V, v0 + kGrain);
  int64_t v = v0;
  for (; v + 8 <= v1; v += 8) {
    int hit = 0;
    for (int64_t m = 0; m < M; ++m) {
      const __m256 sv = _mm256_loadu_ps(s + m * ld + v);
      const __m256 hi = _mm256_add_ps(sv, bound8(r, m, h.E + v, h.NQ + v, h.TI + v, sv));
      hit |= _mm256_movemask_ps(_mm256_cmp_ps(hi, _mm256_set1_ps(T[m]), _CMP_GE_OQ));
    }
    for (; hit; hit &= hit - 1) out.push_back(v + __builtin_ctz(hit));
    if (static_cast<int64_t>(out.size()) > limit) return;  // undecided anyway
  }
  for (; v < v1; ++v)
    for (int64_t m = 0; m < M; ++m)
      if (s[m * ld + v] + bound1(r, h, m, v, s[m * ld + v]) >= T[m]) {
        out.push_back(v);
        break;
      }
}

// chunk c, input row m: the lower bounds s - b of its tokens that are >= lower, appended to out
void collect_lo(const Rows& r, const Head& h, int64_t c, int64_t m, const float* s, int64_t ld,
                float lower, std::vector<float>& out) {
  const int64_t v0 = c * kGrain, v1 = std::min(h.V, v0 + kGrain);
  const float* sm = s + m * ld;
  alignas(32) float lo[8];
  int64_t v = v0;
  for (; v + 8 <= v1; v += 8) {
    const __m256 sv = _mm256_loadu_ps(sm + v);
    const __m256 l = _mm256_sub_ps(sv, bound8(r, m, h.E + v, h.NQ + v, h.TI + v, sv));
    int hit = _mm256_movemask_ps(_mm256_cmp_ps(l, _mm256_set1_ps(lower), _CMP_GE_OQ));
    if (!hit) continue;
    _mm256_store_ps(lo, l);
    for (; hit; hit &= hit - 1) out.push_back(lo[__builtin_ctz(hit)]);
  }
  for (; v < v1; ++v) {
    const float l = sm[v] - bound1(r, h, m, v, sm[v]);
    if (l >= lower) out.push_back(l);
  }
}

// The k-th largest lower bound of input row m (k > 1): every token that can be among the row's
// k largest logits (ties included) has an upper bound at least that. The k-th largest of the
// chunks' maxima (k distinct tokens) bounds it from below, so only the tokens above that are
// gathered and ranked.
float kth_lower(const Rows& r, const Head& h, const float* s, int64_t ld, const float* best,
                int64_t chunks, int64_t m, int64_t k) {
  if (k > h.V) return -INFINITY;
  float lower = -INFINITY;
  if (k <= chunks) {
    std::vector<float> maxima(chunks);
    for (int64_t c = 0; c < chunks; ++c) maxima[c] = best[c * r.M + m];
    std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<>());
    lower = maxima[k - 1];
  }
  std::vector<std::vector<float>> part(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) collect_lo(r, h, c, m, s, ld, lower, part[c]);
  });
  std::vector<float> all;
  for (const auto& p : part) all.insert(all.end(), p.begin(), p.end());
  if (static_cast<int64_t>(all.size()) < k) return -INFINITY;  // not reached: k <= V
  std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), std::greater<>());
  return all[k - 1];
}

struct Dots {  // every chunk's dot_chunk output
  int64_t chunks, ld;
  std::vector<float> s;     // [M, ld]: the screen values
  std::vector<float> best;  // [chunks, M]: per chunk and input row, max(s - b)
};

Dots dot_all(const Rows& r, const Head& h) {
  const int64_t M = r.M, chunks = (h.V + kGrain - 1) / kGrain;
  Dots d{chunks, chunks * kGrain, std::vector<float>(M * chunks * kGrain),
         std::vector<float>(chunks * M, -INFINITY)};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) dot_chunk(r, h, c, d.s.data(), d.ld, d.best.data() + c * M);
  });
  return d;
}

torch::Tensor screen_impl(const Rows& r, const Head& h, const std::vector<int64_t>& ks,
                          bool rounded, int64_t limit) {
  const int64_t M = r.M;
  const Dots d = dot_all(r, h);
  const int64_t chunks = d.chunks, ld = d.ld;
  const float *s = d.s.data(), *best = d.best.data();
  std::vector<float> T(M, -INFINITY);  // per input row: its ks[m]-th largest s - b
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t m = 0; m < M; ++m) T[m] = std::max(T[m], best[c * M + m]);
  for (int64_t m = 0; m < M; ++m)
    if (ks[m] > 1) T[m] = kth_lower(r, h, s, ld, best, chunks, m, ks[m]);
  if (rounded)  // bf16 logits: every token that can round to the same value as the maximum
    for (auto& t : T) t -= std::fabs(t) * 0x1p-6f;
  std::vector<std::vector<int64_t>> kept(chunks);  // each chunk's in order, chunks in order
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) keep_chunk(r, h, c, s, ld, T.data(), limit, kept[c]);
  });
  int64_t n = 0;
  for (const auto& k : kept) n += static_cast<int64_t>(k.size());
  if (n > limit) return torch::empty({0}, torch::kLong);
  auto out = torch::empty({n}, torch::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& k : kept) o = std::copy(k.begin(), k.end(), o);
  return out;
}

}  // namespace

bool vnni() { return cpu_isa::avx512_vnni(); }

int64_t set_lanes_min_rows(int64_t n) {
  const int64_t old = lanes_min_rows;
  lanes_min_rows = n;
  return old;
}

Rows rows_for(const torch::Tensor& x, bool avx2_only) {
  Rows r = vnni() && !avx2_only ? quantise_vnni(x.data_ptr<float>(), x.size(0), x.size(1))
                                : quantise_i16(x.data_ptr<float>(), x.size(0), x.size(1));
  if (r.vnni && r.M >= lanes_min_rows && r.M <= kLanesMaxRows) build_lanes(r);
  return r;
}

torch::Tensor screen(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                     const torch::Tensor& err, const torch::Tensor& nq, const torch::Tensor& tiny,
                     const std::vector<int64_t>& ks, bool rounded, int64_t limit, bool avx2_only) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x [M, K] fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() &&
                  q.size(1) == x.size(1), "q [V, K] int8");
  const int64_t V = q.size(0);
  for (const auto* t : {&scale, &err, &nq, &tiny})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == V && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(), "scale / err / nq / tiny: [V] fp32");
  TORCH_CHECK(x.size(0) <= 64, "head screen: at most 64 input rows");
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == x.size(0), "head screen: one k per input row");
  for (const int64_t k : ks) TORCH_CHECK(k >= 1, "head screen: k >= 1");
  const Rows r = rows_for(x, avx2_only);
  const Head h{q.data_ptr<int8_t>(), scale.data_ptr<float>(), err.data_ptr<float>(),
               nq.data_ptr<float>(), tiny.data_ptr<float>(), V};
  return screen_impl(r, h, ks, rounded, limit);
}

// The screen values s [M, V] alone (no bound): tests compare the dot layouts with them
torch::Tensor values(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                     bool avx2_only) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.size(0) <= 64, "x [M <= 64, K] fp32");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() &&
                  q.size(1) == x.size(1) && scale.numel() == q.size(0) &&
                  scale.scalar_type() == at::kFloat && scale.is_contiguous(), "q [V, K], scale [V]");
  const Rows r = rows_for(x, avx2_only);
  const int64_t V = q.size(0), M = r.M;
  const std::vector<float> zeros((V + kGrain - 1) / kGrain * kGrain, 0.f);  // no bound terms
  const Head h{q.data_ptr<int8_t>(), scale.data_ptr<float>(), zeros.data(), zeros.data(),
               zeros.data(), V};
  const Dots d = dot_all(r, h);
  auto out = torch::empty({M, V}, torch::kFloat32);
  for (int64_t m = 0; m < M; ++m)
    std::copy(d.s.begin() + m * d.ld, d.s.begin() + m * d.ld + V, out.data_ptr<float>() + m * V);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vnni", &vnni, QWEN35_NOGIL, "this CPU has AVX512-VNNI (the screen's int8 x int8 dots run here)");
  m.def("set_lanes_min_rows", &set_lanes_min_rows, QWEN35_NOGIL,
        "input rows from which VNNI screens take the lanes layout (> 16: never); returns the old");
  m.def("values", &values, QWEN35_NOGIL, "the screen values [M, V] alone (tests)");
  m.def("screen", &screen, QWEN35_NOGIL, "head_screen.py's candidates: int8 screen of lm_head + bounds");
}
