"""Our Triton kernels compiled ahead of time for an H100 / H200 (sm_90), no GPU needed.

Triton's interpreter (tests/test_triton_kernels.py on a CPU) runs the kernels as NumPy: it
ignores what only the compiler checks (tl.dot operand shapes and dtypes, power-of-two aranges,
layouts, constexpr use) and what only the hardware limits (shared memory per block, registers).
Here every kernel goes through Triton's whole pipeline to a cubin with ptxas for sm_90, at the
block sizes and dtypes the launchers choose for the real Qwen 3.5 shapes (head_dim 256, DeltaNet
dk = dv = 128, hidden sizes up to 8192, 128x128 FP8 blocks), and the shared memory each needs is
checked against the 227 KiB a Hopper block may use; the cubin's register spills (read with the
cuobjdump Triton ships) fail the test where the bf16 models launch the kernel. Some kernels are
also compiled for sm_80 (A100). bench/gpu_kernel_resources.py prints registers, spills and
occupancy of every compile here. Slow (~1 min): `pytest -m slow`, in an
environment with Triton (see tests/triton_interp.py), without TRITON_INTERPRET.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

triton = pytest.importorskip(
    "triton", reason="Triton is not installed (see tests/triton_interp.py)"
)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the kernels are interpreted in this process (unset TRITON_INTERPRET)",
                allow_module_level=True)  # fmt: skip

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.slow

SM90 = GPUTarget("cuda", 90, 32)
SM80 = GPUTarget("cuda", 80, 32)  # A100: no e4m3 in Triton before sm_89
SMEM_LIMIT = 227 * 1024  # the opt-in shared memory of one block on sm_90 (H100, H200)
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                 target: GPUTarget = SM90, spills_ok: bool = False, aligned: bool = False,
                 **options):  # fmt: skip
    """fn compiled for sm_90 (or `target`). signature: every argument's Triton type ('*bf16', 'i32', 'fp32';
    'constexpr' for those in constexprs), in order. Register spills fail the test unless
    `spills_ok` (known ones: fp32 variants that only test / reference models run, and the
    block-FP8 GEMM that runs where torch's blockwise `_scaled_mm` does not; listed by
    bench/gpu_kernel_resources.py). options: further compile options, as the launcher passes
    them (enable_fp_fusion). aligned: every pointer 16-byte aligned and every integer a multiple
    of 16, as Triton specialises a launch with such arguments (the catalog models' shapes):
    the loads vectorise, and registers are what those launches take."""
    assert list(signature) == fn.arg_names, (list(signature), fn.arg_names)
    for k in constexprs:
        signature[k] = "constexpr"
    attrs = None
    if aligned:
        attrs = {(j,): [["tt.divisibility", 16]] for j, (k, t) in enumerate(signature.items())
                 if t != "constexpr"}  # fmt: skip
    src = ASTSource(fn, signature, constexprs, attrs)
    k = triton.compile(src, target=target,
                       options={"num_warps": num_warps, "num_stages": num_stages, **options})
    assert k.asm.get("cubin"), f"{fn.__name__}: no cubin"  # ptxas ran
    assert k.metadata.shared <= SMEM_LIMIT, f"{fn.__name__}: {k.metadata.shared} B shared memory"
    use = resources(k)
    REPORT.append((fn.__name__, target.arch, num_warps, dict(constexprs), use))
    # a register spill goes to local memory (slow, and it hides in the code): none where we launch
    if CHECK_SPILLS and not spills_ok:
        assert use["stack"] == 0 and use["local"] == 0, f"{fn.__name__} {constexprs}: spills {use}"
    return k


REPORT: list = []  # every compile of this session: bench/gpu_kernel_resources.py prints it
CHECK_SPILLS = True  # (the report lists them instead)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(k) -> dict:
    """Registers per thread, stack and local (spill) bytes, static shared memory of a compiled
    kernel, read from its cubin by the cuobjdump that ships with Triton (no GPU needed); the
    shared memory Triton allocates dynamically is k.metadata.shared; `loads_in_flight` from its
    SASS."""
    import re
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert m, out[-500:]
    regs, stack, _, local = (int(x) for x in m.groups())
    return dict(regs=regs, stack=stack, local=local, shared=k.metadata.shared,
                loads_in_flight=loads_in_flight(sass))  # fmt: skip


def loads_in_flight(sass: str) -> int:
    """The most global loads (LDG) a thread has issued and not yet waited for, at any point of
    the SASS in program order (loops counted once): how much memory latency the kernel can hide.
    Each sm_70+ instruction's control bits (bits 105-125 of its 128: stall, yield, the
    scoreboard it sets when done, the one for its reads, the scoreboards it waits on) are
    decoded from cuobjdump's hex; a load adds to the scoreboard it sets, a wait clears it."""
    import re

    pending, peak = [0] * 6, 0
    lines = sass.splitlines()
    for a, b in zip(lines, lines[1:], strict=False):
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?);\s+/\* 0x[0-9a-f]{16} \*/", a)
        m2 = re.match(r"\s+/\* (0x[0-9a-f]{16}) \*/", b)
        if not (m and m2):
            continue
        ctrl = int(m2.group(1), 16) >> 41
        write_sb, wait_mask = (ctrl >> 5) & 7, (ctrl >> 11) & 0x3F
        for sb in range(6):
            if wait_mask >> sb & 1:
                pending[sb] = 0
        op = m.group(1).split()
        op = op[1] if op[0].startswith("@") else op[0]
        if op.startswith("LDG") and write_sb < 6:
            pending[write_sb] += 1
        peak = max(peak, sum(pending))
    return peak


def _ptr(dtype) -> str:
    return "*" + TY[dtype]


@pytest.mark.parametrize("dtype,kv", [(torch.bfloat16, None), (torch.float32, None),
                                      (torch.bfloat16, "*fp8e4nv")])  # fmt: skip
@pytest.mark.parametrize("hd,rep,bs", [(256, 8, 16), (256, 4, 32), (128, 1, 16), (32, 2, 16)])
def test_paged_attention_compiles(dtype, kv, hd, rep, bs):
    """kv: fp8 (e4m3) caches under a bf16 model (--kv-cache-dtype fp8), widened as read."""
    from qwen35.kernels import triton_attention as ta

    p, i = _ptr(dtype), "i32"
    c = kv or p
    ieee = dtype == torch.float32
    for splits in (1, ta.MAX_SPLITS):  # one pass, or split-K with partials in fp32
        sig = dict(Q=p, K=c, V=c, O=p, G=p, PART="*fp32" if splits > 1 else p,
                   block_tables="*i32", context_lens="*i32", scale="fp32")  # fmt: skip
        sig |= {n: i for n in ta._decode_kernel.arg_names if n.startswith("stride")}
        sig |= dict(SPLITS=i, BS=0, REP=0, BLOCK_R=0, HD=0, BLOCK_T=0, HAS_GATE=0, IEEE=0,
                    UPCAST=0, SPLIT=0, SPLIT_TOKENS=0, MAX_S=0)  # fmt: skip
        compile_sm90(ta._decode_kernel, sig, dict(
            BS=bs, REP=rep, BLOCK_R=max(16, triton.next_power_of_2(rep)), HD=hd,
            BLOCK_T=ta.BLOCK_T, HAS_GATE=True, IEEE=ieee, UPCAST=False, SPLIT=splits > 1,
            SPLIT_TOKENS=ta.SPLIT_TOKENS, MAX_S=ta.MAX_SPLITS,
        ), spills_ok=ieee)  # fmt: skip
    sig = dict(PART="*fp32", O=p, G=p, context_lens="*i32", stride_on=i, stride_oh=i,
               stride_gn=i, stride_gh=i, NH=i, SPLITS=i, HD=0, HAS_GATE=0, SPLIT_TOKENS=0,
               MAX_S=0, BLOCK_T=0)  # fmt: skip
    compile_sm90(ta._combine_kernel, sig, dict(HD=hd, HAS_GATE=True,
                 SPLIT_TOKENS=ta.SPLIT_TOKENS, MAX_S=ta.MAX_SPLITS, BLOCK_T=ta.BLOCK_T))  # fmt: skip
    sig = dict(Q=p, K=c, V=c, O=p, block_table="*i32", start_pos=i, Tq=i, scale="fp32")
    sig |= {n: i for n in ta._prefill_kernel.arg_names if n.startswith("stride")}
    sig |= dict(BS=0, REP=0, HD=0, BLOCK_M=0, BLOCK_T=0, IEEE=0, UPCAST=0)
    for block_m in (16, 32):
        warps = ta.prefill_warps(block_m, torch.float8_e4m3fn if kv else dtype)
        compile_sm90(ta._prefill_kernel, dict(sig), dict(
            BS=bs, REP=rep, HD=hd, BLOCK_M=block_m, BLOCK_T=ta.BLOCK_T, IEEE=ieee, UPCAST=False,
        ), num_warps=warps, spills_ok=ieee)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_and_pointwise_kernels_compile(dtype):
    from qwen35.kernels import triton_norms as tn
    from qwen35.kernels import triton_pointwise as tp

    p = _ptr(dtype)
    for D in (128, 256, 1024, 2048, 4096, 5120, 8192):  # head dims, dv, hidden sizes
        B = triton.next_power_of_2(D)
        w = tn._warps(B)  # as the launchers pass it: a row's values spread over the warps
        k = compile_sm90(tn._rms_zc_kernel, dict(X=p, W=p, Y=p, D="i32", eps="fp32", BLOCK=0),
                         dict(BLOCK=B), num_warps=w, **tp.NO_FMA)  # fmt: skip (as launched)
        assert_rounds_like_torch(k)
        compile_sm90(tn._add_rms_zc_kernel, dict(H=p, X=p, W=p, Y=p, stride_h="i32",
                     stride_x="i32", D="i32", eps="fp32", BLOCK=0), dict(BLOCK=B),
                     num_warps=w)  # fmt: skip
        compile_sm90(tn._gated_rms_kernel, dict(X=p, Z=p, W=p, Y=p, stride_zt="i32", NH="i32",
                     D="i32", eps="fp32", BLOCK=0), dict(BLOCK=B), num_warps=w)  # fmt: skip
        for *_, use in REPORT[-3:]:  # 4 warps at 8,192 took 255 registers a thread
            assert use["regs"] <= 128, (D, use)
    for half in (32, 64):  # rotary_dim 64 (head_dim 256 x 0.25) and 128
        sig = dict(Q=p, K=p, COS=p, SIN=p, stride_qt="i32", stride_qh="i32", stride_kt="i32",
                   stride_kh="i32", stride_ct="i32", NH="i32", HALF=0, BLOCK=0)  # fmt: skip
        k = compile_sm90(tp._rotary_kernel, sig, dict(HALF=half, BLOCK=max(16, half)),
                         **tp.NO_FMA)  # fmt: skip
        assert_rounds_like_torch(k)
    compile_sm90(tp._silu_mul_kernel, dict(G=p, U=p, O=p, stride_g="i32", stride_u="i32",
                 stride_o="i32", N="i32", BLOCK=0), dict(BLOCK=1024))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deltanet_decode_kernels_compile(dtype):
    from qwen35.kernels import triton_deltanet as tdn

    p = _ptr(dtype)
    sig = dict(X=p, stride_xn="i32", W=p, stride_wc="i32", CS=p, stride_cs_slot="i32",
               stride_cs_c="i32", SLOTS="*i64", U=p, stride_un="i32", C="i32", K=0,
               BLOCK_C=0)  # fmt: skip
    compile_sm90(tdn._conv_update_kernel, sig, dict(K=4, BLOCK_C=256))
    for (dk, dv), raw, st in itertools.product(((128, 128), (64, 64), (16, 16)), (False, True),
                                               ("*fp32", "*bf16")):  # fmt: skip
        # Qwen 3.5's head dims and the tests' tiny model; gates given (a, b raw) or computed;
        # fp32 or bf16 states (--mamba-ssm-cache-dtype bf16)
        sig = dict(U=p, stride_un="i32", G=p if raw else "*fp32", stride_gn="i32", B=p,
                   stride_bn="i32", DT=p, ALOG=p, S=st, stride_s_slot="i32", SLOTS="*i64",
                   O=p if raw else "*fp32", stride_on="i32", scale="fp32", R=0, KD=0, DK=0,
                   DV=0, BV=0, RAW_GATES=0)  # fmt: skip
        compile_sm90(tdn._recurrent_kernel, sig, dict(
            R=2, KD=16 * dk, DK=dk, DV=dv, BV=min(32, triton.next_power_of_2(dv)),
            RAW_GATES=raw,
        ))  # fmt: skip


@pytest.mark.parametrize("bo", [128, 1])  # 128 x 128 blocks; one scale a row (bn rows a tile)
@pytest.mark.parametrize("M", [1, 16, 17, 64, 4096])
def test_fp8_block_kernel_compiles(M, bo):
    from qwen35.quant import fp8_gpu

    kern = fp8_gpu._triton_kernel()
    fn = kern.kernel
    sig = dict(A="*fp8e4nv", B="*fp8e4nv", C="*bf16", As="*fp32", Bs="*fp32", M="i32", N="i32",
               K="i32", s_am="i32", s_bn="i32", s_cm="i32", s_asm="i32", s_bsn="i32",
               BLOCK_N=0, BLOCK_K=0, BM=0, BLOCK_O=0)  # fmt: skip
    bn = bo if bo >= 16 else fp8_gpu.ROW_SCALE_BLOCK_N
    compile_sm90(fn, sig, dict(BLOCK_N=bn, BLOCK_K=128, BM=fp8_gpu.block_m(M), BLOCK_O=bo),
                 spills_ok=True)  # fmt: skip


@pytest.mark.parametrize("bk", [128, 32])  # (32: a 4-bit checkpoint's groups held in FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_gemv_kernel_compiles(dtype, bk):
    """The decode-sized weight-only FP8 kernel: bf16 tensor-core dots on upcast e4m3, or IEEE
    fp32 ones for fp32 models; chunks of a scale block's 128 or 32 inputs."""
    from qwen35.quant import fp8_gpu

    p, i = _ptr(dtype), "i32"
    sig = dict(X=p, W="*u8", S="*fp32", Y=p, M=i, N=i, K=i, s_xm=i, s_wn=i, s_ym=i, s_sn=i,
               BM=0, BN=0, BK=0, BLOCK_O=0, IEEE=0, UPCAST=0)  # fmt: skip
    const = dict(BM=16, BN=64, BK=bk, BLOCK_O=128 if bk == 128 else 1,
                 IEEE=dtype == torch.float32, UPCAST=False)  # fmt: skip
    fp32 = dtype == torch.float32  # (spills: fp32 models are tests and references)
    compile_sm90(fp8_gpu._gemv_kernel().kernel, dict(sig), const, spills_ok=fp32)
    compile_sm90(fp8_gpu._gemv_kernel().kernel, sig, const, target=SM80, spills_ok=fp32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_kernels_compile(dtype):
    """The Triton MoE block (kernels/triton_moe.py) at the catalog's expert counts and top-k
    (256 x 8 for 35B-A3B / 122B-A10B, 512 x 10 for 397B-A17B)."""
    from qwen35.kernels import triton_moe as tm

    p, i = _ptr(dtype), "i32"
    for E, k in ((256, 8), (512, 10)):
        sig = dict(L=p, stride_lt=i, IDX="*i64", TW=p, E=i, K_TOP=0, BE=0)
        compile_sm90(tm._router_kernel, sig, dict(K_TOP=k, BE=E))
    for fp8 in (False, True):  # plain experts in the model dtype, or e4m3 with block scales
        w = "*u8" if fp8 else p  # (e4m3 read as bytes: kernels/triton_fp8.py)
        sig = dict(X=p, stride_xt=i, IDX="*i64", W=w, stride_we=i, stride_wn=i, WS="*fp32",
                   stride_wse=i, stride_wsr=i, HBUF=p, stride_hp=i, I=i, NBH=i, H=0, K_TOP=0,
                   FP8=0, BO=0, BN=0, BK=0)  # fmt: skip
        # (H, I, top-k) of 35B-A3B, 122B-A10B, 397B-A17B: shapes are constexprs (loops unrolled)
        for H, I, k in ((2048, 512, 8), (3072, 1024, 8), (4096, 1024, 10)):
            for target in (SM90, SM80):  # bytes: the FP8 experts build for an A100 too
                compile_sm90(tm._gate_up_kernel, dict(sig), dict(H=H, K_TOP=k, FP8=fp8,
                             BO=tm.FP8_BLOCK, BN=tm.BN, BK=tm.BK), target=target,
                             aligned=True)  # fmt: skip
            for shared, logit in ((True, True), (True, False), (False, False)):
                sig_d = dict(HBUF=p, stride_hp=i, IDX="*i64", TW=p, D=w, stride_de=i,
                             stride_dn=i, DS="*fp32", stride_dse=i, stride_dsr=i, X=p,
                             stride_xt=i, SGW=p, stride_sgw=i, SG=p, stride_sg=i, SU=p,
                             stride_su=i, SD=w, stride_sdn=i, SDS="*fp32", stride_sdsr=i, Y=p,
                             stride_yt=i, H=0, I=0, IS=0, K_TOP=0, KP=0, FP8=0, HAS_SHARED=0,
                             SD_FP8=0, GATE_LOGIT=0, UNROLL=0, BO=0, BN=0, BK=0)  # fmt: skip
                const = dict(H=H, I=I, IS=I if shared else 0, K_TOP=k,
                             KP=triton.next_power_of_2(k), FP8=fp8, HAS_SHARED=shared,
                             SD_FP8=fp8, GATE_LOGIT=logit,
                             UNROLL=triton.next_power_of_2(k) * I <= tm.UNROLL_MAX,
                             BO=tm.FP8_BLOCK, BN=tm.BN, BK=tm.BK)
                for target in (SM90, SM80):
                    compile_sm90(tm._down_kernel, dict(sig_d), dict(const), target=target,
                                 aligned=True)
        # strides that are not multiples of 16 (the tests' odd sizes): builds; scalar loads
        compile_sm90(tm._gate_up_kernel, dict(sig), dict(H=80, K_TOP=3, FP8=fp8, BO=tm.FP8_BLOCK,
                     BN=tm.BN, BK=tm.BK), spills_ok=True)  # fmt: skip
        compile_sm90(tm._down_kernel, dict(sig_d), dict(const, H=80, I=40, IS=24, K_TOP=3, KP=4),
                     spills_ok=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_norm_rotary_cache_compiles(dtype):
    """Qwen 3.5's attention heads: head_dim 256, rotary_dim 64 (the tests' tiny: 32 and 8)."""
    from qwen35.kernels import triton_pointwise as tp

    p, i = _ptr(dtype), "i32"
    for hd, rd in ((256, 64), (32, 8)):
        sig = dict(QG=p, K=p, V=p, QW=p, KW=p, COS=p, SIN=p, QO=p, KC=p, VC=p, SLOTS="*i64",
                   stride_qgt=i, stride_kt=i, stride_vt=i, stride_ct=i, stride_qot=i,
                   stride_cslot=i, NH=i, eps="fp32", HD=0, BLOCK_HD=0, HALF=0, BLOCK_HALF=0,
                   BLOCK_PASS=0)  # fmt: skip
        k = compile_sm90(tp._qk_norm_rotary_cache_kernel, sig, dict(
            HD=hd, BLOCK_HD=hd, HALF=rd // 2, BLOCK_HALF=max(16, rd // 2),
            BLOCK_PASS=triton.next_power_of_2(hd - rd),
        ), **tp.NO_FMA)  # fmt: skip
        assert_rounds_like_torch(k)


def assert_rounds_like_torch(k):
    """No fused multiply-add in the PTX: each product rounded before its sum, as torch's
    separate ops round (with fusion on, the rotary's bf16 product and sum became one
    fma.rn.bf16 and differed from torch by an ulp on an H200)."""
    import re

    fmas = re.findall(r"\bfma\.\S+", k.asm["ptx"])
    assert not fmas, f"{k.name}: {sorted(set(fmas))}"


@pytest.mark.parametrize("bk", [128, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_grouped_gemm_compiles(dtype, bk):
    """FP8 experts' grouped GEMM over a step's pairs sorted by expert (kernels/triton_fp8.py
    `fp8_grouped_gemm`): e4m3 bytes upcast for bf16 tensor-core dots (IEEE fp32 for fp32
    models), the tile sizes gemm_bm gives with their warps, sm_90 and sm_80 (bytes: it builds on
    A100s), gate_up gathering token rows and down scattering to pair order."""
    from qwen35.kernels import triton_fp8
    from qwen35.kernels.triton_tiles import gemm_warps

    p, i = _ptr(dtype), "i32"
    sig = dict(X=p, s_xm=i, XIDX="*i64", W="*u8", s_we=i, S="*fp32", s_se=i, s_sr=i, Y=p,
               s_ym=i, YIDX="*i64", TILES="*i32", N=i, K=i, HALF=i, NBH=i, BLOCK_O=i, BM=0,
               BN=0, BK=0, KS=0, GATHER=0, SCATTER=0, IEEE=0, UPCAST=0)  # fmt: skip
    fp32 = dtype == torch.float32  # (spills: fp32 models are tests and references)
    for bm, target, gather in itertools.product((16, 32, 64), (SM90, SM80), (True, False)):
        const = dict(BM=bm, BN=triton_fp8.GEMM_BN, BK=bk, KS=min(bk, 64), GATHER=gather,
                     SCATTER=not gather,
                     IEEE=fp32, UPCAST=False)  # fmt: skip
        compile_sm90(triton_fp8.fp8_grouped_gemm.kernel, dict(sig), const, target=target,
                     spills_ok=fp32, num_warps=gemm_warps(bm))  # fmt: skip


def test_fp8_block_gemm_does_not_build_before_sm89_and_says_so():
    """Triton has e4m3 only from sm_89 on: for an A100 (sm_80) the block-FP8 GEMM (e4m3
    tensor-core dots) fails to compile. That failure must be one kernels/unavailable.py
    recognises (quant/fp8_gpu.py then dequantises + a BF16 GEMM instead); the weight-only
    kernels read e4m3 as bytes and build there (above)."""
    from qwen35.kernels.unavailable import is_build_error
    from qwen35.quant import fp8_gpu

    sig = dict(A="*fp8e4nv", B="*fp8e4nv", C="*bf16", As="*fp32", Bs="*fp32", M="i32", N="i32",
               K="i32", s_am="i32", s_bn="i32", s_cm="i32", s_asm="i32", s_bsn="i32",
               BLOCK_N=0, BLOCK_K=0, BM=0, BLOCK_O=0)  # fmt: skip
    const = dict(BLOCK_N=128, BLOCK_K=128, BM=64, BLOCK_O=128)
    compile_sm90(fp8_gpu._triton_kernel().kernel, dict(sig), const, spills_ok=True)  # Hopper
    with pytest.raises(Exception) as err:
        compile_sm90(fp8_gpu._triton_kernel().kernel, sig, const, target=SM80)
    assert is_build_error(err.value), repr(err.value)[:500]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_kernels_compile(dtype):
    """kernels/triton_int.py: the int4 / int6 / int8 GEMVs (bf16 tensor-core dots on the codes,
    or IEEE fp32 ones), the int4 dequantisation, the int4 MoE pairs kernel, at the groups the
    loader makes (32 / 64 / 128 inputs), for sm_90 and sm_80 (no e4m3 here: they build on A100s)."""
    from qwen35.kernels import triton_int as ti

    p, i = _ptr(dtype), "i32"
    fp32 = dtype == torch.float32  # (spills: fp32 models are tests and references)
    flags = dict(IEEE=fp32, UPCAST=False)
    for group, target in itertools.product((32, 64, 128), (SM90, SM80)):
        sig = dict(X=p, W="*u8", SZ=p, P=p, M=i, N=i, K=i, s_xm=i, s_pz=i, s_pm=i, CHUNKS=i,
                   BM=0, GROUP=0, IEEE=0, UPCAST=0)  # fmt: skip
        compile_sm90(ti.int4_gemv.kernel, sig, dict(BM=16, GROUP=group, **flags), target=target,
                     spills_ok=fp32)  # fmt: skip
        sig = dict(W="*u8", SZ=p, OUT=p, N=i, K=i, s_on=i, s_we=i, s_se=i, s_oe=i, GROUP=0)
        compile_sm90(ti.int4_dequant.kernel, sig, dict(GROUP=group), target=target)
        sig = dict(X=p, s_xm=i, XDIV=i, IDX="*i64", W="*u8", s_we=i, SZ=p, s_se=i, Y=p, s_yz=i,
                   s_ym=i, N=i, K=i, CHUNKS=i, GROUP=0)  # fmt: skip
        compile_sm90(ti.int4_pairs.kernel, sig, dict(GROUP=group), target=target)
    for target in (SM90, SM80):
        compile_sm90(ti._reduce.kernel, dict(P="*fp32", Y=p, PARTS=i, NUMEL=i, BLOCK=0),
                     dict(BLOCK=ti.SUM_BLOCK), target=target)  # fmt: skip
    sig = dict(X=p, s_xm=i, XDIV=i, IDX="*i64", W="*i8", s_we=i, S=p, s_se=i, Y=p, s_ym=i, N=i,
               K=i, BN=0, BK=0)  # fmt: skip
    for target in (SM90, SM80):
        compile_sm90(ti.expert_pairs.int8_kernel, dict(sig), dict(BN=ti.PAIRS_BN, BK=ti.PAIRS_BK),
                     target=target)  # fmt: skip
    for target in (SM90, SM80):
        sig = dict(X=p, W="*u8", S="*bf16", P=p, M=i, N=i, K=i, s_xm=i, s_wn=i, s_sn=i, s_pz=i,
                   s_pm=i, CHUNKS=i, BM=0, BN=0, IEEE=0, UPCAST=0)  # fmt: skip
        compile_sm90(ti.int6_gemv.kernel, sig, dict(BM=16, BN=ti.BN, **flags), target=target,
                     spills_ok=fp32)  # fmt: skip
        sig = dict(X=p, W="*i8", S=p, P=p, M=i, N=i, K=i, s_xm=i, s_wn=i, s_pz=i, s_pm=i,
                   CHUNKS=i, BM=0, BN=0, BK=0, IEEE=0, UPCAST=0)  # fmt: skip
        compile_sm90(ti.int8_gemv.kernel, sig, dict(BM=16, BN=ti.BN, BK=128, **flags),
                     target=target, spills_ok=fp32)  # fmt: skip
    from qwen35.kernels.triton_tiles import gemm_warps

    # the int4 / int8 GEMMs (dense rows past the GEMVs; a MoE step's pairs sorted by expert,
    # read through XIDX and written through YIDX) at every tile size gemm_bm gives
    sig = dict(X=p, s_xm=i, XIDX="*i64", W="*u8", s_we=i, SZ=p, s_se=i, Y=p, s_ym=i,
               YIDX="*i64", TILES="*i32", M=i, N=i, K=i, BM=0, GROUP=0, GROUPED=0, GATHER=0,
               SCATTER=0, IEEE=0, UPCAST=0)  # fmt: skip
    for bm, group, target in itertools.product((16, 32, 64), (32, 128), (SM90, SM80)):
        for grouped in (False, True):
            compile_sm90(ti.int_gemm.int4_kernel, dict(sig),
                         dict(BM=bm, GROUP=group, GROUPED=grouped, GATHER=grouped,
                              SCATTER=grouped, **flags),
                         target=target, spills_ok=fp32, num_warps=gemm_warps(bm))  # fmt: skip
    sig8 = {**sig, "W": "*i8", "S": p, "BN": 0, "BK": 0}
    sig8 = {k: sig8[k] for k in ti.int_gemm.int8_kernel.arg_names}
    for bm, target in itertools.product((16, 32, 64), (SM90, SM80)):
        compile_sm90(ti.int_gemm.int8_kernel, dict(sig8),
                     dict(BM=bm, BN=ti.GEMM_BN, BK=ti.GEMM_BK, GROUPED=True, GATHER=True,
                          SCATTER=True, **flags),
                     target=target, spills_ok=fp32, num_warps=gemm_warps(bm))  # fmt: skip
