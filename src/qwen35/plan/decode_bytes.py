"""Bytes one decode step moves through memory: the one formula behind the planner's decode speed
and the benchmarks' bandwidth roofline. No torch.

A step of `sequences` sequences, each at `context` tokens, moves:
- weights: every dense weight once (attention, DeltaNet, dense MLP, shared expert, norms and the
  output head; a tied embedding is read here, once, as the head), the fraction of the routed
  experts its tokens touch, and one row of an untied input embedding per sequence (the rest of
  that table is never read); vision and MTP weights not at all;
- kv: each sequence's K and V of every full-attention layer up to the context;
- state: each sequence's DeltaNet conv + recurrent state, read and written back whole.
The new KV row a step writes is left out (one token against `context`).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen35.cache_spec import CacheSpec
from qwen35.plan.sharding import RankWeights


@dataclass(frozen=True)
class DecodeStepBytes:
    weights: float
    kv: float
    state: float

    @property
    def total(self) -> float:
        return self.weights + self.kv + self.state

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "kv": self.kv, "state": self.state, "total": self.total}


def decode_bytes(
    weights: RankWeights,
    spec: CacheSpec,
    *,
    sequences: int,
    context: int,
    embedding_rows: float,
    experts_touched: float = 1.0,
) -> DecodeStepBytes:
    """weights: what the device holds, by how decode reads it; spec: the caches as allocated;
    embedding_rows: rows of the untied input embedding this device holds (vocab / tp), so one
    row is weights.embedding / embedding_rows; experts_touched: the fraction of routed experts
    the step's tokens reach (planner.moe_touched_fraction; 1.0 for dense models)."""
    row = weights.embedding / embedding_rows if weights.embedding else 0.0
    return DecodeStepBytes(
        weights=weights.dense + weights.experts * experts_touched + sequences * row,
        kv=sequences * context * spec.kv_bytes_per_token,
        state=sequences * 2 * spec.state_bytes_per_sequence,
    )
