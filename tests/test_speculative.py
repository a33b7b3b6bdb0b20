"""Speculative decoding with the MTP head (engine/speculative.py, models/mtp.py).

The MTP head against a plain reference (transformers' decoder layer over the whole sequence,
the vLLM formula around it); the drafts the engine makes step by step against that reference;
and the outputs with drafts == without (greedy, seeded sampling with penalties, stop rules,
prefix caching, chunked prefill, preemption, dense and MoE), with the MTP head's own drafts
(mostly rejected on random weights) and with an oracle that drafts the right token (accepted:
the bonus path), sometimes corrupted."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors import safe_open

from kernel_modules import cpu_kernels_or_skip
from qwen35.engine.llm_engine import LLM
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams
from tiny import hf_torch_path, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec") / "dense"
    hf = save_checkpoint(d, mtp=True)
    return d, hf


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec") / "moe"
    hf = save_checkpoint(d, moe=True, experts="per_expert", mtp=True)
    return d, hf


def make(d, adaptive: bool = False, **kw) -> LLM:
    """An LLM; with drafts, every batch size verifies them (engine/speculative.py
    MAX_VERIFY_SEQS keeps larger batches from drafting; test_batches_over_the_limit_do_not_draft)
    and every step takes all the drafts it has room for unless `adaptive` (which decides by
    measured step times: test_adaptive_draft_lengths)."""
    kw.setdefault("dtype", "fp32")
    kw.setdefault("verbose", False)
    llm = LLM(str(d), **kw)
    if llm.engine.runner.spec is not None:
        llm.engine.runner.spec.max_verify_seqs = 1 << 10
        llm.engine.runner.spec.adaptive = adaptive
    return llm


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 256) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def oracle(reference: dict, wrong: float = 0.0, seed: int = 0):
    """A draft_override that drafts the token the plain engine produced (accepted), or with
    probability `wrong` a wrong one (rejected)."""
    rng = random.Random(seed)

    def draft(seq, pos):
        full = reference[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        if pos >= len(full):
            return None
        return (full[pos] + 1) % 256 if rng.random() < wrong else full[pos]

    return draft


def outputs(outs) -> list[tuple]:
    return [
        (o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
         o.outputs[0].stop_reason)
        for o in outs
    ]  # fmt: skip


# ---- the MTP head ---------------------------------------------------------------------------
def _reference_mtp_logits(d, hf, ids: list[int], chain: int = 0) -> torch.Tensor:
    """MTP logits at positions 0..T-2 of ids (row i predicts ids[i+2]), computed over the whole
    sequence: transformers' main model and decoder layer, vLLM's formula around them. chain:
    that many more rows, each the head's own (normed) output row before it and the argmax
    draft of that row (how drafts after the first are made, as in vLLM)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        mtp = {k[len("mtp.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.")}
    cfg = hf.config
    attn = cfg.layer_types.index("full_attention")
    layer = Qwen3_5DecoderLayer(cfg, attn).float().eval()
    layer.load_state_dict({k[len("layers.0.") :]: v for k, v in mtp.items() if "layers.0." in k})

    def norm(x, w):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * (1 + w)

    x = torch.tensor([ids])
    T = len(ids) - 1
    with torch.no_grad(), hf_torch_path():
        h = hf.model(x).last_hidden_state[:, :T]  # after the final norm
        e = hf.model.embed_tokens(x[:, 1:])
        z = torch.cat([norm(e, mtp["pre_fc_norm_embedding.weight"]),
                       norm(h, mtp["pre_fc_norm_hidden.weight"])], -1) @ mtp["fc.weight"].T  # fmt: skip
        for _ in range(chain + 1):
            n = z.shape[1]
            pos = torch.arange(n)[None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            out = layer(z, hf.model.rotary_emb(z, pos), attention_mask=mask, position_ids=pos)
            out = norm(out[0] if isinstance(out, tuple) else out, mtp["norm.weight"])
            logits = hf.lm_head(out)[0]
            nxt = hf.model.embed_tokens(logits[-1:].argmax(-1)[None])  # [1, 1, H]
            z = torch.cat([z, torch.cat([norm(nxt, mtp["pre_fc_norm_embedding.weight"]),
                                         norm(out[:, -1:], mtp["pre_fc_norm_hidden.weight"])],
                                        -1) @ mtp["fc.weight"].T], 1)  # fmt: skip
        return logits


@pytest.mark.parametrize("accept,chunk", [(False, 8), (True, 8), (False, 64)])
def test_engine_drafts_equal_the_reference_mtp_head(ckpt, accept, chunk):
    """Each step's draft (paged MTP KV filled over prefill chunks, decode rows and verify rows,
    accepted or rejected) is the argmax of the whole-sequence reference at that position.
    chunk 64: the prompt in one chunk, whose MTP pass writes every row's K / V and runs the
    whole layer at its last row only (model_runner._draft)."""
    d, hf = ckpt
    p = prompts(1, seed=3, lo=20, hi=21)[0]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = make(d).generate([p], sp)[0].outputs[0].token_ids
    llm = make(d, num_speculative_tokens=1, max_num_batched_tokens=chunk, block_size=4)
    eng, spec = llm.engine, llm.engine.runner.spec
    spec.backoff = False  # a draft every step, however many are rejected
    if accept:
        spec.draft_override = oracle({tuple(p): p + plain})
    eng.add_request("r", p, sp)
    drafts = []
    while eng.has_unfinished_requests():
        eng.step()
        drafts += [(v.pos, v.token) for k, v in spec.drafts.items() if k.startswith("r")]
    full = p + plain
    ref = _reference_mtp_logits(d, hf, full).argmax(-1).tolist()
    assert len(set(drafts)) >= 8
    for pos, tok in set(drafts):  # a draft for position pos comes from row pos - 2
        assert tok == ref[pos - 2], (pos, tok)
    assert (spec.stats.accepted == spec.stats.drafts) == accept and spec.stats.drafts > 5


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_prompt_chunks_run_the_mtp_layer_at_their_draft_rows_only(which, ckpt, moe_ckpt,
                                                                 monkeypatch):  # fmt: skip
    """A prompt chunk's MTP pass writes every row's K / V and runs the whole layer at the rows
    that draft only (as decode rows over that KV): the same MTP rows as the whole pass, the
    same KV after, the same tokens."""
    from qwen35.engine import model_runner
    from qwen35.engine.model_runner import ModelRunner

    d, _ = ckpt if which == "dense" else moe_ckpt
    ps = prompts(3, seed=12, lo=20, hi=40)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    tokens = ModelRunner._draft_tokens
    built = ModelRunner._decode_batch

    def run(split: bool):
        rows, n = [], [0]
        monkeypatch.setattr(model_runner, "MTP_ROWS_ONLY", 8 if split else 1 << 30)
        monkeypatch.setattr(ModelRunner, "_draft_tokens",
                            lambda self, m, *a: rows.append(m.clone()) or tokens(self, m, *a))  # fmt: skip
        monkeypatch.setattr(ModelRunner, "_decode_batch",
                            lambda self, *a: n.__setitem__(0, n[0] + 1) or built(self, *a))  # fmt: skip
        llm = make(d, num_speculative_tokens=2, max_num_batched_tokens=128, block_size=4,
                   enable_prefix_caching=False)  # fmt: skip
        out = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
        c = llm.engine.runner.caches
        return out, rows, n[0], c.key[-1].clone()

    a, b = run(False), run(True)
    assert b[2] > a[2]  # the split ran (the chains build decode batches in both)
    assert a[0] == b[0] and len(a[1]) == len(b[1]) > 3
    for x, y in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[3], a[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mtp_passes_no_draft_reads_write_the_same_kv(ckpt, monkeypatch, dtype):
    """A pass whose rows no draft reads (prompt chunks before the last, steps of more sequences
    than verify drafts) writes only the MTP layer's K / V (MTPHead.write_kv): the same cache as
    the whole layer's pass writes (prefill rows and decode rows, the CPU decode plan's kernels
    in bf16: rounding apart)."""
    from qwen35.engine.model_runner import ModelRunner

    d, _ = ckpt
    ps = prompts(4, seed=9, lo=10, hi=30)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    inner = ModelRunner.forward_mtp
    kinds: list[bool] = []

    def run(whole: bool):
        def spy(self, ids, hidden, batch, step, kv_only=False):
            kinds.append(kv_only)
            return inner(self, ids, hidden, batch, step, kv_only and not whole)

        monkeypatch.setattr(ModelRunner, "forward_mtp", spy)
        llm = make(d, dtype=dtype, num_speculative_tokens=1, max_num_batched_tokens=16,
                   block_size=4, enable_prefix_caching=False)  # fmt: skip
        llm.engine.runner.spec.max_verify_seqs = 2  # batches of 4 verify no drafts
        out = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
        c = llm.engine.runner.caches
        return out, c.key[-1].clone(), c.value[-1].clone()

    whole = run(True)
    n = len(kinds)
    only = run(False)
    assert sum(kinds[n:]) > 4 and not all(kinds[n:])  # both kinds of pass ran
    assert only[0] == whole[0]
    tol = dict(rtol=0, atol=1e-5) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(only[1].float(), whole[1].float(), **tol)
    torch.testing.assert_close(only[2].float(), whole[2].float(), **tol)
    assert whole[1].abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3])
def test_chained_drafts_equal_the_reference(ckpt, monkeypatch, k):
    """Drafts after the first (the MTP head on its own output row and the draft before, at
    the start of the next step) equal the whole-sequence reference chain, every step."""
    from qwen35.engine.model_runner import ModelRunner

    d, hf = ckpt
    p = prompts(1, seed=5, lo=20, hi=21)[0]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = make(d).generate([p], sp)[0].outputs[0].token_ids
    llm = make(d, num_speculative_tokens=k, max_num_batched_tokens=8, block_size=4)
    llm.engine.runner.spec.backoff = False
    seen = []
    build = ModelRunner.build_batch

    def spy(self, scheduled, verify=None, phased=False):
        seen.extend((scheduled[i].start, list(v.drafts)) for i, v in (verify or {}).items())
        return build(self, scheduled, verify, phased)

    monkeypatch.setattr(ModelRunner, "build_batch", spy)
    assert llm.generate([p], sp)[0].outputs[0].token_ids == plain
    full = p + plain
    assert len(seen) > 5 and max(len(dr) for _, dr in seen) == k
    for start, drafts in seen:  # x_n at position start; the first draft from row start - 1
        ref = _reference_mtp_logits(d, hf, full[: start + 1], chain=len(drafts) - 1)
        assert drafts == ref[start - 1 :].argmax(-1).tolist(), (start, drafts)


def graph_runner(llm, backend, max_batch: int, monkeypatch):
    """llm's runner rebuilt as on a GPU, over CPU tensors: `backend` (a GPU backend's ops),
    decode CUDA graphs run eagerly on their static buffers (DecodeGraphs.eager), one more KV
    block and state slot for their padding (never handed out: the scheduler's counts are the
    plan's), no CPU row limit on verify steps. -> the graphs' calls counted by kind."""
    from qwen35.engine import model_runner
    from qwen35.engine.cuda_graphs import DecodeGraphs
    from qwen35.engine.forward_batch import allocate_caches
    from qwen35.engine.model_runner import GraphSpec, ModelRunner
    from qwen35.ops.backend import Backend

    eng, old = llm.engine, llm.engine.runner
    c = old.caches
    caches = allocate_caches(eng.config, c.num_blocks + 1, c.block_size, c.num_slots + 1,
                             torch.float32, "cpu", mtp_layers=1)  # fmt: skip
    monkeypatch.setattr(Backend, "can_capture", property(lambda self: True))
    monkeypatch.setattr(model_runner, "GPU_MAX_VERIFY_SEQS", 4)  # verify graphs: 1, 2, 4 seqs
    monkeypatch.setattr(DecodeGraphs, "capture", lambda self: setattr(self, "eager", True))
    calls = {"decode": 0, "verify": 0, "eager decode": 0, "mtp": 0, "mtp chain": 0}
    for name, kind in (("run", "decode"), ("run_phased", "verify"), ("run_mtp", "mtp"),
                       ("run_mtp_decode", "mtp chain")):  # fmt: skip
        fn = getattr(DecodeGraphs, name)

        def counted(self, *a, _fn=fn, _kind=kind):
            calls[_kind] += 1
            return _fn(self, *a)

        monkeypatch.setattr(DecodeGraphs, name, counted)
    from test_backend import HostSyncs, _watched

    syncs = HostSyncs()  # what a graph would capture: no op that reads the device on the host
    for name in ("_forward", "_forward_mtp"):
        fn = getattr(DecodeGraphs, name)
        monkeypatch.setattr(DecodeGraphs, name,
                            lambda self, *a, _fn=fn: _watched(syncs, _fn, self, *a))  # fmt: skip
    calls["host syncs"] = syncs.seen
    hidden = ModelRunner._graph_hidden

    def graph_hidden(self, ids, batch, rows_of):
        x = hidden(self, ids, batch, rows_of)
        calls["eager decode"] += x is None and not batch.prefill and self.graphs is not None
        return x

    monkeypatch.setattr(ModelRunner, "_graph_hidden", graph_hidden)
    spec = old.spec
    runner = ModelRunner(eng.model, caches, eng.eos_token_ids, "cpu", backend=backend,
                         decode_graphs=GraphSpec(max_batch, eng.max_model_len),
                         spec_slots=spec.spare_slots, spec_tokens=spec.k,
                         spec_ngram=spec.ngram)  # fmt: skip
    assert runner.graphs is not None and runner.graphs.hidden
    assert runner.graphs.mtp == (spec.ngram is None)  # (n-gram drafts: no MTP head to run)
    assert runner.spec.max_verify_seqs == 4
    runner.spec.max_rows = None
    runner.logits_processor = old.logits_processor
    eng.runner = runner
    return calls


@pytest.mark.parametrize("which,k", [("dense", 1), ("dense", 3), ("moe", 2)])
def test_verify_steps_replay_from_decode_graphs(which, ckpt, moe_ckpt, k, monkeypatch):
    """On a GPU, decode and verify steps replay from CUDA graphs (engine/cuda_graphs.py: the
    final norm's rows out, verify rows phase by phase with the spare-slot copies by index), and
    so do the MTP head's passes (over a replayed step's rows; chained drafts):
    here the GPU path's ops on CPU tensors and the graphs' static buffers run eagerly. Greedy
    and seeded outputs equal those without drafts, with the MTP head's drafts and with
    always-right ones, some steps with more sequences than the verify graphs take."""
    from qwen35.engine.model_runner import ModelRunner
    from qwen35.ops.backend import Backend

    d, _ = ckpt if which == "dense" else moe_ckpt
    ps = prompts(5, seed=31)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sps = [
        greedy, greedy,
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.2,
                       logprobs=2),  # (bonus tokens: logprobs from their rows)
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=1, ignore_eos=True,
                       presence_penalty=0.5, min_tokens=6, stop=["zz"]),
    ]  # fmt: skip
    kw = dict(block_size=4, max_num_batched_tokens=64)
    want = outputs(make(d, **kw).generate(ps, sps))
    llm = make(d, num_speculative_tokens=k, **kw)
    calls = graph_runner(llm, Backend("cuda", grouped_mm=which == "moe"), 8, monkeypatch)
    spec = llm.engine.runner.spec
    spec.backoff = False
    assert llm.engine.runner.graphs.verify_buckets == [1, 2, 4]
    drafted = {}  # the MTP head's output rows that draft, step by step: the eager GPU path's
    draft_tokens = ModelRunner._draft_tokens  # (not the tokens: the fp32 rows of a bucket
    monkeypatch.setattr(ModelRunner, "_draft_tokens", lambda self, m, *a: drafted.setdefault(
        id(self), []).append(m.clone()) or draft_tokens(self, m, *a))  # round apart: near-ties)
    eager = make(d, num_speculative_tokens=k, **kw)
    eager.engine.runner.backend = Backend("cuda", grouped_mm=which == "moe")
    eager.engine.runner.spec.max_rows, eager.engine.runner.spec.backoff = None, False

    def same_rows(a, b):  # each step's MTP rows (in the sequences' order by state slot, which
        assert len(a) == len(b) > 2  # differs with the engines' histories)
        for x, y in zip(a, b, strict=True):  # (MoE: a router's near-tie picks other experts)
            if which == "dense":
                x, y = (t[t[:, 0].argsort()] for t in (x, y))
                torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)

    def both(idx, wrong=None):  # eager, then graphs: outputs == without drafts, MTP rows alike
        for x in (eager, llm):
            if wrong is not None:  # drafts by an oracle (the MTP head still runs, unused)
                x.engine.runner.spec.draft_override = oracle(
                    {tuple(p): p + w[0] for p, w in zip(ps, want, strict=True)}, wrong)
            drafted.pop(id(x.engine.runner), None)
            assert outputs(x.generate([ps[i] for i in idx], [sps[i] for i in idx])) == [
                want[i] for i in idx]  # fmt: skip
        a, b = (drafted[id(x.engine.runner)] for x in (eager, llm))
        assert len(a) == len(b) > 2
        same_rows(a, b)

    both([0, 1, 2])  # the MTP head's drafts
    assert spec.stats.drafts > spec.stats.accepted  # (rejected: states from the spares)
    before = spec.stats.accepted
    both([1, 2, 3], wrong=0.0)  # (accepted: drafts from rows past a sequence's first)
    both([1, 2, 3], wrong=0.3)
    assert spec.stats.accepted - before > 3 * k
    spec.draft_override = oracle({tuple(p): p + w[0] for p, w in zip(ps, want, strict=True)})
    assert outputs(llm.generate(ps, sps)) == want
    # a request with prompt logprobs (its step runs eagerly) arriving after replayed steps:
    # its MTP pass is the eager one too, on that step's rows (the MTP rows equal the eager path's)
    late = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    new = prompts(2, seed=32)  # (prompts neither engine has cached: the MTP KV of a cached
    for x in (eager, llm):  # block's last row was made with the token that followed it then)
        x.engine.runner.spec.draft_override = None
        drafted.pop(id(x.engine.runner), None)
        e = x.engine
        e.add_request("a", new[0], sps[0])
        for _ in range(4):
            e.step()
        e.add_request("b", new[1], late)
        while e.has_unfinished_requests():
            e.step()
    same_rows(*(drafted[id(x.engine.runner)] for x in (eager, llm)))
    # every step without prefill rows replayed; 5 sequences verify none (over the limit of 4)
    assert calls["verify"] >= 2 and calls["decode"] > 5 and not calls["eager decode"], calls
    # the MTP head's passes replay too: over each replayed step's rows, and the chains (k > 1)
    assert calls["mtp"] >= calls["verify"] and (calls["mtp chain"] > 0) == (k > 1), calls
    assert not calls["host syncs"], f"not capturable: {sorted(set(calls['host syncs']))}"
    llm.engine.scheduler.check_integrity()


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_verify_rows_read_once(ckpt, monkeypatch, k):
    """Without the head screen (a GPU, a quantized head): a step whose rows are all greedy takes
    every row's argmax in one read instead of sampling the rows draft by draft (one host sync a
    step, not one an accepted draft); tokens equal those without drafts, and a row whose logits
    are not finite goes to the sampler as before."""
    from qwen35.engine import model_runner

    d, _ = ckpt
    ps = prompts(3, seed=34)
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = outputs(make(d, head_screen=False).generate(ps, sp))
    llm = make(d, head_screen=False, num_speculative_tokens=k)
    spec = llm.engine.runner.spec
    spec.backoff = False
    spec.draft_override = oracle({tuple(p): p + w[0] for p, w in zip(ps, want, strict=True)})
    n = {"sampler": 0, "steps": 0, "verify": 0}
    sample, execute = model_runner.sample_isolated, model_runner.ModelRunner._execute
    monkeypatch.setattr(model_runner, "sample_isolated",
                        lambda *a: n.__setitem__("sampler", n["sampler"] + 1) or sample(*a))
    monkeypatch.setattr(model_runner.ModelRunner, "_execute",
                        lambda self, sc: n.__setitem__("steps", n["steps"] + 1) or execute(self, sc))
    assert outputs(llm.generate(ps, sp)) == want
    assert spec.stats.accepted > 3 * k
    assert 0 < n["sampler"] < n["steps"], n  # (prefill steps sample; verify steps read once)
    # a non-finite maximum: the sampler decides (and fails that row alone)
    logits = torch.zeros(2, 8)
    logits[1, 3] = float("nan")
    assert model_runner._greedy_tokens(logits) is None
    logits[1, 3] = 2.0
    assert model_runner._greedy_tokens(logits) == [0, 3]


def test_ngram_verify_steps_replay_from_decode_graphs(ckpt, monkeypatch):
    """n-gram drafts (prompt lookup) on the GPU path with graphs: verify steps replay (no MTP
    head to run), outputs equal those without drafts."""
    from qwen35.ops.backend import Backend

    d, _ = ckpt
    ps = prompts(3, seed=33, lo=10, hi=30)  # (their outputs fall into loops: drafts found)
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    kw = dict(block_size=4, max_num_batched_tokens=64)
    want = outputs(make(d, **kw).generate(ps, sp))
    llm = make(d, num_speculative_tokens=3, speculative_method="ngram", **kw)
    calls = graph_runner(llm, Backend("cuda"), 8, monkeypatch)
    llm.engine.runner.spec.backoff = False
    assert outputs(llm.generate(ps, sp)) == want
    st = llm.engine.runner.spec.stats
    assert st.accepted > 10 and st.drafts > st.accepted  # (some rejected: states from spares)
    assert calls["verify"] > 0 and not calls["eager decode"] and not calls["mtp"], calls


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_is_loaded_and_counted(ckpt, k):
    d, _ = ckpt
    llm = make(d, num_speculative_tokens=k)
    m = llm.engine.model
    assert m.has_mtp and "mtp" not in m.load_report.skipped
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("mtp.fc.weight")
    assert torch.equal(m.mtp.fc.weight, w)
    caches = llm.engine.runner.caches
    # one more K/V layer than the main model has, and k spare slots per running sequence
    assert len(caches.key) == m.config.num_full_attention_layers + 1
    plan = llm.engine.plan
    assert plan.num_spare_slots == k * plan.num_state_slots
    assert caches.num_slots == plan.num_state_slots * (1 + k) + plan.num_checkpoint_slots
    plain = make(d).engine.plan
    assert plan.kv_bytes_per_token == plain.kv_bytes_per_token * 2  # (one attention layer)
    assert "spare state slots" in plan.describe()
    assert llm.engine.runner.spec.adaptive is False  # (make() sets it: the engine's default
    assert not LLM(str(d), dtype="fp32", verbose=False,  # below, then the option)
                   num_speculative_tokens=k).engine.runner.spec.adaptive  # fmt: skip
    adaptive = LLM(str(d), dtype="fp32", verbose=False, num_speculative_tokens=k,
                   speculative_adaptive=True)  # fmt: skip
    assert adaptive.engine.runner.spec.adaptive is True
    # the allocated tensors are what the plan (the planner's cache_spec) charged for them
    kv = sum(t.nbytes for t in caches.key + caches.value)
    assert kv == plan.num_blocks * plan.block_size * plan.kv_bytes_per_token
    states = sum(t.nbytes for t in caches.conv + caches.recurrent)
    slots = plan.num_state_slots + plan.num_spare_slots + plan.num_checkpoint_slots
    assert states == slots * plan.state_bytes_per_sequence


def test_refusals(ckpt, tmp_path):
    d, _ = ckpt
    with pytest.raises(Qwen35Error, match="0 \\(off\\) or 1 .. 5"):
        make(d, num_speculative_tokens=6)
    bare = tmp_path / "no-mtp"
    save_checkpoint(bare)  # a config without mtp_num_hidden_layers
    with pytest.raises(Qwen35Error, match="no MTP head"):
        make(bare, num_speculative_tokens=1)


# ---- the same outputs with drafts as without ------------------------------------------------
@pytest.mark.parametrize("k,adaptive", [(1, False), (3, False), (3, True)])
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_greedy_and_seeded_sampling_equal_without_drafts(which, ckpt, moe_ckpt, k, adaptive):
    d, _ = ckpt if which == "dense" else moe_ckpt
    ps = prompts(6, seed=1)
    sps = [SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True)] * 2 + [
        SamplingParams(max_tokens=18, temperature=0.8, top_p=0.9, top_k=40, seed=i,
                       ignore_eos=True, presence_penalty=0.5 * (i % 2), min_tokens=3,
                       repetition_penalty=1.1 if i == 4 else 1.0)
        for i in range(2, 6)
    ]  # fmt: skip
    kw = dict(block_size=4, max_num_batched_tokens=32)
    want = outputs(make(d, **kw).generate(ps, sps))
    llm = make(d, num_speculative_tokens=k, adaptive=adaptive, **kw)
    llm.engine.runner.spec.backoff = False
    assert outputs(llm.generate(ps, sps)) == want  # the MTP head's drafts
    assert bool(llm.engine.runner.spec.cost.secs) == adaptive  # (only then steps are timed)
    reference = {tuple(p): p + w[0] for p, w in zip(ps, want, strict=True)}
    st = llm.engine.runner.spec.stats
    for wrong in (0.0, 0.3):
        llm.engine.runner.spec.draft_override = oracle(reference, wrong)
        before = (st.accepted, st.verifies)
        assert outputs(llm.generate(ps, sps)) == want
        assert st.accepted - before[0] > 20
        if k > 1 and wrong == 0 and not adaptive:  # several drafts accepted per step
            assert st.accepted - before[0] > 1.5 * (st.verifies - before[1])
        llm.engine.scheduler.check_integrity()
    st = llm.engine.get_stats()
    assert st["kv_blocks_used"] == 0 and st["state_slots_used"] == 0


@pytest.mark.parametrize("k", [1, 2])
def test_preemption_and_n_equal_without_drafts(ckpt, k):
    d, _ = ckpt
    ps = prompts(5, seed=4, lo=20)
    sp = SamplingParams(max_tokens=24, temperature=0.7, seed=5, n=2, ignore_eos=True)
    kw = dict(block_size=4, max_num_batched_tokens=48)
    want = make(d, **kw).generate(ps, sp)
    flat = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(ps, want, strict=True)}
    llm = make(d, num_speculative_tokens=k, num_kv_blocks=48, **kw)
    llm.engine.runner.spec.draft_override = oracle(flat, wrong=0.2)
    got = llm.generate(ps, sp)
    assert llm.engine.get_stats()["num_preemptions"] > 0
    for a, b in zip(got, want, strict=True):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


@pytest.mark.parametrize("k", [1, 3])
def test_stop_rules_with_bonus_tokens(ckpt, k):
    """Stop strings, stop ids, EOS and max_tokens landing on the sampled token or on a bonus
    after it: the same text, tokens and finish reasons as without drafts (bonus tokens after a
    stop are dropped)."""
    d, _ = ckpt
    p = prompts(1, seed=10)[0]
    plain = make(d)
    full = plain.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    toks = full[0].outputs[0].token_ids
    text = full[0].outputs[0].text
    spec = make(d, num_speculative_tokens=k)
    spec.engine.runner.spec.draft_override = oracle({tuple(p): p + toks})
    cases = [dict(max_tokens=k) for k in (1, 2, 3, 6, 7)]
    cases += [dict(max_tokens=20, stop_token_ids=[toks[k]]) for k in (2, 3, 4, 5)]
    cases += [dict(max_tokens=20, stop_token_ids=[toks[k]], min_tokens=k + 1) for k in (1, 2)]
    cases += [dict(max_tokens=20, stop=[text[k : k + 2]]) for k in range(1, 12, 2)]
    cases += [dict(max_tokens=20, stop=[text[k : k + 1]], include_stop_str_in_output=True)
              for k in range(2, 10, 3)]  # fmt: skip
    for c in cases:
        sp = SamplingParams(temperature=0.0, ignore_eos=True, **c)
        assert outputs(spec.generate([p], sp)) == outputs(plain.generate([p], sp)), c
    eos = SamplingParams(max_tokens=20, temperature=0.0)  # the tiny model's EOS id 1 counts
    assert outputs(spec.generate([p], eos)) == outputs(plain.generate([p], eos))
    assert spec.engine.runner.spec.stats.accepted > 20


def test_logprob_requests_are_drafted(ckpt):
    """Logprobs come from each bonus token's own row (test_logprobs_with_drafts_equal_without;
    grammars: tests/test_structured.py test_structured_outputs_with_drafts)."""
    d, _ = ckpt
    p = prompts(1, seed=12)[0]
    llm = make(d, num_speculative_tokens=1)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    out = llm.generate([p], sp)[0].outputs[0]
    assert len(out.logprobs) == 6 and llm.engine.runner.spec.stats.drafts > 0
    assert out.token_ids == make(d).generate([p], sp)[0].outputs[0].token_ids


def test_drafts_pause_after_rejections(ckpt):
    """Random MTP weights: drafts keep failing, so sequences pause drafting (fewer drafts than
    steps), and an accepted draft ends the pause; outputs unchanged either way."""
    from qwen35.engine.speculative import SpecState

    d, _ = ckpt
    p = prompts(1, seed=13)[0]
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = make(d).generate([p], sp)[0].outputs[0].token_ids
    llm = make(d, num_speculative_tokens=1)
    assert llm.generate([p], sp)[0].outputs[0].token_ids == want
    st = llm.engine.runner.spec.stats
    assert 2 <= st.drafts < 20 and st.accepted < st.drafts
    s = SpecState(range(0))
    for ok in (False, False, False):
        s.outcome("a", 1, int(ok))
    assert s.paused["a"] == 4 and [s.wants_draft("a") for _ in range(5)] == [False] * 4 + [True]
    s.outcome("a", 3, 1)
    assert "a" not in s.misses and s.wants_draft("a")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    "dtype,quantization", [("bf16", None), ("bf16", "int8"), ("fp32", "int8")]
)  # fp32 on int8 weights: bf16 K/V caches (--kv-cache-dtype auto), the MTP layer's too
def test_cpu_verify_steps_are_decode_rows_bf16_bitwise(ckpt, monkeypatch, dtype, quantization, k):
    """On a CPU a decode step's drafts run as decode rows in DeltaNet phases through the
    decode plan (models/cpu_decode.py), so each row's arithmetic is a decode step's: bf16 and
    int8 greedy tokens equal the plain engine's exactly (a 2-token chunk would differ by
    chunked-vs-recurrent rounding)."""
    cpu_kernels_or_skip()  # (the decode plan runs on them)
    from qwen35.models import cpu_decode

    d, _ = ckpt
    phased = []
    run = cpu_decode.DecodePlan.run

    rows = []

    def spy(self, h, cos, sin, batch, caches):
        phased.append(len(batch.decode.phases or ()))
        rows.append(batch.num_tokens)
        return run(self, h, cos, sin, batch, caches)

    monkeypatch.setattr(cpu_decode.DecodePlan, "run", spy)
    ps = prompts(4, seed=14)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    kw = dict(dtype=dtype, quantization=quantization)
    plain = make(d, **kw)
    assert all(c.dtype == torch.bfloat16 for c in plain.engine.runner.caches.key)
    want = [o.outputs[0].token_ids for o in plain.generate(ps, sp)]
    assert phased and not any(phased)
    llm = make(d, num_speculative_tokens=k, **kw)
    llm.engine.runner.spec.draft_override = oracle(
        {tuple(p): p + w for p, w in zip(ps, want, strict=True)}, wrong=0.3
    )
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == want
    # the steps stay within the GEMV's rows (bf16 8, fp32 16; 4 sequences share them: fewer
    # drafts each)
    assert sum(map(bool, phased)) > 5 and max(phased) >= 2
    assert max(rows) <= (8 if dtype == "bf16" else 16)
    assert llm.generate(ps[:1], sp)[0].outputs[0].token_ids == want[0]  # alone: k drafts
    assert max(phased) == k + 1
    assert llm.engine.runner.spec.stats.accepted > 10


def test_server_with_speculative_decoding(tmp_path):
    """The HTTP server over an engine with MTP drafts: streamed == not streamed == an engine
    without drafts (the real vocabulary and tokenizer), and /metrics counts the drafts."""
    import httpx
    import openai

    from qwen35.server.app import ServerConfig, create_app
    from server_fakes import ServerThread, build_tiny_engine

    engine = build_tiny_engine(tmp_path / "m", num_speculative_tokens=2)
    engine.runner.spec.backoff = False
    plain = build_tiny_engine(tmp_path / "p")
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
        text = client.completions.create(**kw).choices[0].text
        streamed = "".join(
            c.text for ch in client.completions.create(stream=True, **kw) for c in ch.choices
        )
        want = []
        plain.add_request("p", "The capital of France is",
                          SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))  # fmt: skip
        while plain.has_unfinished_requests():
            want += [o.outputs[0].text for o in plain.step() if o.outputs]
        assert text == streamed == "".join(want)
        metrics = httpx.get(srv.url + "/metrics").text
        assert "qwen35_spec_decode_num_draft_tokens_total" in metrics
        assert engine.get_stats()["spec_drafts_total"] > 5
    finally:
        srv.close()


def test_fp8_checkpoint_with_its_mtp_head(tmp_path):
    """`qwen35 quantize --to fp8` puts the MTP layer in FP8 like the main layers (as the official
    FP8 releases); it loads into FP8 modules, drafts, and the outputs equal those without drafts
    and those of the BF16 checkpoint quantized in memory."""
    from qwen35.quant.checkpoint import convert_checkpoint
    from qwen35.quant.layers import Fp8Linear

    src = tmp_path / "bf16"
    save_checkpoint(src, dtype=torch.bfloat16, hidden_size=128, mtp=True)
    out = convert_checkpoint(src, tmp_path / "fp8", to="fp8")
    stored = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert stored["mtp.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert "mtp.layers.0.self_attn.q_proj.weight_scale_inv" in stored
    ps = prompts(3, seed=15)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm = make(out, dtype="bf16", num_speculative_tokens=2)
    assert isinstance(llm.engine.model.mtp.layers[0].self_attn.q_proj, Fp8Linear)
    llm.engine.runner.spec.backoff = False
    got = [o.outputs[0].token_ids for o in llm.generate(ps, sp)]
    assert got == [o.outputs[0].token_ids for o in make(out, dtype="bf16").generate(ps, sp)]
    mem = make(src, dtype="bf16", quantization="fp8", num_speculative_tokens=1)
    assert isinstance(mem.engine.model.mtp.layers[0].self_attn.q_proj, Fp8Linear)
    assert [o.outputs[0].token_ids for o in mem.generate(ps, sp)] == got
    assert llm.engine.runner.spec.stats.drafts > 5


def test_batches_over_the_limit_do_not_draft(ckpt):
    from qwen35.engine.speculative import MAX_VERIFY_SEQS

    d, _ = ckpt
    ps = prompts(MAX_VERIFY_SEQS + 1, seed=16, lo=20)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(str(d), dtype="fp32", verbose=False, num_speculative_tokens=1)
    spec = llm.engine.runner.spec
    spec.draft_override = lambda seq, pos: 5
    llm.generate(ps, sp)
    assert spec.stats.drafts == 0
    llm.generate(ps[:MAX_VERIFY_SEQS], sp)
    assert spec.stats.drafts > 0


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_with_drafts_equal_without(ckpt, tp):
    """Requests with logprobs are drafted for: each bonus token's logprob info comes from its
    own row (penalties over the drafts before it), so tokens, logprobs and top-n equal an
    engine without drafts (greedy, seeded, penalised, a stop string ending inside a round);
    on 2 ranks too."""
    d, _ = ckpt
    ps = prompts(4, seed=21)
    sps = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0,
                       repetition_penalty=1.3, frequency_penalty=0.2),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True,
                       logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=1),
    ]  # fmt: skip
    want = make(d).generate(ps, sps)
    full = {tuple(p): p + o.outputs[0].token_ids for p, o in zip(ps, want, strict=True)}
    # a stop string made of the last request's 6th .. 7th output tokens' text
    text = want[3].outputs[0].text
    sps[3].stop = [text[len(text) // 2 : len(text) // 2 + 2]] if len(text) > 4 else None
    want = make(d).generate(ps, sps)
    assert want[3].outputs[0].finish_reason == "stop"
    llm = make(d, num_speculative_tokens=3, tensor_parallel_size=tp)
    try:
        spec = llm.engine.runner.spec
        spec.backoff = False
        spec.draft_override = oracle(full, wrong=0.3)
        got = llm.generate(ps, sps)
        assert spec.stats.accepted > 10
    finally:
        llm.engine.shutdown()
    assert outputs(got) == outputs(want)
    for g, w in zip(got, want, strict=True):
        a, b = g.outputs[0].logprobs, w.outputs[0].logprobs
        assert len(a) == len(b) == len(w.outputs[0].token_ids)
        for x, y in zip(a, b, strict=True):
            assert x.token_id == y.token_id and list(x.top) == list(y.top)
            assert abs(x.logprob - y.logprob) < 1e-5
            assert all(abs(x.top[t] - y.top[t]) < 1e-5 for t in y.top)


@pytest.mark.parametrize("tp", [1, 2])
def test_image_requests_with_drafts(tmp_path, tp):
    """A request with an image (M-RoPE positions; verify steps as 2-token chunks, the MTP layer
    on the same 3-D positions) and a text one beside it: tokens equal an engine without drafts;
    on 2 ranks too (rank 0 encodes the image; the MTP passes mirrored on the worker)."""
    import json

    from safetensors.torch import load_file, save_file

    from test_vision_engine import PREPROCESSOR_JSON, make_llm, req
    from test_vision_model import rand_image
    from tiny import random_mtp
    from tiny_vlm import save_vlm

    save_vlm(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_JSON))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.update(random_mtp(cfg["text_config"], torch.Generator().manual_seed(3), torch.float32))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    img = rand_image(90, 130, 0)
    prompts_ = [req(img), [5, 6, 7, 8, 9, 10, 11]]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(tmp_path).generate(prompts_, sp)]
    llm = make_llm(tmp_path, num_speculative_tokens=2, tensor_parallel_size=tp)
    try:
        spec = llm.engine.runner.spec
        spec.backoff, spec.max_verify_seqs = False, 8
        assert llm.engine.has_vision and llm.engine.model.has_mtp
        assert [o.outputs[0].token_ids for o in llm.generate(prompts_, sp)] == want
        ids_ = llm.engine.mm_processor.process(req(img)["prompt_token_ids"],
                                               {"image": img}).token_ids  # fmt: skip
        spec.draft_override = oracle({tuple(ids_): ids_ + want[0], (5, 6, 7, 8, 9, 10, 11): [
            5, 6, 7, 8, 9, 10, 11] + want[1]})  # fmt: skip
        assert [o.outputs[0].token_ids for o in llm.generate(prompts_, sp)] == want
        assert spec.stats.accepted > 8
    finally:
        llm.engine.shutdown()


def test_plan_shares_rows_and_spares():
    """SpecState.plan: k drafts where the step's rows allow, one more each in turn where
    `max_rows` does not; a prefix checkpoint after the first token serves as the first spare;
    too few spares end the planning; steps already past max_rows are not limited."""
    from types import SimpleNamespace as NS

    from qwen35.engine.speculative import Draft, SpecState

    def sched(i, start=10, la=3, ck=()):
        seq = NS(seq_id=f"s{i}", params=SamplingParams(temperature=0.0))
        return NS(seq=seq, start=start, num_new_tokens=1, lookahead=la, sample=True,
                  checkpoints=list(ck))  # fmt: skip

    st = SpecState(range(100, 112), k=3, max_rows=8, max_verify_seqs=8, adaptive=False)
    steps = [sched(i) for i in range(3)]
    st.draft_override = lambda seq, pos: pos  # a draft at every position
    v = st.plan(steps)  # 3 rows + 5 drafts: 2, 2, 1
    assert [len(v[i].drafts) for i in range(3)] == [2, 2, 1] and v[0].drafts == [11, 12]
    assert [s for i in range(3) for s in v[i].spares] == list(range(100, 105))
    v = st.plan(steps[:1])  # alone: k drafts
    assert v[0].drafts == [11, 12, 13] and v[0].want == 3
    steps[0].lookahead = 1  # near max_model_len
    assert st.plan(steps[:1])[0].drafts == [11]
    v = st.plan([sched(0, ck=[(1, 7)])])  # the checkpoint slot saves the first state
    assert v[0].spares == [7, 100, 101]
    st.max_rows = 2  # past the limit: no drafts; a step longer than it: not limited
    assert st.plan(steps[:2]) == {}
    assert len(st.plan([sched(0), NS(**{**vars(sched(1)), "num_new_tokens": 9,
                                        "sample": False})])[0].drafts) == 3  # fmt: skip
    st.max_rows, st.spare_slots = None, range(100, 104)
    assert [len(x.drafts) for x in st.plan([sched(i) for i in range(2)]).values()] == [3]
    st.draft_override = None  # the MTP head's draft: its first token, the chain adds the rest
    st.drafts["s0"] = Draft(11, 5, hidden=None)
    st.drafts["s1"] = Draft(12, 6)  # for another position: stale
    v = st.plan([sched(0), sched(1)])
    assert list(v) == [0] and v[0].drafts == [5] and v[0].want == 3


def test_adaptive_draft_lengths():
    """k > 1: drafts 2..k only while they raise the step's expected tokens per second, from the
    measured seconds of steps by rows (StepCost: measured, interpolated, or extrapolated by
    ROW_COST_PRIOR) and each sequence's decayed acceptance; the first draft always."""
    from types import SimpleNamespace as NS

    from qwen35.engine.speculative import ROW_COST_PRIOR, SpecState, StepCost

    c = StepCost()
    assert c(3) == pytest.approx(1 + 2 * ROW_COST_PRIOR)  # nothing measured: the prior
    c.record(2, 2.0)
    c.record(2, 3.0)  # a moving average
    assert 2.0 < c(2) < 3.0
    c.record(6, 4.0)
    assert c(4) == pytest.approx(c(2) + (4.0 - c(2)) / 2)  # between two: on the line
    assert c(8) == pytest.approx(4.0 * (1 + 8 * ROW_COST_PRIOR) / (1 + 6 * ROW_COST_PRIOR))

    def sched(i):
        seq = NS(seq_id=f"s{i}", params=SamplingParams(temperature=0.0))
        return NS(seq=seq, start=10, num_new_tokens=1, lookahead=4, sample=True, checkpoints=[])

    def lengths(st, n=1):
        return [len(v.drafts) for v in st.plan([sched(i) for i in range(n)]).values()]

    st = SpecState(range(100, 120), k=4, max_verify_seqs=8, adaptive=True)
    st.draft_override = lambda seq, pos: pos
    for r in range(1, 10):  # rows cost nothing more: every draft
        st.cost.record(r, 1.0)
    assert lengths(st) == [4]
    for r in range(1, 10):  # a row costs a whole step: the first draft only
        st.cost.secs[r] = float(r)
    assert lengths(st) == [1]
    for r in range(1, 10):  # a row costs 0.3 of a step: depends on the acceptance
        st.cost.secs[r] = 1 + 0.3 * (r - 1)
    assert lengths(st) == [2]  # 0.7 (the prior): the third draft adds 0.34 tokens for 0.3
    for _ in range(20):
        st.outcome("s0", 4, 4)  # always right
    assert st.acceptance("s0") > 0.95 and lengths(st) == [4]
    for _ in range(50):
        st.outcome("s0", 2, 0)  # always wrong: tried one (the first), none after
    assert st.acceptance("s0") < 0.15 and lengths(st) == [1]
    st.accept.clear()  # two sequences: the likelier sequence's drafts first
    for _ in range(20):
        st.outcome("s1", 4, 4)
    assert lengths(st, 2) == [1, 4]
    st.remove("s1")
    assert "s1" not in st.accept
