"""vLLM's allowed_token_ids, bad_words and truncate_prompt_tokens: the sampler against its plain
reference (sampler.reference_sample), the engine (bad words never appear, whatever a greedy run
would have written), and the server's fields."""

from __future__ import annotations

import pytest
import torch

from qwen35.engine.sampler import Sampler, SamplingRow, banned_by_bad_words, reference_sample
from qwen35.request import SamplingParams, SamplingParamsError
from test_engine import make
from tiny import save_checkpoint


def test_allowed_tokens_and_bad_words_match_the_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, allowed_token_ids=[3, 7, 11])),
        SamplingRow(SamplingParams(temperature=0.0, bad_words_token_ids=[[5, 9], [int(logits[1].argmax())]]),
                    output_token_ids=[1, 5]),
        SamplingRow(SamplingParams(temperature=0.0, bad_words_token_ids=[[5, int(logits[2].argmax())]]),
                    output_token_ids=[1, 6]),  # the prefix does not match: not banned
        SamplingRow(SamplingParams(temperature=0.8, seed=3, allowed_token_ids=[1, 2]),
                    generator=torch.Generator().manual_seed(3)),
    ]  # fmt: skip
    out = Sampler()(logits, rows).token_ids
    assert out[0] == max((3, 7, 11), key=lambda t: logits[0, t])
    assert out[1] not in (9, int(logits[1].argmax()))
    assert out[2] == int(logits[2].argmax())
    assert out[3] in (1, 2)
    for i, r in enumerate(rows[:3]):
        assert reference_sample(logits[i], r)[0] == out[i]
    assert banned_by_bad_words(rows[1]) == {9, int(logits[1].argmax())}


def test_allowed_ids_tensor_is_built_once_and_follows_a_new_list():
    from qwen35.engine.sampler import apply_allowed_and_bad_words

    x = torch.randn(2, 50)
    p = SamplingParams(allowed_token_ids=[3, 7])
    first = apply_allowed_and_bad_words(x, [SamplingRow(p), SamplingRow(SamplingParams())])
    cached = p.__dict__["_allowed_ids_tensor"][1]
    again = apply_allowed_and_bad_words(x, [SamplingRow(p), SamplingRow(SamplingParams())])
    assert torch.equal(first, again) and p.__dict__["_allowed_ids_tensor"][1] is cached
    assert torch.isfinite(first[0]).nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(first[1], x[1])
    p.allowed_token_ids = [9]  # a new list on the same params: its own mask
    third = apply_allowed_and_bad_words(x, [SamplingRow(p)])
    assert torch.isfinite(third[0]).nonzero().flatten().tolist() == [9]


@pytest.mark.parametrize(
    "kw,field",
    [({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
     ({"bad_words": [""]}, "bad_words"), ({"bad_words": "x"}, "bad_words"),
     ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")],
)  # fmt: skip
def test_refusals(kw, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw).validate()
    assert e.value.param == field


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("extras") / "m"
    save_checkpoint(d)
    return make(d)


def test_engine(llm):
    prompt = [5, 17, 99, 3, 42, 7, 200, 11]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    free = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    # ban the pair the free run wrote at positions 3, 4 (a word of two tokens), and its token 0
    word = [free[3], free[4]]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                       bad_words_token_ids=[word, [free[0]]])  # fmt: skip
    got = llm.generate([prompt], p)[0].outputs[0].token_ids
    assert got[0] != free[0] and free[0] not in got
    assert all(got[i : i + 2] != word for i in range(len(got) - 1))
    allowed = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                             allowed_token_ids=[7, 8, 9])  # fmt: skip
    assert set(llm.generate([prompt], allowed)[0].outputs[0].token_ids) <= {7, 8, 9}
    # the prompt's last 4 tokens only: the same tokens as that prompt
    cut = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, truncate_prompt_tokens=4)
    a = llm.generate([prompt], cut)[0]
    b = llm.generate([prompt[-4:]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert a.prompt_token_ids == prompt[-4:] and a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(SamplingParamsError, match="outside the vocabulary"):
        llm.generate([prompt], SamplingParams(allowed_token_ids=[10**6]))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from server_fakes import serving_tiny_engine

    yield from serving_tiny_engine(tmp_path_factory.mktemp("extras-real"), dtype="fp32")


def test_server_fields(real):
    import httpx

    srv, _, engine = real
    tok = engine.tokenizer
    post = lambda body: httpx.post(srv.url + "/v1/completions", timeout=60,  # noqa: E731
                                   json={"model": "tiny", "temperature": 0, **body})
    prompt = "The capital of France is Paris, and the capital of Spain is"
    n = len(tok.encode(prompt))
    r = post({"prompt": prompt, "max_tokens": 3, "truncate_prompt_tokens": 4, "echo": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 4 < n
    assert r.json()["choices"][0]["text"].startswith(tok.decode(tok.encode(prompt)[-4:]))
    a = tok.encode(" Madrid")[0]
    r = post({"prompt": prompt, "max_tokens": 3, "allowed_token_ids": [a], "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == tok.decode([a] * 3)
    # bad words: the free run's first token, as a word, is never written
    free = post({"prompt": prompt, "max_tokens": 6, "ignore_eos": True}).json()
    word = (free["choices"][0]["text"].split() or ["x"])[0]
    ids = engine._bad_words_ids([word])
    assert ids and all(isinstance(t, int) for w in ids for t in w)
    r = post({"prompt": prompt, "max_tokens": 6, "ignore_eos": True, "bad_words": [word]})
    assert r.status_code == 200, r.text
    got = tok.encode(r.json()["choices"][0]["text"])
    assert not any(w == [t] for w in ids for t in got if len(w) == 1)
    r = post({"prompt": prompt, "allowed_token_ids": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids"
