"""The backend seam (ops/backend.py): every backend computes what the plain PyTorch reference
computes, selected per engine instead of monkeypatched. Backends whose kernels need a GPU are run
here with their GPU-side wiring on CPU tensors: fla-core's entry points are stood in for by our
naive reference with fla 0.6.0's documented signatures, so the varlen / state-slot / checkpoint
plumbing around them is checked without a GPU (the kernels themselves: tests/test_gpu.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from kernel_modules import cpu_kernels_or_skip
from qwen35.config import ModelConfig
from qwen35.engine.cuda_graphs import DecodeGraphs, graph_buckets
from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
from qwen35.kernels import fp8 as fp8_kernel
from qwen35.models.qwen3_5 import Qwen35ForCausalLM
from qwen35.ops.backend import Backend, reference_backend, select_backend
from qwen35.ops.conv import naive_causal_conv1d
from qwen35.ops.gated_delta import naive_gated_delta_rule
from qwen35.ops.moe import grouped_experts_gmm, grouped_experts_reference

pytestmark = pytest.mark.filterwarnings("ignore")
BS = 4  # block size


def fake_fla():
    """fla's chunk_gated_delta_rule / fused_recurrent_gated_delta_rule (by the naive rule) and
    causal_conv1d (by F.conv1d), with fla-core 0.6.0's full parameter lists (a positional
    argument in the wrong place fails)."""

    def chunk(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              allow_neg_eigval=False, state_v_first=False, cu_seqlens=None,
              cu_seqlens_cpu=None, **kwargs):  # fmt: skip
        assert q.shape[0] == 1 and cu_seqlens is not None and not state_v_first
        assert cu_seqlens_cpu.tolist() == cu_seqlens.tolist()
        assert initial_state.shape[0] == len(cu_seqlens) - 1
        cu = cu_seqlens_cpu.tolist()
        outs, finals = [], []
        for i in range(len(cu) - 1):
            a, b = cu[i], cu[i + 1]
            o, S = naive_gated_delta_rule(
                q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], initial_state[i : i + 1],
                use_qk_l2norm=use_qk_l2norm_in_kernel, scale=scale,
            )  # fmt: skip
            outs.append(o.to(v.dtype))
            finals.append(S)
        return torch.cat(outs, 1), torch.cat(finals) if output_final_state else None

    def fused_recurrent(q, k, v, g=None, gk=None, gv=None, beta=None, scale=None,
                        initial_state=None, output_final_state=False,
                        use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None,
                        dt_bias=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                        state_v_first=False, cu_seqlens=None, **kwargs):  # fmt: skip
        assert gk is None and gv is None and beta is not None and not use_gate_in_kernel
        assert q.shape[1] == 1 and initial_state.dtype == torch.float32
        o, S = naive_gated_delta_rule(
            q, k, v, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm_in_kernel, scale=scale
        )
        return o.to(v.dtype), S if output_final_state else None

    def conv(x, weight=None, bias=None, residual=None, initial_state=None,
             output_final_state=False, activation=None, backend="triton", cu_seqlens=None,
             cu_seqlens_cpu=None, chunk_indices=None, cp_context=None, **kwargs):  # fmt: skip
        """fla.modules.causal_conv1d: x [1, L, D], weight [D, W], states [N, D, W]."""
        assert x.shape[0] == 1 and bias is None and residual is None and activation == "silu"
        cu, W = cu_seqlens_cpu.tolist(), weight.shape[1]
        assert cu_seqlens.tolist() == cu and initial_state.shape == (len(cu) - 1, x.shape[2], W)
        outs, finals = [], []
        for i in range(len(cu) - 1):
            xs = x[0, cu[i] : cu[i + 1]]  # [n, D]
            outs.append(naive_causal_conv1d(xs, weight, initial_state[i, :, 1:]))
            finals.append(torch.cat([initial_state[i], xs.t()], dim=1)[:, -W:])
        return torch.cat(outs)[None], torch.stack(finals) if output_final_state else None

    return SimpleNamespace(chunk=chunk, fused_recurrent=fused_recurrent, conv=conv)


def _model(moe=False, device="cpu", dtype=torch.float32, quant=None, **overrides):
    hf = tiny.hf_model(moe=moe, **overrides)
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    m = Qwen35ForCausalLM(cfg, dtype=dtype, device=device)
    m.load_state_dict(hf.state_dict())  # packed after loading, on the final device
    if quant:  # weight-only quantization before packing, as the loader does (quant/apply.py)
        from qwen35.quant.apply import quantize_model_

        quantize_model_(m, quant)
    m.post_load()
    return m


class Seqs:
    """Sequences with fixed blocks (seq i owns blocks 20i..20i+19) and state slot i."""

    def __init__(self, model, backend, num_slots=8, cache_dtype=torch.float32):
        self.model, self.backend = model, backend
        self.caches = allocate_caches(model.config, 100, BS, num_slots, cache_dtype, "cpu")
        self.lens: dict[int, int] = {}

    def step(self, items, checkpoints=()):
        """items [(seq, token ids)] -> logits of every item's last token [B, V]."""
        pos, smap, cu, ctx, ids, last = [], [], [0], [], [], []
        for s, toks in items:
            start = self.lens.get(s, 0)
            pos += range(start, start + len(toks))
            smap += [(20 * s + p // BS) * BS + p % BS for p in range(start, start + len(toks))]
            ids += toks
            cu.append(cu[-1] + len(toks))
            ctx.append(start + len(toks))
            last.append(cu[-1] - 1)
        batch = ForwardBatch.build(
            positions=pos, cu_seqlens=cu, context_lens=ctx, slot_mapping=smap,
            block_tables=[list(range(20 * s, 20 * s + 20)) for s, _ in items],
            state_slots=[s for s, _ in items],
            has_initial_state=[self.lens.get(s, 0) > 0 for s, _ in items],
            logits_indices=last, state_checkpoints=checkpoints, backend=self.backend,
            device=self.model.device,
        )  # fmt: skip
        for s, toks in items:
            self.lens[s] = self.lens.get(s, 0) + len(toks)
        return self.model(torch.tensor(ids, device=self.model.device), batch, self.caches)


def _script(run: Seqs):
    """Prefill with checkpoints on and off the chunk grid, a mixed step (decode + a prefill
    continuing its prefix + a one-token prompt), decode steps with a state checkpoint."""
    g = torch.Generator().manual_seed(5)
    tok = lambda n: torch.randint(2, 256, (n,), generator=g).tolist()  # noqa: E731
    out = [run.step([(0, tok(70)), (1, tok(9))], checkpoints=[(0, 20, 6), (0, 64, 5)])]
    out.append(run.step([(0, tok(1)), (1, tok(5)), (2, tok(1))]))
    for t in range(3):
        out.append(run.step([(2, tok(1)), (0, tok(1)), (1, tok(1))], [(1, 1, 7)] if t else ()))
    return out


def assert_steps_equal_reference(model, backend, tol: float) -> None:
    """`_script` through `backend` and through the plain reference: logits and every cache
    close."""
    ref, got = Seqs(model, reference_backend("cpu")), Seqs(model, backend)
    for a, b in zip(_script(ref), _script(got), strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for name in ("key", "value", "conv", "recurrent"):
        for x, y in zip(getattr(ref.caches, name), getattr(got.caches, name), strict=True):
            torch.testing.assert_close(y, x, atol=tol, rtol=tol)


class HostSyncs(TorchDispatchMode):
    """Records the ops a decode step calls that cannot be captured in a CUDA graph: reads of a
    device value on the host (`.item()`, `.tolist()`, `bool(t)`, `torch.equal`), ops whose
    output size depends on values (`nonzero`, `bincount`, ...), and tensors made from Python
    data (`torch.tensor(list)`: a copy from pageable host memory on a GPU). On a CPU these run
    fine, which is why a CPU run must look for them."""

    BANNED = {
        "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
        "aten::allclose", "aten::nonzero", "aten::bincount", "aten::masked_select",
        "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim", "aten::lift_fresh",
        "aten::repeat_interleave",
    }  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.BANNED and not (
            name == "aten::repeat_interleave" and not isinstance(args[1], torch.Tensor)
        ):  # repeat_interleave by an int is static; by a tensor it syncs
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _watched(mode: HostSyncs, fn, *args):
    """fn(*args) under `mode`; `.tolist()` and `.numpy()`, which read the data without an aten
    op on a CPU, are recorded too."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def reads(name):
        def read(t, *a, **k):
            mode.seen.append(f"Tensor.{name}")
            return saved[name](t, *a, **k)

        return read

    for name in saved:
        setattr(torch.Tensor, name, reads(name))
    try:
        with mode:
            return fn(*args)
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def assert_padded_decode_equals_eager(model, backend, prompt_lens, steps: int, tol: float):
    """The static-buffer decode path (what a CUDA graph replays), run eagerly through `backend`:
    three sequences in a bucket of four; the padding row's KV and state land in the padding
    block and slot only, the real rows equal the plain eager step of the reference."""
    slots = 9  # 8 + a padding slot
    ref, got = Seqs(model, reference_backend("cpu"), slots), Seqs(model, backend, slots)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in prompt_lens]
    for run in (ref, got):
        run.step([(i, p) for i, p in enumerate(prompts)])
    pad_block, pad_slot = 99, slots - 1
    graphs = DecodeGraphs(model, got.caches, backend, 4, 20, pad_block, pad_slot)
    graphs.eager = True
    syncs = HostSyncs()  # watches the forward a graph would capture (not the buffer copies)
    graphs.model = lambda *a: _watched(syncs, model, *a)
    for _ in range(steps):
        toks = torch.randint(2, 256, (3,), generator=g).tolist()
        items = [(2, [toks[0]]), (0, [toks[1]]), (1, [toks[2]])]
        a = ref.step(items)
        # the same step through the static buffers
        lens = [got.lens[s] for s, _ in items]
        batch = ForwardBatch.build(
            positions=lens, cu_seqlens=[0, 1, 2, 3], context_lens=[n + 1 for n in lens],
            slot_mapping=[(20 * s + p // BS) * BS + p % BS
                          for (s, _), p in zip(items, lens, strict=True)],
            block_tables=[list(range(20 * s, 20 * s + 20)) for s, _ in items],
            state_slots=[s for s, _ in items], has_initial_state=[True] * 3,
            logits_indices=[0, 1, 2], backend=backend,
        )  # fmt: skip
        for s, _ in items:
            got.lens[s] += 1
        assert graphs.can_run(batch)
        out = graphs.run(torch.tensor(toks), batch)
        assert not syncs.seen, f"not capturable in a CUDA graph: {sorted(set(syncs.seen))}"
        torch.testing.assert_close(out, a, atol=tol, rtol=tol)
    real = [i for i in range(100) if i != pad_block]
    for x, y in zip(ref.caches.key, got.caches.key, strict=True):
        torch.testing.assert_close(y[real], x[real], atol=tol, rtol=tol)
    for x, y in zip(ref.caches.recurrent, got.caches.recurrent, strict=True):
        torch.testing.assert_close(y[:pad_slot], x[:pad_slot], atol=tol, rtol=tol)
        assert y[pad_slot].abs().sum() > 0  # the padding row did write, into its own slot


def _states(caches, slot: int) -> list[torch.Tensor]:
    return [c[slot].clone() for c in (*caches.conv, *caches.recurrent)]


def assert_verify_graph_equals_decode_steps(model, backend, tol: float) -> None:
    """A speculative verify step through the static buffers a CUDA graph replays
    (DecodeGraphs.run_phased, run eagerly through `backend`): sequence 0 with two drafts,
    sequence 1 with none, sequence 2 with one, in the bucket of 4 sequences x 3 rows (phase by
    phase, padding rows in the padding block and slot). Each row's logits equal the reference's
    one-token decode steps, the spare slots hold the states after each row but the last (one
    also into a prefix-cache checkpoint's slot), the slots the states after the last; then a
    plain decode step of three rows replays with the rows the verify step used padded again."""
    slots, pad_block, pad_slot = 16, 99, 15
    ref, got = Seqs(model, reference_backend("cpu"), slots), Seqs(model, backend, slots)
    g = torch.Generator().manual_seed(3)
    tok = lambda n: torch.randint(2, 256, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tok(n) for n in (7, 13, 5)]
    for run in (ref, got):
        run.step([(i, p) for i, p in enumerate(prompts)])
    t, d0, d2 = tok(3), tok(2), tok(1)
    lens = dict(got.lens)
    # the reference: one-token steps, states saved as the spares should hold them
    a = ref.step([(0, [t[0]]), (1, [t[1]]), (2, [t[2]])])
    spare = {8: _states(ref.caches, 0), 12: _states(ref.caches, 0), 10: _states(ref.caches, 2)}
    b = ref.step([(0, [d0[0]]), (2, [d2[0]])])
    spare[9] = _states(ref.caches, 0)
    c = ref.step([(0, [d0[1]])])
    want = torch.cat([a, b, c])  # rows: phase 0 (seqs 0, 1, 2), phase 1 (0, 2), phase 2 (0)
    rows = [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]  # (sequence, its row)
    ids = [t[0], t[1], t[2], d0[0], d2[0], d0[1]]
    pos = [lens[s] + j for s, j in rows]
    batch = ForwardBatch.build(
        positions=pos, cu_seqlens=range(7), context_lens=[p + 1 for p in pos],
        slot_mapping=[(20 * s + p // BS) * BS + p % BS for (s, _), p in zip(rows, pos, strict=True)],
        block_tables=[list(range(20 * s, 20 * s + 20)) for s, _ in rows],
        state_slots=[s for s, _ in rows], has_initial_state=[True] * 6,
        logits_indices=[0, 1, 2], backend=backend, phase_splits=[3, 5],
        phase_copies=[[(0, 8), (2, 10), (0, 12)], [(0, 9)]],
    )  # fmt: skip
    assert batch.decode.phases[0].copies_after is not None  # a GPU backend's phases
    graphs = DecodeGraphs(model, got.caches, backend, 4, 20, pad_block, pad_slot,
                          verify_rows=3, verify_seqs=4)  # fmt: skip
    assert graphs.keys == [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (1, 3), (2, 3), (4, 3)]
    graphs.eager = True
    syncs = HostSyncs()
    graphs.model = SimpleNamespace(
        final_norm=model.final_norm,
        forward_hidden=lambda *a: _watched(syncs, model.forward_hidden, *a),
    )
    seq_rows = [[0, 3, 5], [1], [2, 4]]
    assert graphs.can_run_phased(batch, seq_rows) and not graphs.can_run(batch)
    x = graphs.run_phased(torch.tensor(ids), batch, seq_rows)
    assert not syncs.seen, f"not capturable in a CUDA graph: {sorted(set(syncs.seen))}"
    assert graphs.state_slots[:12].tolist() == [0, 1, 2, 15, 0, 15, 2, 15, 0, 15, 15, 15]
    torch.testing.assert_close(model.head_logits(x), want, atol=tol, rtol=tol)
    for slot in (0, 1, 2):
        for u, v in zip(_states(got.caches, slot), _states(ref.caches, slot), strict=True):
            torch.testing.assert_close(u, v, atol=tol, rtol=tol)
    for slot, states in spare.items():
        for u, v in zip(_states(got.caches, slot), states, strict=True):
            torch.testing.assert_close(u, v, atol=tol, rtol=tol)
    real = [i for i in range(100) if i != pad_block]
    for u, v in zip(ref.caches.key, got.caches.key, strict=True):
        torch.testing.assert_close(v[real], u[real], atol=tol, rtol=tol)
    # a plain decode step after it: rows 3.. of the buffers are padding again
    lens = dict(ref.lens)
    t = tok(3)
    want = ref.step([(1, [t[0]]), (0, [t[1]]), (2, [t[2]])])
    items = [1, 0, 2]
    batch = ForwardBatch.build(
        positions=[lens[s] for s in items], cu_seqlens=range(4),
        context_lens=[lens[s] + 1 for s in items],
        slot_mapping=[(20 * s + lens[s] // BS) * BS + lens[s] % BS for s in items],
        block_tables=[list(range(20 * s, 20 * s + 20)) for s in items], state_slots=items,
        has_initial_state=[True] * 3, logits_indices=[0, 1, 2], backend=backend,
    )  # fmt: skip
    assert graphs.can_run(batch)
    x = graphs.run(torch.tensor(t), batch)
    assert (graphs.state_slots[3:] == pad_slot).all() and (graphs.ids[3:] == 0).all()
    torch.testing.assert_close(model.head_logits(x), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "backend",
    [
        Backend("cuda"),
        Backend("cuda", fla=fake_fla()),
        Backend("cuda", fla=SimpleNamespace(**{**vars(fake_fla()), "conv": None})),
        Backend("cuda", grouped_mm=True),  # a GPU backend's grouped experts, on CPU tensors
        Backend("cpu", grouped_mm=True),  # a CPU backend: the expert loop with the GEMV kernels
    ],
    ids=["gather", "fla-wiring", "fla-without-conv", "grouped-mm", "cpu-expert-loop"],
)
@pytest.mark.parametrize("moe", [False, True])
def test_backends_equal_reference(backend, moe):
    assert_steps_equal_reference(_model(moe), backend, tol=2e-5)


def _experts_case(g, dtype, T: int, crowded: bool = False):
    """(x, gate_up, down, top_idx, top_w) of 6 experts (H 32, I 16, top-3) for T tokens;
    crowded: every token's first choice is expert 2 (some experts then get no rows)."""
    E, H, I, k = 6, 32, 16, 3
    gu = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    dn = torch.randn(E, H, I, generator=g).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if crowded:
        idx[:, 0] = 2
    return x, gu, dn, idx, torch.rand(T, k, generator=g).to(dtype)


def test_grouped_mm_experts_equal_loop():
    if not select_backend("cpu", dtype=torch.bfloat16).grouped_mm:
        pytest.skip("torch._grouped_mm does not run on this CPU / torch")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, gu, dn, idx, w = _experts_case(g, dtype, T=13, crowded=True)
        ref = grouped_experts_reference(x, gu, dn, idx, w)
        torch.testing.assert_close(grouped_experts_gmm(x, gu, dn, idx, w), ref)


def test_cpu_experts_take_the_loop_with_the_gemv_matmuls(monkeypatch):
    """On a CPU backend with the kernels the routed experts run the per-expert loop through
    layers/linear.py's `linear` (the GEMV kernels for few rows: faster than the grouped GEMM on
    CPUs), with the reference's results; a GPU backend, or a CPU without the kernels, keeps the
    grouped GEMM. (Up to FEW_TOKENS tokens the loop batches its calls: the test below.)"""
    cpu_kernels_or_skip()
    import qwen35.layers.linear as linear_mod
    from qwen35.ops import moe

    monkeypatch.setattr(moe, "FEW_TOKENS", 0)
    calls, real = [], linear_mod.linear
    monkeypatch.setattr(linear_mod, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    gmm = []
    real_gmm = moe.grouped_experts_gmm
    monkeypatch.setattr(moe, "grouped_experts_gmm", lambda *a: gmm.append(1) or real_gmm(*a))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, gu, dn, idx, w = _experts_case(g, dtype, T=5)
        ref = grouped_experts_reference(x, gu, dn, idx, w)
        calls.clear()
        out = moe.routed_experts(Backend("cpu", grouped_mm=True), x, gu, dn, idx, w)
        assert len(calls) == 2 * len(set(idx.flatten().tolist())) and not gmm
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # summation order (values ~ 10)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        moe.routed_experts(Backend("cuda", grouped_mm=True), x, gu, dn, idx, w)
        assert gmm and len(calls) == 2 * len(set(idx.flatten().tolist()))
        gmm.clear()
    # without the kernels a CPU keeps the grouped GEMM for few rows (F.linear's one-row GEMM is slow)
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    calls.clear()
    moe.routed_experts(Backend("cpu", grouped_mm=True), x, gu, dn, idx, w)
    assert gmm and not calls


@pytest.mark.parametrize("quant", [None, "int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_token_moe_equals_the_expert_loop(quant, dtype, monkeypatch):
    """A CPU step's MoE of at most FEW_TOKENS tokens takes ops/moe.py `few_token_experts` (all
    active experts' products in one kernel call a projection where it takes their rows: int4 up
    to 16 an expert, the others 4; else one call each): bit for bit what the general per-expert
    loop gives those tokens at 1, 2, 4, 8 and 16 tokens (experts shared between tokens), plain
    experts (GEMV kernels / F.linear) and quantized ones (int8 / int4 / FP8; bf16, int8, int4
    and bf16-model FP8 experts through layers/linear.py `linear_many`, quant/matmul.py
    `int8_linear_many` / `int4_linear_many` / `fp8_linear_many`), and it is the path that runs
    (counted; 20 tokens take the loop). bf16 also keeps batched == alone bit for bit up to 8
    tokens, as the loop does: beyond layers/linear.py GEMV_MAX_ROWS (8 bf16 rows) the router
    and the shared expert take a GEMM, whose rows differ from the GEMV's in the last bit (fp32's
    GEMV rows differ too). (With the CPU kernels a block's routing and weighted sum run in C++
    instead, SparseMoE.cpu_step / cpu_routed, tests/test_moe_cpu.py: both off here; this path
    runs with an adapter on the router, and its experts' calls without the kernels.)"""
    cpu_kernels_or_skip()
    import qwen35.layers.moe as layer_moe
    from qwen35.layers.moe import SparseMoE
    from qwen35.ops import moe as ops_moe

    monkeypatch.setattr(SparseMoE, "cpu_step", lambda self: None)
    monkeypatch.setattr(SparseMoE, "cpu_routed", lambda self, x: None)

    model = _model(moe=True, dtype=dtype, quant=quant)
    be = select_backend("cpu", dtype=dtype)
    from qwen35.quant import matmul

    runs, real = [], ops_moe.few_token_experts
    counted = lambda *a: runs.append(len(a[0])) or real(*a)  # noqa: E731
    monkeypatch.setattr(ops_moe, "few_token_experts", counted)
    monkeypatch.setattr(layer_moe, "few_token_experts", counted)
    import qwen35.layers.linear as linear_mod

    many = []  # the products in one kernel call: which ran, whether it took the kernel, most rows

    def spy(mod, name):
        real_fn = getattr(mod, name)

        def counted_many(*a):
            r = real_fn(*a)
            many.append((name, r is not None, max(len(v) for v in a[0])))
            return r

        monkeypatch.setattr(mod, name, counted_many)

    spy(matmul, "int4_linear_many"), spy(matmul, "int8_linear_many"), spy(linear_mod, "linear_many")
    spy(matmul, "fp8_linear_many")
    g = torch.Generator().manual_seed(3)
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    H = model.config.hidden_size
    shared = checked_alone = 0  # steps where two tokens picked one expert; rows compared
    with torch.inference_mode():
        for block in blocks:
            x = torch.randn(20, H, generator=g).to(dtype)
            runs.clear()
            sizes = (1, 2, 4, 8, 16)
            fast = {n: block(x[:n], be) for n in sizes}
            alone = [block(x[t : t + 1], be) for t in range(16)]
            assert runs == [*sizes] + [1] * 16
            _, top_idx = block.route(x[:4])
            shared += len(top_idx.unique()) < top_idx.numel()
            few = ops_moe.FEW_TOKENS
            monkeypatch.setattr(ops_moe, "FEW_TOKENS", 0)
            loop = {n: block(x[:n], be) for n in sizes}
            monkeypatch.setattr(ops_moe, "FEW_TOKENS", few)
            block(x, be)  # 20 tokens, more than FEW_TOKENS: the loop (not counted)
            assert runs == [*sizes] + [1] * 16
            for n in sizes:
                assert torch.equal(fast[n], loop[n]), n
            if dtype == torch.bfloat16:
                for n in (2, 4, 8):  # (up to GEMV_MAX_ROWS: see above)
                    for t in range(n):
                        assert torch.equal(alone[t], fast[n][t : t + 1]), (n, t)
                        checked_alone += 1
    assert shared  # the grouping of several rows an expert was exercised
    assert checked_alone or dtype != torch.bfloat16
    probe = torch.zeros(1, model.config.hidden_size, dtype=dtype)
    from qwen35.quant.layers import Int4Linear

    i4 = next((m for m in model.modules() if isinstance(m, Int4Linear)), None)
    x8 = i4 is not None and matmul.int4_x8(i4.x8, i4.group)  # (the layers' own activations)
    takes = {  # where one call each takes our kernel, the few-token path takes its many-form
        "int4_linear_many": matmul.int4_kernel_for(probe, probe, x8) is not None,
        "int8_linear_many": True,
        "linear_many": dtype == torch.bfloat16,
        # gemv_cpu.cpp's AVX512 paths (bf16 rows), else fp8_cpu.cpp's (any CPU it builds on)
        "fp8_linear_many": (dtype == torch.bfloat16 and _fp8_gemv()) or fp8_kernel.load() is not None,
    }
    kinds = {  # (int4 mode keeps int8 for matrices its layout does not take)
        "int4": {"int4_linear_many", "int8_linear_many"}, "int8": {"int8_linear_many"},
        None: {"linear_many"}, "fp8": {"fp8_linear_many"},
    }[quant]  # fmt: skip
    assert {name for name, _, _ in many} <= kinds and (many or not kinds), set(many)
    most = {"int4_linear_many": 16}  # rows a product each many-kernel takes (the others: 4)
    assert all(took == (takes[name] and rows <= most.get(name, 4)) for name, took, rows in many), (takes, many)


def _fp8_gemv() -> bool:
    """The CPU's FP8 GEMV kernel runs here (either of its paths)."""
    from qwen35.kernels import gemv

    mod = gemv.load()
    return mod is not None and (mod.fp8_supported(128) or mod.fp8_cvt_supported())


def test_select_backend():
    ref = reference_backend("cpu")
    assert ref.cpu_kernels is None and ref.fla is None and not ref.can_capture
    assert select_backend("cpu") is select_backend("cpu")  # chosen once
    assert not select_backend("cpu").can_capture
    assert Backend("cuda", triton_attention=True).can_capture
    assert Backend("cuda", fla=1, triton_attention=True).name == "cuda+fla+triton-attention"
    sdpa = Backend("cuda", triton_attention=True, chunk_attention="sdpa")  # engine/preflight.py
    assert sdpa.name == "cuda+triton-attention+sdpa-chunks"


def test_graph_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize("moe", [False, True])
def test_decode_graph_buffers_pad_rows_that_write_nowhere(moe):
    """Also: the step holds no op a CUDA graph cannot capture (HostSyncs)."""
    be = Backend("cuda", grouped_mm=moe)  # an MoE model is captured only with grouped mm
    assert_padded_decode_equals_eager(_model(moe), be, (7, 12, 5), steps=3, tol=2e-5)


@pytest.mark.parametrize(
    "backend",
    [Backend("cuda"), Backend("cuda", fla=fake_fla()), Backend("cuda", grouped_mm=True)],
    ids=["gather", "fla-recurrent", "grouped-mm"],
)
def test_verify_step_graph_buffers_equal_decode_steps(backend):
    """Speculative verify steps on a GPU backend (phases by row range, state copies by index
    tensors) replay from the decode graphs' static buffers: equal to one-token steps."""
    assert_verify_graph_equals_decode_steps(_model(backend.grouped_mm), backend, tol=2e-5)


def test_host_syncs_are_caught():
    """The expert loop (no grouped mm) reads the expert counts on the host: not capturable,
    which model_runner knows (no graphs for an MoE model without grouped mm)."""
    with pytest.raises(AssertionError, match="not capturable.*Tensor.tolist"):
        assert_padded_decode_equals_eager(_model(True), Backend("cuda"), (7, 12, 5), 1, 2e-5)


def test_enforce_eager_option_and_cpu_engine_has_no_graphs(tmp_path):
    import argparse

    from qwen35.engine.config import EngineConfig
    from qwen35.engine.llm_engine import LLMEngine

    assert EngineConfig.create(enforce_eager=True).device.enforce_eager is True
    p = argparse.ArgumentParser()
    EngineConfig.add_cli_arguments(p)
    args = p.parse_args(["--model", "m", "--enforce-eager"])
    assert EngineConfig.from_cli(args).device.enforce_eager is True
    tiny.save_checkpoint(tmp_path / "m", moe=False, layout="vlm")
    eng = LLMEngine(str(tmp_path / "m"), dtype="fp32", verbose=False)
    assert eng.runner.graphs is None and eng.runner.backend is select_backend(
        "cpu", dtype=torch.float32
    )


def test_cpu_kernels_equal_reference_with_fused_decode_layers(monkeypatch):
    """The CPU backend with its C++ kernels equals the plain reference through `_script` and
    then decode steps with rows in slot order, where each DeltaNet and attention layer runs as
    one fused call (ops/deltanet.py deltanet_decode_gated, ops/attention.py
    attention_decode_gated): logits and every cache."""
    import qwen35.layers.deltanet as dn_layer
    import qwen35.layers.full_attention as attn_layer
    from qwen35.models import cpu_decode

    # the modules' path (the decode plan, which calls the kernels itself: test_cpu_decode.py)
    monkeypatch.setattr(cpu_decode.DecodePlan, "applies", staticmethod(lambda batch: False))
    be = select_backend("cpu")
    if be.cpu_kernels is None or be.cpu_attention is None or be.cpu_small_ops is None:
        pytest.skip("the CPU kernels are not available here (no compiler, or switched off)")
    fused = []
    for mod, name in ((dn_layer, "deltanet_decode_gated"), (attn_layer, "attention_decode_gated")):
        real = getattr(mod, name)

        def spy(*args, _real=real, _name=name):
            out = _real(*args)
            fused.append((_name, out is not None))
            return out

        monkeypatch.setattr(mod, name, spy)
    model = _model()
    ref, got = Seqs(model, reference_backend("cpu")), Seqs(model, be)
    outs = [(a, b) for a, b in zip(_script(ref), _script(got), strict=True)]
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        items = [(s, torch.randint(2, 256, (1,), generator=g).tolist()) for s in (0, 1, 2)]
        a = ref.step(items)
        fused.clear()
        outs.append((a, got.step(items)))
        assert sorted(set(fused)) == [("attention_decode_gated", True),
                                      ("deltanet_decode_gated", True)]  # fmt: skip
    for a, b in outs:
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5)
    for name in ("key", "value", "conv", "recurrent"):
        for x, y in zip(getattr(ref.caches, name), getattr(got.caches, name), strict=True):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5)


def test_no_decode_graphs_for_quantized_experts(caplog):
    """Quantized experts run the expert loop (host-read counts): no capture is attempted, even
    where the backend could capture the rest (a failed capture is not a clean fallback)."""
    from qwen35.engine.model_runner import GraphSpec, ModelRunner
    from qwen35.quant.layers import Fp8Experts

    model = _model(True)
    mlp = model.model.layers[0].mlp
    mlp.experts = Fp8Experts.quantize(mlp.experts)
    caches = allocate_caches(model.config, 8, BS, 3, torch.float32, "cpu")
    be = Backend("cuda", triton_attention=True, grouped_mm=True)
    assert be.can_capture
    with caplog.at_level("WARNING", logger="qwen35"):
        runner = ModelRunner(model, caches, (1,), "cpu", backend=be, decode_graphs=GraphSpec(2, 64))
    assert runner.graphs is None and "MoE experts sync the host" in caplog.text


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_graphs_with_the_triton_moe(monkeypatch, fp8):
    """A backend with the Triton MoE (kernels/triton_moe.py) captures MoE models whose experts
    it reads (plain, or FP8 with 128 x 128 blocks) even without the grouped GEMM, for the decode
    batches it takes (<= FUSED_MAX_TOKENS rows); larger batches replay nothing (eager), unless
    (FP8) Triton's grouped GEMM over the sorted pairs takes them: every batch then."""
    from qwen35.engine.cuda_graphs import DecodeGraphs
    from qwen35.engine.model_runner import GraphSpec, ModelRunner
    from qwen35.ops.moe import FUSED_MAX_TOKENS
    from qwen35.quant.layers import Fp8Experts

    model = _model(True)
    if fp8:
        for layer in model.model.layers:
            layer.mlp.experts = Fp8Experts.quantize(layer.mlp.experts)
    caches = allocate_caches(model.config, 8, BS, 40, torch.float32, "cpu")
    captured = []
    monkeypatch.setattr(DecodeGraphs, "capture", lambda self: captured.append(self.max_batch))
    be = Backend("cuda", triton_attention=True, triton_moe=True)
    runner = ModelRunner(model, caches, (1,), "cpu", backend=be, decode_graphs=GraphSpec(32, 64))
    assert runner.graphs is not None and captured == [FUSED_MAX_TOKENS]
    assert runner.graphs.buckets[-1] == FUSED_MAX_TOKENS
    if fp8:  # with Triton's grouped FP8 GEMM for longer steps (no host sync): every batch
        from qwen35.quant import fp8_gpu

        monkeypatch.setattr(fp8_gpu, "_grouped_kernel", lambda: object())
        ModelRunner(model, caches, (1,), "cpu", backend=be, decode_graphs=GraphSpec(32, 64))
        assert captured[-1] == 32


def test_step_index_tensors_reach_the_device_in_one_copy_per_dtype(monkeypatch):
    """ForwardBatch.build on a GPU sends its index tensors (token ids, positions, slots, logits
    rows, the block table, the decode rows, context lengths, state slots, fresh slots) as one int64 and one
    int32 buffer, each field a view: the same values as built one by one. (On a CPU, where
    nothing is copied, the packing is forced here to check it.)"""
    from qwen35.engine import forward_batch as fb

    args = dict(
        positions=[7, 3, 0, 1, 2, 5], cu_seqlens=[0, 1, 2, 5, 6], context_lens=[8, 4, 3, 6],
        slot_mapping=[23, 35, 40, 41, 42, 69], block_tables=[[1, 2], [4], [5], [8, 9, 10]],
        state_slots=[3, 0, 2, 1], has_initial_state=[True, True, False, False],
        logits_indices=[0, 1, 4, 5], device="cpu", input_ids=[11, 12, 13, 14, 15, 16],
    )  # fmt: skip
    want = ForwardBatch.build(**args)
    packed = []

    def add(self, host):  # the GPU branch of _Upload.add, on CPU tensors
        self.host.append(host)
        packed.append(host.dtype)
        return fb._Pending(len(self.host) - 1)

    monkeypatch.setattr(fb._Upload, "add", add)
    got = ForwardBatch.build(**args)
    assert packed.count(torch.int32) >= 2 and packed.count(torch.long) >= 6
    d, w = got.decode, want.decode
    assert not d.all_rows and d.fresh_slots is not None  # decode rows 0, 1, 5; slot 1 fresh
    for a, b in [(got.input_ids, want.input_ids), (got.positions, want.positions),
                 (got.slot_mapping, want.slot_mapping),
                 (got.logits_indices, want.logits_indices), (got.block_tables, want.block_tables),
                 (d.rows, w.rows), (d.block_tables, w.block_tables),
                 (d.context_lens, w.context_lens), (d.state_slots, w.state_slots),
                 (d.fresh_slots, w.fresh_slots), (d.rows_by_slot, w.rows_by_slot)]:  # fmt: skip
        assert a.dtype == b.dtype and torch.equal(a, b)
    bases = {t.untyped_storage().data_ptr() for t in (got.input_ids, got.positions,
             got.slot_mapping, got.logits_indices, d.rows, d.state_slots, d.fresh_slots)}  # fmt: skip
    assert len(bases) == 1  # one int64 buffer
    assert d.context_lens.untyped_storage().data_ptr() == got.block_tables.untyped_storage().data_ptr()


def test_decode_graph_padding_rows_rewritten_only_when_the_batch_shrinks(monkeypatch):
    """DecodeGraphs.run pads rows n.. again only when a larger step left its data there (a
    steady batch pays no fills); whatever the sequence of step sizes, every row past the step's
    is padding when the graph runs."""
    model = _model()
    caches = allocate_caches(model.config, 100, BS, 9, torch.float32, "cpu")
    be = reference_backend("cpu")
    graphs = DecodeGraphs(model, caches, be, 8, 20, pad_block=99, pad_slot=8)
    graphs.eager = True
    monkeypatch.setattr(graphs, "model", lambda ids, batch, c: torch.zeros(ids.shape[0], 4))
    fills = []
    pad = graphs._pad
    monkeypatch.setattr(graphs, "_pad", lambda n, end=None: fills.append((n, end)) or pad(n, end))
    for n in (3, 3, 1, 5, 5, 2, 8, 1):
        batch = ForwardBatch.build(
            positions=[7] * n, cu_seqlens=list(range(n + 1)), context_lens=[8] * n,
            slot_mapping=[40 + i for i in range(n)], block_tables=[[i, i + 1] for i in range(n)],
            state_slots=list(range(n)), has_initial_state=[True] * n,
            logits_indices=list(range(n)), backend=be,
        )  # fmt: skip
        graphs.run(torch.arange(1, n + 1), batch)
        assert (graphs.ids[n:] == 0).all() and (graphs.positions[n:] == 0).all()
        assert (graphs.slot_mapping[n:] == 99 * BS).all() and (graphs.context_lens[n:] == 1).all()
        assert (graphs.state_slots[n:] == 8).all() and (graphs.block_tables[n:] == 99).all()
        assert (graphs.ids[:n] == torch.arange(1, n + 1)).all()
    # fills only after a shrink: 3 -> 1, 5 -> 2, 8 -> 1
    assert fills == [(1, 3), (2, 5), (1, 8)]
