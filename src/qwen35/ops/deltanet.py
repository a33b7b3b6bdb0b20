"""Gated DeltaNet's token mixing after the projections (causal conv + SiLU, q/k l2norm, the
gated delta rule), one dispatch per step kind over the backend (ops/backend.py):

- `deltanet_prefill`: the step's prefill chunks. Reference / CPU: per sequence, the chunked
  rule, split only at checkpoints off its chunk grid: the compiled kernel's `deltanet_chunk` on
  CPUs with the kernels (`chunk_native`), else its PyTorch twin (ops/gated_delta.py). With fla-core:
  the causal conv of all sequences in one varlen `causal_conv1d` call, then all sequences in one
  varlen `chunk_gated_delta_rule` call per round, a round ending at each prefix-cache checkpoint
  (fla hands out final states only).
- `deltanet_decode`: the step's single-token rows. CPU: in slot order, states updated in place
  on runs of consecutive slots, through the compiled kernel where it is loaded.
  `deltanet_decode_gated` is the same step for a pure decode batch on a CPU with the kernels,
  fused with the gates before it and the gated output norm after it (one call a layer). GPU with Triton:
  two kernels (kernels/triton_deltanet.py) that update conv and recurrent states in their slots.
  Elsewhere: states gathered by slot, stepped, scattered back (device tensors only: capturable),
  the step itself by fla's `fused_recurrent_gated_delta_rule` where installed, else PyTorch.

Shapes: qkv [T, C] pre-conv channels [q | k | v]; g [T, nv] fp32 log-decay; beta [T, nv];
conv_w [C, K]; conv_cache [slots, C, K-1]; rec_cache [slots, nv, dk, dv]; o [T, nv, dv] out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen35.kernels import small_ops
from qwen35.ops.backend import Backend
from qwen35.ops.conv import causal_conv1d, causal_conv1d_update_, conv_state_at
from qwen35.ops.gated_delta import CHUNK_SIZE, chunk_gated_delta_rule, gated_delta_step_, l2norm_qk

# the recurrent states' dtypes the compiled and Triton decode steps keep in place (computed in
# fp32; bf16: --mamba-ssm-cache-dtype bf16, rounded as each step stores them)
STATE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Dims:
    nk: int  # key heads
    nv: int  # value heads
    dk: int
    dv: int
    kernel_size: int  # conv taps K

    @property
    def key_dim(self) -> int:
        return self.nk * self.dk


# ---- gates ----------------------------------------------------------------------------------
def deltanet_gates(be: Backend, a, b, dt_bias, A_log):
    """a, b [T, nv] (projection outputs) -> g = softplus(a + dt_bias) * -exp(A_log) [T, nv] fp32
    (the log-decay) and beta = sigmoid(b) [T, nv] in the model dtype, like transformers. One C++
    call on a CPU backend with `cpu_small_ops` (kernels/small_ops.py); this is its reference."""
    cpu = small_ops.for_backend(be, a)
    if cpu is not None and a.dim() == 2 and a.stride(-1) == 1 and b.stride(-1) == 1:
        return cpu.deltanet_gates(a, b, dt_bias, A_log)
    g = F.softplus(a.float() + dt_bias).mul_(A_log.float().exp().neg_())
    return g, torch.sigmoid(b)


# ---- prefill --------------------------------------------------------------------------------
def deltanet_prefill(be: Backend, qkv, g, beta, conv_w, dims: Dims, prefill, conv_cache,
                     rec_cache, o) -> None:  # fmt: skip
    if be.fla is not None:
        _prefill_fla(be.fla, qkv, g, beta, conv_w, dims, prefill, conv_cache, rec_cache, o)
    else:
        cpu = small_ops.for_backend(be, qkv)  # the conv in one C++ pass, or None
        chunk = chunk_kernel(be, qkv, dims)  # the chunked rule in one C++ call, or None
        _prefill_per_sequence(qkv, g, beta, conv_w, dims, prefill, conv_cache, rec_cache, o, cpu,
                              chunk)  # fmt: skip


def chunk_kernel(be: Backend, qkv, dims: Dims):
    """kernels/gated_delta_cpu.cpp's module where its `deltanet_chunk` takes this layer's
    prefill (CPU tensors of fp32 / bf16 / fp16, head dims multiples of 16), else None."""
    mod = be.cpu_kernels
    if (mod is None or not qkv.is_cpu
            or qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or dims.dk % 16 or dims.dv % 16):  # fmt: skip
        return None
    return mod


def chunk_native(mod, q, k, v, g, beta, S, out, states_at, avx2_only: bool = False):
    """chunk_gated_delta_rule(q, k, v, g, beta, S, use_qk_l2norm=True, out=out,
    states_at=states_at) of one sequence through the C++ kernel (its twin: same math, sums in
    another order): q, k [T, nk, dk], v, out [T, nv, dv], g, beta [T, nv], S [nv, dk, dv] or None,
    states_at [(t, dest [nv, dk, dv])]. Returns the final state [nv, dk, dv] fp32."""
    nv, dk, dv = v.shape[1], k.shape[2], v.shape[2]
    state = torch.zeros(nv, dk, dv) if S is None else S.to(torch.float32, copy=True).contiguous()
    ck = torch.empty(len(states_at), nv, dk, dv)
    mod.deltanet_chunk(q, k, v, g.float().contiguous(), beta.float().contiguous(), state, out,
                       [t for t, _ in states_at], ck, dk**-0.5, avx2_only)  # fmt: skip
    for (_, dest), s in zip(states_at, ck, strict=True):
        dest.copy_(s)
    return state


def _split_qkv(u, dims: Dims):
    kd = dims.key_dim
    q = u[..., :kd].unflatten(-1, (dims.nk, dims.dk))  # raw: the kernels l2-normalise
    k = u[..., kd : 2 * kd].unflatten(-1, (dims.nk, dims.dk))
    v = u[..., 2 * kd :].unflatten(-1, (dims.nv, dims.dv))
    return q, k, v


def _conv_prefill(xs, conv_w, sp, conv_cache, K, cpu=None):
    """One sequence's causal conv (from its slot's state or zeros) and its conv states. cpu:
    kernels/small_ops.py's module (`causal_conv1d_silu`: one pass where causal_conv1d, its
    reference, makes 2K - 1; 4x at 512 tokens of the 0.8B: bench/small_ops.py) or None."""
    state = conv_cache[sp.slot] if sp.has_initial_state else None  # [C, K-1]
    if cpu is not None and xs.stride(-1) == 1 and conv_cache.dtype == xs.dtype:
        u = cpu.causal_conv1d_silu(xs, conv_w, state)
    else:
        u = causal_conv1d(xs, conv_w, state)  # [n, C] after silu
    for n, dest in sp.checkpoints:
        conv_cache[dest] = conv_state_at(xs, state, n, K)
    conv_cache[sp.slot] = conv_state_at(xs, state, sp.num_tokens, K)
    return u


def _prefill_per_sequence(qkv, g, beta, conv_w, dims, prefill, conv_cache, rec_cache, o,
                          cpu=None, chunk=None):  # fmt: skip
    """Each prefill sequence in turn: its causal conv (cpu: small_ops' module, or None), then the
    chunked rule per segment between checkpoints off the chunk grid (chunk: chunk_kernel's
    module, through chunk_native; None: the PyTorch twin, chunk_gated_delta_rule)."""
    for sp in prefill:
        u = _conv_prefill(qkv[sp.rows], conv_w, sp, conv_cache, dims.kernel_size, cpu)
        q, k, v = _split_qkv(u, dims)
        gs, bs, os = g[sp.rows], beta[sp.rows], o[sp.rows]
        S = rec_cache[sp.slot][None] if sp.has_initial_state else None  # [1, nv, dk, dv]
        for a, b, inside in segments(sp.checkpoints, sp.num_tokens, CHUNK_SIZE):
            states_at = [(n - a, rec_cache[dest][None]) for n, dest in inside]
            if chunk is not None:
                S = chunk_native(chunk, q[a:b], k[a:b], v[a:b], gs[a:b], bs[a:b],
                                 None if S is None else S[0], os[a:b],
                                 [(t, d[0]) for t, d in states_at])[None]  # fmt: skip
            else:
                _, S = chunk_gated_delta_rule(
                    q[None, a:b], k[None, a:b], v[None, a:b], gs[None, a:b], bs[None, a:b], S,
                    use_qk_l2norm=True, out=os[None, a:b], states_at=states_at,
                )  # fmt: skip
            for n, dest in sp.checkpoints:
                if n == b:
                    rec_cache[dest] = S[0]
        rec_cache[sp.slot] = S[0]


def segments(checkpoints: list[tuple[int, int]], num_tokens: int, chunk: int):
    """Split a prefill of num_tokens at the checkpoint offsets that are not on the chunk grid of
    their segment; (a, b, checkpoints strictly inside on the grid) per segment. Checkpoints on the
    grid come out of the chunked kernel's hand-off between chunks, so the usual interval
    checkpoints (multiples of 64 from a 64-aligned start) cost no extra kernel call.
    chunk=0: split at every checkpoint (kernels that hand out final states only)."""
    out, a, inside = [], 0, []
    for n, dest in checkpoints:  # sorted by offset
        if n < num_tokens and chunk and (n - a) % chunk == 0:
            inside.append((n, dest))
        elif n < num_tokens:
            out.append((a, n, inside))
            a, inside = n, []
    out.append((a, num_tokens, inside))
    return out


def _conv_prefill_fla(conv, qkv, conv_w, prefill, slots, conv_cache, u) -> None:
    """Every prefill sequence's causal conv + SiLU in one varlen call of fla's causal_conv1d,
    into u's prefill rows; conv states of the checkpoints and of the slots updated.
    fla's states are [N, C, K] windows whose column 0 is never read: our [C, K-1] slot states
    go into columns 1..K-1 (zeros for fresh sequences), its final windows' columns 1.. are ours.
    Numerics: fla applies SiLU before rounding the fp32 conv (we round first): the same in fp32,
    within a bf16 ulp otherwise."""
    dev, K = qkv.device, conv_w.shape[1]
    rows = [r for sp in prefill for r in range(sp.row0, sp.row0 + sp.num_tokens)]
    idx = torch.tensor(rows, device=dev)
    cu = [0]
    for sp in prefill:
        cu.append(cu[-1] + sp.num_tokens)
    x = qkv.index_select(0, idx)  # [L, C] the prefill rows, packed
    init = x.new_zeros(len(prefill), x.shape[1], K)  # [P, C, K]
    init[:, :, 1:] = conv_cache.index_select(0, slots)
    fresh = [j for j, sp in enumerate(prefill) if not sp.has_initial_state]
    if fresh:
        init[torch.tensor(fresh, device=dev)] = 0
    for j, sp in enumerate(prefill):  # checkpoint states from the inputs (a few rows each)
        state = init[j, :, 1:]
        for n, dest in sp.checkpoints:
            conv_cache[dest] = conv_state_at(x[cu[j] : cu[j + 1]], state, n, K)
    y, final = conv(
        x[None], weight=conv_w, initial_state=init, output_final_state=True, activation="silu",
        cu_seqlens=torch.tensor(cu, device=dev), cu_seqlens_cpu=torch.tensor(cu),
    )  # fmt: skip
    u.index_copy_(0, idx, y[0].to(u.dtype))
    conv_cache.index_copy_(0, slots, final[:, :, 1:].to(conv_cache.dtype))


def _prefill_fla(fla, qkv, g, beta, conv_w, dims, prefill, conv_cache, rec_cache, o) -> None:
    """All prefill sequences per fla varlen call. Round r runs segment r of every sequence that
    has one (segments end at its checkpoints); states chain between rounds in `states`."""
    dev = qkv.device
    slots = torch.tensor([sp.slot for sp in prefill], device=dev)
    u = torch.empty_like(qkv)  # [T, C]; only prefill rows are written and read
    if getattr(fla, "conv", None) is not None:
        _conv_prefill_fla(fla.conv, qkv, conv_w, prefill, slots, conv_cache, u)
    else:
        for sp in prefill:
            u[sp.rows] = _conv_prefill(qkv[sp.rows], conv_w, sp, conv_cache, dims.kernel_size)
    states = rec_cache.index_select(0, slots).float()  # [P, nv, dk, dv]
    fresh = [j for j, sp in enumerate(prefill) if not sp.has_initial_state]
    if fresh:
        states[torch.tensor(fresh, device=dev)] = 0
    segs = [segments(sp.checkpoints, sp.num_tokens, 0) for sp in prefill]
    for r in range(max(len(s) for s in segs)):
        active = [j for j, s in enumerate(segs) if r < len(s)]
        rows, cu = [], [0]
        for j in active:
            a, b, _ = segs[j][r]
            rows.extend(range(prefill[j].row0 + a, prefill[j].row0 + b))
            cu.append(cu[-1] + b - a)
        idx = torch.tensor(rows, device=dev)
        pos = torch.tensor(active, device=dev)
        q, k, v = _split_qkv(u.index_select(0, idx)[None], dims)  # [1, L, heads, d]
        out, ht = fla.chunk(
            q, k, v, g=g.index_select(0, idx)[None], beta=beta.index_select(0, idx)[None],
            initial_state=states.index_select(0, pos), output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            cu_seqlens=torch.tensor(cu, device=dev), cu_seqlens_cpu=torch.tensor(cu),
        )  # fmt: skip
        o.index_copy_(0, idx, out[0].to(o.dtype))
        states.index_copy_(0, pos, ht.float())
        for jj, j in enumerate(active):
            for n, dest in prefill[j].checkpoints:
                if n == segs[j][r][1]:
                    rec_cache[dest] = ht[jj]
    rec_cache.index_copy_(0, slots, states.to(rec_cache.dtype))


# ---- decode ---------------------------------------------------------------------------------
def deltanet_decode(be: Backend, qkv, g, beta, conv_w, dims: Dims, d, conv_cache, rec_cache,
                    o) -> None:  # fmt: skip
    """d: DecodeBatch. Writes o's decode rows; conv and recurrent states move by one token
    (by one token per phase where d has phases: DecodeBatch.phases)."""
    if d.fresh_slots is not None:
        conv_cache.index_fill_(0, d.fresh_slots, 0)
        rec_cache.index_fill_(0, d.fresh_slots, 0)
    if d.phases is not None:
        over_phases(d, conv_cache, rec_cache, lambda p: deltanet_decode(
            be, qkv, g, beta, conv_w, dims, p, conv_cache, rec_cache, o))  # fmt: skip
        return
    if d.rows_by_slot is not None:  # built for CPU backends
        _decode_slot_runs(be, qkv, g, beta, conv_w, dims, d, conv_cache, rec_cache, o)
        return
    if not d.all_rows:
        qkv, g, beta = (t.index_select(0, d.rows) for t in (qkv, g, beta))
    if _triton_decode_ok(be, qkv, dims, rec_cache):
        from qwen35.kernels import triton_deltanet as tdn  # states updated in their slots

        u = tdn.conv_update_(qkv, conv_w, conv_cache, d.state_slots)  # [N, C]
        y = tdn.recurrent_step_(u, g, beta, rec_cache, d.state_slots, dims.nk,
                                out_dtype=o.dtype)  # [N, nv, dv]  # fmt: skip
        _write_rows(o, d, y)
        return
    cs = conv_cache.index_select(0, d.state_slots)  # [N, C, K-1]
    u = causal_conv1d_update_(qkv, conv_w, cs)  # [N, C]
    conv_cache.index_copy_(0, d.state_slots, cs)
    S = rec_cache.index_select(0, d.state_slots)  # [N, nv, dk, dv]
    if be.fla is not None:
        q, k, v = _split_qkv(u[:, None], dims)  # [N, 1, heads, d]
        # keywords: fla's 5th positional parameter is gk (per-key decay), not beta
        y, S = be.fla.fused_recurrent(
            q, k, v, g=g[:, None], beta=beta[:, None], initial_state=S.float(),
            output_final_state=True, use_qk_l2norm_in_kernel=True,
        )  # fmt: skip
        y = y[:, 0]
    else:
        y, S = _step_torch(u, g, beta, S, dims)
    rec_cache.index_copy_(0, d.state_slots, S.to(rec_cache.dtype))
    _write_rows(o, d, y)


def deltanet_decode_gated(be: Backend, qkv, z, a, b, conv_w, dt_bias, A_log, norm_w,
                          eps: float, dims: Dims, d, conv_cache, rec_cache):  # fmt: skip
    """A pure decode batch on a CPU with the compiled kernels: y [N, Vd] in the model dtype
    (out_proj's input), bitwise what deltanet_gates -> deltanet_decode -> the gated RMSNorm
    give, in one kernel call per run of slots. None where it does not apply (the caller takes
    that op-by-op path): no kernels, rows not in slot order, states other than fp32 / bf16.
    On the GPU path (Triton DeltaNet and norms): three launches, the gates computed in the
    recurrent kernel (`_decode_triton`)."""
    if _triton_decode_ok(be, qkv, dims, rec_cache) and be.triton_norms and d.all_rows:
        return _decode_triton(qkv, z, a, b, conv_w, dt_bias, A_log, norm_w, eps, dims, d,
                              conv_cache, rec_cache)  # fmt: skip
    if (
        be.cpu_kernels is None
        or d.rows_by_slot is None  # (phased batches have none: the op-by-op path)
        or not d.all_rows_in_slot_order
        or rec_cache.dtype not in STATE_DTYPES
        or qkv.dtype not in (torch.float32, torch.bfloat16)
    ):
        return None
    from qwen35 import kernels

    mod = kernels.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time
    if mod is None:
        return None
    if d.fresh_slots is not None:
        conv_cache.index_fill_(0, d.fresh_slots, 0)
        rec_cache.index_fill_(0, d.fresh_slots, 0)
    return gated_slot_runs(mod, qkv, z, a, b, conv_w, dt_bias, A_log, norm_w, eps, dims.nk,
                           d.slot_runs, conv_cache, rec_cache)  # fmt: skip


def copy_layer_states(conv_cache, rec_cache, pairs) -> None:
    """One layer's conv + recurrent state of slot src -> slot dst, for each (src, dst); pairs:
    a list, or a [2, m] tensor of (src slots, dst slots) (no host reads: CUDA graphs)."""
    if isinstance(pairs, torch.Tensor):
        for cache in (conv_cache, rec_cache):
            cache.index_copy_(0, pairs[1], cache.index_select(0, pairs[0]))
        return
    for src, dst in pairs:
        conv_cache[dst].copy_(conv_cache[src])
        rec_cache[dst].copy_(rec_cache[src])


def over_phases(d, conv_cache, rec_cache, step) -> list:
    """A phased decode batch (DecodeBatch.phases, speculative verify steps) through one
    DeltaNet layer: step(phase) for each phase in order, the layer's states copied
    (d.phase_copies[j], or the phase's `copies_after` tensor) after phase j, before the next
    drafts step them; the results in order."""
    out = []
    for k, p in enumerate(d.phases):
        out.append(step(p))
        if p.copies_after is not None:
            copy_layer_states(conv_cache, rec_cache, p.copies_after)
        elif k < len(d.phase_copies):
            copy_layer_states(conv_cache, rec_cache, d.phase_copies[k])
    return out


def _triton_decode_ok(be: Backend, qkv, dims: Dims, rec_cache) -> bool:
    return (
        be.triton_deltanet
        and be.on_gpu_path(qkv)
        and dims.dk & (dims.dk - 1) == 0
        and rec_cache.dtype in STATE_DTYPES
    )


def _decode_triton(qkv, z, a, b, conv_w, dt_bias, A_log, norm_w, eps, dims: Dims, d,
                   conv_cache, rec_cache):  # fmt: skip
    """A pure decode step on the GPU: conv (state in its slot), the recurrent step with its
    gates, the gated norm; y [N, Vd] in the model dtype."""
    from qwen35.kernels import triton_deltanet as tdn
    from qwen35.kernels import triton_norms

    if d.fresh_slots is not None:
        conv_cache.index_fill_(0, d.fresh_slots, 0)
        rec_cache.index_fill_(0, d.fresh_slots, 0)
    N = qkv.shape[0]  # every row decodes (d.all_rows): rows in token order

    def step(p):  # a phase's rows (row range): the drafts step the states the rows before left
        r = slice(*p.row_range) if p is not d else slice(None)
        u = tdn.conv_update_(qkv[r], conv_w, conv_cache, p.state_slots)  # [n, C]
        return tdn.recurrent_step_(u, a[r], b[r], rec_cache, p.state_slots, dims.nk,
                                   gates=(dt_bias, A_log), out_dtype=qkv.dtype)  # [n, nv, dv]

    if d.phases is not None:  # speculative verify rows (DecodeBatch.phases): phase by phase
        o = torch.cat(over_phases(d, conv_cache, rec_cache, step))
    else:
        o = step(d)
    y = triton_norms.gated_rms_norm(o, z.unflatten(-1, (dims.nv, dims.dv)), norm_w, eps)
    return y.view(N, dims.nv * dims.dv)


def gated_slot_runs(mod, qkv, z, a, b, conv_w, dt_bias, A_log, norm_w, eps, nk, slot_runs,
                    conv_cache, rec_cache):  # fmt: skip
    """The compiled `deltanet_decode_gated` (module `mod`) on each run of consecutive slots
    (DecodeBatch.slot_runs: row i0.., slot s0.., n rows), rows in slot order; [N, Vd]. Also the
    CPU decode plan's step (models/cpu_decode.py)."""
    if len(slot_runs) == 1 and slot_runs[0][0] == 0 and slot_runs[0][2] == qkv.shape[0]:
        _, s0, n = slot_runs[0]  # every row, one run: no row slices
        return mod.deltanet_decode_gated(qkv, z, a, b, conv_cache[s0 : s0 + n], conv_w, dt_bias,
                                         A_log, rec_cache[s0 : s0 + n], norm_w, eps, nk)  # fmt: skip
    ys = [
        mod.deltanet_decode_gated(
            qkv[i0 : i0 + n], z[i0 : i0 + n], a[i0 : i0 + n], b[i0 : i0 + n],
            conv_cache[s0 : s0 + n], conv_w, dt_bias, A_log, rec_cache[s0 : s0 + n], norm_w, eps,
            nk,
        )  # fmt: skip
        for i0, s0, n in slot_runs
    ]
    return torch.cat(ys)


def _write_rows(o, d, y) -> None:
    if d.all_rows:
        o.copy_(y)
    else:
        o.index_copy_(0, d.rows, y.to(o.dtype))


def _step_torch(u, g, beta, S, dims: Dims):
    """The PyTorch recurrent step on conv outputs u [N, C]: (o [N, nv, dv], new S) fp32."""
    kd = dims.key_dim
    q, k = l2norm_qk(u[:, : 2 * kd].unflatten(-1, (2, dims.nk, dims.dk)), dims.nv)
    v = u[:, 2 * kd :].unflatten(-1, (dims.nv, dims.dv))  # [N, nv, dv]
    S32 = S if S.dtype == torch.float32 else S.float()
    return gated_delta_step_(q, k, v, g.exp(), beta, S32), S32


def _decode_slot_runs(be, qkv, g, beta, conv_w, dims, d, conv_cache, rec_cache, o) -> None:
    """All single-token sequences at once, in slot order, their conv and recurrent states
    updated in place on each run of consecutive slots (no gather/scatter of the states).
    On a CPU the step is one compiled kernel call per run (kernels/gated_delta_cpu.cpp): at
    batch 1 this layer is dispatch-bound, and the PyTorch formulation takes ~40 small ops."""
    if not d.all_rows_in_slot_order:  # gather the decode rows into slot order
        qkv, g, beta = (t.index_select(0, d.rows_by_slot) for t in (qkv, g, beta))
    fused = None
    if be.cpu_kernels is not None and rec_cache.is_cpu and rec_cache.dtype in STATE_DTYPES:
        from qwen35 import kernels

        mod = kernels.load()  # None once QWEN35_NO_KERNELS=1 is set, at any time
        fused = mod.deltanet_decode if mod is not None else None
    pieces = []
    for i0, s0, n in d.slot_runs:
        r, cs, S = slice(i0, i0 + n), conv_cache[s0 : s0 + n], rec_cache[s0 : s0 + n]
        if fused is not None:
            pieces.append(fused(qkv[r], cs, conv_w, g[r], beta[r], S, dims.nk))
        else:
            u = causal_conv1d_update_(qkv[r], conv_w, cs)  # [n, C]
            y, S32 = _step_torch(u, g[r], beta[r], S, dims)
            if S32 is not S:
                S.copy_(S32)
            pieces.append(y)
    od = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # [N, nv, dv] fp32
    if d.all_rows_in_slot_order:
        o.copy_(od)
    else:
        o.index_copy_(0, d.rows_by_slot, od.to(o.dtype))
