"""The shared-memory all-reduce of CPU ranks on one host (parallel/shm.py, issue 14) on 2 spawned
ranks: bit-identical to the rank-order fp32 sum and to gloo's all-reduce for fp32 / bf16 / fp16,
odd sizes, tensors of several slots, hundreds of calls back to back; the all-gather equal to
gloo's; the gloo fallbacks; a peer
that hangs or dies is an error naming it, not a hang. The per-step broadcast through the segment:
objects equal to gloo's broadcast_object_list, small and larger than the region (gloo), many back
to back; a rank waiting past the timeout is fine (idle), a rank waiting on a dead rank 0 fails. (tests/test_parallel_engine.py runs the
engine at tp=2 through it.)"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import pytest
import torch

from qwen35.parallel import shm

SLOT = 4096  # bytes: 1024 fp32 per slot, so a few thousand elements already take chunks
SIZES = (1, 7, 1000, 1024, 1025, 4099, 20001)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def spawn(scenario: str) -> list[str]:
    """Run `scenario` on ranks 0 and 1; each rank's report ('ok' or its traceback)."""
    import multiprocessing as mp
    import socket

    if shm.SHM.load() is None:  # built here once, not by both ranks at the same time
        pytest.skip("the shared-memory all-reduce module is unavailable here")
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    procs = [ctx.Process(target=_rank, args=(r, init, scenario, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in reversed(procs):  # rank 0 unreaped while rank 1 waits on it: a zombie is gone too
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    reports = dict(out.get() for _ in range(2) if not out.empty())
    return [reports.get(r, f"rank {r} reported nothing") for r in (0, 1)]


def _rank(rank: int, init: str, scenario: str, out) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))  # fmt: skip
        globals()[f"_{scenario}"](rank)
        out.put((rank, "ok"))
    except BaseException:
        out.put((rank, traceback.format_exc()))
    finally:
        shm.close()
        if dist.is_initialized() and scenario not in ("dead_peer", "dead_root"):
            dist.destroy_process_group()


def _data(rank: int, dtype, n: int, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * i + rank)
    return (torch.randn(n, generator=g) * 10).to(dtype)


def _matches_gloo(rank: int) -> None:
    import torch.distributed as dist

    assert shm.setup(60.0, slot_bytes=SLOT)
    cases = [(dt, n) for dt in DTYPES for n in SIZES]
    calls = 300  # back to back, no gloo call between them
    xs = [_data(rank, *cases[i % len(cases)], i) for i in range(calls)]
    outs = [x.clone() for x in xs]
    for y in outs:
        assert shm.all_reduce(y)
    for i, (x, y) in enumerate(zip(xs, outs, strict=True)):
        parts = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(parts, x)
        want = (parts[0].float() + parts[1].float()).to(x.dtype)  # fp32 sum in rank order
        assert torch.equal(y, want), (i, x.dtype, x.numel())
        ref = x.clone()
        dist.all_reduce(ref)
        assert torch.equal(y, ref), (i, x.dtype, x.numel())
        theirs = [torch.empty_like(y) for _ in range(2)]
        dist.all_gather(theirs, y)
        assert torch.equal(theirs[0], theirs[1])  # bit-identical on every rank
    assert shm.calls == calls
    for i, (dt, n) in enumerate([*cases, (torch.int64, 3001)]):  # all-gather: bytes, any dtype
        x = _data(rank, torch.float32, n, i).to(dt)
        mine, ref = [torch.empty_like(x) for _ in range(2)], [torch.empty_like(x) for _ in range(2)]
        assert shm.all_gather(mine, x)
        dist.all_gather(ref, x)
        assert all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True)), (dt, n)
    # what it does not take goes to gloo: integers, strided views, empty-handed callers
    assert not shm.all_reduce(torch.ones(4, dtype=torch.int64))
    assert not shm.all_reduce(torch.ones(4, 4).t())
    assert shm.all_reduce(torch.ones(0))  # an empty tensor: nothing to wait for
    # no segment where QWEN35_TP_ALLREDUCE=gloo on some rank, or the hostnames differ
    if rank == 1:
        os.environ["QWEN35_TP_ALLREDUCE"] = "gloo"
    assert not shm.setup(60.0) and not shm.all_reduce(torch.ones(3))
    os.environ.pop("QWEN35_TP_ALLREDUCE", None)
    import socket

    real = socket.gethostname
    socket.gethostname = (lambda: "elsewhere") if rank == 1 else real
    assert not shm.setup(60.0)
    socket.gethostname = real
    assert shm.setup(60.0)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"qwen35-tp-{_pid0()}-")]


def _pid0() -> int:
    import torch.distributed as dist

    box = [os.getpid()]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _dead_peer(rank: int) -> None:
    import torch.distributed as dist

    assert shm.setup(1.0)
    x = torch.ones(5)
    assert shm.all_reduce(x) and x.tolist() == [2.0] * 5
    if rank == 0:  # rank 1 does not come: a timeout naming it
        with pytest.raises(RuntimeError, match=r"rank 1 did not arrive within 1 s"):
            shm.all_reduce(x)
    dist.barrier()
    assert shm.setup(60.0)  # a fresh segment; now rank 1 exits
    if rank == 1:
        os._exit(0)
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 1 \(pid \d+\) is gone"):
        shm.all_reduce(x)


def _message(i: int):
    """Step-like objects; every 7th larger than the test's 4 KiB region."""
    g = torch.Generator().manual_seed(i)
    n = 5000 if i % 7 == 3 else i % 50
    ids = torch.randint(0, 1000, (n,), generator=g)
    other = {"i": i, "s": "x" * i, "f": torch.randn(3, 4, generator=g).t(), "b": ids > 500}
    other["bf16"] = torch.randn(5, generator=g).to(torch.bfloat16)  # pickled by torch
    return ("step", [(i, i + 1)], ids, other)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _broadcast(rank: int) -> None:
    import time

    import torch.distributed as dist

    from qwen35.parallel.group import broadcast

    assert shm.setup(0.5, slot_bytes=SLOT, bcast_bytes=4096)
    control = dist.new_group(backend="gloo")
    n = 300
    got = [broadcast(control, _message(i) if rank == 0 else None) for i in range(n)]
    large = sum(i % 7 == 3 for i in range(n))
    assert shm.bcasts == n - large  # the large ones went over gloo, both sides agreed
    for i, obj in enumerate(got):  # what gloo's broadcast_object_list delivers
        box = [obj if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=control)
        assert _same(obj, box[0]) and _same(obj, _message(i)), i
    # an all-reduce between broadcasts, then a wait (rank 1 idle) longer than the timeout
    x = torch.ones(3)
    assert shm.all_reduce(x) and x.tolist() == [2.0] * 3
    if rank == 0:
        time.sleep(1.5)
    assert broadcast(control, ("stop",) if rank == 0 else None) == ("stop",)
    # no segment (QWEN35_TP_ALLREDUCE=gloo): gloo, as before
    os.environ["QWEN35_TP_ALLREDUCE"] = "gloo"
    assert not shm.setup(60.0)
    before = shm.bcasts
    assert _same(broadcast(control, _message(1) if rank == 0 else None), _message(1))
    assert shm.bcasts == before
    os.environ.pop("QWEN35_TP_ALLREDUCE", None)


def _dead_root(rank: int) -> None:
    from qwen35.parallel.group import broadcast

    assert shm.setup(60.0)
    assert broadcast(None, ("hello",) if rank == 0 else None) == ("hello",)
    if rank == 0:
        os._exit(0)
    with pytest.raises(RuntimeError, match=r"tensor-parallel rank 0 \(pid \d+\) is gone"):
        broadcast(None)


def test_broadcast_matches_gloo_and_falls_back_for_large_messages():
    assert spawn("broadcast") == ["ok", "ok"]


def test_a_worker_waiting_on_a_dead_rank_0_fails():
    reports = spawn("dead_root")
    assert reports[1] == "ok", reports[1]


def test_matches_gloo_bit_for_bit_back_to_back():
    assert spawn("matches_gloo") == ["ok", "ok"]


def test_a_hung_or_dead_peer_is_an_error_not_a_hang():
    reports = spawn("dead_peer")
    assert reports[0] == "ok", reports[0]
