"""Memory of loading a model quantized (`--quantization int8 | int4 | fp8`), against the plan:
the peak while loading and what stays once loaded, from the process's anonymous memory (Linux
`/proc/self/status` RssAnon, sampled every few ms: memory-mapped checkpoint pages are not
counted), beside `qwen35 plan --dtype int8 | int4`'s weights and load peak.

    python bench/load_memory.py MODEL_DIR --quantization int4
    python bench/load_memory.py Qwen3.5-35B-A3B --random --quantization int4   # 24 GiB is enough

Each module is quantized as soon as its tensors are read (quant/apply.py QuantizeOnRead), so
the peak is the quantized model plus the largest module in BF16, not the BF16 model.
One load per process (a second would start from the first's heap).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from qwen35.heap import proc_bytes

GiB = 2**30


def rss_anon() -> int | None:
    return proc_bytes("/proc/self/status", "RssAnon")


class PeakSampler:
    """The largest RssAnon seen while alive (a thread polling every `every` seconds)."""

    def __init__(self, every: float = 0.005):
        self.peak, self.every, self._stop = rss_anon() or 0, every, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon() or 0)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, rss_anon() or 0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory, or a catalog name / config.json with --random")
    ap.add_argument("--quantization", choices=["int8", "int4", "fp8"], default="int4")
    ap.add_argument("--random", action="store_true", help="random weights (no checkpoint)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None, help="write the result as JSON")
    args = ap.parse_args(argv)
    if rss_anon() is None:
        raise SystemExit("needs Linux's /proc/self/status (RssAnon)")
    from qwen35.loader import load_model, peek_config
    from qwen35.plan.cpu import load_peak_bytes
    from qwen35.plan.params import weight_bytes

    fmt = "random" if args.random else "auto"
    base = rss_anon()
    sampler = PeakSampler()
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, device="cpu", load_format=fmt,
                       quantization=args.quantization, progress=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    peak, loaded = sampler.stop(), rss_anon()
    cfg = peek_config(args.model, fmt)
    out = {
        "model": cfg.name, "quantization": args.quantization, "seconds": seconds,
        "before_bytes": base, "peak_bytes": peak, "loaded_bytes": loaded,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "plan_weights_bytes": weight_bytes(cfg, args.quantization, text_only=True),
        "plan_load_peak_bytes": (load_peak_bytes(cfg, args.quantization)
                                 if args.quantization != "fp8" else None),
        "notes": model.load_report.notes,
    }  # fmt: skip
    plan_peak = out["plan_load_peak_bytes"]
    print(f"{cfg.name} -> {args.quantization} in {seconds:.0f} s; anonymous memory (GiB): before "
          f"{base / GiB:.2f}, peak {peak / GiB:.2f}, loaded {loaded / GiB:.2f}; the model's "
          f"weights {out['weights_bytes'] / GiB:.2f} (plan {out['plan_weights_bytes'] / GiB:.2f}"
          + (f", plan's load peak {plan_peak / GiB:.2f})" if plan_peak else ")"))  # fmt: skip
    for note in out["notes"]:
        print("  " + note)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
