"""One thread that builds an engine and then runs it: `EngineThread().submit(fn, ...)`.

A server steps its engine on a thread of its own (the HTTP event loop has the main one). On a
CPU that thread must also be the one that built the engine: torch's CPU kernels run on OpenMP
(GNU libgomp in torch's wheels), which keeps a team of worker threads per thread that starts
parallel work. An engine built on one thread (weights, warm-up step) and stepped on another
leaves two teams alive; once libgomp manages more threads than there are CPUs, its workers stop
spinning between parallel regions and sleep on a futex after ~100 spins instead, so each of a
step's hundreds of parallel regions pays a wake-up. Measured on the 2-core Zen 4 VM
(Qwen3.5-0.8B config, bf16, 16 requests of 128 tokens + 32 out, `LLMEngine` steps only, no
server): built and stepped on the main thread 6.3-6.9 s, built on the main thread and stepped on
another 7.1-9.3 s (+0.3-0.9 s of system time, futex calls), built and stepped on one other
thread 6.0-7.4 s. `qwen35 serve` and `qwen35 run-batch` therefore build the engine on the
EngineThread that later runs the loop (`AsyncEngine(engine, thread=...)`).

The thread is a daemon: an interrupted load does not keep the process alive.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any


class EngineThread:
    """Runs submitted callables one after another on one daemon thread."""

    def __init__(self, name: str = "qwen35-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the thread; its result, or what it raised, here."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Let the thread end after the jobs already submitted."""
        self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller (KeyboardInterrupt included)
                fut.set_exception(e)
