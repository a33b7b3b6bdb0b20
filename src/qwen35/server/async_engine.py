"""The bridge between one engine loop thread and many asyncio request handlers.

The engine is not thread-safe, so exactly one thread ever calls it: the loop thread below. It
runs `engine.step()` while there is work and sleeps on an Event when idle. Handlers never call the
engine; they queue commands (add, abort) that the loop thread executes between steps, and
they read their request's delta outputs from a per-request asyncio.Queue that the loop thread
fills through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any

from qwen35.engine.engine_thread import EngineThread
from qwen35.request import RequestOutput, SamplingParams

log = logging.getLogger("qwen35.server")

_END = object()  # pushed to a stream that ends without a finished output (aborted)


class QueueFullError(Exception):
    """Admitting the request would leave more sequences waiting than --max-queue (HTTP 503)."""


class QueueTooSmallError(Exception):
    """The request has more sequences than running slots + --max-queue: never admissible (400)."""


class EngineDeadError(Exception):
    """The engine loop stopped (an engine error or shutdown); no request can be served."""


class RequestStream:
    """The delta outputs of one or more engine requests (a batch of completion prompts share one
    stream), read by their handler: `async for out in stream` until all of them finished."""

    def __init__(self, request_ids: list[str], owner: AsyncEngine, loop: asyncio.AbstractEventLoop):
        self.request_ids = list(request_ids)
        self._unfinished = set(request_ids)
        self._owner = owner
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _put(self, item: Any) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed (server shutting down)
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            if isinstance(item, tuple):  # (_END, request_id): aborted
                self._unfinished.discard(item[1])
                continue
            if item.finished:
                self._unfinished.discard(item.request_id)
            return item
        raise StopAsyncIteration

    def abort(self) -> None:
        """Stop generating (client gone): frees the requests' KV blocks and state slots."""
        for rid in self._unfinished:
            self._owner.abort(rid)
        self._unfinished.clear()


class AsyncEngine:
    """Runs the engine loop on its EngineThread.

    `max_queue` counts sequences (prompts x n), not HTTP requests: a request is refused (503)
    when, with its sequences, more than `max_queue` sequences would wait for a running slot
    (running + waiting + new > slots + max_queue). `on_death` callbacks run (on the loop thread)
    when the loop stops after an error, e.g. to shut the server down so a supervisor restarts
    it.
    """

    def __init__(self, engine: Any, max_queue: int | None = None, thread: EngineThread | None = None):
        """`thread`: the EngineThread that built the engine, to run the loop on (on a CPU, one
        thread builds and steps the engine: engine/engine_thread.py); None: a new one."""
        self.engine = engine
        self.max_queue = max_queue
        self.on_death: list[Callable[[], None]] = []
        self._cmds: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # touched by the loop thread only
        self._lock = threading.Lock()
        self._pending_adds = 0  # adds queued but not yet executed by the loop thread
        self._stats: dict[str, Any] = {}
        self._stop = False
        self._closed = False  # the loop has drained its commands for the last time
        self.error: BaseException | None = None
        self._thread = thread  # None: one of its own, made at start
        self._loop: concurrent.futures.Future | None = None  # the loop, once started

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._refresh_stats()
        own = self._thread is None
        if own:
            self._thread = EngineThread()
        self._loop = self._thread.submit(self._run)
        if own:
            self._thread.close()  # (it ends with the loop)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._loop is not None:
            concurrent.futures.wait([self._loop], timeout)

    @property
    def running(self) -> bool:
        """The loop has started and not returned."""
        return self._loop is not None and not self._loop.done()

    @property
    def alive(self) -> bool:
        return self.running and self.error is None and not self._stop

    # ---- handler side (event loop threads) -------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Latest get_stats() snapshot, refreshed by the loop thread after every step."""
        return self._stats

    def num_waiting(self) -> int:
        """Sequences queued: waiting in the engine or not yet added to it."""
        with self._lock:
            pending = self._pending_adds
        return pending + int(self._stats.get("num_waiting", 0))

    def _check_queue(self, num_new: int) -> None:
        """Called under self._lock."""
        if self.max_queue is None:
            return
        stats = self._stats
        slots = int(stats.get("state_slots_total", 0))
        capacity = slots + self.max_queue
        if num_new > capacity:
            raise QueueTooSmallError(
                f"this request needs {num_new} sequences (prompts x n), but at most {capacity} "
                f"can be admitted at once ({slots} running slots + --max-queue "
                f"{self.max_queue}); send fewer prompts or a smaller n"
            )
        queued = (
            self._pending_adds + int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))
        )
        if queued + num_new > capacity:
            waiting = max(0, queued - slots)
            raise QueueFullError(
                f"server busy: {waiting} sequences are waiting (--max-queue {self.max_queue}) "
                f"and this request adds {num_new}; retry later"
            )

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora: str | None = None,
    ) -> RequestStream:
        return await self.add_requests([(request_id, prompt, params)], lora)

    async def add_requests(
        self, requests: list[tuple[str, str | list[int], SamplingParams]], lora: str | None = None
    ) -> RequestStream:
        """Queue requests (all or none; all with LoRA adapter `lora` when given) and return
        their stream. Raises what engine.add_request raises (SamplingParamsError,
        PromptTooLongError, ...), QueueFullError, EngineDeadError."""
        if not self.alive:
            raise EngineDeadError(self._dead_message())
        num_seqs = _num_seqs(requests)
        with self._lock:
            self._check_queue(num_seqs)
            self._pending_adds += num_seqs
        stream = RequestStream([r[0] for r in requests], self, asyncio.get_running_loop())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", requests, stream, lora, fut))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            stream.abort()  # the client left before the add ran; don't leak the requests
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the engine's thread between two steps (e.g. loading a LoRA adapter);
        its result, or what it raised."""
        if not self.alive:
            raise EngineDeadError(self._dead_message())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("call", fn, args, fut))
        return await asyncio.wrap_future(fut)

    def _submit(self, cmd: tuple) -> None:
        # under the lock that the loop's final drain takes: a command either lands before that
        # drain (which fails it) or sees the loop closed, never in between to wait forever
        with self._lock:
            if not self._closed:
                self._cmds.append(cmd)
                self._wake.set()
                return
        self._fail_command(cmd)

    def _dead_message(self) -> str:
        # no exception text: it goes to the log, never to clients (not even /health)
        if self.error is not None:
            return "the engine stopped after an internal error; the server is shutting down"
        return "the engine is not running (the server is shutting down)"

    # ---- loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    for out in outputs:
                        self._dispatch(out)
                    self._refresh_stats()
                elif not self._cmds:
                    self._refresh_stats()
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as e:  # an engine bug: fail every request, /health turns 503
            log.exception("engine loop died")
            self.error = e
        finally:
            self._fail_all(EngineDeadError(self._dead_message()))
        if self.error is not None:
            for callback in self.on_death:
                try:
                    callback()
                except Exception:
                    log.exception("on_death callback failed")

    def _run_commands(self) -> None:
        while self._cmds:
            cmd = self._cmds.popleft()
            kind = cmd[0]
            if kind == "add":
                _, requests, stream, lora, fut = cmd
                added: list[str] = []
                try:
                    for rid, prompt, params in requests:
                        if lora is None:  # (engines without LoRA support take no such argument)
                            self.engine.add_request(rid, prompt, params)
                        else:
                            self.engine.add_request(rid, prompt, params, lora=lora)
                        added.append(rid)
                        self._streams[rid] = stream
                except Exception as e:
                    for rid in added:  # all or none
                        self._streams.pop(rid, None)
                        self.engine.abort_request(rid)
                    fut.set_exception(e)
                else:
                    fut.set_result(None)
                finally:
                    self._refresh_stats()  # before the pending count drops: admission sees both
                    with self._lock:
                        self._pending_adds -= _num_seqs(requests)
            elif kind == "call":
                _, fn, args, fut = cmd
                try:
                    fut.set_result(fn(*args))
                except Exception as e:
                    fut.set_exception(e)
            elif kind == "abort":
                stream = self._streams.pop(cmd[1], None)
                if stream is not None:
                    try:
                        self.engine.abort_request(cmd[1])
                    except Exception:  # already finished inside the engine: nothing to free
                        log.debug("abort of %s failed", cmd[1], exc_info=True)
                    stream._put((_END, cmd[1]))
                    self._refresh_stats()

    def _dispatch(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:  # aborted meanwhile
            return
        stream._put(out)
        if out.finished:
            del self._streams[out.request_id]

    def _refresh_stats(self) -> None:
        try:
            self._stats = dict(self.engine.get_stats())
        except Exception:
            log.debug("get_stats failed", exc_info=True)

    def _fail_all(self, err: BaseException) -> None:
        for stream in set(self._streams.values()):
            stream._put(err)
        self._streams.clear()
        self._drain_dead()

    def _drain_dead(self) -> None:
        """The loop's last act: close the command queue and fail what is in it; commands that
        come later fail in `_submit` instead of waiting for a loop that is gone."""
        with self._lock:
            self._closed = True
            cmds = list(self._cmds)
            self._cmds.clear()
        for cmd in cmds:
            self._fail_command(cmd)

    def _fail_command(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            return  # an abort of a request that can no longer run: nothing to do
        fut = cmd[-1]
        if cmd[0] == "add":
            with self._lock:
                self._pending_adds -= _num_seqs(cmd[1])
        if not fut.done():
            fut.set_exception(EngineDeadError(self._dead_message()))


def _num_seqs(requests: list[tuple]) -> int:
    return sum(max(1, int(getattr(r[2], "n", 1))) for r in requests)
