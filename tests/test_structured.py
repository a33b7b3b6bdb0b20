"""Structured outputs by constrained decoding (issue 16), on a tiny random-weight model with the
real Qwen 3.5 vocabulary (unconstrained output is gibberish, so every valid answer is the
grammar's doing): 50 JSON schemas, regex, choice, forced tool calls, through the openai client
streaming and not; unconstrained rows unchanged by constrained neighbours; thinking; n > 1,
stop strings, max_tokens, preemption; errors are 400s and the server keeps serving."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import re
import threading

import httpx
import jsonschema
import openai
import pytest
import torch

from qwen35.engine.llm_engine import LLM, LLMEngine
from qwen35.engine.structured import tool_call_grammar
from qwen35.engine.structured.manager import (
    apply_token_bitmask,
    apply_token_bitmask_reference,
    apply_token_bitmask_torch,
)
from qwen35.request import SamplingParams, SamplingParamsError, StructuredOutputs
from qwen35.server.app import ServerConfig, create_app
from qwen35.server.parsers import ReasoningParser
from server_fakes import ServerThread, stream_chat
from structured_schemas import schemas
from tiny import VOCAB_REAL, save_checkpoint

IM_END = 248046
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "unit"],
}
TIME = {
    "type": "object",
    "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "fields": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "maxItems": 3},
    },
    "required": ["zone"],
}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SMALL = {"type": "object", "properties": {"unit": WEATHER["properties"]["unit"],
         "days": WEATHER["properties"]["days"]}, "required": ["unit", "days"]}  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-structured")
    # EOS is <|im_end|> as in the real checkpoints (the tiny default, id 1, is the text '"')
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, seed=0, eos_token_id=IM_END)
    return d


def make_llm(ckpt, **kw) -> LLM:
    opts = dict(max_model_len=512, max_num_seqs=32, max_memory="256MiB", verbose=False)
    return LLM(str(ckpt), **{**opts, **kw})


@pytest.fixture(scope="module")
def llm(ckpt):
    return make_llm(ckpt)


@pytest.fixture(scope="module")
def server(ckpt):
    engine = LLMEngine(str(ckpt), max_model_len=1024, max_num_seqs=32, max_memory="256MiB",
                       verbose=False)  # fmt: skip
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    yield srv, client, engine
    srv.close()


def so(**kw) -> StructuredOutputs:
    return StructuredOutputs(**kw)


# ---- the mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [apply_token_bitmask, apply_token_bitmask_torch])
def test_bitmask_matches_reference(fn):
    g = torch.Generator().manual_seed(0)
    v = 100  # not a multiple of 32: the last word is partial
    mask = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    mask[1] = -1  # everything allowed
    mask[2] = 0  # nothing allowed
    logits = torch.randn(3, v, generator=g)
    want, got = logits.clone(), logits.clone()
    apply_token_bitmask_reference(want, mask)
    fn(got, mask)
    assert torch.equal(got, want) and torch.isinf(want[0]).any() and not torch.isinf(want[1]).any()


def test_spec_validation():
    with pytest.raises(SamplingParamsError, match="exactly one"):
        SamplingParams(structured_outputs=so(regex="a", choice=["b"])).validate()
    with pytest.raises(SamplingParamsError, match="not JSON"):
        SamplingParams(structured_outputs=so(json="{nope")).validate()
    with pytest.raises(SamplingParamsError, match="choice"):
        SamplingParams(structured_outputs=so(choice=[])).validate()
    p = SamplingParams(structured_outputs={"regex": "[ab]+"}).validate()  # vLLM's dict form
    assert p.structured_outputs == so(regex="[ab]+")
    assert so(json='{"type": "object"}').key() == so(json={"type": "object"}).key()


def test_tool_grammar_accepts_the_template_format_only(llm):
    tok = llm.tokenizer
    grammar = tool_call_grammar(TOOLS, multiple=True, call_open_id=tok.tool_call_start_id,
                                call_close_id=tok.tool_call_end_id)  # fmt: skip
    template = llm.engine.structured.compile(so(grammar=grammar))

    def call(name, **args):
        body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
        return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"

    def accepts(text):
        m, ids = template.deep_copy(), tok.encode(text)
        return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()

    good = call("get_weather", city="Paris", unit="celsius", days=3)
    assert accepts(good) and accepts(good + "\n" + call("get_time", zone="UTC", fields="[1,2]"))
    assert not accepts(call("get_weather", city="Paris", unit="kelvin"))  # not in the enum
    assert not accepts(call("get_weather", unit="celsius"))  # required city missing
    assert not accepts(call("get_weather", city="Paris", unit="celsius", days=15))  # > maximum
    assert not accepts(call("get_time", zone="utc"))  # pattern ^[A-Z]{3}$
    assert not accepts(call("nope", x=1))


# ---- the engine (Python API) ------------------------------------------------------------------


def test_python_api_json_regex_choice_and_every_sampler(llm):
    schema = SMALL
    samplers = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_k=50),
                dict(temperature=1.2, top_p=0.9, seed=2), dict(temperature=1.0, min_p=0.05),
                dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.5)]  # fmt: skip
    params = [SamplingParams(max_tokens=48, structured_outputs=so(json=schema), **s)
              for s in samplers]  # fmt: skip
    params += [
        SamplingParams(max_tokens=24, temperature=1.0, structured_outputs=so(regex=r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(max_tokens=24, temperature=1.0, structured_outputs=so(choice=["yes", "no", "maybe"])),
        SamplingParams(max_tokens=32, temperature=0, structured_outputs=so(json_object=True)),
    ]  # fmt: skip
    outs = llm.generate([f"prompt {i}" for i in range(len(params))], params)
    for out in outs[: len(samplers)]:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", outs[-3].outputs[0].text)
    assert outs[-2].outputs[0].text in ("yes", "no", "maybe")
    assert outs[-1].outputs[0].finish_reason == "length" or isinstance(
        json.loads(outs[-1].outputs[0].text), dict
    )


@pytest.mark.parametrize("k", [1, 3])
def test_structured_outputs_with_drafts(tmp_path, k):
    """Speculative decoding drafts for constrained requests too: each bonus row is masked by
    the grammar after its sequence's accepted drafts (consumed, masked, rolled back), so JSON,
    regex and choice outputs under every sampler equal an engine without drafts (drafts by an
    oracle, 30% wrong: accepted and rejected), and the grammars advance only over emitted
    tokens (the outputs still parse)."""
    save_checkpoint(tmp_path, vocab_size=VOCAB_REAL, hidden_size=32, seed=0, eos_token_id=IM_END,
                    mtp=True)  # fmt: skip
    samplers = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=0.8, top_k=50,
                seed=3), dict(temperature=0, repetition_penalty=1.3, presence_penalty=0.5)]  # fmt: skip
    params = [SamplingParams(max_tokens=40, structured_outputs=so(json=SMALL), **s) for s in samplers]
    params += [
        SamplingParams(max_tokens=24, temperature=1.0, seed=4,
                       structured_outputs=so(regex=r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(max_tokens=24, temperature=0, structured_outputs=so(choice=["yes", "maybe"])),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),  # unconstrained beside
        # complete after 3 letters, then only EOS ids, emitted under ignore_eos: drafts holding
        # them (the grammar skips them, as advance() does; a fuzzed workload found rows after
        # them left unmasked)
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                       structured_outputs=so(regex="[a-z]{1,3}")),
    ]  # fmt: skip
    prompts = [f"prompt {i}" for i in range(len(params))]
    want = make_llm(tmp_path).generate(prompts, params)
    from test_speculative import oracle

    full = {tuple(o.prompt_token_ids): list(o.prompt_token_ids) + o.outputs[0].token_ids
            for o in want}  # fmt: skip
    llm = make_llm(tmp_path, num_speculative_tokens=k)
    spec = llm.engine.runner.spec
    spec.backoff, spec.max_verify_seqs = False, 64
    spec.draft_override = oracle(full, wrong=0.3, seed=k)
    got = llm.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    for out in got[:4]:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), SMALL)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", got[4].outputs[0].text)
    assert got[5].outputs[0].text in ("yes", "maybe")
    assert IM_END in got[7].outputs[0].token_ids and len(got[7].outputs[0].token_ids) == 12
    assert spec.stats.accepted > 10 and spec.stats.accepted < spec.stats.drafts
    assert llm.engine.structured.num_active == 0


DIGITS = "31415926535897932384626433832795"  # one token a digit in this vocabulary: forced


@pytest.mark.parametrize("method", ["mtp", "ngram"])
@pytest.mark.parametrize("k", [1, 3])
def test_drafts_follow_the_grammar(tmp_path, k, method):
    """A constrained request's drafts stay inside its grammar. The MTP head's are the largest
    logits the grammar allows after the tokens before them (the step's, then each chained
    draft); n-gram drafts are cut to the prefix the grammar accepts, and where none is left the
    grammar's forced tokens are drafted (jump-forward). So a draft at a forced token is always
    accepted; tokens equal an engine without drafts. Unmasked, random-weight MTP drafts at 32
    forced digits were almost never right; n-gram ones found none."""
    save_checkpoint(tmp_path, vocab_size=VOCAB_REAL, hidden_size=32, seed=0, eos_token_id=IM_END,
                    mtp=True)  # fmt: skip
    params = [
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=so(regex=DIGITS)),
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=so(json=SMALL)),
        SamplingParams(max_tokens=30, temperature=1.0, seed=2,
                       structured_outputs=so(regex=r"[0-9]{3}-[a-z]{2,4}")),
        SamplingParams(max_tokens=12, temperature=0, structured_outputs=so(choice=["yes", "maybe"])),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),  # unconstrained beside
    ]  # fmt: skip
    prompts = [f"prompt {i}" for i in range(len(params))]
    want = make_llm(tmp_path).generate(prompts, params)
    kw = dict(num_speculative_tokens=k, speculative_method=method)
    llm = make_llm(tmp_path, **kw)
    runner, spec = llm.engine.runner, llm.engine.runner.spec
    spec.backoff, spec.max_verify_seqs = False, 64
    seen = []  # (spec, the output so far, the step's drafts) of each constrained sequence
    build = runner.build_batch

    def spy(scheduled, verify=None, *a, **kw):
        for i, v in (verify or {}).items():
            seq = scheduled[i].seq
            if seq.params.structured_outputs is not None:
                out = seq.token_ids[seq.num_prompt_tokens :]
                seen.append((seq.params.structured_outputs, list(out), list(v.drafts)))
        return build(scheduled, verify, *a, **kw)

    runner.build_batch = spy
    got = llm.generate(prompts, params)
    for g, w in zip(got, want, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
    assert got[0].outputs[0].text == DIGITS
    assert len({len(d) for _, _, d in seen} - {0}) >= (2 if k > 1 else 1) and len(seen) > 10
    eos = set(llm.engine.eos_token_ids)
    for s, out, drafts in seen:  # every draft is one the grammar allows where it stands
        m = llm.engine.structured.compile(s).deep_copy()
        toks = [t for t in out + drafts if t not in eos]
        assert m.try_consume_tokens(toks) == len(toks), (s, out, drafts)
    # the digits alone: every position forced, every draft accepted
    llm2 = make_llm(tmp_path, **kw)
    spec2 = llm2.engine.runner.spec
    spec2.backoff = False
    assert llm2.generate(prompts[:1], params[:1])[0].outputs[0].text == DIGITS
    assert spec2.stats.drafts >= 10 and spec2.stats.accepted == spec2.stats.drafts


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_under_a_grammar_take_the_head_screen(tmp_path, dtype):
    """A CPU engine's rows under a grammar, greedy or sampled with a top-k, read the int8
    screen of lm_head (their 16 or top_k largest logits exact) instead of the full head: where
    enough tokens the grammar allows are among them (or all it allows are candidates) the
    masked row keeps what the full one would, else the row is recomputed with the full head.
    Tokens equal an engine without the screen either way (seeded draws too): a permissive regex
    (mostly decided), digits, a choice of two, JSON, and unconstrained rows beside."""
    from qwen35.kernels import gemv

    if gemv.load() is None:
        pytest.skip("the CPU GEMV kernels are not available (no compiler / AVX2): no head screen")
    save_checkpoint(tmp_path, vocab_size=VOCAB_REAL, hidden_size=32, seed=0, eos_token_id=IM_END)
    on = make_llm(tmp_path, dtype=dtype, max_memory="512MiB")
    off = make_llm(tmp_path, dtype=dtype, max_memory="512MiB", head_screen=False)
    runner = on.engine.runner
    assert runner.head_screen is not None and off.engine.runner.head_screen is None
    seen = []
    outcome = runner._screen_outcome

    def spy(kind, ok):
        if kind == "grammar":
            seen.append(ok)
        outcome(kind, ok)

    runner._screen_outcome = spy
    greedy = dict(max_tokens=24, temperature=0)
    top20 = dict(max_tokens=24, temperature=0.7, top_k=20, top_p=0.95)
    cases = {
        "certified": [
            SamplingParams(**greedy, structured_outputs=so(regex="[a-z ]{10,400}")),
            SamplingParams(**greedy, structured_outputs=so(regex="[^0-9]{10,400}")),
            SamplingParams(**top20, seed=1, structured_outputs=so(regex="[^0-9]{10,400}")),
            SamplingParams(**greedy, ignore_eos=True),  # unconstrained beside
        ],
        "narrow": [SamplingParams(**greedy, structured_outputs=so(regex="[0-9]{20}")),
                       SamplingParams(**top20, seed=2, structured_outputs=so(regex="[0-9]{20}"))],
        "mixed": [
            SamplingParams(**greedy, structured_outputs=so(json=SMALL)),
            SamplingParams(**greedy, structured_outputs=so(choice=["yes", "maybe"])),
            SamplingParams(**greedy, structured_outputs=so(regex="[a-z ]{10,40}")),
            SamplingParams(max_tokens=24, temperature=1.0, seed=5, top_k=20, ignore_eos=True),
            SamplingParams(**top20, seed=3, structured_outputs=so(json=SMALL)),
            SamplingParams(**top20, seed=4, structured_outputs=so(choice=["yes", "maybe"])),
            SamplingParams(**top20, seed=6, structured_outputs=so(regex="[a-z]{5,30}")),
        ],
    }  # fmt: skip
    outcomes = {}
    for name, params in cases.items():
        seen.clear()
        runner._screen_skip["grammar"] = runner._screen_misses["grammar"] = 0
        prompts = [f"{name} {i}" for i in range(len(params))]
        got = [o.outputs[0].token_ids for o in on.generate(prompts, params)]
        want = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
        assert got == want, name
        outcomes[name] = list(seen)
    # the screen decided most steps of the permissive grammars (a sampled row needs its 20
    # largest logits allowed, or all it allows among the candidates), not all of the others'
    ok = outcomes["certified"]
    assert len(ok) > 10 and ok.count(True) >= 3 * len(ok) // 4, ok
    assert False in outcomes["narrow"] + outcomes["mixed"]
    assert on.engine.structured.num_active == 0


def test_apply_counts_the_tokens_each_mask_allows(llm):
    """StructuredOutputManager.apply(..., allowed=): each masked row's count of allowed tokens
    (the runner's screened rows rely on it) equals the finite logits the mask leaves."""
    import types

    mgr = llm.engine.structured
    specs = [so(regex="[0-9]{3}"), so(json=SMALL), so(choice=["yes", "maybe"]), so(regex="[^0-9]+")]
    seqs = [types.SimpleNamespace(seq_id=f"count-{i}") for i in range(len(specs))]
    for s, spec in zip(seqs, specs, strict=True):
        mgr.add(s.seq_id, spec)
    try:
        with torch.inference_mode():  # (as the runner calls it: the mask buffer is the engine's)
            logits = torch.zeros(len(seqs), llm.engine.config.vocab_size)
            counts: dict[int, int] = {}
            assert mgr.apply(logits, seqs, allowed=counts) == {}
        want = torch.isfinite(logits).sum(dim=1).tolist()
        assert counts == dict(enumerate(want)) and want[0] == 10 and want[3] > 100_000
    finally:
        for s in seqs:
            mgr.remove(s.seq_id)


def test_a_screened_row_is_certified_only_by_its_kth_allowed_logit():
    """_grammar_rows on made-up screened rows (candidates: each row's K largest and 8 more
    below them). A row that wants its k largest allowed logits (greedy 1, top_k 3) is decided
    by the screen where its k-th best allowed candidate reaches the K-th largest, or where every
    token the grammar allows is a candidate; otherwise a token outside the candidates may lie
    between (as a screen's bound permits), so the full head's row is used."""
    import types

    from qwen35.engine.model_runner import GRAMMAR_SCREEN_K, ModelRunner, grammar_ks

    V, K = 1000, GRAMMAR_SCREEN_K
    greedy = SamplingParams(temperature=0, structured_outputs=so(regex="a"))
    top3 = SamplingParams(temperature=0.7, top_k=3, structured_outputs=so(regex="a"))
    assert grammar_ks(greedy) == (1, K) and grammar_ks(top3) == (3, K)
    # (params, ranks the grammar allows: < K + 8 are candidates, whether the screen decides)
    cases = [
        (greedy, [K // 3, 500], True),  # its best allowed is among the K largest
        (greedy, [K + 3, K + 13], False),  # below the K-th; the other may lie above it
        (greedy, [K + 3, K + 6], True),  # below the K-th, but every allowed token is a candidate
        (top3, [3, K // 2, K - 3, K + 6, 600], True),  # the 3rd best allowed: above the K-th
        (top3, [3, K // 2, K + 3, K + 13], False),  # the 3rd: below it
    ]
    n = len(cases)
    full = torch.randn(n, V, generator=torch.Generator().manual_seed(0))
    order = full.argsort(dim=1, descending=True)
    screened = torch.full_like(full, float("-inf"))
    for i in range(n):
        screened[i, order[i, : K + 8]] = full[i, order[i, : K + 8]]
    fix = full.clone()  # the full head: rank K + 13 between the K-th and rank K + 3
    for i in (1, 4):
        fix[i, order[i, K + 13]] = full[i, order[i, K + 1]] + 1e-3
    ok = [order[i, ranks] for i, (_, ranks, _) in enumerate(cases)]  # the allowed tokens

    def mask(logits, seqs, drafted, allowed=None):  # (StructuredOutputManager.apply's part)
        for r, s in enumerate(seqs):
            logits[r] += torch.full((V,), float("-inf")).index_fill_(0, ok[s.row], 0)
            if allowed is not None:
                allowed[r] = len(ok[s.row])
        return {}

    outcomes, recomputed = [], []

    def head(x):  # the full head on the rows' inputs (here: their index)
        recomputed.extend(x[:, 0].long().tolist())
        return fix[x[:, 0].long()]

    me = types.SimpleNamespace(logits_processor=mask, head_logits=head,
                               _screen_outcome=lambda kind, ok: outcomes.append((kind, ok)))  # fmt: skip
    seqs = [types.SimpleNamespace(row=i, params=p) for i, (p, _, _) in enumerate(cases)]
    logits = screened.clone()
    dead = ModelRunner._grammar_rows(me, logits, seqs, None, torch.arange(float(n))[:, None])
    assert dead == {} and outcomes == [("grammar", False)]
    assert recomputed == [i for i, (_, _, decided) in enumerate(cases) if not decided]
    for i, (_, _, decided) in enumerate(cases):
        want = fix[i] + torch.full((V,), float("-inf")).index_fill_(0, ok[i], 0)
        if decided:  # the screen's row: the allowed candidates only
            want = torch.where(torch.isfinite(screened[i]), want, float("-inf"))
        assert torch.equal(logits[i], want), i
    # what the sampler keeps from them: the top-k of the full row's allowed tokens
    for i, (p, _, _) in enumerate(cases):
        k = grammar_ks(p)[0]
        m = fix[i] + torch.full((V,), float("-inf")).index_fill_(0, ok[i], 0)
        assert set(logits[i].topk(k).indices.tolist()) == set(m.topk(k).indices.tolist())


def test_unconstrained_greedy_unchanged_by_constrained_neighbours(llm):
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], plain)[0].outputs[0].token_ids
    mixed = llm.generate(
        ["Tell me", "The capital of France is", "JSON please", "pick one"],
        [SamplingParams(max_tokens=12, temperature=0, structured_outputs=so(json=SMALL)), plain,
         SamplingParams(max_tokens=12, temperature=1, structured_outputs=so(json_object=True)),
         SamplingParams(max_tokens=12, temperature=0, structured_outputs=so(choice=["a", "b"]))],
    )  # fmt: skip
    assert mixed[1].outputs[0].token_ids == alone


def test_a_grammar_that_needs_the_eos_token_fails_its_request_clearly(tmp_path):
    """A checkpoint whose EOS id is an ordinary text token (the tiny default: id 1 is '"') and a
    grammar whose next token must be that text: the mask left no token, the row's argmax was
    token 0 ('!'), outside the grammar, and the output went on unconstrained (a random server
    workload found it with a JSON schema). Now the request fails naming the cause, nothing
    outside the grammar is emitted, and the engine serves on."""
    from qwen35.engine.llm_engine import RequestFailedError

    save_checkpoint(tmp_path, vocab_size=VOCAB_REAL, hidden_size=32, seed=0)  # eos id 1: '"'
    llm = make_llm(tmp_path, dtype="fp32", max_memory="512MiB")
    assert llm.engine.tokenizer.decode([1]) == '"' and 1 in llm.engine.eos_token_ids
    # the output must be '"', one token: the EOS id, banned until the grammar accepts
    sp = SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=so(regex='"'))
    with pytest.raises(RequestFailedError) as e:
        llm.generate([[5, 6, 7]], sp)
    out = e.value.outputs[0]
    assert "end-of-sequence ids" in out.error and out.outputs[0].finish_reason == "error"
    assert out.outputs[0].token_ids == []  # nothing outside the grammar was emitted
    free = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(llm.generate([[5, 6, 7]], free)[0].outputs[0].token_ids) == 3


def test_allowed_token_ids_that_leave_the_grammar_no_token_fail_the_request_clearly(llm, caplog):
    """A grammar and allowed_token_ids with nothing in common: the grammar's mask leaves
    tokens, the sampler's allowed ids then none, and the row's argmax (token 0, '!') was drawn,
    outside both; the grammar's matcher then failed and the output went on unconstrained (a
    random workload found it). Now the request fails saying which constraints banned every
    token, emits nothing, and the requests beside it are unaffected."""
    from qwen35.engine.llm_engine import RequestFailedError

    tok = llm.engine.tokenizer
    allowed = [i for i in range(5000) if tok.decode([i]).isdigit()]  # the ten digits
    assert len(allowed) == 10
    plain = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = llm.generate([[7, 8, 9]], plain)[0].outputs[0].token_ids
    sp = SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=allowed,
                        structured_outputs=so(choice=["yes", "no"]))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="qwen35"), pytest.raises(RequestFailedError) as e:
        llm.generate([[5, 6, 7], [7, 8, 9]], [sp, plain])
    failed, other = e.value.outputs
    assert "NoTokenAllowedError" in failed.error and "allowed_token_ids and the structured" \
        in failed.error and failed.outputs[0].finish_reason == "error"  # fmt: skip
    assert failed.outputs[0].token_ids == []  # nothing outside the grammar was emitted
    assert other.error is None and other.outputs[0].token_ids == alone
    # the client's own contradiction: a warning in the server's log, not an error
    said = [r for r in caplog.records if "NoTokenAllowedError" in r.getMessage()]
    assert said and all(r.levelname == "WARNING" for r in said)
    # allowed ids that can spell a choice and end it (the EOS id): it is followed
    digits = SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=[*allowed, IM_END],
                            structured_outputs=so(choice=[tok.decode([allowed[3]])]))  # fmt: skip
    c = llm.generate([[5, 6, 7]], digits)[0].outputs[0]
    assert (c.text, c.finish_reason) == (tok.decode([allowed[3]]), "stop")


def test_a_grammar_that_ends_before_min_tokens_ends_the_output(llm):
    """min_tokens holds EOS back, but a complete grammar allows nothing else: the output ends
    there (finish "stop", valid, shorter than min_tokens) instead of failing with
    NoTokenAllowedError (a wider run of the feature-combination fuzz found the failure); a
    grammar that can go on still waits for min_tokens; allowed ids that leave only a stop id
    still fail (the client's own contradiction, tests/test_sampler.py)."""
    for choices in (["yes", "no"], ["maybe"]):
        sp = SamplingParams(max_tokens=12, temperature=0, min_tokens=8,
                            structured_outputs=so(choice=choices))  # fmt: skip
        out = llm.generate([[5, 6, 7]], sp)[0]
        c = out.outputs[0]
        assert out.error is None and c.finish_reason == "stop" and c.text in choices
        assert len(c.token_ids) < 8 and c.stop_reason is None  # an end-of-sequence id ended it
    # a regex that can keep going: min_tokens is honoured, the text still matches
    sp = SamplingParams(max_tokens=12, temperature=0, min_tokens=5,
                        structured_outputs=so(regex="[a-z]{1,40}"))  # fmt: skip
    c = llm.generate([[5, 6, 7]], sp)[0].outputs[0]
    assert re.fullmatch("[a-z]{1,40}", c.text) and len(c.token_ids) >= 5


def test_n_stop_and_max_tokens(llm):
    out = llm.generate(["n"], SamplingParams(n=3, max_tokens=48, temperature=1.0, seed=3,
                                             structured_outputs=so(json=SMALL)))[0]  # fmt: skip
    assert len(out.outputs) == 3
    for o in out.outputs:
        jsonschema.validate(json.loads(o.text), SMALL)
    cut = llm.generate(["x"], SamplingParams(max_tokens=3, temperature=0,
                                             structured_outputs=so(json=WEATHER)))[0]  # fmt: skip
    assert cut.outputs[0].finish_reason == "length" and len(cut.outputs[0].token_ids) == 3
    stop = llm.generate(["x"], SamplingParams(max_tokens=48, temperature=0, stop=['"days"'],
                                              structured_outputs=so(json=SMALL)))[0]  # fmt: skip
    assert stop.outputs[0].finish_reason == "stop" and stop.outputs[0].stop_reason == '"days"'
    assert stop.outputs[0].text.startswith('{"unit":"')


def test_preemption_keeps_the_matcher_exact(ckpt):
    # KV for about two sequences at a time: the scheduler must preempt and recompute; the
    # recomputed tokens are not sampled again, so the matchers stay where they were
    llm = make_llm(ckpt, block_size=4, max_model_len=96, num_kv_blocks=24,
                   enable_prefix_caching=False)  # fmt: skip
    schema = schemas(4, seed=7)[0]
    params = [SamplingParams(max_tokens=80, temperature=0,
                             structured_outputs=so(json=WEATHER if i % 2 else schema))
              for i in range(6)]  # fmt: skip
    outs = llm.generate([f"a somewhat longer prompt number {i} for the test" for i in range(6)],
                        params)  # fmt: skip
    assert llm.engine.scheduler.num_preemptions > 0
    for i, out in enumerate(outs):
        jsonschema.validate(json.loads(out.outputs[0].text), WEATHER if i % 2 else schema)
    assert llm.engine.structured.num_active == 0  # finished sequences dropped their matchers


def test_thinking_on_reasoning_free_answer_constrained(llm):
    think_end = llm.tokenizer.think_end_id
    inner = llm.engine.runner.model

    def closes_thinking_after_6_tokens(input_ids, batch, caches):
        # a random model never writes </think>; this one does at its 7th generated token
        logits = inner(input_ids, batch, caches)
        pos = batch.positions[batch.logits_indices]
        logits[:, think_end] = torch.where(pos >= prompt_len + 5, 1e4, -1e4)
        return logits

    prompt = llm.engine.chat_template.render(
        [{"role": "user", "content": "Weather?"}], add_generation_prompt=True, enable_thinking=True
    )
    prompt_len = len(llm.tokenizer.encode(prompt))
    runner = llm.engine.runner
    screen = runner.head_screen  # (off: its rows would not come from the patched logits)
    runner.model, runner.head_screen = closes_thinking_after_6_tokens, None
    try:
        out = llm.generate(prompt, SamplingParams(
            max_tokens=120, temperature=0,
            structured_outputs=so(json=WEATHER, after_think=True)))[0].outputs[0]  # fmt: skip
    finally:
        runner.model, runner.head_screen = inner, screen
    reasoning, content = ReasoningParser.split(out.text, thinking_enabled=True)
    assert out.token_ids[6] == think_end and reasoning and not reasoning.startswith("{")
    jsonschema.validate(json.loads(content), WEATHER)


# ---- the server (openai client) ---------------------------------------------------------------


def test_fifty_json_schemas_through_the_openai_client(server):
    _, client, _ = server
    cases = list(enumerate(schemas(50)))

    def run(case):
        i, schema = case
        kw = dict(model="tiny", max_tokens=160, temperature=0,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                  messages=[{"role": "user", "content": f"Give me JSON number {i}"}],
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": f"s{i}", "schema": schema}})  # fmt: skip
        if i % 2:
            acc, _ = stream_chat(client, **{k: v for k, v in kw.items() if k != "model"})
            return schema, acc[0]["content"], acc[0]["finish"]
        r = client.chat.completions.create(**kw)
        return schema, r.choices[0].message.content, r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        results = list(pool.map(run, cases))
    for schema, text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_json_on_completions(server):
    _, client, _ = server
    pattern = r"(\+|-)?[0-9]{2,4}\.[0-9]"
    for stream in (False, True):
        for body, check in [
            ({"guided_regex": pattern}, lambda t: re.fullmatch(pattern, t)),
            ({"structured_outputs": {"choice": ["alpha", "beta"]}}, lambda t: t in ("alpha", "beta")),
            ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
            ({"guided_json": WEATHER}, lambda t: jsonschema.validate(json.loads(t), WEATHER) is None),
        ]:  # fmt: skip
            kw = dict(model="tiny", prompt="Answer:", max_tokens=60, temperature=1.0,
                      extra_body=body, stream=stream)  # fmt: skip
            r = client.completions.create(**kw)
            text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
            assert check(text), (body, text)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(server, stream):
    _, client, _ = server
    choices = ["required", {"type": "function", "function": {"name": "get_time"}}]
    for choice, seed in itertools.product(choices, range(3)):
        kw = dict(messages=[{"role": "user", "content": f"Call a tool {seed}"}], tools=TOOLS,
                  tool_choice=choice, max_tokens=200, temperature=1.0, seed=seed,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
        if stream:
            acc, _ = stream_chat(client, **kw)
            calls = [(c["name"], c["arguments"]) for c in acc[0]["calls"].values()]
            finish = acc[0]["finish"]
        else:
            r = client.chat.completions.create(model="tiny", **kw)
            calls = [
                (c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls
            ]
            finish = r.choices[0].finish_reason
        assert calls and finish == "tool_calls", (choice, calls, finish)
        for name, args in calls:
            assert choice == "required" or name == "get_time"
            jsonschema.validate(json.loads(args), SCHEMAS[name])


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "string", "format": "no-such-format"}}}}, "response_format", "format"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, "guided_json", "uniqueItems"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex"),
    ({"structured_outputs": {"grammar": "start: nope_rule"}}, "structured_outputs", "grammar"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs", "xml"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
    ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
]  # fmt: skip


def test_bad_constraints_are_400_and_the_server_keeps_serving(server):
    srv, client, engine = server
    for body, param, needle in BAD:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            **body})  # fmt: skip
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"], (body, err)
    compiler = engine.structured.compiler
    release = threading.Event()
    real_compile = compiler._compile

    def slow_compile(spec, tok):  # a compile that outlasts the timeout, deterministically
        release.wait(30)
        return real_compile(spec, tok)

    compiler._compile, old = slow_compile, compiler.timeout_s
    compiler.timeout_s = 0.2
    try:
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "hi", "guided_regex": "[a-z]{1,3}x[0-9]+"})  # fmt: skip
        assert r.status_code == 400 and "longer than" in r.json()["error"]["message"]
    finally:
        release.set()
        del compiler._compile
        compiler.timeout_s = old
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
        extra_body={"guided_choice": ["ok", "fine"]},
    )  # fmt: skip
    assert r.choices[0].message.content in ("ok", "fine")
