"""Packed projections (layers/linear.py pack_linears): after post_load, the projections that
read the same input share one weight tensor; outputs, names and memory are unchanged."""

from __future__ import annotations

import json

import pytest
import torch

import tiny
from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
from qwen35.layers.linear import PACKED_MAX_ROWS
from qwen35.models.qwen3_5 import Qwen35ForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore")
PACKED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # + DeltaNet's in_proj_*


def _pair(moe: bool):
    hf = tiny.hf_model(moe=moe)
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    plain = Qwen35ForCausalLM(cfg, dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    packed = Qwen35ForCausalLM(cfg, dtype=torch.float32)
    packed.load_state_dict(hf.state_dict())
    packed.post_load()
    return plain, packed


def _packed_tensors(model):
    """Every packed weight, those that are views of another (a MoE block's shared expert's
    gate_up, inside the block's packed_router) left out."""
    out = []
    for m in model.modules():
        for name in ("packed_in", "packed_qkv", "packed_gate_up", "packed_router"):
            t = getattr(m, name, None)
            if t is not None:
                out.append(t)
    return [t for t in out if not any(t is not o and t._base is o for o in out)]


@pytest.mark.parametrize("moe", [False, True])
def test_packed_views_share_one_weight(moe):
    plain, packed = _pair(moe)
    assert list(packed.state_dict()) == list(plain.state_dict())  # names unchanged
    for (name, a), b in zip(plain.state_dict().items(), packed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tensors = _packed_tensors(packed)
    cfg = packed.config
    n_mlp = cfg.num_hidden_layers  # dense MLP or the MoE's shared expert
    assert len(tensors) == cfg.num_hidden_layers + n_mlp
    # every projection weight lies inside one packed tensor: no second copy of the weights
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    inside, padding = 0, 0
    for name, p in packed.named_parameters():
        leaf = name.rsplit(".", 2)[-2]  # the module: gate_proj in ...gate_proj.weight
        router = moe and leaf in ("gate", "shared_expert_gate")  # packed with the shared expert
        if leaf.startswith("in_proj_") or leaf in PACKED or router:
            assert any(a <= p.data_ptr() < b for a, b in spans), name
            assert p.is_contiguous()
            inside += p.numel()
    for m in packed.modules():  # zero rows to a multiple of 16 after a MoE block's four matrices
        if getattr(m, "packed_router", None) is not None:
            rows = m.gate.out_features + 2 * m.shared_expert.gate_proj.out_features + 1
            padding += (-rows % 16) * m.packed_router.shape[1]
            assert m.packed_router.shape[0] % 16 == 0
            assert not m.packed_router[rows:].any()
    assert inside + padding == sum(t.numel() for t in tensors)


def test_load_state_dict_after_packing_writes_the_packed_weight():
    _, packed = _pair(False)
    sd = {k: torch.zeros_like(v) for k, v in packed.state_dict().items()}
    packed.load_state_dict(sd)
    assert all(t.abs().sum() == 0 for t in _packed_tensors(packed))


def test_packed_weights_follow_model_to():
    # .to() gives every parameter new storage; the packed weights must move with them and the
    # parameters stay views of them (no stale copy on the old device or dtype)
    plain, packed = _pair(False)
    plain.to(torch.bfloat16)
    packed.to(torch.bfloat16)
    tensors = _packed_tensors(packed)
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors)
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    for name, p in packed.named_parameters():
        if name.rsplit(".", 2)[-2] in PACKED:
            assert any(a <= p.data_ptr() < b for a, b in spans), name
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(packed(ids), plain(ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("moe", [False, True])
def test_packed_equals_plain_prefill_then_decode(moe):
    """Prompts of 5, 40 and PACKED_MAX_ROWS + 20 tokens (packed path for the short steps,
    separate GEMMs above the threshold), then 3 batched decode steps: same logits."""
    plain, packed = _pair(moe)
    g = torch.Generator().manual_seed(1)
    lens = [5, 40, PACKED_MAX_ROWS + 20]
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lens]
    B, ctx = len(lens), max(lens) + 4
    outs = {}
    for name, model in (("plain", plain), ("packed", packed)):
        caches = allocate_caches(model.config, B, ctx, B, torch.float32, "cpu")
        got = []
        for i, p in enumerate(prompts):  # one prefill per step, sequence i in slot i
            batch = _single(i, len(p), 0, ctx)
            got.append(model(p, batch, caches))
        nxt = torch.stack([x[-1].argmax() for x in got])
        for step in range(3):
            batch = _decode([len(p) + step for p in prompts], ctx)
            logits = model(nxt, batch, caches)
            got.append(logits)
            nxt = logits.argmax(-1)
        outs[name] = got
    for a, b in zip(outs["plain"], outs["packed"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _single(i: int, n: int, start: int, ctx: int) -> ForwardBatch:
    return ForwardBatch.build(
        positions=torch.arange(start, start + n),
        cu_seqlens=[0, n],
        context_lens=[start + n],
        slot_mapping=torch.arange(start, start + n) + i * ctx,
        block_tables=torch.tensor([[i]], dtype=torch.int32),
        state_slots=torch.tensor([i]),
        has_initial_state=[start > 0],
        logits_indices=torch.tensor([n - 1]),
    )


def _decode(positions: list[int], ctx: int) -> ForwardBatch:
    B = len(positions)
    return ForwardBatch.build(
        positions=torch.tensor(positions),
        cu_seqlens=list(range(B + 1)),
        context_lens=[p + 1 for p in positions],
        slot_mapping=torch.tensor([i * ctx + p for i, p in enumerate(positions)]),
        block_tables=torch.arange(B, dtype=torch.int32)[:, None],
        state_slots=torch.arange(B),
        has_initial_state=[True] * B,
        logits_indices=torch.arange(B),
    )


@pytest.mark.parametrize("moe", [False, True])
def test_the_loader_allocates_each_pack_group_as_one(moe, tmp_path, monkeypatch):
    """loader.materialize allocates the linears each pack() packs as row slices of one tensor,
    so post_load's pack_linears copies nothing (torch.cat is never called) and the MoE router
    group's padding rows are zeros; the model is the one loaded the old way."""
    from qwen35.layers import linear
    from qwen35.loader import load_model

    tiny.save_checkpoint(tmp_path, moe=moe)
    plain = load_model(tmp_path, dtype="fp32", progress=False)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(linear.torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    model = load_model(tmp_path, dtype="fp32", progress=False)
    assert not calls
    for m in model.modules():
        if getattr(m, "packed_router", None) is not None:
            rows = m.gate.out_features + 2 * m.shared_expert.gate_proj.out_features + 1
            assert m.packed_router.shape[0] % 16 == 0 and not m.packed_router[rows:].any()
    for t in _packed_tensors(model):  # each its own storage, exactly
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    monkeypatch.undo()
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model(ids), plain(ids))


def test_pack_linears_copies_weights_that_are_not_laid_out():
    """Adjacent rows of a larger tensor (or of separate ones) are packed by a copy: the packed
    tensor owns its storage, whatever the linears' weights shared."""
    from qwen35.layers.linear import Linear, pack_linears

    big = torch.randn(10, 4)
    lins = [Linear(4, 3, torch.float32, "cpu"), Linear(4, 5, torch.float32, "cpu")]
    lins[0].weight = torch.nn.Parameter(big[0:3], False)
    lins[1].weight = torch.nn.Parameter(big[3:8], False)  # rows 8, 9 belong to something else
    rest = big[8:].clone()
    w = pack_linears(*lins, rows_multiple=16)
    assert w.shape == (16, 4) and torch.equal(w[:8], big[:8]) and not w[8:].any()
    assert torch.equal(big[8:], rest) and w.data_ptr() != big.data_ptr()
    assert lins[1].weight.data_ptr() == w[3:].data_ptr()
