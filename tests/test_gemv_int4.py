"""The int4 kernels (kernels/int4_cpu.cpp) against F.linear on the dequantised weight
(quant/matmul.py unpack_int4 + quant/formats.py dequantize_int4_groups), and int4_linear's
dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_modules import native_or_skip, rel_error, rows_alone_mismatches
from qwen35.kernels import gemv
from qwen35.quant import formats, matmul

# (N, K, group): N % 64 == 0 (torch's layout), K a multiple of the group; one group per row,
# groups of 32 / 64 / 128 / 256, several blocks
SHAPES = [(64, 64, 32), (128, 256, 64), (192, 384, 128), (64, 96, 32), (128, 128, 128),
          (64, 512, 256)]  # fmt: skip
ROWS = [1, 2, 3, 4, 5, 7, 8, 16]


@pytest.fixture(scope="module")
def mod():
    return native_or_skip(gemv.INT4, "the int4 kernel")


def _quantized(n, k, group, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, sz = formats.quantize_int4_groups(torch.randn(n, k, generator=g), group, dtype)
    return q, sz, matmul.pack_int4(q)


# fp32 rows against F.linear on the exact fp32 x: the AVX2 path quantises x to 16 bits per group
# (|x - x^| <= amax / 65024: ~1.5e-5 of randn's norm), the VBMI path none (fp32 rows never take it)
X16_TOL = 5e-5
# x8: x rounded to 8 bits per 32 inputs (|x - x^| <= amax / 254: ~0.5% of randn's norm)
X8_TOL = 1.2e-2


def _int16_x(mod, dtype, avx2_only: bool) -> bool:
    """This call takes the AVX2 path, which quantises x to 16 bits (fp32 rows always do)."""
    return avx2_only or dtype == torch.float32 or not mod.int4_fast_supported()


def _paths(mod):
    """(avx2_only, x8) to test: the AVX512 paths (VBMI + BF16; VNNI for x8) only where the CPU
    has them."""
    fast = [(False, False)] if mod.int4_fast_supported() else []
    vnni = [(False, True)] if mod.int4_vnni_supported() else []
    return fast + [(True, False)] + vnni + [(True, True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_int4_matches_reference(mod, dtype):
    for i, (n, k, group) in enumerate(SHAPES):
        q, sz, packed = _quantized(n, k, group, dtype, i)
        w = formats.dequantize_int4_groups(q, sz, group, torch.float32)
        for m in ROWS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
            ref = F.linear(x.float(), w)
            twin = formats.int4_linear_i16_reference(x, q, sz, group)
            twin8 = formats.int4_linear_i16_reference(x, q, sz, group, x8=True)
            for avx2_only, x8 in _paths(mod):
                y = mod.linear_int4(x, packed, sz, group, n, avx2_only, x8)
                assert y.dtype == dtype and y.shape == (m, n)
                tol = 4e-3 if dtype == torch.bfloat16 else X16_TOL  # bf16: the output's rounding
                assert rel_error(y, ref) < (X8_TOL if x8 else tol), (n, k, group, m, avx2_only, x8)
                if x8 or _int16_x(mod, dtype, avx2_only):  # its PyTorch twin: fp32 sum order
                    tol = 4e-3 if dtype == torch.bfloat16 else 5e-6
                    assert rel_error(y, twin8 if x8 else twin) < tol, (n, k, group, m, x8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_of_a_batch_equal_each_row_alone(mod, dtype):
    """Every input row's result is bitwise what it gets alone, whatever rows share the call, on
    each path (many outputs: an order that changes with the row count flips few bf16 ones)."""
    n, k, group = 8192, 1024, 128
    q, sz, packed = _quantized(n, k, group, dtype, 3)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(4)).to(dtype)
    for path in _paths(mod):
        got = rows_alone_mismatches(
            lambda r: mod.linear_int4(r, packed, sz, group, n, *path), x  # noqa: B023
        )
        assert all(v == 0 for v in got.values()), (path, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_x8_panel_rows_equal_each_row_alone(mod, dtype):
    """The AVX2 x8 path takes a call's rows 4 at a time against an unpacked panel of the block
    once an item of the call has 4 rows or more (kPanelMinRows; items of up to 128 rows, so the
    counts straddle both), block_i8 below: every row's result is the bits it gets alone (1 row:
    block_i8), partial last tiles of 1-3 rows included; and the same as the VNNI path's where the
    CPU has it."""
    counts = (3, 4, 5, 7, 17, 127, 128, 129, 262)
    for i, (n, k, group) in enumerate([*SHAPES[:4], (256, 1024, 128)]):
        _, sz, packed = _quantized(n, k, group, dtype, 40 + i)
        x = torch.randn(max(counts), k, generator=torch.Generator().manual_seed(i)).to(dtype) * 3
        alone = torch.cat([mod.linear_int4(r[None], packed, sz, group, n, True, True) for r in x])
        for m in counts:
            y = mod.linear_int4(x[:m], packed, sz, group, n, True, True)
            assert torch.equal(y, alone[:m]), (n, k, group, m, int((y != alone[:m]).sum()))
        if mod.int4_vnni_supported():
            assert torch.equal(mod.linear_int4(x, packed, sz, group, n, False, True), alone)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_x8_paths_agree_bit_for_bit(mod, dtype):
    """The AVX512-VNNI x8 path (vpdpbusd) and the AVX2 one (vpmaddubsw) give the same bits: both
    sum exactly in integers and take the same fp32 steps per x block and group."""
    if not mod.int4_vnni_supported():
        pytest.skip("this CPU has no AVX512-VNNI + VBMI: only the AVX2 x8 path runs here")
    for i, (n, k, group) in enumerate(SHAPES):
        _, sz, packed = _quantized(n, k, group, dtype, 30 + i)
        for m in ROWS:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype) * 3
            vnni = mod.linear_int4(x, packed, sz, group, n, False, True)
            assert torch.equal(vnni, mod.linear_int4(x, packed, sz, group, n, True, True)), (n, m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_int4_many_equals_one_call_each(mod, dtype):
    """linear_int4_many (several products of one shape in one parallel_for: a MoE layer's
    picked experts) gives each product bit for bit as linear_int4 does, rows 1 and 5, both
    paths, stacked in one output in order; mismatched inputs are refused with a message."""
    n, k, group = 192, 256, 64
    mats = [_quantized(n, k, group, dtype, 10 + i) for i in range(5)]
    for m in (1, 5):
        xs = [torch.randn(m, k, generator=torch.Generator().manual_seed(m + i)).to(dtype)
              for i in range(5)]  # fmt: skip
        for path in _paths(mod):
            got = mod.linear_int4_many(xs, [p for _, _, p in mats], [sz for _, sz, _ in mats],
                                       group, n, *path)  # fmt: skip
            assert got.shape == (5 * m, n) and got.dtype == dtype
            for x, (_, sz, packed), y in zip(xs, mats, got.split(m), strict=True):
                assert torch.equal(y, mod.linear_int4(x, packed, sz, group, n, *path))
    with pytest.raises(RuntimeError, match="one K and dtype"):
        mod.linear_int4_many([xs[0], xs[1][:, :128].contiguous()], [mats[0][2]] * 2,
                             [mats[0][1]] * 2, group, n)  # fmt: skip
    with pytest.raises(RuntimeError, match="as many"):
        mod.linear_int4_many(xs[:2], [mats[0][2]], [mats[0][1]] * 2, group, n)


def test_avx2_path_quantises_x_within_its_bound_and_keeps_non_finite_rows_apart(mod):
    """The AVX2 path's 16-bit x: within amax / 65024 of x per group (the PyTorch twin's
    quantize_rows_i16, zero groups exact); a row with an inf or a NaN comes out NaN without
    touching the other rows; groups above 2048 inputs (int32 sums) are refused."""
    n, k, group = 128, 256, 64
    q, sz, packed = _quantized(n, k, group, torch.float32, 5)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(6)) * 10
    x[3, :group] = 0
    x[0, group : 2 * group] *= 1e-37  # 32512 / amax overflows: the group counts as zeros
    xh = formats.quantize_rows_i16(x, group)
    amax = x.view(4, -1, group).abs().amax(-1, keepdim=True)
    err = (xh - x).view(4, -1, group).abs()
    within = (err <= amax / 65024 * (1 + 1e-6)).all(-1)  # [row, group]
    within[0, 1] = True  # (the tiny group: zeros, checked below)
    assert within.all()
    assert torch.equal(xh[3, :group], x[3, :group]) and not xh[0, group : 2 * group].any()
    ref = F.linear(x, formats.dequantize_int4_groups(q, sz, group, torch.float32))
    got = mod.linear_int4(x, packed, sz, group, n, True)
    assert rel_error(got, ref) < X16_TOL
    x[1, 70], x[2, 5] = float("inf"), float("nan")
    y = mod.linear_int4(x, packed, sz, group, n, True)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    for r in (0, 3):
        assert torch.equal(y[r], mod.linear_int4(x[r : r + 1], packed, sz, group, n, True)[0])
    big = _quantized(64, 4096, 4096, torch.float32, 7)
    with pytest.raises(RuntimeError, match="at most 2048"):
        mod.linear_int4(torch.randn(1, 4096), big[2], big[1], 4096, 64, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_x8_quantises_x_per_32_inputs_and_keeps_non_finite_rows_apart(mod, dtype):
    """x8 rounds x per block of 32 inputs (quantize_rows_i16 with qmax 127: within amax / 254 of
    x, amax the block's own, so one large input coarsens only its block); a row with an inf or a
    NaN comes out NaN on every x8 path without touching the other rows; groups that are not
    whole 32-input blocks are refused with x8 (int4_linear then keeps 16 bits: int4_x8)."""
    n, k, group = 128, 256, 64
    q, sz, packed = _quantized(n, k, group, dtype, 8)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(9))
    x[2, 40] = 1000.0  # an outlier: its block of 32 (32..63) gets a step of ~8, others not
    xh = formats.quantize_rows_i16(x, formats.INT4_X8_BLOCK, formats.INT4_X8_MAX)
    amax = x.view(4, -1, 32).abs().amax(-1, keepdim=True)
    assert ((xh - x).view(4, -1, 32).abs() <= amax / 254 * (1 + 1e-6)).all()
    assert torch.equal(xh[2, :32], formats.quantize_rows_i16(x[2:3, :32], 32, 127)[0])
    x = x.to(dtype)
    twin = formats.int4_linear_i16_reference(x, q, sz, group, x8=True)
    for avx2_only, x8 in _paths(mod):
        if x8:
            y = mod.linear_int4(x, packed, sz, group, n, avx2_only, True)
            assert rel_error(y, twin) < (4e-3 if dtype == torch.bfloat16 else 5e-6)
    x[1, 70], x[2, 5] = float("inf"), float("nan")
    for avx2_only, x8 in _paths(mod):
        if x8:
            y = mod.linear_int4(x, packed, sz, group, n, avx2_only, True)
            assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
            for r in (0, 3):
                alone = mod.linear_int4(x[r : r + 1], packed, sz, group, n, avx2_only, True)
                assert torch.equal(y[r], alone[0])
    q48, sz48, packed48 = _quantized(64, 96, 48, dtype, 10)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.linear_int4(x[:1, :96].contiguous(), packed48, sz48, 48, 64, False, True)
    xr = x[:1, :96].nan_to_num()  # int4_linear keeps such a layer at 16 bits
    w48 = formats.dequantize_int4_groups(q48, sz48, 48, torch.float32)
    got = matmul.int4_linear(xr, packed48, sz48, 48, 64, x8=True)
    tol = 4e-3 if dtype == torch.bfloat16 else X16_TOL
    assert rel_error(got, F.linear(xr.float(), w48)) < tol


def test_linear_int4_decodes_every_nibble_exactly(mod):
    """Scale 1 and zero 0: each input row picks one weight column, which must come out as
    exactly q - 8 for all 16 codes, in every row position of a 64-row block."""
    n, k = 128, 32
    q = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % 16  # [N, K], every code per row
    packed = matmul.pack_int4(q.to(torch.int32))
    sz = torch.stack([torch.ones(1, n), torch.zeros(1, n)], dim=-1).bfloat16()  # [1, N, 2]
    eye = torch.eye(k).bfloat16()
    for path in _paths(mod):
        for start in range(0, k, 16):
            y = mod.linear_int4(eye[start : start + 16], packed, sz, k, n, *path)
            assert torch.equal(y.float(), (q[:, start : start + 16].T - 8).float()), path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_x8_rounding_is_the_same_above_16_rows(mod, dtype):
    """`int4_x8_round` (what prefill's dequantise + GEMM multiplies with under x8) is the
    kernels' rounding (the twin's quantize_rows_i16(x, 32, 127); bf16: that, rounded to bf16;
    NaN rows stay NaN), and int4_linear with x8 gives a row the same result within fp32's
    summation order whether its call has 1 row or 40 (batched == alone across the 16-row limit)."""
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(11)) * 4
    x[3, 7] = float("nan")
    x = x.to(dtype)
    want = formats.quantize_rows_i16(x.float(), formats.INT4_X8_BLOCK, formats.INT4_X8_MAX)
    got = mod.int4_x8_round(x)
    assert got.dtype == dtype and torch.equal(got.isnan(), want.to(dtype).isnan())
    assert torch.equal(got.nan_to_num(), want.to(dtype).nan_to_num())
    n, k, group = 128, 256, 64
    _, sz, packed = _quantized(n, k, group, dtype, 12)
    x[3, 7] = 0
    many = matmul.int4_linear(x, packed, sz, group, n, x8=True)
    alone = torch.cat([matmul.int4_linear(x[i : i + 1], packed, sz, group, n, x8=True)
                       for i in range(40)])  # fmt: skip
    assert rel_error(many, alone) < (4e-3 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(RuntimeError, match="K % 32 == 0"):
        mod.int4_x8_round(x[:, :40].contiguous())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_dequant_matches_reference(mod, dtype):
    """The vector path (out = the transpose of a contiguous [K, N]) and the scalar one (out
    contiguous [N, K]) both equal PyTorch's dequantisation: bf16 bit for bit; fp32 within an
    ulp (the FMA rounds once where PyTorch rounds the product too)."""
    for i, (n, k, group) in enumerate(SHAPES):
        q, sz, packed = _quantized(n, k, group, dtype, 10 + i)
        ref = formats.dequantize_int4_groups(q, sz, group, dtype)
        kmajor = torch.empty(k, n, dtype=dtype).t()
        rows = torch.empty(n, k, dtype=dtype)
        mod.int4_dequant(packed, sz, group, kmajor)
        mod.int4_dequant(packed, sz, group, rows)
        atol = 0 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(kmajor, ref, rtol=0, atol=atol)
        torch.testing.assert_close(rows, ref, rtol=0, atol=atol)


def test_bad_inputs_are_refused(mod):
    q, sz, packed = _quantized(64, 128, 64, torch.bfloat16, 0)
    x = torch.randn(2, 128).bfloat16()
    with pytest.raises(RuntimeError, match="share a dtype"):
        mod.linear_int4(x.float(), packed, sz, 64, 64)
    with pytest.raises(RuntimeError, match="scales_and_zeros"):
        mod.linear_int4(x, packed, sz, 32, 64)  # sz has K/64 groups, not K/32
    with pytest.raises(RuntimeError, match="N % 64"):
        mod.linear_int4(x, packed[:, :], sz, 64, 32)
    with pytest.raises(RuntimeError, match="transpose of a contiguous"):
        mod.int4_dequant(packed, sz, 64, torch.empty(64, 256, dtype=torch.bfloat16)[:, ::2])


class _Spy:
    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def __getattr__(self, name):
        fn = getattr(self.mod, name)
        if name in ("int4_fast_supported", "int4_vnni_supported"):
            return fn
        return lambda *a, **k: self.calls.append(name) or fn(*a, **k)


@pytest.mark.parametrize("x8", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_dispatch(mod, monkeypatch, dtype, x8):
    """Up to INT4_MAX_ROWS rows take our kernel (x8, Int4Linear's default: always; 16-bit: bf16
    rows where the AVX512-VBMI path exists, else torch's kernel, fp32 rows on every CPU), more
    rows our K-major unpack + a GEMM (x8: on x rounded as the kernel rounds it; where
    int4_prefill_in_kernel says so, CPUs without AVX512 and AVX512-VNNI ones without AMX, x8
    keeps the kernel); with
    QWEN35_NO_KERNELS=1 everything runs torch's kernel, with the same results (x8: within its
    rounding of x)."""
    spy = _Spy(mod)
    monkeypatch.setattr(gemv, "load_int4", lambda: spy)
    n, k, group = 128, 256, 64
    _, sz, packed = _quantized(n, k, group, dtype, 20)
    g = torch.Generator().manual_seed(21)
    xs = {m: torch.randn(m, k, generator=g).to(dtype) for m in (1, matmul.INT4_MAX_ROWS, 17, 64)}
    ys = {m: matmul.int4_linear(x, packed, sz, group, n, x8) for m, x in xs.items()}
    ours = matmul.int4_rows_ours(mod, dtype, x8)
    assert ours == (x8 or dtype == torch.float32 or mod.int4_fast_supported()
                    or not matmul.torch_int4_layout())  # fmt: skip
    assert matmul.INT4_MAX_ROWS == 16  # the rows below straddle it
    above = ["int4_dequant", "int4_x8_round"] if x8 else ["int4_dequant"]  # x8: x rounded too
    if x8 and matmul.int4_prefill_in_kernel():  # the kernel at any rows
        above = ["linear_int4"]
    assert spy.calls == ["linear_int4"] * (2 * ours) + above * 2
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    monkeypatch.setattr(gemv, "load_int4", gemv.INT4.load)
    for m, x in xs.items():
        if matmul.torch_int4_layout():  # torch's kernel reads our layout here: it runs
            ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        else:  # (AVX2 CPUs: torch's layout differs) the PyTorch reference runs
            w = formats.dequantize_int4_groups(matmul.unpack_int4(packed, n, k), sz, group, dtype)
            ref = F.linear(x, w)
        assert rel_error(matmul.int4_linear(x, packed, sz, group, n, x8), ref) == 0
        tol = 4e-3 if dtype == torch.bfloat16 else X16_TOL
        assert rel_error(ys[m], ref) < (X8_TOL if x8 else tol), m
    x3 = xs[17].view(1, 17, k)  # leading dims are kept
    assert matmul.int4_linear(x3, packed, sz, group, n, x8).shape == (1, 17, n)


@pytest.mark.parametrize(
    "flags,vnni,want",
    [({"avx2"}, False, True),  # AVX2 CPUs (Zen 3): the kernel
     ({"avx2", "avx512f", "avx512_vnni"}, True, True),  # Zen 4 / 5: the VNNI kernel
     ({"avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_tile"}, True, False),  # SPR: AMX GEMM
     ({"avx2", "avx512f"}, False, False)],  # AVX512 without VNNI + VBMI: the GEMM
)  # fmt: skip
def test_which_cpus_prefill_int4_in_the_kernel(monkeypatch, flags, vnni, want):
    """int4_prefill_in_kernel: the kernel where it was measured faster than dequantising + the
    GEMM (bench/int4_prefill.py), the GEMM elsewhere."""
    from qwen35 import devices

    class Mod:
        def int4_vnni_supported(self):
            return vnni

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(gemv, "load_int4", lambda: Mod())
    assert matmul.int4_prefill_in_kernel() is want


@pytest.mark.parametrize("kernels", [True, False])
def test_groups_torch_cannot_take_run_ours_or_the_reference(mod, monkeypatch, kernels):
    """A CPU whose decode rows would take torch's int4 kernel (AVX512 without VBMI: Skylake,
    Cascade Lake; here by patching int4_rows_ours) with a layer in groups torch refuses (48:
    inputs no multiple of 32): our kernel runs it, or without kernels the PyTorch reference
    (torch's raised "expect qGroupSize to be 32, 64, 128 or 256")."""
    monkeypatch.setattr(matmul, "int4_rows_ours", lambda *a, **k: False)
    if not kernels:
        monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    q48, sz48, packed48 = _quantized(64, 96, 48, torch.bfloat16, 30)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(31)).bfloat16()
    got = matmul.int4_linear(x, packed48, sz48, 48, 64, x8=True)
    w48 = formats.dequantize_int4_groups(q48, sz48, 48, torch.float32)
    assert rel_error(got, F.linear(x.float(), w48)) < 4e-3
    if matmul.torch_int4_layout():  # torch's kernel still runs the groups it takes
        q, sz, packed = _quantized(64, 128, 64, torch.bfloat16, 32)
        x2 = torch.randn(3, 128, generator=torch.Generator().manual_seed(33)).bfloat16()
        ref = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, 64, sz)
        assert torch.equal(matmul.int4_linear(x2, packed, sz, 64, 64, x8=False), ref)


def test_long_inputs_in_the_kernel_equal_each_row_alone(mod):
    """Where long x8 inputs take the kernel (int4_prefill_in_kernel), a row's result is the
    same bits in a call of 1, 16, 17 or 300 rows: a prompt prefilled beside others gives what
    it gives alone."""
    if not matmul.int4_prefill_in_kernel():
        pytest.skip("this CPU prefills int4 by dequantising + its GEMM (int4_prefill_in_kernel)")
    n, k, group = 192, 384, 128
    for dtype in (torch.bfloat16, torch.float32):
        _, sz, packed = _quantized(n, k, group, dtype, 22)
        x = torch.randn(300, k, generator=torch.Generator().manual_seed(23)).to(dtype)
        y = matmul.int4_linear(x, packed, sz, group, n, True)
        for rows in (slice(0, 1), slice(5, 21), slice(40, 57), slice(299, 300)):
            assert torch.equal(matmul.int4_linear(x[rows], packed, sz, group, n, True), y[rows])


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_quantize_kernel_equals_pytorch_twin(mod, wdtype, sdtype):
    """int4_quantize (what loading with --quantization int4 runs) gives the bits of
    quantize_int4_groups + pack_int4: every byte and every scale / zero, for the three checkpoint
    dtypes, groups of 32-256 and odd group tails for the vector loop, groups of zeros (signed
    too: the 1e-12 floor of the scale), constant and tiny groups, rows of large magnitude."""
    g = torch.Generator().manual_seed(21)
    for n, k, group in SHAPES + [(64, 48, 24), (64, 60, 20), (128, 2048, 128)]:
        w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.1
        w[0, :group] = 0.0
        w[1, :group] = -0.0
        w[2] = 0.37  # constant groups
        w[3] *= 1e-30  # tiny
        w[4] *= 1e4
        w[5, ::3] = -w[5, ::3].abs()
        w = w.to(wdtype)
        q, sz = formats.quantize_int4_groups(w, group, sdtype)
        packed, sz2 = mod.int4_quantize(w, group, sdtype)
        assert torch.equal(packed, matmul.pack_int4(q)), (n, k, group)
        assert sz2.dtype == sdtype and torch.equal(sz2, sz), (n, k, group)
        got_p, got_sz = matmul.quantize_int4(w, group, sdtype)  # and through the dispatch
        assert torch.equal(got_p, packed) and torch.equal(got_sz, sz)
    with pytest.raises(RuntimeError, match="N % 64"):
        mod.int4_quantize(torch.zeros(63, 128), 128, torch.float32)
