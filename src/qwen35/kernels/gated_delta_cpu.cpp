// The gated delta rule on the CPU: the decode step, fused (two passes over each head's state;
// this part of the file), and a prefill's chunked form (`deltanet_chunk`, further down).
//
// Per head (state S [dk, dv] fp32, a = exp(g)):
//   u_k = S^T k, u_q = S^T q            (one read of S)
//   delta = beta (v - a u_k),  o = a u_q + (k . q) delta
//   S = a S + k delta^T                 (one read-modify-write of S, still in L2: 64 KiB)
// The PyTorch path (ops/deltanet.py _step_torch) makes five passes over the whole
// batch's states, which at batch 32 of Qwen3.5-0.8B are 32 MiB per layer: memory-bound.
// Heads are independent and split across torch's intra-op threads; each head's arithmetic is
// the same whatever the batch, so batched and single-sequence results are bitwise equal.
// Vectorised: the conv's SiLU 8 lanes at a time (vec_avx2.h), the state passes with all of a
// head's dv sums in AVX-512 registers where the CPU has them (else AVX2 column blocks;
// `avx2_only=True` takes those on any machine, for tests). A decode step of Qwen3.5-0.8B's 18
// DeltaNet layers: see bench/deltanet_decode.py.
#include <ATen/Parallel.h>
#include "torch_ext.h"

#include <atomic>
#include <cmath>
#include <vector>

#include "cpu_isa.h"
#include "gemv_rows.h"
#include "small_rows.h"
#include "vec_avx2.h"

namespace {

// q and k are l2-normalised: times 1 / sqrt(sum of squares + kL2NormEps)
// (ops/gated_delta.py L2NORM_EPS)
constexpr float kL2NormEps = 1e-6f;

// Columns j0 .. j0 + 8 NV of uk = S^T k and uq = S^T q, the accumulators in registers while the
// rows of S stream past (S [dk, dv] row-major).
template <int NV>
void state_t_cols(const float* S, const float* k, const float* q, int64_t dk, int64_t dv,
                         int64_t j0, float* uk, float* uq) {
  __m256 ak[NV], aq[NV];
  for (int u = 0; u < NV; ++u) ak[u] = aq[u] = _mm256_setzero_ps();
  for (int64_t t = 0; t < dk; ++t) {
    const float* row = S + t * dv + j0;
    const __m256 kt = _mm256_set1_ps(k[t]), qt = _mm256_set1_ps(q[t]);
    for (int u = 0; u < NV; ++u) {
      const __m256 s = _mm256_loadu_ps(row + 8 * u);
      ak[u] = _mm256_fmadd_ps(s, kt, ak[u]);
      aq[u] = _mm256_fmadd_ps(s, qt, aq[u]);
    }
  }
  for (int u = 0; u < NV; ++u) {
    _mm256_storeu_ps(uk + j0 + 8 * u, ak[u]);
    _mm256_storeu_ps(uq + j0 + 8 * u, aq[u]);
  }
}

bool cpu_avx512f() { return cpu_isa::avx512f(); }

// 16 state values: fp32, or bf16 (--mamba-ssm-cache-dtype bf16) widened exactly / rounded to
// nearest even as a tensor copy rounds (NaN stays NaN: vec8::store8's rounding, 16 lanes)
__attribute__((target("avx512f"))) inline __m512 load_state16(const float* p) {
  return _mm512_loadu_ps(p);
}
__attribute__((target("avx512f"))) inline __m512 load_state16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx512f"))) inline void store_state16(float* p, __m512 v) {
  _mm512_storeu_ps(p, v);
}
__attribute__((target("avx512f"))) inline void store_state16(c10::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// AVX-512 (32 registers): all dv = 16 NV columns of uk and uq stay in registers and S streams
// row by row in one pass (bench: ~25% faster than the AVX2 column blocks on a Zen 4).
template <int NV, typename ST = float>
__attribute__((target("avx512f"))) void state_t_512(const ST* S, const float* k,
                                                     const float* q, int64_t dk, float* uk,
                                                     float* uq) {
  __m512 ak[NV], aq[NV];
  for (int u = 0; u < NV; ++u) ak[u] = aq[u] = _mm512_setzero_ps();
  for (int64_t t = 0; t < dk; ++t) {
    const ST* row = S + t * 16 * NV;
    const __m512 kt = _mm512_set1_ps(k[t]), qt = _mm512_set1_ps(q[t]);
    for (int u = 0; u < NV; ++u) {
      const __m512 s = load_state16(row + 16 * u);
      ak[u] = _mm512_fmadd_ps(s, kt, ak[u]);
      aq[u] = _mm512_fmadd_ps(s, qt, aq[u]);
    }
  }
  for (int u = 0; u < NV; ++u) {
    _mm512_storeu_ps(uk + 16 * u, ak[u]);
    _mm512_storeu_ps(uq + 16 * u, aq[u]);
  }
}

// S = a S + k delta^T with delta's dv = 16 NV values in registers.
template <int NV, typename ST = float>
__attribute__((target("avx512f"))) void update_512(ST* S, const float* k, const float* delta,
                                                    float a, int64_t dk) {
  __m512 d[NV];
  for (int u = 0; u < NV; ++u) d[u] = _mm512_loadu_ps(delta + 16 * u);
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t t = 0; t < dk; ++t) {
    ST* row = S + t * 16 * NV;
    const __m512 kt = _mm512_set1_ps(k[t]);
    for (int u = 0; u < NV; ++u) {
      const __m512 s = _mm512_mul_ps(va, load_state16(row + 16 * u));
      store_state16(row + 16 * u, _mm512_fmadd_ps(kt, d[u], s));
    }
  }
}

void state_update(float* S, const float* k, const float* delta, float a, int64_t dk,
                  int64_t dv, bool wide) {
  if (wide && dv == 128) return update_512<8>(S, k, delta, a, dk);
  if (wide && dv == 64) return update_512<4>(S, k, delta, a, dk);
  for (int64_t t = 0; t < dk; ++t) {
    const float kt = k[t];
    float* __restrict row = S + t * dv;
    for (int64_t j = 0; j < dv; ++j) row[j] = a * row[j] + kt * delta[j];
  }
}

// uk = S^T k, uq = S^T q over a head's state: on AVX2, 32 columns at a time (8 registers of
// sums) in four passes over the rows.
void state_t_times(const float* S, const float* k, const float* q, int64_t dk, int64_t dv,
                   float* uk, float* uq, bool wide) {
  if (wide && dv == 128) return state_t_512<8>(S, k, q, dk, uk, uq);
  if (wide && dv == 64) return state_t_512<4>(S, k, q, dk, uk, uq);
  int64_t j = 0;
  for (; j + 32 <= dv; j += 32) state_t_cols<4>(S, k, q, dk, dv, j, uk, uq);
  for (; j + 8 <= dv; j += 8) state_t_cols<1>(S, k, q, dk, dv, j, uk, uq);
  for (; j < dv; ++j) {
    float sk = 0.f, sq = 0.f;
    for (int64_t t = 0; t < dk; ++t) {
      sk += S[t * dv + j] * k[t];
      sq += S[t * dv + j] * q[t];
    }
    uk[j] = sk;
    uq[j] = sq;
  }
}

// The causal conv over channels c0 .. c1 of one sequence (any K), in fp32, rounded to T into
// y[c - c0]; each channel's state [K-1] shifts by the new input.
template <typename T>
void conv_taps(const T* x, T* states, const T* W, int64_t c0, int64_t c1, int64_t Kc, float* y) {
  for (int64_t c = c0; c < c1; ++c) {
    T* st = states + c * (Kc - 1);
    const T xv = x[c];
    const T* w = W + c * Kc;
    float acc = 0.f;
    for (int64_t j = 0; j < Kc - 1; ++j) acc += static_cast<float>(st[j]) * static_cast<float>(w[j]);
    acc += static_cast<float>(xv) * static_cast<float>(w[Kc - 1]);
    for (int64_t j = 0; j + 1 < Kc - 1; ++j) st[j] = st[j + 1];
    st[Kc - 2] = xv;
    y[c - c0] = static_cast<float>(static_cast<T>(acc));
  }
}

}  // namespace

// The whole DeltaNet decode step after the input projections, for one run of consecutive state
// slots: causal conv update (state shifted in place), SiLU, l2-normalised q (times dk^-0.5) and k,
// then the recurrent step at the top of this file. Rounding follows the PyTorch path: the conv accumulates in fp32
// and is rounded to the model dtype, SiLU runs on that value and is rounded again; q, k, v are
// those rounded values in fp32. Returns o [n, nv, dv] fp32.
// States ST fp32, or bf16 (--mamba-ssm-cache-dtype bf16): a head's bf16 state is widened
// (exact), stepped as an fp32 state is, and rounded back to nearest even, as the PyTorch path's
// S.float() ... S.copy_(S32) does (in registers on the AVX-512 row passes, else in a copy).
template <typename T, typename ST>
void deltanet_decode_impl(const T* X, int64_t x_stride, T* CS, const T* W, const float* G,
                          const T* Bt, ST* S, float* O, int64_t n, int64_t C, int64_t Kc,
                          int64_t nk, int64_t nv, int64_t dk, int64_t dv, bool wide) {
  const int64_t kd = nk * dk, r = nv / nk;
  std::vector<float> u(n * C);  // conv outputs after SiLU, rounded to T, as fp32
  constexpr int64_t kBlock = 512;   // channels per task
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  at::parallel_for(0, n * nblk, 1, [&](int64_t begin, int64_t end) {
    float y[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / nblk, c0 = (task % nblk) * kBlock, c1 = std::min(C, c0 + kBlock);
      if (Kc == 4) {  // Qwen 3.5's conv: the taps unrolled (same sums, same order)
        for (int64_t c = c0; c < c1; ++c) {
          T* st = CS + (i * C + c) * 3;
          const T* w = W + c * 4;
          const T xv = X[i * x_stride + c];
          float acc = static_cast<float>(st[0]) * static_cast<float>(w[0]);
          acc += static_cast<float>(st[1]) * static_cast<float>(w[1]);
          acc += static_cast<float>(st[2]) * static_cast<float>(w[2]);
          acc += static_cast<float>(xv) * static_cast<float>(w[3]);
          st[0] = st[1];
          st[1] = st[2];
          st[2] = xv;
          y[c - c0] = static_cast<float>(static_cast<T>(acc));
        }
      } else {
        conv_taps(X + i * x_stride, CS + i * C * (Kc - 1), W, c0, c1, Kc, y);
      }
      float* ui = u.data() + i * C;
      int64_t c = c0;
      if constexpr (vec8::kVec8<T>) {
        for (; c + 8 <= c1; c += 8)  // SiLU, rounded to T again
          _mm256_storeu_ps(ui + c, vec8::round8<T>(vec8::silu8(_mm256_loadu_ps(y + c - c0))));
      }
      for (; c < c1; ++c) {
        const float yr = y[c - c0];
        ui[c] = static_cast<float>(static_cast<T>(yr / (1.f + std::exp(-yr))));
      }
    }
  });
  const float scale = 1.f / std::sqrt(static_cast<float>(dk));
  constexpr bool fp32_states = std::is_same_v<ST, float>;
  // bf16 states on the AVX-512 row passes (Qwen 3.5's dv = 128) are widened and rounded in
  // registers as the two passes stream them; elsewhere through an fp32 copy of the head (the
  // same values either way)
  const bool in_regs = !fp32_states && wide && (dv == 128 || dv == 64);
  at::parallel_for(0, n * nv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(dk), k(dk), uk(dv), uq(dv), delta(dv);
    std::vector<float> wide_state(fp32_states || in_regs ? 0 : dk * dv);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t i = idx / nv, h = idx % nv, kh = h / r;
      const float* ui = u.data() + i * C;
      float sq = 0.f, sk = 0.f;
      for (int64_t t = 0; t < dk; ++t) {
        q[t] = ui[kh * dk + t];
        k[t] = ui[kd + kh * dk + t];
        sq += q[t] * q[t];
        sk += k[t] * k[t];
      }
      const float iq = 1.f / std::sqrt(sq + kL2NormEps), ik = 1.f / std::sqrt(sk + kL2NormEps);
      for (int64_t t = 0; t < dk; ++t) {
        q[t] = q[t] * iq * scale;
        k[t] = k[t] * ik;
      }
      const float* v = ui + 2 * kd + h * dv;
      const float a = std::exp(G[idx]), b = static_cast<float>(Bt[idx]);
      ST* st = S + idx * dk * dv;
      float* sh = nullptr;  // the head's state in fp32 where the passes take fp32
      if constexpr (fp32_states) {
        sh = st;
      } else if (!in_regs) {
        sh = wide_state.data();
        gemv_rows::row_to_float(st, dk * dv, sh);
      }
      float* oh = O + idx * dv;
      float kq = 0.f;
      for (int64_t t = 0; t < dk; ++t) kq += k[t] * q[t];
      if (in_regs) {
        if (dv == 128) state_t_512<8>(st, k.data(), q.data(), dk, uk.data(), uq.data());
        else state_t_512<4>(st, k.data(), q.data(), dk, uk.data(), uq.data());
      } else {
        state_t_times(sh, k.data(), q.data(), dk, dv, uk.data(), uq.data(), wide);
      }
      for (int64_t j = 0; j < dv; ++j) {
        delta[j] = b * (v[j] - a * uk[j]);
        oh[j] = a * uq[j] + kq * delta[j];
      }
      if (in_regs) {
        if (dv == 128) update_512<8>(st, k.data(), delta.data(), a, dk);
        else update_512<4>(st, k.data(), delta.data(), a, dk);
      } else {
        state_update(sh, k.data(), delta.data(), a, dk, dv, wide);
        if constexpr (!fp32_states) {  // the fp32 copy rounded back to nearest even
          int64_t e = 0;
          for (; e + 8 <= dk * dv; e += 8) vec8::store8(st + e, _mm256_loadu_ps(sh + e));
          for (; e < dk * dv; ++e) st[e] = static_cast<ST>(sh[e]);
        }
      }
    }
  });
}

// f(ST{}): the states' dtype, fp32 or bf16
template <typename F>
void dispatch_state(const torch::Tensor& state, F&& f) {
  if (state.scalar_type() == at::kFloat)
    f(float{});
  else
    f(c10::BFloat16{});
}

// The shapes and layouts both entries below take (qkv rows may be strided, e.g. the columns of a
// packed projection's output).
void check_step(const torch::Tensor& qkv, const torch::Tensor& conv_state,
                const torch::Tensor& conv_w, const torch::Tensor& state, int64_t nk) {
  const int64_t n = qkv.size(0), C = qkv.size(1), Kc = conv_w.size(1);
  const int64_t nv = state.size(1), dk = state.size(2), dv = state.size(3);
  TORCH_CHECK(qkv.stride(1) == 1 && conv_state.is_contiguous() && conv_w.is_contiguous() &&
                  state.is_contiguous() &&
                  (state.scalar_type() == at::kFloat || state.scalar_type() == at::kBFloat16),
              "deltanet_decode: layouts or dtypes not as expected (states fp32 or bf16)");
  TORCH_CHECK(qkv.scalar_type() == conv_state.scalar_type() &&
                  qkv.scalar_type() == conv_w.scalar_type(),
              "deltanet_decode: qkv, conv state and conv weight must share the model dtype");
  TORCH_CHECK(conv_state.size(0) == n && conv_state.size(1) == C && conv_state.size(2) == Kc - 1 &&
                  state.size(0) == n && C == 2 * nk * dk + nv * dv && nv % nk == 0,
              "deltanet_decode: shapes do not match");
}

torch::Tensor deltanet_decode(const torch::Tensor& qkv,   // [n, C] model dtype, rows may be strided
                              torch::Tensor& conv_state,  // [n, C, K-1] model dtype, in place
                              const torch::Tensor& conv_w,  // [C, K] model dtype
                              const torch::Tensor& g,       // [n, nv] fp32 log-decay
                              const torch::Tensor& beta,    // [n, nv] model dtype
                              torch::Tensor& state,  // [n, nv, dk, dv] fp32 / bf16, in place
                              int64_t nk, bool avx2_only) {
  check_step(qkv, conv_state, conv_w, state, nk);
  TORCH_CHECK(g.scalar_type() == at::kFloat && beta.scalar_type() == qkv.scalar_type(),
              "deltanet_decode: g must be fp32 and beta of the model dtype");
  const int64_t n = qkv.size(0), C = qkv.size(1), Kc = conv_w.size(1);
  const int64_t nv = state.size(1), dk = state.size(2), dv = state.size(3);
  auto gc = g.contiguous();
  auto bc = beta.contiguous();
  auto out = torch::empty({n, nv, dv}, state.options().dtype(at::kFloat));
  const auto dt = qkv.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "deltanet_decode", [&] {
    dispatch_state(state, [&](auto st) {
      using ST = decltype(st);
      deltanet_decode_impl<scalar_t, ST>(
          qkv.data_ptr<scalar_t>(), qkv.stride(0), conv_state.data_ptr<scalar_t>(),
          conv_w.data_ptr<scalar_t>(), gc.data_ptr<float>(), bc.data_ptr<scalar_t>(),
          state.data_ptr<ST>(), out.data_ptr<float>(), n, C, Kc, nk, nv, dk, dv,
          cpu_avx512f() && !avx2_only);
    });
  });
  return out;
}

// The DeltaNet layer between its projections, at decode, in one call: the gates from a and b,
// the step above, its output rounded to the model dtype (where the op-by-op path's o tensor
// rounds) and the gated RMSNorm with z, all with small_rows.h's arithmetic (small_ops_cpu.cpp's
// gates and norm), so the result is bitwise the op-by-op path's. Returns y [n, nv * dv] in the
// model dtype: out_proj's input. At batch-1 decode it saves ~20 PyTorch dispatches a layer.
torch::Tensor deltanet_decode_gated(const torch::Tensor& qkv,  // [n, C]
                                    const torch::Tensor& z,    // [n, nv * dv] output gate
                                    const torch::Tensor& a,    // [n, nv]
                                    const torch::Tensor& b,    // [n, nv]
                                    torch::Tensor& conv_state, const torch::Tensor& conv_w,
                                    const torch::Tensor& dt_bias,  // [nv]
                                    const torch::Tensor& a_log,    // [nv]
                                    torch::Tensor& state,
                                    const torch::Tensor& norm_w,  // [dv]
                                    double eps, int64_t nk, bool avx2_only) {
  check_step(qkv, conv_state, conv_w, state, nk);
  const int64_t n = qkv.size(0), C = qkv.size(1), Kc = conv_w.size(1);
  const int64_t nv = state.size(1), dk = state.size(2), dv = state.size(3);
  const auto dt = qkv.scalar_type();
  for (const torch::Tensor* t : {&z, &a, &b, &dt_bias, &a_log, &norm_w})
    TORCH_CHECK(t->scalar_type() == dt && t->stride(-1) == 1,
                "deltanet_decode_gated: z, a, b, dt_bias, A_log and the norm weight must be of the "
                "model dtype with a contiguous last dim");
  TORCH_CHECK(z.dim() == 2 && z.size(0) == n && z.size(1) == nv * dv && a.dim() == 2 &&
                  a.size(0) == n && a.size(1) == nv && a.sizes() == b.sizes() &&
                  dt_bias.numel() == nv && a_log.numel() == nv && norm_w.numel() == dv,
              "deltanet_decode_gated: shapes do not match");
  auto y = torch::empty({n, nv * dv}, qkv.options());
  vec8::dispatch(dt, "deltanet_decode_gated", [&](auto tag) {
    using T = decltype(tag);
    std::vector<float> g(n * nv), o(n * nv * dv);
    std::vector<T> beta(n * nv);
    const T* A = a.data_ptr<T>();
    const T* B = b.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i)
      rows::deltanet_gates_row(A + i * a.stride(0), B + i * b.stride(0), dt_bias.data_ptr<T>(),
                               a_log.data_ptr<T>(), nv, g.data() + i * nv, beta.data() + i * nv);
    dispatch_state(state, [&](auto st) {
      using ST = decltype(st);
      deltanet_decode_impl<T, ST>(qkv.data_ptr<T>(), qkv.stride(0), conv_state.data_ptr<T>(),
                                  conv_w.data_ptr<T>(), g.data(), beta.data(),
                                  state.data_ptr<ST>(), o.data(), n, C, Kc, nk, nv, dk, dv,
                                  cpu_avx512f() && !avx2_only);
    });
    const T* Z = z.data_ptr<T>();
    const T* W = norm_w.data_ptr<T>();
    T* Y = y.data_ptr<T>();
    at::parallel_for(0, n * nv, 64, [&](int64_t begin, int64_t end) {
      std::vector<T> oh(dv);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t i = idx / nv, h = idx % nv;
        for (int64_t j = 0; j < dv; ++j) oh[j] = rows::round_to<T>(o[idx * dv + j]);
        rows::gated_rms_norm_row(oh.data(), Z + i * z.stride(0) + h * dv, W, Y + idx * dv, dv,
                                 static_cast<float>(eps));
      }
    });
  });
  return y;
}

// ---- prefill: the chunked gated delta rule, one value head a task --------------------------------
// ops/gated_delta.py chunk_gated_delta_rule is the PyTorch twin (the math is there). Per value
// head h, chunk by chunk of kC positions (the last zero-padded: g = 0, beta = 0 leave the state
// as it is), with the state S [dk, dv] fp32 in the thread's buffer:
//   q, k l2-normalised (q times scale); gam = cumsum g; D[i][j] = exp(gam_i - gam_j) for j <= i,
//   else 0 (exponents under -60 give 0, as the twin's _exp_cut);
//   A = strictly_lower((beta k) k^T * D); [U | W] = (I + A)^-1 [beta v | beta exp(gam) k] by
//   forward substitution;
//   V' = U - W S;  O = (q exp(gam)) S + ((q k^T) * D) V';  S = exp(gam_last) S + K_dec^T V'
//   with K_dec = k exp(gam_last - gam).
// A chunk's rows stay in L1 / L2 (~0.35 MB at head dims 128) and every product is a tile of
// fp32 FMAs; the twin's batched matmuls over the whole prompt (MKL's bmm: 80-160 GFLOP/s on AMD
// CPUs) streamed 16 MB intermediates between them (`bench/deltanet_prefill.py`). Each output
// sums its terms in the same order on the AVX2 and AVX-512 paths: the same bits.

constexpr int64_t kC = 64;  // positions a chunk (ops/gated_delta.py CHUNK_SIZE)
constexpr float kExpCut = -60.f;

enum class Acc { kSet, kAdd, kSub };  // C = A B, C += A B, C -= A B

// C [M, N] (op)= A [M, K] @ B [K, N], row-major with leading dims; M % 4 == 0, N % 16 == 0.
// Each output: its start (0 or C) and K FMAs in order of k.
template <Acc mode>
void gemm_avx2(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
               int64_t ldb, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; i += 4)
    for (int64_t j = 0; j < N; j += 16) {
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 2; ++c)
          acc[r][c] = mode == Acc::kSet ? _mm256_setzero_ps()
                                        : _mm256_loadu_ps(C + (i + r) * ldc + j + 8 * c);
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + j), b1 = _mm256_loadu_ps(B + k * ldb + j + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(A + (i + r) * lda + k);
          if constexpr (mode == Acc::kSub) {
            acc[r][0] = _mm256_fnmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fnmadd_ps(a, b1, acc[r][1]);
          } else {
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
          }
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 2; ++c) _mm256_storeu_ps(C + (i + r) * ldc + j + 8 * c, acc[r][c]);
    }
}

// the same, 4 rows x 16 NV columns a tile of 512-bit registers
template <Acc mode, int NV>
__attribute__((target("avx512f,fma"))) void gemm_tile16(int64_t i, int64_t j, int64_t K,
                                                        const float* A, int64_t lda,
                                                        const float* B, int64_t ldb, float* C,
                                                        int64_t ldc) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c)
      acc[r][c] = mode == Acc::kSet ? _mm512_setzero_ps()
                                    : _mm512_loadu_ps(C + (i + r) * ldc + j + 16 * c);
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    for (int c = 0; c < NV; ++c) b[c] = _mm512_loadu_ps(B + k * ldb + j + 16 * c);
    for (int r = 0; r < 4; ++r) {
      const __m512 a = _mm512_set1_ps(A[(i + r) * lda + k]);
      for (int c = 0; c < NV; ++c)
        acc[r][c] = mode == Acc::kSub ? _mm512_fnmadd_ps(a, b[c], acc[r][c])
                                      : _mm512_fmadd_ps(a, b[c], acc[r][c]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(C + (i + r) * ldc + j + 16 * c, acc[r][c]);
}

template <Acc mode>
void gemm(bool wide, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc) {
  if (!wide) return gemm_avx2<mode>(M, N, K, A, lda, B, ldb, C, ldc);
  for (int64_t i = 0; i < M; i += 4) {
    int64_t j = 0;
    for (; j + 64 <= N; j += 64) gemm_tile16<mode, 4>(i, j, K, A, lda, B, ldb, C, ldc);
    for (; j < N; j += 16) gemm_tile16<mode, 1>(i, j, K, A, lda, B, ldb, C, ldc);
  }
}

// X [C, N] = (I + A)^-1 X for A [C, C] strictly lower (ld C): row i minus A[i][j] row j for
// j < i in order (rows above already solved); N % 16 == 0
void solve_avx2(const float* A, float* X, int64_t C, int64_t N, int64_t ldx) {
  for (int64_t j0 = 0; j0 < N; j0 += 16)
    for (int64_t i = 1; i < C; ++i) {
      float* xi = X + i * ldx + j0;
      __m256 x0 = _mm256_loadu_ps(xi), x1 = _mm256_loadu_ps(xi + 8);
      for (int64_t j = 0; j < i; ++j) {
        const __m256 a = _mm256_broadcast_ss(A + i * C + j);
        x0 = _mm256_fnmadd_ps(a, _mm256_loadu_ps(X + j * ldx + j0), x0);
        x1 = _mm256_fnmadd_ps(a, _mm256_loadu_ps(X + j * ldx + j0 + 8), x1);
      }
      _mm256_storeu_ps(xi, x0);
      _mm256_storeu_ps(xi + 8, x1);
    }
}

template <int NV>
__attribute__((target("avx512f,fma"))) void solve_cols16(const float* A, float* X, int64_t C,
                                                         int64_t j0, int64_t ldx) {
  for (int64_t i = 1; i < C; ++i) {
    float* xi = X + i * ldx + j0;
    __m512 x[NV];
    for (int c = 0; c < NV; ++c) x[c] = _mm512_loadu_ps(xi + 16 * c);
    for (int64_t j = 0; j < i; ++j) {
      const __m512 a = _mm512_set1_ps(A[i * C + j]);
      for (int c = 0; c < NV; ++c)
        x[c] = _mm512_fnmadd_ps(a, _mm512_loadu_ps(X + j * ldx + j0 + 16 * c), x[c]);
    }
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(xi + 16 * c, x[c]);
  }
}

void solve(bool wide, const float* A, float* X, int64_t C, int64_t N, int64_t ldx) {
  if (!wide) return solve_avx2(A, X, C, N, ldx);
  int64_t j = 0;
  for (; j + 64 <= N; j += 64) solve_cols16<4>(A, X, C, j, ldx);
  for (; j < N; j += 16) solve_cols16<1>(A, X, C, j, ldx);
}

// exp(x), 0 for x < kExpCut (and -inf), 8 lanes
inline __m256 exp_cut8(__m256 x) {
  return _mm256_and_ps(vec8::exp8(x), _mm256_cmp_ps(x, _mm256_set1_ps(kExpCut), _CMP_GE_OQ));
}

// a row of d values (d % 8 == 0) into fp32 dst, times inv_norm(row) * mul where l2 (1 /
// sqrt(sum of squares + kL2NormEps), the squares summed in 8 lanes, then the lanes in a fixed
// order)
template <typename T>
void load_row(const T* x, int64_t d, bool l2, float mul, float* dst) {
  float f = mul;
  if (l2) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) {
      const __m256 v = vec8::load8(x + j);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    alignas(32) float l[8];
    _mm256_store_ps(l, acc);
    const float ss = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
    f = 1.f / std::sqrt(ss + kL2NormEps) * mul;
  }
  const __m256 m = _mm256_set1_ps(f);
  for (int64_t j = 0; j < d; j += 8) _mm256_storeu_ps(dst + j, _mm256_mul_ps(vec8::load8(x + j), m));
}

template <typename T>
inline void prefetch_row(const T* x, int64_t d) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(T)); b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
}

struct ChunkHead {  // one value head's pointers (rows strided) and the shared sizes
  int64_t T, dk, dv, q_stride, k_stride, v_stride, o_stride, g_stride;
  float scale;
  bool wide;
};

// One value head through all its chunks: S [dk, dv] in / out; after chunk n the state is also
// copied to ck_out[c] where ck[c] == (n + 1) kC (ck sorted, ck_stride floats apart).
template <typename T>
void chunk_head(const ChunkHead& p, const T* Qh, const T* Kh, const T* Vh, const float* G,
                const float* Bt, T* Oh, float* S, const int64_t* ck, int64_t nck, float* ck_out,
                int64_t ck_stride, std::vector<float>& buf) {
  const int64_t dk = p.dk, dv = p.dv, ldx = dv + dk;
  // rows a chunk: kC, or a prompt shorter than that rounded up to 16 (the padding's zero terms
  // leave every sum as it is: the same bits as kC, less work for short prompts)
  const int64_t C = p.T >= kC ? kC : (p.T + 15) / 16 * 16;
  buf.resize(3 * C * dk + C * ldx + 3 * C * C + C * dv + 4 * C);
  float* Q = buf.data();  // [C, dk] normalised, then times exp(gam)
  float* K = Q + C * dk;  // [C, dk]
  float* Kt = K + C * dk;  // [dk, C], then K_dec^T
  float* X = Kt + C * dk;  // [C, dv + dk]: [U | W], then [V' | W]
  float* A = X + C * ldx;  // [C, C]
  float* P = A + C * C;  // [C, C]
  float* D = P + C * C;  // [C, C]
  float* O = D + C * C;  // [C, dv]
  float* gam = O + C * dv;  // [C]
  float* beta = gam + C;  // [C]
  float* eg = beta + C;  // [C] exp(gam)
  float* dl = eg + C;  // [C] exp(gam_last - gam)
  int64_t c = 0;
  for (int64_t t0 = 0; t0 < p.T; t0 += C) {
    const int64_t L = std::min(C, p.T - t0);
    float run = 0.f;
    for (int64_t i = 0; i < C; ++i) {
      if (i < L) {
        const int64_t t = t0 + i;
        load_row(Qh + t * p.q_stride, dk, true, p.scale, Q + i * dk);
        load_row(Kh + t * p.k_stride, dk, true, 1.f, K + i * dk);
        load_row(Vh + t * p.v_stride, dv, false, 1.f, X + i * ldx);
        run += G[t * p.g_stride];
        beta[i] = Bt[t * p.g_stride];
      } else {
        std::fill(Q + i * dk, Q + (i + 1) * dk, 0.f);
        std::fill(K + i * dk, K + (i + 1) * dk, 0.f);
        std::fill(X + i * ldx, X + i * ldx + dv, 0.f);
        beta[i] = 0.f;
      }
      gam[i] = run;
    }
    // the next chunk's rows, strided in the conv's output: into L2 while this chunk computes
    // (loaded cold, they were ~30% of the time outside the products)
    for (int64_t t = t0 + C; t < std::min(p.T, t0 + 2 * C); ++t) {
      prefetch_row(Qh + t * p.q_stride, dk);
      prefetch_row(Kh + t * p.k_stride, dk);
      prefetch_row(Vh + t * p.v_stride, dv);
    }
    const __m256 last = _mm256_set1_ps(gam[C - 1]);
    for (int64_t i = 0; i < C; i += 8) {
      const __m256 g8 = _mm256_loadu_ps(gam + i);
      _mm256_storeu_ps(eg + i, exp_cut8(g8));
      _mm256_storeu_ps(dl + i, exp_cut8(_mm256_sub_ps(last, g8)));
    }
    float decay;  // exp(gam_last): the state's decay over the chunk
    {
      alignas(32) float l[8];
      _mm256_store_ps(l, exp_cut8(last));
      decay = l[0];
    }
    for (int64_t i = 0; i < C; ++i) {  // D, zero above the diagonal
      const __m256 gi = _mm256_set1_ps(gam[i]);
      for (int64_t j = 0; j < C; j += 8) {
        __m256 d = _mm256_setzero_ps();
        if (j <= i) {
          const __m256 idx = _mm256_add_ps(_mm256_set1_ps(static_cast<float>(j)),
                                           _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7));
          d = _mm256_and_ps(exp_cut8(_mm256_sub_ps(gi, _mm256_loadu_ps(gam + j))),
                            _mm256_cmp_ps(idx, _mm256_set1_ps(static_cast<float>(i)), _CMP_LE_OQ));
        }
        _mm256_storeu_ps(D + i * C + j, d);
      }
    }
    for (int64_t i0 = 0; i0 < C; i0 += 8)  // K^T, 8 x 8 at a time
      for (int64_t d0 = 0; d0 < dk; d0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(K + (i0 + i) * dk + d0);
        vec8::transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(Kt + (d0 + i) * C + i0, r[i]);
      }
    // A = strictly_lower(beta_i (k_i . k_j) D_ij); the right-hand sides [beta v | beta exp(gam) k]
    gemm<Acc::kSet>(p.wide, C, C, dk, K, dk, Kt, C, A, C);
    for (int64_t i = 0; i < C; ++i) {
      const __m256 b = _mm256_set1_ps(beta[i]);
      for (int64_t j = 0; j < C; j += 8) {
        float* a = A + i * C + j;
        _mm256_storeu_ps(a, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a), b), _mm256_loadu_ps(D + i * C + j)));
      }
      A[i * C + i] = 0.f;
      float* x = X + i * ldx;
      const __m256 be = _mm256_set1_ps(eg[i]);
      for (int64_t j = 0; j < dv; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), b));
      for (int64_t j = 0; j < dk; j += 8)
        _mm256_storeu_ps(x + dv + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(K + i * dk + j), b), be));
    }
    solve(p.wide, A, X, C, ldx, ldx);
    gemm<Acc::kSub>(p.wide, C, dv, dk, X + dv, ldx, S, dv, X, ldx);  // V' = U - W S
    gemm<Acc::kSet>(p.wide, C, C, dk, Q, dk, Kt, C, P, C);        // P = (q k^T) D
    for (int64_t i = 0; i < C * C; i += 8)
      _mm256_storeu_ps(P + i, _mm256_mul_ps(_mm256_loadu_ps(P + i), _mm256_loadu_ps(D + i)));
    for (int64_t i = 0; i < C; ++i) {
      const __m256 e = _mm256_set1_ps(eg[i]);
      for (int64_t j = 0; j < dk; j += 8)
        _mm256_storeu_ps(Q + i * dk + j, _mm256_mul_ps(_mm256_loadu_ps(Q + i * dk + j), e));
    }
    gemm<Acc::kSet>(p.wide, C, dv, dk, Q, dk, S, dv, O, dv);  // O = (q exp(gam)) S
    gemm<Acc::kAdd>(p.wide, C, dv, C, P, C, X, ldx, O, dv);  //   + P V'
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < dv; j += 8)
        vec8::store8(Oh + (t0 + i) * p.o_stride + j, _mm256_loadu_ps(O + i * dv + j));
    // S = exp(gam_last) S + K_dec^T V'
    const __m256 dec = _mm256_set1_ps(decay);
    for (int64_t i = 0; i < dk * dv; i += 8)
      _mm256_storeu_ps(S + i, _mm256_mul_ps(_mm256_loadu_ps(S + i), dec));
    for (int64_t d = 0; d < dk; ++d)
      for (int64_t j = 0; j < C; j += 8)
        _mm256_storeu_ps(Kt + d * C + j, _mm256_mul_ps(_mm256_loadu_ps(Kt + d * C + j), _mm256_loadu_ps(dl + j)));
    gemm<Acc::kAdd>(p.wide, dk, dv, C, Kt, C, X, ldx, S, dv);
    for (; c < nck && ck[c] <= t0 + kC; ++c)
      if (ck[c] == t0 + kC) std::copy(S, S + dk * dv, ck_out + c * ck_stride);
  }
}

// The chunked gated delta rule of one sequence: q, k [T, Hk, dk] and v [T, Hv, dv] of the model
// dtype (rows may be strided: views of the conv's output), g and beta [T, Hv] fp32, the state
// [Hv, dk, dv] fp32 (in: the initial state; out: the final one), o [T, Hv, dv] written (rows
// may be strided). ck: offsets (multiples of 64 in 1..T, ascending) after which the state is
// copied into ck_states [len(ck), Hv, dk, dv] fp32. dk, dv multiples of 16. q and k are
// l2-normalised here (q times scale), as the layer's use_qk_l2norm asks.
void deltanet_chunk(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                    const torch::Tensor& g, const torch::Tensor& beta, torch::Tensor& state,
                    torch::Tensor& o, const std::vector<int64_t>& ck, torch::Tensor& ck_states,
                    double scale, bool avx2_only) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && o.sizes() == v.sizes() &&
                  v.size(0) == q.size(0) && v.size(1) % q.size(1) == 0,
              "deltanet_chunk: q, k [T, Hk, dk], v and o [T, Hv, dv] expected");
  const int64_t T = q.size(0), Hk = q.size(1), dk = q.size(2), Hv = v.size(1), dv = v.size(2);
  TORCH_CHECK(dk % 16 == 0 && dv % 16 == 0, "deltanet_chunk: head dims must be multiples of 16");
  for (const torch::Tensor* t : {&q, &k, &v, const_cast<const torch::Tensor*>(&o)})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->stride(2) == 1 &&
                    t->stride(1) == t->size(2),
                "deltanet_chunk: q, k, v and o of one dtype, each row's heads contiguous");
  TORCH_CHECK(g.scalar_type() == at::kFloat && beta.scalar_type() == at::kFloat &&
                  g.is_contiguous() && beta.is_contiguous() && g.sizes() == beta.sizes() &&
                  g.dim() == 2 && g.size(0) == T && g.size(1) == Hv,
              "deltanet_chunk: g and beta contiguous fp32 [T, Hv] expected");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 3 &&
                  state.size(0) == Hv && state.size(1) == dk && state.size(2) == dv,
              "deltanet_chunk: the state must be contiguous fp32 [Hv, dk, dv]");
  const int64_t nck = static_cast<int64_t>(ck.size());
  TORCH_CHECK(ck_states.scalar_type() == at::kFloat && ck_states.is_contiguous() &&
                  ck_states.numel() == nck * Hv * dk * dv,
              "deltanet_chunk: ck_states must be contiguous fp32 [len(ck), Hv, dk, dv]");
  for (int64_t c = 0; c < nck; ++c)
    TORCH_CHECK(ck[c] % kC == 0 && ck[c] > 0 && ck[c] <= T && (c == 0 || ck[c] > ck[c - 1]),
                "deltanet_chunk: checkpoint offsets must be ascending multiples of 64 in 1..T");
  const ChunkHead p{T, dk, dv, q.stride(0), k.stride(0), v.stride(0), o.stride(0), Hv,
                    static_cast<float>(scale), cpu_avx512f() && !avx2_only};
  const int64_t r = Hv / Hk;
  const float* G = g.data_ptr<float>();
  const float* B = beta.data_ptr<float>();
  float* S = state.data_ptr<float>();
  float* CK = ck_states.data_ptr<float>();
  vec8::dispatch(q.scalar_type(), "deltanet_chunk", [&](auto tag) {
    using T_ = decltype(tag);
    const T_* Q = q.data_ptr<T_>();
    const T_* K = k.data_ptr<T_>();
    const T_* V = v.data_ptr<T_>();
    T_* O = o.data_ptr<T_>();
    // heads handed out one at a time (a thread that runs slower takes fewer)
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(Hv, at::get_num_threads()), 1, [&](int64_t, int64_t) {
      std::vector<float> buf;
      for (int64_t h; (h = next.fetch_add(1)) < Hv;)
        chunk_head<T_>(p, Q + (h / r) * dk, K + (h / r) * dk, V + h * dv, G + h, B + h,
                       O + h * dv, S + h * dk * dv, ck.data(), nck, CK + h * dk * dv,
                       Hv * dk * dv, buf);
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("deltanet_decode", &deltanet_decode, QWEN35_NOGIL, "DeltaNet decode after the projections (in place)",
        py::arg("qkv"), py::arg("conv_state"), py::arg("conv_w"), py::arg("g"), py::arg("beta"),
        py::arg("state"), py::arg("num_key_heads"), py::arg("avx2_only") = false);
  m.def("deltanet_decode_gated", &deltanet_decode_gated, QWEN35_NOGIL,
        "the DeltaNet decode step with its gates and gated output norm (in place)", py::arg("qkv"),
        py::arg("z"), py::arg("a"), py::arg("b"), py::arg("conv_state"), py::arg("conv_w"),
        py::arg("dt_bias"), py::arg("A_log"), py::arg("state"), py::arg("norm_w"), py::arg("eps"),
        py::arg("num_key_heads"), py::arg("avx2_only") = false);
  m.def("deltanet_chunk", &deltanet_chunk, QWEN35_NOGIL,
        "the chunked gated delta rule of one sequence (prefill; state in place)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"), py::arg("state"), py::arg("o"),
        py::arg("ck"), py::arg("ck_states"), py::arg("scale"),
        py::arg("avx2_only") = false);
}
