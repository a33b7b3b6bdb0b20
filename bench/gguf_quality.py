"""How closely each way of holding a GGUF file's weights follows the file: the logits of random
token sequences from the file's exact values (fp32, dequantized by the gguf package) against
ours in int4 (--gguf-int4 keep, and requantize), int8 and bf16, and llama.cpp running the file
(llama-cpp-python, when installed): mean KL(file || other) over all positions and top-1
agreement.

    python bench/gguf_quality.py MODEL.gguf [--seqs 4] [--len 128] [--vocab 200000]
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--len", type=int, default=128, help="tokens a sequence")
    ap.add_argument("--vocab", type=int, default=200_000, help="ids drawn below this")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from qwen35.loader import load_model

    rng = np.random.default_rng(1)
    seqs = [[int(x) for x in rng.integers(100, args.vocab, args.len)] for _ in range(args.seqs)]

    def ours(quantization=None, dtype="fp32", gguf_int4="keep"):
        m = load_model(args.file, dtype=dtype, quantization=quantization, gguf_int4=gguf_int4)
        out = []
        with torch.no_grad():
            for s in seqs:
                o = m(torch.tensor([s]))
                out.append(getattr(o, "logits", o)[0].float())
        return torch.cat(out)

    def llama():
        import llama_cpp

        llm = llama_cpp.Llama(model_path=args.file, n_ctx=args.len + 8, logits_all=True,
                              verbose=False)  # fmt: skip
        out = []
        for s in seqs:
            llm.reset()
            llm.eval(s)
            out.append(torch.tensor(np.array(llm.scores[: len(s)])))
        return torch.cat(out)

    ref = ours()
    runs = {
        "int4 keep": lambda: ours("int4"),
        "int4 keep, bf16": lambda: ours("int4", "bf16"),
        "int4 requantize": lambda: ours("int4", gguf_int4="requantize"),
        "int8": lambda: ours("int8"),
        "bf16": lambda: ours(None, "bf16"),
        "llama.cpp": llama,
    }
    doc = {"file": args.file, "positions": args.seqs * args.len}
    for name, run in runs.items():
        try:
            x = run()
        except ImportError as e:
            doc[name] = f"skipped: {e}"
            continue
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(x.float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == x.argmax(-1)).float().mean().item()
        doc[name] = {"mean_kl": float(f"{kl:.3g}"), "top1": round(top1, 3)}
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
