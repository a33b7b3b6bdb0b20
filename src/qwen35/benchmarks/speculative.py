"""Speculative decoding with the MTP head against plain decoding: batch-1 decode tokens/s.

Engines drafting DRAFT_TOKENS (1 and 3; `--draft-tokens`) tokens a step, and for k > 1 also
with `--speculative-adaptive` ("adaptive" rows, at the oracle rates below 100%: draft lengths
chosen from measured step times and acceptance). Random weights give an MTP head whose
drafts are almost never right, so this workload also drafts with an oracle at set acceptance
rates: each round the plain engine decodes first, and the oracle drafts its token at each
position with probability `acceptance`, a wrong one otherwise, each position on its own
(engine/speculative.py `draft_override`; with k drafts a step accepts p + p^2 + .. + p^k of
them on average). What a real checkpoint gains is read off the row of its acceptance rate (real
MTP chains fall off along the chain: the row of a lower rate bounds the later drafts). Every
engine shares one set of weights; each round runs the plain engine, then the drafting ones in
an order rotated round by round (the plain engine's tokens are the oracle's); tokens are
checked equal to the plain engine's (greedy: the drafts never change the output). On CUDA the
drafting engines replay decode and verify steps from CUDA graphs; `k=K oracle 80% eager` rows
run the same drafts with --enforce-eager beside them (what the graphs give).
"""

from __future__ import annotations

import random
import time

from qwen35.benchmarks.common import BenchModel, BenchOptions, make_engine, ratio, timed_request

ACCEPTANCE = (1.0, 0.8, 0.6)
DRAFT_TOKENS = (1, 3)  # engines drafting this many tokens a step
BATCHES = (2, 4)  # also measured with always-right drafts: why larger batches do not draft


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"prompt_len": 16, "new_tokens": 8, "rounds": opts.rounds or 1}
    return {"prompt_len": 256, "new_tokens": 64, "rounds": opts.rounds or 3}


def _oracle(reference: list[int], acceptance: float, seed: int):
    rng = random.Random(seed)

    def draft(seq, pos):
        if pos >= len(reference):
            return None
        tok = reference[pos]
        return tok if rng.random() < acceptance else (tok + 1) % (1 << 20)

    return draft


def batch_oracle(prompts: list[list[int]], outputs: list[list[int]], acceptance: float, seed: int):
    """A draft_override for several requests: each prompt's own `_oracle` over the tokens the
    plain engine emitted after it."""
    oracles = {tuple(p): _oracle(p + o, acceptance, seed) for p, o in zip(prompts, outputs, strict=True)}
    return lambda seq, pos: oracles[tuple(seq.token_ids[: seq.num_prompt_tokens])](seq, pos)


def run_speculative(bm: BenchModel, opts: BenchOptions) -> dict:
    if not getattr(bm.model, "has_mtp", False):
        from qwen35.errors import Qwen35Error

        raise Qwen35Error(f"{bm.config.name} has no MTP head: the spec workload drafts with it")
    sz = sizes(opts)
    P, N = sz["prompt_len"], sz["new_tokens"]
    kw = dict(max_num_seqs=max(BATCHES), max_model_len=P + N + 16, enable_prefix_caching=False)
    plain = make_engine(bm, **kw)
    ks = opts.draft_tokens or DRAFT_TOKENS
    specs = {k: make_engine(bm, num_speculative_tokens=k, **kw) for k in ks}
    rates = {f"oracle {a:.0%}": a for a in ACCEPTANCE}
    engine_of = {"plain": plain}
    rate_of: dict[str, float | None] = {}
    adaptive: set[str] = set()  # rows with --speculative-adaptive (SpecState.adaptive)
    for k, eng in specs.items():
        for r in ("mtp", *rates, *(f"adaptive {r}" for r in rates if k > 1 and rates[r] < 1)):
            name = f"k={k} {r}"
            engine_of[name], rate_of[name] = eng, rates.get(r.removeprefix("adaptive "))
            if r.startswith("adaptive"):
                adaptive.add(name)
    eager = {}  # CUDA: the same drafts without graphs (what replaying verify steps gives)
    if bm.device.type == "cuda":
        eager = {k: make_engine(bm, num_speculative_tokens=k, enforce_eager=True, **kw)
                 for k in ks}  # fmt: skip
        for k, eng in eager.items():
            engine_of[f"k={k} oracle 80% eager"], rate_of[f"k={k} oracle 80% eager"] = eng, 0.8
    names = list(engine_of)
    rng = random.Random(opts.seed)
    vocab = bm.config.vocab_size
    for name, eng in (("plain", plain), *((f"k={k}", e) for k, e in specs.items()),
                      *((f"k={k} eager", e) for k, e in eager.items())):  # fmt: skip
        timed_request(eng, [rng.randrange(vocab) for _ in range(8)], 4, f"warm-{name}")  # (one-off costs)
    secs = {n: 0.0 for n in names}
    toks = {n: 0 for n in names}
    acc = {n: [0, 0, 0] for n in names}  # drafts verified, accepted, steps that verified
    same = {n: True for n in names}
    for r in range(sz["rounds"]):
        prompt = [rng.randrange(vocab) for _ in range(P)]
        reference = None
        k = r % (len(names) - 1)  # the drafting engines in a rotated order each round
        for name in ["plain"] + names[1 + k :] + names[1 : 1 + k]:
            eng = engine_of[name]
            if eng is not plain:
                rs = eng.runner.spec
                rs.draft_override, rs.adaptive = None, name in adaptive
                if rate_of[name] is not None:
                    rs.draft_override = _oracle(prompt + reference, rate_of[name], opts.seed + r)
                before = (rs.stats.drafts, rs.stats.accepted, rs.stats.verifies)
            _, steps, out = timed_request(eng, prompt, N, f"{name}-{r}")
            secs[name] += sum(steps)
            toks[name] += len(out) - 1  # after the first (prefill) token
            if eng is not plain:
                for j in range(3):
                    acc[name][j] += (rs.stats.drafts, rs.stats.accepted, rs.stats.verifies)[j] - before[j]
                same[name] &= out == reference
            else:
                reference = out
    plain_limit = next(iter(specs.values())).runner.spec.max_verify_seqs  # (CPU 2, GPU 8)
    batches = {
        f"k={k}": _batches(plain, eng, rng, vocab, P, N, sz["rounds"], opts.seed)
        for k, eng in specs.items()
    }
    for eng in specs.values():
        eng.runner.spec.draft_override, eng.runner.spec.adaptive = None, False
    rows = {}
    for name in names:
        tps = toks[name] / secs[name] if secs[name] else float("nan")
        drafts, accepted, verifies = acc[name]
        rows[name] = {
            "decode_tokens_per_s": tps,
            "drafts": drafts,
            "acceptance": accepted / drafts if drafts else None,
            # tokens a verifying step gives (SGLang's "accept length"): 1 + accepted drafts
            "accept_length": 1 + accepted / verifies if verifies else None,
            "tokens_equal_plain": same[name] if name != "plain" else True,
        }
    for name in names:
        rows[name]["over_plain"] = ratio(
            rows[name]["decode_tokens_per_s"], rows["plain"]["decode_tokens_per_s"]
        )
    del plain, specs, eager, engine_of
    return {
        "prompt_len": P,
        "new_tokens": N,
        "rounds": sz["rounds"],
        "draft_tokens": list(ks),
        "engines": rows,
        "batches": batches,
        "max_verify_seqs": plain_limit,
    }


def _timed_batch(engine, prompts: list[list[int]], new_tokens: int, tag: str):
    """Greedy requests together: (tokens after each one's first, seconds of those steps, each
    request's tokens)."""
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sp)
    out: dict[str, list[int]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    secs, toks = 0.0, 0
    while engine.has_unfinished_requests():
        started = all(out.values())
        t0 = time.perf_counter()
        deltas = engine.step()
        dt = time.perf_counter() - t0
        n = 0
        for o in deltas:
            if o.outputs:
                n += len(o.outputs[0].token_ids)
                out[o.request_id] += o.outputs[0].token_ids
        if started:
            secs, toks = secs + dt, toks + n
    return toks, secs, [out[f"{tag}-{i}"] for i in range(len(prompts))]


def _batches(plain, spec, rng, vocab, P, N, rounds, seed) -> dict:
    """Decode tokens/s of B requests together: plain vs always-right drafts for each (the
    engine's verify limit, engine/speculative.py MAX_VERIFY_SEQS / GPU_MAX_VERIFY_SEQS, lifted
    to max(BATCHES) for the measurement where lower)."""
    rs = spec.runner.spec
    limit = rs.max_verify_seqs
    rs.max_verify_seqs = max(limit, max(BATCHES))
    res = {}
    try:
        for B in BATCHES:
            acc = {"plain": [0, 0.0], "oracle 100%": [0, 0.0]}
            for r in range(rounds):
                ps = [[rng.randrange(vocab) for _ in range(P)] for _ in range(B)]
                n, t, ref = _timed_batch(plain, ps, N, f"b{B}-{r}")
                acc["plain"][0] += n
                acc["plain"][1] += t
                rs.draft_override = batch_oracle(ps, ref, 1.0, seed)
                n, t, out = _timed_batch(spec, ps, N, f"s{B}-{r}")
                acc["oracle 100%"][0] += n
                acc["oracle 100%"][1] += t
                if out != ref:
                    raise AssertionError(f"batch {B}: tokens with drafts differ from plain")
            tps = {k: n / t if t else float("nan") for k, (n, t) in acc.items()}
            res[str(B)] = {**tps, "over_plain": ratio(tps["oracle 100%"], tps["plain"])}
    finally:
        rs.max_verify_seqs = limit
        rs.draft_override = None
    return res
