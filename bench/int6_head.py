"""lm_head GEMVs under int4: the int6 head (kernels/int6_cpu.cpp, 6.5 bits a weight) against the
per-row int8 head it replaced (kernels/gemv_cpu.cpp linear_int8, fp32 scales as on CPUs without
native bf16), calls alternating, medians.

    python bench/int6_head.py [--shapes 248320x1024,248320x2048] [--rows 1,4] [--rounds 8]
                              [--threads 2]
    python bench/int6_head.py --engine Qwen3.5-0.8B [--rounds 40]   # or a config.json
    python bench/int6_head.py --baseline REV --rows 1,4,8,16 --shapes 248320x2048,248320x4096

--baseline REV: the int6 kernel as of that git revision (its sources built beside this
checkout's) alternating with this checkout's, instead of the int8 head: ms per call of both,
REV / this time, and whether their outputs are the same bits.

--engine: whole batch-1 decode steps of that model under `--quantization int4` (random weights,
128-token prompt), its int6 head and an int8 head made of the int6 head's values swapped in
every 8 steps (the first step after a swap not timed), in one process: medians and int8 / int6.

Each head is larger than any cache (the 0.8B's: 248,320 x 1,024), so every call streams it from
memory, as a decode step does. Prints ms per call, GB/s of weight bytes (scales included) and
int8 / int6 time; on AVX512-VNNI CPUs also the int6 kernel's AVX2 path (what Zen 3 runs) and
AVX2 / VNNI time. Ratios only within one run (the VM's bandwidth drifts between minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    from qwen35.kernels import gemv
    from qwen35.quant import formats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="248320x1024,248320x2048")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", help="a catalog model or config.json: whole decode steps instead")
    ap.add_argument("--baseline", metavar="REV", help="this kernel against git revision REV's")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:
        return engine_steps(args)
    if args.baseline:
        return against_revision(args)
    m6, m8 = gemv.load_int6(), gemv.load()
    if m6 is None or m8 is None:
        raise SystemExit("the CPU kernels did not load (no compiler / AVX2, or QWEN35_NO_KERNELS=1)")
    vnni = m6.int6_vnni_supported()
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K, generator=g) * 0.05
        p, s = formats.quantize_int6_groups(w)
        q8, s8 = formats.quantize_int8_rows(w, torch.float32)
        del w
        b6, b8 = p.numel() + s.numel() * 2, q8.numel() + s8.numel() * 4
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, generator=g)
            t6, t8, t6a = [], [], []
            paths = [(m6.linear_int6, (x, p, s), t6), (m8.linear_int8, (x, q8, s8), t8)]
            if vnni:  # the AVX2 path beside the VNNI one (the same bits)
                paths.append((lambda *o: m6.linear_int6(*o, avx2_only=True), (x, p, s), t6a))
            for r in range(args.rounds):
                for fn, operands, ts in paths[:: 1 if r % 2 else -1]:
                    t = time.perf_counter()
                    fn(*operands)
                    ts.append(time.perf_counter() - t)
            a, b = statistics.median(t6), statistics.median(t8)
            line = (f"{N} x {K}, {M} row(s): int6 {a * 1e3:.2f} ms ({b6 / a / 1e9:.1f} GB/s), "
                    f"int8 {b * 1e3:.2f} ms ({b8 / b / 1e9:.1f} GB/s), int8 / int6 time {b / a:.2f}")
            if t6a:
                c = statistics.median(t6a)
                line += f"; int6 AVX2 path {c * 1e3:.2f} ms, AVX2 / VNNI time {c / a:.2f}"
            print(line)


def against_revision(args) -> None:
    import tempfile

    from qwen35.benchmarks.common import kernel_sources_at
    from qwen35.kernels import gemv
    from qwen35.quant import formats

    with tempfile.TemporaryDirectory() as tmp:
        base = gemv.INT6.from_folder(kernel_sources_at(args.baseline, tmp)).load()
    new = gemv.load_int6()
    if base is None or new is None:
        raise SystemExit("the int6 kernels did not build here")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        p, s = formats.quantize_int6_groups(torch.randn(N, K, generator=g) * 0.05)
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, generator=g)
            same = torch.equal(new.linear_int6(x, p, s), base.linear_int6(x, p, s))
            ts: dict[str, list[float]] = {"new": [], "base": []}
            for r in range(args.rounds):
                for name, mod in (("new", new), ("base", base))[:: 1 if r % 2 else -1]:
                    t = time.perf_counter()
                    mod.linear_int6(x, p, s)
                    ts[name].append(time.perf_counter() - t)
            a, b = statistics.median(ts["new"]), statistics.median(ts["base"])
            print(f"{N} x {K}, {M} row(s): {a * 1e3:.2f} ms, {args.baseline} {b * 1e3:.2f} ms, "
                  f"{args.baseline} / this {b / a:.2f}, same bits: {same}")  # fmt: skip


def engine_steps(args) -> None:
    from qwen35.benchmarks.common import BenchOptions, load_bench_model, make_engine
    from qwen35.quant.layers import Int6Linear, Int8Linear
    from qwen35.request import SamplingParams

    bm = load_bench_model(BenchOptions(model=args.engine, threads=args.threads),
                          quantization="int4")  # fmt: skip
    model = bm.model
    heads = {"int6": model.lm_head}
    if not isinstance(heads["int6"], Int6Linear):
        raise SystemExit(f"{args.engine}: its int4 head is not int6 (hidden size not a multiple of 64)")
    heads["int8"] = Int8Linear.quantize(heads["int6"].dequantized(torch.float32), model.dtype)
    steps = 9 * args.rounds + 5
    eng = make_engine(bm, max_num_seqs=1, max_model_len=128 + steps + 16, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    vocab = model.config.vocab_size
    eng.add_request("r", [(7 * i + 2) % vocab for i in range(128)], sp)
    for _ in range(5):
        eng.step()
    ts: dict[str, list[float]] = {"int6": [], "int8": []}
    for r in range(args.rounds):
        name = ("int6", "int8")[r % 2]
        model.lm_head = heads[name]
        eng.step()
        for _ in range(8):
            t = time.perf_counter()
            eng.step()
            ts[name].append(time.perf_counter() - t)
    model.lm_head = heads["int6"]
    a, b = statistics.median(ts["int6"]), statistics.median(ts["int8"])
    print(f"{args.engine} int4 decode step: int6 head {a * 1e3:.2f} ms, int8 head {b * 1e3:.2f} ms, "
          f"int8 / int6 {b / a:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
