"""`qwen35 bench`: our engine against transformers' `generate` on the same random weights.

Workloads (one module each): `decode` (batch-1 tokens/s against the memory-bandwidth roofline),
`throughput` (32 mixed requests: continuous batching vs static batches), `long_context`
(decode step time at 1K/8K/32K context, hybrid vs all-full-attention), `multi_turn` (prefix
caching on vs off), and outside `all`: `dtype` (fp32 vs bf16 weights for our engine),
`structured` (constrained vs unconstrained decode steps at batch 32, schema compile time),
`vision` (encoder images/s and TTFT of a chat with one image), `quality` (fp8 / int8 / int4
against BF16 on the same weights), `peers` (each weight format against llama.cpp) and `tp`
(one process against N tensor-parallel ranks on the same weights; `-tp N` also runs `decode`'s
engine on N ranks: parallel.py) and `spec` (speculative decoding with the MTP head against
plain decoding, with oracle drafts at set acceptance rates: speculative.py) and `serve`
(`qwen35 serve` under load, TTFT / TPOT / ITL as `vllm bench serve` reports them, against the
same requests straight through the engine; with `--base-url`, any running OpenAI-compatible
server: serving.py).
`runner.run_bench` runs the chosen ones in one process and builds the
JSON document (schema "qwen35.bench/1"); `report` prints the rich tables.
"""

from __future__ import annotations

SCHEMA = "qwen35.bench/1"
WORKLOADS = (
    "decode", "throughput", "long-context", "multi-turn", "dtype", "structured", "vision",
    "quality", "peers", "tp", "spec", "serve",
)  # fmt: skip
PARALLEL = ("decode", "tp")  # the workloads that take -tp N
ALL = WORKLOADS[:4]  # what `--workload all` runs: the issues' workloads
