"""The exact top tokens of each row from an int8 screen of lm_head (CPU decode).

At batch 1 on a CPU the head is the largest single read of a decode step (Qwen3.5-0.8B: 248K x
1024 weights, 1.0 of the 3.0 GB a token reads in fp32, 0.5 of 1.5 GB in bf16), and decode is
bound by those bytes. Yet a greedy row needs only the first index of its largest logit, and a
top-k row (temperature > 0, top_k = k) only its k largest logits: the sampler masks the rest
before it draws. An int8 copy of the head, one scale per row (a quarter of fp32's bytes, half of
bf16's), screens the vocabulary first. For every token v and input row x,

    |logit_v(x) - screen_v(x)| <= ||x||_2 * err_v + ||x - x^||_2 * nq_v + tiny_v

where err_v (built once from the weights) is the row's quantisation error ||W_v - s_v q_v||_2
(Cauchy-Schwarz) plus worst-case bounds of both sides' float rounding (the input rounded to bf16,
fp32 accumulation over K terms, the output rounded to bf16), nq_v = ||s_v q_v||_2 carries the
input's own rounding error where the screen rounds it (kernels/head_screen_cpu.cpp: to int8 in
blocks of 64, bytes times bytes, on AVX512-VNNI; elsewhere to 16 bits per 128 as the AVX2 int8
GEMV does; `candidates_reference`, the PyTorch twin, screens through the int8 GEMV, which rounds
its rows the same way on CPUs without AVX512), and tiny_v covers denormals flushed to zero.

With lo = screen - bound and hi = screen + bound, at least k tokens have a logit >= the k-th
largest lo of the row, so every token among the k largest logits (ties included) has hi >= it.
Those candidates (tens to hundreds of 248K) get their logits computed exactly as the full head
computes them, through the same `layers.linear.head_linear` call on the same input rows, whose
GEMV kernel gives every output from its own weight row and input row alone (bf16: 8 rows a
call). Greedy rows take the first maximum among them: the full head's argmax, bit for bit
(`tokens`). Other rows get a logits row that is -inf outside the candidates (`logits`): the sampler's top-k mask leaves
exactly what it leaves of the full row, so its draw is the same, seeded or not. bf16 heads round
the logits: tokens that can round to the same value as the k-th are kept too.
tests/test_head_screen.py also breaks it on purpose (ties, rounded ties, a row the int8 screen
ranks wrong). When the screen cannot decide cheaply (more than max_candidates tokens left, a
non-finite input) both return None and the caller computes the full logits.

Only rows that need nothing else use it (engine/model_runner.py `screen_k`: no logprobs,
penalties, logit bias or pending min_tokens; greedy, or sampled with 0 < top_k <= MAX_TOP_K;
under a grammar, greedy or with a top-k, as a top-K row whose masked top tokens the runner
certifies or recomputes: `_grammar_rows`); the engine builds it on CPUs for plain fp32 / bf16 heads (`--no-head-screen`
turns it off) and counts its bytes as weights (plan/cpu.py's head_screen_bytes).
"""

from __future__ import annotations

import math

import torch

from qwen35.layers.linear import Linear, head_kernel_rows, head_linear
from qwen35.quant.formats import INT8_X_GROUP, INT8_X_MAX, quantize_rows_i16

MAX_CANDIDATES = 4096  # per 4 input rows (max_candidates): more left after the screen, full head
# The exact logits of C candidates cost their weight rows' gather and a C-row product: `python
# bench/head_screen.py --rescore --rounds 5` (the 0.8B's head, Zen 5 VM, 2 threads): bf16 at 16
# rows 0.9 / 2.4 ms for 4,096 / 8,192 candidates, the full head 30 ms; fp32 at 16 rows 1.9 ms for
# 4,096 against 63. But a gather of 32 MiB or more is a new mapping each call (glibc serves
# blocks that large by mmap), whose page faults cost 7-14 ms more (12.4 vs 4.7 ms into a kept
# buffer for 16,384 bf16 rows): the gathered rows stay under GATHER_MAX_BYTES, transient.
GATHER_MAX_BYTES = 24 << 20
# The screen takes every step whose rows the full head gives from the GEMV kernel
# (layers/linear.py head_kernel_rows: bf16 up to 16 rows where bf16 is native, else 8; fp32 rows
# 16, or 48 on bf16-stored heads, which `linear` runs 16 rows a call), in groups of SCREEN_ROWS (the
# kernel's 16 lanes), and beats the full head at all of them. `python bench/head_screen.py
# --head-only --rounds 5 --threads 2` (the 0.8B's head, caches cold, Zen 5 VM), bf16 full vs
# screen: 11.5 / 6.9 ms at 1 row, 14.8 / 8.0 at 4; at 8 rows 16.5 / 21.3 before the VNNI kernel
# put 4-16 input rows in a vector's lanes (kernels/head_screen_cpu.cpp dot_pairs / dot_lanes),
# 13.4 / 8.4 after; fp32 at 16 rows 66 / 17 ms (43.8 before). README "Head screen past 4 rows".
SCREEN_ROWS = 16


def max_candidates(rows: int, row_bytes: int = 0) -> int:
    """The most candidates the exact step takes for `rows` input rows, weight rows of
    `row_bytes` each (0: no byte bound)."""
    n = MAX_CANDIDATES * max(1, -(-rows // 4))
    return min(n, GATHER_MAX_BYTES // row_bytes) if row_bytes else n


MAX_TOP_K = 256  # sampled rows with a larger top_k read the full head
_BUILD_ROWS = 16384  # rows of the head quantised at a time (bounded temporary memory)


def quantize_head_reference(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The screen's tensors of a [V, K] head, with PyTorch ops (kernels/small_ops_cpu.cpp
    quantize_head computes the same in one pass): q [V, K] int8 (rows scaled by max|w| / 127,
    rounded half to even), scale [V], and the bounds' err [V] (multiplies ||x||_2), nq [V]
    (||s_v q_v||_2) and tiny [V], each fp32."""
    V, K = weight.shape
    q_all = torch.empty(V, K, dtype=torch.int8)
    scale_all, err_all, nq_all, tiny_all = (torch.empty(V) for _ in range(4))
    # rounding bound of one side (accumulation over K terms in fp32, worst case K * 2^-24,
    # taken 4x) and of the screen's input / output in bf16 (2^-9 each, taken 2x)
    acc = K * 2.0**-22
    for i in range(0, V, _BUILD_ROWS):
        w = weight[i : i + _BUILD_ROWS].float()  # [R, K] (the weight itself when fp32)
        amax = w.abs().amax(dim=1)  # [R]
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = (w / scale[:, None]).round_().clamp_(-127, 127)
        q_all[i : i + len(w)] = q.to(torch.int8)
        scale_all[i : i + len(w)] = scale
        deq = q.mul_(scale[:, None])  # fp32 products, each within 2^-24 of q * scale
        n_w, n_q = w.norm(dim=1), deq.norm(dim=1)  # fp32 norms: relative error < K 2^-24
        err = (w - deq).norm(dim=1) + (acc + 2.0**-7) * n_q + acc * n_w
        # denormals flushed to zero: an input below 2^-126 makes its product off by less
        # than 2^-126 * |weight|, a flushed partial sum or product by less than 2^-126
        # (K of each per side, two sides)
        tiny = K * 2.0**-125 * (amax + deq.abs().amax(dim=1)) + K * 2.0**-120
        err_all[i : i + len(w)] = err * (1 + 2.0**-8)  # the norms' own rounding, with room
        nq_all[i : i + len(w)] = n_q * (1 + 2.0**-8)
        tiny_all[i : i + len(w)] = tiny * 2
    return q_all, scale_all, err_all, nq_all, tiny_all


class HeadScreen:
    """The int8 screen of one lm_head weight [V, K] (fp32 or bf16, contiguous, on the CPU), for
    head-input rows of `rows_dtype` (default: the weight's; fp32 rows on a bf16 head: a model
    computing in fp32 on bf16-stored weights)."""

    avx2_only = False  # the kernel's AVX2 dots on an AVX512-VNNI CPU too (tests)

    def __init__(self, weight: torch.Tensor, rows_dtype: torch.dtype | None = None):
        if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"a [V, K] fp32 / bf16 head is needed, got {weight.dtype} {tuple(weight.shape)}"
            )
        self.weight = weight
        from qwen35.kernels import small_ops

        mod = small_ops.load()
        fast = mod is not None and weight.is_contiguous()
        build = mod.quantize_head if fast else quantize_head_reference
        self.q, self.scale, self.err, self.nq, self.tiny = build(weight)
        # the exact rows must take the GEMV kernel, whose outputs don't depend on the row count
        self.rows_dtype = rows = rows_dtype or weight.dtype
        if rows != weight.dtype and not (rows == torch.float32 and weight.dtype == torch.bfloat16):
            raise ValueError(f"{rows} rows on a {weight.dtype} head are not a GEMV kernel's")
        self.max_rows = head_kernel_rows(rows, weight)
        self.rounded_output = rows != torch.float32  # linear() gives logits in x's dtype

    @classmethod
    def build(cls, model) -> HeadScreen | None:
        """The screen of model.lm_head where it applies: a plain fp32 / bf16 Linear on the CPU,
        one rank, finite weights, a CPU the GEMV kernels run on; else None. (The kernels
        themselves load at first use: the CPU backend compiles them side by side.)"""
        from qwen35.kernels import gemv

        head = getattr(model, "lm_head", None)
        if type(head) is not Linear or getattr(getattr(model, "tp", None), "size", 1) != 1:
            return None
        w = head.weight
        if not w.is_cpu or w.dtype not in (torch.float32, torch.bfloat16) or not w.is_contiguous():
            return None
        if not gemv.GEMV.supported():
            return None
        from qwen35.weights import _count_torch, count_nonfinite

        bad = count_nonfinite(w)
        if bad is None:  # (no kernel to count with: torch's ops)
            bad = _count_torch(w)
        if bad:
            return None
        compute = getattr(model, "dtype", w.dtype)  # fp32 on a bf16-stored head: fp32 rows
        return cls(w, compute if compute in (torch.float32, torch.bfloat16) else None)

    @property
    def nbytes(self) -> int:
        """What it adds to the model (plan/cpu.py's head_screen_bytes: V * (K + 16))."""
        ts = (self.q, self.scale, self.err, self.nq, self.tiny)
        return sum(t.numel() * t.element_size() for t in ts)

    # ---- the screen ----------------------------------------------------------------------
    def candidates(self, x: torch.Tensor, ks: list[int]) -> torch.Tensor | None:
        """Ascending token ids that can be among row i's ks[i] largest logits (ties included),
        or None (undecided): kernels/head_screen_cpu.cpp where it loads, else
        `candidates_reference`."""
        from qwen35.kernels import gemv

        mod = gemv.load_screen()
        if mod is None:
            return self.candidates_reference(x, ks)
        cand = mod.screen(
            x.float().contiguous(), self.q, self.scale, self.err, self.nq, self.tiny, list(ks),
            self.rounded_output, self.limit(len(x)), self.avx2_only,
        )  # fmt: skip
        return cand if len(cand) else None

    def screen(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, K] -> the screen's logits [S, V] fp32 (int8 matmul on fp32 rows: the GEMV
        kernel where it runs)."""
        from qwen35.quant.matmul import int8_linear

        return int8_linear(x.float(), self.q, self.scale)

    def candidates_reference(self, x: torch.Tensor, ks: list[int]) -> torch.Tensor | None:
        """The same from `screen` and torch ops. The int8 GEMV behind `screen` rounds its fp32
        rows to 16 bits per group of 128 on CPUs without AVX512 (kernels/gemv_cpu.cpp), so the
        bound carries nq_v ||x - x^|| for that rounding (where the rows stay exact the term only
        widens the bound by ~1e-5 of ||x||)."""
        s = self.screen(x)  # [S, V]
        if not bool(torch.isfinite(s).all()):
            return None
        xf = x.float()
        xn = xf.norm(dim=1, keepdim=True) * (1 + 2.0**-10)  # [S, 1]
        xh = quantize_rows_i16(xf, INT8_X_GROUP, INT8_X_MAX)
        xe = (xf - xh).norm(dim=1, keepdim=True) * (1 + 2.0**-10)  # [S, 1]
        # b = ||x|| err + ||x - x^|| nq + tiny + slack for rounding s +- b in fp32
        b = torch.addcmul(self.tiny, xn, self.err).addcmul_(xe, self.nq)
        b.add_(s.abs(), alpha=2.0**-18)  # [S, V]
        lo = s - b
        V = lo.shape[1]
        best = torch.stack([
            lo[i].topk(k).values[-1] if k <= V else lo.new_tensor(-math.inf)
            for i, k in enumerate(ks)
        ])[:, None]  # fmt: skip  # [S, 1]: the k-th largest lower bound
        if self.rounded_output:  # logits rounded to bf16: keep all that can round to the same
            best = best - best.abs() * 2.0**-6
        keep = (s + b >= best).any(dim=0)  # [V]
        cand = keep.nonzero().flatten()
        return cand if len(cand) <= self.limit(len(x)) else None

    # ---- what the runner calls -------------------------------------------------------------
    def _exact(self, x: torch.Tensor, ks: list[int]):
        """[(first row, candidates [C], their exact logits [S, C] fp32)], one per group of up to
        SCREEN_ROWS rows; a group the screen leaves undecided (of several) gets its full logits
        [S, V] (the same call as the full head's chunk: the same bits) and candidates None. None
        where no group is decided or a row is not finite."""
        from qwen35.kernels import gemv

        if (
            x.dim() != 2
            or x.dtype != self.rows_dtype
            or not 0 < x.shape[0] <= self.max_rows
            or len(ks) != x.shape[0]
            or gemv.load() is None  # switched off since the build: the full head's path
            or not bool(torch.isfinite(x).all())
        ):
            return None
        starts = range(0, len(x), SCREEN_ROWS)
        parts = [x[i : i + SCREEN_ROWS].contiguous() for i in starts]
        cands = [self.candidates(rows, ks[i : i + SCREEN_ROWS])
                 for i, rows in zip(starts, parts, strict=True)]  # fmt: skip
        if all(cand is None for cand in cands):
            return None  # the caller's full head, at no extra cost
        groups = []
        for i, rows, cand in zip(starts, parts, cands, strict=True):
            w = self.weight if cand is None else self.weight.index_select(0, cand)
            exact = head_linear(rows, w).float()  # [S, C] (undecided: [S, V])
            if not bool(torch.isfinite(exact).all()):
                return None  # the full path's NaN / inf handling decides
            groups.append((i, cand, exact))
        return groups

    def limit(self, rows: int) -> int:
        """The most candidates a screen of `rows` input rows may leave (max_candidates)."""
        return max_candidates(rows, self.weight.shape[1] * self.weight.element_size())

    def tokens(self, x: torch.Tensor) -> list[int] | None:
        """Normed hidden rows x [S, K] (the head's input, its dtype) -> each row's greedy token
        (the first index of its largest logit, as the full head + argmax give it), or None when
        the screen cannot decide (the caller then computes the full logits)."""
        from qwen35.engine.sampler import argmax

        got = self._exact(x, [1] * len(x))
        if got is None:
            return None
        out = []
        for _, cand, exact in got:
            best = argmax(exact)
            out += (best if cand is None else cand[best]).tolist()
        return out

    def draft_tokens(self, x: torch.Tensor) -> list[int]:
        """Each row's largest screen logit: the int8 head's argmax, not guaranteed the exact
        one (ties and near-ties may differ). For speculative drafts, where a wrong token costs
        acceptance only (engine/speculative.py): one read of the int8 head, never a fallback."""
        from qwen35.engine.sampler import argmax

        return argmax(self.screen(x)).tolist()

    def logits(self, x: torch.Tensor, ks: list[int]) -> torch.Tensor | None:
        """Logits [S, V] fp32 for rows that keep only their ks[i] largest: exact (bitwise the
        full head's) at every token that can be among them, -inf elsewhere; or None."""
        got = self._exact(x, ks)
        if got is None:
            return None
        out = torch.full((len(x), self.weight.shape[0]), -math.inf)
        for i, cand, exact in got:
            if cand is None:
                out[i : i + len(exact)] = exact
            else:
                out[i : i + len(exact)].index_copy_(1, cand, exact)
        return out
