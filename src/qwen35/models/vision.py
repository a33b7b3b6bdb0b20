"""The Qwen 3.5 vision tower (`model.visual.*`), plain PyTorch, equal to transformers'
`Qwen3_5VisionModel` (architecture doc section 1.8).

Input: the flattened patches of every image / video of a step concatenated, [N, C*tp*p*p], and
their grids (t, h, w). Pipeline: patch embedding (the Conv3d as one matmul: kernel == stride, so
each patch is one dot product per output channel) + learned position embeddings resampled
bilinearly (align_corners) from the 48x48 table to each grid in 2x2-merge-block order ->
`depth` pre-LayerNorm blocks with 2-D rotary attention, bidirectional within each frame
(cu_seqlens over the packed patches, no padding) -> the merger (LayerNorm, 2x2 concat, MLP).
Output: [N / merge^2, out_hidden_size], the rows that replace the image pad tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import VisionConfig
from qwen35.layers.linear import empty_param, gemm
from qwen35.layers.rotary import rotate_half


class BiasLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, dtype, device):
        super().__init__()
        self.weight = empty_param(n_out, n_in, dtype=dtype, device=device)  # [out, in]
        self.bias = empty_param(n_out, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # bf16-stored under fp32 compute (quant/apply.py): widened per call
        return gemm(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, dtype, device, eps: float = 1e-6):
        super().__init__()
        self.weight = empty_param(dim, dtype=dtype, device=device)
        self.bias = empty_param(dim, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class PatchEmbed(nn.Module):
    def __init__(self, vc: VisionConfig, dtype, device):
        super().__init__()
        k = (vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Module()
        self.proj.weight = empty_param(vc.hidden_size, *k, dtype=dtype, device=device)
        self.proj.bias = empty_param(vc.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C*tp*p*p] -> [N, D]
        w = self.proj.weight
        return gemm(x.to(w.dtype), w.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, vc: VisionConfig, dtype, device):
        super().__init__()
        self.num_heads = vc.num_heads
        self.head_dim = vc.hidden_size // vc.num_heads
        self.qkv = BiasLinear(vc.hidden_size, 3 * vc.hidden_size, dtype, device)
        self.proj = BiasLinear(vc.hidden_size, vc.hidden_size, dtype, device)

    def forward(self, x, cos, sin, cu_seqlens: list[int]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)  # [N, nh, hd]
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        out = torch.empty_like(q)
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=False):  # one frame at a time, no padding
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # [1, nh, L, hd]
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return self.proj(out.reshape(N, -1))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, nh, hd]; cos/sin [N, hd] fp32; rotated in fp32 as transformers does."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class VisionBlock(nn.Module):
    def __init__(self, vc: VisionConfig, dtype, device):
        super().__init__()
        self.norm1 = LayerNorm(vc.hidden_size, dtype, device)
        self.norm2 = LayerNorm(vc.hidden_size, dtype, device)
        self.attn = VisionAttention(vc, dtype, device)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = BiasLinear(vc.hidden_size, vc.intermediate_size, dtype, device)
        self.mlp.linear_fc2 = BiasLinear(vc.intermediate_size, vc.hidden_size, dtype, device)

    def forward(self, h, cos, sin, cu_seqlens):
        h = h + self.attn(self.norm1(h), cos, sin, cu_seqlens)
        m = F.gelu(self.mlp.linear_fc1(self.norm2(h)), approximate="tanh")  # gelu_pytorch_tanh
        return h + self.mlp.linear_fc2(m)


class PatchMerger(nn.Module):
    def __init__(self, vc: VisionConfig, dtype, device):
        super().__init__()
        d = vc.hidden_size * vc.spatial_merge_size**2
        self.norm = LayerNorm(vc.hidden_size, dtype, device)
        self.linear_fc1 = BiasLinear(d, d, dtype, device)
        self.linear_fc2 = BiasLinear(d, vc.out_hidden_size, dtype, device)
        self.merged_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N/4, out]
        x = self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # exact (erf) GELU


class VisionModel(nn.Module):
    def __init__(self, vc: VisionConfig, dtype=None, device=None):
        super().__init__()
        self.config = vc
        self.patch_embed = PatchEmbed(vc, dtype, device)
        self.pos_embed = nn.Module()
        self.pos_embed.weight = empty_param(vc.num_position_embeddings, vc.hidden_size,
                                            dtype=dtype, device=device)  # fmt: skip
        self.blocks = nn.ModuleList(VisionBlock(vc, dtype, device) for _ in range(vc.depth))
        self.merger = PatchMerger(vc, dtype, device)
        self.side = int(vc.num_position_embeddings**0.5)
        hd = vc.hidden_size // vc.num_heads
        # axial rope: hd/4 frequencies per axis (theta 10000), [h freqs | w freqs] twice
        # built on the CPU explicitly: the loader constructs models under torch.device("meta")
        ar = torch.arange(0, hd // 2, 2, dtype=torch.float, device="cpu")
        self._inv_freq = 1.0 / (10000.0 ** (ar / (hd // 2)))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels [N, C*tp*p*p] (all items concatenated), grids (t, h, w) per item
        -> [N / merge^2, out_hidden_size] in the tower's dtype."""
        dev = self.pos_embed.weight.device
        h = self.patch_embed(pixels.to(dev))  # [N, D]
        pos, cos, sin, cu = [], [], [], [0]
        for t, gh, gw in grids:
            p = self._pos_embed(gh, gw)  # [gh*gw, D] fp32
            c, s = self._rope(gh, gw, dev)  # [gh*gw, hd]
            pos += [p] * t
            cos += [c] * t
            sin += [s] * t
            cu += [cu[-1] + gh * gw * (i + 1) for i in range(t)]
        if cu[-1] != h.shape[0]:
            raise ValueError(f"grids {grids} cover {cu[-1]} patches, pixels have {h.shape[0]}")
        h = h + torch.cat(pos).to(h.dtype)
        cos, sin = torch.cat(cos), torch.cat(sin)
        for blk in self.blocks:
            h = blk(h, cos, sin, cu)
        return self.merger(h)

    def _block_order(self, gh: int, gw: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of each patch in 2x2-merge-block order: [gh*gw] each."""
        m = self.config.spatial_merge_size
        rows = torch.arange(gh, device=dev)[:, None].expand(gh, gw)
        cols = torch.arange(gw, device=dev)[None, :].expand(gh, gw)
        shape = (gh // m, m, gw // m, m)
        return (rows.reshape(shape).transpose(1, 2).flatten(),
                cols.reshape(shape).transpose(1, 2).flatten())  # fmt: skip

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """The 48x48 table resampled to gh x gw (bilinear, align_corners): [gh*gw, D] fp32."""
        w = self.pos_embed.weight
        row, col = self._block_order(gh, gw, w.device)
        side = self.side

        def taps(idx, size):
            src = idx.float() * (side - 1) / max(size - 1, 1)
            fl = src.floor()
            off = torch.arange(2, device=idx.device)
            tap = (fl.long()[:, None] + off).clamp(0, side - 1)
            return tap, (1 - (src[:, None] - fl[:, None] - off).abs()).clamp(min=0)

        ht, hw_ = taps(row, gh)
        wt, ww = taps(col, gw)
        idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wts = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        return (F.embedding(idx, w) * wts[:, :, None]).sum(1)

    def _rope(self, gh: int, gw: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        row, col = self._block_order(gh, gw, dev)
        inv = self._inv_freq.to(dev)
        f = torch.cat([row[:, None].float() * inv, col[:, None].float() * inv], dim=-1)
        emb = torch.cat([f, f], dim=-1)  # [gh*gw, hd]
        return emb.cos(), emb.sin()
