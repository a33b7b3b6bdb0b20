"""`qwen35 run-batch` (server/batch.py): OpenAI Batch API files run through the server's app in
process. The reference for each result is the same request sent over HTTP to `qwen35 serve`'s
app on a second engine of the same checkpoint (greedy, so the answers must be equal)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import httpx
import pytest

from server_fakes import ServerThread
from tiny import VOCAB_REAL, save_checkpoint

KW = dict(max_model_len=256, max_num_seqs=4, max_memory="256MiB", verbose=False, dtype="fp32",
          text_only=True)  # fmt: skip
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.server.app import ServerConfig, create_app

    d = tmp_path_factory.mktemp("batch") / "tiny"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, seed=0)
    config = ServerConfig(served_model_name="tiny", model_path=str(d))
    engine = LLMEngine(str(d), **KW)
    ref = ServerThread(create_app(LLMEngine(str(d), **KW), config))
    # an app's lifespan runs once: a fresh app over the same engine for each batch
    yield d, lambda: create_app(engine, config), ref
    ref.close()


def run(make_app, lines: list[str], window: int = 8) -> list[dict]:
    from qwen35.server.batch import run_batch

    app = make_app()
    results: list[dict] = []

    async def go():
        async with app.router.lifespan_context(app):
            counts = await run_batch(app, lines, window, lambda r, _c: results.append(r))
        assert counts.total == len([x for x in lines if x.strip()])
        assert counts.completed + counts.failed == counts.total
        return counts

    asyncio.run(go())
    return results


def line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


REQUESTS = [
    ("c1", "/v1/completions", {"model": "tiny", "prompt": "Hello there", **GREEDY}),
    ("c2", "/v1/completions", {"prompt": [11, 22, 33, 44], "n": 2, "logprobs": 2, **GREEDY}),
    ("chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "Hi!"}], **GREEDY, "max_tokens": 5}),
    ("resp", "/v1/responses", {"input": "Say hi", "temperature": 0, "max_output_tokens": 4}),
    ("c3", "/v1/completions", {"prompt": "A much longer prompt " * 6, "echo": True, **GREEDY}),
]  # fmt: skip


def same_answer(a: dict, b: dict) -> None:
    """Equal but for ids and timestamps."""
    volatile = {"id", "created", "created_at", "system_fingerprint"}
    strip = lambda x: {k: v for k, v in x.items() if k not in volatile}  # noqa: E731
    if "output" in a:  # responses: its items carry ids too
        a = {**a, "output": [strip(o) for o in a["output"]]}
        b = {**b, "output": [strip(o) for o in b["output"]]}
    assert strip(a) == strip(b)


@pytest.mark.parametrize("window", [1, 8])
def test_results_equal_the_servers_answers_in_input_order(setup, window):
    _, app, ref = setup
    results = run(app, [line(*r) for r in REQUESTS], window=window)
    assert [r["custom_id"] for r in results] == [r[0] for r in REQUESTS]
    assert len({r["id"] for r in results}) == len(results)
    for (_, url, body), result in zip(REQUESTS, results, strict=True):
        assert result["error"] is None, result
        resp = result["response"]
        assert resp["status_code"] == 200 and resp["request_id"].startswith("req-")
        want = httpx.post(ref.url + url, json=body, timeout=60)
        assert want.status_code == 200, want.text
        same_answer(resp["body"], want.json())


def test_bad_lines_get_errors_and_the_rest_still_runs(setup):
    _, app, ref = setup
    good = ("ok", "/v1/completions", {"prompt": "Hello there", **GREEDY})
    lines = [
        "{not json",
        "[1, 2]",
        json.dumps({"url": "/v1/completions", "body": {}}),  # no custom_id
        line(*good),
        line("ok", "/v1/completions", {"prompt": "again"}),  # repeated custom_id
        line("embed", "/v1/embeddings", {"input": "x"}),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}),
        line("stream", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "x"}], "stream": True}),
        "",  # blank lines are skipped, not answered
        line("neg", "/v1/completions", {"prompt": "x", "max_tokens": -1}),
        line("other", "/v1/completions", {"model": "gpt-4", "prompt": "x"}),
        line("empty", "/v1/chat/completions", {"messages": []}),
    ]  # fmt: skip
    results = run(app, lines)
    assert len(results) == len(lines) - 1
    by_line = dict(zip([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13], results, strict=True))
    for n in (1, 2, 3):  # no usable custom_id
        r = by_line[n]
        assert r["custom_id"] is None and r["response"] is None
        assert r["error"]["message"].startswith(f"line {n}:"), r
    assert "not JSON" in by_line[1]["error"]["message"]
    ok = by_line[4]
    assert ok["custom_id"] == "ok" and ok["response"]["status_code"] == 200 and ok["error"] is None
    want = httpx.post(ref.url + good[1], json=good[2], timeout=60).json()
    same_answer(ok["response"]["body"], want)
    assert by_line[5]["error"]["code"] == "duplicate_custom_id"
    for n, word in ((6, "/v1/embeddings"), (7, "GET"), (8, "body"), (9, "stream")):
        r = by_line[n]
        assert r["response"] is None and word in r["error"]["message"], r
        assert r["custom_id"] is not None
    # refused by the server: its status and OpenAI error body, and the error's code and message
    for n, status in ((11, 400), (12, 404), (13, 400)):
        r = by_line[n]
        assert r["response"]["status_code"] == status, r
        assert r["response"]["body"]["error"]["message"] == r["error"]["message"]
    assert by_line[12]["error"]["code"] == "model_not_found"
    assert "max_tokens" in by_line[11]["error"]["message"]


def qwen35(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen35.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_command_writes_the_output_file_whole(setup, tmp_path):
    d, _, ref = setup
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(line(*r) for r in REQUESTS[:2]) + "\n")
    flags = ["--model", str(d), "--max-memory", "256MiB", "--dtype", "fp32", "--text-only",
             "--served-model-name", "tiny"]  # fmt: skip
    r = qwen35("run-batch", "-i", str(src), "-o", str(dst), *flags)
    assert r.returncode == 0, r.stderr
    assert "2 done (2 completed, 0 failed)" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~umask
    results = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [x["custom_id"] for x in results] == ["c1", "c2"]
    want = httpx.post(ref.url + REQUESTS[1][1], json=REQUESTS[1][2], timeout=60).json()
    same_answer(results[1]["response"]["body"], want)
    # standard input and output
    r = qwen35("run-batch", "-i", "-", "-o", "-", *flags, stdin=line(*REQUESTS[0]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["response"]["body"]["choices"] == results[0]["response"]["body"][
        "choices"
    ]


def test_command_refuses_bad_paths_before_loading(tmp_path):
    r = qwen35("run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"),
               "--model", str(tmp_path / "no-model"))  # fmt: skip
    assert r.returncode == 2 and "missing.jsonl: no such file" in r.stderr
    r = qwen35("run-batch", "-i", str(tmp_path), "-o", str(tmp_path / "o"),
               "--model", str(tmp_path / "no-model"))  # fmt: skip
    assert r.returncode == 2 and f"{tmp_path}: a folder, not a file" in r.stderr
    (tmp_path / "in.jsonl").write_text("")
    r = qwen35("run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "x" / "o"),
               "--model", str(tmp_path / "no-model"))  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = qwen35("run-batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "in.jsonl"),
               "--model", str(tmp_path / "no-model"))  # fmt: skip
    assert r.returncode == 2 and "must not be the input file" in r.stderr


def test_the_engine_is_built_and_stepped_on_one_thread(setup, tmp_path, monkeypatch):
    """`run-batch` and `serve` (commands/common.py engine_on_its_thread) build the engine on the
    thread that steps it, not on the main thread (engine/engine_thread.py: OpenMP teams)."""
    import threading

    from qwen35.cli import main
    from qwen35.engine import llm_engine

    seen: dict[str, set[int]] = {"built": set(), "stepped": set()}

    class Recording(llm_engine.LLMEngine):
        def __init__(self, *a, **kw):
            seen["built"].add(threading.get_ident())
            super().__init__(*a, **kw)

        def step(self):
            seen["stepped"].add(threading.get_ident())
            return super().step()

    monkeypatch.setattr(llm_engine, "LLMEngine", Recording)
    d, _, _ = setup
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(line(*REQUESTS[0]) + "\n")
    assert main(["run-batch", "-i", str(src), "-o", str(dst), "--model", str(d), "--max-memory",
                 "256MiB", "--dtype", "fp32", "--text-only", "--served-model-name", "tiny"]) == 0  # fmt: skip
    assert json.loads(dst.read_text())["response"]["status_code"] == 200
    assert seen["stepped"] == seen["built"] and len(seen["built"]) == 1
    assert threading.get_ident() not in seen["built"]


def test_reading_pauses_while_a_slow_first_request_holds_results_back():
    """In-order output keeps later results until the first is written: reading stops once
    PENDING_WINDOWS x window of them wait, and resumes when the slow one ends."""
    from qwen35.server import batch

    release = asyncio.Event()
    consumed: list[int] = []

    async def app(scope, receive, send):  # a server whose first request waits for `release`
        body = json.loads((await receive())["body"])
        if body["prompt"] == "slow":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"p": body["prompt"]}).encode()})

    def lines():
        for i in range(100):
            consumed.append(i)
            yield line(f"r{i}", "/v1/completions", {"prompt": "slow" if i == 0 else str(i)})

    async def go():
        results: list[dict] = []
        task = asyncio.ensure_future(batch.run_batch(app, lines(), 2, lambda r, _c: results.append(r)))
        for _ in range(200):
            await asyncio.sleep(0)
        held = len(consumed)
        assert held <= batch.PENDING_WINDOWS * 2 + 2 and not results  # paused, nothing written
        release.set()
        counts = await task
        return held, results, counts

    held, results, counts = asyncio.run(go())
    assert counts.completed == 100 and len(consumed) == 100
    assert [r["response"]["body"]["p"] for r in results] == ["slow"] + [str(i) for i in range(1, 100)]


def test_an_engine_failure_answers_every_line():
    """The engine loop dies on its first step: each line still gets a result (the server's
    error), none is dropped, and the app reports the engine dead (the command exits 1)."""
    from qwen35.server.app import ServerConfig, create_app
    from qwen35.server.batch import run_batch
    from server_fakes import FakeEngine

    engine = FakeEngine()
    engine.fail_next_step = True
    app = create_app(engine, ServerConfig(served_model_name="fake"))
    results: list[dict] = []

    async def go():
        async with app.router.lifespan_context(app):
            counts = await run_batch(app, [line(f"r{i}", "/v1/completions", {"prompt": "hi"})
                                           for i in range(6)], 2, lambda r, _c: results.append(r))  # fmt: skip
            return counts, app.state.qwen35.async_engine.alive

    counts, alive = asyncio.run(go())
    assert not alive and counts.failed == counts.total == 6 == len(results)
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(6)]
    assert all(r["response"]["status_code"] in (500, 503) for r in results)
    assert results[-1]["response"]["status_code"] == 503
    assert results[-1]["error"]["code"] == "engine_dead"
