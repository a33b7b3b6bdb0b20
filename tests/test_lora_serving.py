"""LoRA adapters served per request (`lora_modules`, layers/lora.py, engine/lora_adapters.py):
the oracle is peft on transformers' model. One forward mixes rows of two adapters and of the
base model; each row's logits must equal peft's for its adapter (or the plain model's). The
engine's tokens with an adapter equal an engine's on the checkpoint merged with it (`qwen35
quantize --lora`, itself checked against peft), batched == alone, the prefix cache never
crosses adapters, quantized bases add the adapters once, and adapters that cannot be served
are refused before anything is attached."""

from __future__ import annotations

import json

import pytest
import torch

from qwen35.engine.forward_batch import allocate_caches
from qwen35.engine.lora_adapters import LoraAdapters
from qwen35.errors import Qwen35Error
from qwen35.layers import linear as linear_mod
from qwen35.layers.linear import Linear
from qwen35.lora import LoraError
from qwen35.models.qwen3_5 import uncached_batch
from qwen35.request import SamplingParams
from tiny import (
    LORA_TARGETS,
    hf_model,
    hf_torch_path,
    hub_snapshot,
    save_checkpoint,
    save_lora_adapter,
)

peft = pytest.importorskip("peft", reason="peft (the [test] extra) is the oracle of LoRA adapters")

IDS = [5, 17, 99, 3, 42, 7, 200, 11, 64, 128, 9, 33]
ALL = [*LORA_TARGETS, "in_proj_a", "in_proj_b"]  # every projection of the decoder


def hf_logits(m, ids=IDS) -> torch.Tensor:
    with hf_torch_path(), torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def ckpt(request, tmp_path_factory):
    """A tiny checkpoint, two adapters on it and peft's logits: {base, a, b, want: {..}}."""
    moe = request.param
    d = tmp_path_factory.mktemp("moe" if moe else "dense")
    hf = save_checkpoint(d / "base", moe=moe)
    want = {None: hf_logits(hf)}
    targets = ALL + (["shared_expert_gate"] if moe else [])  # MoE: the shared expert too
    want["a"] = hf_logits(save_lora_adapter(hf, d / "a", seed=1, targets=targets))
    # another rank and rsLoRA on a fresh copy of the same weights
    pm = save_lora_adapter(hf_model(moe, 0), d / "b", seed=2, r=8, use_rslora=True)
    want["b"] = hf_logits(pm)
    assert (want["a"] - want[None]).abs().max() > 1e-2 and (want["b"] - want["a"]).abs().max() > 1e-2
    return {"dir": d, "moe": moe, "want": want}


def load(ckpt, **kw):
    from qwen35.loader import load_model

    return load_model(str(ckpt["dir"] / "base"), dtype="fp32", vision=False, **kw)


def mixed_forward(model, ids_of: dict) -> dict:
    """One forward of a sequence per adapter name (None: the base model) -> logits per name;
    ids_of: name -> the adapter's key (LoadedLora.key)."""
    names = list(ids_of)
    T = len(IDS)
    caches = allocate_caches(model.config, len(names), T, len(names), model.dtype, "cpu")
    batch = uncached_batch(len(names), T, "cpu")
    if model.lora_step.stacked:  # each row's slot
        batch.lora_slots = torch.tensor([ids_of[n] or 0 for n in names]).repeat_interleave(T)
    else:
        batch.lora = [(ids_of[n], torch.arange(i * T, (i + 1) * T)) for i, n in enumerate(names)
                      if n is not None]  # fmt: skip
    out = model(torch.tensor(IDS * len(names)), batch, caches).view(len(names), T, -1)
    return {n: out[i] for i, n in enumerate(names)}


@pytest.mark.parametrize("stacked", [False, True], ids=["per-adapter", "stacked"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-linear"])
def test_one_forward_mixes_adapters_and_base(ckpt, packed, stacked, monkeypatch):
    """Per adapter (CPUs) and stacked into slots (GPUs; layers/lora.py LoraSlots) alike."""
    if not packed:  # prefills longer than this take one matmul per projection
        monkeypatch.setattr(linear_mod, "PACKED_MAX_ROWS", 0)
    model = load(ckpt)
    reg = LoraAdapters(model, 4, max_rank=8, stacked=stacked)
    ids = {None: None, "a": reg.add("a", ckpt["dir"] / "a").key,
           "b": reg.add("b", ckpt["dir"] / "b").key}  # fmt: skip
    got = mixed_forward(model, ids)
    for name, want in ckpt["want"].items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-4, msg=f"adapter {name}")
    # one adapter for every row (rows None), and after unloading: the base model again
    batch_all = mixed_forward(model, {"a": ids["a"]})
    torch.testing.assert_close(batch_all["a"], ckpt["want"]["a"], rtol=0, atol=1e-4)
    reg.remove("a")
    if stacked:  # a later adapter takes the freed slot, whose old rows are gone
        ids["a"] = reg.add("a2", ckpt["dir"] / "a").key
        assert ids["a"] == 1
        got = mixed_forward(model, ids)
        for name, want in ckpt["want"].items():
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-4)
        reg.remove("a2")
    reg.remove("b")
    if not stacked:
        assert not [m for m in model.modules() if isinstance(m, Linear) and m.lora is not None]
    else:
        assert all(m.lora.a.abs().sum() == 0 for m in model.modules()
                   if isinstance(m, Linear) and m.lora is not None)  # fmt: skip
    torch.testing.assert_close(model(torch.tensor([IDS]))[0], ckpt["want"][None], rtol=0,
                               atol=1e-4)  # fmt: skip


def test_stacked_slots_replay_in_decode_graphs(ckpt):
    """Stacked adapters in the static-buffer decode step a CUDA graph replays (run eagerly on a
    CPU, through the GPU backend's PyTorch ops): no host sync in the forward, and each row's
    logits equal the plain step's (rows of the base model, adapter a and adapter b; a bucket
    of four, so one padding row)."""
    from qwen35.engine.cuda_graphs import DecodeGraphs
    from qwen35.engine.forward_batch import ForwardBatch, ModelCaches
    from qwen35.ops.backend import Backend
    from test_backend import HostSyncs, _watched

    model = load(ckpt)
    reg = LoraAdapters(model, 4, max_rank=8, stacked=True)
    keys = [0, reg.add("a", ckpt["dir"] / "a").key, reg.add("b", ckpt["dir"] / "b").key]
    be, bs, T = Backend("cuda", grouped_mm=True), 16, len(IDS)  # (MoE: no host-read counts)
    caches = allocate_caches(model.config, 100, bs, 9, model.dtype, "cpu")

    def batch_of(lens, new):  # sequence i: blocks 20i.., state slot i
        pos = [p for n, k in zip(lens, new, strict=True) for p in range(n, n + k)]
        seq = [i for i, k in enumerate(new) for _ in range(k)]
        cu = [0]
        for k in new:
            cu.append(cu[-1] + k)
        return ForwardBatch.build(
            positions=pos, cu_seqlens=cu, context_lens=[n + k for n, k in zip(lens, new, strict=True)],
            slot_mapping=[(20 * i + p // bs) * bs + p % bs for i, p in zip(seq, pos, strict=True)],
            block_tables=[list(range(20 * i, 20 * i + 20)) for i in range(3)],
            state_slots=[0, 1, 2], has_initial_state=[n > 0 for n in lens],
            logits_indices=[c - 1 for c in cu[1:]], backend=be,
        ), torch.tensor([keys[i] for i in seq])  # fmt: skip

    prefill, slots = batch_of([0, 0, 0], [T, T, T])
    prefill.lora_slots = slots
    model(torch.tensor(IDS * 3), prefill, caches)
    copy = ModelCaches(*[[t.clone() for t in ts] for ts in
                         (caches.key, caches.value, caches.conv, caches.recurrent)],
                       block_size=bs)  # fmt: skip
    graphs = DecodeGraphs(model, copy, be, 4, 20, pad_block=99, pad_slot=8)
    graphs.eager = True
    syncs = HostSyncs()
    graphs.model = lambda *a: _watched(syncs, model, *a)
    lens = [T, T, T]
    for tok in ([3, 4, 5], [9, 9, 9]):
        step, slots = batch_of(lens, [1, 1, 1])
        step.lora_slots = slots
        want = model(torch.tensor(tok), step, caches)
        assert graphs.can_run(step)
        got = graphs.run(torch.tensor(tok), step)
        assert not syncs.seen, sorted(set(syncs.seen))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        lens = [n + 1 for n in lens]
    assert (want[1] - want[0]).abs().max() > 1e-3  # the rows' adapters differ


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_bases_add_each_adapter_once(ckpt, quantization):
    """int8 / FP8 projections run packed by format (quant/packing.py; a run of one linear calls
    its matmul): the adapters are added once, as on the per-linear path."""
    model = load(ckpt, quantization=quantization)
    aid = LoraAdapters(model, 4).add("a", ckpt["dir"] / "a").key
    packed = mixed_forward(model, {None: None, "a": aid})
    for m in model.modules():  # the per-linear path: every Linear.forward adds its own delta
        for attr in ("packed_in", "packed_qkv", "packed_gate_up", "packed_router"):
            if getattr(m, attr, None) is not None:
                setattr(m, attr, None)
    single = mixed_forward(model, {None: None, "a": aid})
    torch.testing.assert_close(packed["a"], single["a"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[None], single[None], rtol=1e-4, atol=1e-4)
    # what the adapter does, as in full precision (give or take the quantization's error),
    # not twice that
    shift = ckpt["want"]["a"] - ckpt["want"][None]
    got = packed["a"] - packed[None]
    assert (got - shift).norm() < 0.5 * shift.norm() < (got - 2 * shift).norm()


def test_bf16_model_adds_fp32_deltas(ckpt):
    """A bf16 model: the adapters' products run in fp32 and are added to the bf16 outputs."""
    from qwen35.loader import load_model

    model = load_model(str(ckpt["dir"] / "base"), dtype="bf16", vision=False)
    aid = LoraAdapters(model, 4).add("a", ckpt["dir"] / "a").key
    got = mixed_forward(model, {None: None, "a": aid})
    want = ckpt["want"]
    for name, tol in ((None, 0.02), ("a", 0.1)):  # within bf16's error of the fp32 oracle
        err = (got[name] - want[name]).norm() / want[name].norm()  # (the adapted model is
        assert err < tol, (name, err)  # further off: ~0.045 here, a merged bf16 copy ~0.07)
    assert (got["a"] - got[None]).norm() > 0.5 * (want["a"] - want[None]).norm()


# ---- the engine -----------------------------------------------------------------------------
def engine(path, **kw):
    from qwen35.engine.llm_engine import LLMEngine

    opts = dict(dtype="fp32", max_model_len=256, max_num_seqs=8, max_memory="256MiB",
                verbose=False, text_only=True)  # fmt: skip
    return LLMEngine(str(path), **{**opts, **kw})


def run(eng, reqs: list[tuple[list[int], str | None]], max_tokens: int = 12) -> list[list[int]]:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (ids, lora) in enumerate(reqs):
        eng.add_request(f"r{i}", ids, sp, lora=lora)
    toks: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            toks.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            cached[out.request_id] = out.num_cached_tokens
    run.cached = [cached[f"r{i}"] for i in range(len(reqs))]
    return [toks[f"r{i}"] for i in range(len(reqs))]


def test_engine_tokens_equal_the_merged_checkpoint_batched_and_alone(ckpt, tmp_path):
    from qwen35.quant.checkpoint import convert_checkpoint

    d = ckpt["dir"]
    eng = engine(d / "base", lora_modules={"a": str(d / "a"), "b": str(d / "b")})
    p1, p2 = IDS, [7, 3, 99, 12, 5, 61, 2]
    reqs = [(p1, None), (p1, "a"), (p2, "b"), (p2, "a"), (p1, "b")]
    together = run(eng, reqs)
    alone = [run(eng, [r])[0] for r in reqs]
    assert together == alone
    assert together[0] != together[1] and together[1] != together[4]  # the adapters matter
    for name in ("a", "b"):
        merged = convert_checkpoint(d / "base", tmp_path / name, to="bf16", lora=d / name)
        want = run(engine(merged), [(p1, None), (p2, None)])
        got = run(eng, [(p1, name), (p2, name)])
        assert got == want, name
    # a base request while adapters are loaded = an engine without them (the CPU decode plan)
    assert run(engine(d / "base"), [(p1, None)])[0] == together[0]
    # stacked slots (a GPU's layout) give the same tokens; an adapter of a larger rank than
    # the slots is refused by name of the flag
    mods = {"a": str(d / "a"), "b": str(d / "b")}
    assert run(engine(d / "base", lora_modules=mods, lora_stacked=True, max_lora_rank=8),
               reqs) == together  # fmt: skip
    with pytest.raises(LoraError, match="--max-lora-rank 8"):
        engine(d / "base", lora_modules=mods, lora_stacked=True, max_lora_rank=4)


def test_cpu_decode_plan_adds_the_adapters(ckpt, monkeypatch):
    """Batch-1 CPU decode steps run models/cpu_decode.py's plan, adapters included: the same
    tokens as the module path."""
    from qwen35.models import cpu_decode

    d = ckpt["dir"]
    eng = engine(d / "base", lora_modules={"a": str(d / "a")})
    runs = []
    real_run = cpu_decode.DecodePlan.run
    monkeypatch.setattr(cpu_decode.DecodePlan, "run",
                        lambda self, *a: runs.append(1) or real_run(self, *a))  # fmt: skip
    reqs = [(IDS, "a")]
    planned = run(eng, reqs, 16)
    assert len(runs) >= 14  # every decode step
    monkeypatch.setattr(cpu_decode.DecodePlan, "applies", staticmethod(lambda batch: False))
    assert run(eng, reqs, 16) == planned
    assert planned != run(eng, [(IDS, None)], 16)


def test_prefix_cache_is_kept_per_adapter(ckpt):
    d = ckpt["dir"]
    eng = engine(d / "base", lora_modules={"a": str(d / "a")})
    prompt = [(7 * i + 3) % 250 for i in range(40)]  # two full blocks of 16
    base = run(eng, [(prompt, None)])
    a1 = run(eng, [(prompt, "a")])
    assert run.cached == [0]  # the base model's blocks are not the adapter's
    a2 = run(eng, [(prompt, "a")])
    assert run.cached[0] >= 16 and a2 == a1  # the adapter's own are
    assert run(eng, [(prompt, None)]) == base and run.cached[0] >= 16
    # reloaded under the same name (other weights): the old blocks no longer match
    eng.remove_lora("a")
    eng.add_lora("a", d / "b")
    run(eng, [(prompt, "a")])
    assert run.cached == [0]


def test_adapter_by_hub_id_from_the_local_cache(ckpt, tmp_path, monkeypatch):
    """A Hub id resolves as model ids do: the Hugging Face cache first (offline here)."""
    import shutil

    shutil.copytree(ckpt["dir"] / "a", hub_snapshot(tmp_path, monkeypatch, "test-org/sql-lora"))
    model = load(ckpt)
    key = LoraAdapters(model, 2).add("sql", "test-org/sql-lora").key
    torch.testing.assert_close(mixed_forward(model, {"sql": key})["sql"], ckpt["want"]["a"],
                               rtol=0, atol=1e-4)  # fmt: skip
    with pytest.raises(LoraError, match="local adapter directory"):
        LoraAdapters(model, 2).add("x", "test-org/not-cached")


def test_speculative_decoding_with_an_adapter(tmp_path):
    """Drafts come from the base model's MTP head; the adapter's verification decides: the
    same tokens as without drafts."""
    hf = save_checkpoint(tmp_path / "base", mtp=True)
    save_lora_adapter(hf, tmp_path / "a", seed=3, targets=ALL)
    mods = {"a": str(tmp_path / "a")}
    prompts = [(IDS, "a"), ([9, 8, 7, 6, 5], None), ([3, 4, 5], "a")]
    want = run(engine(tmp_path / "base", lora_modules=mods), prompts, 16)
    for k in (1, 3):
        spec = engine(tmp_path / "base", lora_modules=mods, num_speculative_tokens=k)
        assert run(spec, prompts, 16) == want, k


@pytest.mark.parametrize("stacked", [False, True], ids=["per-adapter", "stacked"])
def test_tensor_parallel_ranks_shard_the_adapters(ckpt, stacked):
    """2 ranks (a spawned worker): each holds its part of every adapter (column-parallel
    projections: B's rows, row-parallel: A's columns, summed by the layer's all-reduce); the
    tokens equal one process's, for adapters given at start and loaded / unloaded at run time."""
    d = ckpt["dir"]
    reqs = [(IDS, None), (IDS, "a"), ([7, 3, 99, 12, 5], "b"), ([4, 4, 8], "a")]
    kw = dict(lora_modules={"a": str(d / "a")}, enable_lora=True, max_lora_rank=8,
              lora_stacked=stacked)  # fmt: skip
    one = engine(d / "base", **kw)
    one.add_lora("b", d / "b")
    want = run(one, reqs)
    tp = engine(d / "base", tensor_parallel_size=2, **kw)
    try:
        tp.add_lora("b", d / "b")
        assert run(tp, reqs) == want
        tp.remove_lora("a")
        tp.add_lora("a", d / "a")  # (stacked: back into slot 1, freed just before)
        assert run(tp, reqs) == want
    finally:
        tp.shutdown()


def _adapter(path, tensors: dict, **cfg):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg})
    )
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_refusals(ckpt, tmp_path, monkeypatch):
    d = ckpt["dir"]
    eng = engine(d / "base", lora_modules={"a": str(d / "a")}, max_loras=2)
    with pytest.raises(Qwen35Error, match=r"no LoRA adapter named 'zz'.*loaded: a"):
        eng.add_request("x", IDS, SamplingParams(max_tokens=2), lora="zz")
    pre = "base_model.model.model.language_model.layers.0."
    la = eng.model.model.layers[0].linear_attn
    H, V = eng.config.hidden_size, eng.config.vocab_size
    good = {pre + "linear_attn.out_proj.lora_A.weight": torch.ones(2, la.value_dim),
            pre + "linear_attn.out_proj.lora_B.weight": torch.ones(H, 2)}  # fmt: skip
    head = {"base_model.model.lm_head.lora_A.weight": torch.ones(2, H),
            "base_model.model.lm_head.lora_B.weight": torch.ones(V, 2)}  # fmt: skip
    wrong = {pre + "self_attn.o_proj.lora_A.weight": torch.ones(2, H + 1),  # (layer 0: DeltaNet)
             pre + "self_attn.o_proj.lora_B.weight": torch.ones(H, 2)}  # fmt: skip
    wrong = {k.replace("layers.0.", "layers.3."): v for k, v in wrong.items()}
    for tensors, match in ((head, "lm_head"), (wrong, "o_proj is")):
        bad = _adapter(tmp_path / match.split()[0], {**good, **tensors})
        with pytest.raises(LoraError, match=match):
            eng.add_lora("bad", bad)
        # all or nothing: the good module of that adapter was not attached either
        out_proj = eng.model.model.layers[0].linear_attn.out_proj
        assert out_proj.lora is None or len(out_proj.lora.pairs) == 1  # (adapter a's only)
        assert eng.list_loras() == {"a": str(d / "a")}
    with pytest.raises(Qwen35Error, match="already loaded"):
        eng.add_lora("a", d / "b")
    real_to, calls = torch.Tensor.to, []

    def oom_on_fifth(self, *a, **k):  # the device runs out of memory half-way through
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", oom_on_fifth)
    with pytest.raises(LoraError, match="not enough cpu memory"):
        eng.add_lora("big", d / "b")
    monkeypatch.undo()
    assert len(calls) == 5 and eng.list_loras() == {"a": str(d / "a")}
    assert all(len(m.lora.pairs) == 1 for m in eng.model.modules()
               if isinstance(m, Linear) and m.lora is not None)  # fmt: skip
    eng.add_lora("b", d / "b")
    with pytest.raises(Qwen35Error, match="max-loras"):
        eng.add_lora("c", d / "b")
    eng.add_request("busy", IDS, SamplingParams(max_tokens=4), lora="b")
    with pytest.raises(Qwen35Error, match="in use by 1 request"):
        eng.remove_lora("b")
    while eng.has_unfinished_requests():
        eng.step()
    eng.remove_lora("b")
    assert set(eng.list_loras()) == {"a"}
    plain = engine(d / "base")
    with pytest.raises(Qwen35Error, match="serves none"):
        plain.add_request("x", IDS, SamplingParams(max_tokens=2), lora="a")
    with pytest.raises(Qwen35Error, match="enable_lora"):
        plain.add_lora("a", d / "a")


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"lora_modules": ["noequals"]}, "NAME=PATH"),
        ({"lora_modules": ["a=/x", "a=/y"]}, "twice"),
        ({"lora_modules": ['{"name": "a"}']}, '"name" and "path"'),
        ({"lora_modules": ["{broken"]}, "not valid JSON"),
        ({"lora_modules": {"a": "/x", "b": "/y"}, "max_loras": 1}, "max-loras"),
        ({"max_lora_rank": 0}, "max_lora_rank must be"),
    ],
)
def test_config_refusals(opts, match):
    from qwen35.engine.config import EngineConfig

    with pytest.raises(Qwen35Error, match=match):
        EngineConfig.create("m", **opts)


def test_cli_flags():
    import argparse

    from qwen35.engine.config import EngineConfig

    p = argparse.ArgumentParser()
    EngineConfig.add_cli_arguments(p)
    args = p.parse_args(["--model", "m", "--lora-modules", "sql=/ad/sql",
                         '{"name": "chat", "path": "org/chat-lora", "base_model_name": "m"}',
                         "--max-loras", "3"])  # fmt: skip
    cfg = EngineConfig.from_cli(args)
    assert cfg.lora.lora_modules == {"sql": "/ad/sql", "chat": "org/chat-lora"}
    assert cfg.lora.max_loras == 3 and cfg.lora.enabled
    assert cfg.replace(seed=1).lora.lora_modules == cfg.lora.lora_modules


@pytest.mark.parametrize("tp", [1, 2])
def test_planner_counts_the_engines_lora_slots(ckpt, tp):
    """`qwen35 plan --max-loras N --max-lora-rank R`: the bytes the engine's stacked slots take on
    one GPU (layers/lora.py init_slots), per tensor-parallel rank too."""
    from qwen35.config import ModelConfig
    from qwen35.parallel.context import TensorParallel
    from qwen35.plan.sharding import lora_slot_bytes

    model = load(ckpt, tp=TensorParallel(0, tp))
    got = LoraAdapters(model, 3, max_rank=8, stacked=True).slot_bytes
    cfg = ModelConfig.from_hf(json.loads((ckpt["dir"] / "base" / "config.json").read_text()))
    want = lora_slot_bytes(cfg, 3, 8, tp=tp)  # bf16 on a GPU; this fp32 model: twice that
    assert got == 2 * want and want > 0


def test_plan_cli_with_lora_slots(capsys):
    from qwen35.cli import main

    base = ["plan", "--model", "9B", "--gpu", "H100", "--context", "32K", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--max-loras", "8", "--max-lora-rank", "64"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert lora["request"]["max_loras"] == 8

    def bf16(out):
        return out["models"][0]["fits"]["bf16"]

    grown = bf16(lora)["weights_bytes_per_gpu"] - bf16(plain)["weights_bytes_per_gpu"]
    assert 0.5e9 < grown < 5e9  # ~0.27 GB a rank-16 adapter on every projection: 8 x rank 64
    assert bf16(lora)["max_concurrency"] <= bf16(plain)["max_concurrency"]
