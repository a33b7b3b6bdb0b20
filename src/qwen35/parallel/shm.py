"""All-reduce (and all-gather) through shared memory for the ranks of one host (CPU tensors),
instead of gloo.

gloo's all-reduce is a loopback TCP round trip (~1.5 ms on a 2-core VM) and a decode step makes
two per layer; `kernels/shm_allreduce_cpu.cpp` sums the ranks' partials in a /dev/shm segment
every rank maps (like vLLM's CPU shm all-reduce). `setup` (every rank, right after the default
group forms) makes the segment when every rank is on this host and the module builds: rank 0
creates the file, sends its name over gloo, all map it, rank 0 unlinks it (nothing is left in
/dev/shm after a crash). Otherwise, and for tensors it does not take (not CPU, not contiguous,
not fp32 / bf16 / fp16), `TensorParallel.all_reduce` / `gather_last` use gloo, the reference.
QWEN35_TP_ALLREDUCE=gloo forces gloo (set it before the engine starts: workers inherit it).

The per-step message of rank 0 (group.py `broadcast`) goes through the segment too: pickled
bytes in a broadcast region of BCAST_BYTES. CPU tensors are pickled as numpy arrays (torch's
own tensor pickling, which gloo's broadcast_object_list uses, costs ~70 us a tensor to write and
~50 us to read; a step's batch holds a dozen). A larger message is flagged in the segment and
goes over gloo (every rank knows to).
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import secrets
import socket

import torch
import torch.distributed as dist

from qwen35.kernels import Native

log = logging.getLogger("qwen35")
SHM = Native("shm_allreduce_cpu.cpp", ("-mavx2", "-mfma", "-mf16c"), needs=("avx2", "fma", "f16c"))
SLOT_BYTES = 4 << 20  # per rank and buffer; larger tensors go in chunks of this
BCAST_BYTES = 4 << 20  # rank 0's per-step message; larger ones go over gloo
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_comm = None  # this process's segment over the default group, or None (gloo)
calls = 0  # all-reduces this process made through shared memory (tests check the path)
bcasts = 0  # messages this process sent or received through shared memory


def setup(timeout_s: float, slot_bytes: int = SLOT_BYTES, bcast_bytes: int = BCAST_BYTES) -> bool:
    """Collective over the default group: map a shared segment where every rank can; returns
    whether the shared-memory path is on. A wait on a peer fails after timeout_s."""
    global _comm
    close()
    rank, size = dist.get_rank(), dist.get_world_size()
    hosts: list = [None] * size
    dist.all_gather_object(hosts, socket.gethostname())
    mod = None if os.environ.get("QWEN35_TP_ALLREDUCE") == "gloo" else SHM.load()
    if not _all(mod is not None and len(set(hosts)) == 1):
        return False
    box = [_create(mod.segment_bytes(size, slot_bytes, bcast_bytes)) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    comm = None
    if box[0] is not None:
        try:
            comm = mod.ShmComm(box[0], rank, size, slot_bytes, bcast_bytes, timeout_s)
        except RuntimeError as e:  # e.g. a rank in another container with the same hostname
            log.warning("shared-memory all-reduce unavailable on rank %d: %s", rank, e)
    mapped = _all(comm is not None)  # every rank has mapped it (or given up): unlink
    if rank == 0 and box[0] is not None:
        os.unlink(box[0])
    if mapped and _all(comm.peers_alive()):  # every pid visible: the liveness checks work
        _comm = comm
    return _comm is not None


def all_reduce(x: torch.Tensor) -> bool:
    """Sum x over the default group in place through the segment; False where this path does
    not apply (the caller uses gloo). Every rank decides alike: same shapes and dtypes."""
    global calls
    if _comm is None or not x.is_cpu or not x.is_contiguous() or x.dtype not in DTYPES:
        return False
    _comm.all_reduce_(x)
    calls += 1
    return True


def all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> bool:
    """parts[r] <- rank r's x (contiguous CPU tensors) through the segment; False where this
    path does not apply."""
    global calls
    if _comm is None or not x.is_cpu or not x.is_contiguous():
        return False
    _comm.all_gather(x, parts)
    calls += 1
    return True


def broadcast(obj=None) -> tuple[bool, object]:
    """Rank 0 sends obj to every rank of the default group, the others receive it: (True, obj)
    when it went through the segment; (False, obj) where the caller must use gloo's broadcast
    instead (no segment, or a message larger than the region: both sides agree). Waits as long
    as it takes (idle workers wait here) but fails when the peer it waits on is gone."""
    global bcasts
    if _comm is None:
        return False, obj
    if dist.get_rank() == 0:
        f = io.BytesIO()
        _Pickler(f, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        ok = _comm.bcast_send(f.getbuffer().tobytes())
    else:
        data = _comm.bcast_recv()
        ok, obj = data is not None, None if data is None else pickle.loads(data)
    bcasts += ok
    return ok, obj


class _Pickler(pickle.Pickler):
    """CPU tensors (numpy's dtypes, no grad) as numpy arrays; the rest as pickle does."""

    def reducer_override(self, obj):
        if (
            type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and obj.dtype != torch.bfloat16
            and not obj.requires_grad
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def close() -> None:
    """Unmap the segment (the group is being destroyed)."""
    global _comm
    _comm = None


def _all(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _create(nbytes: int) -> str | None:
    path = f"/dev/shm/qwen35-tp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # zero-filled (counters at 0), and it fits
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("shared-memory all-reduce unavailable: %s", e)
        if os.path.exists(path):
            os.unlink(path)
        return None
    return path
