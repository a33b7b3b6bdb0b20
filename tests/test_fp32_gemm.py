"""layers/linear.py `gemm`: fp32 GEMMs through oneDNN on AMD CPUs (MKL's sgemm is slow there),
F.linear elsewhere; QWEN35_FP32_GEMM overrides the choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35 import devices
from qwen35.layers import linear as lin

ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.fixture
def choose(monkeypatch):
    """choose(value, vendor): QWEN35_FP32_GEMM (None: unset) on a CPU of that vendor; the
    cached choice is cleared before and after."""

    def set_(value, vendor="AuthenticAMD"):
        if value is None:
            monkeypatch.delenv(lin.FP32_GEMM_ENV, raising=False)
        else:
            monkeypatch.setenv(lin.FP32_GEMM_ENV, value)
        monkeypatch.setattr(devices, "cpu_vendor", lambda: vendor)
        lin.onednn_fp32.cache_clear()

    yield set_
    lin.onednn_fp32.cache_clear()


def test_which_cpus_take_onednn(choose):
    choose(None, "AuthenticAMD")
    assert lin.onednn_fp32() == ONEDNN
    choose(None, "GenuineIntel")
    assert not lin.onednn_fp32()  # MKL's own CPUs keep it (unmeasured against oneDNN)
    choose("onednn", "GenuineIntel")
    assert lin.onednn_fp32() == ONEDNN
    choose("mkl", "AuthenticAMD")
    assert not lin.onednn_fp32()
    choose("openblas")
    with pytest.raises(ValueError, match="QWEN35_FP32_GEMM='openblas': use onednn or mkl"):
        lin.onednn_fp32()


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
def test_onednn_gives_the_products(choose, monkeypatch):
    """Shapes the engine passes: 2-D and 3-D rows, a transposed weight view (int4 prefill's
    unpack), a bias (the vision tower); bf16 and mixed dtypes go to F.linear untouched."""
    choose("onednn")
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(lin, "_onednn_linear", lambda x, w, b: calls.append(1) or real(x, w, b, "none", [], ""))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 200, generator=g)
    b = torch.randn(72, generator=g)
    for x in (torch.randn(37, 200, generator=g), torch.randn(3, 5, 200, generator=g),
              torch.randn(200, 9, generator=g).T):  # fmt: skip
        ref = x.double() @ w.double().T
        torch.testing.assert_close(lin.gemm(x, w).double(), ref, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lin.gemm(x, w, b).double(), ref + b.double(), atol=1e-4, rtol=1e-5)
    wt = torch.randn(200, 72, generator=g).T  # [72, 200] with stride (1, 72)
    x = torch.randn(20, 200, generator=g)
    torch.testing.assert_close(lin.gemm(x, wt), x @ wt.T, atol=1e-4, rtol=1e-5)
    assert len(calls) == 7
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(lin.gemm(xb, wb), F.linear(xb, wb))  # bf16: F.linear's own oneDNN path
    assert lin.gemm(torch.randn(0, 200), w).shape == (0, 72)
    assert len(calls) == 8  # (the 0-row call)
    choose("mkl")
    assert torch.equal(lin.gemm(x, w), F.linear(x, w))
    assert len(calls) == 8


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("moe", [False, True])
def test_fp32_engine_greedy_tokens_agree_across_libraries(choose, tmp_path, moe, monkeypatch):
    """The same fp32 model under each library, prompts past the GEMV kernels' rows (prefill takes
    the GEMMs, dense and per-expert), batched: the same greedy tokens (random weights of a tiny
    model: margins far above fp32 rounding's last bits, where the libraries differ)."""
    from qwen35 import LLM
    from qwen35.request import SamplingParams
    from tiny import save_checkpoint

    ckpt = tmp_path / "m"
    save_checkpoint(ckpt, moe=moe)
    prompts = [list(range(3, 80)), list(range(40, 70)), [5, 9, 2]]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    out, calls = {}, []
    real = lin._onednn_linear
    monkeypatch.setattr(lin, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    for lib in ("mkl", "onednn"):
        choose(lib)
        llm = LLM(str(ckpt), dtype="fp32", verbose=False)
        out[lib] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert bool(calls) == (lib == "onednn")
    assert out["mkl"] == out["onednn"]
