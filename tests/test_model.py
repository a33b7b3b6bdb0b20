"""Our Qwen 3.5 model against transformers (the oracle) and against itself across cache paths."""

from __future__ import annotations

import json
import random

import pytest
import torch

import tiny
from qwen35.config import ModelConfig
from qwen35.engine.forward_batch import ForwardBatch, allocate_caches
from qwen35.models.qwen3_5 import Qwen35ForCausalLM, uncached_batch

pytestmark = pytest.mark.filterwarnings("ignore")


def _pair(moe=False, dtype=torch.float32, **overrides):
    hf = tiny.hf_model(moe=moe, **overrides)
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    ours = Qwen35ForCausalLM(cfg, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("moe", [False, True])
def test_logits_match_transformers_fp32(moe):
    hf, ours = _pair(moe)
    ids = torch.randint(0, 256, (2, 75), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    out = ours(ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("moe", [False, True])
def test_modules_match_transformers_bf16(moe):
    """Each token mixer and FFN fed transformers' own bf16 input gives its output within bf16
    rounding (whole-layer comparisons would let an ulp flip a MoE top-k choice)."""
    hf, ours = _pair(moe, dtype=torch.bfloat16)
    inv_freq = hf.model.rotary_emb.inv_freq.clone()
    hf = hf.to(torch.bfloat16)
    hf.model.rotary_emb.inv_freq = inv_freq  # from_pretrained keeps it fp32; .to() would round it
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(1))
    seen = {}

    def keep(key):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[key] = (x.reshape(-1, x.shape[-1]), out[0] if isinstance(out, tuple) else out)

        return hook

    hooks = []
    for i, layer in enumerate(hf.model.layers):
        mixer = layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn
        hooks.append(mixer.register_forward_hook(keep((i, "mixer")), with_kwargs=True))
        hooks.append(layer.mlp.register_forward_hook(keep((i, "mlp")), with_kwargs=True))
    with torch.no_grad():
        ref_logits = hf(ids).logits
    for h in hooks:
        h.remove()
    T = ids.shape[1]
    batch = uncached_batch(1, T, "cpu")
    cos, sin = ours.rotary.cos_sin(batch.positions, torch.bfloat16)
    for i, layer in enumerate(ours.model.layers):
        caches = allocate_caches(ours.config, 1, T, 1, torch.bfloat16, "cpu")
        x, ref = seen[(i, "mixer")]
        with torch.no_grad():
            if layer.layer_type == "linear_attention":
                y = layer.linear_attn(x, batch, caches.conv[0], caches.recurrent[0])
            else:
                y = layer.self_attn(x, cos, sin, batch, caches.key[0], caches.value[0])
            assert y.dtype == torch.bfloat16
            # DeltaNet reproduces transformers' op order; attention is SDPA vs its eager softmax
            tol = 1e-3 if layer.layer_type == "linear_attention" else 1e-2
            assert _rel(y, ref.reshape(y.shape)) < tol, (i, layer.layer_type)
            x, ref = seen[(i, "mlp")]
            y = layer.mlp(x)
            assert _rel(y, ref.reshape(y.shape)) < 1e-2, (i, "mlp")
    if not moe:  # dense logits stay within bf16 drift after 4 layers
        assert _rel(ours(ids), ref_logits) < 5e-2


def test_meta_construction_names_and_tie():
    hf = tiny.hf_model(tie_word_embeddings=True)
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    meta = Qwen35ForCausalLM(cfg, device="meta")
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in meta.state_dict().items()} == hf_shapes
    meta.to_empty(device="cpu")
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    meta.load_state_dict(hf.state_dict())
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert _rel(meta(ids), hf(ids).logits) < 1e-4


def test_bad_inputs_raise_clear_errors():
    _, ours = _pair()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ours(torch.zeros(5, dtype=torch.long))
    batch = uncached_batch(1, 4, "cpu")
    caches = allocate_caches(ours.config, 1, 4, 1, torch.float32, "cpu")
    with pytest.raises(ValueError, match="input ids for a ForwardBatch of 4 tokens"):
        ours(torch.zeros(3, dtype=torch.long), batch, caches)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ForwardBatch.build(
            positions=[0, 1], cu_seqlens=[1, 2], context_lens=[2], slot_mapping=[0, 1],
            block_tables=[[0]], state_slots=[0], has_initial_state=[False], logits_indices=[1],
        )  # fmt: skip


class Pager:
    """A minimal runner: shuffled blocks of `block_size`, fixed state slots, ForwardBatch steps."""

    def __init__(self, model, block_size=4, num_blocks=96, slots=None):
        self.model, self.bs = model, block_size
        self.caches = allocate_caches(model.config, num_blocks, block_size, 8, model.dtype, "cpu")
        self.free = random.Random(0).sample(range(num_blocks), num_blocks)
        self.slots = slots or {}
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, items, checkpoints=()):
        """items: [(seq_id, token ids)] -> logits of every new token, split per item."""
        pos, slot_map, cu, ctx, ids = [], [], [0], [], []
        for sid, toks in items:
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            for p in range(start, start + len(toks)):
                if p // self.bs >= len(table):
                    table.append(self.free.pop())
                slot_map.append(table[p // self.bs] * self.bs + p % self.bs)
            pos += range(start, start + len(toks))
            ids += list(toks)
            cu.append(cu[-1] + len(toks))
            ctx.append(start + len(toks))
        width = max(len(self.tables[s]) for s, _ in items) + 1
        tables = torch.zeros(len(items), width, dtype=torch.int32)
        for i, (sid, _) in enumerate(items):
            tables[i, : len(self.tables[sid])] = torch.tensor(self.tables[sid])
        batch = ForwardBatch.build(
            positions=torch.tensor(pos),
            cu_seqlens=cu,
            context_lens=ctx,
            slot_mapping=torch.tensor(slot_map),
            block_tables=tables,
            state_slots=torch.tensor([self.slots.setdefault(s, 7 - s) for s, _ in items]),
            has_initial_state=[self.lens.get(s, 0) > 0 for s, _ in items],
            logits_indices=torch.arange(cu[-1]),
            state_checkpoints=list(checkpoints),
        )
        logits = self.model(torch.tensor(ids), batch, self.caches)
        for sid, toks in items:
            self.lens[sid] = self.lens.get(sid, 0) + len(toks)
        return [logits[a:b] for a, b in zip(cu, cu[1:], strict=False)]


@pytest.mark.parametrize("moe", [False, True])
def test_chunked_prefill_then_decode_equals_whole(moe):
    _, ours = _pair(moe)
    ids = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(2))
    whole = ours(ids[None])[0]  # [80, V]
    pager = Pager(ours)
    got = pager.step([(0, ids[:66])])  # two 64-chunks, padded
    got += pager.step([(0, ids[66:75])])  # a chunk with initial state
    for t in range(75, 80):
        got += pager.step([(0, ids[t : t + 1])])  # decode
    assert _rel(torch.cat(got), whole) < 1e-4


def test_mixed_batch_equals_each_alone():
    _, ours = _pair()
    g = torch.Generator().manual_seed(3)
    seqs = {s: torch.randint(0, 256, (n,), generator=g) for s, n in enumerate([45, 21, 13, 1, 5])}
    pager = Pager(ours, block_size=16)
    pager.step([(0, seqs[0][:30]), (1, seqs[1][:20]), (2, seqs[2][:12])])
    out = pager.step(
        [(0, seqs[0][30:]), (1, seqs[1][20:]), (3, seqs[3]), (2, seqs[2][12:]), (4, seqs[4])]
    )
    starts = {0: 30, 1: 20, 3: 0, 2: 12, 4: 0}
    for (sid, start), got in zip(starts.items(), out, strict=True):
        alone = ours(seqs[sid][None])[0, start:]
        assert _rel(got, alone) < 1e-4, sid


def test_state_checkpoints_equal_running_the_prefix_alone():
    _, ours = _pair()
    ids = torch.randint(0, 256, (72,), generator=torch.Generator().manual_seed(4))
    pager = Pager(ours, slots={0: 1})
    pager.step([(0, ids[:70])], checkpoints=[(0, 20, 5), (0, 64, 6), (0, 70, 3)])
    pager.step([(0, ids[70:71])], checkpoints=[(0, 1, 4)])
    for n, dest in [(20, 5), (64, 6), (70, 3), (71, 4)]:
        alone = Pager(ours, slots={0: 2})
        alone.step([(0, ids[:n])])
        for name in ("conv", "recurrent"):
            for ours_c, ref_c in zip(
                getattr(pager.caches, name), getattr(alone.caches, name), strict=True
            ):
                torch.testing.assert_close(ours_c[dest], ref_c[2], atol=1e-5, rtol=1e-5)
