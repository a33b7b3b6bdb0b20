"""kernels/head_screen_cpu.cpp's VNNI dot layouts for 4-16 input rows (the rows in a vector's
lanes) against the exact screen values, and the engine's bf16 steps past 8 rows taking the
screen (tests/test_head_screen.py runs the rest on all three screen paths)."""

from __future__ import annotations

import pytest
import torch

from qwen35.kernels import gemv
from qwen35.models.head_screen import HeadScreen
from qwen35.request import SamplingParams
from test_head_screen import _weights, full_argmax
from tiny import save_checkpoint


def vnni_kernel():
    mod = gemv.load_screen() if gemv.load() is not None else None
    if mod is None or not mod.vnni():
        pytest.skip("the screen kernel's int8 x int8 dots need AVX512-VNNI (and the kernels)")
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("head_screen_lanes") / "dense"
    save_checkpoint(d, moe=False, layout="vlm", vocab_size=6000)
    return d


def _vnni_values_reference(x: torch.Tensor, head: HeadScreen) -> torch.Tensor:
    """The VNNI screen's values in float64: each input row rounded to int8 per block of 64
    (scale amax / 127, round half to even), exact integer dots, scaled per block and per row."""
    M, K = x.shape
    nb = -(-K // 64)
    xp = torch.zeros(M, nb * 64)
    xp[:, :K] = x
    xb = xp.view(M, nb, 64)
    xs = xb.abs().amax(dim=2) / 127  # [M, nb] fp32, as the kernel divides
    xq = torch.where(xs[..., None] > 0, (xb / xs[..., None]).clamp(-127, 127).round(), 0.0)
    qp = torch.zeros(len(head.q), nb * 64, dtype=torch.float64)
    qp[:, :K] = head.q.double()
    dots = torch.einsum("mbk,vbk->mvb", xq.double(), qp.view(-1, nb, 64))  # exact integers
    return (dots * xs.double()[:, None, :]).sum(dim=2) * head.scale.double()  # [M, V]


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 16])
def test_vnni_dot_layouts_equal_the_exact_screen(rows):
    """kernels/head_screen_cpu.cpp's VNNI dots: one input row at a time (1-3 rows), 4-8 rows in
    a vector's lanes two head rows at a time (dot_pairs), 9-16 one head row at a time
    (dot_lanes): each gives the screen values of the exact integer sums (float64 reference)
    within fp32 rounding, with the row-by-row path forced as well; V not a multiple of 8 (a
    chunk's last rows take the one-row pass), a partial last block, outlier channels."""
    mod = vnni_kernel()
    V, K = 2053, 200
    head = HeadScreen(_weights(V, K, torch.float32, seed=9))
    g = torch.Generator().manual_seed(10)
    x = torch.randn(rows, K, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    x[:, [3, 150]] *= 50
    want = _vnni_values_reference(x, head)
    tol = 1e-5 * float(want.abs().max())
    old = mod.set_lanes_min_rows(99)  # row by row
    try:
        for lanes_from in (99, 1, old):
            mod.set_lanes_min_rows(lanes_from)
            got = mod.values(x, head.q, head.scale, False).double()
            assert (got - want).abs().max() <= tol, (lanes_from, float((got - want).abs().max()))
    finally:
        mod.set_lanes_min_rows(old)
    assert head.tokens(x) == full_argmax(head.weight, x)


def test_engine_bf16_batch_past_8_rows(ckpt):
    """12 greedy sequences decoding together in bf16 take the screen (12 rows a step), and give
    the full head's tokens. (Each alone is not asserted: past 8 bf16 rows the other matmuls are
    torch's GEMM, whose bits may differ from the GEMV kernel's a row alone takes.)"""
    from qwen35.engine.llm_engine import LLM
    from qwen35.layers.linear import head_gemv_max_rows

    vnni_kernel()
    if head_gemv_max_rows(torch.bfloat16) == 8:
        pytest.skip("bf16 heads take the screen past 8 rows on AVX512-BF16 CPUs without AMX only")
    prompts = [[5 + i, 9, 200 - i, 17] + [3] * i for i in range(12)]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    kw = dict(dtype="bf16", verbose=False, max_memory="200MiB", max_num_seqs=16)
    on = LLM(str(ckpt), **kw)
    calls = []
    real = on.engine.head_screen.tokens
    on.engine.runner.head_screen.tokens = lambda x: calls.append(len(x)) or real(x)
    off = LLM(str(ckpt), head_screen=False, **kw)
    got = [o.outputs[0].token_ids for o in on.generate(prompts, greedy)]
    assert max(calls) == 12
    assert got == [o.outputs[0].token_ids for o in off.generate(prompts, greedy)]


@pytest.mark.parametrize("seed", [3, 4, 19, 35])  # 19, 35: sampled top_k = 1 rows with ties
def test_bf16_engine_with_and_without_the_screen_random_workloads(tmp_path, seed):
    """Random mixed requests (greedy, seeded top-k / top-p samples, logprobs, penalties) on bf16
    engines of up to 16 sequences, dense and MoE: the same tokens and logprobs with the screen as
    without it (steps whose rows all take it use it, up to 16 rows; the others the full head).
    Seeds 19 and 35 found sampled top_k = 1 rows taking the greedy-only path (the first of
    several tokens tied at the largest bf16 logit) where the sampler draws among the ties
    (40 seeds checked, 2026-12-05)."""
    import random

    from qwen35.engine.llm_engine import LLM

    rng = random.Random(seed)
    save_checkpoint(tmp_path / "m", moe=seed % 3 == 0, layout="vlm", vocab_size=6000, seed=seed)
    kw = dict(dtype="bf16", verbose=False, max_memory="300MiB", max_num_seqs=rng.choice([12, 16]),
              max_num_batched_tokens=rng.choice([64, 512]))  # fmt: skip
    prompts, params = [], []
    for _ in range(rng.randint(14, 22)):
        prompts.append([rng.randrange(3, 5900) for _ in range(rng.randint(2, 24))])
        n, kind = rng.randint(6, 16), rng.random()
        if kind < 0.45:
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        elif kind < 0.9:
            sp = SamplingParams(max_tokens=n, temperature=rng.choice([0.5, 1.2]),
                                top_k=rng.choice([1, 5, 20, 50]), top_p=rng.choice([1.0, 0.9]),
                                seed=rng.randrange(1000), ignore_eos=True)  # fmt: skip
        elif kind < 0.95:  # rows that need the full head (short: the rest then screen)
            sp = SamplingParams(max_tokens=2, temperature=0.0, logprobs=2, ignore_eos=True)
        else:
            sp = SamplingParams(max_tokens=3, temperature=0.7, seed=rng.randrange(1000),
                                presence_penalty=0.5, ignore_eos=True)  # fmt: skip
        params.append(sp)

    def run(screen: bool):
        llm = LLM(str(tmp_path / "m"), head_screen=screen, **kw)
        calls = []
        if screen:
            head = llm.engine.runner.head_screen
            tokens, logits = head.tokens, head.logits
            head.tokens = lambda x: calls.append(len(x)) or tokens(x)
            head.logits = lambda x, ks: calls.append(len(x)) or logits(x, ks)
        out = [(o.outputs[0].token_ids,
                [(t.token_id, t.logprob, sorted(t.top.items())) for t in o.outputs[0].logprobs or []])
               for o in llm.generate(prompts, params)]  # fmt: skip
        return out, calls

    from qwen35.layers.linear import head_gemv_max_rows

    (on, calls), (off, _) = run(True), run(False)
    assert on == off
    # steps of 9-16 rows took it, on CPUs whose bf16 head takes the GEMV kernel that far (AVX512-
    # BF16 without AMX; a VNNI CPU without BF16, e.g. Ice Lake, stops at 8)
    assert 8 < max(calls) <= 16 if head_gemv_max_rows(torch.bfloat16) == 16 else max(calls) <= 8


def test_engine_fp32_batch_past_16_rows(ckpt):
    """24 greedy sequences decoding together in fp32 on the bf16-stored head (`--quantization
    bf16`; its rows take the GEMV kernel 16 at a time on every CPU) take the screen, 24 rows a
    step in two groups, and give the full head's tokens."""
    from qwen35.engine.llm_engine import LLM

    if gemv.load() is None:
        pytest.skip("the CPU GEMV kernels are not available (no compiler / AVX2)")
    prompts = [[5 + i, 9, 200 - i, 17] + [3] * (i % 5) for i in range(24)]
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    kw = dict(dtype="fp32", quantization="bf16", verbose=False, max_memory="300MiB",
              max_num_seqs=32)  # fmt: skip
    on = LLM(str(ckpt), **kw)
    calls = []
    real = on.engine.runner.head_screen.tokens
    on.engine.runner.head_screen.tokens = lambda x: calls.append(len(x)) or real(x)
    off = LLM(str(ckpt), head_screen=False, **kw)
    got = [o.outputs[0].token_ids for o in on.generate(prompts, greedy)]
    assert max(calls) == 24
    assert got == [o.outputs[0].token_ids for o in off.generate(prompts, greedy)]
