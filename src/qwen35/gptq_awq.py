"""GPTQ and AWQ checkpoints (`quant_method: "gptq"` / `"awq"` in config.json: what GPTQModel /
AutoGPTQ and AutoAWQ save, and vLLM loads), read as plain ones through the same view as
compressed-tensors' (compressed_tensors.CompressedCheckpoint: the values, and int4 / int8
storage keeping the stored codes). Per quantized module (transposed against nn.Linear: inputs
along the first axis):

- GPTQ: `qweight` int32 [in * b / 32, out], 32 / b codes a word along the input, the first in
  the low bits; `qzeros` int32 [groups, out * b / 32] packed alike along the output; `scales`
  [groups, out]; `g_idx` [in] (each input's group: activation order when it is not k // group).
  Value = (u - z) * scale, where the original format (`checkpoint_format: gptq`) stores z - 1
  (AutoGPTQ's offset) and `gptq_v2` z itself. b = 4 or 8.
- AWQ (`version: gemm`): `qweight` int32 [in, out / 8], 4-bit codes packed along the output in
  the order 0, 2, 4, 6, 1, 3, 5, 7 (slot i of a word holds output 8w + that); `qzeros` int32
  [groups, out / 8] alike; `scales` [groups, out]. Value = (u - z) * scale.

The config says which (`checkpoint_format`, `version`), read from the config.json beside the
file; ModelConfig refuses the forms not read (2- / 3-bit, AWQ's gemv / marlin layouts).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from qwen35.compressed_tensors import CompressedCheckpoint, unpack
from qwen35.weights import CheckpointError

_PARTS = ("qweight", "qzeros", "scales")
_AUX = ("qzeros", "scales", "g_idx")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8w + _AWQ_ORDER[i] is slot i of word w


def is_gptq_awq(keys) -> bool:
    return any(k.endswith(".qweight") for k in keys)


@lru_cache(maxsize=16)
def _format(config: Path, mtime: float) -> str:
    """"gptq" (z - 1 stored), "gptq_v2" or "awq", from a model directory's config.json."""
    raw = json.loads(config.read_text())
    qc = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
    method = (qc or {}).get("quant_method")
    if method == "awq":
        return "awq"
    if method == "gptq":
        return "gptq_v2" if qc.get("checkpoint_format") == "gptq_v2" else "gptq"
    raise CheckpointError(f"{config}: tensors named qweight / qzeros / scales (GPTQ or AWQ), but "
                          f"quantization_config.quant_method is {method!r}")  # fmt: skip


class GptqAwqCheckpoint(CompressedCheckpoint):
    """One safetensors file of a GPTQ or AWQ checkpoint, read as a plain one (module docstring).
    `f`: its safe_open handle."""

    def _layout(self, keys: list[str]) -> None:
        config = Path(self.path).parent / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{self.path}: GPTQ / AWQ tensors, but no config.json beside "
                                  "it to say which")  # fmt: skip
        self._fmt = _format(config, config.stat().st_mtime)
        have = self._keys
        for k in keys:
            base, _, leaf = k.rpartition(".")
            if leaf == "qweight":
                self._quantized(base, have)
            elif leaf in _AUX and base + ".qweight" in have:
                continue
            else:
                self._present(k, k)

    def _quantized(self, base: str, have: set[str]) -> None:
        for part in _PARTS[1:]:
            if f"{base}.{part}" not in have:
                raise CheckpointError(f"{self.path}: {base}.qweight has no {part} beside it")
        qw, qz, sc = (self._f.get_slice(f"{base}.{p}") for p in _PARTS)
        (r, c), (gz, cz), (gs, out) = qw.get_shape(), qz.get_shape(), sc.get_shape()
        bad = qw.get_dtype() != "I32" or qz.get_dtype() != "I32"
        if self._fmt == "awq":
            bits, inp = 4, r
            bad = bad or c * 8 != out or cz != c
        else:
            bits = next((b for b in (4, 8) if out * b == cz * 32), None)
            inp = r * 32 // bits if bits else 0
            bad = bad or bits is None or c != out
        if bad or gz != gs or not gs or inp % gs or (inp // gs) % 32 and gs != 1:
            raise CheckpointError(
                f"{self.path}: {base}: qweight {qw.get_shape()}, qzeros {qz.get_shape()}, scales "
                f"{sc.get_shape()} are not a {self._fmt.upper()} layout of 4- or 8-bit codes in "
                "groups of 32k inputs"
            )
        if sc.get_dtype() not in ("BF16", "F16", "F32"):
            raise CheckpointError(f"{self.path}: {base}.scales is {sc.get_dtype()}: BF16, F16 or "
                                  "F32 scales are read")  # fmt: skip
        self._present(base + ".weight", base + ".qweight", (out, inp), sc.get_dtype())
        self._modules[base + ".weight"] = f"int{bits}"

    def _read_codes(self, key: str):
        base = key.removesuffix(".weight")
        out, inp = self._shapes[key]
        bits = 4 if self._modules[key] == "int4" else 8
        qw, qz = (self._f.get_tensor(f"{base}.{p}") for p in ("qweight", "qzeros"))
        scale = self._f.get_tensor(base + ".scales").float().t().contiguous()  # [out, groups]
        if self._fmt == "awq":
            u = _awq_unpack(qw)  # [in, out]
            z = _awq_unpack(qz)  # [groups, out]
        else:
            u = unpack(qw.t().contiguous(), bits, inp).t()  # along the input: [in, out]
            z = unpack(qz, bits, out)  # [groups, out]
            if self._fmt == "gptq":
                z = z + 1  # (z - 1 stored; unmasked, as AutoGPTQ's own dequantization)
        half = 1 << (bits - 1)
        q = u.t().to(torch.int16) - half  # [out, in], the stored u less the offset
        zp = (z.t().to(torch.int16) - half).contiguous()
        zp = zp if bool(zp.any()) else None
        return q.contiguous(), scale, zp, self._g_idx(base, inp, scale.shape[1], "g_idx")


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AWQ's 4-bit words [rows, n / 8] -> [rows, n] int16, outputs in order."""
    slots = unpack(words, 4, words.shape[1] * 8).view(words.shape[0], -1, 8)
    out = torch.empty_like(slots)
    out[..., list(_AWQ_ORDER)] = slots
    return out.view(words.shape[0], -1)
