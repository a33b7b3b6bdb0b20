"""A worker rank (1..N-1): load its shard, allocate its cache shard, run every step rank 0
broadcasts, until told to stop. Started by the engine (spawn) or by torchrun."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from qwen35.parallel.context import TensorParallel
from qwen35.parallel.group import backend_for, broadcast, init_groups, leave, rank_device


def worker_main(rank, size, init_method, local_rank, args, parent_pid, queues) -> None:
    """Entry point of an engine-started worker process. queues: (ready, errors) to rank 0."""
    _die_with_parent(parent_pid)
    ready, errors = queues
    try:
        run_worker(rank, size, init_method, local_rank, args, ready)
    except BaseException as e:  # report it to rank 0's watchdog, then exit non-zero
        if errors is not None:
            last = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
            where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
            errors.put((rank, f"{type(e).__name__}: {e}{where}"))
        sys.stderr.flush()
        os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this worker when the engine process dies (Linux), so none is left behind."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def run_worker(
    rank: int, size: int, init_method: str, local_rank: int, args: dict, ready=None
) -> None:
    from qwen35.engine.forward_batch import allocate_caches
    from qwen35.engine.runtime import configure_cpu_runtime
    from qwen35.loader import load_model

    device = rank_device(args["device"], local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        configure_cpu_runtime(args["threads"])
    if ready is not None:
        ready.put(rank)
    control = init_groups(backend_for(args["device"]), init_method, rank, size, args["timeout"])
    tp = TensorParallel(rank, size, args["expert_parallel"])
    try:
        model = load_model(
            args["model"],
            dtype=args["dtype"],
            device=device,
            load_format=args["load_format"],
            seed=args["seed"],
            tp=tp,
            quantization=args["quantization"],
            yarn=args.get("yarn"),
            mtp=args.get("mtp", False),
        )
        from qwen35.quant.layers import set_int4_activations

        set_int4_activations(model, args.get("int4_activations", "int8") == "int8")
        if device.type == "cpu":  # compile (first run on a machine) now, not inside a step
            from qwen35 import kernels

            kernels.load()
        if args.get("lora") is not None and args["lora"][0]:  # stacked LoRA slots
            from qwen35.layers.lora import init_slots

            init_slots(model, *args["lora"][1:])
        msg = broadcast(control)
        while msg[0] == "lora":  # the adapters rank 0 loads before the caches
            apply_lora(model, msg)
            msg = broadcast(control)
        if msg[0] == "stop":
            return
        caches = allocate_caches(model.config, device=device, tp=size, **msg[1])
        dist.gather_object(rank_memory(model, caches, rank), None, dst=0, group=control)
        _loop(model, caches, control, device)
    finally:
        if dist.is_initialized():
            leave()


@torch.inference_mode()
def _loop(model, caches, control, device) -> None:
    """Rank 0's messages in order: ("step" | "hidden", restores, ids, batch) a forward pass
    (logits | the last layer's rows, kept with the batch for the MTP pass); ("head", rows);
    ("mtp", next_ids, hidden, batch, kv_only): the MTP head's pass (hidden None: the kept
    step's final-norm rows)."""
    from qwen35.ops.backend import select_backend

    backend = select_backend(device)  # rank 0 sends batches without its own

    def here(batch):
        return dataclasses.replace(to_device(batch, device), backend=backend)

    kept = None  # speculative decoding: (rows, batch) of the last "hidden" step
    store = None  # --prefix-cache-dir: this rank's shards (engine/prefix_store.py RankShards)
    while True:
        msg = broadcast(control)
        kind = msg[0]
        if kind == "stop":
            if store is not None:
                store.close()
            return
        if kind == "lora":
            apply_lora(model, msg)
        elif kind.startswith("prefix_"):
            store = _prefix_message(msg, store, caches, control)
        elif kind == "head":
            model.head_logits(msg[1].to(device))
        elif kind == "mtp":
            _, ids, hidden, batch, kv_only = msg
            if hidden is None:  # the step's own rows (normed here: prompt-logprob steps need not)
                hidden, batch = model.final_norm(kept[0], backend), kept[1]
            else:
                hidden, batch = hidden.to(device), here(batch)
            model.forward_mtp(ids.to(device), hidden, batch, caches, kv_only)
        else:  # "step" / "hidden"
            _, restores, input_ids, batch = msg
            # prefix-cache restores and rejected drafts' state, in the order rank 0 did them
            caches.copy_states(restores)
            if input_ids is None:
                continue
            batch = here(batch)
            if kind == "step":
                model(input_ids.to(device), batch, caches)
            else:
                kept = (model.forward_hidden(input_ids.to(device), batch, caches), batch)


def _prefix_message(msg, store, caches, control):
    """("prefix_store", rank 0's folder, max bytes, min tokens): this rank's store, in
    `rank{r}` under it; ("prefix_clear",): remove its files; ("prefix_save", items): queue
    these segments' shards; ("prefix_load", chain, tokens, first, blocks, slot): read this
    rank's shards into the caches and answer in the all-reduce. -> the store."""
    from qwen35.engine import prefix_store as ps

    kind = msg[0]
    if kind == "prefix_store":
        _, folder, max_bytes, min_tokens = msg
        return ps.PrefixStore(Path(folder) / f"rank{dist.get_rank()}", max_bytes, min_tokens, None)
    if kind == "prefix_clear":
        store.clear()
    elif kind == "prefix_save":
        for item in msg[1]:
            ps.save_shard(store, caches, *item)
    elif kind == "prefix_load":
        try:
            ok = ps.load_shard(store, caches, *msg[1:])
        except Exception:  # noqa: BLE001 - a failed read is a miss on every rank
            ok = False
        ps.all_ranks_ok(ok, control)
    return store


def apply_lora(model, msg) -> None:
    """rank 0's LoRA change on this rank's shard: ("lora", "add", key, adapter, stacked) or
    ("lora", "remove", key, stacked) (engine/lora_adapters.py)."""
    from qwen35.layers import lora

    if msg[1] == "add":
        _, _, key, adapter, stacked = msg
        if stacked:
            lora.attach_slot(model, key, adapter)
        else:
            lora.attach(model, key, adapter)
    else:
        _, _, key, stacked = msg
        (lora.detach_slot if stacked else lora.detach)(model, key)


def to_device(batch, device):
    """A ForwardBatch with its tensors on `device` (a no-op for CPU tensors on the CPU), its
    DecodeBatch's (and a verify step's phases') included."""
    moved = _moved(batch, device)
    if batch.lora is not None:  # [(adapter id, rows or None)]
        moved["lora"] = [(k, None if r is None else r.to(device)) for k, r in batch.lora]
    if batch.decode is not None:
        d = batch.decode
        sub = _moved(d, device)
        if d.phases is not None:
            sub["phases"] = [dataclasses.replace(p, **_moved(p, device)) for p in d.phases]
        moved["decode"] = dataclasses.replace(d, **sub)
    return dataclasses.replace(batch, **moved)


def _moved(obj, device) -> dict:
    """A dataclass's tensor fields on `device`."""
    return {
        f.name: getattr(obj, f.name).to(device)
        for f in dataclasses.fields(obj)
        if isinstance(getattr(obj, f.name), torch.Tensor)
    }


def rank_memory(model, caches, rank: int) -> dict:
    """What this rank holds: weight bytes, KV bytes per token, DeltaNet state bytes per
    sequence (the planner's per-GPU quantities), and the pools' totals."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    kv = caches.key + caches.value
    kv_tok = sum(t[0, 0].numel() * t.element_size() for t in kv)
    states = caches.conv + caches.recurrent
    st_seq = sum(t[0].numel() * t.element_size() for t in states)
    return {
        "rank": rank,
        "weights_bytes": weights,
        "kv_bytes_per_token": kv_tok,
        "kv_dtype": str(kv[0].dtype).removeprefix("torch.") if kv else None,
        "state_bytes_per_sequence": st_seq,
        # the recurrent states' (--mamba-ssm-cache-dtype); conv states hold the model dtype
        "state_dtype": (
            str(caches.recurrent[0].dtype).removeprefix("torch.") if caches.recurrent else None
        ),
        "kv_bytes": sum(t.numel() * t.element_size() for t in kv),
        "state_bytes": sum(t.numel() * t.element_size() for t in states),
    }
