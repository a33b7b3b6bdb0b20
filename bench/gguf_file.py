"""One GGUF file, two engines: qwen35 (`--model FILE.gguf`, the storage `--dtype auto` picks for
it on this CPU, or --quantization) against llama.cpp (llama-cpp-python) running the very same
file. Batch-1 prefill of a random prompt and greedy decode, rounds interleaved (llama.cpp first in
odd rounds), decode steps alternated one by one (peers.interleaved_steps); medians. Also the
first load (model directory from the metadata, then the weights) and the file's type.

    python bench/gguf_file.py MODEL.gguf                      # e.g. a Q4_K_M or Q8_0 file
    python bench/gguf_file.py MODEL.gguf --prompt 512 --tokens 64 --rounds 5 --quantization int8

A random-weight file to try it on: tests/gguf_writer.py writes one from a checkpoint directory
(bench's peers workload writes one for any catalog config); llama.cpp's llama_model_quantize turns
it into Q4_K_M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a qwen35 / qwen35moe GGUF file")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded a round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quantization", default=None, help="ours: instead of the file's default")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gguf-int4", default="keep", choices=("keep", "requantize"),
                    help="ours under int4: keep the file's 4-bit values, or "
                         "requantize")  # fmt: skip
    args = ap.parse_args(argv)

    import numpy as np

    from qwen35.benchmarks.common import request_steps
    from qwen35.benchmarks.gguf import LlamaRunner
    from qwen35.benchmarks.peers import interleaved_steps
    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.gguf_checkpoint import file_type, model_dir, shard_paths

    path = Path(args.file).expanduser().resolve()
    t0 = time.perf_counter()
    d = model_dir(path)
    t_dir = time.perf_counter() - t0
    max_len = args.prompt + args.tokens + 16
    opts = {"gguf_int4": args.gguf_int4}
    if args.quantization is not None:
        opts["quantization"] = args.quantization
    t0 = time.perf_counter()
    ours = LLMEngine(str(path), max_num_seqs=1, max_model_len=max_len, enable_prefix_caching=False,
                     verbose=False, **opts)  # fmt: skip
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    llama = LlamaRunner(path, max_len, args.threads)
    t_llama = time.perf_counter() - t0
    vocab = ours.model.config.vocab_size
    rng = np.random.default_rng(0)
    res: dict[str, dict[str, list[float]]] = {"qwen35": {}, "llama.cpp": {}}

    def ours_steps(prompt, rid):
        run = request_steps(ours, prompt, args.tokens, rid)
        t = 0.0
        for dt, tokens in run:
            t += dt
            if tokens:
                break
        res["qwen35"].setdefault("prefill", []).append(args.prompt / t)
        for dt, _ in run:
            yield dt

    def llama_steps(prompt):
        llama.llm.reset()
        t = time.perf_counter()
        llama.llm.eval(prompt)
        res["llama.cpp"].setdefault("prefill", []).append(
            args.prompt / (time.perf_counter() - t))  # fmt: skip
        yield from llama._decode(prompt[-1], args.tokens - 1)

    for r in range(args.rounds):
        prompt = [int(x) for x in rng.integers(100, min(vocab, 200_000), args.prompt)]
        runs = [ours_steps(prompt, f"r{r}"), llama_steps(prompt)]
        order = ["qwen35", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "qwen35"]
        times = interleaved_steps(runs if order[0] == "qwen35" else runs[::-1])
        if order[0] != "qwen35":
            times = times[::-1]
        for name, steps in zip(["qwen35", "llama.cpp"], times, strict=True):
            res[name].setdefault("decode", []).append(len(steps) / sum(steps))
    doc = {
        "file": path.name,
        "file_type": file_type(shard_paths(path)),
        "file_gib": round(sum(p.stat().st_size for p in shard_paths(path)) / 2**30, 3),
        "ours_storage": getattr(ours.model, "quantization", None) or str(ours.model.dtype),
        "gguf_int4": args.gguf_int4,
        "first_model_dir_s": round(t_dir, 2),
        "load_s": {"qwen35": round(t_load, 2), "llama.cpp": round(t_llama, 2)},
        "model_dir": str(d),
        "prompt": args.prompt,
        "tokens": args.tokens,
        "rounds": {k: {m: [round(x, 2) for x in v] for m, v in r.items()} for k, r in res.items()},
        "median": {k: {m: round(statistics.median(v), 2) for m, v in r.items()}
                   for k, r in res.items()},  # fmt: skip
    }
    doc["ratio_ours_over_llama_cpp"] = {
        m: round(doc["median"]["qwen35"][m] / doc["median"]["llama.cpp"][m], 3)
        for m in ("prefill", "decode")
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
