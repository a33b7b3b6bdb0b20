"""The serving benchmark (benchmarks/serving.py, `qwen35 bench --workload serve`): its client
against a server whose replies are known (the fake engine: one token a step), its arithmetic,
rate and concurrency control, failures, and the workload on a tiny model. No timing is
asserted beyond ordering (a request sent after another finished)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from qwen35.benchmarks.serving import LoadSpec, Record, random_prompts, run_load, send, summarize
from server_fakes import FakeEngine, ServerThread


@pytest.fixture(scope="module")
def fake():
    from qwen35.server.app import ServerConfig, create_app

    engine = FakeEngine(max_num_seqs=8)
    engine.step_delay = 0.01
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="fake")))
    yield srv, engine
    srv.close()


def test_one_request_streams_every_token(fake):
    srv, _ = fake
    rec = send(srv.url, "fake", [11, 22, 33], output_len=5)
    assert rec.ok and rec.error is None, rec.error
    assert rec.output_tokens == 5 and rec.prompt_tokens == 3
    assert len(rec.itl) == 4  # one chunk a token: 5 chunks, 4 gaps
    assert 0 < rec.ttft < rec.e2e
    assert rec.ttft + sum(rec.itl) == pytest.approx(rec.e2e, abs=0.05)
    bad = send(srv.url, "no-such-model", [1], output_len=2)
    assert not bad.ok and bad.error.startswith("HTTP 404")
    gone = send("http://127.0.0.1:1", None, [1], output_len=2)
    assert not gone.ok and "Connection" in gone.error


def test_summary_arithmetic():
    recs = [Record(prompt_tokens=10, ok=True, output_tokens=5, ttft=0.1, e2e=0.5,
                   itl=[0.1] * 4),
            Record(prompt_tokens=20, ok=True, output_tokens=3, ttft=0.3, e2e=0.7, itl=[0.2] * 2),
            Record(prompt_tokens=7, error="HTTP 500")]  # fmt: skip
    s = summarize(recs, duration=2.0)
    assert (s["completed"], s["failed"], s["first_error"]) == (2, 1, "HTTP 500")
    assert s["output_tokens"] == 8 and s["input_tokens"] == 30
    assert s["output_throughput"] == 4.0 and s["total_token_throughput"] == 19.0
    assert s["request_throughput"] == 1.0
    assert s["tpot_ms"]["mean"] == pytest.approx((100 + 200) / 2)  # (0.5-0.1)/4, (0.7-0.3)/2
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["itl_ms"]["mean"] == pytest.approx(1e3 * (0.4 + 0.4) / 6)
    assert summarize([], 1.0)["ttft_ms"]["mean"] is None


def test_concurrency_and_rate(fake):
    srv, _ = fake
    one = LoadSpec(num_prompts=4, input_len=8, output_len=3, max_concurrency=1)
    recs, duration = run_load(srv.url, "fake", random_prompts(one, 1000), one)
    assert all(r.ok for r in recs) and len(recs) == 4
    for a, b in zip(recs, recs[1:], strict=False):  # one in flight: each sent after the last ended
        assert b.sent_at >= a.sent_at + a.e2e - 1e-3
    assert duration >= sum(r.e2e for r in recs) - 1e-3
    rated = LoadSpec(num_prompts=6, input_len=8, output_len=2, request_rate=20.0, seed=3)
    recs, _ = run_load(srv.url, "fake", random_prompts(rated, 1000), rated)
    import random

    rng = random.Random(rated.seed + 1)  # the client's Poisson gaps, as it draws them
    due = 0.0
    for r in recs:
        due += rng.expovariate(rated.request_rate)
        assert r.sent_at >= due - 1e-3  # never early
    prompts = random_prompts(LoadSpec(num_prompts=50, input_len=100), 1000)
    assert all(75 <= len(p) <= 125 for p in prompts) and max(max(p) for p in prompts) <= 999
    assert len({len(p) for p in prompts}) > 1
    with pytest.raises(Exception, match="request-rate"):
        LoadSpec(request_rate=0).check()


def test_external_server_through_the_command(fake, capsys, tmp_path):
    srv, _ = fake
    from qwen35.cli import main

    argv = ["bench", "--workload", "serve", "--base-url", srv.url + "/v1", "--requests", "3",
            "--input-len", "8", "--output-len", "4", "--max-concurrency", "2"]  # fmt: skip
    assert main([*argv, "--json", "--out", str(tmp_path / "o.json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "o.json").read_text())
    d = doc["workloads"]["serve"]
    assert d["served_model"] == "fake" and d["max_concurrency"] == 2  # (from /v1/models)
    assert d["server"]["completed"] == 3 and d["server"]["output_tokens"] == 12
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"Serving ({srv.url}/v1)" in out and "TTFT" in out


def test_command_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "qwen35.cli", "bench", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    r = run("--workload", "serve", "--base-url", "http://127.0.0.1:1")
    assert r.returncode == 2 and "is a server running there?" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("--workload", "decode", "--base-url", "http://127.0.0.1:1")
    assert r.returncode == 2 and "with --workload serve" in r.stderr
    r = run("--workload", "serve", "--base-url", "127.0.0.1:8000")
    assert r.returncode == 2 and "http://" in r.stderr


def test_serve_workload_on_a_tiny_model(tmp_path):
    from qwen35.benchmarks.common import BenchOptions
    from qwen35.benchmarks.runner import run_bench
    from tiny import save_checkpoint

    save_checkpoint(tmp_path / "m")
    opts = BenchOptions(model=str(tmp_path / "m" / "config.json"), quick=True, rounds=2,
                        baseline=False, dtype="fp32")  # fmt: skip
    d = run_bench(opts, ["serve"])["workloads"]["serve"]
    for side in ("server", "engine"):
        assert d[side]["completed"] == 4 and d[side]["failed"] == 0
        assert d[side]["output_tokens"] == 4 * 4
        assert not math.isnan(d[side]["ttft_ms"]["mean"])
    assert len(d["server_over_engine_per_round"]) == 2 and d["server_over_engine"] > 0
    assert len(d["per_round"]["server"]) == 2


def test_a_server_without_usage_counts_a_token_a_chunk():
    import http.server
    import threading

    class SSE(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for t in ("a", "b", "c"):
                self.wfile.write(f'data: {{"choices": [{{"text": "{t}"}}]}}\n\n'.encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SSE)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rec = send(f"http://127.0.0.1:{srv.server_address[1]}", "m", [1, 2], output_len=3)
    finally:
        srv.shutdown()
    assert rec.ok and rec.output_tokens == 3 and len(rec.itl) == 2
