"""models/head_screen.py: the int8 screen of lm_head gives exactly the full head's argmax
(first index of the maximum, bf16-rounded logits included) and, for top-k rows, logits the
sampler draws the same token from; the engine uses it only for rows that want nothing else."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qwen35.engine.sampler import argmax
from qwen35.kernels import gemv
from qwen35.layers.linear import head_linear, linear
from qwen35.models import head_screen
from qwen35.models.head_screen import HeadScreen
from qwen35.request import SamplingParams
from tiny import save_checkpoint

pytestmark = pytest.mark.skipif(
    gemv.load() is None, reason="the CPU GEMV kernels are not available (no compiler / AVX2)"
)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=["kernel", "kernel-avx2", "reference"], autouse=True)
def screen_path(request, monkeypatch):
    """Every test on the three screens: kernels/head_screen_cpu.cpp with its AVX512-VNNI dots
    and with its AVX2 ones, and the PyTorch twin."""
    if request.param == "kernel":
        mod = gemv.load_screen()
        if mod is None or not mod.vnni():
            pytest.skip("the kernel's int8 x int8 dots need AVX512-VNNI, which this CPU lacks")
    elif request.param == "kernel-avx2":
        if gemv.load_screen() is None:
            pytest.skip("head_screen_cpu.cpp did not build (no compiler / AVX2)")
        monkeypatch.setattr(HeadScreen, "avx2_only", True)
    else:
        monkeypatch.setattr(gemv, "load_screen", lambda: None)
    return request.param


def full_argmax(w: torch.Tensor, x: torch.Tensor) -> list[int]:
    """What the engine does without the screen: the full head (head_linear), then the argmax."""
    return argmax(head_linear(x, w).float()).tolist()


def _weights(V: int, K: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(V, K, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [64, 72, 200])
def test_tokens_equal_full_argmax(dtype, K):
    w = _weights(3000, K, dtype)
    before = w.clone()
    head = HeadScreen(w)
    assert torch.equal(w, before)  # the head's weight is read, never written
    g = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, head.max_rows):
        for scale in (0.1, 1.0, 30.0):  # flat to peaked distributions
            x = (torch.randn(rows, K, generator=g) * scale).to(dtype)
            got = head.tokens(x)
            assert got is not None
            assert got == full_argmax(w, x)
    cand = head.candidates(torch.randn(1, K, generator=g).to(dtype), [1])
    assert cand is not None and len(cand) < 0.1 * len(w)  # it screens


@pytest.mark.parametrize("K", [64, 200])
def test_fp32_rows_on_a_bf16_head(K):
    """A model computing in fp32 on bf16-stored weights (--quantization bf16): the screen of the
    bf16 head on fp32 rows gives the full head's argmax (fp32 logits, not rounded), up to 48
    rows (the full head's 16-row kernel chunks), screened 16 rows at a time; bf16 rows are not
    its rows."""
    w = _weights(3000, K, torch.bfloat16, seed=2)
    head = HeadScreen(w, torch.float32)
    assert head.max_rows == 48 and not head.rounded_output
    g = torch.Generator().manual_seed(3)
    for rows in (1, 3, 16, 17, 40, 48):
        for scale in (0.1, 1.0, 30.0):
            x = torch.randn(rows, K, generator=g) * scale
            got = head.tokens(x)
            assert got is not None and got == full_argmax(w, x)
    assert head.tokens(torch.randn(1, K, generator=g).bfloat16()) is None
    with pytest.raises(ValueError):
        HeadScreen(w.float(), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_channels_and_tiny_rows(dtype):
    """Input rows with a few channels 100x the rest (as final-norm outputs have): still the full
    head's argmax; a row of tiny values (denormal products) and an all-zero row: that or
    undecided, never another token."""
    K = 256
    w = _weights(5000, K, dtype, seed=5)
    head = HeadScreen(w)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, K, generator=g)
    x[:, [3, 77, 200]] *= 100
    x = x.to(dtype)
    assert head.tokens(x) == full_argmax(w, x)
    tiny = (torch.randn(1, K, generator=g) * 1e-36).to(dtype)  # logits near denormals
    assert head.tokens(tiny) in (None, full_argmax(w, tiny))  # undecided or right
    cand = head.candidates(x[:1], [1])
    assert cand is not None and len(cand) < 0.2 * len(w)
    zero = torch.zeros(1, K, dtype=dtype)  # 5000 tied logits: more than MAX_CANDIDATES
    assert head.tokens(zero) is None  # undecided: the engine computes the full head
    small = HeadScreen(w[:1000].clone())  # 1000 tied: all candidates, the first wins
    assert small.tokens(zero) == [0] == full_argmax(w[:1000], zero)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_take_the_first_index(dtype):
    K = 64
    w = _weights(2000, K, dtype, seed=2)
    x = torch.randn(1, K).to(dtype)
    w[1500] = x[0] * 0.5  # the largest logit by far ...
    w[700] = w[1500]  # ... twice: the first wins
    head = HeadScreen(w)
    assert full_argmax(w, x) == [700]
    assert head.tokens(x) == [700]


def test_bf16_rounded_logits_tie():
    """Two logits that differ in fp32 but round to the same bf16: the full head gives the first
    of them even though the later one is larger before rounding."""
    K = 64
    w = _weights(2000, K, torch.bfloat16, seed=3)
    x = torch.zeros(1, K, dtype=torch.bfloat16)
    x[0, :2] = 1.0
    w[:, :2] = 0
    w[300, 0], w[300, 1] = 8.0, 0.0  # logit 8.0
    w[1200, 0], w[1200, 1] = 8.0, 0.0078125  # 8.0078125: a bf16 ulp at 8 is 0.0625
    exact = linear(x, w)
    assert exact[0, 1200] == exact[0, 300]  # they tie after rounding ...
    assert float(x[0].float() @ w[1200].float()) > float(x[0].float() @ w[300].float())  # ... only
    head = HeadScreen(w)
    assert full_argmax(w, x) == [300]
    assert head.tokens(x) == [300]


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_the_int8_screen_ranks_wrong(dtype):
    """One outlier weight makes a row's int8 scale coarse: its other weights quantise to zero
    and the screen ranks it low, yet its exact logit is the largest. The error bound keeps it;
    with the bound zeroed the screen alone would pick another token (so this test can fail)."""
    K = 128
    w = _weights(4000, K, dtype, seed=4)
    x = torch.rand(1, K).add_(0.5).to(dtype)  # positive inputs
    w[2500] = 0.3  # every weight below half an int8 step of the outlier's scale ...
    w[2500, 0] = -100.0  # ... an outlier on an input that is 0
    x[0, 0] = 0
    head = HeadScreen(w)
    assert full_argmax(w, x) == [2500]
    assert int(head.screen(x).argmax()) != 2500
    assert head.tokens(x) == [2500]
    head.err.zero_()
    head.nq.zero_()
    head.tiny.zero_()
    assert head.tokens(x) != [2500]


def test_undecided_and_unsupported_inputs():
    w = _weights(500, 64, torch.float32)
    head = HeadScreen(w)
    x = torch.randn(1, 64)
    x[0, 3] = float("nan")
    assert head.tokens(x) is None  # non-finite rows: the full path decides
    assert head.tokens(torch.randn(head.max_rows + 1, 64)) is None  # beyond the GEMV rows
    assert head.tokens(torch.randn(1, 64, dtype=torch.bfloat16)) is None  # not the head's dtype
    bad = w.clone()
    bad[7, 7] = float("inf")

    class M:
        pass

    from qwen35.layers.linear import Linear

    m = M()
    m.lm_head = Linear(64, 500)
    m.lm_head.weight.data = bad
    assert HeadScreen.build(m) is None  # non-finite weights: no screen
    m.lm_head.weight.data = w
    assert HeadScreen.build(m) is not None
    m.lm_head.weight.data = w.to(torch.float16)
    assert HeadScreen.build(m) is None  # fp16 heads: not built


def _kept_exact(full: torch.Tensor, screened: torch.Tensor, ks: list[int]) -> None:
    """screened is the full logits wherever a row's top-k (ties included) is, and elsewhere
    either the full value or -inf."""
    for i, k in enumerate(ks):
        kth = full[i].topk(k).values[-1]
        keep = full[i] >= kth
        assert torch.equal(screened[i][keep], full[i][keep])
        assert ((screened[i] == full[i]) | (screened[i] == -math.inf)).all()
        assert (screened[i] > -math.inf).sum() < 0.5 * full.shape[1]  # it screened


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_logits_keep_every_top_token_exactly(dtype):
    K = 96
    w = _weights(6000, K, dtype, seed=7)
    w[100:140] = w[4000]  # 41 equal rows: ties that straddle the k-th largest
    head = HeadScreen(w)
    g = torch.Generator().manual_seed(8)
    for rows in (1, 3, head.max_rows):
        x = torch.randn(rows, K, generator=g).to(dtype)
        x[0] = (w[4000].float() * 3).to(dtype)  # row 0: the tied rows are its largest logits
        ks = [[1, 5, 20, 40, 41, 60, 256][i % 7] for i in range(rows)]
        full = head_linear(x, w).float()
        screened = head.logits(x, ks)
        assert screened is not None
        _kept_exact(full, screened, ks)


def test_sampler_draws_the_same_from_screened_logits():
    """Seeded top-k / top-p / min-p draws from the screened row equal those from the full row."""
    from qwen35.engine.sampler import Sampler, SamplingRow, make_generator

    K = 64
    w = _weights(5000, K, torch.float32, seed=9)
    head = HeadScreen(w)
    g = torch.Generator().manual_seed(10)
    kinds = [
        dict(temperature=0.7, top_k=20, top_p=0.8),
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.6, top_k=50, min_p=0.05),
        dict(temperature=1.3, top_k=256, top_p=0.95),
        dict(temperature=0.0),
    ]
    for trial in range(40):
        x = torch.randn(len(kinds), K, generator=g) * (0.5 + trial / 10)
        ps = [SamplingParams(seed=trial * 10 + i, **kw) for i, kw in enumerate(kinds)]
        ks = [p.top_k or 1 for p in ps]
        full = head_linear(x, w).float()
        screened = head.logits(x, ks)
        assert screened is not None
        draws = []
        for logits in (full, screened):
            rows = [SamplingRow(p, generator=make_generator(p.seed)) for p in ps]
            draws.append(Sampler(seed=0)(logits, rows).token_ids)
        assert draws[0] == draws[1]


def test_screen_k_says_which_rows_take_the_screen():
    from qwen35.engine.model_runner import screen_k
    from qwen35.models.head_screen import MAX_TOP_K

    sp = SamplingParams
    assert screen_k(sp(temperature=0), 0) == 1
    assert screen_k(sp(temperature=0.7, top_k=20, top_p=0.8, min_p=0.1), 0) == 20
    assert screen_k(sp(temperature=0.7, top_k=MAX_TOP_K), 0) == MAX_TOP_K
    # sampled with top_k = 1: drawn among the ties of the largest logit, not the greedy path
    assert screen_k(sp(temperature=0.7, top_k=1), 0) == 2
    assert screen_k(sp(temperature=0.7, top_k=MAX_TOP_K + 1), 0) is None
    assert screen_k(sp(temperature=0.7), 0) is None  # no top-k: the whole distribution
    assert screen_k(sp(temperature=0.7, top_p=0.9), 0) is None
    for bad in (dict(logprobs=0), dict(presence_penalty=0.5), dict(repetition_penalty=1.1),
                dict(frequency_penalty=-0.2), dict(logit_bias={3: 1.0})):  # fmt: skip
        assert screen_k(sp(temperature=0, **bad), 0) is None
    assert screen_k(sp(temperature=0, min_tokens=4), 3) is None  # EOS still masked
    assert screen_k(sp(temperature=0, min_tokens=4), 4) == 1
    # greedy under a grammar: its 32 largest, certified after the mask (model_runner._grammar_rows)
    from qwen35.engine.model_runner import GRAMMAR_SCREEN_K
    from qwen35.request import StructuredOutputs

    g = StructuredOutputs(regex="[a-z]+")
    assert screen_k(sp(temperature=0, structured_outputs=g), 0) == GRAMMAR_SCREEN_K
    assert screen_k(sp(temperature=0.7, top_k=3, structured_outputs=g), 0) == GRAMMAR_SCREEN_K
    assert screen_k(sp(temperature=0.7, top_k=40, structured_outputs=g), 0) == 40
    assert screen_k(sp(temperature=0.7, structured_outputs=g), 0) is None  # no top-k
    assert screen_k(sp(temperature=0, logprobs=0, structured_outputs=g), 0) is None
    assert screen_k(sp(temperature=0, presence_penalty=0.5, structured_outputs=g), 0) is None


def test_screen_back_off_ends_after_two_decided_in_a_row():
    """ModelRunner._screen_outcome: each undecided screen doubles the steps skipped after it
    (2, 4, 8 ... 64); one decided screen between misses does not reset that (steps that
    alternate would keep paying for the misses), two in a row do."""
    import types

    from qwen35.engine.model_runner import ModelRunner

    r = types.SimpleNamespace(_screen_misses={"k": 0}, _screen_skip={"k": 0}, _screen_hits={"k": 0})
    skips = []
    for decided in [False, True, False, True, False, True, True, False]:
        ModelRunner._screen_outcome(r, "k", decided)
        skips.append(r._screen_skip["k"] if not decided else None)
        r._screen_skip["k"] = 0
    assert skips == [2, None, 4, None, 8, None, None, 2]
    for _ in range(10):
        ModelRunner._screen_outcome(r, "k", False)
    assert r._screen_skip["k"] == 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("head_screen") / "dense"
    save_checkpoint(d, moe=False, layout="vlm", vocab_size=6000)
    return d


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_engine_tokens_with_and_without_the_screen(ckpt, dtype, monkeypatch):
    from qwen35.engine.llm_engine import LLM

    calls = []
    real = HeadScreen.tokens

    def spy(self, x):
        out = real(self, x)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(HeadScreen, "tokens", spy)
    real_logits = HeadScreen.logits

    def spy_logits(self, x, ks):
        out = real_logits(self, x, ks)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(HeadScreen, "logits", spy_logits)
    prompts = [[5, 9, 200, 17], [3] * 30, list(range(40, 90)), [11, 12]]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    other = [  # rows that need more than the argmax
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, presence_penalty=1.5),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logit_bias={7: 50.0}),
        SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True),
    ]
    on = LLM(str(ckpt), dtype=dtype, verbose=False, max_memory="200MiB")
    off = LLM(str(ckpt), dtype=dtype, verbose=False, max_memory="200MiB", head_screen=False)
    head = on.engine.head_screen
    assert head is not None and off.engine.head_screen is None
    assert on.engine.rank_memory[0]["head_screen_bytes"] == head.nbytes
    assert on.engine.plan.cache_bytes < off.engine.plan.cache_bytes  # counted as weights
    got = [o.outputs[0].token_ids for o in on.generate(prompts, greedy)]
    assert calls and all(calls)  # the screen decided every greedy step
    want = [o.outputs[0].token_ids for o in off.generate(prompts, greedy)]
    assert got == want
    calls.clear()
    limit = head_screen.MAX_CANDIDATES
    monkeypatch.setattr(head_screen, "MAX_CANDIDATES", 0)  # the screen never decides
    undecided = [o.outputs[0].token_ids for o in on.generate(prompts, greedy)]
    assert calls and not any(calls) and undecided == want  # the full head took over
    # ... and the runner backed off: of 12 sampling steps (the prefill's included) it tried the
    # screen at the 1st, 4th and 9th (skipping 2, 4, then 8 steps after each miss)
    assert len(calls) == 3
    on.engine.runner._screen_skip["greedy"] = 0  # (the back-off would skip the next steps)
    monkeypatch.setattr(head_screen, "MAX_CANDIDATES", limit)
    calls.clear()
    topk = [  # seeded and unseeded sampled rows with a top-k, and a greedy one beside them
        SamplingParams(max_tokens=10, temperature=0.7, top_k=20, top_p=0.8, seed=1,
                       ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.0, top_k=3, seed=2, ignore_eos=True),
        dataclasses.replace(greedy, max_tokens=10),
        SamplingParams(max_tokens=10, temperature=0.5, top_k=50, min_p=0.1, seed=4,
                       ignore_eos=True),
    ]  # fmt: skip
    a = [o.outputs[0].token_ids for o in on.generate(prompts, topk)]
    assert calls and all(calls)  # every step took the screen
    b = [o.outputs[0].token_ids for o in off.generate(prompts, topk)]
    assert a == b and a[2] == want[2][:10]
    calls.clear()
    for p in other:
        a = on.generate(prompts[:2], p)
        b = off.generate(prompts[:2], p)
        assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert not calls  # none of those rows went through the screen
    # a batch mixing a greedy row with a logprobs row: the full head for both
    lp = dataclasses.replace(other[0], max_tokens=greedy.max_tokens)
    mixed = on.generate(prompts[:2], [greedy, lp])
    assert not calls
    assert mixed[0].outputs[0].token_ids == want[0]
    assert mixed[1].outputs[0].token_ids == want[1]  # greedy too, with logprobs


def test_plan_counts_the_screen(ckpt):
    """plan/cpu.py's BF16 figure is what a bf16 CPU engine holds, the screen included."""
    from qwen35.config import ModelConfig
    from qwen35.engine.llm_engine import LLM
    from qwen35.plan.cpu import cpu_rows, head_screen_bytes

    cfg = ModelConfig.from_hf(ckpt)
    llm = LLM(str(ckpt), dtype="bf16", verbose=False, text_only=True)
    head = llm.engine.head_screen
    assert head.nbytes == head_screen_bytes(cfg)
    held = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters()) + head.nbytes
    row = cpu_rows([cfg], "int8")[0]
    assert abs(row["weights_bytes"]["bf16"] - held) / held < 0.01
    rd = row["decode_read_bytes_per_token"]
    assert rd["bf16"] - rd["bf16_greedy"] == cfg.vocab_size * cfg.hidden_size * 2 - head.nbytes


def test_head_rows_past_the_bf16_kernel_limit():
    """bf16 rows 9-16 on AVX512-BF16 CPUs: head_linear runs the GEMV kernel 8 rows a call,
    so each row's logits are the bits it gets alone (torch's GEMM at 16 rows gives no such
    promise), and the screen takes those steps, its exact rows through the same call. Elsewhere
    (QWEN35_CPU_ISA=avx2 here, AMX CPUs) the GEMM, and the screen up to 8 rows."""
    from qwen35.layers.linear import head_gemv_max_rows

    w = _weights(3000, 96, torch.bfloat16, seed=11)
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    head = HeadScreen(w)
    if head_gemv_max_rows(torch.bfloat16) == 8:
        assert head.max_rows == 8
        assert torch.equal(head_linear(x, w), torch.nn.functional.linear(x, w))
        return
    for rows in (9, 12, 16):
        alone = torch.cat([linear(x[i : i + 1], w) for i in range(rows)])
        assert torch.equal(head_linear(x[:rows], w), alone)
    assert head.max_rows == 16
    assert head.tokens(x) == full_argmax(w, x)


def test_candidate_limit_grows_with_rows_and_stays_under_the_gather_bound():
    mc, cap = head_screen.max_candidates, head_screen.GATHER_MAX_BYTES
    assert [mc(r) for r in (1, 4, 5, 8, 16)] == [4096, 4096, 8192, 8192, 16384]
    assert mc(16, 1024 * 4) == cap // 4096 < 16384  # fp32 rows of 1,024: the byte bound
    head = HeadScreen(_weights(500, 64, torch.bfloat16))
    assert head.limit(16) == 16384 and head.limit(16) * 64 * 2 <= cap


def test_which_cpus_keep_the_head_on_the_gemv_kernel(monkeypatch):
    """head_gemv_max_rows: bf16 to 16 rows with AVX512-BF16 and no AMX (measured), else the
    GEMV's own 8 (AVX2: the kernel widens bf16, slower than the GEMM; AMX: its GEMM, unmeasured);
    fp32 rows the GEMV's 16 everywhere."""
    from qwen35 import devices
    from qwen35.layers.linear import head_gemv_max_rows, head_kernel_rows

    for flags, bf16 in [({"avx2", "avx512f", "avx512_bf16"}, 16), ({"avx2"}, 8),
                        ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, 8)]:  # fmt: skip
        monkeypatch.setattr(devices, "cpu_flags", lambda f=frozenset(flags): f)
        assert head_gemv_max_rows(torch.bfloat16) == bf16, flags
        assert head_gemv_max_rows(torch.float32) == 16
        # fp32 rows: also the 16-row chunks of bf16-stored weights (fp32 heads: the GEMM past 16)
        w32, w16 = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16)
        assert head_kernel_rows(torch.float32, w32) == 16, flags
        assert head_kernel_rows(torch.float32, w16) == 48
        assert head_kernel_rows(torch.bfloat16, w16) == bf16


def test_rows_past_16_screened_in_groups_one_undecided(monkeypatch):
    """fp32 rows past 16 (the full head's 16-row kernel chunks; bf16-stored head here, so on any
    CPU): screened 16 at a time; a group the screen leaves undecided gets its full logits from the
    same kernel call, the others stay screened: the full head's tokens and top-k logits; every
    group undecided: None (the caller's full head)."""
    w = _weights(3000, 96, torch.bfloat16, seed=13)
    head = HeadScreen(w, torch.float32)
    assert head.max_rows == 48
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(14))
    real = head.candidates
    seen = []

    def second_undecided(rows, ks):
        seen.append(len(rows))
        return None if len(seen) % 3 == 2 else real(rows, ks)

    monkeypatch.setattr(head, "candidates", second_undecided)
    assert head.tokens(x) == full_argmax(w, x)
    assert seen == [16, 16, 8]
    full = head_linear(x, w).float()
    ks = [1 + i % 7 for i in range(40)]
    got = head.logits(x, ks)
    assert torch.equal(got[16:32], full[16:32])  # the undecided group: whole rows
    _kept_exact(full[:16], got[:16], ks[:16])
    _kept_exact(full[32:], got[32:], ks[32:])
    monkeypatch.setattr(head, "candidates", lambda rows, ks: None)
    assert head.tokens(x) is None and head.logits(x, ks) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [64, 203])
def test_build_kernel_equals_reference(dtype, K):
    """small_ops_cpu.cpp quantize_head (one pass, at engine start) against the PyTorch ops it
    replaced: q and scale bit for bit; err / nq / tiny within their norms' rounding, and never
    below the reference where fp32 squares underflow (a row of 1e-30s: the reference's norms
    are 0, the kernel's double sums are not). Zero rows, denormals and a K past the vectors'
    width (203 = 25 x 8 + 3) included."""
    from qwen35.kernels import small_ops

    mod = small_ops.load()
    if mod is None:
        pytest.skip("small_ops_cpu.cpp did not build (no compiler / AVX2)")
    g = torch.Generator().manual_seed(4)
    w = (_weights(700, K, torch.float32, seed=3) * torch.rand(700, 1, generator=g) * 40).to(dtype)
    w[5] = 0
    w[6, ::2] = 1e-40 if dtype == torch.float32 else 0.0  # denormals (fp32)
    w[7] = 1e-30
    w[8, 0] = -3.0  # one large element: the rest round to zero
    got, want = mod.quantize_head(w), head_screen.quantize_head_reference(w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    normal = torch.ones(len(w), dtype=torch.bool)
    normal[7] = False
    # (atol: denormal products, which other tests' torch.set_flush_denormal may flush in the
    # reference, move tiny's ~1e-34 by up to 2^-126)
    for i, atol in ((2, 0.0), (3, 0.0), (4, 2.0**-120)):
        g, r = got[i], want[i]
        assert torch.allclose(g[normal], r[normal], rtol=1e-6, atol=atol), (g - r).abs().max()
        assert g[7] >= r[7]
    assert got[2][7] > 0  # the kernel's bound of the 1e-30 row is not 0


def test_screen_built_without_kernels_is_the_same(monkeypatch):
    """HeadScreen falls back to the reference build where small_ops does not load."""
    from qwen35.kernels import small_ops

    w = _weights(500, 64, torch.bfloat16)
    fast = HeadScreen(w)
    monkeypatch.setattr(small_ops, "load", lambda: None)
    slow = HeadScreen(w)
    assert torch.equal(fast.q, slow.q) and torch.equal(fast.scale, slow.scale)
    assert torch.allclose(fast.err, slow.err, rtol=1e-6, atol=0)
