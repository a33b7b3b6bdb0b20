"""CPU MoE decode steps: ops/moe.py's few-token paths (a bf16 block as one `moe_bf16` call; other
formats' routing and weighted sum in C++ around one kernel call per projection) against the
per-expert loop they replaced, or against the op-by-op few-token path (`--baseline ops`),
interleaved in one process.

    python bench/moe_decode.py [--formats bf16 int8 int4 fp8] [--layers 8] [--experts 32]
                               [--rounds 60] [--threads 2] [--tokens 1 2 4] [--engine 4]
                               [--baseline loop|ops]
    python bench/moe_decode.py --dtype fp32 --formats bf16   # bf16-stored, fp32 compute (Zen 3)
    python bench/moe_decode.py --write-config DIR   # the model of the MoE peers run, then:
    qwen35 bench --workload peers --model DIR/config.json --formats bf16,int8,int4 \\
        --contexts 512,2048 --rounds 4 --threads 2

The model: Qwen3.5-35B-A3B's catalog config (hidden 2,048, top-8 experts of 512, shared expert,
3 DeltaNet : 1 attention) with fewer layers and experts and a 32K vocabulary, random weights, so
that it and llama.cpp's copy fit 24 GiB; per layer a token reads what the real model reads (the
same k experts' bytes). Timed: every SparseMoE block of the model on 1-16 tokens (a decode
step of that many sequences; the rest of the step is the same code either way), the two paths
alternating each round; medians. The baseline: `loop`, ops/moe.py FEW_TOKENS = 0 (the
per-expert loop); `ops`, the few-token path op by op (routing by torch, `few_token_experts`:
SparseMoE.cpu_step / cpu_routed off). `--engine N`: whole engine decode steps of N sequences
instead (greedy, 128-token prompts; the loop also turns the decode plan's MoE step off), the two
alternating every 10 steps. Results can only be compared within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def write_config(out: Path, layers: int, experts: int, vocab: int = 32768) -> Path:
    """The reduced 35B-A3B config.json in `out` (created)."""
    src = Path(__file__).resolve().parents[1] / "src/qwen35/catalog/models/Qwen3.5-35B-A3B.json"
    cfg = json.loads(src.read_text())
    text = cfg["text_config"]
    text["num_hidden_layers"] = layers
    if "layer_types" in text:
        text["layer_types"] = text["layer_types"][:layers]
    text["num_experts"], text["vocab_size"] = experts, vocab
    cfg.pop("vision_config", None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out / "config.json"


def _engine_steps(bm, fmt: str, seqs: int, rounds: int, ops_moe) -> None:
    """Decode steps of `seqs` sequences, the few-token path (ops/moe.py FEW_TOKENS as set)
    against the loop (0) alternating every 10 steps in one engine."""
    from qwen35.benchmarks.common import make_engine
    from qwen35.request import SamplingParams

    n = 20 * rounds + 20
    eng = make_engine(bm, max_num_seqs=seqs, max_model_len=128 + n + 64,
                      enable_prefix_caching=False)  # fmt: skip
    for b in range(seqs):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        eng.add_request(f"r{b}", [(7 * i + b) % 30000 + 2 for i in range(128)], sp)
    for _ in range(8):  # the prefills and first decode steps
        eng.step()
    on = ops_moe.FEW_TOKENS
    times: dict[int, list[float]] = {on: [], 0: []}
    for r in range(rounds):
        for few in (on, 0) if r % 2 == 0 else (0, on):
            ops_moe.FEW_TOKENS = few
            eng.step()  # (the first step after a switch is not timed)
            for _ in range(9):
                t = time.perf_counter()
                eng.step()
                times[few].append(time.perf_counter() - t)
    ops_moe.FEW_TOKENS = on
    fast, loop = (statistics.median(times[k]) * 1e3 for k in (on, 0))
    print(f"{fmt}: engine decode steps of {seqs} sequences: few-token path {fast:.2f} ms "
          f"({seqs * 1e3 / fast:.1f} tok/s), loop {loop:.2f} ms ({seqs * 1e3 / loop:.1f} tok/s), "
          f"{loop / fast:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1], help="rows a step (<= 16)")
    ap.add_argument("--engine", type=int, default=0, metavar="N",
                    help="time whole engine steps of N sequences instead")  # fmt: skip
    ap.add_argument("--write-config", metavar="DIR", help="write the model's config.json, exit")
    ap.add_argument("--baseline", choices=("loop", "ops"), default="loop",
                    help="the per-expert loop, or the op-by-op few-token path")  # fmt: skip
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype; fp32 with the bf16 format: bf16-stored weights, as "
                         "--dtype auto on CPUs without native bf16")  # fmt: skip
    args = ap.parse_args(argv)
    if args.write_config:
        print(write_config(Path(args.write_config), args.layers, args.experts))
        return
    from qwen35.benchmarks.common import BenchOptions, load_bench_model
    from qwen35.layers.moe import SparseMoE
    from qwen35.ops import moe as ops_moe
    from qwen35.ops.backend import select_backend

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="qwen35-moe-")  # removed at exit
    path = write_config(Path(tmp.name), args.layers, args.experts)
    opts = BenchOptions(model=str(path), threads=args.threads, dtype=args.dtype)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    be = select_backend("cpu", dtype=dtype)
    for fmt in args.formats:
        plain = fmt == "bf16" and dtype == torch.bfloat16
        bm = load_bench_model(opts, quantization=None if plain else fmt)
        if args.engine:
            _engine_steps(bm, fmt, args.engine, args.rounds, ops_moe)
            continue
        blocks = [m for m in bm.model.modules() if isinstance(m, SparseMoE)]
        g = torch.Generator().manual_seed(0)
        for n in args.tokens:
            xs = [torch.randn(n, bm.config.hidden_size, generator=g).to(dtype) for _ in range(16)]
            on, times = ops_moe.FEW_TOKENS, {True: [], False: []}
            fused = SparseMoE.cpu_step, SparseMoE.cpu_routed
            with torch.inference_mode():
                for r in range(args.rounds + 4):
                    for few in (True, False) if r % 2 == 0 else (False, True):
                        if args.baseline == "loop":
                            ops_moe.FEW_TOKENS = on if few else 0
                        else:  # the C++ paths on or off
                            SparseMoE.cpu_step, SparseMoE.cpu_routed = fused if few else (
                                lambda self: None, lambda self, x: None)  # fmt: skip
                        t = time.perf_counter()
                        for b in blocks:
                            b(xs[r % len(xs)], be)
                        if r >= 4:  # the first rounds warm up
                            times[few].append(time.perf_counter() - t)
            ops_moe.FEW_TOKENS = on
            SparseMoE.cpu_step, SparseMoE.cpu_routed = fused
            fast, base = (statistics.median(times[k]) * 1e3 for k in (True, False))
            label = "per-expert loop" if args.baseline == "loop" else "op-by-op few-token path"
            print(f"{fmt}: {len(blocks)} MoE blocks at {n} token(s): few-token path {fast:.2f} ms, "
                  f"{label} {base:.2f} ms, {base / fast:.2f}x")  # fmt: skip
        del bm


if __name__ == "__main__":
    main()
