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
    assert drained.wait(30) and ae._thread.is_alive()
    monkeypatch.setattr(AsyncEngine, "alive", property(lambda self: True))  # checked before
    add = ae.add_request("late", "hi", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(add, timeout=10))
        assert ae.num_waiting() == 0  # the failed add is not counted as waiting
    finally:
        release.set()
        ae._thread.join(10)
