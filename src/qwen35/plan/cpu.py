"""`qwen35 plan --dtype int8 | int4`: weight-only CPU formats, which the GPU planner does not
serve. Per model: the bytes the engine holds (text model, as it loads) in BF16 and in the chosen
format, the memory loading needs on the way (`load_peak_bytes`), and the bytes one batch-1
decode step reads (all weights but the embedding rows not looked up), from the same byte
formulas the quantizing loader is tested against (`plan.params.tensor_bytes`). No torch.
"""

from __future__ import annotations

from qwen35.config import ModelConfig
from qwen35.plan.params import tensor_bytes, text_tensors, weight_bytes

SCHEMA = "qwen35.plan-cpu/1"


def decode_read_bytes(cfg: ModelConfig, dtype: str, bytes_of=tensor_bytes) -> int:
    """Weight bytes a batch-1 decode step reads: every text tensor except an untied input
    embedding (only one row of it is read); MoE reads only the routed top-k experts. bytes_of:
    a tensor's bytes in a dtype (plan.gguf: as a GGUF file's tensors load)."""
    total = 0
    for t in text_tensors(cfg):
        if t.embedding:
            continue
        b = bytes_of(t, dtype)
        if t.expert and cfg.is_moe:
            b = b * cfg.num_experts_per_tok // cfg.num_experts
        total += b
    return total


def head_screen_bytes(cfg: ModelConfig) -> int:
    """The int8 screen of lm_head a CPU engine keeps beside an fp32 / bf16 head (models/
    head_screen.py: int8 [V, H] and four fp32 [V] vectors); greedy and top-k decode steps read it
    instead of the head (`--no-head-screen`: neither)."""
    return cfg.vocab_size * (cfg.hidden_size + 16)


def largest_module_bytes(cfg: ModelConfig) -> int:
    """BF16 bytes of the largest module the loader quantizes at once (quant/apply.py
    QuantizeOnRead): one layer's routed experts (gate, up and down of every expert), the
    embedding table or the head, or the largest single projection."""
    text = text_tensors(cfg)
    one = max(t.numel * 2 for t in text if t.fp8 or t.split == "vocab")
    if cfg.is_moe:
        layers = cfg.num_hidden_layers
        one = max(one, sum(t.params * 2 for t in text if t.expert) // layers)
    return one


def load_peak_bytes(cfg: ModelConfig, dtype: str, bytes_of=tensor_bytes) -> int:
    """Memory while loading to `dtype` (int8 / int4) on one device: the quantized model plus the
    largest module in BF16 (each module is quantized as soon as its tensors arrive)."""
    return text_bytes(cfg, dtype, bytes_of) + largest_module_bytes(cfg)


def text_bytes(cfg: ModelConfig, dtype: str, bytes_of=tensor_bytes) -> int:
    """The text model's weight bytes in `dtype` (weight_bytes(text_only=True); bytes_of: as
    decode_read_bytes')."""
    return sum(bytes_of(t, dtype) for t in text_tensors(cfg))


def cpu_rows(cfgs: list[ModelConfig], dtype: str, bytes_of=tensor_bytes) -> list[dict]:
    """One row per model (bytes_of: as decode_read_bytes'; the BF16 columns always count 2 bytes
    a weight: a checkpoint's BF16 form)."""
    rows = []
    for c in cfgs:
        screen = head_screen_bytes(c)
        head = c.vocab_size * c.hidden_size * 2  # the bf16 head the screen stands in for
        bf16_read = decode_read_bytes(c, "bf16")
        rows.append({
            "name": c.name,
            "weights_bytes": {  # as the engine holds them (bf16: with the screen)
                "bf16": weight_bytes(c, "bf16", text_only=True) + screen,
                dtype: text_bytes(c, dtype, bytes_of),
            },
            "load_peak_bytes": {dtype: load_peak_bytes(c, dtype, bytes_of)},
            "head_screen_bytes": screen,
            "decode_read_bytes_per_token": {
                "bf16": bf16_read,
                "bf16_greedy": bf16_read - head + screen,
                dtype: decode_read_bytes(c, dtype, bytes_of),
            },
        })  # fmt: skip
    return rows


def render(rows: list[dict], dtype: str, bandwidth_gb_s: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"CPU weight-only {dtype}: text model as the engine loads it (GiB = 2^30 B)")
    files = [r.get("file") for r in rows]
    cols = ["model"] + ["file GiB"] * any(files)
    cols += ["BF16 GiB", f"{dtype} GiB", "load peak GiB", "read/token BF16 (greedy)",
             f"read/token {dtype}"]  # fmt: skip
    if bandwidth_gb_s:
        cols += [f"decode tok/s at {bandwidth_gb_s:g} GB/s (roofline)"]
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
    for r in rows:
        w, rd = r["weights_bytes"], r["decode_read_bytes_per_token"]
        cells = [r["name"]]
        if any(files):
            f = r.get("file")
            cells.append(f"{f['bytes'] / 2**30:.2f} ({f['type']})" if f else "")
        cells += [f"{w['bf16'] / 2**30:.2f}", f"{w[dtype] / 2**30:.2f}",
                  f"{r['load_peak_bytes'][dtype] / 2**30:.2f}"]  # fmt: skip
        cells += [f"{rd['bf16'] / 2**30:.2f} ({rd['bf16_greedy'] / 2**30:.2f})"]
        cells += [f"{rd[dtype] / 2**30:.2f}"]
        if bandwidth_gb_s:
            cells.append(f"{bandwidth_gb_s * 1e9 / rd[dtype]:.1f}")
        t.add_row(*cells)
    Console().print(t)
    gguf = any(files)
    if gguf and dtype == "int4":
        what = ("in int4 as the file has them: its Q4_0 / Q4_1 / Q4_K tensors kept in groups of "
                "32, types of more than 5 bits a weight in int8, others in groups of 128")
    elif dtype == "int4":
        what = "in int4 (groups of 128, out % 64 == 0; else int8)"
    else:
        what = "in int8"
    print(
        f"{dtype}: attention / DeltaNet / MLP / expert projections {what}"
        + ("; lm_head (a tied embedding with it) int6 in groups of 32, an untied embedding per-row int8"
           if dtype == "int4" else "; embedding and lm_head per-row int8")
        + "; norms, routers, in_proj_a/b, conv stay BF16. "
        + ("Run with `--model FILE.gguf`"
           + (" (`--gguf-int4 requantize`: groups of 128 throughout, as the plan of the model's "
              "name)" if dtype == "int4" else "")
           + "; BF16 columns: its BF16 form, as a GPU holds it." if gguf
           else f"Run with `--quantization {dtype}`.")
    )  # fmt: skip
    print(
        "Load peak: each module is quantized as soon as its tensors are read, so loading holds "
        "the quantized model and the largest module in BF16 (a MoE layer's experts, or the "
        "embedding table), never the whole BF16 model."
    )
    print(
        "BF16 includes the int8 screen of lm_head a CPU engine keeps for greedy and top-k "
        "requests (read instead of the head: the greedy figure); --no-head-screen drops it."
    )
