"""The GPU backend end to end on a CPU: the whole model and the engine with the cuda backend's
kernels (fla-core's chunked prefill and recurrent step, our Triton DeltaNet decode, paged decode
and prefix-continuing prefill attention, RMSNorms, grouped-mm MoE) over CPU tensors, every Triton
kernel run by Triton's interpreter (ops/backend.py `interpreter_backend`). fp32 against the plain
PyTorch reference: greedy tokens equal, logits and caches close. Slow; needs Triton and
TRITON_INTERPRET=1 (tests/triton_interp.py says how). What this cannot see: compiled code
generation, bf16 dots (the interpreter's are wrong, ours upcast under it), TF32, races, speed
and CUDA-graph capture itself; those need `pytest -m gpu` on a GPU (bench/gpu_check.sh)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from triton_interp import patch_fla_for_interpreter, skip_unless_interpretable

skip_unless_interpretable()

from qwen35.ops.backend import interpreter_backend  # noqa: E402
from qwen35.request import SamplingParams  # noqa: E402
from test_backend import (  # noqa: E402
    BS,
    _model,
    assert_padded_decode_equals_eager,
    assert_steps_equal_reference,
)
from test_engine import ids, make, prompts  # noqa: E402
from tiny import save_checkpoint  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
HAS_FLA = patch_fla_for_interpreter()


@pytest.fixture
def calls(monkeypatch):
    """Counts the GPU kernels' entry points as they run, so that a test fails if a dispatch
    silently took the PyTorch path instead. Wraps fla's through `counted(backend)`."""
    from qwen35.kernels import (
        triton_attention,
        triton_deltanet,
        triton_moe,
        triton_norms,
        triton_pointwise,
    )
    from qwen35.ops import moe

    n = Counter()

    def wrap(mod, name):
        fn = getattr(mod, name)

        def counted_fn(*a, **k):
            n[name] += 1
            return fn(*a, **k)

        monkeypatch.setattr(mod, name, counted_fn)
        return counted_fn

    for mod, names in (
        (triton_attention, ("paged_decode_attention", "paged_prefill_attention")),
        (triton_deltanet, ("conv_update_", "recurrent_step_")),
        (triton_norms, ("rms_norm_zc", "gated_rms_norm", "add_rms_norm_zc_")),
        (triton_pointwise, ("rotary_qk_", "silu_mul")),
        (moe, ("grouped_experts_gmm",)),
        (triton_moe, ("sparse_moe",)),
    ):
        for name in names:
            wrap(mod, name)

    def counted(be):
        if be.fla is None:
            return be
        fla = SimpleNamespace(**vars(be.fla))
        wrap(fla, "chunk"), wrap(fla, "fused_recurrent"), wrap(fla, "conv")
        return dataclasses.replace(be, fla=fla)

    return SimpleNamespace(n=n, counted=counted)


def _backend(**overrides):
    be = interpreter_backend(torch.float32, **overrides)
    assert be.triton_attention and be.triton_norms and be.triton_deltanet
    return be


def _full():
    be = _backend()
    if be.fla is None:
        pytest.skip("fla-core is not installed: its prefill is not covered")
    return be


BACKENDS = {
    # fla chunked prefill, our Triton decode (conv + recurrent step in the slots)
    "full": lambda: _full(),
    # fla's fused_recurrent for decode (the gather/scatter fallback)
    "fla-recurrent": lambda: dataclasses.replace(_full(), triton_deltanet=False),
    # our kernels alone, PyTorch DeltaNet prefill (what runs where fla is missing)
    "no-fla": lambda: _backend(fla=None),
}


@pytest.mark.parametrize(
    "name,moe", [("full", False), ("full", True), ("fla-recurrent", False), ("no-fla", False)]
)
def test_model_steps_equal_reference(name, moe, calls):
    """test_backend's script: prefill with checkpoints on and off the chunk grid, a mixed step
    (decodes + a prefill continuing its cached prefix + a one-token prompt), decode steps with a
    state checkpoint. Logits and every cache close to the reference."""
    be = calls.counted(BACKENDS[name]())
    if moe:
        assert be.grouped_mm, "torch._grouped_mm does not run fp32 on this CPU"
    assert_steps_equal_reference(_model(moe), be, tol=1e-4)
    n = calls.n
    assert n["paged_decode_attention"] and n["paged_prefill_attention"], n
    assert n["rms_norm_zc"] and n["gated_rms_norm"] and n["add_rms_norm_zc_"], n
    assert n["rotary_qk_"] and n["silu_mul"], n
    assert (n["chunk"] > 0) == (n["conv"] > 0) == (be.fla is not None), n
    assert (n["conv_update_"] > 0) == be.triton_deltanet, n
    assert (n["fused_recurrent"] > 0) == (be.fla is not None and not be.triton_deltanet), n
    # prefill chunks (79 tokens) take the grouped GEMM, the decode and mixed steps the Triton MoE
    assert (n["grouped_experts_gmm"] > 0) == moe, n
    assert (n["sparse_moe"] > 0) == moe, n


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for which in ("dense", "moe"):
        d = tmp_path_factory.mktemp("interp") / which
        save_checkpoint(d, moe=which == "moe", layout="vlm")
        out[which] = d
    return out


def _interpreted(d, backend, **kw):
    llm = make(d, **kw)
    llm.engine.runner.backend = backend  # chosen once per engine: before the first step
    return llm


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_engine_greedy_equals_reference(which, ckpts, calls):
    """Mixed prompt lengths, chunked prefill (32-token budget), prefix caching (a shared
    prefix; the second pass resumes from cached KV + state checkpoints): the interpreted GPU
    backend gives the reference engine's greedy tokens, batched and alone."""
    d = ckpts[which]
    shared = prompts(1, seed=21, lo=32, hi=33)[0]
    ps = [shared + p for p in prompts(2, seed=22, lo=2, hi=20)] + prompts(1, seed=23, lo=3, hi=9)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32)
    want = ids(make(d, **kw).generate(ps, sp))  # the CPU engine (compiled CPU kernel or not)
    llm = _interpreted(d, calls.counted(_full()), **kw)
    assert ids(llm.generate(ps, sp)) == want
    again = ids(llm.generate(ps[:2], sp))  # cached prefixes now
    assert llm.engine.get_stats()["prefix_cache_hit_tokens"] > 0
    assert again == want[:2]
    assert ids(llm.generate([ps[2]], sp)) == want[2:]
    n = calls.n
    assert n["chunk"] and n["conv_update_"] and n["paged_decode_attention"], n
    assert n["paged_prefill_attention"] and n["rms_norm_zc"], n  # chunked prefill continues
    assert (n["sparse_moe"] > 0) == (which == "moe"), n  # the decode steps' MoE blocks


def test_engine_on_fp8_caches_equals_reference(ckpts, calls):
    """--kv-cache-dtype fp8 through the GPU backend's kernels (Triton paged decode and prefill
    attention widening e4m3 tiles, the fused q/k-norm + rotary + cache-write kernel left for
    write_kv's byte copy): the reference engine's greedy tokens on fp8 caches, chunked prefill
    and a prefix-cache hit included."""
    d = ckpts["dense"]
    shared = prompts(1, seed=41, lo=36, hi=37)[0]
    ps = [shared + p for p in prompts(2, seed=42, lo=2, hi=20)]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32, kv_cache_dtype="fp8")
    want = ids(make(d, **kw).generate(ps, sp))
    llm = _interpreted(d, calls.counted(_full()), **kw)
    assert llm.engine.runner.caches.key[0].dtype == torch.float8_e4m3fn
    assert ids(llm.generate(ps, sp)) == want
    assert ids(llm.generate(ps, sp)) == want  # from the cached prefixes
    assert llm.engine.get_stats()["prefix_cache_hit_tokens"] > 0
    n = calls.n
    assert n["paged_decode_attention"] and n["paged_prefill_attention"], n


def test_engine_on_bf16_states_equals_reference(ckpts, calls):
    """--mamba-ssm-cache-dtype bf16 through the GPU backend's kernels (fla's chunked prefill from
    and to bf16 slots, our Triton recurrent step widening and rounding each tile): the reference
    engine's greedy tokens on bf16 states, chunked prefill included."""
    d = ckpts["dense"]
    ps = prompts(3, seed=43, lo=3, hi=40)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32, mamba_ssm_cache_dtype="bf16",
              enable_prefix_caching=False)  # fmt: skip
    want = ids(make(d, **kw).generate(ps, sp))
    llm = _interpreted(d, calls.counted(_full()), **kw)
    assert llm.engine.runner.caches.recurrent[0].dtype == torch.bfloat16
    assert ids(llm.generate(ps, sp)) == want
    n = calls.n
    assert n["chunk"] and n["conv_update_"], n  # fla's prefill, our recurrent decode step


def test_engine_with_sdpa_chunks_equals_reference(ckpts, calls):
    """The GPU backend with prefill chunks after a cached prefix on the SDPA path (what
    engine/preflight.py picks where it times faster): chunked prompts and prefix-cache hits give
    the reference engine's greedy tokens, and no chunk takes the paged prefill kernel."""
    d = ckpts["dense"]
    shared = prompts(1, seed=31, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(2, seed=32, lo=2, hi=20)]
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32)
    want = ids(make(d, **kw).generate(ps, sp))
    llm = _interpreted(d, calls.counted(dataclasses.replace(_full(), chunk_attention="sdpa")), **kw)
    assert ids(llm.generate(ps, sp)) == want
    assert ids(llm.generate(ps, sp)) == want  # from the cached prefixes
    assert llm.engine.get_stats()["prefix_cache_hit_tokens"] > 0
    n = calls.n
    assert n["chunk"] and n["paged_decode_attention"] and not n["paged_prefill_attention"], n


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_engine_multi_step_on_the_gpu_backend(which, ckpts, calls, monkeypatch):
    """num_scheduler_steps=3 through the GPU backend's kernels (each round's later steps fed the
    tokens the step before sampled, as tensors): the CPU engine's single-step greedy tokens."""
    from qwen35.engine.model_runner import ModelRunner

    d = ckpts[which]
    ps = prompts(2, seed=24, lo=3, hi=20)
    sp = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32)
    want = ids(make(d, **kw).generate(ps, sp))
    rounds = []
    orig = ModelRunner._multi_step
    monkeypatch.setattr(ModelRunner, "_multi_step",
                        lambda self, sc, k: rounds.append(k) or orig(self, sc, k))  # fmt: skip
    llm = _interpreted(d, calls.counted(_full()), num_scheduler_steps=3, **kw)
    assert ids(llm.generate(ps, sp)) == want
    assert rounds and max(rounds) == 3
    assert calls.n["paged_decode_attention"] and calls.n["conv_update_"], calls.n


def test_engine_fp8_moe_equals_cpu_engine(tmp_path, calls, monkeypatch):
    """An official-layout FP8 MoE checkpoint (experts per expert, e4m3 with 128 x 128 blocks):
    the interpreted GPU backend's decode steps take the Triton MoE, which reads the experts as
    stored, its prefill steps (> 16 tokens) the grouped GEMM over the pairs sorted by expert
    (quant/fp8_gpu.py fp8_experts_sorted), and give the CPU engine's greedy tokens (its FP8
    expert loop).
    An fp32 model on a CPU keeps an FP8 checkpoint's BF16 tensors (router, shared expert gate)
    in bf16 (loader._unquantized_in_bf16), which the Triton MoE does not read under fp32 rows;
    a GPU never narrows them, so neither does this CPU-hosted stand-in for one (both engines:
    the values are the checkpoint's either way)."""
    from tiny import save_fp8_checkpoint

    monkeypatch.setattr("qwen35.loader._unquantized_in_bf16", lambda *a, **k: False)

    save_fp8_checkpoint(tmp_path / "fp8", tmp_path / "bf16", moe=True, experts="per_expert")
    ps = prompts(3, seed=31, lo=3, hi=30)
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS)
    want = ids(make(tmp_path / "fp8", **kw).generate(ps, sp))
    llm = _interpreted(tmp_path / "fp8", calls.counted(_full()), **kw)
    sorted_steps = _count_sorted_fp8(monkeypatch)
    assert ids(llm.generate(ps, sp)) == want
    assert calls.n["sparse_moe"] > 0 and sorted_steps, (calls.n, sorted_steps)


def _count_sorted_fp8(monkeypatch) -> list:
    """Counts the FP8 MoE steps quant/fp8_gpu.py fp8_experts_sorted runs (their row counts)."""
    from qwen35.quant import fp8_gpu

    n, real = [], fp8_gpu.fp8_experts_sorted
    monkeypatch.setattr(fp8_gpu, "fp8_experts_sorted",
                        lambda *a: n.append(a[0].shape[0]) or real(*a))  # fmt: skip
    return n


def test_engine_gptq_in_fp8_rows_equals_cpu_engine(tmp_path, calls, monkeypatch):
    """A 4-bit GPTQ MoE checkpoint in groups of 128, held exactly in FP8 blocks of one row (as a
    GPU holds it): the interpreted GPU backend's steps (the Triton MoE reading bo = 1 experts,
    the sorted grouped GEMM for prefill steps, the FP8 GEMV / GEMM on the dense projections) give the CPU engine's greedy tokens. (The
    router stays fp32 as on a GPU: test_engine_fp8_moe_equals_cpu_engine says why.)"""
    from test_gptq_awq import MOE, write

    monkeypatch.setattr("qwen35.loader._unquantized_in_bf16", lambda *a, **k: False)

    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=128)
    ps = prompts(3, seed=33, lo=3, hi=30)
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, quantization="fp8")
    want = ids(make(tmp_path / "q", **kw).generate(ps, sp))
    llm = _interpreted(tmp_path / "q", calls.counted(_full()), **kw)
    ex = [m for m in llm.engine.model.modules() if type(m).__name__ == "Fp8Experts"]
    assert ex and all(m.block == (1, 128) for m in ex)
    sorted_steps = _count_sorted_fp8(monkeypatch)
    assert ids(llm.generate(ps, sp)) == want
    assert calls.n["sparse_moe"] > 0 and sorted_steps, (calls.n, sorted_steps)


@pytest.mark.parametrize("moe", [False, True])
def test_decode_graph_buffers_with_padding_rows(calls, moe):
    """The static-buffer decode step a CUDA graph replays (3 rows in the bucket of 4, the
    padding row in the padding block and slot), run eagerly through the interpreted kernels,
    without a host sync (the MoE through the Triton MoE)."""
    be = calls.counted(_full())
    assert_padded_decode_equals_eager(_model(moe), be, (7, 37, 5), steps=2, tol=1e-4)
    assert calls.n["conv_update_"] and calls.n["paged_decode_attention"], calls.n
    assert (calls.n["sparse_moe"] > 0) == moe, calls.n


def test_fla_varlen_conv_equals_per_sequence_conv():
    """fla's varlen causal_conv1d with our slot states (ops/deltanet.py `_conv_prefill_fla`)
    against our per-sequence conv: prefills of 2, 3 and 70 tokens (shorter than the conv window
    too), with and without initial states, checkpoints at 1, 2 and 64 tokens; rows interleaved
    with a decode row; outputs and every conv state slot."""
    from qwen35.engine.forward_batch import SeqPlan
    from qwen35.ops.deltanet import _conv_prefill, _conv_prefill_fla

    be = _full()
    g = torch.Generator().manual_seed(9)
    C, K = 24, 4
    lens = [2, 3, 70]
    T = sum(lens) + 1
    qkv = torch.randn(T, C + 5, generator=g)[:, :C]  # a column slice of a packed projection
    w = torch.randn(C, 1, K, generator=g)[:, 0, :]
    conv0 = torch.randn(10, C, K - 1, generator=g)
    plans, row = [], 1  # row 0: a decode row
    for j, (n, fresh) in enumerate(zip(lens, [False, True, False], strict=True)):
        sp = SeqPlan(j, row, n, 0 if fresh else 5, slot=2 * j + 1, has_initial_state=not fresh)
        sp.checkpoints = {0: [(1, 7)], 1: [(2, 8)], 2: [(2, 6), (64, 9)]}[j]
        plans.append(sp)
        row += n
    want_c, got_c = conv0.clone(), conv0.clone()
    want, got = torch.zeros(T, C), torch.zeros(T, C)
    for sp in plans:
        want[sp.rows] = _conv_prefill(qkv[sp.rows], w, sp, want_c, K)
    slots = torch.tensor([sp.slot for sp in plans])
    _conv_prefill_fla(be.fla.conv, qkv, w, plans, slots, got_c, got)
    torch.testing.assert_close(got[1:], want[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_c, want_c, atol=0, rtol=0)


class _Unbuildable:
    """Stands for a @triton.jit kernel that cannot be built on this GPU: launching it raises
    Triton's own error (as compiling for an sm_80 or a smaller GPU does, before any launch)."""

    def __init__(self, error):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.error

        return launch


@pytest.mark.parametrize(
    "which,module,kernel,field",
    [
        ("dense", "triton_attention", "_decode_kernel", "triton_attention"),
        ("dense", "triton_deltanet", "_recurrent_kernel", "triton_deltanet"),
        ("moe", "triton_moe", "_gate_up_kernel", "triton_moe"),
    ],
)
def test_start_up_check_switches_off_kernels_that_do_not_build(
    which, module, kernel, field, ckpts, monkeypatch
):
    """engine/preflight.py with the real (interpreted) kernels: every kernel builds -> the
    backend is kept; one raises Triton's OutOfResources / PTXASError -> its family alone is
    switched off, and the engine then serves the CPU engine's greedy tokens without it."""
    import importlib

    from triton.runtime.errors import OutOfResources, PTXASError

    from qwen35.engine.preflight import check_kernels

    d = ckpts[which]
    ps = prompts(3, seed=41, lo=3, hi=40)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, max_num_batched_tokens=32)
    want = ids(make(d, **kw).generate(ps, sp))
    be = _full()
    llm = make(d, **kw)
    model = llm.engine.runner.model
    assert check_kernels(model, be, BS, long=40) is be  # (520 tokens: minutes interpreted)
    mod = importlib.import_module(f"qwen35.kernels.{module}")
    error = OutOfResources(264192, 232448, "shared memory") if which == "dense" else \
        PTXASError("ptxas fatal: Unsupported .target 'sm_75'")  # fmt: skip
    monkeypatch.setattr(mod, kernel, _Unbuildable(error))
    got = check_kernels(model, be, BS, long=40)
    assert getattr(got, field) is False
    assert got == dataclasses.replace(be, **{field: False})
    llm.engine.runner.backend = got
    assert ids(llm.generate(ps, sp)) == want


@pytest.mark.parametrize(
    "which,k,graphs", [("dense", 1, False), ("moe", 1, False), ("dense", 3, False),
                       ("dense", 3, True), ("moe", 2, True)]
)  # fmt: skip
def test_speculative_verify_steps_on_the_gpu_backend(which, k, graphs, tmp_path, calls,
                                                     monkeypatch):  # fmt: skip
    """Speculative decoding on the GPU backend's kernels: verify steps of decode rows are
    stepped phase by phase (our Triton conv + recurrent step on each phase's row range, the
    states copied into the spare slots by index between phases, paged decode attention over
    every row), the MTP layer on the same batch, chained drafts as decode rows of the MTP
    layer; graphs: decode and verify steps and the MTP head's passes through the static
    buffers a CUDA graph replays (tests/test_speculative.py graph_runner). Greedy tokens equal the CPU engine without
    drafts, with the MTP head's drafts, with always-right ones and with some wrong."""
    from qwen35.ops import deltanet
    from test_speculative import graph_runner, oracle

    save_checkpoint(tmp_path, moe=which == "moe", layout="vlm", mtp=True)
    ps = prompts(3, seed=24, lo=3, hi=30)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS)
    want = ids(make(tmp_path, **kw).generate(ps, sp))
    be = calls.counted(_full())
    llm = _interpreted(tmp_path, be, num_speculative_tokens=k, **kw)
    if graphs:
        replays = graph_runner(llm, be, 4, monkeypatch)
    spec = llm.engine.runner.spec
    spec.backoff, spec.max_verify_seqs = False, 8
    phases = []
    over = deltanet.over_phases
    monkeypatch.setattr(deltanet, "over_phases", lambda d, *a: phases.append(1) or over(d, *a))
    assert ids(llm.generate(ps, sp)) == want
    for wrong in (0.0, 0.4):
        spec.draft_override = oracle({tuple(p): p + w for p, w in zip(ps, want, strict=True)},
                                     wrong)  # fmt: skip
        assert ids(llm.generate(ps, sp)) == want
    # always-right drafts: at least 2 a sequence in its 5 tokens after the prefill (no draft
    # positions past max_tokens: the last token comes alone)
    assert spec.stats.accepted >= 2 * len(ps) and spec.stats.drafts > spec.stats.accepted
    assert calls.n["chunk"] and calls.n["conv_update_"] and phases, calls.n
    if graphs:
        assert replays["verify"] and replays["decode"] and not replays["eager decode"], replays
        assert replays["mtp"] and replays["mtp chain"], replays  # (k > 1)


@pytest.mark.parametrize("source", ["bf16", "gguf"])
def test_engine_int4_on_the_gpu_backend_equals_cpu_engine(tmp_path, calls, monkeypatch, source):
    """`--quantization int4` as a GPU runs it (kernels/triton_int.py through quant/int_gpu.py):
    the MoE experts stacked and run by the pairs kernels (decode) or the grouped GEMM over the
    pairs sorted by expert (a prefill step of > 64 tokens), every int4 / int6 product by the
    GEMVs (decode rows) or the GEMM kernel (prefill), interpreted on CPU tensors: greedy
    tokens equal the CPU engine's on the same int4 weights (its kernels with 16-bit
    activations, --int4-activations 16bit). From a BF16 checkpoint quantized at load, and from a
    GGUF file of Q4_0 tensors whose down experts are Q8_0 (as a Q4_K_M's are Q6_K): its 4-bit
    values kept, the down experts int8 (the int8 pairs kernel)."""
    from qwen35.kernels import triton_int
    from qwen35.quant import int_gpu, matmul

    n = Counter()
    for mod, name in [(triton_int, "int4_gemv"), (triton_int, "int_gemm"),
                      (triton_int, "int6_gemv"), (triton_int, "int4_pairs"),
                      (triton_int, "expert_pairs"), (int_gpu, "int_experts_sorted")]:  # fmt: skip
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=fn, _n=name: n.update([_n]) or _f(*a))
    from test_gptq_awq import MOE  # (experts of 128 rows: whole 64-row blocks, int4)

    save_checkpoint(tmp_path / "m", moe=True, experts="fused", **MOE)
    model = tmp_path / "m"
    if source == "gguf":
        pytest.importorskip("gguf", reason="the gguf package writes the test's file")
        from gguf_writer import write_gguf

        types = {f"blk.{i}.ffn_down_exps.weight": "Q8_0" for i in range(8)}
        model = write_gguf(model, tmp_path / "m.gguf", "Q4_0", types=types)
    ps = prompts(3, seed=35, lo=3, hi=30) + prompts(1, seed=36, lo=80, hi=81)  # (> 64 rows)
    sp = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=BS, quantization="int4", int4_activations="16bit")
    want = ids(make(model, **kw).generate(ps, sp))
    rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    monkeypatch.setattr(matmul, "int4_linear", lambda x, p, sz, g, n_, x8=True: int_gpu
                        .int4_linear_gpu(rows(x), p, sz, g, n_).view(*x.shape[:-1], n_))
    monkeypatch.setattr(matmul, "int6_linear", lambda x, p, s: int_gpu.int6_linear_gpu(
        rows(x), p, s).view(*x.shape[:-1], p.shape[0]))  # fmt: skip
    llm = _interpreted(model, calls.counted(_full()), **kw)
    from qwen35.quant.layers import IntExperts

    ex = [m for m in llm.engine.model.modules() if isinstance(m, IntExperts)]
    assert ex and all(m.stack_() for m in ex)  # (as a load onto a GPU stacks them)
    kinds = {(m.stack[0].kind, m.stack[1].kind) for m in ex}
    assert kinds == {("int4", "int8" if source == "gguf" else "int4")}, kinds
    assert ids(llm.generate(ps, sp)) == want
    assert all(n[k] for k in ("int4_gemv", "int_gemm", "int6_gemv", "expert_pairs",
                              "int_experts_sorted")), n  # fmt: skip


def test_decode_graph_buffers_with_int4_moe(calls, monkeypatch):
    """The static-buffer decode step a CUDA graph replays, on an int4 MoE model as a GPU holds
    it (experts stacked: the pairs kernels; every int4 / int6 product by quant/int_gpu.py, here
    for the reference too): no host sync (so capturable), the real rows equal the eager
    reference's (its expert loop on the same weights), the padding row writes nowhere else."""
    from qwen35.quant import int_gpu, matmul
    from qwen35.quant.layers import IntExperts
    from test_gptq_awq import MOE

    rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    monkeypatch.setattr(matmul, "int4_linear", lambda x, p, sz, g, n_, x8=True: int_gpu
                        .int4_linear_gpu(rows(x), p, sz, g, n_).view(*x.shape[:-1], n_))
    monkeypatch.setattr(matmul, "int6_linear", lambda x, p, s: int_gpu.int6_linear_gpu(
        rows(x), p, s).view(*x.shape[:-1], p.shape[0]))  # fmt: skip
    monkeypatch.setattr(matmul, "int4_linear_many", lambda *a: None)  # (the CPU's 8-bit rows)
    model = _model(True, quant="int4", **MOE)
    ex = [m for m in model.modules() if isinstance(m, IntExperts)]
    assert ex and all(m.stack_() for m in ex)
    n = Counter()
    from qwen35.kernels import triton_int

    fn = triton_int.expert_pairs
    monkeypatch.setattr(triton_int, "expert_pairs", lambda *a: n.update(["pairs"]) or fn(*a))
    assert_padded_decode_equals_eager(model, calls.counted(_full()), (7, 37, 5), steps=2,
                                      tol=1e-4)  # fmt: skip
    assert n["pairs"] > 0 and calls.n["paged_decode_attention"], (n, calls.n)
