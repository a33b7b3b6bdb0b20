"""Merging a PEFT LoRA adapter into a checkpoint's weights (`qwen35 quantize --lora DIR`).

A LoRA fine-tune ships as an adapter directory (`adapter_config.json` + `adapter_model.
safetensors`): per adapted linear layer a down-projection A [r, in] and an up-projection B
[out, r], whose product, scaled by lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), is
added to the base weight: W' = W + s * B @ A, computed in fp32 and stored in the base's dtype
(an FP8 base weight is dequantised first; `--to fp8` quantises the merged weight again).

Adapter keys name modules of the PEFT-wrapped transformers model (`base_model.model.<module>
.lora_A.weight`): the text model's `model.layers.N...` or the VLM's `model.language_model
.layers.N...`, matched to the checkpoint's keys in either layout. Everything is checked before
anything is written: unsupported adapter kinds (DoRA, LoRA on embeddings, biases, saved full
modules, fused-expert parameters) are refused by name, and every adapter module must match a
2-D weight of the base of the right shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen35.errors import Qwen35Error, shown
from qwen35.weights import CheckpointError, check_finite

_KEY = re.compile(r"^base_model\.model\.(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
# adapter features whose weights are not a plain low-rank delta of one base weight
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "full saved modules (modules_to_save)",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. fused experts)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA (use_qalora)",
}


class LoraError(Qwen35Error):
    """An adapter that cannot be merged; the message names the file, key or option."""


def normal_key(key: str) -> str:
    """A checkpoint key in the text layout (the VLM's `model.language_model.` is `model.`)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


@dataclass
class _Pair:
    module: str  # the adapter's module path
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


class LoraAdapter:
    """A PEFT LoRA adapter, checked; `delta_for(key, weight)` merges into one base weight."""

    def __init__(self, path: str | Path):
        try:  # a path the OS refuses (too long, no permission): a LoraError, not a crash
            self.path = _adapter_dir(path)
            cfg = self._config()
            tensors = self._tensors()
        except OSError as e:
            raise LoraError(f"cannot read a LoRA adapter at {shown(path)!r}: "
                            f"{e.strerror or e}") from None  # fmt: skip
        self.pairs: dict[str, _Pair] = {}  # normal base key -> its pair
        self.used: set[str] = set()
        a_b: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise LoraError(
                    f"{self.path.name}: {key} is not a LoRA A / B weight (LoRA on embeddings, "
                    "biases and DoRA magnitudes cannot be merged here)"
                )
            a_b.setdefault(m["mod"], {})[m["ab"]] = t
        for mod, ab in sorted(a_b.items()):
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise LoraError(f"{self.path.name}: {mod} has no lora_{missing} weight")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise LoraError(
                    f"{self.path.name}: {mod} has lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)}; want [r, in] and [out, r]"
                )
            r = a.shape[0]
            alpha = _alpha(cfg, mod)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.pairs[normal_key(mod + ".weight")] = _Pair(mod, a, b, scale)
        if not self.pairs:
            raise LoraError(f"{self.path}: the adapter has no LoRA weights")
        # (hashed here: the server reads adapters off the engine thread)
        self.digest = self._digest()

    def _digest(self) -> str:
        """A hash of what the adapter computes (every pair's module, A, B and scale): the
        prefix cache's key for its requests, the same for the same weights in any process."""
        h = hashlib.blake2b(digest_size=16)
        for key, p in sorted(self.pairs.items()):
            h.update(f"{key}:{p.module}:{p.scale!r}:{p.a.dtype}:{tuple(p.a.shape)}:"
                     f"{tuple(p.b.shape)}".encode())  # fmt: skip
            for t in (p.a, p.b):
                h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _config(self) -> dict:
        f = self.path / "adapter_config.json"
        if not f.is_file():
            raise LoraError(f"{self.path} has no adapter_config.json: pass a PEFT adapter directory")
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoraError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
            kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
            raise LoraError(f"{f}: peft_type {kind!r} is not a LoRA adapter")
        used = [name for k, name in _UNSUPPORTED.items() if cfg.get(k) not in (None, False, [], {})]
        if cfg.get("bias", "none") != "none":
            used.append(f"trained biases (bias {cfg['bias']!r})")
        if used:
            raise LoraError(f"{f}: cannot merge an adapter with {', '.join(used)}")
        if not _finite(cfg.get("lora_alpha", 8)):
            raise LoraError(f"{f}: lora_alpha must be a number, got {cfg.get('lora_alpha')!r}")
        pattern = cfg.get("alpha_pattern") or {}
        if not isinstance(pattern, dict) or not all(_finite(v) for v in pattern.values()):
            raise LoraError(f"{f}: alpha_pattern must map module patterns to numbers, got "
                            f"{shown(repr(pattern))}")  # fmt: skip
        for pat in pattern:
            try:
                re.compile(pat)
            except re.error as e:
                raise LoraError(f"{f}: alpha_pattern key {shown(pat)!r} is not a regular "
                                f"expression ({e})") from None  # fmt: skip
        return cfg

    def _tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = self.path / "adapter_model.safetensors"
        if not f.is_file():
            other = " (adapter_model.bin is a pickle: save it with safetensors)" if (
                self.path / "adapter_model.bin").is_file() else ""  # fmt: skip
            raise LoraError(f"{self.path} has no adapter_model.safetensors{other}")
        try:
            tensors = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types
            raise LoraError(f"cannot read {f}: {e}") from None
        for key, t in tensors.items():  # NaN / inf would make every adapted output garbage
            try:
                check_finite(key, t, str(f))
            except CheckpointError as e:
                raise LoraError(str(e)) from None
        return tensors

    def check_base(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every adapter module must be a 2-D weight of the base (checkpoint key -> shape) of
        shape [out, in]; raises naming the first that is not."""
        have = {normal_key(k): k for k in shapes}
        for key, p in self.pairs.items():
            if key not in have:
                raise LoraError(
                    f"the adapter's {p.module} has no weight in the base checkpoint (looked for "
                    f"{key}): an adapter for another model?"
                )
            want = (p.b.shape[0], p.a.shape[1])
            if tuple(shapes[have[key]]) != want:
                raise LoraError(
                    f"the adapter's {p.module} is [{want[0]}, {want[1]}] but the base's "
                    f"{have[key]} is {list(shapes[have[key]])}"
                )

    def delta_for(self, key: str) -> _Pair | None:
        pair = self.pairs.get(normal_key(key))
        if pair is not None:
            self.used.add(normal_key(key))
        return pair

    def merge(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """weight + scale * B @ A in fp32, back in weight's dtype (unchanged if not adapted)."""
        p = self.delta_for(key)
        if p is None:
            return weight
        w = weight.float() + p.scale * (p.b.float() @ p.a.float())
        return w.to(weight.dtype)

    def unused(self) -> list[str]:
        return [p.module for k, p in self.pairs.items() if k not in self.used]


def _adapter_dir(source: str | Path) -> Path:
    """A local adapter directory, or a Hub id's snapshot (the Hugging Face cache first, as
    model ids are resolved: loader.py)."""
    path = Path(source).expanduser()
    text = str(source)
    if path.exists() or text.startswith((".", "~", "/")):
        return path
    from qwen35.loader import _HUB_ID, _from_hub

    if not _HUB_ID.match(text):
        return path
    from qwen35.weights import CheckpointError

    try:
        return _from_hub(text, kind="adapter")
    except CheckpointError as e:
        raise LoraError(str(e)) from None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _alpha(cfg: dict, module: str) -> float:
    """PEFT's alpha for a module: the first alpha_pattern key naming it, else lora_alpha."""
    for pat, alpha in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return float(alpha)
    return float(cfg.get("lora_alpha", 8))
