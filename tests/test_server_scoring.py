"""Scoring prompts over HTTP, as lm-evaluation-harness's `local-completions` does it: echo +
logprobs (max_tokens 1, or 0: the prompt alone), vLLM's `prompt_logprobs`, and the tokenizer
endpoints its "remote" tokenizer reads (/tokenize, /detokenize, /tokenizer_info). The REAL
engine on a tiny random checkpoint with the real Qwen 3.5 vocabulary; the reference is the
log_softmax of the same model's logits over the whole prompt."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from server_fakes import USER, serving_tiny_engine


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    yield from serving_tiny_engine(tmp_path_factory.mktemp("scoring"), dtype="fp32")


def reference(engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def lm_eval_parse(choice: dict, ctxlen: int) -> tuple[float, bool]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs for one choice."""
    lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops, strict=True))


def test_lm_eval_loglikelihood_requests(real):
    srv, _, engine = real
    tok = engine.tokenizer
    ctx = tok.encode("The capital of France is")
    prompts = [ctx + c for c in (tok.encode(" Paris"), tok.encode(" a city in Europe"), [5, 9])]
    # lm-eval's payload for loglikelihood requests (token ids, batched)
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 3
    for p, choice in zip(prompts, choices, strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(p) + 1  # the prompt and the one generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["tokens"][: len(p)] == [srv.state.token_text(t)[0] for t in p]
        assert choice["text"].startswith(tok.decode(p))
        ref = reference(engine, p)
        want = sum(ref[k - 1, p[k]].item() for k in range(len(ctx), len(p)))
        greedy = all(ref[k - 1].argmax().item() == p[k] for k in range(len(ctx), len(p)))
        # (row k of the response is prompt token k, and the generated token comes last)
        got, is_greedy = lm_eval_parse(choice, len(ctx))
        assert abs(got - want) < 1e-3 and is_greedy == greedy
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and offsets == sorted(offsets)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, prompts)) and usage["completion_tokens"] == 3


def test_prompt_only_and_streaming_echo(real):
    srv, _, engine = real
    p = engine.tokenizer.encode("Scoring a sentence, token by token.")
    r = post(srv, "/v1/completions",
             {"prompt": p, "max_tokens": 0, "echo": True, "logprobs": 2})  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == engine.tokenizer.decode(p) and choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    ref = reference(engine, p)
    assert len(lp["token_logprobs"]) == len(p)
    for k in range(1, len(p)):
        assert abs(lp["token_logprobs"][k] - ref[k - 1, p[k]].item()) < 1e-4
        assert len(lp["top_logprobs"][k]) <= 2  # (two ids may share a text)
        assert max(lp["top_logprobs"][k].values()) == pytest.approx(ref[k - 1].max().item(),
                                                                    abs=1e-4)  # fmt: skip
    whole = post(srv, "/v1/completions", {"prompt": p, "max_tokens": 3, "echo": True,
                                          "logprobs": 1, "temperature": 0}).json()  # fmt: skip
    text, lps = "", {"tokens": [], "token_logprobs": [], "text_offset": []}
    with httpx.stream("POST", srv.url + "/v1/completions",
                      json={"prompt": p, "max_tokens": 3, "echo": True, "logprobs": 1,
                            "temperature": 0, "stream": True}) as s:  # fmt: skip
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text += c["text"]
                    for k in lps:
                        lps[k] += c["logprobs"][k]
    w = whole["choices"][0]
    assert text == w["text"]
    assert lps == {k: w["logprobs"][k] for k in lps}
    # vLLM's return_tokens_as_token_ids: the echoed prompt's and the output's tokens by id
    ids = post(srv, "/v1/completions", {"prompt": p, "max_tokens": 3, "echo": True, "logprobs": 1,
                                        "temperature": 0, "return_tokens_as_token_ids": True,
                                        "return_token_ids": True}).json()["choices"][0]  # fmt: skip
    assert ids["prompt_token_ids"] == p and len(ids["token_ids"]) == 3
    assert ids["logprobs"]["tokens"] == [f"token_id:{t}" for t in p + ids["token_ids"]]
    assert ids["logprobs"]["text_offset"] == w["logprobs"]["text_offset"]


def test_prompt_logprobs_field(real):
    srv, _, engine = real
    p = engine.tokenizer.encode("Hello there, general Kenobi")
    r = post(srv, "/v1/completions", {"prompt": p, "max_tokens": 2, "prompt_logprobs": 2})
    plp = r.json()["choices"][0]["prompt_logprobs"]
    ref = reference(engine, p)
    assert len(plp) == len(p) and plp[0] is None
    for k in range(1, len(p)):
        row = plp[k]
        first = next(iter(row))
        assert first == str(p[k])  # the prompt's own token first, then the top 2
        assert abs(row[first]["logprob"] - ref[k - 1, p[k]].item()) < 1e-4
        assert row[first]["rank"] == int((ref[k - 1] > ref[k - 1, p[k]]).sum()) + 1
        top = ref[k - 1].topk(2).indices.tolist()
        assert {str(t) for t in top} <= set(row) and len(row) <= 3
        assert row[str(top[0])]["rank"] == 1
        assert row[first]["decoded_token"] == srv.state.token_text(p[k])[0]
    assert "prompt_logprobs" in r.json()["choices"][0]
    plain = post(srv, "/v1/completions", {"prompt": p, "max_tokens": 2}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    chat = post(srv, "/v1/chat/completions",
                {"messages": USER, "max_tokens": 2, "prompt_logprobs": 0}).json()  # fmt: skip
    assert chat["prompt_logprobs"][0] is None
    n = chat["usage"]["prompt_tokens"]
    assert len(chat["prompt_logprobs"]) == n and all(len(x) == 1 for x in chat["prompt_logprobs"][1:])
    got = []
    with httpx.stream("POST", srv.url + "/v1/chat/completions",
                      json={"messages": USER, "max_tokens": 2, "prompt_logprobs": 0,
                            "stream": True}) as s:  # fmt: skip
        for line in s.iter_lines():
            if line.startswith("data: {") and "prompt_logprobs" in json.loads(line[6:]):
                got.append(json.loads(line[6:])["prompt_logprobs"])
    assert got == [chat["prompt_logprobs"]]  # once, in the first output's chunk


def test_scoring_errors(real):
    srv, client, _ = real
    r = post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(srv, "/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = post(srv, "/v1/completions", {"prompt": "x", "prompt_logprobs": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_tokenizer_endpoints(real):
    srv, _, engine = real
    tok = engine.tokenizer
    text = "Hello, world! Ünïcödé"
    r = post(srv, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == engine.max_model_len and r["token_strs"] is None
    strs = post(srv, "/tokenize", {"prompt": text, "return_token_strs": True}).json()["token_strs"]
    assert len(strs) == r["count"]
    assert post(srv, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": text}
    chat = post(srv, "/tokenize", {"messages": USER}).json()
    want = engine.chat_template.render(USER, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(want)
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["eos_token"] and tok.encode(info["eos_token"])[0] in tok.eos_token_ids
    assert info["model_max_length"] == engine.max_model_len
    # lm-eval's check_remote_tokenizer_support: eos_token in the info, a token list back
    assert isinstance(post(srv, "/tokenize", {"prompt": "test"}).json()["tokens"], list)
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": USER}, "prompt"),
        ("/detokenize", {"tokens": [engine.config.vocab_size]}, "tokens"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
    ]:
        r = post(srv, path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
    assert post(srv, "/detokenize", {"tokens": "x"}).status_code == 400
