"""xgrammar vs llguidance on the real Qwen 3.5 vocabulary (248,077 tokens, model vocab 248,320).

Measures, for each library, in one process and one run:
- vocabulary build (once per process);
- compile time of a typical tool-call schema: cold (first schema after the vocabulary) and
  again (a new schema of the same shape, the library's own caches warm);
- per-token mask time at batch 1 and batch 32: B matchers walk a whole JSON document token by
  token; at each position the [B, V/32] bitmask is filled for all B, then each takes the token
  (what the grammar side of one decode step costs), averaged over the document's tokens.

xgrammar requires `triton` on Linux, which must not enter this environment, so it is measured
from a side directory: `pip install --no-deps --target DIR xgrammar apache-tvm-ffi`, then
`python bench/grammar_engines.py --xgrammar-path DIR`. Without it only llguidance is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "hourly": {"type": "boolean"},
        "fields": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# a valid compact document (both libraries compile without free whitespace)
DOC = '{"city":"Paris, Ile-de-France","unit":"celsius","days":3,"hourly":true,"fields":["wind"]}'
VOCAB = 248320


def schema_variant(i: int) -> dict:
    s = json.loads(json.dumps(SCHEMA))
    s["properties"][f"extra_{i}"] = {"type": "number", "minimum": 0}
    return s


def timed(fn, reps: int = 1) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_llguidance(tok, reps: int) -> dict:
    import llguidance

    from qwen35.engine.structured.compiler import build_ll_tokenizer

    t0 = time.perf_counter()
    ll = build_ll_tokenizer(tok, VOCAB)
    vocab_s = time.perf_counter() - t0

    def compile_(schema):
        g = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        m = llguidance.LLMatcher(ll, g)
        assert not m.is_error(), m.get_error()
        return m

    cold = timed(lambda: compile_(SCHEMA))
    again = statistics.median(timed(lambda i=i: compile_(schema_variant(i))) for i in range(5))
    doc = tok.encode(DOC)
    ex = llguidance.LLExecutor()
    out = {"vocab_build_s": vocab_s, "compile_cold_ms": cold * 1e3, "compile_ms": again * 1e3}
    for b in (1, 32):
        ms = [compile_(SCHEMA) for _ in range(b)]
        mask = torch.full((b, (VOCAB + 31) // 32), -1, dtype=torch.int32)

        def walk(ms=ms, mask=mask, b=b):
            for m in ms:
                m.reset()
            for t in doc:  # a mask at every position of a real document, then its token
                pairs = [(m, i) for i, m in enumerate(ms)]
                ex.unsafe_compute_mask_ptr(pairs, mask.data_ptr(), mask.shape[1] * 4, b)
                for m in ms:
                    assert m.consume_token(t)

        walk()
        out[f"mask_b{b}_ms"] = statistics.median(timed(walk) for _ in range(reps)) / len(doc) * 1e3
    return out


def bench_xgrammar(tok, reps: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    enc = [tok.token_bytes(i) or b"" for i in range(VOCAB)]
    info = xgr.TokenizerInfo(
        enc, vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB, stop_token_ids=[248046]
    )
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    vocab_s = time.perf_counter() - t0
    cold = timed(
        lambda: compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
        )
    )
    again = statistics.median(
        timed(
            lambda i=i: compiler.compile_json_schema(
                json.dumps(schema_variant(i)), any_whitespace=False, separators=(",", ":")
            )
        )
        for i in range(5)
    )
    cg = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                      separators=(",", ":"))  # fmt: skip
    doc = tok.encode(DOC)
    out = {"vocab_build_s": vocab_s, "compile_cold_ms": cold * 1e3, "compile_ms": again * 1e3}
    for b in (1, 32):
        ms = [xgr.GrammarMatcher(cg) for _ in range(b)]
        mask = xgr.allocate_token_bitmask(b, VOCAB)

        def walk(ms=ms, mask=mask):
            for m in ms:
                m.reset()
            for t in doc:
                for i, m in enumerate(ms):
                    m.fill_next_token_bitmask(mask, i)
                for m in ms:
                    assert m.accept_token(t)

        walk()
        out[f"mask_b{b}_ms"] = statistics.median(timed(walk) for _ in range(reps)) / len(doc) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xgrammar-path", help="directory with xgrammar installed (--no-deps)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from qwen35.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    rows = {"llguidance": bench_llguidance(tok, args.reps)}
    if args.xgrammar_path:
        sys.path.insert(0, args.xgrammar_path)
        rows["xgrammar"] = bench_xgrammar(tok, args.reps)
    cols = ["vocab_build_s", "compile_cold_ms", "compile_ms", "mask_b1_ms", "mask_b32_ms"]
    print("| library | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
