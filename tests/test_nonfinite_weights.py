"""NaN / inf weights are refused when a checkpoint is read (weights.check_finite): by loading
(every dtype, quantized or not, tensor-parallel ranks, FP8 weights and scales), by `qwen35
quantize` and by LoRA adapters, with one error naming the file, the tensor and the count; and
QWEN35_ALLOW_NONFINITE_WEIGHTS=1 loads them anyway. Before, such a checkpoint loaded silently and
answered one repeated token (int8 quantizing turned the NaNs into plausible-looking tokens)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35 import weights
from qwen35.loader import load_model
from qwen35.parallel.context import TensorParallel
from qwen35.weights import ALLOW_NONFINITE_ENV, CheckpointError, count_nonfinite
from tiny import save_checkpoint, save_fp8_checkpoint, save_random_lora_adapter

VICTIM = "layers.1.mlp.down_proj.weight"


def _kernels():
    from qwen35.kernels import small_ops

    if small_ops.load() is None:
        pytest.skip("no compiled kernels here (no toolchain or QWEN35_NO_KERNELS=1): the CPU check needs them")


def _poison(d, fragment: str, value: float, every: int = 7) -> str:
    """Set every `every`-th element of the first tensor whose name has `fragment` to value."""
    f = d / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if fragment in k)
    t = sd[key].clone()
    t.view(-1)[::every] = value
    sd[key] = t
    save_file(sd, str(f), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64,
              torch.float8_e4m3fn, torch.float8_e5m2],  # fmt: skip
)
def test_count_equals_isfinite(dtype, monkeypatch):
    _kernels()
    monkeypatch.setattr(weights, "_COUNT_CHUNK", 1000)
    g = torch.Generator().manual_seed(0)
    n = 3 * 65537  # several of the kernel's 64K blocks, and a tail
    x = torch.randn(n, generator=g).to(dtype)
    idx = torch.randint(0, n, (300,), generator=g)
    x[idx[:100]] = float("nan")
    x[idx[100:200]] = float("inf")
    x[idx[200:]] = float("-inf")
    if dtype == torch.float8_e4m3fn:  # no inf (inf saturates to 448): both NaN codes instead
        x.view(torch.uint8)[idx[100:200]] = 0xFF
        x.view(torch.uint8)[idx[200:]] = 0x7F
    want = int((~torch.isfinite(x.double())).sum())
    assert want > 250
    assert count_nonfinite(x) == want
    assert count_nonfinite(x[1::2]) == int((~torch.isfinite(x[1::2].double())).sum())  # a view
    assert weights._count_torch(x) == want  # (the GPU's count)
    assert count_nonfinite(x.view(3, -1)[:, :-2]) == want - int(  # rows of a non-contiguous view
        (~torch.isfinite(x.view(3, -1)[:, -2:].double())).sum())
    big = torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).min, 0.0, -0.0],
                       dtype=torch.float64).to(dtype)
    assert count_nonfinite(big) == 0  # the largest finite values are finite
    assert count_nonfinite(torch.empty(0, dtype=dtype)) == 0
    assert count_nonfinite(torch.arange(10)) == 0


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    save_checkpoint(d, dtype=torch.bfloat16, vocab_size=512)
    return d


def _copy(src, tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_load_refuses_nonfinite(clean, tmp_path, value, quantization):
    _kernels()
    d = _copy(clean, tmp_path)
    key = _poison(d, VICTIM, value)
    with pytest.raises(CheckpointError) as e:
        load_model(d, dtype="fp32" if quantization is None else "bf16", quantization=quantization)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg and key in msg, msg
    n = load_file(str(d / "model.safetensors"))[key].numel()
    assert f"holds {len(range(0, n, 7)):,} NaN or infinite values (of {n:,})" in msg, msg
    assert ALLOW_NONFINITE_ENV in msg


def test_clean_load_is_checked_and_env_loads_anyway(clean, tmp_path, monkeypatch, caplog):
    _kernels()
    assert load_model(clean, dtype="bf16").load_report.nonfinite_checked
    d = _copy(clean, tmp_path)
    key = _poison(d, VICTIM, math.nan)
    monkeypatch.setenv(ALLOW_NONFINITE_ENV, "1")
    with caplog.at_level("WARNING", logger="qwen35.loader"):
        model = load_model(d, dtype="bf16")
    assert key in caplog.text and "loading it anyway" in caplog.text
    p = dict(model.named_parameters())[VICTIM.join(["model.", ""])]
    assert torch.isnan(p.float()).any()  # loaded as stored


def test_without_kernels_the_load_says_unchecked(clean, monkeypatch):
    monkeypatch.setenv("QWEN35_NO_KERNELS", "1")
    report = load_model(clean, dtype="bf16").load_report
    assert report.num_tensors > 0 and not report.nonfinite_checked


def test_values_past_the_dtype_range(tmp_path):
    """Finite fp32 values past fp16's 65,504 become inf when loaded as fp16: named so."""
    _kernels()
    d = tmp_path / "ck"
    save_checkpoint(d, dtype=torch.float32, vocab_size=512)
    key = _poison(d, VICTIM, 1e6)
    with pytest.raises(CheckpointError, match="finite but past float16's range") as e:
        load_model(d, dtype="fp16")
    assert key in str(e.value)
    load_model(d, dtype="fp32")  # the same file in fp32: finite, loads


def test_tensor_parallel_rank_refuses(clean, tmp_path):
    _kernels()
    d = _copy(clean, tmp_path)
    key = _poison(d, VICTIM, math.nan)
    with pytest.raises(CheckpointError) as e:
        load_model(d, dtype="fp32", tp=TensorParallel(1, 2))
    msg = str(e.value)
    assert key in msg and "NaN or infinite" in msg and str(d / "model.safetensors") in msg, msg
    assert load_model(clean, dtype="fp32", tp=TensorParallel(1, 2)).load_report.nonfinite_checked


@pytest.mark.parametrize("what", ["weight", "scale"])
def test_fp8_weights_and_scales(tmp_path, what):
    _kernels()
    d = tmp_path / "fp8"
    save_fp8_checkpoint(d, tmp_path / "bf16", moe=False, experts="fused", vocab_size=512,
                        hidden_size=128)  # fmt: skip
    f = d / "model.safetensors"
    sd = load_file(str(f))
    name = "mlp.down_proj.weight" + ("_scale_inv" if what == "scale" else "")
    key = next(k for k in sd if k.endswith(name))
    t = sd[key].clone()
    if what == "weight":  # e4m3fn's NaN code
        t.view(torch.uint8).view(-1)[::5] = 0x7F
    else:
        t.view(-1)[0] = math.inf
    sd[key] = t
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert key in str(e.value)


def test_quantize_refuses_and_writes_nothing(clean, tmp_path, capsys):
    _kernels()
    from qwen35.cli import main

    d = _copy(clean, tmp_path)
    key = _poison(d, VICTIM, math.nan)
    out = tmp_path / "out"
    rc = main(["quantize", str(d), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and "NaN or infinite" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob("out*")), list(tmp_path.iterdir())


def test_lora_adapter_refused(tmp_path):
    _kernels()
    from qwen35.lora import LoraAdapter, LoraError
    from tiny import hf_model

    a = tmp_path / "lora"
    save_random_lora_adapter(hf_model(), a)
    f = a / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = sorted(sd)[0]
    sd[key] = sd[key].clone().fill_(math.nan)
    save_file(sd, str(f))
    with pytest.raises(LoraError) as e:
        LoraAdapter(a)
    assert key in str(e.value) and "NaN or infinite" in str(e.value)


@pytest.mark.gpu
def test_gpu_load_refuses(clean, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    d = _copy(clean, tmp_path)
    key = _poison(d, VICTIM, math.nan)
    with pytest.raises(CheckpointError) as e:
        load_model(d, dtype="bf16", device="cuda")
    assert key in str(e.value)
    assert load_model(clean, dtype="bf16", device="cuda").load_report.nonfinite_checked
