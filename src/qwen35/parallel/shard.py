"""Which part of each full parameter a tensor-parallel rank holds, and how to read just that part
of a checkpoint tensor (the same rules as `qwen35.plan.sharding`, which the planner counts with).

A rule is (dim, pieces): the rank's tensor is the concatenation, along `dim` of the full
parameter, of the ranges `pieces` [(start, length), ...]. Fused tensors split per component
(DeltaNet in_proj_qkv and conv1d per q | k | v; the experts' gate_up per gate | up), so every
rank gets its part of each. A checkpoint key covers a region of its parameter (all of it, or
one expert's gate, up or down slice); `copies` intersects region and pieces into the
(source index, destination index) pairs to copy, so a rank reads only its slices of the
memory-mapped file (safetensors `get_slice`). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.config import ModelConfig

Index = tuple  # of slices and ints


@dataclass(frozen=True)
class Rule:
    dim: int
    pieces: tuple[tuple[int, int], ...]


def _even(n: int, rank: int, size: int) -> tuple[tuple[int, int], ...]:
    return ((rank * (n // size), n // size),)


def _each(parts: tuple[int, ...], rank: int, size: int) -> tuple[tuple[int, int], ...]:
    """This rank's share of every component of a fused dimension."""
    out, base = [], 0
    for n in parts:
        out.append((base + rank * (n // size), n // size))
        base += n
    return tuple(out)


def shard_rule(
    name: str, shape: tuple[int, ...], cfg: ModelConfig, rank: int, size: int, ep: bool = False
) -> Rule | None:
    """The rule of parameter `name` (full shape `shape`) on `rank` of `size`; None: replicated."""
    if size == 1 or name.startswith("model.visual."):  # the vision tower is not split
        return None
    leaf = name.rsplit(".", 2)
    last = ".".join(leaf[-2:])
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = -(-shape[0] // size)
        first = rank * rows
        return Rule(0, ((first, max(0, min(rows, shape[0] - first))),))
    if ".self_attn." in name:
        hd = cfg.head_dim
        if last == "q_proj.weight":  # [2 nh hd, H], per-head [q | gate]: whole heads per rank
            return Rule(0, _even(shape[0], rank, size))
        if last in ("k_proj.weight", "v_proj.weight"):
            nkv = cfg.num_key_value_heads
            per = max(1, nkv // size)  # replicated one head per rank beyond nkv
            return Rule(0, ((rank * nkv // size * hd, per * hd),))
        if last == "o_proj.weight":
            return Rule(1, _even(shape[1], rank, size))
        return None  # q_norm, k_norm
    if ".linear_attn." in name:
        kd, vd = cfg.linear_key_dim, cfg.linear_value_dim
        if last in ("in_proj_qkv.weight", "conv1d.weight"):
            return Rule(0, _each((kd, kd, vd), rank, size))
        if last in ("in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight") or leaf[-1] in (
            "dt_bias",
            "A_log",
        ):
            return Rule(0, _even(shape[0], rank, size))
        if last == "out_proj.weight":
            return Rule(1, _even(shape[1], rank, size))
        return None  # norm
    if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H]
        if ep:
            return Rule(0, _even(shape[0], rank, size))
        return Rule(1, _each((shape[1] // 2, shape[1] // 2), rank, size))
    if name.endswith("mlp.experts.down_proj"):  # [E, H, I]
        return Rule(0, _even(shape[0], rank, size)) if ep else Rule(2, _even(shape[2], rank, size))
    if last in ("gate_proj.weight", "up_proj.weight"):  # dense MLP and shared expert
        return Rule(0, _even(shape[0], rank, size))
    if last == "down_proj.weight":
        return Rule(1, _even(shape[1], rank, size))
    return None  # norms, router, shared_expert_gate


def weight_of_scale(name: str) -> str | None:
    """The FP8 weight a block-scale parameter belongs to (None: not a scale)."""
    scales = (".weight_scale_inv", "experts.gate_up_proj_scale_inv", "experts.down_proj_scale_inv")
    return name.removesuffix("_scale_inv") if name.endswith(scales) else None


def scale_rule(rule: Rule | None, ndim: int, block: tuple[int, int], name: str) -> Rule | None:
    """The rank's part of an FP8 weight's block scales, from the weight's rule: whole blocks
    of the split dimension (column-parallel: output blocks; row-parallel: input blocks;
    expert-parallel: whole experts). The layout check (plan.sharding) refused every split that would cut a block."""
    if rule is None or (ndim == 3 and rule.dim == 0):
        return rule
    b = block[0] if rule.dim == ndim - 2 else block[1]  # out dim: block rows; in dim: columns
    if any(s % b or n % b for s, n in rule.pieces):
        from qwen35.plan.sharding import LayoutError

        raise LayoutError(f"{name}: the rank's slices {rule.pieces} cut {b}-wide FP8 blocks")
    return Rule(rule.dim, tuple((s // b, n // b) for s, n in rule.pieces))


def local_shape(rule: Rule | None, shape: tuple[int, ...], name: str, size: int) -> tuple:
    if rule is None:
        return tuple(shape)
    out = list(shape)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        out[0] = -(-shape[0] // size)  # padded: every rank the same rows
    else:
        out[rule.dim] = sum(n for _, n in rule.pieces)
    return tuple(out)


def copies(rule: Rule | None, region: list[tuple[int, int, bool]]) -> list[tuple[Index, Index]]:
    """(source index into the checkpoint tensor, destination index into the rank's parameter)
    pairs. region: per full dim (start, stop, kept) — the part of the parameter the checkpoint
    tensor covers; kept=False: the tensor has no such dim (one expert of a fused parameter)."""
    pieces_dim = rule.dim if rule is not None else -1
    out: list[tuple[Index, Index]] = []
    pieces = rule.pieces if rule is not None else ((0, 0),)
    offset = 0
    for s, n in pieces:
        src: list = []
        dst: list = []
        ok = True
        for d, (a, b, kept) in enumerate(region):
            if d != pieces_dim:
                if kept:
                    src.append(slice(None))
                    dst.append(slice(a, b))
                else:
                    dst.append(a)
                continue
            lo, hi = max(s, a), min(s + n, b)
            if lo >= hi:
                ok = False
                break
            if kept:
                src.append(slice(lo - a, hi - a))
                dst.append(slice(offset + lo - s, offset + hi - s))
            else:
                dst.append(offset + lo - s)
        offset += n
        if ok:
            out.append((tuple(src), tuple(dst)))
    return out
