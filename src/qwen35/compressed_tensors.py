"""compressed-tensors checkpoints (llm-compressor's format, `quant_method: "compressed-tensors"`
in config.json): RedHatAI's Qwen3.5 `quantized.w4a16` / `quantized.w8a8` / `FP8-dynamic`
releases, and the GPTQ / AWQ models llm-compressor saves (vLLM and SGLang load them).

weights.open_safetensors returns a `CompressedCheckpoint` for a safetensors file that holds such
tensors: the same interface (keys, get_slice, get_tensor), each quantized module's weight
presented as `<module>.weight` in its own shape and its scales' dtype, its values as the
library decompresses them (computed in fp32, rounded once to that dtype):

- pack-quantized (W4A16, W8A16): `weight_packed` int32 (codes u = q + 2^(b-1), b = 4 or 8 bits,
  32 / b to a word, the first in the low bits, along the input), `weight_shape`,
  `weight_scale` [out, in / group] (channel: [out, 1]; tensor: one), and when asymmetric
  `weight_zero_point` (packed alike along the output) -> (q - zp) * scale;
- int-quantized (W8A8): `weight` int8, `weight_scale` -> q * scale;
- float-quantized (FP8): `weight` e4m3 and `weight_scale`, kept FP8 in the official layout's
  names (config.py _compressed_fp8): 128 x 128 blocks and groups as stored, as
  `weight_scale_inv`; a channel's or the tensor's scale repeated over blocks of one row and 128
  inputs.

`quant_hint(key)` tells int4 / int8 storage the stored codes (quant/apply.py _int_linear), so
that the checkpoint's values are kept rather than quantized again: 4-bit weights become int4
groups on the stored lattices (step = scale, zero = -(8 + zp) * scale: exact up to the scales'
rounding to the model dtype), 8-bit integer ones int8 rows with the stored scales (per channel;
per group or tensor they are quantized again). The checkpoint's activation quantization (W8A8's
int8 inputs, FP8-dynamic's e4m3 ones) is not applied: inputs stay in the model dtype.
"""

from __future__ import annotations

import sys

import torch

from qwen35.quant.formats import Int8Rows, Lattice
from qwen35.weights import CheckpointError, PresentedSlice

# the tensors of a compressed module besides its weight (read with it, never presented)
_AUX = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
        "input_zero_point", "output_scale", "weight_global_scale",
        "input_global_scale")  # fmt: skip
# an attention layer's calibrated KV-cache scales (kv_cache_scheme): not read (the engine's
# --kv-cache-dtype decides; its fp8 cache is unscaled)
_KV_SCALES = (".k_scale", ".v_scale", ".q_scale")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_LATTICE_GROUPS = (128, 64, 32)  # int4 groups the kernels take (plan/params.py int4_group)


def is_compressed(keys) -> bool:
    """Whether a safetensors file's keys are compressed-tensors' (a quantized module's scale
    named `weight_scale`, not the official FP8 layout's `weight_scale_inv`, or packed codes)."""
    return any(k.endswith((".weight_packed", ".weight_scale")) for k in keys)


class CompressedCheckpoint:
    """One safetensors file of a compressed-tensors checkpoint, read as a plain one (module
    docstring). `f`: its safe_open handle."""

    hint_formats = ("int4", "int8", "fp8")  # storage quant_hint speaks to (weights.read_into)

    def __init__(self, f, path):
        self._f, self.path = f, path
        self._modules: dict[str, str] = {}  # presented key -> kind (int4, int8; rows: FP8 scale)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._raw: dict[str, str] = {}  # presented key -> the stored key it is read from
        self._last = None  # (key, _codes of it): the latest tensor's
        keys = list(f.keys())
        self._keys = set(keys)  # (a MoE shard holds ~10^5 keys: never a list per lookup)
        self._layout(keys)

    # ---- the layout ------------------------------------------------------------------------
    def _layout(self, keys: list[str]) -> None:
        path, have = self.path, self._keys
        for k in keys:
            base, _, leaf = k.rpartition(".")
            if leaf in _AUX and base + ".weight_packed" not in have and \
                    base + ".weight" not in have:  # fmt: skip
                raise CheckpointError(f"{path}: {k} has no weight beside it")
            if leaf == "weight_packed":
                self._packed(base, have)
            elif leaf == "weight" and base + ".weight_scale" in have:
                self._stored(base)
            elif leaf == "weight_scale" and self._is_fp8(base):
                self._fp8_scale(base)  # (as the official FP8 layout names it)
            elif leaf not in _AUX and not k.endswith(_KV_SCALES):
                self._present(k, k)

    def _present(self, key: str, raw: str, shape=None, dtype=None) -> None:
        sl = self._f.get_slice(raw)
        self._raw[key] = raw
        self._shapes[key] = tuple(shape if shape is not None else sl.get_shape())
        self._dtypes[key] = dtype or sl.get_dtype()

    def _packed(self, base: str, have: set[str]) -> None:
        for need in ("weight_shape", "weight_scale"):
            if f"{base}.{need}" not in have:
                raise CheckpointError(f"{self.path}: {base}.weight_packed has no {need} beside it")
        shape = self._f.get_tensor(f"{base}.weight_shape").tolist()
        packed = self._f.get_slice(f"{base}.weight_packed")
        if len(shape) != 2 or packed.get_dtype() != "I32" or len(packed.get_shape()) != 2:
            raise CheckpointError(f"{self.path}: {base}.weight_packed must be int32 [out, words] "
                                  f"with a weight_shape of [out, in], got {shape}")  # fmt: skip
        out, inp = shape
        words = packed.get_shape()[1]
        bits = next((b for b in (4, 8) if words == -(-inp * b // 32)), None)
        if packed.get_shape()[0] != out or bits is None:
            raise CheckpointError(
                f"{self.path}: {base}.weight_packed {packed.get_shape()} does not hold "
                f"{shape} in 4- or 8-bit codes (other widths are not read)"
            )
        self._present(base + ".weight", base + ".weight_packed", (out, inp),
                      self._scale_shape(base, out, inp))  # fmt: skip
        self._modules[base + ".weight"] = f"int{bits}"

    def _stored(self, base: str) -> None:
        sl = self._f.get_slice(base + ".weight")
        dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
        if dtype not in ("I8", "F8_E4M3") or len(shape) != 2:
            raise CheckpointError(f"{self.path}: {base}.weight is {dtype} {list(shape)} beside a "
                                  "weight_scale: int8 or e4m3 [out, in] is read")  # fmt: skip
        if dtype == "F8_E4M3":
            self._present(base + ".weight", base + ".weight")  # FP8 kept as FP8
            return
        self._present(base + ".weight", base + ".weight", shape, self._scale_shape(base, *shape))
        self._modules[base + ".weight"] = "int8"

    def _scale_shape(self, base: str, out: int, inp: int) -> str:
        """Checks the scale's shape; returns its dtype, the values'."""
        sl = self._f.get_slice(base + ".weight_scale")
        s = tuple(sl.get_shape())
        groups = s[1] if len(s) == 2 and s[0] == out else 1 if s in ((), (1,), (1, 1)) else None
        if groups is None or inp % groups or (groups > 1 and (inp // groups) % 32):
            raise CheckpointError(
                f"{self.path}: {base}.weight_scale {list(s)} is not a scale per output row and "
                f"group of 32k inputs, per row or per tensor of a [{out}, {inp}] weight"
            )
        if sl.get_dtype() not in ("BF16", "F16", "F32"):
            raise CheckpointError(f"{self.path}: {base}.weight_scale is {sl.get_dtype()}: "
                                  "BF16, F16 or F32 scales are read")  # fmt: skip
        return sl.get_dtype()

    def _is_fp8(self, base: str) -> bool:
        return base + ".weight" in self._keys and \
            self._f.get_slice(base + ".weight").get_dtype() == "F8_E4M3"  # fmt: skip

    def _fp8_scale(self, base: str) -> None:
        """An e4m3 weight's scale as the FP8 layout's `weight_scale_inv` [ceil(out / bo),
        ceil(in / bi)] (config.py _compressed_fp8): blocks and groups as stored, a channel's or
        the tensor's scale repeated over [out, ceil(in / 128)] (blocks of one row)."""
        out, inp = self._f.get_slice(base + ".weight").get_shape()
        s = tuple(self._f.get_slice(base + ".weight_scale").get_shape())
        if len(s) == 2 and s[1] > 1 or len(s) == 2 and s[0] < out:  # blocks, groups
            self._present(base + ".weight_scale_inv", base + ".weight_scale")
            return
        if s not in ((out, 1), (), (1,), (1, 1)):
            raise CheckpointError(f"{self.path}: {base}.weight_scale {list(s)} is not an FP8 "
                                  f"scale of a [{out}, {inp}] weight")  # fmt: skip
        key = base + ".weight_scale_inv"
        self._present(key, base + ".weight_scale", (out, -(-inp // 128)))
        self._modules[key] = "rows"

    # ---- safetensors' interface --------------------------------------------------------------
    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def keys(self) -> list[str]:
        return list(self._raw)

    def get_slice(self, key: str) -> PresentedSlice:
        if key not in self._raw:
            raise KeyError(key)
        return PresentedSlice(self, key)

    def get_tensor(self, key: str) -> torch.Tensor:
        kind = self._modules.get(key)
        if kind is None:
            return self._f.get_tensor(self._raw[key])
        if kind == "rows":  # an FP8 channel's / tensor's scale over blocks of one row
            s = self._f.get_tensor(self._raw[key])
            return s.reshape(-1, 1).expand(self._shapes[key]).contiguous()
        q, scale, zp, cols = self._codes(key)
        if cols is None:  # (groups of consecutive inputs)
            cols = torch.arange(q.shape[1]) // (q.shape[1] // scale.shape[1])
        w = q.float()
        if zp is not None:
            w -= zp.float()[:, cols]
        # (q - zp) * scale rounded once to the scales' dtype: the format's own values
        return w.mul_(scale[:, cols]).to(_DTYPES[self._dtypes[key]])

    def quant_hint(self, key: str):
        """The stored codes of a quantized weight as int4 / int8 storage keeps them: a Lattice
        (4-bit codes, in groups of up to 128 inputs) or Int8Rows (8-bit codes with one scale a
        row); None for a weight stored otherwise (8-bit per group or tensor: its values)."""
        kind = self._modules.get(key)
        if kind not in ("int4", "int8"):
            return None
        q, scale, zp, cols = self._codes(key)
        if cols is not None:  # groups by activation order: no lattice of consecutive inputs
            return None
        if kind == "int8":
            if zp is not None or scale.shape[1] != 1:
                return None
            return Int8Rows(q.to(torch.int8), scale[:, 0].contiguous())
        out, inp = q.shape
        g = inp // scale.shape[1]  # lattices of L inputs (a divisor of the group the kernels take)
        L = next((c for c in _LATTICE_GROUPS if g % c == 0), None)
        if L is None:
            return None
        zero = -8 * scale if zp is None else -(8 + zp.float()) * scale
        step, zero = (t.repeat_interleave(g // L, 1).contiguous() for t in (scale, zero))
        return Lattice(step, zero, (q + 8).to(torch.uint8))

    def _codes(self, key: str):
        """(q [out, in] int16, scale [out, groups] fp32, zp [out, groups] or None, cols): the
        value of weight (n, k) is (q - zp) * scale at group cols[k] (cols None: k // (in /
        groups); else an activation-ordered GPTQ checkpoint's g_idx). The last key's are kept:
        weights.read_into asks for a tensor's hint, then (where the hint does not stand for
        them) its values, which would read and unpack it twice."""
        if self._last is None or self._last[0] != key:
            self._last = None  # (the previous tensor's freed before this one is read)
            self._last = (key, self._read_codes(key))
        return self._last[1]

    def _read_codes(self, key: str):
        base = key.removesuffix(".weight")
        out, inp = self._shapes[key]
        kind = self._modules[key]
        bits = 4 if kind == "int4" else 8
        if self._raw[key].endswith("_packed"):  # codes u = q + 2^(bits - 1)
            q = unpack(self._f.get_tensor(base + ".weight_packed"), bits, inp) - (1 << bits - 1)
        else:  # int8 as stored
            q = self._f.get_tensor(base + ".weight").to(torch.int16)
        scale = self._f.get_tensor(base + ".weight_scale").float()
        if scale.numel() == 1 and out != 1:  # one scale for the tensor
            scale = scale.reshape(1, 1).expand(out, 1)
        scale = scale.reshape(out, -1).contiguous()
        zp = None
        if base + ".weight_zero_point" in self._keys:
            z = self._f.get_tensor(base + ".weight_zero_point")
            groups = scale.shape[1]
            if z.dtype == torch.int32:  # packed along the output: [out * bits / 32, groups]
                z = (unpack(z.t().contiguous(), bits, out) - (1 << bits - 1)).t()
            zp = z.to(torch.int16).reshape(out, groups)
            zp = zp if bool(zp.any()) else None  # (older writers stored zeros when symmetric)
        return q, scale, zp, self._g_idx(base, inp, scale.shape[1])

    def _g_idx(self, base: str, inp: int, groups: int, key: str = "weight_g_idx"):
        """A stored group index of the inputs ([in]), None when it is k // (in / groups)."""
        if f"{base}.{key}" not in self._keys:
            return None
        g = self._f.get_tensor(f"{base}.{key}").long()
        if g.shape != (inp,) or int(g.min()) < 0 or int(g.max()) >= groups:
            raise CheckpointError(f"{self.path}: {base}.{key} {list(g.shape)} does not map "
                                  f"{inp} inputs to {groups} groups")  # fmt: skip
        return None if torch.equal(g, torch.arange(inp) // (inp // groups)) else g


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 words [rows, n] as their bytes [rows, 4n] uint8, least significant first."""
    b = words.contiguous().view(torch.uint8).view(words.shape[0], -1, 4)
    return (b.flip(-1) if sys.byteorder == "big" else b).reshape(words.shape[0], -1)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed 32 / bits to an int32 along the last axis (code i of a word in its bits
    bits * i ..) -> [rows, n] int16 in [0, 2^bits) (bits 4 or 8; _pack's inverse)."""
    b = _bytes(words)
    if bits == 4:
        b = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(words.shape[0], -1)
    return b[:, :n].to(torch.int16)


# ---- writing (qwen35 quantize --to int4 | int8) -------------------------------------------
IGNORE = ["lm_head", "re:.*mlp[.]gate$", "re:.*shared_expert_gate$", "re:.*in_proj_[ab]$",
          "re:.*visual.*", "re:^mtp.*"]  # (what stays BF16: RedHatAI's recipes' list)  # fmt: skip


def compress(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """A [out, in] weight as compressed-tensors' pack-quantized module tensors (suffixes ->
    tensors): 4 bits asymmetric in groups of 128 inputs (integer zero points, the range
    including 0, as its MinMax observer), 8 bits symmetric per channel; scales in bf16, codes
    found against the stored scale. What `CompressedCheckpoint` reads back exactly."""
    out, inp = w.shape
    w = w.float()
    if bits == 4:
        v = w.view(out, inp // 128, 128)
        lo, hi = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        s = scale.float()
        zp = (-8 - (lo / s).round()).clamp(-8, 7)  # q = round(w / s + zp) in [-8, 7]
        # (zp added before rounding, as the library's quantize: the same codes at ties)
        q = ((v / s[..., None]) + zp[..., None]).round().clamp(-8, 7).view(out, inp)
        zp_rows = (zp.to(torch.int64) + 8).t().contiguous()  # [groups, out]: packed along out
        extra = {"weight_zero_point": _pack(zp_rows, 4).t().contiguous()}
    else:
        scale = (w.abs().amax(-1, keepdim=True) / 127.5).clamp(min=1e-12).to(torch.bfloat16)
        q = (w / scale.float()).round().clamp(-128, 127)
        extra = {}
    u = q.to(torch.int64) + (1 << (bits - 1))
    return {"weight_packed": _pack(u, bits), "weight_scale": scale,
            "weight_shape": torch.tensor([out, inp]), **extra}  # fmt: skip


def _pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, n] in [0, 2^bits) -> int32 words [rows, n * bits / 32], the first code of a
    word in its low bits (unpack's inverse)."""
    rows, n = u.shape
    if bits == 8:
        b = u.to(torch.uint8)
    else:
        pairs = u.to(torch.uint8).view(rows, n // 2, 2)
        b = pairs[..., 0] | (pairs[..., 1] << 4)
    b = b.contiguous().view(rows, -1, 4)
    b = b.flip(-1) if sys.byteorder == "big" else b
    return b.contiguous().view(torch.int32).view(rows, -1)


def quantization_config(bits: int) -> dict:
    """config.json's quantization_config for `compress`'s weights (llm-compressor's form)."""
    weights = {"num_bits": bits, "type": "int", "symmetric": bits == 8, "dynamic": False,
               "strategy": "group" if bits == 4 else "channel",
               "group_size": 128 if bits == 4 else None}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
    }
