"""Sampler: each processor on hand-computed cases, seeds, distributions, batch invariance."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

import qwen35.engine.sampler as sampler_mod
from qwen35.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    apply_top_filters,
    filter_thresholds,
    make_generator,
    reference_sample,
    sample_isolated,
)
from qwen35.request import SamplingParams as SP


def rand_logits(s: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(s, v, generator=torch.Generator().manual_seed(seed)) * scale


def fresh(row: SamplingRow) -> SamplingRow:
    """The same row with a new generator from its seed (a second, independent run)."""
    return SamplingRow(
        row.params,
        row.prompt_token_ids,
        row.output_token_ids,
        make_generator(row.params.seed),
        row.eos_token_ids,
    )


def seeded(seed: int, **kw) -> SamplingRow:
    hist = {
        k: kw.pop(k) for k in ("prompt_token_ids", "output_token_ids", "eos_token_ids") if k in kw
    }
    return SamplingRow(SP(seed=seed, **kw), generator=make_generator(seed), **hist)


class CallLog(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


# --- greedy and its limits ------------------------------------------------------------------


def test_greedy_is_argmax_and_skips_sort():
    x = rand_logits(5, 100).to(torch.bfloat16)
    log = CallLog()
    with log:
        out = Sampler()(x, [SamplingRow(SP(temperature=0.0)) for _ in range(5)])
    assert out.token_ids == x.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert not {"sort", "softmax", "exponential_", "topk"} & log.names


def test_tiny_temperature_top_k1_top_p_tiny_are_greedy():
    x = rand_logits(6, 200, seed=1)
    want = x.argmax(-1).tolist()
    for kw in (dict(temperature=1e-6), dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        for seed in range(3):
            rows = [seeded(seed * 10 + i, **kw) for i in range(6)]
            assert Sampler()(x, rows).token_ids == want, kw
    # A small temperature with a clear gap: the runner-up has probability ~exp(-40).
    x2 = torch.zeros(4, 50)
    x2[torch.arange(4), torch.tensor([3, 7, 11, 49])] = 2.0
    rows = [SamplingRow(SP(temperature=0.05)) for _ in range(4)]
    assert Sampler(seed=0)(x2, rows).token_ids == [3, 7, 11, 49]


def test_top_k_only_uses_topk_not_sort_and_keeps_ties():
    x = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0, 4.0]] * 3)
    ps = [SP(top_k=3), SP(top_k=2), SP(top_k=0)]
    log = CallLog()
    with log:
        y = apply_top_filters(x, ps)
    assert "sort" not in log.names
    kept = [set(torch.nonzero(r > -math.inf).flatten().tolist()) for r in y]
    assert kept == [{1, 2, 3, 5}, {1, 5}, set(range(6))]  # k=3: both 3.0s tie for third
    # The sort path (some row uses top-p) gives the same top-k masks.
    y2 = apply_top_filters(x, [SP(top_k=3), SP(top_k=2), SP(top_k=0, top_p=0.999999)])
    assert torch.equal(y2[:2] > -math.inf, y[:2] > -math.inf)


def test_top_p_avoids_the_full_sort_unless_the_mass_is_spread(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CANDIDATE_LIMIT", 16)
    peaked = rand_logits(3, 300, seed=4, scale=4.0)
    flat = rand_logits(1, 300, seed=5, scale=0.1)
    cases = [  # (logits, params, whether the whole vocabulary must be sorted)
        (peaked, [SP(top_k=20, top_p=0.5), SP(top_k=7, top_p=0.9, min_p=0.05), SP()], False),
        (peaked, [SP(top_p=0.8), SP(top_p=0.5, min_p=0.1), SP(top_k=3)], False),
        (torch.cat([peaked[:1], flat]), [SP(top_p=0.95), SP(top_p=0.9)], True),
        (torch.cat([flat, flat]), [SP(top_p=0.9, top_k=40), SP(top_p=0.9, top_k=100)], False),
    ]
    for x, ps, sorts in cases:
        log = CallLog()
        with log:
            y = apply_top_filters(x, ps)
        assert ("sort" in log.names) == sorts, ps
        monkeypatch.setattr(sampler_mod, "CANDIDATE_LIMIT", 10**6)  # always sort: the oracle
        assert torch.equal(y, apply_top_filters(x, ps)), ps
        monkeypatch.setattr(sampler_mod, "CANDIDATE_LIMIT", 16)
    kept = (apply_top_filters(flat, [SP(top_p=0.9)]) > -math.inf).sum()
    assert 16 < int(kept) < 300  # the flat row really needed more than the candidates


def test_top_k_only_keeps_k_or_all():
    y = apply_top_filters(rand_logits(2, 300, seed=4), [SP(top_k=20), SP()])
    assert (y > -math.inf).sum(-1).tolist() == [20, 300]


def test_top_p_and_min_p_masks_hand_computed():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = probs.log()[None].repeat(5, 1)
    ps = [SP(top_p=0.75), SP(top_p=0.85), SP(min_p=0.35), SP(min_p=0.2, top_p=0.7)]
    ps.append(SP(min_p=0.35, top_p=0.6))
    y = apply_top_filters(x, ps)
    kept = [torch.nonzero(r > -math.inf).flatten().tolist() for r in y]
    # top_p 0.75: 0.5 < .75 so token 1 is needed; 0.8 >= .75 so token 2 is not.
    # min_p 0.35: threshold 0.175 keeps {0, 1}; min_p 0.2 -> {0,1,2}, renormalised
    # top-p 0.7 over it: 0.5/0.95 = 0.526 < 0.7 so {0, 1}. min_p 0.35 then top-p 0.6: top-p sees
    # the renormalised 0.625 >= 0.6, so {0} (without renormalising it would keep {0, 1}).
    assert kept == [[0, 1], [0, 1, 2], [0, 1], [0, 1], [0]]
    # Kept logits are only divided by the temperature.
    y = apply_top_filters(x, [SP(temperature=0.5, top_p=0.75)])
    assert torch.allclose(y[0, :2], x[0, :2] / 0.5)


def test_temperature_scales_logits_and_input_is_not_modified():
    x = rand_logits(2, 30, seed=3)
    x0 = x.clone()
    y = apply_top_filters(x, [SP(temperature=0.5), SP(temperature=2.0)])
    assert torch.allclose(y[0], x0[0] * 2) and torch.allclose(y[1], x0[1] / 2)
    rows = [
        seeded(
            1,
            repetition_penalty=1.5,
            min_p=0.1,
            top_p=0.9,
            top_k=5,
            min_tokens=3,
            output_token_ids=[1, 2],
            eos_token_ids=(4,),
        ),  # fmt: skip
        SamplingRow(SP(temperature=0, presence_penalty=1.0), output_token_ids=[7]),
    ]
    Sampler()(x, rows)
    assert torch.equal(x, x0)


# --- penalties and min_tokens ---------------------------------------------------------------


def test_penalties_hand_computed():
    x = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5, 3.0]] * 3)
    rows = [
        SamplingRow(
            SP(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            prompt_token_ids=[0, 1],
            output_token_ids=[2, 2, 3],
        ),
        # Frequency / presence count generated tokens only: the prompt is ignored.
        SamplingRow(SP(frequency_penalty=1.0), prompt_token_ids=[5], output_token_ids=[4, 4, 4]),
        SamplingRow(SP(), prompt_token_ids=[0], output_token_ids=[0]),  # no penalty: untouched
    ]
    y = apply_penalties(x, rows)
    # 0: positive, in prompt -> 2/2; 1: negative -> -2*2; 2: 1/2 - 0.5*2 - 0.25;
    # 3: -1*2 - 0.5 - 0.25; 4, 5 unseen.
    assert y[0].tolist() == [1.0, -4.0, -0.75, -2.75, 0.5, 3.0]
    assert y[1].tolist() == [2.0, -2.0, 1.0, -1.0, 0.5 - 3.0, 3.0]
    assert torch.equal(y[2], x[2])
    assert apply_penalties(x, [SamplingRow(SP())] * 3) is x  # nothing to do: no copy


def test_penalties_accept_tensor_histories():
    x = rand_logits(2, 50, seed=6)
    hist = dict(prompt_token_ids=[3, 4, 4, 9], output_token_ids=[4, 7, 7, 7])
    p = SP(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=-0.3)
    as_lists = apply_penalties(x, [SamplingRow(p, **hist), SamplingRow(SP())])
    as_tensors = {k: torch.tensor(v) for k, v in hist.items()}
    assert torch.equal(
        as_lists, apply_penalties(x, [SamplingRow(p, **as_tensors), SamplingRow(SP())])
    )
    changed = torch.nonzero(as_lists[0] != x[0]).flatten().tolist()
    assert changed == [3, 4, 7, 9] and torch.equal(as_lists[1], x[1])

    def rep(v: float) -> float:
        return v / 1.7 if v > 0 else v * 1.7

    v = x[0].tolist()  # each seen token is penalised once however often it appears
    want = {3: rep(v[3]), 9: rep(v[9]), 4: rep(v[4]) - 0.4 + 0.3, 7: rep(v[7]) - 1.2 + 0.3}
    for t, w in want.items():
        assert as_lists[0, t].item() == pytest.approx(w, abs=1e-5), t


def test_penalties_change_greedy_choice():
    x = torch.tensor([[0.0, 2.0, 1.5, 0.0]])
    row = SamplingRow(SP(temperature=0, presence_penalty=1.0), output_token_ids=[1])
    assert Sampler()(x, [row]).token_ids == [2]


def test_min_tokens_masks_eos_and_stop_ids():
    x = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0]] * 4)
    under = dict(output_token_ids=[0], eos_token_ids=(1,))
    rows = [
        SamplingRow(SP(temperature=0, min_tokens=2, stop_token_ids=[2]), **under),
        SamplingRow(SP(temperature=0, min_tokens=2, ignore_eos=True), **under),
        SamplingRow(SP(temperature=0, min_tokens=1), **under),  # already has 1 token
        SamplingRow(SP(temperature=0, min_tokens=3, stop_token_ids=[2]), output_token_ids=[0, 0]),
    ]
    assert Sampler()(x, rows).token_ids == [3, 1, 1, 1]


# --- seeds ----------------------------------------------------------------------------------


def run_steps(rows: list[SamplingRow], steps: int, others: int = 0, seed: int = 0) -> list:
    """Sample `steps` times; the rows of interest come after `others` unrelated rows."""
    sampler, vocab = Sampler(seed=seed), 500
    noise = [SamplingRow(SP(temperature=1.0)), SamplingRow(SP(temperature=0)), seeded(999)]
    extra = [noise[i % 3] for i in range(others)]
    got = []
    for step in range(steps):
        x = rand_logits(others + len(rows), vocab, seed=step, scale=1.0)
        x[others:] = rand_logits(len(rows), vocab, seed=1000 + step, scale=1.0)
        got.append(sampler(x, extra + rows).token_ids[others:])
    return got


def test_same_seed_same_samples_independent_of_batch():
    def rows() -> list[SamplingRow]:
        return [seeded(7, top_p=0.95), seeded(8, top_k=50, temperature=0.7)]

    alone = run_steps(rows(), 5)
    assert run_steps(rows(), 5, seed=123) == alone  # global seed does not matter
    assert run_steps(rows(), 5, others=5) == alone  # nor the rest of the batch
    assert run_steps(rows()[:1], 5, others=3) == [a[:1] for a in alone]
    unseeded = [SamplingRow(SP(top_p=0.95)), SamplingRow(SP(top_k=50, temperature=0.7))]
    assert run_steps(unseeded, 5, seed=1) == run_steps(unseeded, 5, seed=1)


def test_different_seeds_differ():
    a = run_steps([seeded(1)], 20)
    b = run_steps([seeded(2)], 20)
    assert a != b
    assert len({t[0] for t in a}) > 10  # a flat distribution: not stuck on one token


def test_a_generator_without_seed_is_used():
    # The engine may derive generators itself (e.g. seed + index for n > 1 children).
    x = rand_logits(1, 300, seed=8, scale=0.5)
    a = [Sampler()(x, [SamplingRow(SP(), generator=make_generator(5))]) for _ in range(2)]
    b = Sampler()(x, [seeded(5)])
    assert a[0].token_ids == a[1].token_ids == b.token_ids


def test_seeded_row_needs_generator():
    with pytest.raises(ValueError, match="make_generator"):
        Sampler()(torch.zeros(1, 10), [SamplingRow(SP(seed=3))])
    # A greedy row with a seed draws nothing, so it needs none.
    assert Sampler()(torch.eye(3)[1:2], [SamplingRow(SP(seed=3, temperature=0))]).token_ids == [1]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="one SamplingRow per row"):
        Sampler()(torch.zeros(2, 10), [SamplingRow(SP())])
    with pytest.raises(ValueError, match="out of range"):
        Sampler()(torch.zeros(1, 10), [SamplingRow(SP(presence_penalty=1), output_token_ids=[10])])
    with pytest.raises(ValueError, match="logprobs_mode"):
        Sampler(logprobs_mode="final")


# --- distributions --------------------------------------------------------------------------


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a masked token"
    expected = probs[support].double() * n
    return float(((counts[support] - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    "params, keep",
    [
        (SP(temperature=0.7), None),
        (SP(temperature=1.3, top_k=5), 5),
        (SP(temperature=1.0, top_p=0.8), None),
    ],
)
def test_empirical_distribution_matches_softmax(params, keep):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2])
    n = 20000
    out = Sampler(seed=0)(logits.repeat(n, 1), [SamplingRow(params)] * n).token_ids
    probs = apply_top_filters(logits[None], [params])[0].softmax(-1)
    if keep is not None:
        assert int((probs > 0).sum()) == keep
    df = int((probs > 0).sum()) - 1
    # 99.9% quantile of chi-square is below df + 4.5 * sqrt(2 df) + 5 for df <= 7.
    assert chi_square(out, probs) < df + 4.5 * math.sqrt(2 * df) + 5


def test_seeded_rows_follow_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    g = make_generator(42)
    row = SamplingRow(SP(seed=42), generator=g)
    sampler = Sampler()
    out = [sampler(logits[None], [row]).token_ids[0] for _ in range(3000)]
    assert chi_square(out, logits.softmax(-1)) < 3 + 4.5 * math.sqrt(6) + 5


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_raw_top_n_sorted_and_chosen():
    x = rand_logits(3, 40, seed=5)
    rows = [
        seeded(1, logprobs=5, top_k=3, repetition_penalty=1.3, output_token_ids=[0, 1]),
        SamplingRow(SP(temperature=0, logprobs=0)),
        SamplingRow(SP(temperature=0)),
    ]
    out = Sampler()(x, rows)
    lp = x.log_softmax(-1)  # raw: before penalties and top-k
    for i in (0, 1):
        got = out.logprobs[i]
        assert got.token_id == out.token_ids[i]
        assert got.logprob == pytest.approx(float(lp[i, got.token_id]), abs=1e-6)
    top = out.logprobs[0].top
    assert list(top) == lp[0].topk(5).indices.tolist()
    assert list(top.values()) == sorted(top.values(), reverse=True)
    assert out.logprobs[1].top == {} and out.logprobs[2] is None


def test_logprobs_processed_mode():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    rows = [
        seeded(1, logprobs=4, top_k=2, temperature=0.5),
        SamplingRow(SP(temperature=0, logprobs=1, presence_penalty=2.0), output_token_ids=[0]),
    ]
    out = Sampler(logprobs_mode="processed")(x, rows)
    want0 = (x[0, :2] / 0.5).log_softmax(-1)  # only the top-2 survive, at temperature 0.5
    top0 = out.logprobs[0].top
    assert list(top0)[:2] == [0, 1] and torch.allclose(torch.tensor(list(top0.values())[:2]), want0)
    assert list(top0.values())[2:] == [-math.inf, -math.inf]
    want1 = torch.tensor([1.0, 2.0, 1.0, 0.0]).log_softmax(-1)  # after the presence penalty
    assert out.token_ids[1] == 1 and out.logprobs[1].logprob == pytest.approx(float(want1[1]))


# --- batch invariance and the reference -----------------------------------------------------


def random_row(rng: random.Random, vocab: int, seed: int) -> SamplingRow:
    p = SP(
        temperature=rng.choice([0.0, 0.0, 0.5, 1.0, 1.5]),
        top_k=rng.choice([0, 0, 1, 5, 20]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.2, 0.8]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.3]),
        min_tokens=rng.choice([0, 0, 5]),
        stop_token_ids=[rng.randrange(vocab)],
        logprobs=rng.choice([None, None, 0, 3]),
        seed=seed,
        logit_bias=rng.choice(
            [None, None, {rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(3)}]
        ),
    )
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
    eos = (rng.randrange(vocab),)
    return SamplingRow(p, prompt, output, make_generator(seed), eos)


@pytest.mark.parametrize("candidates", [1024, 8])  # 8: topk candidates and the sort fallback
def test_mixed_batch_matches_each_row_alone_and_the_reference(candidates, monkeypatch):
    monkeypatch.setattr(sampler_mod, "CANDIDATE_LIMIT", candidates)
    rng, vocab, n = random.Random(0), 64, 40
    rows = [random_row(rng, vocab, seed=100 + i) for i in range(n)]
    assert {r.params.temperature == 0 for r in rows} == {True, False}
    x = rand_logits(n, vocab, seed=9)
    batch = Sampler()(x, rows)
    for i, row in enumerate(rows):
        alone = Sampler()(x[i : i + 1], [fresh(row)])
        assert alone.token_ids == [batch.token_ids[i]], i
        ref_token, ref_lp = reference_sample(x[i], fresh(row))
        assert ref_token == batch.token_ids[i], i
        got_lp = batch.logprobs[i]
        assert (ref_lp is None) == (got_lp is None)
        if got_lp is not None:
            assert got_lp.logprob == pytest.approx(ref_lp.logprob, abs=1e-5)
            assert list(got_lp.top) == list(ref_lp.top)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_matches_cpu_and_seeds_reproduce():
    rng, vocab, n = random.Random(1), 1000, 16
    rows = [random_row(rng, vocab, seed=i) for i in range(n)]
    x = rand_logits(n, vocab, seed=2)

    def on_cuda(r: SamplingRow) -> SamplingRow:
        return SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids,
                           make_generator(r.params.seed, "cuda"), r.eos_token_ids)  # fmt: skip

    a = Sampler()(x.cuda(), [on_cuda(r) for r in rows])
    b = Sampler()(x.cuda(), [on_cuda(r) for r in rows])
    cpu = Sampler()(x, rows)
    assert a.token_ids == b.token_ids
    for i, r in enumerate(rows):
        if r.params.temperature == 0:
            assert a.token_ids[i] == cpu.token_ids[i]


# --- robustness (issue 11): no row can make the sampler fail for the others ------------------


@pytest.mark.parametrize("top_p", [0.0, 1e-46, 1e-40])  # 0 in float32, or a denormal
def test_top_p_that_rounds_to_zero_keeps_the_top_token(top_p):
    x = rand_logits(3, 50, seed=3)
    ps = [SP(top_p=top_p), SP(top_p=0.9), SP(top_p=top_p, top_k=5)]  # not validated: raw values
    thr = filter_thresholds(x, ps)  # used to gather at index -1
    kept = x >= thr
    assert kept[0].sum() == 1 and kept[0, x[0].argmax()] and kept[2].sum() == 1
    out = Sampler(seed=0)(x, [SamplingRow(p) for p in ps])
    assert out.token_ids[0] == int(x[0].argmax()) and out.token_ids[2] == int(x[2].argmax())


def test_nan_and_inf_logits_do_not_raise():
    x = rand_logits(4, 64, seed=4)
    x[0] = math.nan
    x[1, 5] = math.inf
    x[2, :10] = math.nan
    rows = [
        SamplingRow(SP(top_p=0.9, top_k=k, min_p=m))
        for k, m in ((0, 0), (3, 0.1), (0, 0.05), (0, 0))
    ]
    out = Sampler(seed=0)(x, rows)
    assert all(0 <= t < 64 for t in out.token_ids)


def test_logit_bias_moves_greedy_and_bans():
    x = rand_logits(2, 40, seed=5)
    top = int(x[0].argmax())
    rows = [SamplingRow(SP(temperature=0, logit_bias={7: 100.0})),
            SamplingRow(SP(temperature=0, logit_bias={int(x[1].argmax()): -100.0}))]  # fmt: skip
    out = Sampler()(x, rows)
    assert out.token_ids[0] == 7 != top or top == 7
    assert out.token_ids[1] == int(x[1].topk(2).indices[1])
    # raw logprobs do not see the bias; the input is untouched
    lp = Sampler()(x, [SamplingRow(SP(temperature=0, logprobs=0, logit_bias={7: 100.0}))] * 2)
    assert lp.logprobs[0].logprob == pytest.approx(float(x[0].log_softmax(-1)[7]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler()(x, [SamplingRow(SP(logit_bias={40: 1.0}))] * 2)


def test_sample_isolated_fails_only_the_bad_row():
    x = rand_logits(3, 40, seed=6)
    bad = SamplingRow(SP(logit_bias={99: 1.0}))  # out of this vocabulary: the sampler raises
    rows = [SamplingRow(SP(temperature=0)), bad, SamplingRow(SP(temperature=0, logprobs=1))]
    out, errors = sample_isolated(Sampler(), x, rows)
    assert list(errors) == [1] and "outside the vocabulary" in str(errors[1])
    assert out.token_ids[1] is None and out.logprobs[1] is None
    assert out.token_ids[0] == int(x[0].argmax()) and out.token_ids[2] == int(x[2].argmax())
    assert out.logprobs[2] is not None
    out, errors = sample_isolated(Sampler(), x[:1], [bad])
    assert out.token_ids == [None] and list(errors) == [0]
    out, errors = sample_isolated(Sampler(), x[:1], rows[:1])  # no failure: one batched call
    assert errors == {} and out.token_ids == [int(x[0].argmax())]


def test_a_row_its_constraints_leave_no_token_fails_alone():
    """allowed_token_ids that bad_words ban, or that are only stop ids while min_tokens waits:
    every logit -inf, whose argmax (token 0) was drawn as if allowed. Now that row has no token
    and an error naming its constraints, in the batched call (no retry: the seeded rows beside
    it draw what they draw alone, their generators advanced once)."""
    x = rand_logits(4, 40, seed=7)
    rows = [
        SamplingRow(SP(temperature=1.0, seed=3), generator=make_generator(3)),
        SamplingRow(SP(temperature=0, allowed_token_ids=[5, 9], bad_words_token_ids=[[5], [9]])),
        SamplingRow(SP(temperature=0.7, seed=4, allowed_token_ids=[2], min_tokens=3,
                       stop_token_ids=[2]), output_token_ids=[7], generator=make_generator(4)),
        SamplingRow(SP(temperature=0.5, seed=5, logprobs=2), generator=make_generator(5)),
    ]  # fmt: skip
    out, errors = sample_isolated(Sampler(), x, rows)
    assert sorted(errors) == [1, 2] and out.token_ids[1] is None and out.token_ids[2] is None
    assert "allowed_token_ids and bad_words" in str(errors[1])
    assert "allowed_token_ids and min_tokens" in str(errors[2])
    assert all(isinstance(e, sampler_mod.NoTokenAllowedError) for e in errors.values())
    for i in (0, 3):
        alone = Sampler()(x[i : i + 1], [fresh(rows[i])])
        assert out.token_ids[i] == alone.token_ids[0]
    assert out.logprobs[3] is not None and out.logprobs[2] is None
    # the same rows without the contradiction draw a token, and the check costs nothing
    # where no row has a constraint that could ban every token
    ok = Sampler()(x[1:2], [SamplingRow(SP(temperature=0, allowed_token_ids=[5, 9]))])
    assert ok.errors == {} and ok.token_ids[0] in (5, 9)


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"top_p": 1e-46}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": 1e-50}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"temperature": math.inf}, "temperature"),
        ({"min_p": math.nan}, "min_p"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"n": 33, "seed": 2**64 - 32}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(1025)}}, "logit_bias"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ],
)
def test_validation_names_the_field(kw, param):
    from qwen35.request import SamplingParamsError

    with pytest.raises(SamplingParamsError) as e:
        SP(**kw).validate()
    assert e.value.param == param and param in str(e.value)


def test_validation_accepts_the_edges():
    SP(n=32, seed=2**64 - 32).validate()
    SP(seed=-(2**63), top_p=1e-30, repetition_penalty=0.01, logit_bias={0: -100, 9: 100}).validate()
    SP(repetition_penalty=100, temperature=2, frequency_penalty=-2).validate()
