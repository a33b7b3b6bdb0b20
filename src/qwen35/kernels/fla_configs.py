"""fla-core's tuned kernel configs, shipped per GPU so that an engine does not autotune at start.

fla-core's Triton kernels autotune on their first call: every candidate config is compiled and
timed, per kernel and shape. On a fresh H200 that took minutes for one model (the first GPU check
lost its 9B decode and prefill steps to it; bench/gpu_check.sh). fla reads tuned configs from
`$FLA_CONFIG_DIR/<kernel>.json` when `FLA_CACHE_MODE` allows (fla/ops/utils/cache.py):
exact key, then a config tuned at other sizes ("fuzzy"), then autotuning as before.

- `use_shipped()` (called before fla is imported, ops/backend.py `load_fla`): points fla at
  `fla_configs/<GPU name>/` here when that folder exists and the user set neither variable.
- `dump(out, gpu)`: writes fla kernels' chosen configs in fla's file format under
  `out/<GPU name>/`: this process's autotuners (`tuned()`), or what any number of runs left in
  Triton's cache directory (`from_triton_cache`; `python bench/fla_configs.py`, the last step
  of bench/gpu_check.sh, whose files are then copied to `fla_configs/` here).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path(__file__).parent / "fla_configs"
MODE = "fuzzy"  # exact key, else a config tuned at other sizes, else autotune


def gpu_folder_name(name: str) -> str:
    """fla's folder name for a GPU (its `sanitize_gpu_name`): 'NVIDIA H200' -> 'NVIDIA_H200'."""
    import re

    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unknown_gpu"


def shipped_dir(gpu_name: str) -> Path | None:
    d = ROOT / gpu_folder_name(gpu_name)
    return d if d.is_dir() and any(d.glob("*.json")) else None


def use_shipped(gpu_name: str | None = None) -> Path | None:
    """Point fla at the configs shipped for this GPU (None: CUDA device 0's name). Leaves a
    user's FLA_CONFIG_DIR / FLA_CACHE_MODE alone. Returns the folder used, or None."""
    if "FLA_CONFIG_DIR" in os.environ:
        return None
    if gpu_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        gpu_name = torch.cuda.get_device_name(0)
    d = shipped_dir(gpu_name)
    if d is None:
        return None
    os.environ["FLA_CONFIG_DIR"] = str(d)
    mode = os.environ.setdefault("FLA_CACHE_MODE", MODE)
    cache = sys.modules.get("fla.ops.utils.cache")
    if cache is not None:  # fla imported already (by transformers): it read the mode at import
        cache.FLA_CACHE_MODE = cache.FlaCacheMode(mode)
    log.info("fla-core kernel configs: %s (FLA_CACHE_MODE=%s)", d, mode)
    return d


def _fla_autotuners():
    """(kernel name, autotuner) of every fla-core autotuner alive in this process."""
    from triton.runtime.autotuner import Autotuner

    for obj in gc.get_objects():
        if isinstance(obj, Autotuner):
            fn = getattr(obj.fn, "fn", obj.fn)  # (under a Heuristics)
            if getattr(fn, "__module__", "").startswith("fla."):
                yield getattr(obj, "kernel_name", fn.__name__), obj


def tuned() -> dict[str, dict]:
    """Every fla autotuner in this process that has chosen configs: kernel name -> fla's file
    content (autotune_entries keyed by fla's key hash)."""
    out: dict[str, dict] = {}
    for name, obj in _fla_autotuners():
        for key, cfg in obj.cache.items():
            h, entry = _entry(key, {**vars(cfg), "kwargs": dict(cfg.kwargs)})
            out.setdefault(name, {"kernel_name": name, "autotune_entries": {}})
            out[name]["autotune_entries"][h] = entry
    return out


def _entry(key, cfg: dict) -> tuple[str, dict]:
    from fla.ops.utils.cache import AutotuneKey

    keep = ("kwargs", "num_warps", "num_stages", "num_ctas", "maxnreg")
    return AutotuneKey.key_hash(tuple(key)), {
        "autotune_key": AutotuneKey.normalize_autotune_key(key),
        "config": {k: cfg.get(k) for k in keep if k in cfg} | {"num_ctas": cfg.get("num_ctas", 1)},
    }


def fla_kernel_names() -> set[str]:
    """The names of fla's autotuned kernels (its kernel modules imported)."""
    import importlib

    for m in ("fla.ops.gated_delta_rule", "fla.modules.causal_conv1d", "fla.modules.l2norm"):
        try:
            importlib.import_module(m)
        except Exception:
            pass
    return {name for name, _ in _fla_autotuners()}


def from_triton_cache(cache_dir: str | Path) -> dict[str, dict]:
    """fla's autotuning results as Triton stored them on disk (`<kernel>.autotune.json`, fla's
    FLA_CACHE_RESULTS default; TRITON_CACHE_DIR, default ~/.triton/cache), from any number of
    processes: kernel name -> fla's file content, the fastest config per key."""
    names = fla_kernel_names()
    out: dict[str, dict] = {}
    for f in Path(cache_dir).expanduser().glob("*/*.autotune.json"):
        name = f.name[: -len(".autotune.json")]
        if name not in names:
            continue
        data = json.loads(f.read_text())
        cfg, _ = min(data["configs_timings"], key=lambda ct: ct[1] if isinstance(ct[1], float)
                     else ct[1][0])  # fmt: skip
        h, entry = _entry(data["key"], cfg)
        out.setdefault(name, {"kernel_name": name, "autotune_entries": {}})
        out[name]["autotune_entries"][h] = entry
    return out


def dump(out: str | Path, gpu_name: str, found: dict[str, dict] | None = None) -> Path:
    """Write `found` (default `tuned()`: this process's autotuners) as fla's config files under
    out/<GPU folder>/, merged into files already there, each written to a temporary name and
    renamed. Returns the folder."""
    import triton

    d = Path(out) / gpu_folder_name(gpu_name)
    d.mkdir(parents=True, exist_ok=True)
    for name, content in (tuned() if found is None else found).items():
        path = d / f"{name}.json"
        entries = json.loads(path.read_text()).get("autotune_entries", {}) if path.exists() else {}
        entries.update(content["autotune_entries"])
        content = {**content, "autotune_entries": entries, "triton_version": triton.__version__}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
    return d
