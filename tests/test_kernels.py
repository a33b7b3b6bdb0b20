"""The compiled CPU kernel (qwen35.kernels) against its PyTorch reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from kernel_modules import native_or_skip
from qwen35 import kernels
from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch
from qwen35.models.qwen3_5 import Qwen35ForCausalLM
from qwen35.ops import deltanet as deltanet_ops
from qwen35.ops.backend import Backend, reference_backend, select_backend
from qwen35.ops.conv import causal_conv1d_update_


def _module():
    return native_or_skip(kernels.DELTANET, "the DeltaNet decode kernel")


def _layer(dtype, seed=3):
    """Layer 0 (DeltaNet) of the tiny config, GQA-like heads (value heads = 2 x key heads)."""
    cfg = ModelConfig.from_hf(json.loads(tiny.hf_model().config.to_json_string()))
    layer = Qwen35ForCausalLM(cfg, dtype=dtype).model.layers[0].linear_attn
    g = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cfg, layer, g


def _kernel_inputs(cfg, n, dtype, g):
    """Random inputs of deltanet_decode for n sequences of cfg's DeltaNet layer."""
    C, K = cfg.linear_conv_dim, cfg.linear_conv_kernel_dim
    nv, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return _random_inputs(n, C, K, nv, dk, dv, dtype, g)


def _random_inputs(n, C, K, nv, dk, dv, dtype, g):
    """(qkv, conv, w, logdecay, beta, S) of deltanet_decode, drawn from g in that order."""
    qkv = torch.randn(n, C, generator=g).to(dtype)
    conv = torch.randn(n, C, K - 1, generator=g).to(dtype)
    w = (torch.randn(C, K, generator=g) * 0.5).to(dtype)
    logdecay = -torch.rand(n, nv, generator=g)
    beta = torch.rand(n, nv, generator=g).to(dtype)
    S = torch.randn(n, nv, dk, dv, generator=g) * 0.1
    return qkv, conv, w, logdecay, beta, S


def test_fused_decode_is_batch_independent():
    """Each sequence's arithmetic is the same in any batch: bitwise equal to running alone."""
    mod = _module()
    cfg, _, g = _layer(torch.bfloat16)
    qkv, conv, w, logdecay, beta, S = _kernel_inputs(cfg, 4, torch.bfloat16, g)
    nk = cfg.linear_num_key_heads
    conv_all, S_all = conv.clone(), S.clone()
    o_all = mod.deltanet_decode(qkv, conv_all, w, logdecay, beta, S_all, nk)
    for i in range(4):
        r = slice(i, i + 1)
        conv_i, S_i = conv[r].clone(), S[r].clone()
        o_i = mod.deltanet_decode(qkv[r], conv_i, w, logdecay[r], beta[r], S_i, nk)
        assert torch.equal(o_i[0], o_all[i])
        assert torch.equal(conv_i[0], conv_all[i]) and torch.equal(S_i[0], S_all[i])


def test_bad_input_is_refused():
    mod = _module()
    cfg, _, g = _layer(torch.bfloat16)
    qkv, conv, w, logdecay, beta, S = _kernel_inputs(cfg, 2, torch.bfloat16, g)
    nk = cfg.linear_num_key_heads
    with pytest.raises(RuntimeError, match="beta of the model dtype"):
        mod.deltanet_decode(qkv, conv, w, logdecay, beta.float(), S, nk)
    with pytest.raises(RuntimeError, match="must share the model dtype"):
        mod.deltanet_decode(qkv, conv.float(), w, logdecay, beta, S, nk)
    with pytest.raises(RuntimeError, match="layouts or dtypes"):
        mod.deltanet_decode(qkv, conv, w, logdecay, beta, S.half(), nk)  # fp32 / bf16 states only


def _decode_once(layer, cfg, g, dtype, backend) -> None:
    """One decode step of one sequence through the layer (kernel or PyTorch path)."""
    batch = ForwardBatch.build(
        positions=[3], cu_seqlens=[0, 1], context_lens=[4], slot_mapping=[3],
        block_tables=[[0]], state_slots=[0], has_initial_state=[True], logits_indices=[0],
        backend=backend,
    )  # fmt: skip
    conv = torch.zeros(1, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1, dtype=dtype)
    rec = torch.zeros(1, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)  # fmt: skip
    with torch.no_grad():
        layer(torch.randn(1, cfg.hidden_size, generator=g).to(dtype), batch, conv, rec)


def _torch_path_calls(monkeypatch) -> list:
    """Counts the runs of DeltaNet decode's PyTorch step (the kernel's fallback); a spy, the
    path itself is chosen by the backend."""
    calls = []
    torch_path = deltanet_ops._step_torch

    def spy(*args):
        calls.append(1)
        return torch_path(*args)

    monkeypatch.setattr(deltanet_ops, "_step_torch", spy)
    return calls


def test_switch_off_after_first_load(monkeypatch):
    """QWEN35_NO_KERNELS=1 set after the kernel was loaded: decode runs the PyTorch path, also
    through a backend selected before (it holds no module, it asks kernels.load() each step)."""
    _module()
    cfg, layer, g = _layer(torch.float32)
    be = select_backend("cpu")
    calls = _torch_path_calls(monkeypatch)
    _decode_once(layer, cfg, g, torch.float32, be)
    assert calls == []  # the kernel ran
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    assert kernels.supported() is False and kernels.load() is None
    _decode_once(layer, cfg, g, torch.float32, be)
    assert calls == [1]  # switched off: the PyTorch path ran


def _decode_batch(backend, in_slot_order=False):
    """3 decode rows in slots 5, 2, 3 (two runs), slot 2 fresh, given out of slot order; or in
    slot order (2, 3, 5): then the layer takes the kernel with its gates and norm fused
    (ops/deltanet.py deltanet_decode_gated)."""
    rows = [(7, 5, True), (0, 2, False), (4, 3, True)]  # (position, state slot, has a state)
    if in_slot_order:
        rows.sort(key=lambda r: r[1])
    return ForwardBatch.build(
        positions=[p for p, _, _ in rows],
        cu_seqlens=[0, 1, 2, 3],
        context_lens=[p + 1 for p, _, _ in rows],
        slot_mapping=[7, 8, 9],
        block_tables=[[0], [0], [0]],
        state_slots=[slot for _, slot, _ in rows],
        has_initial_state=[init for _, _, init in rows],
        logits_indices=[0, 1, 2],
        backend=backend,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("other", ["reference", "gather"])
@pytest.mark.parametrize("rows", ["mixed", "slot-ordered"])
def test_fused_deltanet_decode_equals_torch_path(dtype, other, rows, monkeypatch):
    """A DeltaNet layer's decode step through the compiled kernel equals the PyTorch paths (the
    CPU's slot runs, and the GPU's gather-by-slot formulation run on the CPU): outputs, conv
    states and recurrent states, over three decode steps in a row. Rows out of slot order take
    the kernel alone; in slot order, the kernel fused with the gates and the output norm."""
    import qwen35.layers.deltanet as layer_mod

    _module()
    cfg, layer, g = _layer(dtype)
    ordered = rows == "slot-ordered"
    fast = _decode_batch(select_backend("cpu"), ordered)
    # a backend without CPU extras takes the gather path (the GPU's, minus fla)
    ref_be = reference_backend("cpu") if other == "reference" else Backend("cuda")
    ref = _decode_batch(ref_be, ordered)
    assert fast.backend.cpu_kernels is not None
    fused_runs = []
    gated = layer_mod.deltanet_decode_gated

    def spy(*args):
        y = gated(*args)
        fused_runs.append(y is not None)
        return y

    monkeypatch.setattr(layer_mod, "deltanet_decode_gated", spy)
    conv = torch.randn(6, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1, generator=g)
    conv = conv.to(dtype)
    rec = torch.randn(6, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim, generator=g) * 0.1  # fmt: skip
    c1, r1, c2, r2 = conv.clone(), rec.clone(), conv.clone(), rec.clone()
    torch_runs = _torch_path_calls(monkeypatch)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for _ in range(3):
        x = torch.randn(3, cfg.hidden_size, generator=g).to(dtype)
        with torch.no_grad():
            out_k = layer(x, fast, c1, r1)
            assert torch_runs == []  # the kernel computed out_k
            assert fused_runs[-1] == (rows == "slot-ordered")
            out_t = layer(x, ref, c2, r2)
            torch_runs.clear()
        torch.testing.assert_close(out_k, out_t, **tol)
        torch.testing.assert_close(c1, c2, **tol)
        torch.testing.assert_close(r1, r2, **tol)
    assert not torch.equal(r1, rec)  # the states did move


def test_a_stale_build_lock_is_cleared(tmp_path, monkeypatch):
    """A build killed mid-way leaves `lock`; torch's builder would wait on it forever."""
    import os
    import time

    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "k" / "lock"
    assert Path(_get_build_directory("k", False)) == lock.parent
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    kernels._clear_stale_lock("k")
    assert lock.exists()  # fresh: another process may be building
    old = time.time() - kernels.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    kernels._clear_stale_lock("k")
    assert not lock.exists()


def test_a_kernel_builds_from_another_folder(tmp_path, monkeypatch):
    """Native.from_folder (bench/gemv.py --baseline): the same source name, flags and needs,
    compiled from that folder under a name of its own (its folder and sources hash), so the
    checkout's module is neither replaced nor rebuilt."""
    import shutil

    import torch.utils.cpp_extension as ext

    from qwen35.kernels import gemv

    built = []
    monkeypatch.setattr(ext, "load", lambda **kw: built.append(kw) or kw["name"])
    here = Path(kernels.__file__).parent
    for f in [gemv.GEMV.source, *(h.name for h in here.glob("*.h"))]:
        shutil.copy(here / f, tmp_path / f)
    other = gemv.GEMV.from_folder(tmp_path)
    assert (other.source, other.cflags, other.needs) == (gemv.GEMV.source, gemv.GEMV.cflags,
                                                         gemv.GEMV.needs)  # fmt: skip
    a, b = kernels.Native(gemv.GEMV.source, gemv.GEMV.cflags)._build(), other._build()
    assert built[0]["sources"] == [str(here / "gemv_cpu.cpp")]
    assert built[1]["sources"] == [str(tmp_path / "gemv_cpu.cpp")]
    assert a != b and a.startswith("qwen35_gemv_cpu_") and b.startswith("qwen35_gemv_cpu_")


def test_prebuild_builds_modules_side_by_side(monkeypatch):
    """kernels.prebuild builds several modules at once (each waits at a barrier that only opens
    when both builds are in flight: run one after the other, it would time out), and a module
    whose build fails is logged and left None without stopping the others."""
    import threading

    monkeypatch.setattr(kernels.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("QWEN35_NO_KERNELS", raising=False)  # (it would make every load None)
    barrier = threading.Barrier(2, timeout=30)

    class Fake(kernels.Native):
        def supported(self):
            return True

        def _build(self):
            barrier.wait()  # BrokenBarrierError (a failed build) if the other never arrives
            if self.source == "bad.cpp":
                raise RuntimeError("no compiler")
            return self.source

    good, bad = Fake("good.cpp", ()), Fake("bad.cpp", ())
    kernels.prebuild([good, bad])
    assert good.load() == "good.cpp" and bad.load() is None
    assert not barrier.broken


@pytest.mark.parametrize("avx2_only", [False, True], ids=["widest", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "nk,nv,dk,dv,K", [(2, 4, 128, 128, 4), (1, 2, 64, 64, 4), (1, 2, 16, 44, 3)]
)
def test_kernel_equals_the_torch_step(avx2_only, dtype, nk, nv, dk, dv, K):
    """The kernel alone against the PyTorch conv update + recurrent step, on Qwen 3.5's head
    size (128: the AVX-512 register path where the CPU has it), 64, and an odd one (44, conv
    of 3 taps: AVX2 column blocks, a scalar tail and the generic conv), on either ISA path."""
    mod = _module()
    g = torch.Generator().manual_seed(5)
    n, C = 3, 2 * nk * dk + nv * dv
    qkv, conv, w, logdecay, beta, S = _random_inputs(n, C, K, nv, dk, dv, dtype, g)
    conv_ref, S_ref = conv.clone(), S.clone()
    o = mod.deltanet_decode(qkv, conv, w, logdecay, beta, S, nk, avx2_only=avx2_only)
    u = causal_conv1d_update_(qkv, w, conv_ref)
    o_ref, S_ref = deltanet_ops._step_torch(
        u, logdecay, beta, S_ref, deltanet_ops.Dims(nk, nv, dk, dv, K)
    )
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert torch.equal(conv, conv_ref)  # the conv states shift exactly
    torch.testing.assert_close(o, o_ref.float(), **tol)
    torch.testing.assert_close(S, S_ref, **tol)


@pytest.mark.parametrize("avx2_only", [False, True], ids=["widest", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dk,dv", [(128, 128), (16, 44)])
def test_bf16_states_are_fp32_states_rounded(avx2_only, dtype, dk, dv):
    """--mamba-ssm-cache-dtype bf16: each head's bf16 state widened, stepped as an fp32 state,
    rounded back to nearest even: bitwise the kernel on the widened fp32 state with its result
    rounded (the PyTorch path's S.float() ... S.copy_(S32)), outputs bitwise too; batched ==
    alone; and the gated entry the same way."""
    mod = _module()
    g = torch.Generator().manual_seed(7)
    nk, nv, K, n = 1, 2, 4, 3
    C = 2 * nk * dk + nv * dv
    qkv, conv, w, logdecay, beta, S = _random_inputs(n, C, K, nv, dk, dv, dtype, g)
    Sb = S.bfloat16()
    conv_b, conv_f, S_f = conv.clone(), conv.clone(), Sb.float()
    o_b = mod.deltanet_decode(qkv, conv_b, w, logdecay, beta, Sb, nk, avx2_only=avx2_only)
    o_f = mod.deltanet_decode(qkv, conv_f, w, logdecay, beta, S_f, nk, avx2_only=avx2_only)
    assert Sb.dtype == torch.bfloat16 and o_b.dtype == torch.float32
    assert torch.equal(o_b, o_f) and torch.equal(Sb, S_f.bfloat16()) and torch.equal(conv_b, conv_f)
    assert not torch.equal(Sb.float(), S_f)  # (the rounding happened)
    for i in range(n):  # batched == alone
        r = slice(i, i + 1)
        S_i, conv_i = S[r].bfloat16(), conv[r].clone()
        o_i = mod.deltanet_decode(qkv[r], conv_i, w, logdecay[r], beta[r], S_i, nk,
                                  avx2_only=avx2_only)  # fmt: skip
        assert torch.equal(o_i[0], o_b[i]) and torch.equal(S_i[0], Sb[i])
    z = torch.randn(n, nv * dv, generator=g).to(dtype)
    a, b = torch.randn(n, nv, generator=g).to(dtype), torch.randn(n, nv, generator=g).to(dtype)
    dt_bias, a_log = torch.rand(nv).to(dtype), torch.rand(nv).to(dtype)
    norm_w = torch.randn(dv).to(dtype)
    Sb, S_f = S.bfloat16(), S.bfloat16().float()
    args = (qkv, z, a, b)
    y_b = mod.deltanet_decode_gated(*args, conv.clone(), w, dt_bias, a_log, Sb, norm_w, 1e-6, nk,
                                    avx2_only=avx2_only)  # fmt: skip
    y_f = mod.deltanet_decode_gated(*args, conv.clone(), w, dt_bias, a_log, S_f, norm_w, 1e-6, nk,
                                    avx2_only=avx2_only)  # fmt: skip
    assert torch.equal(y_b, y_f) and torch.equal(Sb, S_f.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gated_entry_equals_gates_kernel_and_norm(dtype):
    """deltanet_decode_gated is bitwise small_ops' gates -> deltanet_decode -> the output
    rounded to the model dtype -> small_ops' gated RMSNorm (the op-by-op CPU path), on rows
    that are column slices of one packed projection output (strided)."""
    from qwen35.kernels import small_ops

    mod = _module()
    so = native_or_skip(small_ops.SMALL_OPS, "the small-ops kernels")
    cfg, layer, g = _layer(dtype)
    n, nk, nv = 3, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    qkv, conv, w, _, _, S = _kernel_inputs(cfg, n, dtype, g)
    Vd = nv * cfg.linear_value_head_dim
    packed = torch.randn(n, qkv.shape[1] + Vd + 2 * nv, generator=g).to(dtype)
    qkv, z, b, a = packed.split([qkv.shape[1], Vd, nv, nv], dim=-1)
    dt_bias, a_log, norm_w = layer.dt_bias, layer.A_log, layer.norm.weight
    conv2, S2 = conv.clone(), S.clone()
    y = mod.deltanet_decode_gated(qkv, z, a, b, conv, w, dt_bias, a_log, S, norm_w, 1e-6, nk)
    gg, beta = so.deltanet_gates(a, b, dt_bias, a_log)
    o = mod.deltanet_decode(qkv, conv2, w, gg, beta, S2, nk).to(dtype)
    want = so.gated_rms_norm(o, z.unflatten(-1, (nv, -1)), norm_w, 1e-6).flatten(1)
    assert y.shape == (n, Vd) and y.dtype == dtype
    assert torch.equal(y, want)
    assert torch.equal(conv, conv2) and torch.equal(S, S2)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        mod.deltanet_decode_gated(qkv, z[:, 1:], a, b, conv, w, dt_bias, a_log, S, norm_w,
                                  1e-6, nk)  # fmt: skip
    with pytest.raises(RuntimeError, match="of the model dtype"):
        mod.deltanet_decode_gated(qkv, z, a.double(), b, conv, w, dt_bias, a_log, S, norm_w,
                                  1e-6, nk)  # fmt: skip


def test_cpu_isa_avx2_takes_every_kernels_avx2_path():
    """QWEN35_CPU_ISA=avx2 (a fresh process: it is read once): the kernels report no AVX512
    path, a bf16 GEMV gives bitwise what this process's AVX2 path gives, and `--dtype auto`
    sees no native bf16: what a CPU without AVX512 runs, on this one."""
    import os
    import subprocess
    import sys

    from qwen35.kernels import gemv

    mod = native_or_skip(gemv.GEMV, "the GEMV kernel")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 300, generator=g).bfloat16(), torch.randn(70, 300, generator=g).bfloat16()
    want = mod.linear_bf16(x, w, True)  # the AVX2 path, asked for
    code = (
        "import sys, torch; from qwen35 import devices; from qwen35.kernels import gemv\n"
        "m = gemv.load(); x, w = torch.load(sys.argv[1])\n"
        "assert not any(f.startswith(('avx512', 'amx')) for f in devices.cpu_flags())\n"
        "print(m.isa(), devices.default_dtype('cpu'))\n"
        "torch.save(m.linear_bf16(x, w), sys.argv[2])\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.save((x, w), f"{tmp}/in.pt")
        out = subprocess.run(
            [sys.executable, "-c", code, f"{tmp}/in.pt", f"{tmp}/out.pt"],
            env={**os.environ, "QWEN35_CPU_ISA": "avx2"}, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[0] == "[] fp32"
        assert torch.equal(torch.load(f"{tmp}/out.pt"), want)


def test_every_kernel_binding_releases_the_gil():
    """`qwen35 serve` answers HTTP on one thread while the engine steps on another: a binding
    that kept the GIL would stall the event loop for the kernel's whole length (bench/gil_wait.py).
    Every function binding of every kernel module takes QWEN35_NOGIL (the shared-memory all-reduce
    releases it itself, around its waits)."""
    import re

    folder = Path(kernels.__file__).parent
    bound = 0
    for src in sorted(folder.glob("*.cpp")):
        if src.name == "shm_allreduce_cpu.cpp":
            continue
        module = src.read_text().split("PYBIND11_MODULE", 1)[1]
        for m in re.finditer(r'\.def\("(\w+)", &[\w:]+,([^;]*?)\)(?:;|\s*\.def)', module):
            assert "QWEN35_NOGIL" in m.group(2), f"{src.name}: {m.group(1)} keeps the GIL"
            bound += 1
    assert bound >= 50
