"""The GPU path (pytest -m gpu; skipped without CUDA): the engine on CUDA with its fast backend
(fla-core, Triton paged attention, grouped-mm MoE, decode CUDA graphs) against the eager
PyTorch path, against transformers and against the CPU engine. bench/gpu_check.sh runs these on
a GPU machine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen35.engine.cuda_graphs import DecodeGraphs
from qwen35.engine.forward_batch import ModelCaches
from qwen35.ops.backend import reference_backend, select_backend
from qwen35.request import SamplingParams
from test_backend import Seqs, _model, _script
from test_engine import GREEDY, hf_greedy, ids, make, prompts
from tiny import LORA_TARGETS, save_checkpoint, save_random_lora_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for which in ("dense", "moe"):
        d = tmp_path_factory.mktemp("gpu") / which
        out[which] = (d, save_checkpoint(d, moe=which == "moe", layout="vlm"))
    return out


def cuda(d, **kw):
    return make(d, device="cuda", max_memory="4GiB", **kw)


def first_difference(a: list, b: list) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))  # fmt: skip


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_greedy_equals_transformers_eager_and_cpu(which, ckpts):
    """fp32, mixed prompt lengths: graphs == eager == CPU == transformers; batched == alone."""
    d, hf = ckpts[which]
    ps = prompts(6, seed=11, lo=3, hi=140)
    llm = cuda(d, block_size=16)
    runner = llm.engine.runner
    if runner.backend.can_capture and (which == "dense" or runner.backend.grouped_mm):
        assert runner.graphs is not None, "decode graphs were not captured (see the log)"
    runs = {
        "graphs, batched": ids(llm.generate(ps, GREEDY)),
        "graphs, alone": [ids(llm.generate([p], GREEDY))[0] for p in ps],
        "eager": ids(cuda(d, block_size=16, enforce_eager=True).generate(ps, GREEDY)),
        "cpu engine": ids(make(d).generate(ps, GREEDY)),
        "transformers": [hf_greedy(hf, p, GREEDY.max_tokens) for p in ps],
    }
    # every run against transformers at once: which paths differ, on which prompts, from where.
    # (The first H200 run failed here, dense and MoE: prompts 4 and 2 of these make EOS the
    # greedy token, which the transformers oracle masked with min_new_tokens; it no longer does)
    want = runs["transformers"]
    diffs = {name: [(i, len(p), first_difference(got[i], want[i]))
                    for i, p in enumerate(ps) if got[i] != want[i]]
             for name, got in runs.items()}  # fmt: skip
    assert not any(diffs.values()), f"(prompt, its length, first differing token): {diffs}"


def test_fp8_kv_cache_on_the_gpu(ckpts):
    """--kv-cache-dtype fp8 on CUDA (the Triton kernels widen e4m3 as they read; the decode graph
    captures write_kv's byte copy): fp32 model, graphs == eager == the CPU engine on fp8 caches,
    batched == alone; the caches are fp8, half a bf16 cache's bytes per token."""
    d, _ = ckpts["dense"]
    ps = prompts(6, seed=21, lo=3, hi=140)
    llm = cuda(d, block_size=16, kv_cache_dtype="fp8")
    eng = llm.engine
    assert eng.runner.caches.key[0].dtype == torch.float8_e4m3fn
    if eng.runner.backend.can_capture:
        assert eng.runner.graphs is not None, "decode graphs were not captured (see the log)"
    got = ids(llm.generate(ps, GREEDY))
    runs = {
        "alone": [ids(llm.generate([p], GREEDY))[0] for p in ps],
        "eager": ids(cuda(d, block_size=16, kv_cache_dtype="fp8", enforce_eager=True)
                     .generate(ps, GREEDY)),  # fmt: skip
        "cpu engine": ids(make(d, kv_cache_dtype="fp8").generate(ps, GREEDY)),
    }
    diffs = {name: [(i, first_difference(r[i], got[i])) for i in range(len(ps)) if r[i] != got[i]]
             for name, r in runs.items()}  # fmt: skip
    assert not any(diffs.values()), f"(prompt, first differing token) vs graphs batched: {diffs}"
    bf16 = cuda(d, block_size=16, dtype="bf16", kv_cache_dtype="fp8")
    half = cuda(d, block_size=16, dtype="bf16")
    assert 2 * bf16.engine.plan.kv_bytes_per_token == half.engine.plan.kv_bytes_per_token
    assert ids(bf16.generate(ps[:2], GREEDY)) == [ids(bf16.generate([p], GREEDY))[0]
                                                  for p in ps[:2]]  # fmt: skip


def test_bf16_recurrent_states_on_the_gpu(ckpts):
    """--mamba-ssm-cache-dtype bf16 on CUDA (the Triton recurrent step widens each state tile,
    steps it in fp32, stores it rounded): fp32 model, graphs batched == alone == eager == the CPU
    engine on bf16 states (prefix caching off: a hit resumes from a checkpoint rounded where a
    whole prompt ran on in fp32)."""
    d, _ = ckpts["dense"]
    ps = prompts(6, seed=22, lo=3, hi=140)
    kw = dict(block_size=16, mamba_ssm_cache_dtype="bf16", enable_prefix_caching=False)
    llm = cuda(d, **kw)
    assert llm.engine.runner.caches.recurrent[0].dtype == torch.bfloat16
    got = ids(llm.generate(ps, GREEDY))
    runs = {
        "alone": [ids(llm.generate([p], GREEDY))[0] for p in ps],
        "eager": ids(cuda(d, enforce_eager=True, **kw).generate(ps, GREEDY)),
        "cpu engine": ids(make(d, **kw).generate(ps, GREEDY)),
    }
    diffs = {name: [(i, first_difference(r[i], got[i])) for i in range(len(ps)) if r[i] != got[i]]
             for name, r in runs.items()}  # fmt: skip
    assert not any(diffs.values()), f"(prompt, first differing token) vs graphs batched: {diffs}"


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_start_up_check_keeps_every_kernel_on_hopper(which, ckpts):
    """engine/preflight.py switches nothing off on an H100 / H200: every kernel family of the
    cuda backend builds there (one switched off would quietly take the PyTorch path)."""
    d, _ = ckpts[which]
    llm = cuda(d, dtype="bf16", block_size=16)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert llm.engine.runner.backend == select_backend("cuda", dtype=torch.bfloat16)
    assert ids(llm.generate(prompts(2, seed=3), GREEDY))  # and it serves


def test_prefix_caching_chunked_prefill_preemption(ckpts):
    d, _ = ckpts["dense"]
    shared = prompts(1, seed=12, lo=70, hi=71)[0]
    ps = [shared + p for p in prompts(6, seed=13, lo=5, hi=40)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ref = ids(make(d).generate(ps, params))  # CPU, no pressure
    llm = cuda(d, block_size=4, max_model_len=160, num_kv_blocks=90, max_num_batched_tokens=24)
    got = ids(llm.generate(ps, params))
    again = ids(llm.generate(ps, params))  # prefixes cached now
    assert llm.engine.scheduler.num_preemptions > 0
    assert got == ref and again == ref


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_prefix_cache_on_disk_on_the_gpu(which, ckpts, tmp_path):
    """--prefix-cache-dir with CUDA caches (bf16, graphs): a restarted engine's disk hit gives
    the logprobs of a memory hit at the same depth, and the GPU's files stay apart from a CPU
    engine's (another fingerprint)."""
    d, _ = ckpts[which]
    prompt = prompts(1, seed=21, lo=300, hi=301)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    kw = dict(dtype="bf16", prefix_cache_dir=str(tmp_path), prefix_cache_dir_min_tokens=32)
    first = cuda(d, **kw)
    first.generate([prompt], params)
    memory = first.generate([prompt], params)[0]
    first.engine.prefix_store.flush()
    later = cuda(d, **kw)
    disk = later.generate([prompt], params)[0]
    assert later.engine.get_stats()["prefix_cache_disk_hits"] == 1
    assert disk.num_cached_tokens == memory.num_cached_tokens > 0
    assert disk.outputs[0].token_ids == memory.outputs[0].token_ids
    assert disk.outputs[0].logprobs == memory.outputs[0].logprobs
    cpu = make(d, **kw)
    assert cpu.engine.prefix_store.dir != later.engine.prefix_store.dir


def test_prompt_logprobs_equal_the_cpu_engine(ckpts):
    """fp32, chunked prompts beside other rows: the GPU's prompt logprobs (ranks and top-2
    included) equal the CPU engine's (whose own oracle is transformers: test_prompt_logprobs)."""
    d, _ = ckpts["moe"]
    ps = prompts(3, seed=15, lo=20, hi=150)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    want = make(d).generate(ps, sp)
    got = cuda(d, block_size=16, max_num_batched_tokens=48).generate(ps, sp)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) and g.prompt_logprobs[0] is None
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], strict=True):
            assert a.token_id == b.token_id and abs(a.rank - b.rank) <= 1  # (near ties)
            assert abs(a.logprob - b.logprob) < 1e-4
            assert all(abs(a.top[t] - b.top[t]) < 1e-4 for t in set(a.top) & set(b.top))


def lora_tokens(llm, ps, loras) -> list[list[int]]:
    """Greedy tokens of prompts ps run together, each with its LoRA adapter (None: base)."""
    eng, sp = llm.engine, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, (p, lora) in enumerate(zip(ps, loras, strict=True)):
        eng.add_request(f"r{i}", p, sp, lora=lora)
    out: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.outputs[0].token_ids)
    return [out[f"r{i}"] for i in range(len(ps))]


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_lora_adapters_equal_the_cpu_engine(which, ckpts, tmp_path):
    """fp32: requests of two LoRA adapters and of the base model in one batch (stacked slots,
    layers/lora.py LoraSlots: decode steps replay from the graphs; MoE: no fused Triton MoE)
    give the CPU engine's tokens (per-adapter path, whose own oracle is peft: test_lora_serving);
    eager steps too."""
    d, hf = ckpts[which]
    targets = [*LORA_TARGETS, "in_proj_a", "in_proj_b", "shared_expert_gate"]
    mods = {n: str(save_random_lora_adapter(hf, tmp_path / n, seed=s, targets=targets))
            for n, s in (("a", 1), ("b", 2))}  # fmt: skip
    ps = prompts(5, seed=16, lo=3, hi=60)
    loras = [None, "a", "b", "a", None]
    want = lora_tokens(make(d, lora_modules=mods), ps, loras)
    assert want[1] != lora_tokens(make(d, lora_modules=mods), ps[1:2], [None])[0]
    gpu = cuda(d, lora_modules=mods)
    assert gpu.engine.loras.stacked
    if which == "dense":  # (MoE: graphs only where the grouped GEMM captures, without Triton MoE)
        assert gpu.engine.runner.graphs is not None
    assert lora_tokens(gpu, ps, loras) == want
    assert lora_tokens(cuda(d, lora_modules=mods, enforce_eager=True), ps, loras) == want


def test_seeded_sampling_is_batch_independent(ckpts):
    d, _ = ckpts["dense"]
    ps = prompts(3, seed=14)
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    llm = cuda(d)
    a = ids(llm.generate(ps, sp))
    assert a == ids(llm.generate(ps[::-1], sp))[::-1]
    assert [ids(llm.generate([p], sp))[0] for p in ps] == a


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_multi_step_equals_single_steps_in_graphs(which, ckpts):
    """num_scheduler_steps=4 on the GPU (CUDA graphs replayed back to back, each fed the last
    one's tokens on the device): greedy and seeded tokens equal single steps', with preemption
    and prefix caching about."""
    d, _ = ckpts[which]
    shared = prompts(1, seed=15, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(6, seed=16, lo=5, hi=40)]
    greedy = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=13, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    kw = dict(block_size=4, max_model_len=128, num_kv_blocks=90, max_num_batched_tokens=24)
    one, four = cuda(d, **kw), cuda(d, num_scheduler_steps=4, **kw)
    assert four.engine.runner.graphs is not None
    for sp in (greedy, seeded):
        assert ids(four.generate(ps, sp)) == ids(one.generate(ps, sp))


def test_multi_step_rounds_run_ahead_of_the_gpu(ckpts, monkeypatch):
    """Inside a multi-step round, building step j + 1, launching it and sampling from it (greedy
    rows, and sampled rows with a top-k) make no synchronizing CUDA call (torch's sync debug
    mode raises on one): the host runs ahead of the GPU until the round's one read."""
    from qwen35.engine.model_runner import ModelRunner
    from qwen35.engine.sampler import Sampler

    d, _ = ckpts["dense"]
    build, tokens = ModelRunner.build_batch, Sampler.tokens
    watched = []

    def watched_build(self, scheduled, verify=None, phased=False, input_ids=None):
        if input_ids is not None:  # a round's later step: from here to its tokens, no sync
            torch.cuda.set_sync_debug_mode("error")
            watched.append(len(scheduled))
        return build(self, scheduled, verify, phased, input_ids)

    def watched_tokens(self, logits, rows):
        try:
            return tokens(self, logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(ModelRunner, "build_batch", watched_build)
    monkeypatch.setattr(Sampler, "tokens", watched_tokens)
    llm = cuda(d, num_scheduler_steps=4)
    greedy = SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True)
    # sampled with a top-k (the checkpoints' generation_config has one): also no sync
    sampled = SamplingParams(max_tokens=17, temperature=0.8, top_k=20, top_p=0.9, seed=3,
                             ignore_eos=True)  # fmt: skip
    try:
        got = ids(llm.generate(prompts(3, seed=17), [greedy, sampled, sampled]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watched and all(len(t) == 17 for t in got)


def _on_cuda(caches, dtype):
    """The Seqs caches moved to the GPU (recurrent states stay fp32)."""
    mv = lambda ts, dt: [t.to("cuda", dt) for t in ts]  # noqa: E731
    return ModelCaches(mv(caches.key, dtype), mv(caches.value, dtype), mv(caches.conv, dtype),
                       mv(caches.recurrent, torch.float32), caches.block_size)  # fmt: skip


def test_graph_replay_equals_eager_bf16():
    """bf16: a replayed decode step gives bitwise the logits and states of the same step run
    eagerly on the same static buffers (3 rows in the bucket of 4: one padding row)."""
    model = _model(device="cuda", dtype=torch.bfloat16)
    be = select_backend("cuda", dtype=torch.bfloat16)
    if not be.can_capture:
        pytest.skip(f"backend {be.name} cannot capture (no Triton attention)")
    run = Seqs(model, be, num_slots=9)
    run.caches = _on_cuda(run.caches, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    lens = (9, 30, 4)
    run.step([(i, torch.randint(2, 256, (n,), generator=g).tolist()) for i, n in enumerate(lens)])
    graphs = DecodeGraphs(model, run.caches, be, 4, 20, pad_block=99, pad_slot=8)
    graphs.capture()
    c = run.caches
    everything = lambda: (*c.conv, *c.recurrent, *c.key, *c.value)  # noqa: E731
    before = [t.clone() for t in everything()]
    n = len(lens)
    graphs.ids[:n] = torch.tensor([5, 6, 7])
    for s, L in enumerate(lens):
        graphs.positions[s] = L
        graphs.slot_mapping[s] = (20 * s + L // 4) * 4 + L % 4
        graphs.block_tables[s] = torch.arange(20 * s, 20 * s + 20, dtype=torch.int32)
        graphs.context_lens[s] = L + 1
        graphs.state_slots[s] = s
    graphs._pad(n)
    graphs.graphs[4, 1].replay()
    replayed = graphs.outputs[4, 1][:n].clone()
    after = [t.clone() for t in everything()]
    for t, b in zip(everything(), before, strict=False):
        t.copy_(b)
    with torch.inference_mode():
        eager = model(graphs.ids[:4], graphs._batch(4), c)[:n]
    assert torch.equal(replayed, eager)
    assert all(torch.equal(t, a) for t, a in zip(everything(), after, strict=False))


@pytest.mark.parametrize("moe", [False, True])
def test_fast_backend_equals_reference_on_gpu(moe):
    """fla + Triton attention + grouped mm vs plain PyTorch, both on CUDA, fp32 (the bf16
    backend, which has fla: its TF32 dots bound the tolerance)."""
    model = _model(moe, device="cuda")
    fast = dataclasses.replace(
        select_backend("cuda", dtype=torch.bfloat16),
        grouped_mm=select_backend("cuda", dtype=torch.float32).grouped_mm,  # probed per dtype
    )
    ref, got = Seqs(model, reference_backend("cuda")), Seqs(model, fast)
    for r in (ref, got):
        r.caches = _on_cuda(r.caches, torch.float32)
    for a, b in zip(_script(ref), _script(got), strict=False):
        assert ((a - b).norm() / a.norm()).item() < 2e-3, fast.name


def test_bf16_close_to_fp32():
    model = _model(device="cuda")
    ids_ = torch.randint(2, 256, (2, 75), generator=torch.Generator().manual_seed(15)).cuda()
    be = select_backend("cuda", dtype=torch.float32)
    a = model(ids_, backend=be)
    bf16 = _model(device="cuda", dtype=torch.bfloat16)
    b = bf16(ids_, backend=select_backend("cuda", dtype=torch.bfloat16))
    assert b.dtype == torch.float32
    assert ((a - b).abs().max() / a.abs().max()).item() < 5e-2


@pytest.mark.parametrize("moe,k", [(False, 3), (True, 1)])
def test_speculative_decoding_equals_plain_on_gpu(moe, k, tmp_path, monkeypatch):
    """MTP drafts on CUDA (decode and verify steps replayed from CUDA graphs, the verify rows
    phase by phase; the MTP head eager; chained drafts): fp32 greedy and seeded tokens equal the
    plain engine's and the eager one's, with the MTP head's drafts and with oracle drafts."""
    from test_speculative import oracle, outputs

    replays = []
    run_phased = DecodeGraphs.run_phased
    monkeypatch.setattr(DecodeGraphs, "run_phased",
                        lambda self, *a: replays.append(1) or run_phased(self, *a))  # fmt: skip

    d = tmp_path / "m"
    save_checkpoint(d, moe=moe, mtp=True, experts="per_expert" if moe else "fused")
    ps = prompts(4, seed=21, lo=3, hi=60)
    sps = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * 2 + [
        SamplingParams(max_tokens=16, temperature=0.8, seed=i, ignore_eos=True) for i in (2, 3)
    ]
    kw = dict(block_size=4, max_num_seqs=8)  # (graphs of 1, 2, 4, 8 sequences: a short capture)
    want = outputs(cuda(d, **kw).generate(ps, sps))
    for eager in (False, True):
        llm = cuda(d, num_speculative_tokens=k, enforce_eager=eager, **kw)
        assert (llm.engine.runner.graphs is None) == eager
        llm.engine.runner.spec.backoff = False
        assert outputs(llm.generate(ps, sps)) == want
        llm.engine.runner.spec.draft_override = oracle(
            {tuple(p): p + w[0] for p, w in zip(ps, want, strict=True)}, wrong=0.3
        )
        assert outputs(llm.generate(ps, sps)) == want
        assert llm.engine.runner.spec.stats.accepted > 10
        assert bool(replays) != eager, "verify steps replayed from graphs (eager: none)"
        replays.clear()


def test_thinking_budget_on_the_gpu(tmp_path):
    """thinking_token_budget on CUDA (graphs, and 4-step rounds that stop short of the budget's
    position): the tokens before the budget equal the unbudgeted run's, then </think>."""
    from tiny import VOCAB_REAL

    d = tmp_path / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, layout="vlm")
    for kw in ({}, {"num_scheduler_steps": 4}):
        llm = cuda(d, **kw)
        end = llm.tokenizer.token_to_id("</think>")
        msgs = [{"role": "user", "content": "Why is the sky blue?"}]
        p = llm.tokenizer.encode(llm.engine.chat_template.render(msgs, enable_thinking=True))

        def run(budget, llm=llm, p=p):
            sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                thinking_token_budget=budget)  # fmt: skip
            return llm.generate([p], sp)[0].outputs[0].token_ids

        free = run(None)
        for budget in (0, 3, 6):
            got = run(budget)
            if end in free[:budget]:
                continue  # (the model closed it itself)
            assert got[:budget] == free[:budget] and got[budget] == end, (kw, budget)


def test_structured_outputs_with_drafts_on_gpu(tmp_path):
    """Grammars on CUDA (the bitmask applied to the device's logits, decode steps from CUDA
    graphs; no GPU test covered them before): greedy JSON / regex / choice outputs and a seeded
    top-20 regex stay inside their grammars, and with MTP drafts (masked by the grammar) or
    n-gram drafts (cut to it, its forced tokens drafted) the tokens equal the engine without
    drafts."""
    import json
    import re

    from qwen35.request import StructuredOutputs
    from tiny import VOCAB_REAL

    digits = "31415926535897932384626433832795"
    schema = {"type": "object", "required": ["unit", "days"],
              "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                             "days": {"type": "integer", "minimum": 1, "maximum": 14}}}  # fmt: skip
    d = tmp_path / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, mtp=True, eos_token_id=248046)

    def so(**kw):
        return StructuredOutputs(**kw)

    sps = [
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=so(json=schema)),
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=so(regex=digits)),
        SamplingParams(max_tokens=12, temperature=0, structured_outputs=so(choice=["yes", "maybe"])),
        SamplingParams(max_tokens=30, temperature=0.8, top_k=20, seed=3,
                       structured_outputs=so(regex="[a-z ]{5,40}")),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),  # unconstrained beside
    ]  # fmt: skip
    ps = [f"prompt {i}" for i in range(len(sps))]
    kw = dict(max_num_seqs=8)
    want = cuda(d, **kw).generate(ps, sps)
    outs = [o.outputs[0] for o in want]
    assert outs[1].text == digits and outs[2].text in ("yes", "maybe")
    if outs[0].finish_reason == "stop":
        assert json.loads(outs[0].text)["unit"] in ("celsius", "fahrenheit")
    assert re.fullmatch("[a-z ]{5,40}" if outs[3].finish_reason == "stop" else "[a-z ]{0,40}",
                        outs[3].text)  # fmt: skip
    for method, k in (("mtp", 2), ("ngram", 3)):
        llm = cuda(d, num_speculative_tokens=k, speculative_method=method, **kw)
        llm.engine.runner.spec.backoff = False
        got = llm.generate(ps, sps)
        assert [o.outputs[0].token_ids for o in got] == [o.token_ids for o in outs], method
        assert llm.engine.runner.spec.stats.accepted > 0, method
