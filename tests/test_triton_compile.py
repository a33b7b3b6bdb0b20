"""Our Triton kernels compiled ahead of time for an H100 / H200 (sm_90), no GPU needed.

Triton's interpreter (tests/test_triton_kernels.py on a CPU) runs the kernels as NumPy: it
ignores what only the compiler checks (tl.dot operand shapes and dtypes, power-of-two aranges,
layouts, constexpr use) and what only the hardware limits (shared memory per block, registers).
Here every kernel goes through Triton's whole pipeline to a cubin with ptxas for sm_90, at the
block sizes and dtypes the launchers choose for the real Qwen 3.5 shapes (head_dim 256, DeltaNet
dk = dv = 128, hidden sizes up to 8192, 128x128 FP8 blocks), and the shared memory each needs is
checked against the 227 KiB a Hopper block may use. Slow (~1 min): `pytest -m slow`, in an
environment with Triton (see tests/triton_interp.py), without TRITON_INTERPRET.
"""

from __future__ import annotations

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
SMEM_LIMIT = 227 * 1024  # the opt-in shared memory of one block on sm_90 (H100, H200)
TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """fn compiled for sm_90. signature: every argument's Triton type ('*bf16', 'i32', 'fp32';
    'constexpr' for those in constexprs), in order."""
    assert list(signature) == fn.arg_names, (list(signature), fn.arg_names)
    for k in constexprs:
        signature[k] = "constexpr"
    src = ASTSource(fn, signature, constexprs)
    k = triton.compile(src, target=SM90, options={"num_warps": num_warps, "num_stages": num_stages})
    assert k.asm.get("cubin"), f"{fn.__name__}: no cubin"  # ptxas ran
    assert k.metadata.shared <= SMEM_LIMIT, f"{fn.__name__}: {k.metadata.shared} B shared memory"
    return k


def _ptr(dtype) -> str:
    return "*" + TY[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd,rep,bs", [(256, 8, 16), (256, 4, 32), (128, 1, 16), (32, 2, 16)])
def test_paged_attention_compiles(dtype, hd, rep, bs):
    from qwen35.kernels import triton_attention as ta

    p, i = _ptr(dtype), "i32"
    ieee = dtype == torch.float32
    sig = dict(Q=p, K=p, V=p, O=p, G=p, block_tables="*i32", context_lens="*i32", scale="fp32")
    sig |= {n: i for n in ta._decode_kernel.arg_names if n.startswith("stride")}
    sig |= dict(BS=0, REP=0, BLOCK_R=0, HD=0, BLOCK_T=0, HAS_GATE=0, IEEE=0, UPCAST=0)
    compile_sm90(ta._decode_kernel, sig, dict(
        BS=bs, REP=rep, BLOCK_R=max(16, triton.next_power_of_2(rep)), HD=hd,
        BLOCK_T=ta.BLOCK_T, HAS_GATE=True, IEEE=ieee, UPCAST=False,
    ))  # fmt: skip
    sig = dict(Q=p, K=p, V=p, O=p, block_table="*i32", start_pos=i, Tq=i, scale="fp32")
    sig |= {n: i for n in ta._prefill_kernel.arg_names if n.startswith("stride")}
    sig |= dict(BS=0, REP=0, HD=0, BLOCK_M=0, BLOCK_T=0, IEEE=0, UPCAST=0)
    for block_m in (16, 32):
        compile_sm90(ta._prefill_kernel, dict(sig), dict(
            BS=bs, REP=rep, HD=hd, BLOCK_M=block_m, BLOCK_T=ta.BLOCK_T, IEEE=ieee, UPCAST=False,
        ))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_and_pointwise_kernels_compile(dtype):
    from qwen35.kernels import triton_norms as tn
    from qwen35.kernels import triton_pointwise as tp

    p = _ptr(dtype)
    for D in (128, 256, 1024, 2048, 4096, 5120, 8192):  # head dims, dv, hidden sizes
        B = triton.next_power_of_2(D)
        compile_sm90(tn._rms_zc_kernel, dict(X=p, W=p, Y=p, D="i32", eps="fp32", BLOCK=0),
                     dict(BLOCK=B))  # fmt: skip
        compile_sm90(tn._add_rms_zc_kernel, dict(H=p, X=p, W=p, Y=p, stride_h="i32",
                     stride_x="i32", D="i32", eps="fp32", BLOCK=0), dict(BLOCK=B))  # fmt: skip
        compile_sm90(tn._gated_rms_kernel, dict(X=p, Z=p, W=p, Y=p, D="i32", eps="fp32",
                     BLOCK=0), dict(BLOCK=B))  # fmt: skip
    for half in (32, 64):  # rotary_dim 64 (head_dim 256 x 0.25) and 128
        sig = dict(Q=p, K=p, COS=p, SIN=p, stride_qt="i32", stride_qh="i32", stride_kt="i32",
                   stride_kh="i32", stride_ct="i32", NH="i32", HALF=0, BLOCK=0)  # fmt: skip
        compile_sm90(tp._rotary_kernel, sig, dict(HALF=half, BLOCK=max(16, half)))
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
    for dk, dv in ((128, 128), (64, 64), (16, 16)):  # Qwen 3.5; the tests' tiny model
        sig = dict(U=p, stride_un="i32", G="*fp32", stride_gn="i32", B=p, stride_bn="i32",
                   S="*fp32", stride_s_slot="i32", SLOTS="*i64", O="*fp32", stride_on="i32",
                   scale="fp32", R=0, KD=0, DK=0, DV=0, BV=0)  # fmt: skip
        compile_sm90(tdn._recurrent_kernel, sig, dict(
            R=2, KD=16 * dk, DK=dk, DV=dv, BV=min(32, triton.next_power_of_2(dv))
        ))  # fmt: skip


@pytest.mark.parametrize("M", [1, 16, 17, 64, 4096])
def test_fp8_block_kernel_compiles(M):
    from qwen35.quant import fp8_gpu

    kern = fp8_gpu._triton_kernel()
    fn = kern.kernel
    sig = dict(A="*fp8e4nv", B="*fp8e4nv", C="*bf16", As="*fp32", Bs="*fp32", M="i32", N="i32",
               K="i32", s_am="i32", s_bn="i32", s_cm="i32", s_asm="i32", s_bsn="i32",
               BLOCK_N=0, BLOCK_K=0, BM=0)  # fmt: skip
    compile_sm90(fn, sig, dict(BLOCK_N=128, BLOCK_K=128, BM=fp8_gpu.block_m(M)))
