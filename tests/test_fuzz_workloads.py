"""Random workloads (slow; fixed seeds, so each run is the same): the differential checks that
found this project's batching, stop-string and multimodal bugs, kept as regression tests.

- engine interleavings: requests arrive between steps and some are aborted mid-run, under
  prefix caching with random checkpoint intervals, KV pools small enough to preempt and
  chunked prefill, half the engines with 1-3 MTP drafts a step (speculative decoding), some
  on bf16-stored weights; every finished request equals its run alone in a fresh engine
  without drafts (fp32, the same weight storage) and the pools end empty;
- stop rules: random stop strings cut from each prompt's own output, stop ids, min_tokens, n,
  special tokens kept or skipped; batched == alone (text, tokens, finish and stop reasons), no
  stop string inside the text after the first min_tokens tokens, max_tokens / min_tokens kept.
"""

from __future__ import annotations

import random

import pytest
import torch

from qwen35.engine.llm_engine import LLM, _merge
from qwen35.request import SamplingParams
from tiny import VOCAB_REAL, save_checkpoint

pytestmark = pytest.mark.slow


def _outs(out) -> list[tuple]:
    return [(tuple(o.token_ids), o.finish_reason) for o in sorted(out.outputs, key=lambda o: o.index)]


def _lookup_draft(seq, pos):
    """A draft from the sequence itself: the token that followed the last earlier occurrence of
    its last token (tiny random models repeat themselves, so this is often right)."""
    toks = seq.token_ids[:pos]
    for i in range(len(toks) - 2, -1, -1):
        if toks[i] == toks[-1]:
            return toks[i + 1]
    return None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_interleavings_with_aborts_equal_each_request_alone(tmp_path, seed):
    rng = random.Random(seed)
    save_checkpoint(tmp_path, moe=seed % 2 == 0, seed=seed, dtype=torch.float32, mtp=True)
    accepted = 0  # drafts accepted over the engines with drafts
    storage = random.Random(seed + 100)  # (its own stream: the workloads stay those of before)
    ks = []
    for _ in range(8):
        bs = rng.choice([4, 8, 16])
        kw = dict(dtype="fp32", verbose=False, block_size=bs, max_model_len=160,
                  max_num_seqs=rng.choice([2, 4, 16]),
                  max_num_batched_tokens=rng.choice([8, 32, 256]),
                  enable_prefix_caching=rng.random() < 0.8)  # fmt: skip
        if storage.random() < 0.4:  # fp32 compute on bf16-stored weights (--dtype auto on AVX2)
            kw["quantization"] = "bf16"
        if rng.random() < 0.5:
            kw["checkpoint_interval"] = rng.choice([1, 2, 3]) * bs
        if rng.random() < 0.6:
            kw["num_kv_blocks"] = -(-160 // bs) + rng.randrange(1, 20)
        base = [rng.randrange(2, 250) for _ in range(rng.randrange(5, 60))]

        def prompt(base=base):
            shared = base[: rng.randrange(0, len(base) + 1)] if rng.random() < 0.7 else []
            return shared + [rng.randrange(2, 250) for _ in range(rng.randrange(1, 30))]

        def params():
            n, m = rng.choice([1, 1, 2]), rng.randrange(1, 30)
            if rng.random() < 0.5:
                return SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, n=n)
            return SamplingParams(max_tokens=m, temperature=1.0, seed=rng.randrange(1 << 20),
                                  ignore_eos=True, n=n)  # fmt: skip

        spec = rng.random() < 0.5  # MTP drafts (the reference below decodes without)
        k = storage.choice([1, 2, 3]) if spec else 0  # (drafts a step: the same own stream)
        eng = LLM(str(tmp_path), **kw, num_speculative_tokens=k).engine
        ks.append(k)
        if spec:
            eng.runner.spec.backoff = False
            eng.runner.spec.max_verify_seqs = 1 << 10  # batched verify steps too
            # drafts often right: the accept path too (drawn from the own stream: the engine
            # steps before it, which the workload stream's draws depend on, do not move it)
            if storage.random() < 0.75:
                eng.runner.spec.draft_override = _lookup_draft
        reqs, acc, done, aborted = {}, {}, {}, set()
        total, k = rng.randrange(4, 16), 0
        while k < total or eng.has_unfinished_requests():
            while k < total and (rng.random() < 0.4 or not eng.has_unfinished_requests()):
                reqs[f"r{k}"] = (prompt(), params())
                eng.add_request(f"r{k}", *reqs[f"r{k}"])
                k += 1
            live = [r for r in reqs if r not in done and r not in aborted]
            if live and rng.random() < 0.08:
                aborted.add(r := rng.choice(live))
                eng.abort_request(r)
            for out in eng.step():
                acc[out.request_id] = _merge(acc.get(out.request_id), out)
                if out.finished and out.request_id not in aborted:
                    done[out.request_id] = acc[out.request_id]
        assert (eng.scheduler.num_running, eng.scheduler.num_waiting) == (0, 0)
        accepted += eng.get_stats().get("spec_accepted_total", 0)
        fresh = LLM(str(tmp_path), **{**kw, "enable_prefix_caching": False})
        for rid, out in done.items():
            assert _outs(out) == _outs(fresh.generate([reqs[rid][0]], reqs[rid][1])[0]), (rid, kw)
    assert accepted > 0 and max(ks) > 1


@pytest.mark.parametrize("seed", [1, 2])
def test_random_stop_rules_batched_equal_alone(tmp_path, seed):
    rng = random.Random(seed)
    save_checkpoint(tmp_path, vocab_size=VOCAB_REAL, hidden_size=32, seed=seed, eos_token_id=248046)
    probe = LLM(str(tmp_path), dtype="fp32", verbose=False, max_model_len=256, max_memory="1GiB")
    for _ in range(12):
        ps = [[rng.randrange(100, 150000) for _ in range(rng.randrange(1, 30))]
              for _ in range(rng.randrange(2, 8))]  # fmt: skip
        free = probe.generate(ps, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
        sps = []
        for o in free:
            text = o.outputs[0].text
            kw = dict(max_tokens=rng.randrange(1, 30), temperature=rng.choice([0.0, 1.0]),
                      ignore_eos=rng.random() < 0.5, seed=rng.randrange(1 << 20))  # fmt: skip
            if text and rng.random() < 0.8:
                cuts = [rng.randrange(len(text)) for _ in range(rng.randrange(1, 3))]
                kw["stop"] = [text[i : i + rng.randrange(1, 6)] for i in cuts]
                kw["include_stop_str_in_output"] = rng.random() < 0.5
            if rng.random() < 0.3:
                kw["stop_token_ids"] = [rng.choice(o.outputs[0].token_ids)]
            if rng.random() < 0.3:
                kw["min_tokens"] = rng.randrange(0, 5)
            if rng.random() < 0.3:
                kw["n"] = 2
            if rng.random() < 0.3:
                kw["skip_special_tokens"] = False
            sps.append(SamplingParams(**kw))
        llm = LLM(str(tmp_path), dtype="fp32", verbose=False, max_model_len=256,
                  max_memory="1GiB", block_size=rng.choice([4, 16]),
                  max_num_seqs=rng.choice([2, 8]), max_num_batched_tokens=rng.choice([16, 2048]))  # fmt: skip
        outs = llm.generate(ps, sps)
        for p, sp, out in zip(ps, sps, outs, strict=True):
            alone = llm.generate([p], sp)[0]
            key = lambda r: [(c.text, c.token_ids, c.finish_reason, c.stop_reason)  # noqa: E731
                             for c in r.outputs]  # fmt: skip
            assert key(out) == key(alone), sp
            for c in out.outputs:
                assert len(c.token_ids) <= sp.max_tokens
                if c.finish_reason != "length":
                    assert len(c.token_ids) >= sp.min_tokens, (sp, c)
                body = c.text
                if isinstance(c.stop_reason, str) and sp.include_stop_str_in_output:
                    assert body.endswith(c.stop_reason)
                    body = body[: len(body) - len(c.stop_reason)]
                if not sp.min_tokens:
                    assert not any(s in body for s in sp.stop), (sp, c)
