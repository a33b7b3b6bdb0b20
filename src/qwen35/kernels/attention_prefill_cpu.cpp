// Causal prefill attention on the CPU: the queries of one prompt chunk, at positions start ..
// start + Tq - 1, against its whole context read from the paged K/V cache through its block
// table. bf16 models on AVX512-BF16 CPUs over bf16 or fp8 caches (vdpbf16ps); fp32 models on
// any AVX2 + FMA CPU over fp32, bf16, fp16 or fp8 caches (FMAs, 16 lanes on AVX-512 CPUs, else 8;
// P stays fp32, as in SDPA's fp32 path). Caches are widened exactly as read. torch's CPU SDPA
// (the path this replaces, ops/attention.py prefill_attention) ran at 30-175 GFLOP/s on a 2-core
// Zen 5 where bf16 GEMMs reach 450; `bench/attention_prefill.py` times both.
//
// Flash-attention order with a fixed cut: keys in blocks of kKB aligned at absolute positions
// 0, kKB, 2 kKB, ... For one query row (query position p, query head) every block up to p's:
//   s = (q . k) * scale over the block (vdpbf16ps, the head dim's pairs in order: fp32 sums);
//   keys after p masked; m' = max(m, max s); P = exp(s - m') (0 where masked);
//   l = l exp(m - m') + sum P; O = O exp(m - m') + P V (P rounded to bf16, V bf16, fp32 sums,
//   keys in order)
// and o = round_bf16(O / l). Each row's arithmetic depends on its position and its keys alone:
// not on how the prompt was cut into chunks, on a prefix-cache hit, the batch or the threads,
// so a chunked prompt, a prefix hit and a whole prompt give the same bits.
//
// Layout: K and V of the context are first packed per KV head and key block (parallel over
// blocks): K as [hd / 2][kKB] pairs (k_t[2d], k_t[2d + 1]) so that one 64-byte load holds 16
// keys' pairs of one head-dim pair, which a broadcast query pair meets in one vdpbf16ps (16
// scores a register, no horizontal sums); V as [kKB / 2][hd] pairs (v_2u[j], v_2u+1[j]) for
// P V (16 outputs a register, two keys a step). A task is one KV head and kQB query positions,
// its R query heads (GQA) together: rows (position, head), tiles of kSR rows x kKB keys for
// the scores and kPR rows x 128 head dims for P V. Threads take tasks one at a time, the latest
// query blocks (the most causal work) first, so they finish together.
#include <ATen/Parallel.h>
#include "torch_ext.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "cpu_isa.h"
#include "vec_avx2.h"

namespace {

#define TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

constexpr int kKB = 64;   // keys a block
constexpr int kQB = 16;   // query positions a task
constexpr int kSR = 6;    // rows a scores tile (6 x 4 accumulators)
constexpr int kPR = 3;    // rows a P V tile (3 x 8 accumulators)
constexpr int kPH = 128;  // head dims a P V tile (then 64 / 32 for the rest)

// exp(x) by vec_avx2.h exp8's scheme (range reduction by ln 2, degree-5 polynomial), 16 lanes
TARGET_AVX512_BF16 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)),
                    _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.f));
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

inline uint16_t bf16_bits(uint16_t v) { return v; }
inline uint16_t bf16_bits(c10::Float8_e4m3fn v) {  // exact: e4m3 has 4 significant bits
  const float f = static_cast<float>(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// A context's K / V in the paged cache: rows of hd values, through the block row
template <typename KV>
struct Pages {
  const KV *k, *v;
  const int32_t* row;
  int64_t bs, sblock, stok, hd, ctx;
  // fn(t, k row, v row) for KV head h's positions b kKB + t below ctx, t < kKB ascending
  template <typename F>
  void block_rows(int64_t h, int64_t b, F&& fn) const {
    for (int t = 0; t < kKB && b * kKB + t < ctx; ++t) {
      const int64_t pos = b * kKB + t;
      const int64_t off = row[pos / bs] * sblock + (pos % bs) * stok + h * hd;
      fn(t, k + off, v + off);
    }
  }
};

template <typename KV>
Pages<KV> pages_of(const torch::Tensor& kc, const torch::Tensor& vc, const torch::Tensor& row,
                   int64_t ctx) {
  return {reinterpret_cast<const KV*>(kc.data_ptr()), reinterpret_cast<const KV*>(vc.data_ptr()),
          row.data_ptr<int32_t>(), kc.size(1), kc.stride(0), kc.stride(1), kc.size(3), ctx};
}

// K / V of block b of KV head h as bf16 pairs (keys past ctx: 0)
template <typename KV>
void pack_block(const Pages<KV>& pg, int64_t h, int64_t b, uint32_t* kp, uint32_t* vp) {
  const int64_t hd = pg.hd;
  std::vector<uint16_t> kb(kKB * hd, 0), vb(kKB * hd, 0);  // [key][hd]
  pg.block_rows(h, b, [&](int t, const KV* k, const KV* v) {
    for (int64_t j = 0; j < hd; ++j) {
      kb[t * hd + j] = bf16_bits(k[j]);
      vb[t * hd + j] = bf16_bits(v[j]);
    }
  });
  for (int64_t d = 0; d < hd / 2; ++d)  // K: [hd / 2][kKB] pairs
    for (int t = 0; t < kKB; ++t)
      kp[d * kKB + t] = kb[t * hd + 2 * d] | static_cast<uint32_t>(kb[t * hd + 2 * d + 1]) << 16;
  for (int u = 0; u < kKB / 2; ++u)  // V: [kKB / 2][hd] pairs
    for (int64_t j = 0; j < hd; ++j)
      vp[u * hd + j] = vb[2 * u * hd + j] | static_cast<uint32_t>(vb[(2 * u + 1) * hd + j]) << 16;
}

// s[r][t] = (q_r . k_t) * scale for MR rows (q: bf16 rows of hd, as pairs) and the block's keys
template <int MR>
TARGET_AVX512_BF16 void scores_tile(const uint32_t* const* q, const uint32_t* kp, int64_t hd,
                                    float scale, float* s) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd / 2; ++d) {
    __m512bh k[4];
    for (int c = 0; c < 4; ++c) k[c] = (__m512bh)_mm512_loadu_si512(kp + d * kKB + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][d]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qv, k[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * kKB + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

// O[r][j0 .. j0 + 16 C) = O alpha_r + sum over the block's key pairs u (in order) of P V
template <int MR, int C>
TARGET_AVX512_BF16 void pv_tile(const uint32_t* const* p, const float* alpha, const uint32_t* vp,
                                int64_t hd, int64_t j0, int pairs, float* const* o) {
  __m512 acc[MR][C];
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + j0 + 16 * c), a);
  }
  for (int u = 0; u < pairs; ++u) {
    __m512bh v[C];
    for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + u * hd + j0 + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r][u]));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pv, v[c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o[r] + j0 + 16 * c, acc[r][c]);
}

#define TILE_SWITCH(n, F, ...)                 \
  switch (n) {                                 \
    case 1: F<1>(__VA_ARGS__); break;          \
    case 2: F<2>(__VA_ARGS__); break;          \
    case 3: F<3>(__VA_ARGS__); break;          \
    case 4: F<4>(__VA_ARGS__); break;          \
    case 5: F<5>(__VA_ARGS__); break;          \
    default: F<6>(__VA_ARGS__); break;         \
  }

// One task: KV head h, query positions [i0, i1) of the chunk, its R query heads; block(b): KV
// head h's packed block b (K, V pointers).
template <typename Block>
TARGET_AVX512_BF16 void task(const uint16_t* Q, uint16_t* O, Block&& block, int64_t h, int64_t R,
                             int64_t nh, int64_t hd, int64_t i0, int64_t i1, int64_t start,
                             float scale) {
  const int64_t rows = (i1 - i0) * R;
  std::vector<const uint32_t*> q(rows);
  std::vector<float> acc(rows * hd, 0.f), s(kSR * kKB), m(rows, -std::numeric_limits<float>::infinity()),
      l(rows, 0.f), alpha(rows);
  std::vector<uint32_t> p(rows * (kKB / 2));
  std::vector<const uint32_t*> prow(rows);
  std::vector<float*> orow(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / R, head = h * R + r % R;
    q[r] = reinterpret_cast<const uint32_t*>(Q + (i * nh + head) * hd);
    prow[r] = p.data() + r * (kKB / 2);
    orow[r] = acc.data() + r * hd;
  }
  const int64_t last = (start + i1 - 1) / kKB;  // the block of the chunk's last position
  for (int64_t b = 0; b <= last; ++b) {
    const auto [kp, vp] = block(b);
    for (int64_t r0 = 0; r0 < rows; r0 += kSR) {
      const int mr = static_cast<int>(std::min<int64_t>(kSR, rows - r0));
      TILE_SWITCH(mr, scores_tile, q.data() + r0, kp, hd, scale, s.data());
      for (int r = 0; r < mr; ++r) {  // softmax update of row r0 + r
        const int64_t row = r0 + r, pos = start + i0 + row / R;
        const int64_t valid = std::min<int64_t>(kKB, pos - b * kKB + 1);  // keys <= pos
        float* sr = s.data() + r * kKB;
        uint16_t* pr = reinterpret_cast<uint16_t*>(p.data() + row * (kKB / 2));
        if (valid <= 0) {  // the whole block after this position: nothing changes
          alpha[row] = 1.f;
          std::memset(pr, 0, kKB * 2);
          continue;
        }
        const __mmask64 mask64 = valid >= 64 ? ~0ull : (1ull << valid) - 1;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int c = 0; c < 4; ++c)
          mx = _mm512_mask_max_ps(mx, static_cast<__mmask16>(mask64 >> (16 * c)), mx,
                                  _mm512_loadu_ps(sr + 16 * c));
        const float mnew = std::max(m[row], _mm512_reduce_max_ps(mx));
        alpha[row] = std::exp(m[row] - mnew);  // 0 at the first block (m = -inf)
        m[row] = mnew;
        __m512 sum = _mm512_setzero_ps();
        const __m512 vm = _mm512_set1_ps(mnew);
        for (int c = 0; c < 4; ++c) {
          const __mmask16 k16 = static_cast<__mmask16>(mask64 >> (16 * c));
          const __m512 e = _mm512_maskz_mov_ps(k16, exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * c), vm)));
          sum = _mm512_add_ps(sum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + 16 * c), (__m256i)_mm512_cvtneps_pbh(e));
        }
        l[row] = l[row] * alpha[row] + _mm512_reduce_add_ps(sum);
      }
    }
    const int pairs = static_cast<int>(std::min<int64_t>(kKB, start + i1 - b * kKB) + 1) / 2;
    for (int64_t r0 = 0; r0 < rows; r0 += kPR) {
      const int mr = static_cast<int>(std::min<int64_t>(kPR, rows - r0));
      for (int64_t j0 = 0; j0 < hd;) {  // head dims 128 at a time, then 64 / 32
        const int c = hd - j0 >= kPH ? kPH / 16 : hd - j0 >= 64 ? 4 : 2;
        const uint32_t* const* pr = prow.data() + r0;
        const float* al = alpha.data() + r0;
        float* const* orr = orow.data() + r0;
#define PV(MR, C) pv_tile<MR, C>(pr, al, vp, hd, j0, pairs, orr)
        if (c == 8) {
          if (mr == 1) PV(1, 8); else if (mr == 2) PV(2, 8); else PV(3, 8);
        } else if (c == 4) {
          if (mr == 1) PV(1, 4); else if (mr == 2) PV(2, 4); else PV(3, 4);
        } else {
          if (mr == 1) PV(1, 2); else if (mr == 2) PV(2, 2); else PV(3, 2);
        }
#undef PV
        j0 += 16 * c;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / R, head = h * R + r % R;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    uint16_t* out = O + (i * nh + head) * hd;
    for (int64_t j = 0; j < hd; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(orow[r] + j), inv)));
  }
}

// The context packed block by block (pack(h, b, kp, vp): KV head h's block b into kn / vn
// elements), then the tasks (task(block, h, i0, i1): KV head h, query positions [i0, i1),
// block(b) its packed block b), handed out one at a time, latest query blocks first. A chunk of
// one query block (Tq <= kQB: speculative verification, short prompts after a prefix) has one
// task a KV head, which packs each block as it reaches it into a buffer of one block: no
// context-sized buffers (at 8K tokens of fp32 K / V, 32 MB, whose fresh pages cost more than
// the attention).
template <typename P, typename Pack, typename Task>
void run_tasks(int64_t Tq, int64_t nkv, int64_t ctx, int64_t kn, int64_t vn, Pack&& pack,
               Task&& task) {
  const int64_t nblk = (ctx + kKB - 1) / kKB;
  const int64_t nqb = (Tq + kQB - 1) / kQB;
  if (nqb == 1) {
    at::parallel_for(0, nkv, 1, [&](int64_t a, int64_t z) {
      std::unique_ptr<P[]> kb(new P[kn]), vb(new P[vn]);
      for (int64_t h = a; h < z; ++h) {
        const auto block = [&](int64_t b) {
          pack(h, b, kb.get(), vb.get());
          return std::pair<const P*, const P*>(kb.get(), vb.get());
        };
        task(block, h, int64_t{0}, Tq);
      }
    });
    return;
  }
  std::unique_ptr<P[]> kp(new P[nkv * nblk * kn]), vp(new P[nkv * nblk * vn]);
  at::parallel_for(0, nkv * nblk, 1, [&](int64_t a, int64_t z) {
    for (int64_t t = a; t < z; ++t) pack(t / nblk, t % nblk, kp.get() + t * kn, vp.get() + t * vn);
  });
  // tasks handed out one at a time, the latest query blocks (the most keys) first
  std::atomic<int64_t> next{0};
  const int64_t tasks = nkv * nqb;
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
      const int64_t qb = nqb - 1 - t / nkv;
      const int64_t h = t % nkv;
      const auto block = [&](int64_t b) {
        return std::pair<const P*, const P*>(kp.get() + (h * nblk + b) * kn,
                                             vp.get() + (h * nblk + b) * vn);
      };
      task(block, h, qb * kQB, std::min(Tq, (qb + 1) * kQB));
    }
  });
}

template <typename KV>
void run(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
         const torch::Tensor& row, int64_t start, double scale, torch::Tensor& out) {
  const int64_t Tq = q.size(0), nh = q.size(1), hd = q.size(2), nkv = kc.size(2);
  const Pages<KV> pg = pages_of<KV>(kc, vc, row, start + Tq);
  const uint16_t* Q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  run_tasks<uint32_t>(
      Tq, nkv, start + Tq, (hd / 2) * kKB, (kKB / 2) * hd,
      [&](int64_t h, int64_t b, uint32_t* kp, uint32_t* vp) { pack_block(pg, h, b, kp, vp); },
      [&](auto&& block, int64_t h, int64_t i0, int64_t i1) {
        task(Q, O, block, h, nh / nkv, nh, hd, i0, i1, start, static_cast<float>(scale));
      });
}

// ---- fp32 models: AVX2 + FMA, 8 lanes (16 on AVX-512 CPUs) ----------------------------------
// K packed as [hd][kKB] (a head dim's 64 keys in a row), V as [kKB][hd], both fp32; scores in
// tiles of kSR rows x 16 keys, P V in tiles of kPR rows x 32 head dims; P kept in fp32.

#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 cache values widened to fp32 (exact for every cache dtype)
template <typename KV>
TARGET_AVX2 inline __m256 widen8(const KV* p) {
  if constexpr (std::is_same_v<KV, c10::Float8_e4m3fn>) {
    alignas(32) float f[8];
    for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
    return _mm256_load_ps(f);
  } else {
    return vec8::load8(p);
  }
}

// K / V of block b of KV head h in fp32: K [hd][kKB], V [kKB][hd] (keys past ctx: 0); K in
// 8 x 8 transposes (a 4-query chunk at 8K spent most of its time here, value by value)
template <typename KV>
TARGET_AVX2 void pack_block_f32(const Pages<KV>& pg, int64_t h, int64_t b, float* kp, float* vp) {
  const int64_t hd = pg.hd;
  const KV* krow[kKB];
  int n = 0;  // keys in this block
  pg.block_rows(h, b, [&](int t, const KV* k, const KV* v) {
    krow[t] = k;
    n = t + 1;
    for (int64_t j = 0; j < hd; j += 8) _mm256_storeu_ps(vp + t * hd + j, widen8(v + j));
  });
  std::fill(vp + n * hd, vp + kKB * hd, 0.f);
  for (int t0 = 0; t0 < kKB; t0 += 8)
    for (int64_t j0 = 0; j0 < hd; j0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = t0 + i < n ? widen8(krow[t0 + i] + j0) : _mm256_setzero_ps();
      vec8::transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kp + (j0 + i) * kKB + t0, r[i]);
    }
}

template <int MR>
TARGET_AVX2 void scores_tile_f32(const float* const* q, const float* kp, int64_t hd, float scale,
                                 float* s) {
  for (int c0 = 0; c0 < kKB; c0 += 16) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; ++d) {
      const __m256 k0 = _mm256_loadu_ps(kp + d * kKB + c0), k1 = _mm256_loadu_ps(kp + d * kKB + c0 + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q[r] + d);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
      }
    }
    const __m256 sc = _mm256_set1_ps(scale);
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(s + r * kKB + c0, _mm256_mul_ps(acc[r][0], sc));
      _mm256_storeu_ps(s + r * kKB + c0 + 8, _mm256_mul_ps(acc[r][1], sc));
    }
  }
}

template <int MR>
TARGET_AVX2 void pv_tile_f32(const float* const* p, const float* alpha, const float* vp,
                             int64_t hd, int keys, float* const* o) {
  for (int64_t j0 = 0; j0 < hd; j0 += 32) {
    __m256 acc[MR][4];
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_set1_ps(alpha[r]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_mul_ps(_mm256_loadu_ps(o[r] + j0 + 8 * c), a);
    }
    for (int t = 0; t < keys; ++t) {
      __m256 v[4];
      for (int c = 0; c < 4; ++c) v[c] = _mm256_loadu_ps(vp + t * hd + j0 + 8 * c);
      for (int r = 0; r < MR; ++r) {
        const __m256 pv = _mm256_broadcast_ss(p[r] + t);
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_fmadd_ps(pv, v[c], acc[r][c]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o[r] + j0 + 8 * c, acc[r][c]);
  }
}

// The same two tiles with 16 lanes (AVX-512 CPUs): 64 keys a row, 128 (or 32) head dims a pass.
// Every lane sums the same terms in the same order as above: the results are bitwise the 8-lane
// path's (tests run both).
template <int MR>
TARGET_AVX512 void scores_tile_f32x16(const float* const* q, const float* kp, int64_t hd,
                                           float scale, float* s) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    __m512 k[4];
    for (int c = 0; c < 4; ++c) k[c] = _mm512_loadu_ps(kp + d * kKB + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r][d]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(qv, k[c], acc[r][c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + r * kKB + 16 * c, _mm512_mul_ps(acc[r][c], sc));
}

template <int MR, int C>
TARGET_AVX512 void pv_tile_f32x16(const float* const* p, const float* alpha, const float* vp,
                                       int64_t hd, int keys, float* const* o) {
  for (int64_t j0 = 0; j0 < hd; j0 += 16 * C) {
    __m512 acc[MR][C];
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(alpha[r]);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + j0 + 16 * c), a);
    }
    for (int t = 0; t < keys; ++t) {
      __m512 v[C];
      for (int c = 0; c < C; ++c) v[c] = _mm512_loadu_ps(vp + t * hd + j0 + 16 * c);
      for (int r = 0; r < MR; ++r) {
        const __m512 pv = _mm512_set1_ps(p[r][t]);
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(pv, v[c], acc[r][c]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(o[r] + j0 + 16 * c, acc[r][c]);
  }
}

// the softmax update of one row over a block's scores s (valid keys first, >= 1): P into p
TARGET_AVX2 void softmax_row_f32(const float* s, int valid, float* m, float* l, float* alpha,
                                 float* p) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < valid; ++t) mx = std::max(mx, s[t]);
  const float mnew = std::max(*m, mx);
  *alpha = std::exp(*m - mnew);
  *m = mnew;
  const __m256 vm = _mm256_set1_ps(mnew);
  __m256 sum = _mm256_setzero_ps();
  for (int t = 0; t < kKB; t += 8) {
    const __m256 e = vec8::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
    const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(t), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lane));
    const __m256 pe = _mm256_and_ps(e, keep);
    sum = _mm256_add_ps(sum, pe);
    _mm256_storeu_ps(p + t, pe);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.f;
  for (float v : lanes) total += v;
  *l = *l * *alpha + total;
}

template <typename Block>
TARGET_AVX2 void task_f32(const float* Q, float* O, Block&& block, int64_t h, int64_t R,
                          int64_t nh, int64_t hd, int64_t i0, int64_t i1, int64_t start,
                          float scale, bool wide) {
  const int64_t rows = (i1 - i0) * R;
  std::vector<const float*> q(rows), prow(rows);
  std::vector<float*> orow(rows);
  std::vector<float> acc(rows * hd, 0.f), s(kSR * kKB), p(rows * kKB),
      m(rows, -std::numeric_limits<float>::infinity()), l(rows, 0.f), alpha(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / R, head = h * R + r % R;
    q[r] = Q + (i * nh + head) * hd;
    prow[r] = p.data() + r * kKB;
    orow[r] = acc.data() + r * hd;
  }
  const int64_t last = (start + i1 - 1) / kKB;
  for (int64_t b = 0; b <= last; ++b) {
    const auto [kp, vp] = block(b);
    for (int64_t r0 = 0; r0 < rows; r0 += kSR) {
      const int mr = static_cast<int>(std::min<int64_t>(kSR, rows - r0));
      if (wide) {
        TILE_SWITCH(mr, scores_tile_f32x16, q.data() + r0, kp, hd, scale, s.data());
      } else {
        TILE_SWITCH(mr, scores_tile_f32, q.data() + r0, kp, hd, scale, s.data());
      }
      for (int r = 0; r < mr; ++r) {
        const int64_t row = r0 + r, pos = start + i0 + row / R;
        const int64_t valid = std::min<int64_t>(kKB, pos - b * kKB + 1);
        if (valid <= 0) {  // the whole block after this position: nothing changes
          alpha[row] = 1.f;
          std::fill(p.begin() + row * kKB, p.begin() + (row + 1) * kKB, 0.f);
          continue;
        }
        softmax_row_f32(s.data() + r * kKB, static_cast<int>(valid), &m[row], &l[row],
                        &alpha[row], p.data() + row * kKB);
      }
    }
    const int keys = static_cast<int>(std::min<int64_t>(kKB, start + i1 - b * kKB));
    for (int64_t r0 = 0; r0 < rows; r0 += kPR) {
      const int mr = static_cast<int>(std::min<int64_t>(kPR, rows - r0));
      const float* const* pr = prow.data() + r0;
      const float* al = alpha.data() + r0;
      float* const* orr = orow.data() + r0;
#define PV(MR) pv_tile_f32<MR>(pr, al, vp, hd, keys, orr)
#define PV16(MR, C) pv_tile_f32x16<MR, C>(pr, al, vp, hd, keys, orr)
      if (wide && hd % 128 == 0) {
        if (mr == 1) PV16(1, 8); else if (mr == 2) PV16(2, 8); else PV16(3, 8);
      } else if (wide) {
        if (mr == 1) PV16(1, 2); else if (mr == 2) PV16(2, 2); else PV16(3, 2);
      } else {
        if (mr == 1) PV(1); else if (mr == 2) PV(2); else PV(3);
      }
#undef PV16
#undef PV
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / R, head = h * R + r % R;
    const float inv = 1.f / l[r];
    float* out = O + (i * nh + head) * hd;
    for (int64_t j = 0; j < hd; ++j) out[j] = orow[r][j] * inv;
  }
}

template <typename KV>
void run_f32(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc,
             const torch::Tensor& row, int64_t start, double scale, torch::Tensor& out,
             bool wide) {
  const int64_t Tq = q.size(0), nh = q.size(1), hd = q.size(2), nkv = kc.size(2);
  const Pages<KV> pg = pages_of<KV>(kc, vc, row, start + Tq);
  const float* Q = q.data_ptr<float>();
  float* O = out.data_ptr<float>();
  run_tasks<float>(
      Tq, nkv, start + Tq, hd * kKB, kKB * hd,
      [&](int64_t h, int64_t b, float* kp, float* vp) { pack_block_f32(pg, h, b, kp, vp); },
      [&](auto&& block, int64_t h, int64_t i0, int64_t i1) {
        task_f32(Q, O, block, h, nh / nkv, nh, hd, i0, i1, start, static_cast<float>(scale),
                 wide);
      });
}

bool supported() { return cpu_isa::avx512_bf16(); }

torch::Tensor prefill_attention(const torch::Tensor& q, const torch::Tensor& key_cache,
                                const torch::Tensor& value_cache, const torch::Tensor& block_row,
                                int64_t start, double scale, bool avx2_only) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "prefill_attention: q [Tq, nh, hd] bf16 or fp32 contiguous expected");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16 || supported(), "prefill_attention: bf16 queries need an AVX512-BF16 CPU");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() &&
                  key_cache.scalar_type() == value_cache.scalar_type() &&
                  key_cache.stride(3) == 1 && key_cache.stride(2) == key_cache.size(3) &&
                  key_cache.strides() == value_cache.strides(),
              "prefill_attention: caches [blocks, bs, nkv, hd] with rows of hd contiguous expected");
  const int64_t hd = q.size(2), nh = q.size(1), nkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == hd && hd % 32 == 0 && nh % nkv == 0,
              "prefill_attention: head dim a multiple of 32, query heads a multiple of KV heads");
  TORCH_CHECK(block_row.dim() == 1 && block_row.scalar_type() == at::kInt && block_row.is_contiguous(),
              "prefill_attention: block_row [W] int32 expected");
  TORCH_CHECK(start >= 0 && (start + q.size(0) + key_cache.size(1) - 1) / key_cache.size(1) <=
                                block_row.size(0),
              "prefill_attention: the block row is shorter than the context");
  auto out = torch::empty_like(q);
  if (q.size(0) == 0) return out;
  const auto kv = key_cache.scalar_type();
  const bool wide = !avx2_only && cpu_isa::avx512();  // fp32: the 16-lane tiles
  if (bf16 && kv == at::kBFloat16)
    run<uint16_t>(q, key_cache, value_cache, block_row, start, scale, out);
  else if (bf16 && kv == at::kFloat8_e4m3fn)
    run<c10::Float8_e4m3fn>(q, key_cache, value_cache, block_row, start, scale, out);
  else if (!bf16 && kv == at::kFloat)
    run_f32<float>(q, key_cache, value_cache, block_row, start, scale, out, wide);
  else if (!bf16 && kv == at::kBFloat16)
    run_f32<c10::BFloat16>(q, key_cache, value_cache, block_row, start, scale, out, wide);
  else if (!bf16 && kv == at::kHalf)
    run_f32<c10::Half>(q, key_cache, value_cache, block_row, start, scale, out, wide);
  else if (!bf16 && kv == at::kFloat8_e4m3fn)
    run_f32<c10::Float8_e4m3fn>(q, key_cache, value_cache, block_row, start, scale, out, wide);
  else
    TORCH_CHECK(false, "prefill_attention: caches of ", kv, " under ", q.scalar_type(),
                " queries: bf16 takes bf16 or fp8 (e4m3) caches, fp32 fp32 / bf16 / fp16 / fp8");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill_attention", &prefill_attention, QWEN35_NOGIL,
        "causal attention of q [Tq, nh, hd] bf16 / fp32 at positions start.. over the paged K/V of "
        "positions 0 .. start + Tq - 1",
        py::arg("q"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_row"),
        py::arg("start"), py::arg("scale"), py::arg("avx2_only") = false);
  m.def("bf16_supported", &supported, QWEN35_NOGIL, "bf16 queries run here (an AVX512-BF16 CPU)");
}
