"""`qwen35 plan --dtype int8 | int4` without a GPU: the weight-only formats on a CPU (with
`--gpu` the GPU planner plans them: planner.py). Per model: the bytes the engine holds (text model, as it loads) in BF16 and in the chosen
format, the memory loading needs on the way (`load_peak_bytes`), and the bytes one batch-1
decode step reads (all weights but the embedding rows not looked up), from the same byte
formulas the quantizing loader is tested against (`plan.params.tensor_bytes`). No torch.
"""

from __future__ import annotations

from qwen35.config import ModelConfig
from qwen35.engine.config import CacheConfig, SchedulingConfig
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
    """One row per model in `dtype` ("int8" / "int4", or "bf16": the model as stored, with the
    head screen) beside its BF16 form (bytes_of: as decode_read_bytes'; the BF16 columns always
    count 2 bytes a weight: a checkpoint's BF16 form)."""
    rows = []
    for c in cfgs:
        screen = head_screen_bytes(c)
        head = c.vocab_size * c.hidden_size * 2  # the bf16 head the screen stands in for
        bf16_read = decode_read_bytes(c, "bf16")
        bf16 = weight_bytes(c, "bf16", text_only=True) + screen  # (loaded as stored: its peak)
        row = {
            "name": c.name,
            "weights_bytes": {"bf16": bf16},  # as the engine holds them (bf16: with the screen)
            "load_peak_bytes": {"bf16": bf16},
            "head_screen_bytes": screen,
            "decode_read_bytes_per_token": {"bf16": bf16_read,
                                            "bf16_greedy": bf16_read - head + screen},
        }  # fmt: skip
        if dtype != "bf16":
            row["weights_bytes"][dtype] = text_bytes(c, dtype, bytes_of)
            row["load_peak_bytes"] = {dtype: load_peak_bytes(c, dtype, bytes_of)}
            row["decode_read_bytes_per_token"][dtype] = decode_read_bytes(c, dtype, bytes_of)
        rows.append(row)
    return rows


def memory_fit(cfg: ModelConfig, weights: int, memory: int, context: int, batch: int,
               chunk: int, kv_dtype: str = "bf16", state_dtype: str | None = None) -> dict:
    """What a CPU engine given `memory` bytes (`qwen35 serve --max-memory`) holds beside these
    weights, sized by the engine's own function (engine/cache_sizing.py plan_caches: working
    memory of a `chunk`-token step, a DeltaNet state per sequence, prefix-cache checkpoints, KV
    blocks with the rest; caches in BF16 or `kv_dtype`): whether `batch` sequences of `context`
    tokens fit, the longest context `batch` sequences can each have, and how many sequences of
    `context` tokens the cache holds at once."""
    from qwen35.engine.cache_sizing import plan_caches, size_str
    from qwen35.errors import Qwen35Error

    def caches(seqs: int, length: int | None):
        return plan_caches(cfg, model_dtype="bfloat16", device="cpu", max_memory=memory,
                           max_num_seqs=seqs, max_num_batched_tokens=chunk,
                           block_size=CacheConfig().block_size,
                           max_model_len=length, enable_prefix_caching=True,
                           prefix_cache_memory=None, weight_bytes=weights, kv_dtype=kv_dtype,
                           state_dtype=state_dtype)  # fmt: skip

    out = {"memory_bytes": memory, "context": context, "batch": batch}
    try:
        whole = caches(batch, None)  # as large as the memory allows
    except Qwen35Error as e:
        return out | {"fits": False, "reason": str(e), "max_context": 0, "max_concurrency": 0}
    out["kv_bytes_per_token"] = whole.kv_bytes_per_token
    out["state_bytes_per_sequence"] = whole.state_bytes_per_sequence
    out["prefix_checkpoints"] = whole.num_checkpoint_slots  # (--prefix-cache-memory: more)
    # the longest context each of `batch` sequences can have at once
    out["max_context"] = (min(whole.max_model_len, whole.kv_tokens // batch)
                          if whole.num_state_slots >= batch else 0)  # fmt: skip
    try:  # sequences of `context` tokens at once, with the engine's default slots (or more)
        at = caches(max(batch, SchedulingConfig().max_num_seqs), context)
        out["max_concurrency"] = min(at.num_state_slots, at.kv_tokens // context)
    except Qwen35Error:
        out["max_concurrency"] = 0
    out["fits"] = out["max_context"] >= context
    out["reason"] = None if out["fits"] else (
        f"{batch} sequence(s) of {context:,} tokens need {batch * context:,} KV tokens and "
        f"{batch} DeltaNet state slots; {size_str(memory)} leaves room for "
        f"{whole.kv_tokens:,} tokens and {whole.num_state_slots} slots")  # fmt: skip
    return out


def serve_command(model: str, dtype: str, memory_gib: float, context: int, batch: int,
                  chunk: int, kv_dtype: str, state_dtype: str | None) -> str:
    """The `qwen35 serve` line that runs what memory_fit planned (text only: the plan counts the
    text model; the format named even where it is a GGUF file's default)."""
    fmt = "--dtype bf16" if dtype == "bf16" else f"--quantization {dtype}"
    cmd = f"qwen35 serve --model {model} {fmt}"
    cmd += (f" --text-only --max-memory {memory_gib:g}GiB --max-model-len {context}"
            f" --max-num-seqs {batch}")  # fmt: skip
    if chunk != SchedulingConfig().max_num_batched_tokens:
        cmd += f" --max-num-batched-tokens {chunk}"
    if kv_dtype == "fp8":
        cmd += " --kv-cache-dtype fp8"
    if state_dtype == "bf16":
        cmd += " --mamba-ssm-cache-dtype bf16"
    return cmd


def _render_memory(rows: list[dict], dtype: str) -> None:
    from rich.console import Console
    from rich.table import Table

    m0 = rows[0]["memory"]
    ctx, b, gib = m0["context"], m0["batch"], m0["memory_bytes"] / 2**30
    t = Table(title=f"CPU engine given {gib:g} GiB (serve --max-memory): {b} x {ctx:,} tokens")
    slots = SchedulingConfig().max_num_seqs
    cols = ["model", f"{dtype} GiB", "KV KiB/token", "state MiB/seq", f"{b} x {ctx:,}",
            f"max context x {b}", f"seqs @ {ctx:,} ({slots} slots)"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
    for r in rows:
        m = r["memory"]
        kv, st = m.get("kv_bytes_per_token"), m.get("state_bytes_per_sequence")
        t.add_row(r["name"], f"{r['weights_bytes'][dtype] / 2**30:.2f}",
                  "-" if kv is None else f"{kv / 1024:.1f}",
                  "-" if st is None else f"{st / 2**20:.2f}", "fits" if m["fits"] else "no",
                  f"{m['max_context']:,}", f"{m['max_concurrency']:,}")  # fmt: skip
    Console().print(t)
    for r in rows:
        m = r["memory"]
        print(f"  {m['serve']}" if m["fits"] else f"{r['name']}: {m['reason']}")
        if m["fits"]:  # few checkpoints: prefixes are recomputed more often (README, Hybrid...)
            print(f"    prefix cache: {m['prefix_checkpoints']} DeltaNet state checkpoints of "
                  f"{m['state_bytes_per_sequence'] / 2**20:.0f} MiB (--prefix-cache-memory for more)")
    print("Sized as the engine sizes its caches (engine/cache_sizing.py): weights, one step's "
          "working memory (--chunk), a DeltaNet state per sequence, prefix-cache checkpoints (a "
          "quarter of the rest), KV blocks with what is left; caches in BF16 (--kv-dtype fp8 "
          "halves KV). The text model (--text-only: a vision tower adds its BF16 weights).")


def render(rows: list[dict], dtype: str, bandwidth_gb_s: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    quant = dtype != "bf16"  # (bf16: the model as stored, one set of columns)
    kind = f"weight-only {dtype}" if quant else "BF16"
    t = Table(title=f"CPU {kind}: text model as the engine loads it (GiB = 2^30 B)")
    files = [r.get("file") for r in rows]
    cols = ["model"] + ["file GiB"] * any(files) + ["BF16 GiB"]
    cols += [f"{dtype} GiB", "load peak GiB"] * quant + ["read/token BF16 (greedy)"]
    cols += [f"read/token {dtype}"] * quant
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
        cells.append(f"{w['bf16'] / 2**30:.2f}")
        if quant:
            cells += [f"{w[dtype] / 2**30:.2f}", f"{r['load_peak_bytes'][dtype] / 2**30:.2f}"]
        cells += [f"{rd['bf16'] / 2**30:.2f} ({rd['bf16_greedy'] / 2**30:.2f})"]
        cells += [f"{rd[dtype] / 2**30:.2f}"] * quant
        if bandwidth_gb_s:
            cells.append(f"{bandwidth_gb_s * 1e9 / rd[dtype]:.1f}")
        t.add_row(*cells)
    Console().print(t)
    if rows and rows[0].get("memory"):
        _render_memory(rows, dtype)
    if not quant:
        print("BF16: the weights as stored, with the int8 screen of lm_head a CPU engine keeps "
              "for greedy and top-k requests (read instead of the head: the greedy figure; "
              "--no-head-screen drops it); --dtype int8 | int4 for the weight-only formats.")
        return
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
