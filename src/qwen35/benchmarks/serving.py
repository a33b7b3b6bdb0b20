"""An OpenAI-compatible server under load, measured as `vllm bench serve` measures one: time to
first token (TTFT), time per output token after the first (TPOT), inter-token latency between
stream chunks (ITL), end-to-end latency, and request / token throughput.

The client (`run_load`) sends streamed /v1/completions with token-id prompts (random ids,
lengths uniform within +-25% of `input_len`, seeded), `ignore_eos` and a fixed `max_tokens`, at
a Poisson `request_rate` (inf: all at once) with at most `max_concurrency` in flight; each request
on its own thread with a plain HTTP/1.1 connection (stdlib only), so it measures any server that
takes token-id prompts (`qwen35 serve`, vLLM, SGLang, llama-server): `qwen35 bench --workload
serve --base-url URL`.

The workload without `--base-url` (`run_serve`) starts `qwen35 serve` on the bench model in a
process of its own (as deployed) and runs the same requests, round by round, through the server
and straight through an engine in this process (`LLMEngine.add_request` + `step`, no HTTP): the
engine's rows are the baseline, and the ratio of output throughputs is what serving costs. The
client runs in this process, on threads, while the engine here is idle.
"""

from __future__ import annotations

import http.client
import json
import math
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace

import numpy as np

from qwen35.errors import Qwen35Error


@dataclass
class LoadSpec:
    num_prompts: int = 32
    input_len: int = 256
    output_len: int = 64
    request_rate: float = math.inf  # requests/s, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None  # requests in flight at most (None: no limit)
    seed: int = 0

    def check(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise Qwen35Error(f"--{name.replace('_', '-')} must be at least 1")
        if not self.request_rate > 0:
            raise Qwen35Error(f"--request-rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise Qwen35Error(f"--max-concurrency must be at least 1, got {self.max_concurrency}")


def random_prompts(spec: LoadSpec, vocab_size: int) -> list[list[int]]:
    """Seeded random token ids (below 150,000: ordinary text tokens of the Qwen vocabulary)."""
    rng = random.Random(spec.seed)
    lo, hi = max(1, round(spec.input_len * 0.75)), max(1, round(spec.input_len * 1.25))
    top = min(vocab_size, 150_000) - 1
    return [[rng.randint(0, top) for _ in range(rng.randint(lo, hi))]
            for _ in range(spec.num_prompts)]  # fmt: skip


@dataclass
class Record:
    prompt_tokens: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = math.nan  # seconds from sending to the first chunk with a choice
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)  # seconds between chunks after the first
    error: str | None = None
    sent_at: float = math.nan  # seconds from the load's start to this request's send


def _connect(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to a base URL's server (http or https) and the path prefix its `/v1/...`
    routes hang off (a `/v1` the URL ends in is the API's own)."""
    url = urllib.parse.urlsplit(base_url)
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return cls(url.hostname, url.port, timeout=timeout), url.path.rstrip("/").removesuffix("/v1")


def send(base_url: str, model: str | None, prompt: list[int], output_len: int,
         api_key: str | None = None, timeout: float = 600.0) -> Record:  # fmt: skip
    """One streamed completion; never raises (a failure is a Record with `error`)."""
    rec = Record(prompt_tokens=len(prompt))
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if model:
        body["model"] = model
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    conn, prefix = _connect(base_url, timeout)
    start = time.perf_counter()
    last = None
    try:
        conn.request("POST", prefix + "/v1/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        if resp.status != 200:
            rec.error = f"HTTP {resp.status}: {resp.read(500).decode('utf-8', 'replace')}"
            return rec
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                rec.error = str(chunk["error"])[:500]
                return rec
            now = time.perf_counter()
            if chunk.get("choices"):
                if last is None:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
            usage = chunk.get("usage")
            if usage:
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
        rec.e2e = time.perf_counter() - start
        rec.ok = last is not None
        if rec.ok and not rec.output_tokens:  # a server that sends no usage: a token a chunk
            rec.output_tokens = 1 + len(rec.itl)
        if not rec.ok:
            rec.error = "the stream ended without a token"
    except (OSError, http.client.HTTPException, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


def run_load(base_url: str, model: str | None, prompts: list[list[int]], spec: LoadSpec,
             api_key: str | None = None) -> tuple[list[Record], float]:  # fmt: skip
    """Every prompt through the server at the spec's rate and concurrency: (records in prompt
    order, wall seconds from the first send to the last answer)."""
    rng = random.Random(spec.seed + 1)
    slots = threading.Semaphore(spec.max_concurrency or len(prompts))
    records: list[Record | None] = [None] * len(prompts)

    def worker(i: int, prompt: list[int]) -> None:
        try:
            sent_at = time.perf_counter() - start
            records[i] = send(base_url, model, prompt, spec.output_len, api_key)
            records[i].sent_at = sent_at
        finally:
            slots.release()

    threads = []
    start = time.perf_counter()
    due = start
    for i, prompt in enumerate(prompts):
        if math.isfinite(spec.request_rate):
            due += rng.expovariate(spec.request_rate)
            time.sleep(max(0.0, due - time.perf_counter()))
        slots.acquire()
        th = threading.Thread(target=worker, args=(i, prompt), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return [r for r in records if r is not None], time.perf_counter() - start


def _stats_ms(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99))}  # fmt: skip


def summarize(records: list[Record], duration: float) -> dict:
    ok = [r for r in records if r.ok]
    out = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in records if not r.ok]
    return {
        "completed": len(ok),
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "duration_s": duration,
        "input_tokens": prompt,
        "output_tokens": out,
        "request_throughput": len(ok) / duration if duration else None,
        "output_throughput": out / duration if duration else None,
        "total_token_throughput": (out + prompt) / duration if duration else None,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
    }


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model a server lists at /v1/models."""
    conn, prefix = _connect(base_url, 30)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        conn.request("GET", prefix + "/v1/models", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise Qwen35Error(f"{base_url}/v1/models answered HTTP {resp.status}; pass "
                              "--served-model-name (and --api-key)")  # fmt: skip
        return json.loads(body)["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        raise Qwen35Error(f"cannot list the models of {base_url} ({e}); is a server running "
                          "there? pass --served-model-name to skip the lookup") from None  # fmt: skip
    finally:
        conn.close()


def run_external(base_url: str, spec: LoadSpec, model: str | None = None,
                 api_key: str | None = None, vocab_size: int = 248_320) -> dict:  # fmt: skip
    """Load an already running server (`--base-url`)."""
    spec.check()
    model = model or served_model(base_url, api_key)
    prompts = random_prompts(spec, vocab_size)
    records, duration = run_load(base_url, model, prompts, spec, api_key)
    return {"base_url": base_url, "served_model": model, **_spec_json(spec),
            "server": summarize(records, duration)}  # fmt: skip


def _spec_json(spec: LoadSpec) -> dict:
    return {"num_prompts": spec.num_prompts, "input_len": spec.input_len,
            "output_len": spec.output_len,
            "request_rate": None if math.isinf(spec.request_rate) else spec.request_rate,
            "max_concurrency": spec.max_concurrency}  # fmt: skip


# ---- the workload: our server vs the same engine without HTTP ---------------------------------


def sizes(opts) -> LoadSpec:
    """The load of `--requests` (32; quick 4), `--input-len` (256; 16), `--output-len` (64; 4),
    `--request-rate` and `--max-concurrency`."""
    quick = opts.quick
    spec = LoadSpec(
        num_prompts=opts.requests or (4 if quick else 32),
        input_len=opts.input_len or (16 if quick else 256),
        output_len=opts.output_len or (4 if quick else 64),
        request_rate=opts.request_rate,
        max_concurrency=opts.max_concurrency,
        seed=opts.seed,
    )
    spec.check()
    return spec


def _offline(engine, prompts: list[list[int]], output_len: int) -> tuple[list[Record], float]:
    """The same requests straight through the engine, all added at once (no HTTP, no SSE)."""
    from qwen35.request import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    records = [Record(prompt_tokens=len(p)) for p in prompts]
    last: dict[int, float] = {}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"o{i}", p, sp)
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            i = int(o.request_id[1:])
            rec = records[i]
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n:
                if i in last:
                    rec.itl.append(now - last[i])
                else:
                    rec.ttft = now - start
                last[i] = now
                rec.output_tokens += n
            if o.finished:
                rec.e2e, rec.ok = now - start, True
    return records, time.perf_counter() - start


def run_serve(bm, opts) -> dict:
    from qwen35.benchmarks.common import make_engine, median, ratio

    spec = sizes(opts)
    rounds = opts.rounds or (1 if opts.quick else 2)
    prompts = random_prompts(spec, bm.config.vocab_size)
    max_len = max(map(len, prompts)) + spec.output_len + 16
    from qwen35.commands.serve import SERVE_DECODE_STEP_MS

    # paced as `qwen35 serve` paces its prompt chunks, so the two differ by the HTTP layer only
    engine = make_engine(bm, max_num_seqs=spec.num_prompts, max_model_len=max_len,
                         max_decode_step_ms=SERVE_DECODE_STEP_MS)  # fmt: skip
    res: dict[str, list[dict]] = {"server": [], "engine": []}
    _offline(engine, prompts[:1], 2)  # warm-up (kernels, first-step allocations)
    opts.say("serve: starting qwen35 serve")
    server = ServeProcess(bm, opts, max_num_seqs=spec.num_prompts, max_model_len=max_len)
    try:
        run_load(server.url, "bench", prompts[:1], replace(spec, output_len=2))  # its warm-up
        for r in range(rounds):
            for side in ("server", "engine") if r % 2 == 0 else ("engine", "server"):
                opts.say(f"serve: round {r + 1}/{rounds}, {side}")
                if side == "engine":
                    res[side].append(summarize(*_offline(engine, prompts, spec.output_len)))
                else:
                    res[side].append(summarize(*run_load(server.url, "bench", prompts, spec)))
    finally:
        server.close()
    failed = sum(x["failed"] for x in res["server"])
    if failed:
        raise Qwen35Error(f"serve workload: {failed} requests failed through the server: "
                          f"{next(x['first_error'] for x in res['server'] if x['failed'])}")  # fmt: skip
    per_round = [ratio(s["output_throughput"], e["output_throughput"])
                 for s, e in zip(res["server"], res["engine"], strict=True)]  # fmt: skip
    return {
        **_spec_json(spec),
        "rounds": rounds,
        "server": res["server"][-1] if rounds == 1 else _median_round(res["server"]),
        "engine": res["engine"][-1] if rounds == 1 else _median_round(res["engine"]),
        "server_over_engine_per_round": per_round,
        "server_over_engine": median(x for x in per_round if x is not None),
        "per_round": res,
    }


def _median_round(rows: list[dict]) -> dict:
    """The round whose output throughput is the median (a whole round: its numbers agree)."""
    order = sorted(rows, key=lambda x: x["output_throughput"] or 0.0)
    return order[(len(order) - 1) // 2]


class ServeProcess:
    """`qwen35 serve` on the bench model in a process of its own, as it is deployed (its engine
    built and stepped on one thread: engine/engine_thread.py), on a free loopback port. It loads
    the model again (random weights: the same config, its own seed)."""

    def __init__(self, bm, opts, max_num_seqs: int, max_model_len: int, timeout: float = 900):
        cmd = [sys.executable, "-m", "qwen35.cli", "serve", "--model", str(bm.source),
               "--port", "0", "--served-model-name", "bench", "--log-level", "warning",
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len),
               "--dtype", opts.dtype, "--device", str(opts.device)]  # fmt: skip
        if opts.threads:
            cmd += ["--threads", str(opts.threads)]
        if bm.random_weights:
            cmd += ["--load-format", "random"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.log: list[str] = []
        found = threading.Event()
        self.url = ""

        def read() -> None:  # (drained to the end: a full pipe would stall the server)
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r" on (http://[^\s/]+)/v1", line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        if not found.wait(timeout) or not self.url or not self._healthy(deadline):
            self.close()
            tail = "".join(self.log[-20:])
            raise Qwen35Error(f"serve workload: `qwen35 serve` did not start:\n{tail}")

    def _healthy(self, deadline: float) -> bool:
        """/health answers 200 (the port is bound before the server listens)."""
        while time.monotonic() < deadline and self.proc.poll() is None:
            conn, _ = _connect(self.url, 5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return True
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.1)
        return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
