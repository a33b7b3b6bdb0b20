"""The decode GEMV kernels (kernels/gemv_cpu.cpp) against F.linear on the same weights."""

from __future__ import annotations

import pytest
import torch

from kernel_modules import native_or_skip, rel_error, rows_alone_mismatches
from qwen35.kernels import gemv
from qwen35.layers import linear as linear_mod
from qwen35.quant import formats, matmul

SHAPES = [(7, 33), (13, 100), (64, 1024), (130, 200), (5, 129)]  # odd K: masked / scalar tails
ROWS = [1, 2, 3, 5, 16]


@pytest.fixture(scope="module")
def mod():
    return native_or_skip(gemv.GEMV, "the gemv kernel")


@pytest.mark.parametrize("avx2_only", [False, True])
def test_bf16_matches_reference(mod, avx2_only):
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).bfloat16()
        for m in [*ROWS, 8, 9, 13]:  # up to GEMV_MAX_ROWS and past it (two groups of 4 + rest)
            x = torch.randn(m, k, generator=g).bfloat16()
            ref = x.float() @ w.float().T
            y = mod.linear_bf16(x, w, avx2_only)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            assert rel_error(y, ref) < 4e-3, (n, k, m)  # bf16 rounding of the output only


@pytest.mark.parametrize("avx2_only", [False, True])
def test_many_products_equal_one_call_each(mod, avx2_only):
    """linear_bf16_many / linear_int8_many (several products of one shape in one parallel_for:
    a MoE layer's picked experts) give each product bit for bit as one call does, stacked in
    one output in order: 1-4 input rows, odd N and K, bf16 and fp32 int8 rows; a mismatch is
    refused with a message."""
    g = torch.Generator().manual_seed(7)
    for n, k in ((130, 200), (64, 1024), (5, 129)):
        ws = [torch.randn(n, k, generator=g).bfloat16() for _ in range(5)]
        xs = [torch.randn(1 + i % 4, k, generator=g).bfloat16() for i in range(5)]
        rows = [x.shape[0] for x in xs]
        got = mod.linear_bf16_many(xs, ws, avx2_only)
        assert got.shape == (sum(rows), n)
        for x, w, y in zip(xs, ws, got.split(rows), strict=True):
            assert torch.equal(y, mod.linear_bf16(x, w, avx2_only)), (n, k)
        for dtype in (torch.bfloat16, torch.float32):
            qs = [formats.quantize_int8_rows(w.float(), dtype) for w in ws]
            xd = [x.to(dtype) for x in xs]
            got = mod.linear_int8_many(xd, [q for q, _ in qs], [s for _, s in qs], avx2_only)
            assert got.shape == (sum(rows), n) and got.dtype == dtype
            for x, (q, sc), y in zip(xd, qs, got.split(rows), strict=True):
                assert torch.equal(y, mod.linear_int8(x, q, sc, avx2_only)), (n, k, dtype)
    with pytest.raises(RuntimeError, match="one shape"):
        mod.linear_bf16_many(xs[:2], [ws[0], ws[1][:3].contiguous()])
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        mod.linear_bf16_many([torch.zeros(5, k).bfloat16()], ws[:1])


@pytest.mark.parametrize("cvt", [False, True])
def test_fp8_many_products_equal_one_call_each(mod, cvt):
    """linear_fp8_many (a MoE layer's picked FP8 experts) gives each product bit for bit as
    linear_fp8 does, stacked in order, on both FP8 paths: 1-4 rows, partial last blocks; a scale
    of the wrong shape is refused with a message."""
    if not (mod.fp8_cvt_supported() if cvt else mod.fp8_supported(128)):
        pytest.skip("this CPU lacks the FP8 kernel's " + ("AVX512" if cvt else "VBMI + BF16") + " path")
    g = torch.Generator().manual_seed(11)
    n, k, bo, bi = 200, 320, 128, 128
    mats = [formats.quantize_fp8_blocks(torch.randn(n, k, generator=g), (bo, bi)) for _ in range(5)]
    xs = [torch.randn(1 + i % 4, k, generator=g).bfloat16() for i in range(5)]
    rows = [x.shape[0] for x in xs]
    got = mod.linear_fp8_many(xs, [w for w, _ in mats], [s.float() for _, s in mats], bo, bi, cvt)
    assert got.shape == (sum(rows), n) and got.dtype == torch.bfloat16
    for x, (w, s), y in zip(xs, mats, got.split(rows), strict=True):
        assert torch.equal(y, mod.linear_fp8(x, w, s.float(), bo, bi, cvt))
    with pytest.raises(RuntimeError, match="scale"):
        mod.linear_fp8_many(xs[:1], [mats[0][0]], [mats[0][1].float()[:1].contiguous()], bo, bi,
                            cvt)  # fmt: skip


@pytest.mark.parametrize("avx2_only", [False, True])
def test_fp32_matches_reference(mod, avx2_only):
    """Above 4 rows AVX512 CPUs take pairs of weight rows against groups of 8 input rows: odd N
    (a range's last row alone), K % 16 tails, 5-16 rows (groups of 8 + the rest); 67 x 1,024:
    past 16 KiB of rows, output rows in tiles (gemv_cpu.cpp tile_rows), the last one odd."""
    g = torch.Generator().manual_seed(4)
    for n, k in [*SHAPES, (67, 1024)]:
        w = torch.randn(n, k, generator=g)
        for m in [*ROWS, 8, 9, 13]:
            x = torch.randn(m, k, generator=g)
            y = mod.linear_fp32(x, w, avx2_only)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert rel_error(y, x.double() @ w.double().T) < 1e-6, (n, k, m)  # summation order only


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_matches_reference(mod, dtype, avx2_only):
    g = torch.Generator().manual_seed(1)
    for n, k in SHAPES:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g).to(dtype)
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(dtype)
            ref = x.float() @ (q.float() * s.float()[:, None]).T
            y = mod.linear_int8(x, q, s, avx2_only)
            assert y.dtype == dtype
            i16 = _int8_i16(mod, dtype, avx2_only)
            tol = 4e-3 if dtype == torch.bfloat16 else (X16_TOL if i16 else 1e-5)
            assert rel_error(y, ref) < tol, (n, k, m)
            if i16:  # its PyTorch twin (x rounded to 16 bits per group of 128): fp32 order only
                twin = formats.int8_linear_i16_reference(x, q, s)
                assert rel_error(y, twin) < (4e-3 if dtype == torch.bfloat16 else 5e-6), (n, k, m)


# fp32 rows on the int8 AVX2 path against F.linear on the exact x: x is rounded to 16 bits per
# group of 128 (|x - x^| <= amax / 65534: ~1.5e-5 of randn's norm)
X16_TOL = 5e-5


def _int8_i16(mod, dtype, avx2_only: bool) -> bool:
    """linear_int8 takes the AVX2 integer path (no AVX512, or avx2_only; bf16 rows on
    AVX512-VBMI + BF16 CPUs take the byte tables, fp32 rows on AVX512 CPUs the exact FMA)."""
    tables = not avx2_only and dtype == torch.bfloat16 and mod.fp8_supported(128)
    return not tables and (avx2_only or not mod.fp8_cvt_supported())


def test_int8_avx2_path_keeps_non_finite_rows_apart(mod):
    """A row with an inf or a NaN comes out NaN on the AVX2 integer path without touching the
    other rows; a group of values too small for 16-bit rounding (amax < ~1e-34) counts as
    zeros; a tail group shorter than 128 (K = 300) is quantised on its own."""
    g = torch.Generator().manual_seed(9)
    n, k = 70, 300
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g)
    x = torch.randn(4, k, generator=g)
    x[0, 128:256] *= 1e-37
    x[3, 256:] *= 1000  # the tail group: its own scale
    xh = formats.quantize_rows_i16(x, formats.INT8_X_GROUP, formats.INT8_X_MAX)
    assert not xh[0, 128:256].any()
    assert ((xh - x)[3, :256].abs() <= x[3, :256].abs().max() / 65534 * (1 + 1e-6)).all()
    x[1, 7], x[2, 299] = float("inf"), float("nan")
    y = mod.linear_int8(x, q, s, True)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    for r in (0, 3):
        assert torch.equal(y[r], mod.linear_int8(x[r : r + 1], q, s, True)[0])
    ref = x[[0, 3]] @ (q.float() * s[:, None]).T
    assert rel_error(y[[0, 3]], ref) < X16_TOL


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize("kind", ["bf16", "int8-bf16", "int8-fp32", "fp32"])
def test_rows_of_a_batch_equal_each_row_alone(mod, kind, avx2_only):
    """Every input row's result is bitwise what it gets alone, whatever rows share the call (a
    decode row's logits do not depend on the other sequences of its step). Many outputs (8,191:
    odd, a range's last row alone; K 1,103: every path's tail), since a summation order that
    changes with the row count flips only ~1 bf16 output in 10^4. fp32 above 4 rows takes the
    two-weight-row path, whose sums differ from the one-row path's: checked within each. 9 and
    16 rows of 1,103 inputs are past the size where the kernels take output rows in tiles
    (gemv_cpu.cpp tile_rows; the byte tables' converted rows: 16 rows), so the tiles and a range's
    partial last tile are checked too."""
    g = torch.Generator().manual_seed(5)
    N, K = 8191, 1103
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(16, K, generator=g)
    if kind == "bf16":
        wb = w.bfloat16()
        got = rows_alone_mismatches(lambda r: mod.linear_bf16(r, wb, avx2_only), x.bfloat16())
    elif kind == "fp32":
        lin = lambda r: mod.linear_fp32(r, w, avx2_only)  # noqa: E731
        many = lin(x)
        got = {**rows_alone_mismatches(lin, x, (2, 3, 4)),
               **{m: int((lin(x[:m]) != many[:m]).sum()) for m in (5, 8, 9)}}  # fmt: skip
    else:
        dtype = torch.bfloat16 if kind == "int8-bf16" else torch.float32
        q, sc = formats.quantize_int8_rows(w, dtype)
        got = rows_alone_mismatches(lambda r: mod.linear_int8(r, q, sc, avx2_only), x.to(dtype))
    assert all(v == 0 for v in got.values()), got


def test_int8_decodes_every_byte_exactly(mod):
    """The byte-table path (AVX512-VBMI + BF16 CPUs, bf16 rows) and the FMA path both give every
    int8 value exactly."""
    w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).repeat(3, 1)  # [3, 256]
    eye = torch.eye(256).bfloat16()
    for avx2_only in (False, True):
        for start in range(0, 256, 16):
            y = mod.linear_int8(eye[start : start + 16], w, torch.ones(3).bfloat16(), avx2_only)
            assert torch.equal(y[:, 0].float(), w[0, start : start + 16].float())


def _fp8_paths(mod) -> list[bool]:
    """linear_fp8's paths this CPU runs (cvt=False: byte tables; True: fp16 bits)."""
    paths = ([False] if mod.fp8_supported(128) else []) + ([True] if mod.fp8_cvt_supported() else [])
    if not paths:
        pytest.skip("linear_fp8 needs AVX512 (this CPU lacks it)")
    return paths


def test_fp8_decodes_every_byte_exactly(mod):
    codes = torch.arange(256, dtype=torch.uint8)
    codes[0x7F] = codes[0xFF] = 0  # the NaN bytes
    w = codes.view(torch.float8_e4m3fn).repeat(3, 1)  # [3, 256]
    eye = torch.eye(256).bfloat16()
    for cvt in _fp8_paths(mod):
        for start in range(0, 256, 16):  # each input row picks one weight column
            y = mod.linear_fp8(eye[start : start + 16], w, torch.ones(1, 2), 128, 128, cvt)
            assert torch.equal(y[:, 0].float(), w[0, start : start + 16].float())


def test_fp8_matches_reference(mod):
    g = torch.Generator().manual_seed(2)
    for cvt in _fp8_paths(mod):
        for n, k in [(130, 200), (256, 384), (1, 64), (5, 129), (300, 1000), (3, 33)]:
            q, s = formats.quantize_fp8_blocks(torch.randn(n, k, generator=g))
            s = s.float()
            for m in (1, 2, 3, 16):
                x = torch.randn(m, k, generator=g).bfloat16()
                ref = x.float() @ formats.dequantize_fp8_blocks(q, s, torch.float32).T
                y = mod.linear_fp8(x, q, s, 128, 128, cvt)
                assert rel_error(y, ref) < 4e-3, (n, k, m, cvt)
    if mod.fp8_cvt_supported():  # any input block size (96: not whole 64-byte chunks)
        q, s = formats.quantize_fp8_blocks(torch.randn(40, 200, generator=g), block=(32, 96))
        x = torch.randn(2, 200, generator=g).bfloat16()
        ref = x.float() @ formats.dequantize_fp8_blocks(q, s.float(), torch.float32, (32, 96)).T
        assert rel_error(mod.linear_fp8(x, q, s.float(), 32, 96, True), ref) < 4e-3
    assert not mod.fp8_supported(96)  # the byte tables' input blocks tile 64-byte chunks


def test_fp8_rows_of_a_batch_equal_each_row_alone(mod):
    """As int8: above 4 rows the table path converts two weight rows once and reuses them; every
    row's result is bitwise what it gets alone (blocks of 32 output rows: scales differ
    between the two weight rows of a pair at row 31 / 32)."""
    paths = _fp8_paths(mod)
    g = torch.Generator().manual_seed(6)
    for n, k in ((71, 200), (333, 1100)):  # 16 rows of 1,100: tiles of converted rows
        q, s = formats.quantize_fp8_blocks(torch.randn(n, k, generator=g), block=(32, 128))
        s = s.float()
        x = torch.randn(16, k, generator=g).bfloat16()
        for cvt in paths:
            y = mod.linear_fp8(x, q, s, 32, 128, cvt)
            for i in range(16):
                one = mod.linear_fp8(x[i : i + 1], q, s, 32, 128, cvt)[0]
                assert torch.equal(one, y[i]), (n, k, i, cvt)


def test_dispatch_takes_the_kernel_and_switches_off(mod, monkeypatch):
    """layers.linear and quant.matmul route decode rows to the kernel; QWEN35_NO_KERNELS=1
    falls back to torch with the same result."""
    calls = []
    real = gemv.load
    monkeypatch.setattr(gemv, "load", lambda: calls.append(1) or real())
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g).bfloat16()
    rows = linear_mod.GEMV_MAX_ROWS
    x = torch.randn(rows[torch.bfloat16], 64, generator=g).bfloat16()
    fast = linear_mod.linear(x, w)
    x32, w32 = torch.randn(rows[torch.float32], 64, generator=g), w.float()
    fast32 = linear_mod.linear(x32, w32)
    q, s = formats.quantize_int8_rows(w, torch.bfloat16)
    fast8 = matmul.int8_linear(x[:3], q, s)
    assert len(calls) == 3
    too_many = torch.randn(linear_mod.gemv_max_rows(x, w) + 1, 64, generator=g).bfloat16()
    linear_mod.linear(too_many, w)  # a GEMM: torch's, the kernel is not asked
    linear_mod.linear(torch.randn(rows[torch.float32] + 1, 64), w32)
    assert len(calls) == 3
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")  # load() now returns None: torch's paths
    assert rel_error(linear_mod.linear(x, w), fast) < 4e-3
    assert rel_error(linear_mod.linear(x32, w32), fast32) < 1e-6
    assert rel_error(matmul.int8_linear(x[:3], q, s), fast8) < 4e-3
    assert len(calls) == 6


def test_bf16_rows_past_8_take_the_tiles_where_they_beat_the_gemm(mod, monkeypatch):
    """bf16 rows 9-16 take the kernel (its register tiles) on AVX512-BF16 CPUs without AMX where
    a weight row has at most BF16_TILED_MAX_K inputs: each output row is then the row alone's,
    bit for bit; longer rows, and CPUs without the tiles (QWEN35_CPU_ISA=avx2), keep the GEMM."""
    from qwen35 import devices

    calls = []
    real = gemv.load
    monkeypatch.setattr(gemv, "load", lambda: calls.append(1) or real())
    g = torch.Generator().manual_seed(5)
    K = linear_mod.BF16_TILED_MAX_K
    w, w_long = (torch.randn(70, k, generator=g).bfloat16() for k in (K, K + 128))
    x = torch.randn(16, K + 128, generator=g).bfloat16()
    tiles = linear_mod.bf16_tiles()
    y = linear_mod.linear(x[:, :K], w)
    assert len(calls) == (1 if tiles else 0)
    alone = torch.cat([linear_mod.linear(x[i : i + 1, :K], w) for i in range(16)])
    if tiles:
        assert torch.equal(y, alone)
    assert rel_error(y, alone) < 4e-3
    calls.clear()
    linear_mod.linear(x, w_long)  # rows past BF16_TILED_MAX_K inputs: the GEMM
    assert calls == []
    devices.cpu_flags.cache_clear()
    monkeypatch.setenv("QWEN35_CPU_ISA", "avx2")
    try:
        assert not linear_mod.bf16_tiles()
        assert linear_mod.gemv_max_rows(x[:, :K], w) == linear_mod.GEMV_MAX_ROWS[torch.bfloat16]
    finally:
        monkeypatch.delenv("QWEN35_CPU_ISA")
        devices.cpu_flags.cache_clear()
