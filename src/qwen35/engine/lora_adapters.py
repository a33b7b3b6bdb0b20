"""The engine's LoRA adapters, served per request: name -> adapter, loaded onto the model.

Each load gets a fresh id (never reused). The prefix cache keys a sequence's blocks by what the
adapter computes (`cache_salt`: a hash of its weights, `LoraAdapter.digest`): requests of one
adapter share cached prefixes, never with the base model or another adapter, nor with an earlier
adapter of other weights loaded under the same name; the key is the same in every process, so
`--prefix-cache-dir` keeps adapters' prefixes too.
The weights are read and checked (every module a linear layer of the decoder, of the right
shape) before anything is attached. Two modes (layers/lora.py): per adapter (CPUs: no rank
limit, memory as loaded) or stacked (GPUs: max_loras x max_lora_rank slots allocated at start,
counted in the weights before the caches are sized; capturable by CUDA graphs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from qwen35.errors import Qwen35Error
from qwen35.layers.lora import attach, attach_slot, detach, detach_slot, init_slots
from qwen35.lora import LoraAdapter

# adapter ids, unique in the process (engines may share one loaded model); 0: the base model
_IDS = itertools.count(1)


@dataclass(frozen=True)
class LoadedLora:
    name: str
    path: str
    id: int  # unique per load
    key: int  # what the model knows it by (Sequence.lora_id): its id, or its slot when stacked
    rank: int  # largest r of its modules
    nbytes: int  # its A and B on the model's device (stacked: 0, the slots are preallocated)
    digest: str = ""  # LoraAdapter.digest: what it computes

    @property
    def cache_salt(self) -> str:
        return f"lora:{self.digest}"


class LoraAdapters:
    def __init__(self, model, max_loras: int, max_rank: int = 16, stacked: bool = False,
                 send=None):  # fmt: skip
        """send: under tensor parallelism, fn(message) that gives each change to the other
        ranks (parallel/worker.py apply_lora), after it worked here."""
        self.model = model
        self.max_loras, self.max_rank, self.stacked = max_loras, max_rank, stacked
        self.send = send
        self.loaded: dict[str, LoadedLora] = {}
        self.slot_bytes = init_slots(model, max_loras, max_rank) if stacked else 0

    def add(self, name: str, path: str | Path | LoraAdapter) -> LoadedLora:
        """path: a PEFT adapter directory, or one already read (LoraAdapter: the server reads
        the files off the engine thread)."""
        if not isinstance(name, str) or not name.strip():
            raise Qwen35Error("a LoRA adapter needs a non-empty name")
        if name in self.loaded:
            raise Qwen35Error(
                f"a LoRA adapter named {name!r} is already loaded; unload it first or pick "
                "another name"
            )
        if len(self.loaded) >= self.max_loras:
            raise Qwen35Error(
                f"{len(self.loaded)} LoRA adapters are loaded, the most max_loras allows: "
                "unload one or raise --max-loras"
            )
        # reads and checks the files (LoraError names what is wrong)
        adapter = path if isinstance(path, LoraAdapter) else LoraAdapter(path)
        aid = next(_IDS)
        rank = max(p.a.shape[0] for p in adapter.pairs.values())
        if self.stacked:
            used = {x.key for x in self.loaded.values()}
            key = next(s for s in range(1, self.max_loras + 1) if s not in used)
            attach_slot(self.model, key, adapter)
            nbytes = 0
        else:
            key, nbytes = aid, attach(self.model, aid, adapter)
        if self.send is not None:
            self.send(("lora", "add", key, adapter, self.stacked))
        lora = LoadedLora(name, str(adapter.path), aid, key, rank, nbytes, adapter.digest)
        self.loaded[name] = lora
        return lora

    def remove(self, name: str) -> None:
        lora = self.loaded.pop(name, None)
        if lora is None:
            raise Qwen35Error(f"no LoRA adapter named {name!r} is loaded")
        if self.stacked:
            detach_slot(self.model, lora.key)
        else:
            detach(self.model, lora.key)
        if self.send is not None:
            self.send(("lora", "remove", lora.key, self.stacked))

    def get(self, name: str) -> LoadedLora:
        lora = self.loaded.get(name)
        if lora is None:
            have = ", ".join(sorted(self.loaded)) or "none"
            raise Qwen35Error(f"no LoRA adapter named {name!r} is loaded (loaded: {have})")
        return lora

    @property
    def nbytes(self) -> int:
        """Device memory the adapters hold (stacked: the slots allocated at start)."""
        return self.slot_bytes + sum(x.nbytes for x in self.loaded.values())
