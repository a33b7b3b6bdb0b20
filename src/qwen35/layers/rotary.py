"""Partial rotary position embedding, NeoX style (rotate_half), as in transformers' Qwen 3.5.

Only the first `rotary_dim` = head_dim * partial_rotary_factor dims rotate. For text the three
M-RoPE position streams are equal, so interleaved M-RoPE reduces to plain 1-D RoPE. cos/sin are
computed in fp32 and cast to the model dtype before use (section 1.9 of the architecture doc).
With YaRN (config.py `Yarn`: rope_type "yarn", or `--yarn FACTOR`) the frequencies are YaRN's and
cos / sin carry its attention factor, as transformers computes them.
"""

from __future__ import annotations

import math

import torch

from qwen35.config import Yarn
from qwen35.kernels import small_ops
from qwen35.ops.backend import Backend


class RotaryEmbedding:
    """Not a module: it holds no weights, so meta-device construction needs no buffers."""

    def __init__(self, rotary_dim: int, theta: float, mrope_section=(11, 11, 10),
                 yarn: Yarn | None = None):  # fmt: skip
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.mrope_section = tuple(mrope_section)
        self.yarn = yarn
        self.scale = yarn.cos_sin_scale() if yarn is not None else 1.0  # on cos and sin
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:  # [rotary_dim / 2] fp32
        if device not in self._inv_freq:
            # Same expressions as transformers' compute_default_rope_parameters and
            # _compute_yarn_parameters (on the CPU).
            d = self.rotary_dim
            if self.yarn is None:
                inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
            else:
                inv = yarn_inv_freq(self.yarn, d, self.theta)
            self._inv_freq[device] = inv.to(device)
        return self._inv_freq[device]

    def _cos_sin(self, emb: torch.Tensor, dtype: torch.dtype):
        if self.scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [T] int -> cos, sin: [T, rotary_dim] in dtype."""
        freqs = positions[:, None].float() * self.inv_freq(positions.device)  # [T, rd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, rd]
        return self._cos_sin(emb, dtype)

    def cos_sin_mrope(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions: [3, T] (t, h, w streams) -> cos, sin: [T, rotary_dim] in dtype.

        Interleaved M-RoPE as transformers: frequency i takes stream T, except i % 3 == 1
        (i < 3 * section[1]) from H and i % 3 == 2 (i < 3 * section[2]) from W. With three
        equal streams this gives bit for bit the 1-D cos_sin."""
        inv = self.inv_freq(positions.device)
        freqs = positions[:, :, None].float() * inv  # [3, T, rd/2]
        f = freqs[0].clone()
        for dim in (1, 2):
            idx = slice(dim, self.mrope_section[dim] * 3, 3)
            f[:, idx] = freqs[dim, :, idx]
        emb = torch.cat([f, f], dim=-1)  # [T, rd]
        return self._cos_sin(emb, dtype)


def yarn_inv_freq(yarn: Yarn, dim: int, base: float) -> torch.Tensor:
    """YaRN's frequencies [dim / 2] fp32: each dimension's interpolated (1 / factor) or kept
    frequency, by a linear ramp between the dimensions that turn beta_fast and beta_slow times
    over the original context (transformers' _compute_yarn_parameters, same expressions)."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (no singular ramp)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (yarn.factor * pos_freqs)
    keep = 1 - ramp  # 1: the frequency as trained (fast dimensions), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos, sin: [T, rd]. Rotates x[..., :rd], passes the rest through."""
    rd = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, rd]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat([x_rot * c + rotate_half(x_rot) * s, x_pass], dim=-1)


def apply_rotary_qk(
    q: torch.Tensor,  # [T, nh, hd]
    k: torch.Tensor,  # [T, nkv, hd]
    cos: torch.Tensor,  # [T, rd]
    sin: torch.Tensor,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k). With the backend's Triton pointwise kernels (GPU) or its C++ small ops
    (CPU): one call, q and k rotated in place (they must be the caller's temporaries); else
    `apply_rotary` on each."""
    if (
        backend is not None
        and backend.triton_pointwise
        and backend.on_gpu_path(q)
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and q.dtype == k.dtype == cos.dtype
    ):
        from qwen35.kernels import triton_pointwise

        triton_pointwise.rotary_qk_(q, k, cos.contiguous(), sin.contiguous())
        return q, k
    cpu = small_ops.for_backend(backend, q)
    if cpu is not None and q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == cos.dtype:
        cpu.rotary_qk_(q, k, cos.contiguous(), sin.contiguous())
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
