"""The tensor-parallel process group, seen from rank 0 (the engine): start, watch, stop.

One node: the engine starts ranks 1..N-1 itself (`torch.multiprocessing`, spawn; like vLLM's
`mp` backend). Several nodes: `torchrun` starts every rank; rank 0 runs the engine, the others
enter the worker loop (worker.py) from the same command line. Collectives of the model run on
the default group (nccl on GPUs, gloo on CPUs) with `distributed_timeout`; the per-step control
messages (rank 0 -> all) on a gloo group without a practical timeout, since idle workers wait
there for the next request.

A worker that dies is noticed by a watchdog thread (process sentinels): it records which rank
died and how, terminates the other workers (so a collective rank 0 waits in fails at once
instead of hanging), and calls `on_failure` (the server asks itself to shut down). The engine's
next step raises `WorkerDiedError`. If rank 0 stays blocked anyway (a backend that does not
notice closed peers), the process exits with status 1 after `grace_s`.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qwen35.errors import Qwen35Error

log = logging.getLogger("qwen35")
CONTROL_TIMEOUT = timedelta(days=365)  # idle workers wait for the next step on this group


class WorkerDiedError(Qwen35Error, RuntimeError):
    """A tensor-parallel worker process died; the engine cannot continue."""

    fatal = True  # LLMEngine.step re-raises it instead of failing the step's requests


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def rank_device(device: str, local_rank: int) -> torch.device:
    """cpu for every rank; cuda:N -> cuda:(N + local rank)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + local_rank)


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_groups(backend: str, init_method: str, rank: int, size: int, timeout_s: float):
    """The default group (model collectives) and the gloo control group."""
    kw = dict(backend=backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    if init_method != "env://":
        kw["init_method"] = init_method
    dist.init_process_group(**kw)
    if backend == "gloo":  # CPU ranks on one host: all-reduce through shared memory
        from qwen35.parallel import shm

        shm.setup(timeout_s)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def leave() -> None:
    """Leave the groups (and unmap the shared all-reduce segment)."""
    from qwen35.parallel import shm

    shm.close()
    dist.destroy_process_group()


def broadcast(control, obj: Any = None) -> Any:
    """rank 0 sends obj to every rank; the others receive it. Through the shared-memory segment
    where there is one (shm.broadcast), else (or for a message too large for it) over the
    control group."""
    from qwen35.parallel import shm

    sent, obj = shm.broadcast(obj)
    if sent:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A worker that exits while starting without reporting an error died before worker_main ran:
# most often a script that builds the engine at import time, which every spawned worker
# re-imports as its __main__ (Python's own error, printed above, says so too)
_STARTUP_HINT = (
    "; it died before it could report why (its error is above). A script that creates the "
    "engine at import time does this: workers start by importing the script again, so put "
    'LLM(..., tensor_parallel_size=N) under `if __name__ == "__main__":`'
)


class WorkerGroup:
    """Rank 0's handle on the group. `start()` returns once the default group is formed."""

    def __init__(self, size: int, device: str, timeout_s: float, worker_args: dict):
        self.size = size
        self.device = device
        self.timeout_s = timeout_s
        self.worker_args = worker_args
        self.procs: list = []
        self.control = None
        self.failure: str | None = None
        self._silent = False  # the dead worker reported no error (set before failure)
        self.on_failure: Callable[[str], None] | None = None
        self.grace_s = 15.0
        self._busy_since: float | None = None  # rank 0 inside a collective since
        self._stopped = False
        self._errors = None
        self._torchrun = torchrun_env() is not None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        backend = backend_for(self.device)
        atexit.register(self.stop)  # the workers exit with the engine process
        if self._torchrun:
            rank, world, _ = torchrun_env()
            if world != self.size:
                raise Qwen35Error(
                    f"torchrun started {world} processes but --tensor-parallel-size is "
                    f"{self.size}: they must be equal"
                )
            self.control = init_groups(backend, "env://", rank, world, self.timeout_s)
        else:
            import torch.multiprocessing as mp

            from qwen35.parallel.worker import worker_main

            ctx = mp.get_context("spawn")
            self._errors = ctx.SimpleQueue()
            ready = ctx.Queue()
            init = f"tcp://127.0.0.1:{_free_port()}"
            queues = (ready, self._errors)
            for rank in range(1, self.size):
                p = ctx.Process(
                    target=worker_main,
                    args=(rank, self.size, init, rank, self.worker_args, os.getpid(), queues),
                    name=f"qwen35-tp{rank}",
                    daemon=True,
                )
                p.start()
                self.procs.append(p)
            threading.Thread(target=self._watch, name="qwen35-tp-watchdog", daemon=True).start()
            self._wait_ready(ready)
            self.control = self.guard(init_groups, backend, init, 0, self.size, self.timeout_s)

    def _wait_ready(self, ready) -> None:
        """Wait (interruptibly) until every worker is about to join the group: a worker that
        dies while starting (import error, bad arguments) fails here, not in the rendezvous."""
        import queue

        waiting = set(range(1, self.size))
        while waiting:
            if self.failure is not None and self._silent:
                raise WorkerDiedError(self.failure + _STARTUP_HINT)
            self.check()
            try:
                waiting.discard(ready.get(timeout=0.1))
            except queue.Empty:
                pass

    def stop(self) -> None:
        """Tell the workers to exit, wait for them (then terminate), leave the group."""
        if self._stopped:
            return
        self._stopped = True
        if self.failure is None and self.control is not None:
            try:
                broadcast(self.control, ("stop",))
            except Exception:  # a worker already gone: terminated below
                log.debug("stop broadcast failed", exc_info=True)
        for p in self.procs:
            p.join(timeout=10)
        self._terminate()
        if dist.is_initialized():
            try:
                leave()
            except Exception:
                log.debug("destroy_process_group failed", exc_info=True)

    # ---- guarded calls ------------------------------------------------------------------------
    def check(self) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def guard(self, fn, *args, **kwargs):
        """Run a call that involves the workers; a dead worker turns into WorkerDiedError."""
        self.check()
        self._busy_since = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            deadline = time.monotonic() + 2.0  # give the watchdog time to name the dead rank
            while self.failure is None and self.procs and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.failure is not None:
                raise WorkerDiedError(self.failure) from None
            raise WorkerDiedError(
                f"a collective operation with the tensor-parallel workers failed: {e}"
            ) from e
        finally:
            self._busy_since = None

    # ---- watchdog -----------------------------------------------------------------------------
    def _watch(self) -> None:
        from multiprocessing.connection import wait

        alive = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, start=1)}
        while alive and not self._stopped:
            for s in wait(list(alive), timeout=0.5):
                rank, p = alive.pop(s)
                if self._stopped:
                    return
                p.join(timeout=1)
                self._died(rank, p)
                return

    def _died(self, rank: int, p) -> None:
        code = p.exitcode
        how = (
            f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        )
        detail = ""
        try:
            while self._errors is not None and not self._errors.empty():
                r, text = self._errors.get()
                detail += f"\n  rank {r}: {text}"
        except Exception:
            pass
        self._silent = not detail
        self.failure = (
            f"tensor-parallel worker rank {rank} (pid {p.pid}) {how}; the engine cannot continue "
            f"and must be restarted{detail}"
        )
        log.error("%s", self.failure)
        self._terminate()  # closes their sockets: a collective rank 0 is in fails now
        if self.on_failure is not None:
            try:
                self.on_failure(self.failure)
            except Exception:
                log.exception("on_failure callback failed")
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if self._busy_since is None:
                return
            time.sleep(0.1)
        print(f"qwen35: {self.failure} (rank 0 stayed blocked; exiting)", file=sys.stderr)
        os._exit(1)

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
