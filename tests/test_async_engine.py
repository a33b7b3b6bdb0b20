"""AsyncEngine's command queue at the end of the engine loop: nothing waits forever."""

from __future__ import annotations

import asyncio
import threading

import pytest

from qwen35.request import SamplingParams
from qwen35.server.async_engine import AsyncEngine, EngineDeadError
from server_fakes import FakeEngine


def test_add_queued_after_the_final_drain_fails_instead_of_hanging(monkeypatch):
    # The race: a handler sees the loop alive, the loop then drains its commands for the last
    # time, and only then the handler queues its add. Hold the loop thread right after that
    # drain (still alive) and queue an add: it must fail, not wait for a loop that is gone.
    ae = AsyncEngine(FakeEngine())
    drained, release = threading.Event(), threading.Event()
    final_drain = ae._drain_dead

    def drain_and_hold() -> None:
        final_drain()
        drained.set()
        release.wait(30)

    monkeypatch.setattr(ae, "_drain_dead", drain_and_hold)
    ae.start()
    ae.shutdown(timeout=0)
    assert drained.wait(30) and ae.running
    monkeypatch.setattr(AsyncEngine, "alive", property(lambda self: True))  # checked before
    add = ae.add_request("late", "hi", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(add, timeout=10))
        assert ae.num_waiting() == 0  # the failed add is not counted as waiting
    finally:
        release.set()
        ae.shutdown(10)


def test_engine_thread_runs_jobs_in_order_and_hands_back_errors():
    from qwen35.engine.engine_thread import EngineThread

    t = EngineThread()
    seen: list[tuple[int, int]] = []
    futs = [t.submit(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(5)]
    for f in futs:
        f.result(10)
    assert [i for i, _ in seen] == list(range(5))
    assert {ident for _, ident in seen} == {t.thread.ident} != {threading.get_ident()}
    with pytest.raises(ZeroDivisionError):
        t.call(lambda: 1 / 0)
    assert t.call(lambda: 7) == 7  # still working after a job raised
    t.close()
    t.thread.join(10)
    assert not t.thread.is_alive()


def test_the_loop_steps_on_the_thread_that_built_the_engine():
    """On a CPU one thread builds and steps the engine (engine/engine_thread.py): the loop runs
    on the EngineThread it is given; without one, on a thread of its own that ends with it."""
    from qwen35.engine.engine_thread import EngineThread

    class Recording(FakeEngine):
        def __init__(self):
            super().__init__()
            self.built_on = threading.get_ident()
            self.stepped_on: set[int] = set()

        def step(self):
            self.stepped_on.add(threading.get_ident())
            return super().step()

    async def one(ae):
        stream = await ae.add_request("r", "hi", SamplingParams(max_tokens=3))
        return [out async for out in stream]

    t = EngineThread()
    engine = t.call(Recording)
    ae = AsyncEngine(engine, thread=t)
    ae.start()
    try:
        outs = asyncio.run(one(ae))
    finally:
        ae.shutdown(10)
    assert outs[-1].finished and engine.stepped_on == {engine.built_on} == {t.thread.ident}
    own = AsyncEngine(Recording())
    own.start()
    asyncio.run(one(own))
    own.shutdown(10)
    own._thread.thread.join(10)
    assert not own._thread.thread.is_alive() and not own.running
