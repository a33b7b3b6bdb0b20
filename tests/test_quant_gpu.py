"""Block-FP8 on CUDA (quant/fp8_gpu.py): every path against the dequantise + GEMM reference,
and a whole FP8 model against its dequantised BF16 twin. Needs a GPU (`-m gpu`)."""

from __future__ import annotations

import pytest
import torch

from qwen35.quant import fp8_gpu
from qwen35.quant.formats import quantize_fp8_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _problem(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    w, s = quantize_fp8_blocks(torch.randn(N, K, generator=g) * 0.05)
    return x, w.cuda(), s.float().cuda()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("M,N,K", [(1, 256, 512), (7, 384, 1024), (130, 200, 333), (64, 512, 256)])
def test_triton_block_fp8_matches_reference(M, N, K):
    kern = fp8_gpu._triton_kernel()
    if kern is None:
        pytest.skip("triton is not installed")
    x, w, s = _problem(M, N, K)
    y = kern(x, w, s, (128, 128))
    # activations are quantized to e4m3 per token-group: ~2^-4 relative per element
    assert _rel(y, fp8_gpu.reference(x, w, s, (128, 128))) < 0.03


@pytest.mark.parametrize("M", [1, 16, 33])  # decode rows, an odd batch
def test_dispatch_matches_reference_and_activation_quant(M, monkeypatch):
    """Up to 16 rows: the weight-only GEMV (no activation quantization: the reference up to
    the output's rounding); above: a GEMM path with e4m3 activations."""
    gemv_calls = []
    orig = fp8_gpu._gemv_kernel()
    monkeypatch.setattr(fp8_gpu, "_gemv_kernel", lambda: lambda *a: gemv_calls.append(1) or orig(*a))
    x, w, s = _problem(M, 512, 1024)
    y = fp8_gpu.fp8_linear_gpu(x, w, s, (128, 128))
    assert y.shape == (M, 512) and y.dtype == torch.bfloat16
    assert bool(gemv_calls) == (M <= fp8_gpu.GEMV_MAX_ROWS)
    assert _rel(y, fp8_gpu.reference(x, w, s, (128, 128))) < (0.01 if gemv_calls else 0.03)
    q, xs = fp8_gpu.quantize_activations(x.float())
    back = q.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    assert _rel(back, x) < 0.05


def test_fp8_model_on_gpu_matches_dequantised(tmp_path):
    from qwen35.loader import load_model
    from tiny import save_fp8_checkpoint

    save_fp8_checkpoint(tmp_path / "fp8", tmp_path / "bf16", moe=True, experts="per_expert")
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    a = load_model(tmp_path / "fp8", dtype="bf16", device="cuda")(ids)
    b = load_model(tmp_path / "bf16", dtype="bf16", device="cuda")(ids)
    assert _rel(a, b) < 0.05


def test_fp8_moe_engine_decodes_in_graphs(tmp_path):
    """An FP8 MoE checkpoint in the engine, bf16: the Triton MoE (up to 16 rows) and the grouped
    GEMM over the sorted pairs (more) read its e4m3 experts as stored, without a host sync, so
    decode CUDA graphs are captured at every batch; their greedy tokens equal the eager
    engine's (the same kernels, replayed; four prompts prefilled in one step, then every
    decode step has 4 rows: the graph bucket's size, so the matmuls see the same M; then 40
    sequences)."""
    from qwen35.request import SamplingParams
    from test_engine import ids, make, prompts
    from tiny import save_fp8_checkpoint

    save_fp8_checkpoint(tmp_path / "fp8", tmp_path / "bf16", moe=True, experts="per_expert")
    kw = dict(dtype="bf16", device="cuda", max_memory="4GiB", block_size=16)
    llm = make(tmp_path / "fp8", **kw)
    runner = llm.engine.runner
    assert runner.backend.triton_moe, runner.backend.name
    assert runner.graphs is not None, "no decode graphs for the FP8 MoE model (see the log)"
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eager = make(tmp_path / "fp8", enforce_eager=True, **kw)
    for ps in (prompts(4, seed=5, lo=3, hi=40), prompts(40, seed=6, lo=3, hi=12)):
        got = ids(llm.generate(ps, sp))
        assert got == ids(eager.generate(ps, sp))


def test_gptq_checkpoint_on_gpu_is_held_exactly_in_fp8(tmp_path):
    """A 4-bit GPTQ checkpoint in groups of 128 (MoE, per-expert) on CUDA with --dtype auto:
    FP8 in blocks of one row (its values exactly), so fp32 logits match the CPU's plain
    checkpoint of those values up to the GEMMs' activation rounding; greedy decoding runs in
    CUDA graphs with the Triton MoE reading one-row blocks."""
    from qwen35 import LLM, SamplingParams
    from qwen35.loader import auto_quantization, load_model
    from qwen35.quant.layers import Fp8Experts
    from test_gptq_awq import MOE, write
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=128)
    assert auto_quantization(str(tmp_path / "q"), "auto", "auto", "cuda") == "fp8"
    m = load_model(tmp_path / "q", dtype="bf16", device="cuda", quantization="fp8")
    ex = [x for x in m.modules() if isinstance(x, Fp8Experts)]
    assert ex and all(x.block == (1, 128) for x in ex)
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    ref = load_model(tmp_path / "q", dtype="bf16", device="cuda")(ids)  # BF16 values, no FP8
    assert _rel(m(ids), ref) < 0.05
    llm = LLM(str(tmp_path / "q"), device="cuda", max_model_len=256, max_num_seqs=4)
    assert llm.engine.engine_config.load.quantization == "fp8"
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert together == [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]


@pytest.mark.parametrize("moe", [False, True])
def test_int4_model_on_gpu_matches_the_cpus(tmp_path, moe):
    """`--quantization int4` on CUDA (kernels/triton_int.py: the CPU layouts read by Triton GEMVs,
    the MoE experts stacked for the pairs kernel): the same int4 / int6 weights as a CPU load
    (quantized on the device, the same formulas), fp32 logits within the activation rounding of
    the CPU's kernels (16-bit activations there; none here), for decode-sized inputs (the GEMVs,
    the pairs kernels) and prefills of 100 tokens (the GEMM kernel, the grouped GEMM over the
    pairs sorted by expert) and 300 (dense: dequantised + cuBLAS)."""
    from qwen35.loader import load_model
    from qwen35.quant.layers import Int4Linear, IntExperts, set_int4_activations
    from test_gptq_awq import DENSE, MOE  # (whole 64-row blocks: every matrix int4)
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m", moe=moe, experts="fused", **(MOE if moe else DENSE))
    gpu = load_model(tmp_path / "m", dtype="fp32", device="cuda", quantization="int4")
    assert any(isinstance(m, Int4Linear) for m in gpu.modules())
    if moe:
        ex = [m for m in gpu.modules() if isinstance(m, IntExperts)]
        assert ex and all(m.stack is not None for m in ex), "experts not stacked for the GPU"
    cpu = load_model(tmp_path / "m", dtype="fp32", quantization="int4")
    set_int4_activations(cpu, False)
    try:
        for T in (1, 5, 24, 100, 300):
            ids = torch.randint(0, 256, (1, T))
            assert _rel(gpu(ids.cuda()).cpu(), cpu(ids)) < 0.02, T
    finally:
        set_int4_activations(cpu, True)


def test_int4_moe_engine_decodes_in_graphs(tmp_path):
    """An int4 MoE model in the engine (bf16): its experts run the int4 pairs kernel (up to 16
    rows) or the sorted grouped GEMM (more) without a host sync, so decode CUDA graphs are
    captured at every batch; greedy tokens equal the eager engine's, and batched equals alone
    (up to 16 rows: past them the grouped GEMM adds in another order than the pairs kernels)."""
    from qwen35.request import SamplingParams
    from test_engine import ids, make, prompts
    from test_gptq_awq import MOE
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m", moe=True, experts="fused", **MOE)
    kw = dict(dtype="bf16", device="cuda", max_memory="4GiB", block_size=16, quantization="int4")
    llm = make(tmp_path / "m", **kw)
    assert llm.engine.runner.graphs is not None, "no decode graphs for the int4 MoE (see the log)"
    ps = prompts(4, seed=7, lo=3, hi=40)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = ids(llm.generate(ps, sp))
    assert got == ids(make(tmp_path / "m", enforce_eager=True, **kw).generate(ps, sp))
    assert got == [ids(llm.generate([p], sp))[0] for p in ps]
    ps = prompts(70, seed=8, lo=3, hi=12)  # a decode batch of 70 rows, captured too
    got = ids(llm.generate(ps, sp))
    assert got == ids(make(tmp_path / "m", enforce_eager=True, **kw).generate(ps, sp))


def test_gptq_checkpoint_in_int4_on_gpu(tmp_path):
    """A 4-bit GPTQ MoE checkpoint with --quantization int4 on CUDA: its stored codes kept (int4
    groups of 128, experts stacked), a quarter of BF16's bytes where FP8 holds twice that; logits
    match the FP8 load of the same values (both exact but for int4's zero rounded to bf16)."""
    from qwen35.loader import load_model
    from qwen35.quant.layers import IntExperts
    from test_gptq_awq import MOE, write
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "src", moe=True, experts="per_expert", **MOE)
    write(tmp_path / "src", tmp_path / "q", fmt="gptq", sym=False, group=128)
    m4 = load_model(tmp_path / "q", dtype="bf16", device="cuda", quantization="int4")
    ex = [x for x in m4.modules() if isinstance(x, IntExperts)]
    assert ex and all(x.stack is not None and x.stack[0].group == 128 for x in ex)
    m8 = load_model(tmp_path / "q", dtype="bf16", device="cuda", quantization="fp8")
    ids = torch.randint(0, 256, (2, 24), device="cuda")
    assert _rel(m4(ids), m8(ids)) < 0.05
    ids = ids[:1, :3]  # decode-sized: the GEMVs and the pairs kernel
    assert _rel(m4(ids), m8(ids)) < 0.05
