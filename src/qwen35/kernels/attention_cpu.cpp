// Paged decode attention on the CPU: one query token per sequence against its cached K/V, read
// in place through its block table (the PyTorch path gathers every block of the context into a
// new tensor per layer per step, then runs SDPA: ops/attention.py decode_attention).
//
// One task per (sequence, KV head); the query heads sharing that KV head (GQA) read each K and
// V row once. Scores, softmax and the weighted sum of V run in fp32; the output is rounded to
// the model dtype once, then multiplied by sigmoid(gate) rounded as the reference does
// (o.mul_(torch.sigmoid(gate)) in the model dtype). Each task's arithmetic is independent of the
// batch, so batched and single-sequence results are bitwise equal.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "small_rows.h"
#include "vec_avx2.h"

namespace {

using namespace vec8;

template <typename T>
inline float dot(const float* q, const T* k, int64_t hd) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= hd; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), load8(k + j), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float out = _mm_cvtss_f32(s);
  for (; j < hd; ++j) out += q[j] * static_cast<float>(k[j]);
  return out;
}

template <typename T>
inline void axpy(float a, const T* v, float* acc, int64_t hd) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t j = 0;
  for (; j + 8 <= hd; j += 8)
    _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(va, load8(v + j), _mm256_loadu_ps(acc + j)));
  for (; j < hd; ++j) acc[j] += a * static_cast<float>(v[j]);
}

// p = exp(s - max(s)) in place; returns sum(p)
inline float softmax_numerator(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i]);
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

template <typename T>
void decode_impl(const T* Q, const T* K, const T* V, const int64_t* tables, int64_t table_w,
                 const int32_t* lens, const T* gate, int64_t gate_s0, int64_t gate_s1, T* O,
                 int64_t N, int64_t nh, int64_t nkv, int64_t hd, int64_t bs, float scale) {
  const int64_t rep = nh / nkv;
  at::parallel_for(0, N * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(rep * hd), acc(rep * hd), s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nkv, g = task % nkv, L = lens[n];
      const int64_t* table = tables + n * table_w;
      for (int64_t r = 0; r < rep; ++r)
        for (int64_t j = 0; j < hd; ++j)
          q[r * hd + j] = static_cast<float>(Q[(n * nh + g * rep + r) * hd + j]) * scale;
      s.resize(rep * L);
      for (int64_t pos = 0; pos < L; ++pos) {  // scores: each K row read once for the group
        const T* k = K + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * nkv + g) * hd;
        for (int64_t r = 0; r < rep; ++r) s[r * L + pos] = dot(q.data() + r * hd, k, hd);
      }
      std::vector<float> inv(rep);
      for (int64_t r = 0; r < rep; ++r) inv[r] = 1.f / softmax_numerator(s.data() + r * L, L);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t pos = 0; pos < L; ++pos) {
        const T* v = V + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * nkv + g) * hd;
        for (int64_t r = 0; r < rep; ++r) axpy(s[r * L + pos], v, acc.data() + r * hd, hd);
      }
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t h = g * rep + r;
        T* o = O + (n * nh + h) * hd;
        for (int64_t j = 0; j < hd; ++j) {
          const T oj = static_cast<T>(acc[r * hd + j] * inv[r]);
          if (gate == nullptr) {
            o[j] = oj;
          } else {
            const float gj = static_cast<float>(gate[n * gate_s0 + h * gate_s1 + j]);
            const T sig = static_cast<T>(1.f / (1.f + std::exp(-gj)));
            o[j] = static_cast<T>(static_cast<float>(oj) * static_cast<float>(sig));
          }
        }
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

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& q,            // [N, nh, hd]
                                     const torch::Tensor& key_cache,    // [blocks, bs, nkv, hd]
                                     const torch::Tensor& value_cache,  // same
                                     const torch::Tensor& block_tables,  // [N, W] int32 or int64
                                     const torch::Tensor& context_lens,  // [N] int32
                                     double scale,
                                     const c10::optional<torch::Tensor>& gate) {  // [N, nh, hd]
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && q.is_contiguous() &&
                  key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "paged_decode_attention: q [N, nh, hd] and contiguous caches [blocks, bs, nkv, hd]");
  const int64_t N = q.size(0), nh = q.size(1), hd = q.size(2);
  const int64_t bs = key_cache.size(1), nkv = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == hd && nh % nkv == 0,
              "paged_decode_attention: head dims of q and the caches differ");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() &&
                  q.scalar_type() == value_cache.scalar_type(),
              "paged_decode_attention: q and the caches must share the model dtype");
  const auto tables = checked_tables(block_tables, context_lens, N, bs, key_cache.size(0));
  const int64_t* tab = tables.data_ptr<int64_t>();
  const auto lens = context_lens.data_ptr<int32_t>();
  const bool gated = gate.has_value();
  if (gated)
    TORCH_CHECK(gate->sizes() == q.sizes() && gate->stride(2) == 1 &&
                    gate->scalar_type() == q.scalar_type(),
                "paged_decode_attention: gate must be [N, nh, hd] with a contiguous last dim");
  auto out = torch::empty_like(q);
  dispatch(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using T = decltype(tag);
    const T* G = gated ? gate->data_ptr<T>() : nullptr;
    const int64_t gs0 = gated ? gate->stride(0) : 0, gs1 = gated ? gate->stride(1) : 0;
    decode_impl(q.data_ptr<T>(), key_cache.data_ptr<T>(), value_cache.data_ptr<T>(), tab,
                tables.stride(0), lens, G, gs0, gs1, out.data_ptr<T>(), N, nh, nkv, hd, bs,
                static_cast<float>(scale));
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
  const auto dt = key_cache.scalar_type();
  const torch::Tensor& vc = value_cache;
  for (const torch::Tensor* t : {&qg, &k, &v, &q_norm_w, &k_norm_w, &cos, &sin, &vc})
    TORCH_CHECK(t->scalar_type() == dt && t->stride(-1) == 1,
                "attention_decode_gated: projections, norm weights, cos / sin and the caches must "
                "share the model dtype, with a contiguous last dim");
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
  dispatch(dt, "attention_decode_gated", [&](auto tag) {
    using T = decltype(tag);
    const T *QG = qg.data_ptr<T>(), *Kp = k.data_ptr<T>(), *Vp = v.data_ptr<T>();
    const T *C = cos.data_ptr<T>(), *S = sin.data_ptr<T>();
    const T *QW = q_norm_w.data_ptr<T>(), *KW = k_norm_w.data_ptr<T>();
    T *Q = q.data_ptr<T>(), *KC = key_cache.data_ptr<T>(), *VC = value_cache.data_ptr<T>();
    const float e = static_cast<float>(eps);
    for (int64_t n = 0; n < N; ++n) {
      const T *c = C + n * rd, *s = S + n * rd;
      for (int64_t h = 0; h < nh; ++h) {
        T* qh = Q + (n * nh + h) * hd;
        rows::norm_zc_row(QG + n * qg.stride(0) + h * 2 * hd, QW, qh, hd, e);
        rows::rotate_row(qh, c, s, rd);
      }
      for (int64_t g = 0; g < nkv; ++g) {  // the new token's K and V into its cache slot
        T* kc = KC + (slots[n] * nkv + g) * hd;
        rows::norm_zc_row(Kp + n * k.stride(0) + g * hd, KW, kc, hd, e);
        rows::rotate_row(kc, c, s, rd);
        std::copy_n(Vp + n * v.stride(0) + g * hd, hd, VC + (slots[n] * nkv + g) * hd);
      }
    }
    decode_impl(Q, KC, VC, tables.data_ptr<int64_t>(), tables.stride(0),
                context_lens.data_ptr<int32_t>(), QG + hd, qg.stride(0), 2 * hd,
                out.data_ptr<T>(), N, nh, nkv, hd, bs, static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (one query per sequence)", py::arg("q"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("gate") = py::none());
  m.def("attention_decode_gated", &attention_decode_gated,
        "q/k norms, rotary, K/V cache write, paged decode attention and its gate in one call",
        py::arg("qg"), py::arg("k"), py::arg("v"), py::arg("q_norm_w"), py::arg("k_norm_w"),
        py::arg("eps"), py::arg("cos"), py::arg("sin"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"));
}
