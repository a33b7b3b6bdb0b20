// Paged decode attention on the CPU: one query token per sequence against its cached K/V, read
// in place through its block table (the PyTorch path gathers every block of the context into a
// new tensor per layer per step, then runs SDPA: ops/attention.py decode_attention).
//
// One task per (sequence, KV head), walking the context page by page (the next page prefetched);
// up to 4 query heads sharing that KV head (GQA) are done together, so each K and V row is
// loaded once for them and the P.V accumulators stay in registers across a page; 16 lanes on
// AVX512 CPUs, 8 elsewhere. Scores, softmax and the weighted sum of V run in fp32 (bf16 caches
// on AVX512-BF16 CPUs: the bf16 q.k products summed by vdpbf16ps, then scaled); the output is
// rounded to the model dtype once, then multiplied by sigmoid(gate) rounded as the reference does
// (o.mul_(torch.sigmoid(gate)) in the model dtype). Each task's arithmetic is independent of the
// batch, so batched and single-sequence results are bitwise equal. The caches hold the model
// dtype, or bf16 / fp16 under an fp32 model (--kv-cache-dtype: half the bytes a long context
// reads per token; the fp32 query against them as against an fp32 cache), or fp8 e4m3 under
// any model (widened exactly as read, as value x 2^-8: kKvScale). bench/attention_cpu.py
// times it against its AVX2 path and the gather + SDPA path.
#include <ATen/Parallel.h>
#include "torch_ext.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_isa.h"
#include "gemv_rows.h"
#include "small_rows.h"
#include "vec_avx2.h"

namespace {

using namespace vec8;

#define TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))


// The kernel walks a context page by page: a page holds n <= bs consecutive positions, whose K
// (or V) rows for one KV head lie `stride` elements apart. R <= 4 query heads of the GQA group
// are done together, so each K / V row is loaded once for all of them. Score rows have stride L
// (the positions a task covers).

// Memory: the pages of a context lie anywhere in the cache (block tables), so the hardware
// prefetchers can't run ahead of a task; cold K / V (a decode step streams its weights between
// the attention layers) were read at a quarter of the bandwidth a plain sum reaches. Each page
// function therefore touches row t of the next page (`next`, `nn` rows; same KV head) while it
// computes row t, into L1, and the task sends the pages kAhead further into L2 as it goes.
constexpr int kL1 = 3, kL2 = 2;  // __builtin_prefetch locality: prefetcht0, prefetcht1
template <int Locality = kL1>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64)
    __builtin_prefetch(static_cast<const char*>(p) + b, 0, Locality);
}

// fp8 (e4m3fn) caches are read as value x 2^-8, exactly: each byte sign-extended to 16 bits and
// shifted left by 7 is the fp16 of that once bit 14 (a sign copy) is cleared, subnormals included
// (the NaN byte, never written by a saturating cast of finite values, reads as 480). The 2^8
// goes into the query's scale and the output's normaliser instead (kKvScale): powers of two,
// so the sums are those of the exact values, bit for bit.
template <typename KV>
constexpr float kKvScale = std::is_same_v<KV, c10::Float8_e4m3fn> ? 256.f : 1.f;

inline __m256 kv_load8(const c10::Float8_e4m3fn* p) {
  const __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtph_ps(
      _mm_and_si128(_mm_slli_epi16(b, 7), _mm_set1_epi16(static_cast<int16_t>(0xBFFF))));
}
template <typename KV>
inline __m256 kv_load8(const KV* p) {
  return load8(p);
}
template <typename KV>
inline float kv_value(KV x) {  // one element, as the loads give it
  return static_cast<float>(x) * (1.f / kKvScale<KV>);
}

// s[r * L + t] = q_r . k_t for the page's positions t < n (q: R rows of hd, scaled, fp32)
template <int R, typename T>
void scores_page(const float* q, int64_t hd, const T* k, int64_t stride, int n, float* s,
                 int64_t L, const T* next, int nn) {
  for (int t = 0; t < n; ++t, k += stride) {
    if (t < nn) prefetch_bytes(next + t * stride, hd * static_cast<int64_t>(sizeof(T)));
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= hd; j += 8) {
      const __m256 kv = kv_load8(k + j);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * hd + j), kv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float out = gemv_rows::hsum8(acc[r]);
      for (int64_t jj = j; jj < hd; ++jj) out += q[r * hd + jj] * kv_value(k[jj]);
      s[r * L + t] = out;
    }
  }
}

// acc[r * hd + j] += sum over the page's t of p[r * L + t] * v_t[j], t ascending (each
// accumulator is kept in registers across the page)
template <int R, typename T>
void pv_page(const float* p, int64_t L, const T* v, int64_t stride, int n, float* acc,
             int64_t hd, const T* next, int nn) {
  int64_t j = 0;
  for (; j + 16 <= hd; j += 16) {
    if (j * static_cast<int64_t>(sizeof(T)) % 64 == 0)  // the next page's lines of these lanes
      for (int t = 0; t < nn; ++t)
        prefetch_bytes(next + t * stride + j, 16 * static_cast<int64_t>(sizeof(T)));
    __m256 a[R][2];
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_loadu_ps(acc + r * hd + j);
      a[r][1] = _mm256_loadu_ps(acc + r * hd + j + 8);
    }
    const T* vp = v + j;
    for (int t = 0; t < n; ++t, vp += stride) {
      const __m256 v0 = kv_load8(vp), v1 = kv_load8(vp + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 pr = _mm256_set1_ps(p[r * L + t]);
        a[r][0] = _mm256_fmadd_ps(pr, v0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(pr, v1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(acc + r * hd + j, a[r][0]);
      _mm256_storeu_ps(acc + r * hd + j + 8, a[r][1]);
    }
  }
  for (; j < hd; ++j)
    for (int r = 0; r < R; ++r) {
      float a = acc[r * hd + j];
      for (int t = 0; t < n; ++t)
        a = std::fma(p[r * L + t], kv_value(v[t * stride + j]), a);
      acc[r * hd + j] = a;
    }
}

// AVX512 CPUs, 16 lanes: bf16 caches (on AVX512-BF16 CPUs, hd % 32 == 0) take their scores from
// the bf16 query and key products (exact in fp32, vdpbf16ps), scaled after the sum; fp32 / fp16
// caches (hd % 16 == 0) from the scaled fp32 query, as the AVX2 path; P.V with 64 fp32 lanes a
// pass.
TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TARGET_AVX512 inline __m512 load16(const c10::Half* p) {  // exact
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
TARGET_AVX512 inline __m512 load16(const c10::BFloat16* p) {  // exact
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TARGET_AVX512 inline __m512 load16(const c10::Float8_e4m3fn* p) {  // value x 2^-8: kv_load8's way
  const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(
      _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF))));
}

// 32 keys as bf16 pairs for vdpbf16ps: bf16 as stored; e4m3 widened exactly (load16), then
// packed to bf16 exactly (an e4m3 value has 4 significant bits)
TARGET_AVX512_BF16 inline __m512bh load32bh(const c10::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}
TARGET_AVX512_BF16 inline __m512bh load32bh(const c10::Float8_e4m3fn* p) {
  return _mm512_cvtne2ps_pbh(load16(p + 16), load16(p));
}

// a bf16 model's scores over bf16 or fp8 keys: the bf16 query and key products (exact in fp32)
// summed by vdpbf16ps, then scaled
template <int R, typename KV>
TARGET_AVX512_BF16 void scores_page_bf16(const c10::BFloat16* q, int64_t hd, const KV* k,
                                         int64_t stride, int n, float* s, int64_t L, float scale,
                                         const KV* next, int nn) {
  for (int t = 0; t < n; ++t, k += stride) {
    if (t < nn) prefetch_bytes(next + t * stride, hd * static_cast<int64_t>(sizeof(KV)));
    __m512 acc[R][2];  // two chains a head: vdpbf16ps's latency
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= hd; j += 64)
      for (int u = 0; u < 2; ++u) {
        const __m512bh kv = load32bh(k + j + 32 * u);
        for (int r = 0; r < R; ++r)
          acc[r][u] = _mm512_dpbf16_ps(
              acc[r][u], (__m512bh)_mm512_loadu_si512(q + r * hd + j + 32 * u), kv);
      }
    for (; j < hd; j += 32) {
      const __m512bh kv = load32bh(k + j);
      for (int r = 0; r < R; ++r)
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_loadu_si512(q + r * hd + j), kv);
    }
    for (int r = 0; r < R; ++r)
      s[r * L + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) * scale;
  }
}

template <int R, typename T>  // fp32 / fp16 caches: q scaled, in fp32
TARGET_AVX512 void scores_page512(const float* q, int64_t hd, const T* k, int64_t stride, int n,
                                  float* s, int64_t L, const T* next, int nn) {
  for (int t = 0; t < n; ++t, k += stride) {
    if (t < nn) prefetch_bytes(next + t * stride, hd * static_cast<int64_t>(sizeof(T)));
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= hd; j += 32)
      for (int u = 0; u < 2; ++u) {
        const __m512 kv = load16(k + j + 16 * u);
        for (int r = 0; r < R; ++r)
          acc[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * hd + j + 16 * u), kv, acc[r][u]);
      }
    if (j < hd) {  // hd % 16 == 0
      const __m512 kv = load16(k + j);
      for (int r = 0; r < R; ++r)
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * hd + j), kv, acc[r][0]);
    }
    for (int r = 0; r < R; ++r)
      s[r * L + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
}

// lanes [j, j + 16 C) of the R accumulators, over the page
template <int R, int C, typename T>
TARGET_AVX512 inline void pv_lanes512(const float* p, int64_t L, const T* vp, int64_t stride,
                                      int n, float* acc, int64_t hd, const T* next, int nn) {
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_loadu_ps(acc + r * hd + 16 * c);
  for (int t = 0; t < n; ++t, vp += stride) {
    if (t < nn) prefetch_bytes(next + t * stride, 16 * C * static_cast<int64_t>(sizeof(T)));
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load16(vp + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * L + t]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(pr, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * hd + 16 * c, a[r][c]);
}

template <int R, typename T>  // hd % 16 == 0
TARGET_AVX512 void pv_page512(const float* p, int64_t L, const T* v, int64_t stride, int n,
                              float* acc, int64_t hd, const T* next, int nn) {
  int64_t j = 0;
  for (; j + 64 <= hd; j += 64)
    pv_lanes512<R, 4>(p, L, v + j, stride, n, acc + j, hd, next + j, nn);
  for (; j < hd; j += 16) pv_lanes512<R, 1>(p, L, v + j, stride, n, acc + j, hd, next + j, nn);
}

// a bf16 model over bf16 or fp8 caches: scores_page_bf16 runs (with `fast`, bf16_dots below)
template <typename T, typename KV>
constexpr bool kBf16Dots = std::is_same_v<T, c10::BFloat16> &&
                           (std::is_same_v<KV, c10::BFloat16> ||
                            std::is_same_v<KV, c10::Float8_e4m3fn>);

// those pairs take it on AVX512-BF16 CPUs with hd % 32 == 0 (fast_path: bf16 caches need it)
bool bf16_dots(bool fast, int64_t hd) { return fast && hd % 32 == 0 && cpu_isa::avx512_bf16(); }

// fast: the AVX512 paths (fast_path below); dots: bf16_dots
template <typename T, typename KV>
inline void scores_group(int R, bool fast, bool dots, const T* qT, const float* qf, int64_t hd,
                         const KV* k, int64_t stride, int n, float* s, int64_t L, float scale,
                         const KV* next, int nn) {
  if constexpr (kBf16Dots<T, KV>) {
    if (dots) {
      DISPATCH_MR(R, scores_page_bf16, qT, hd, k, stride, n, s, L, scale, next, nn);
      return;
    }
  }
  if constexpr (!std::is_same_v<T, c10::BFloat16> || !std::is_same_v<KV, c10::BFloat16>) {
    if (fast) {
      DISPATCH_MR(R, scores_page512, qf, hd, k, stride, n, s, L, next, nn);
      return;
    }
  }
  DISPATCH_MR(R, scores_page, qf, hd, k, stride, n, s, L, next, nn);
}

template <typename KV>
inline void pv_group(int R, bool fast, const float* p, int64_t L, const KV* v, int64_t stride,
                     int n, float* acc, int64_t hd, const KV* next, int nn) {
  if (fast) {
    DISPATCH_MR(R, pv_page512, p, L, v, stride, n, acc, hd, next, nn);
    return;
  }
  DISPATCH_MR(R, pv_page, p, L, v, stride, n, acc, hd, next, nn);
}

// p = exp(s - max(s)) in place; returns sum(p), max(s) in *max_out
inline float softmax_numerator(float* s, int64_t n, float* max_out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
  *max_out = m;
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vsum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, p);
    vsum = _mm256_add_ps(vsum, p);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vsum);
  float sum = 0.f;
  for (float v : lanes) sum += v;
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - m);
    sum += s[i];
  }
  return sum;
}

// o = round(acc * inv) in T, times round(sigmoid(gate)) in T when gated (the reference's
// o.mul_(torch.sigmoid(gate)) in the model dtype)
template <typename T>
void finish_row(const float* acc, float inv, const T* gate, T* o, int64_t hd) {
  const __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 8 <= hd; j += 8) {
    __m256 oj = round8<T>(_mm256_mul_ps(_mm256_loadu_ps(acc + j), vinv));
    if (gate != nullptr) {
      const __m256 g = load8(gate + j);
      const __m256 sig = round8<T>(
          _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)))));
      oj = _mm256_mul_ps(oj, sig);
    }
    store8(o + j, oj);
  }
  for (; j < hd; ++j) {
    const T oj = static_cast<T>(acc[j] * inv);
    if (gate == nullptr) {
      o[j] = oj;
    } else {
      const T sig = static_cast<T>(1.f / (1.f + std::exp(-static_cast<float>(gate[j]))));
      o[j] = static_cast<T>(static_cast<float>(oj) * static_cast<float>(sig));
    }
  }
}

// a page's n rows of one KV head towards the caches (L1 or L2)
template <int Locality, typename T>
inline void prefetch_page(const T* row, int64_t stride, int64_t n, int64_t hd) {
  for (int64_t t = 0; t < n; ++t, row += stride)
    prefetch_bytes<Locality>(row, hd * static_cast<int64_t>(sizeof(T)));
}

// pages ahead a task sends into L2 (bench/attention_cpu.py --cold, Zen 4: 1 page ahead into L1
// only, as before, 6-8 GB/s of K / V; the next page's rows row by row into L1 plus 4 pages ahead
// into L2, 10-16 GB/s; 8 ahead no better than 4)
constexpr int64_t kAhead = 4;

// One pass over a chunk's pages [pb, pe) of one KV head of cache C: fn(page rows, count, next
// page's rows, their count) per page, with the prefetches above.
template <typename KV, typename F>
inline void walk_pages(const KV* C, const int64_t* table, int64_t pb, int64_t pe, int64_t bs,
                       int64_t nkv, int64_t g, int64_t hd, F&& fn) {
  const int64_t stride = nkv * hd;
  const auto rows = [&](int64_t p0) { return C + (table[p0 / bs] * bs * nkv + g) * hd; };
  const auto count = [&](int64_t p0) { return static_cast<int>(std::min(bs, pe - p0)); };
  for (int64_t p0 = pb; p0 < pe; p0 += bs) {
    if (p0 == pb) prefetch_page<kL1>(rows(p0), stride, count(p0), hd);
    for (int64_t d = (p0 == pb ? 2 : kAhead); d <= kAhead; ++d)
      if (p0 + d * bs < pe) prefetch_page<kL2>(rows(p0 + d * bs), stride, count(p0 + d * bs), hd);
    const bool more = p0 + bs < pe;
    fn(rows(p0), count(p0), more ? rows(p0 + bs) : rows(p0), more ? count(p0 + bs) : 0, p0);
  }
}

// Split-K: a context longer than kChunk positions is cut into chunks of kChunk (whole pages), one
// task each, so a single sequence keeps every thread busy (batch 1 has only nkv tasks otherwise);
// each chunk's softmax partials (max, sum, unnormalised P.V) are merged in chunk order. The cut
// depends on the context length only: results do not depend on the batch or the thread count,
// and a context of one chunk is computed exactly as without the split.
constexpr int64_t kChunk = 1024;

// fast: the AVX512 paths (fast_path); KV: the caches' dtype, T's or (T fp32) bf16 / fp16
template <typename T, typename KV>
void decode_impl(const T* Q, const KV* K, const KV* V, const int64_t* tables, int64_t table_w,
                 const int32_t* lens, const T* gate, int64_t gate_s0, int64_t gate_s1, T* O,
                 int64_t N, int64_t nh, int64_t nkv, int64_t hd, int64_t bs, float scale,
                 bool fast) {
  const int64_t rep = nh / nkv, stride = nkv * hd;
  const int64_t chunk = std::max<int64_t>(bs, kChunk / bs * bs);
  const bool dots = kBf16Dots<T, KV> && bf16_dots(fast, hd);
  std::vector<int64_t> first(N + 1, 0);  // task index of each sequence's first (KV head, chunk)
  bool split = false;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t nc = (lens[n] + chunk - 1) / chunk;
    first[n + 1] = first[n] + nkv * nc;
    split = split || nc > 1;
  }
  const int64_t psz = rep * (hd + 2);  // a split task's partials: max [rep], sum [rep], acc
  std::vector<float> part(split ? first[N] * psz : 0);
  const auto out_row = [&](int64_t n, int64_t h) { return O + (n * nh + h) * hd; };
  const auto gate_row = [&](int64_t n, int64_t h) {
    return gate == nullptr ? nullptr : gate + n * gate_s0 + h * gate_s1;
  };
  at::parallel_for(0, first[N], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(rep * hd), acc(rep * hd), s, mx(rep), sum(rep);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t L = lens[n], nc = (L + chunk - 1) / chunk, local = task - first[n];
      const int64_t g = local / nc, c = local % nc;
      const int64_t pb = c * chunk, pe = std::min(L, pb + chunk), Lc = pe - pb;
      const int64_t* table = tables + n * table_w;
      const T* Qg = Q + (n * nh + g * rep) * hd;  // the group's rep query heads
      if (!dots)  // the bf16 dot products take q as it is
        for (int64_t j = 0; j < rep * hd; ++j)
          q[j] = static_cast<float>(Qg[j]) * scale * kKvScale<KV>;
      s.resize(rep * Lc);
      for (int64_t r0 = 0; r0 < rep; r0 += 4) {  // scores, page by page
        const int R = static_cast<int>(std::min<int64_t>(4, rep - r0));
        walk_pages(K, table, pb, pe, bs, nkv, g, hd,
                   [&](const KV* k, int cnt, const KV* next, int nn, int64_t p0) {
                     scores_group(R, fast, dots, Qg + r0 * hd, q.data() + r0 * hd, hd, k, stride,
                                  cnt, s.data() + r0 * Lc + (p0 - pb), Lc, scale * kKvScale<KV>,
                                  next, nn);
                   });
      }
      for (int64_t r = 0; r < rep; ++r) sum[r] = softmax_numerator(s.data() + r * Lc, Lc, &mx[r]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r0 = 0; r0 < rep; r0 += 4) {
        const int R = static_cast<int>(std::min<int64_t>(4, rep - r0));
        walk_pages(V, table, pb, pe, bs, nkv, g, hd,
                   [&](const KV* v, int cnt, const KV* next, int nn, int64_t p0) {
                     pv_group(R, fast, s.data() + r0 * Lc + (p0 - pb), Lc, v, stride, cnt,
                              acc.data() + r0 * hd, hd, next, nn);
                   });
      }
      if (nc == 1) {  // the whole context: normalise and write
        for (int64_t r = 0; r < rep; ++r)
          finish_row(acc.data() + r * hd, 1.f / sum[r] * kKvScale<KV>, gate_row(n, g * rep + r),
                     out_row(n, g * rep + r), hd);
        continue;
      }
      float* pt = part.data() + task * psz;
      std::copy(mx.begin(), mx.end(), pt);
      std::copy(sum.begin(), sum.end(), pt + rep);
      std::copy(acc.begin(), acc.end(), pt + 2 * rep);
    }
  });
  if (!split) return;
  at::parallel_for(0, N * nkv, 1, [&](int64_t begin, int64_t end) {  // merge the chunks
    std::vector<float> acc(hd);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / nkv, g = ng % nkv, nc = (lens[n] + chunk - 1) / chunk;
      if (nc == 1) continue;
      const float* p0 = part.data() + (first[n] + g * nc) * psz;  // chunk c at p0 + c * psz
      for (int64_t r = 0; r < rep; ++r) {
        float m = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t c = 0; c < nc; ++c) m = std::max(m, p0[c * psz + r]);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t c = 0; c < nc; ++c) {
          const float* pc = p0 + c * psz;
          const float w = std::exp(pc[r] - m);
          total += pc[rep + r] * w;
          const float* a = pc + 2 * rep + r * hd;
          for (int64_t j = 0; j < hd; ++j) acc[j] += a[j] * w;
        }
        finish_row(acc.data(), 1.f / total * kKvScale<KV>, gate_row(n, g * rep + r),
                   out_row(n, g * rep + r), hd);
      }
    }
  });
}

// block_tables as int64 [N, W], after checking every entry a context reads is inside the cache
torch::Tensor checked_tables(const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                             int64_t N, int64_t bs, int64_t num_blocks) {
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == N &&
                  context_lens.numel() == N &&
                  context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "paged_decode_attention: block_tables [N, W] and context_lens [N] int32");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt || block_tables.scalar_type() == at::kLong,
              "paged_decode_attention: block_tables must be int32 or int64");
  const auto lens = context_lens.data_ptr<int32_t>();
  auto tables = block_tables.to(at::kLong);  // [N, W], validated before any read
  const int64_t* tab = tables.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(lens[n] >= 1 && (lens[n] + bs - 1) / bs <= block_tables.size(1),
                "paged_decode_attention: a context length does not fit its block table row");
    for (int64_t b = 0; b < (lens[n] + bs - 1) / bs; ++b)
      TORCH_CHECK(tab[n * tables.stride(0) + b] >= 0 &&
                      tab[n * tables.stride(0) + b] < num_blocks,
                  "paged_decode_attention: a block table entry is outside the cache");
  }
  return tables;
}


// the (model, caches) dtype pairs the kernel takes: the model's own (fp32, bf16, fp16), bf16 /
// fp16 caches under an fp32 model, fp8 (e4m3fn) caches under any (kernels/attention.py `takes`)
bool pair_taken(at::ScalarType dt, at::ScalarType kv) {
  const auto half = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  if (dt != at::kFloat && !half(dt)) return false;
  return kv == dt || kv == at::kFloat8_e4m3fn || (dt == at::kFloat && half(kv));
}

// the AVX512 paths run: a bf16 model's bf16 caches with hd % 32 == 0 on AVX512-BF16 CPUs; the
// other pairs (fp32 / fp16 caches, an fp32 model's bf16 caches, fp8 caches: the scaled fp32
// query against the widened keys, or under a bf16 model bf16 dot products where bf16_dots)
// with hd % 16 == 0 on AVX512 CPUs
bool fast_path(at::ScalarType dt, int64_t hd, bool avx2_only, at::ScalarType kv) {
  if (avx2_only || !pair_taken(dt, kv)) return false;
  if (dt == at::kBFloat16 && kv == at::kBFloat16) return hd % 32 == 0 && cpu_isa::avx512_bf16();
  return hd % 16 == 0 && cpu_isa::avx512();
}

// f(T{}, KV{}): the model dtype T and the caches' KV (pair_taken)
template <typename F>
void dispatch_kv(at::ScalarType t, at::ScalarType kv, const char* what, F&& f) {
  if (kv == t) {
    dispatch(t, what, [&](auto tag) { f(tag, tag); });
  } else if (kv == at::kFloat8_e4m3fn) {
    dispatch(t, what, [&](auto tag) { f(tag, c10::Float8_e4m3fn{}); });
  } else {
    TORCH_CHECK(pair_taken(t, kv), what,
                ": caches of the model dtype, fp8 caches, or bf16 / fp16 caches under an fp32 "
                "model, expected; got a ", kv, " cache under a ", t, " model");
    dispatch(kv, what, [&](auto tag) { f(float{}, tag); });
  }
}

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& q,            // [N, nh, hd]
                                     const torch::Tensor& key_cache,    // [blocks, bs, nkv, hd]
                                     const torch::Tensor& value_cache,  // same
                                     const torch::Tensor& block_tables,  // [N, W] int32 or int64
                                     const torch::Tensor& context_lens,  // [N] int32
                                     double scale,
                                     const c10::optional<torch::Tensor>& gate,  // [N, nh, hd]
                                     bool avx2_only) {
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && q.is_contiguous() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "paged_decode_attention: q [N, nh, hd] and contiguous caches [blocks, bs, nkv, hd]");
  const int64_t N = q.size(0), nh = q.size(1), hd = q.size(2);
  const int64_t bs = key_cache.size(1), nkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == hd && nh % nkv == 0,
              "paged_decode_attention: head dims of q and the caches differ");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(),
              "paged_decode_attention: the K and V caches must share a dtype");
  const auto tables = checked_tables(block_tables, context_lens, N, bs, key_cache.size(0));
  const int64_t* tab = tables.data_ptr<int64_t>();
  const auto lens = context_lens.data_ptr<int32_t>();
  const bool gated = gate.has_value();
  if (gated)
    TORCH_CHECK(gate->sizes() == q.sizes() && gate->stride(2) == 1 &&
                    gate->scalar_type() == q.scalar_type(),
                "paged_decode_attention: gate must be [N, nh, hd] with a contiguous last dim");
  auto out = torch::empty_like(q);
  const auto kv = key_cache.scalar_type();
  dispatch_kv(q.scalar_type(), kv, "paged_decode_attention", [&](auto tag, auto kv_tag) {
    using T = decltype(tag);
    using KV = decltype(kv_tag);
    const T* G = gated ? gate->data_ptr<T>() : nullptr;
    const int64_t gs0 = gated ? gate->stride(0) : 0, gs1 = gated ? gate->stride(1) : 0;
    decode_impl(q.data_ptr<T>(), key_cache.data_ptr<KV>(), value_cache.data_ptr<KV>(), tab,
                tables.stride(0), lens, G, gs0, gs1, out.data_ptr<T>(), N, nh, nkv, hd, bs,
                static_cast<float>(scale), fast_path(q.scalar_type(), hd, avx2_only, kv));
  });
  return out;
}

// The gated attention layer between its projections at a pure decode step, in one call: the
// q and k RMSNorms (zero-centred), rotary, the new K and V written to their cache slots, the
// attention above and its output gate, with small_rows.h's arithmetic (small_ops_cpu.cpp's norm
// and rotary), so the result is bitwise the op-by-op path (layers/full_attention.py). Returns
// o [N, nh * hd] in the model dtype: o_proj's input. Saves ~15 dispatches a layer at batch 1.
torch::Tensor attention_decode_gated(const torch::Tensor& qg,  // [N, nh * 2 hd]: [query | gate]
                                     const torch::Tensor& k,   // [N, nkv * hd]
                                     const torch::Tensor& v,   // [N, nkv * hd]
                                     const torch::Tensor& q_norm_w,  // [hd]
                                     const torch::Tensor& k_norm_w,  // [hd]
                                     double eps,
                                     const torch::Tensor& cos,  // [N, rd]
                                     const torch::Tensor& sin,
                                     torch::Tensor& key_cache,  // [blocks, bs, nkv, hd]
                                     torch::Tensor& value_cache,
                                     const torch::Tensor& slot_mapping,  // [N] int64 flat slots
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "attention_decode_gated: contiguous caches [blocks, bs, nkv, hd] expected");
  const int64_t N = qg.size(0), bs = key_cache.size(1), nkv = key_cache.size(2),
                hd = key_cache.size(3), nslots = key_cache.size(0) * bs;
  const auto dt = qg.scalar_type(), kvt = key_cache.scalar_type();
  for (const torch::Tensor* t : {&qg, &k, &v, &q_norm_w, &k_norm_w, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == dt && t->stride(-1) == 1,
                "attention_decode_gated: projections, norm weights and cos / sin must share the "
                "model dtype, with a contiguous last dim");
  TORCH_CHECK(value_cache.scalar_type() == kvt,
              "attention_decode_gated: the K and V caches must share a dtype");
  TORCH_CHECK(qg.dim() == 2 && qg.size(1) % (2 * hd) == 0 && k.dim() == 2 && k.size(0) == N &&
                  k.size(1) == nkv * hd && v.sizes() == k.sizes() && q_norm_w.numel() == hd &&
                  k_norm_w.numel() == hd && cos.dim() == 2 && cos.size(0) == N &&
                  cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.size(1) % 2 == 0 && cos.size(1) <= hd,
              "attention_decode_gated: shapes do not match");
  const int64_t nh = qg.size(1) / (2 * hd), rd = cos.size(1);
  TORCH_CHECK(nh % nkv == 0, "attention_decode_gated: query heads must be a multiple of KV heads");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.numel() == N &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "attention_decode_gated: slot_mapping must be [N] int64");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(slots[n] >= 0 && slots[n] < nslots,
                "attention_decode_gated: a slot is outside the cache");
  const auto tables = checked_tables(block_tables, context_lens, N, bs, key_cache.size(0));
  auto q = torch::empty({N, nh, hd}, qg.options());  // normed and rotated queries
  auto out = torch::empty({N, nh * hd}, q.options());
  dispatch_kv(dt, kvt, "attention_decode_gated", [&](auto tag, auto kv_tag) {
    using T = decltype(tag);
    using KV = decltype(kv_tag);
    const T *QG = qg.data_ptr<T>(), *Kp = k.data_ptr<T>(), *Vp = v.data_ptr<T>();
    const T *C = cos.data_ptr<T>(), *S = sin.data_ptr<T>();
    const T *QW = q_norm_w.data_ptr<T>(), *KW = k_norm_w.data_ptr<T>();
    T* Q = q.data_ptr<T>();
    KV *KC = key_cache.data_ptr<KV>(), *VC = value_cache.data_ptr<KV>();
    const float e = static_cast<float>(eps);
    std::vector<T> row(hd);  // a new K row in the model dtype, before its cache's rounding
    for (int64_t n = 0; n < N; ++n) {
      const T *c = C + n * rd, *s = S + n * rd;
      for (int64_t h = 0; h < nh; ++h) {
        T* qh = Q + (n * nh + h) * hd;
        rows::norm_zc_row(QG + n * qg.stride(0) + h * 2 * hd, QW, qh, hd, e);
        rows::rotate_row(qh, c, s, rd);
      }
      for (int64_t g = 0; g < nkv; ++g) {  // the new token's K and V into its cache slot
        KV* kc = KC + (slots[n] * nkv + g) * hd;
        const T* vn = Vp + n * v.stride(0) + g * hd;
        KV* vc = VC + (slots[n] * nkv + g) * hd;
        T* kr = std::is_same_v<T, KV> ? reinterpret_cast<T*>(kc) : row.data();
        rows::norm_zc_row(Kp + n * k.stride(0) + g * hd, KW, kr, hd, e);
        rows::rotate_row(kr, c, s, rd);
        if constexpr (std::is_same_v<T, KV>) {
          std::copy_n(vn, hd, vc);
        } else {  // rounded to the cache's dtype as a tensor copy rounds (to nearest even)
          for (int64_t j = 0; j < hd; ++j) kc[j] = static_cast<KV>(static_cast<float>(kr[j]));
          for (int64_t j = 0; j < hd; ++j) vc[j] = static_cast<KV>(static_cast<float>(vn[j]));
        }
      }
    }
    decode_impl(Q, KC, VC, tables.data_ptr<int64_t>(), tables.stride(0),
                context_lens.data_ptr<int32_t>(), QG + hd, qg.stride(0), 2 * hd,
                out.data_ptr<T>(), N, nh, nkv, hd, bs, static_cast<float>(scale),
                fast_path(dt, hd, false, kvt));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, QWEN35_NOGIL,
        "decode attention over the paged KV cache (one query per sequence)", py::arg("q"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("gate") = py::none(),
        py::arg("avx2_only") = false);
  m.def(
      "fast_path",
      [](at::ScalarType dt, int64_t hd, bool avx2_only, c10::optional<at::ScalarType> kv) {
        return fast_path(dt, hd, avx2_only, kv.value_or(dt));
      },
      "the AVX512 paths run for a model of this dtype and head dim (caches of kv_dtype: the "
      "model's by default)",
      py::arg("dtype"), py::arg("head_dim"), py::arg("avx2_only") = false,
      py::arg("kv_dtype") = py::none());
  m.def("attention_decode_gated", &attention_decode_gated, QWEN35_NOGIL,
        "q/k norms, rotary, K/V cache write, paged decode attention and its gate in one call",
        py::arg("qg"), py::arg("k"), py::arg("v"), py::arg("q_norm_w"), py::arg("k_norm_w"),
        py::arg("eps"), py::arg("cos"), py::arg("sin"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"));
}
