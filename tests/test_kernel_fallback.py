"""GPU kernels that do not build on the GPU at hand (kernels/unavailable.py): their family is
switched off and the engine serves from the PyTorch path (engine/preflight.py at start-up; the
runner if one is met later). Here on a CPU, without Triton: the errors are stand-ins with
Triton's class name, and the model raises KernelUnavailable while its backend still has the
family on. tests/test_interpret_engine.py does it with the real kernels (interpreted), and
tests/test_triton_compile.py checks that a real sm_80 compile of an FP8 kernel is recognised."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from qwen35.engine.preflight import check_kernels, run_steps
from qwen35.kernels.unavailable import KernelUnavailable, is_build_error, launcher
from qwen35.ops.backend import Backend, reference_backend, with_fallbacks
from qwen35.request import SamplingParams
from test_backend import BS, _model
from test_engine import ckpt, ids, make, prompts  # noqa: F401  (ckpt: a fixture)


class TritonError(Exception):  # Triton's base class is matched by name (no Triton here)
    pass


class CompilationError(TritonError):
    pass


class InterpreterError(TritonError):
    pass


def test_launcher_turns_only_build_errors_into_kernel_unavailable():
    @launcher("triton_norms")
    def norm(kind):
        raise {"compile": CompilationError("type fp8e4nv not supported in this architecture"),
               "pass": RuntimeError("PassManager::run failed"),
               "cuda": RuntimeError("CUDA error: an illegal memory access was encountered"),
               "shape": ValueError("bad shape")}[kind]  # fmt: skip

    for kind in ("compile", "pass"):
        with pytest.raises(KernelUnavailable) as err:
            norm(kind)
        assert err.value.field == "triton_norms" and err.value.kernel == "norm"
        assert "cannot be built on this GPU" in str(err.value)
    assert "fp8e4nv not supported" in str(pytest.raises(KernelUnavailable, norm, "compile").value)
    with pytest.raises(RuntimeError, match="illegal memory access") as err:
        norm("cuda")  # a fault is not a missing kernel: it passes through unchanged
    assert not isinstance(err.value, KernelUnavailable)
    with pytest.raises(ValueError, match="bad shape"):
        norm("shape")
    assert not is_build_error(RuntimeError("CUDA out of memory"))
    assert not is_build_error(InterpreterError("a kernel's bug, run by the interpreter"))


def test_with_fallbacks_switches_each_failing_family_off_once(caplog):
    be = Backend("cuda", triton_norms=True, triton_moe=True, fla=object())
    seen = []

    def run(b):
        seen.append(b)
        for field in ("fla", "triton_moe"):
            if getattr(b, field):
                raise KernelUnavailable(field, f"k_{field}", CompilationError("no"))
        return "ran"

    with caplog.at_level(logging.WARNING, logger="qwen35"):
        got, result = with_fallbacks(be, run)
    assert result == "ran" and len(seen) == 3
    assert got.fla is None and got.triton_moe is False and got.triton_norms is True
    assert "k_fla (fla) cannot be built" in caplog.text and "k_triton_moe" in caplog.text

    def always(b):  # a family that is already off cannot fix it: no endless loop
        raise KernelUnavailable("triton_attention", "k", "no")

    with pytest.raises(KernelUnavailable):
        with_fallbacks(be, always)


class Unbuildable(torch.nn.Module):
    """The model, except that a step whose backend has `field` on raises KernelUnavailable
    before it does anything (as a kernel that fails to compile does)."""

    def __init__(self, model, field):
        super().__init__()
        self.inner, self.field, self.raised = model, field, 0

    def _check(self, batch):
        if getattr(batch.backend, self.field):
            self.raised += 1
            raise KernelUnavailable(self.field, "_kernel", CompilationError("out of resources"))

    def forward(self, ids, batch, caches):
        self._check(batch)
        return self.inner(ids, batch, caches)

    def forward_hidden(self, ids, batch, caches):  # the CPU runner's greedy head screen
        self._check(batch)
        return self.inner.forward_hidden(ids, batch, caches)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_preflight_steps_run_and_switch_off_what_does_not_build():
    model = _model(moe=True)
    ref = reference_backend("cpu")
    run_steps(model, ref, BS)  # the four steps build and run (fresh, continuing, decodes)
    assert check_kernels(model, ref, BS) is ref  # nothing fails: the backend as it was
    fp8 = []  # --kv-cache-dtype fp8: the steps run on fp8 caches (their kernels' variants)
    inner = model.forward

    def spy(ids, batch, caches):
        fp8.append(caches.key[0].dtype)
        return inner(ids, batch, caches)

    model.forward = spy
    try:
        assert check_kernels(model, ref, BS, kv_dtype=torch.float8_e4m3fn) is ref
    finally:
        del model.forward
    assert fp8 and set(fp8) == {torch.float8_e4m3fn}
    on = dataclasses.replace(ref, triton_norms=True)  # (on CPU tensors it dispatches nothing)
    wrapped = Unbuildable(model, "triton_norms")
    got = check_kernels(wrapped, on, BS)
    assert got.triton_norms is False and wrapped.raised == 1
    assert got == ref


def test_engine_serves_on_after_a_kernel_fails_to_build_mid_run(ckpt):  # noqa: F811
    """Met after start-up (a kernel variant the check did not build): that step's sequences
    fail with the reason, the runner switches the family off, the engine serves on with the
    reference's tokens."""
    d, _ = ckpt
    ps = prompts(2, seed=5)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = ids(make(d).generate(ps, sp))
    llm = make(d)
    runner = llm.engine.runner
    runner.backend = dataclasses.replace(runner.backend, triton_norms=True)
    runner.model = Unbuildable(runner.model, "triton_norms")
    eng = llm.engine
    eng.add_request("a", ps[0], sp)
    failed = []
    while eng.has_unfinished_requests():
        failed += [o for o in eng.step() if o.error]
    assert [o.request_id for o in failed] == ["a"] and "cannot be built" in failed[0].error
    assert runner.backend.triton_norms is False
    assert ids(llm.generate(ps, sp)) == want


def test_fp8_paths_that_do_not_build_hand_over(monkeypatch, caplog):
    """quant/fp8_gpu.py: a Triton path that does not build (no e4m3 before sm_89) is
    remembered and the next path runs; any other error propagates."""
    from qwen35.quant import fp8_gpu

    monkeypatch.setattr(fp8_gpu, "UNBUILT", {})
    calls = []

    def unbuildable(*args):
        calls.append(1)
        raise CompilationError("type fp8e4nv not supported in this architecture")

    with caplog.at_level(logging.WARNING, logger="qwen35"):
        assert fp8_gpu._built("gemv", unbuildable, 1) is None
        assert fp8_gpu._built("gemv", unbuildable, 1) is None  # remembered: not tried again
    assert len(calls) == 1 and "fp8e4nv" in fp8_gpu.UNBUILT["gemv"]
    assert caplog.text.count("FP8 gemv kernel cannot be built") == 1
    assert fp8_gpu._built("block GEMM", lambda x: x + 1, 1) == 2

    def broken(*args):
        raise IndexError("a bug, not a missing kernel")

    with pytest.raises(IndexError):
        fp8_gpu._built("block GEMM", broken, 1)
    assert "block GEMM" not in fp8_gpu.UNBUILT


def test_gpu_start_checks_kernels_on_one_device_only(monkeypatch):
    """engine/preflight.py `gpu_start`: the start-up steps, then the working-memory measure
    with the backend they leave; a tensor-parallel rank (alone=False) cannot run a forward alone
    (its all-reduces would wait for ranks that are not running it: a hang): select_backend's
    backend, no measurement (None: plan_caches takes the planner's formula), no step run."""
    import qwen35.engine.cache_sizing as cs
    import qwen35.engine.preflight as pf

    checked, chosen, measured = [], [], []
    after_check, after_choice = Backend("cuda"), Backend("cuda", chunk_attention="sdpa")
    monkeypatch.setattr(pf, "check_kernels",
                        lambda m, be, bs, **k: checked.append(be) or after_check)  # fmt: skip
    monkeypatch.setattr(pf, "choose_chunk_attention",  # times the chunk paths (on a GPU)
                        lambda m, be, dt, bs, **k: chosen.append(be) or after_choice)  # fmt: skip
    monkeypatch.setattr(cs, "measure_working_memory",
                        lambda m, t, r, bs, be, kv=None: measured.append(be) or 123)  # fmt: skip
    model = _model()
    assert pf.gpu_start(model, torch.float32, 64, 2, BS) == (after_choice, 123)
    assert chosen == [after_check] and measured == [after_choice] and len(checked) == 1
    ran = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: ran.append(1))
    be, working = pf.gpu_start(model, torch.float32, 64, 2, BS, alone=False)
    assert working is None and len(checked) == len(chosen) == len(measured) == 1 and not ran
    assert be is pf.select_backend(model.device, dtype=torch.float32)
