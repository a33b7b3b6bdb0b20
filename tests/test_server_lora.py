"""LoRA adapters over HTTP (server/serving_lora.py), as vLLM serves them: adapters are models
of their own in /v1/models, a request's `model` picks one, and with --enable-lora they are
loaded and unloaded at run time. The REAL engine on a tiny checkpoint with the real vocabulary;
the reference for an adapter's output is a second engine, not served, running the same adapter
(whose logits tests/test_lora_serving.py checks against peft)."""

from __future__ import annotations

import httpx
import pytest

from qwen35.request import SamplingParams
from server_fakes import ServerThread
from tiny import VOCAB_REAL, save_checkpoint, save_lora_adapter

pytest.importorskip("peft", reason="peft (the [test] extra) makes the adapters")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.server.app import ServerConfig, create_app

    d = tmp_path_factory.mktemp("lora")
    hf = save_checkpoint(d / "base", vocab_size=VOCAB_REAL, hidden_size=32, seed=0)
    save_lora_adapter(hf, d / "sql", seed=1)
    kw = dict(max_model_len=256, max_num_seqs=8, max_memory="256MiB", verbose=False,
              dtype="fp32", text_only=True)  # fmt: skip
    engine = LLMEngine(str(d / "base"), lora_modules={"sql": str(d / "sql")}, enable_lora=True,
                       **kw)  # fmt: skip
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    ref = LLMEngine(str(d / "base"), lora_modules={"sql": str(d / "sql")}, **kw)
    yield srv, ref, d
    srv.close()


def post(srv, path: str, body: dict) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60)


def reference(ref, prompt: list[int], lora: str | None, n: int = 8) -> list[int]:
    ref.add_request("x", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                    lora=lora)  # fmt: skip
    ids: list[int] = []
    while ref.has_unfinished_requests():
        for out in ref.step():
            ids += out.outputs[0].token_ids
    return ids


def completion_text(srv, model: str, prompt: list[int], n: int = 8) -> str:
    r = post(srv, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n,
                                      "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_models_and_requests_by_adapter(served):
    srv, ref, _ = served
    cards = {c["id"]: c for c in httpx.get(srv.url + "/v1/models").json()["data"]}
    assert set(cards) == {"tiny", "sql"} and cards["sql"]["parent"] == "tiny"
    assert cards["sql"]["root"] == "sql"  # never the server's filesystem path
    prompt = [9, 100, 2000, 30000, 7, 5]
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    texts = {}
    for model in ("sql", "tiny"):
        r = post(srv, "/v1/completions", {**body, "model": model})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        texts[model] = r.json()["choices"][0]["text"]
    tok = ref.tokenizer
    assert texts["sql"] == tok.decode(reference(ref, prompt, "sql"))
    assert texts["tiny"] == tok.decode(reference(ref, prompt, None))
    assert texts["sql"] != texts["tiny"]
    # chat and the Responses API take the adapter's name too
    chat = post(srv, "/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 4, "temperature": 0})  # fmt: skip
    assert chat.status_code == 200 and chat.json()["model"] == "sql", chat.text
    resp = post(srv, "/v1/responses", {"model": "sql", "input": "hi", "max_output_tokens": 4})
    assert resp.status_code == 200 and resp.json()["model"] == "sql", resp.text
    r = post(srv, "/v1/completions", {**body, "model": "nope"})
    assert r.status_code == 404 and "sql" in r.json()["error"]["message"]
    metrics = httpx.get(srv.url + "/metrics").text
    assert "qwen35_lora_adapters_loaded 1.0" in metrics
    assert 'qwen35_lora_requests{adapter="sql"} 0.0' in metrics


def test_load_and_unload_at_run_time(served, tmp_path):
    srv, ref, d = served
    load = {"lora_name": "sql2", "lora_path": str(d / "sql")}
    r = post(srv, "/v1/load_lora_adapter", load)
    assert r.status_code == 200 and "sql2" in r.text
    assert "sql2" in {c["id"] for c in httpx.get(srv.url + "/v1/models").json()["data"]}
    prompt = [11, 12, 13, 14]
    assert completion_text(srv, "sql2", prompt) == ref.tokenizer.decode(reference(ref, prompt, "sql"))
    for body, status, words in (
        (load, 400, "already served"),
        ({"lora_name": "x", "lora_path": str(tmp_path)}, 400, "adapter_config.json"),
        ({"lora_name": "tiny", "lora_path": str(d / "sql")}, 400, "already served"),
        ({"lora_name": "x"}, 400, "lora_path"),
        # paths the OS refuses (found by the server fuzz: a 500 before)
        ({"lora_name": "x", "lora_path": "x" * 5000}, 400, "File name too long"),
        ({"lora_name": "x", "lora_path": "/" + "y" * 300}, 400, "File name too long"),
    ):
        r = post(srv, "/v1/load_lora_adapter", body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    r = post(srv, "/v1/unload_lora_adapter", {"lora_name": "sql2"})
    assert r.status_code == 200, r.text
    assert post(srv, "/v1/completions", {"model": "sql2", "prompt": "a"}).status_code == 404
    r = post(srv, "/v1/unload_lora_adapter", {"lora_name": "sql2"})
    assert r.status_code == 404
    # the other adapter is still there
    assert completion_text(srv, "sql", prompt) == ref.tokenizer.decode(reference(ref, prompt, "sql"))


def test_run_time_loading_needs_enable_lora(served):
    from qwen35.server.app import ServerConfig, create_app

    _, ref, d = served  # ref: lora_modules without enable_lora
    srv = ServerThread(create_app(ref, ServerConfig(served_model_name="tiny")))
    try:
        r = post(srv, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": str(d / "sql")})
        assert r.status_code == 404 and "--enable-lora" in r.json()["error"]["message"]
        assert completion_text(srv, "sql", [1, 2, 3], 2)  # the static ones are served
    finally:
        srv.close()


def test_generate_with_lora(served, capsys):
    """`qwen35 generate --lora DIR` (and NAME of --lora-modules) runs with the adapter."""
    from qwen35.cli import main

    _, ref, d = served
    common = ["generate", "--model", str(d / "base"), "--prompt", "Hello there", "--max-tokens",
              "6", "--temperature", "0", "--dtype", "fp32", "--max-model-len", "256",
              "--max-memory", "256MiB", "--text-only"]  # fmt: skip
    want = ref.tokenizer.decode(reference(ref, ref.tokenizer.encode("Hello there"), "sql", 6))
    for extra in (["--lora", str(d / "sql")], ["--lora-modules", f"x={d / 'sql'}", "--lora", "x"]):
        assert main(common + extra) == 0
        assert capsys.readouterr().out == want + "\n"
    assert main(common) == 0
    assert capsys.readouterr().out != want + "\n"  # (the base model's)
