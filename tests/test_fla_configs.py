"""kernels/fla_configs.py: fla-core's tuned configs shipped per GPU, so an engine start does not
autotune (minutes on a fresh H200). The folder choice runs everywhere; the round trip (configs
dumped after a run, then taken by fla in a new process without benchmarking one config) needs
fla-core and Triton: interpreted on a CPU (`pytest -m slow`, tests/triton_interp.py's venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen35.kernels import fla_configs


def test_folder_names_follow_fla():
    assert fla_configs.gpu_folder_name("NVIDIA H200") == "NVIDIA_H200"
    assert fla_configs.gpu_folder_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert fla_configs.gpu_folder_name("--") == "unknown_gpu"


def test_use_shipped_points_fla_at_the_gpus_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fla_configs, "ROOT", tmp_path)
    monkeypatch.delenv("FLA_CONFIG_DIR", raising=False)
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    assert fla_configs.use_shipped("NVIDIA H200") is None  # nothing shipped for it
    assert "FLA_CONFIG_DIR" not in os.environ
    d = tmp_path / "NVIDIA_H200"
    d.mkdir()
    (d / "k.json").write_text("{}")
    assert fla_configs.use_shipped("NVIDIA H200") == d
    assert os.environ["FLA_CONFIG_DIR"] == str(d) and os.environ["FLA_CACHE_MODE"] == "fuzzy"
    assert fla_configs.use_shipped("NVIDIA H100 80GB HBM3") is None  # (set already: kept)


def test_a_users_settings_win(tmp_path, monkeypatch):
    monkeypatch.setattr(fla_configs, "ROOT", tmp_path)
    (tmp_path / "NVIDIA_H200").mkdir()
    (tmp_path / "NVIDIA_H200" / "k.json").write_text("{}")
    monkeypatch.setenv("FLA_CONFIG_DIR", "/mine")
    assert fla_configs.use_shipped("NVIDIA H200") is None
    assert os.environ["FLA_CONFIG_DIR"] == "/mine"
    monkeypatch.delenv("FLA_CONFIG_DIR")
    monkeypatch.setenv("FLA_CACHE_MODE", "strict")
    fla_configs.use_shipped("NVIDIA H200")
    assert os.environ["FLA_CACHE_MODE"] == "strict"


def test_shipped_files_are_fla_config_files():
    """Whatever is shipped parses as fla's format: autotune entries, each a key and a config."""
    for f in fla_configs.ROOT.glob("*/*.json"):
        data = json.loads(f.read_text())
        assert data["kernel_name"] == f.stem
        for entry in data["autotune_entries"].values():
            assert isinstance(entry["autotune_key"], list)
            assert {"kwargs", "num_warps", "num_stages"} <= set(entry["config"])


RUN = """
import sys, torch
sys.path.insert(0, {tests!r})
from triton_interp import patch_fla_for_interpreter
patch_fla_for_interpreter()
from triton.runtime import autotuner
if {strict}:  # configs must come from the files: choosing among them is a failure
    def _no(self, *a, **k):
        raise AssertionError("autotuned " + self.base_fn.__name__)
    # (triton 3.9 benchmarks nothing when pruning leaves one config, as the interpreter patch
    # does: the choice starts at prune_configs on every version)
    autotuner.Autotuner._bench = autotuner.Autotuner.prune_configs = _no
from fla.ops.gated_delta_rule import chunk_gated_delta_rule
from qwen35.kernels import fla_configs
g = torch.Generator().manual_seed(0)
T, H, D = {T}, {H}, 16
q, k, v = (torch.randn(1, T, H, D, generator=g) for _ in range(3))
chunk_gated_delta_rule(q, k, v, -torch.rand(1, T, H, generator=g),
                       torch.rand(1, T, H, generator=g), use_qk_l2norm_in_kernel=True)
if {out!r}:
    print(fla_configs.dump({out!r}, "NVIDIA H200"))
"""


@pytest.mark.slow
def test_dumped_configs_are_taken_without_autotuning(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed (see tests/triton_interp.py)")
    pytest.importorskip("fla", reason="fla-core is not installed (see tests/triton_interp.py)")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(tests).parent / "src"), tests])}  # fmt: skip
    env.pop("FLA_CONFIG_DIR", None)
    env.pop("FLA_CACHE_MODE", None)

    def run(strict, T, H, out="", **extra):
        code = RUN.format(tests=tests, strict=strict, T=T, H=H, out=out)
        return subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    first = run(False, 80, 2, out=str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    d = tmp_path / "NVIDIA_H200"
    assert {"chunk_fwd_kernel_o.json", "recompute_w_u_fwd_kernel.json"} <= {
        f.name for f in d.glob("*.json")
    }
    # another length and head count: fuzzy keys take the configs tuned above
    again = run(True, 100, 3, FLA_CONFIG_DIR=str(d), FLA_CACHE_MODE="fuzzy")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "autotuned" in run(True, 100, 3).stderr  # (and without them it would tune)


@pytest.mark.slow
def test_configs_from_tritons_cache_directory(tmp_path):
    """Triton's on-disk tuning results (any number of processes) -> fla's files: the fastest
    config per key, other kernels' results left out."""
    pytest.importorskip("triton", reason="Triton is not installed (see tests/triton_interp.py)")
    pytest.importorskip("fla", reason="fla-core is not installed (see tests/triton_interp.py)")
    cfg = lambda bv, w: {"kwargs": {"BK": 64, "BV": bv}, "num_warps": w, "num_stages": 2,  # noqa: E731
                         "num_ctas": 1, "maxnreg": None, "pre_hook": None, "ir_override": None}
    for i, (key, timings) in enumerate([
        ([2, 16, 16, 64, False, "torch.bfloat16"], [(cfg(32, 4), [3.0, 2.9, 3.1]),
                                                    (cfg(64, 8), [2.0, 1.9, 2.1])]),
        ([4, 16, 16, 64, False, "torch.bfloat16"], [(cfg(128, 4), [1.0, 1.0, 1.0])]),
    ]):  # fmt: skip
        (tmp_path / f"h{i}").mkdir()
        (tmp_path / f"h{i}" / "chunk_fwd_kernel_o.autotune.json").write_text(
            json.dumps({"key": key, "configs_timings": timings}))
    (tmp_path / "h9").mkdir()
    (tmp_path / "h9" / "not_fla_kernel.autotune.json").write_text(
        json.dumps({"key": [1], "configs_timings": [(cfg(1, 1), [1.0])]}))
    found = fla_configs.from_triton_cache(tmp_path)
    assert set(found) == {"chunk_fwd_kernel_o"}
    entries = found["chunk_fwd_kernel_o"]["autotune_entries"].values()
    assert sorted(e["config"]["kwargs"]["BV"] for e in entries) == [64, 128]
    # merged into what is there, also into a file with no entries yet (fla's legacy kind)
    (tmp_path / "out" / "NVIDIA_H200").mkdir(parents=True)
    (tmp_path / "out" / "NVIDIA_H200" / "chunk_fwd_kernel_o.json").write_text("{}")
    d = fla_configs.dump(tmp_path / "out", "NVIDIA H200", found)
    data = json.loads((d / "chunk_fwd_kernel_o.json").read_text())
    assert len(data["autotune_entries"]) == 2 and "pre_hook" not in json.dumps(data)
    assert "triton_version" not in found["chunk_fwd_kernel_o"]  # (the caller's dict untouched)
    fla_configs.dump(tmp_path / "out", "NVIDIA H200", {"chunk_fwd_kernel_o": {
        "kernel_name": "chunk_fwd_kernel_o", "autotune_entries": {"h": next(iter(entries))}}})
    data = json.loads((d / "chunk_fwd_kernel_o.json").read_text())
    assert len(data["autotune_entries"]) == 3  # entries of other shapes stay
