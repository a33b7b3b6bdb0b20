"""Rich tables for a `qwen35 bench` document (see runner.py for its schema)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _f(x, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def _x(x) -> str:
    return _f(x, ".2f", "x")


def _pct(x) -> str:
    return _f(None if x is None else 100 * x, ".0f", "%")


def print_report(doc: dict, console: Console | None = None) -> None:
    con = console or Console()
    print_header(doc, con)
    for key in doc["workloads"]:
        print_workload(doc, key, con)


def print_header(doc: dict, con: Console) -> None:
    sysinfo = doc["system"]
    weights = "random weights" if doc["random_weights"] else "checkpoint weights"
    dtype = doc.get("weights", doc["dtype"])  # (documents before "weights" have the dtype only)
    con.print(
        f"[bold]qwen35 bench[/bold]: {doc['model']} ({weights}, {dtype}, "
        f"{doc['num_params'] / 1e9:.2f}B parameters, {doc['weight_bytes'] / 2**30:.2f} GiB) on "
        f"{sysinfo['cpu']}, {sysinfo['torch_threads']} threads, torch {sysinfo['torch']}, "
        f"transformers {sysinfo.get('transformers')}{_impl(doc)}; "
        f"load average {sysinfo['load_average']} -> "
        f"{sysinfo.get('load_average_end', '...')}" + (" [quick sizes]" if doc["quick"] else "")
    )


def _impl(doc: dict) -> str:
    impl = doc.get("baseline_implementation")
    return f" ({impl})" if impl else ""


def print_workload(doc: dict, key: str, con: Console) -> None:
    printers = {
        "decode": _decode,
        "throughput": _throughput,
        "long_context": _long_context,
        "multi_turn": _multi_turn,
        "dtype": _dtype,
        "structured": _structured,
        "vision": _vision,
        "quality": _quality,
        "peers": _peers,
        "tp": _tp,
        "spec": _spec,
        "serve": _serve,
    }
    printers[key](con, doc["workloads"][key], _impl(doc))


def _vision(con: Console, d: dict, impl: str = "") -> None:
    t = Table(
        title=f"Images: encoder ({d['encoder_images']} x {d['encoder_image_side']}px) and TTFT of "
        f"a chat with one {d['chat_image_side']}px image ({d['prompt_tokens']} prompt tokens), "
        f"median of {d['rounds']} interleaved rounds"
    )
    for c in ("", "encoder images/s", "TTFT s"):
        t.add_column(c, justify="right")
    o, h = d["ours"], d["transformers"]
    t.add_row("ours", _f(o["encoder_images_per_s"]), _f(o["ttft_s"]))
    t.add_row("transformers" + impl, _f(h["encoder_images_per_s"]), _f(h["ttft_s"]))
    t.add_row("speedup", _f(d["encoder_speedup"]), _f(d["ttft_speedup"]))
    con.print(t)


def _decode(con: Console, d: dict, impl: str) -> None:
    n = d.get("tensor_parallel_size", 1)
    t = Table(
        title=f"Batch-1 decode (prompt {d['prompt_len']}, {d['new_tokens']} new tokens, "
        f"median of {d['ours']['num_steps_timed']} steps over {d['rounds']} rounds)"
        + (f"; qwen35 on {n} tensor-parallel ranks" if n > 1 else "")
        + (f"; qwen35 runs {k} decode steps a scheduling round"
           if (k := d["ours"].get("num_scheduler_steps", 1)) > 1 else "")  # fmt: skip
    )
    for c in ("", "ms / token", "tokens/s", "prefill s", "vs transformers", "of roofline"):
        t.add_column(c, justify="right")
    roof = d["roofline_tokens_per_s"]
    o, h = d["ours"], d["transformers"]
    t.add_row(
        "qwen35",
        _f(o["ms_per_token"], ".2f"),
        _f(o["tokens_per_s"]),
        _f(o["prefill_s"]),
        _x(d["speedup_vs_transformers"]),
        _pct(d["fraction_of_roofline"]),
    )
    if (one := d.get("single_step")) is not None:  # --scheduler-steps K: the same, single steps
        t.add_row(
            "qwen35, single steps",
            _f(one["ms_per_token"], ".2f"),
            _f(one["tokens_per_s"]),
            "",
            f"multi-step {_x(d['multi_step_speedup'])}",
            _pct(one["tokens_per_s"] / roof),
        )
    if h:
        t.add_row(
            f"transformers{impl}",
            _f(h["ms_per_token"], ".2f"),
            _f(h["tokens_per_s"]),
            _f(h["prefill_s"]),
            "1.00x",
            _pct(h["tokens_per_s"] / roof),
        )
    b = d["bytes_per_step"]
    t.add_row(
        "roofline",
        _f(1e3 / roof, ".2f"),
        _f(roof),
        "",
        "",
        f"{b['total'] / 1e9:.2f} GB/step @ {d['read_bandwidth_gbps']:.1f} GB/s",
    )
    con.print(t)
    p = o.get("gpu_profile")
    if p:
        con.print(
            f"  GPU ({o.get('backend')}, CUDA graphs {'on' if p['cuda_graphs'] else 'off'}): "
            f"{p['kernels_per_token']:.0f} kernels per token, busy {p['gpu_busy_ms_per_token']:.2f}"
            f" of {p['wall_ms_per_token']:.2f} ms ({p['gpu_busy_fraction']:.0%})"
        )
        for k in p.get("top_kernels", [])[:8]:
            con.print(f"    {k['us_per_token']:8.1f} us  x{k['per_token']:<5.0f} {k['name'][:70]}")
        if p.get("idle_gaps"):
            con.print(f"  GPU idle between kernels: {p['gpu_idle_ms_per_token']:.2f} ms per token, most:")
        for g in p.get("idle_gaps", [])[:4]:
            con.print(f"    {g['us_per_token']:8.1f} us  x{g['per_token']:<4.1f} after "
                      f"{g['after'][:40]} before {g['before'][:40]}")  # fmt: skip
    for r in d.get("batched") or ():
        con.print(
            f"  batched decode, {r['batch']} sequences: {r['ms_per_step']:.2f} ms / step, "
            f"{r['tokens_per_s']:.0f} tokens/s (median of {r['num_steps_timed']} steps"
            + (", CUDA graphs" if r["cuda_graphs"] else "") + ")"
            + (f"; single steps {r['single_step']['ms_per_step']:.2f} ms, multi-step "
               f"{_x(r['multi_step_speedup'])}" if r.get("single_step") else "")  # fmt: skip
        )


def _throughput(con: Console, d: dict, impl: str) -> None:
    t = Table(
        title=f"Throughput: {d['requests']} requests, prompts {d['prompt_len_range']}, outputs "
        f"{d['output_len_range']} ({d['prompt_tokens']} + {d['output_tokens']} tokens)"
    )
    for c in ("", "wall s", "generated tok/s", "total tok/s", "vs transformers", "notes"):
        t.add_column(c, justify="right")
    o, h = d["ours"], d["transformers"]
    t.add_row(
        "qwen35 (continuous batching)",
        _f(o["wall_s"], ".1f"),
        _f(o["generated_tokens_per_s"], ".1f"),
        _f(o["total_tokens_per_s"], ".1f"),
        _x(d["speedup_vs_transformers"]),
        f"{o['steps']} steps, {o['preemptions']} preemptions",
    )
    if h:
        t.add_row(
            f"transformers{impl}, static batches of {h['batch_size']}",
            _f(h["wall_s"], ".1f"),
            _f(h["generated_tokens_per_s"], ".1f"),
            _f(h["total_tokens_per_s"], ".1f"),
            "1.00x",
            f"{h['computed_tokens_incl_padding']} tokens computed incl. padding",
        )
    con.print(t)
    bws = ", ".join(f"{b:.1f}" for b in d["read_bandwidth_gbps"])
    con.print(
        f"  runs interleaved, {d['interleaved_rounds']} round(s); read bandwidth before the "
        f"first and after each: {bws} GB/s"
    )


def _long_context(con: Console, d: dict, impl: str) -> None:
    kv = d["kv_bytes_per_token"]
    t = Table(
        title=f"Decode step time vs context (KV per token: hybrid {kv['hybrid']} B, all-full "
        f"{kv['full']} B, hybrid on fp8 K/V {kv.get('hybrid_fp8', '-')} B; median of "
        f"{d['reps']}, steps interleaved)"
    )
    for c in ("context", "hybrid ms", "all full attention ms", "full / hybrid",
              "hybrid, fp8 K/V ms", "speed-up"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in d["rows"]:
        t.add_row(
            str(r["context_len"]),
            _f(r["hybrid_ms"], ".1f"),
            _f(r["full_attention_ms"], ".1f"),
            _x(r["full_over_hybrid"]),
            _f(r.get("hybrid_fp8_kv_ms"), ".1f"),
            _x(r.get("hybrid_over_fp8_kv")),
        )
    con.print(t)


def _multi_turn(con: Console, d: dict, impl: str) -> None:
    t = Table(
        title=f"Multi-turn chat: {d['conversations']} conversations x {d['turns']} turns, "
        f"system prompt {d['system_prompt_tokens']}, user {d['user_message_tokens']}, "
        f"replies {d['reply_tokens']}"
    )
    for c in ("prefix caching", "prompt tokens", "computed", "mean TTFT s", "TTFT after turn 1"):
        t.add_column(c, justify="right")
    for name, key in (("off", "caching_off"), ("on", "caching_on")):
        s = d[key]
        t.add_row(
            name,
            str(s["prompt_tokens"]),
            str(s["computed_prompt_tokens"]),
            _f(s["mean_ttft_s"], ".3f"),
            _f(s["mean_ttft_after_first_turn_s"], ".3f"),
        )
    t.add_row(
        "off / on",
        "",
        _x(d["computed_tokens_ratio"]),
        _x(d["ttft_ratio"]),
        _x(d["ttft_ratio_after_first_turn"]),
    )
    con.print(t)


def _spec(con: Console, d: dict, impl: str) -> None:
    t = Table(
        title=f"Speculative decoding, k MTP drafts per step, batch 1 (prompt {d['prompt_len']}, "
        f"{d['new_tokens']} new tokens, {d['rounds']} interleaved rounds; oracle rows: each draft "
        "right at that rate)"
    )
    for c in ("engine", "decode tok/s", "x plain", "acceptance", "tokens/step", "tokens = plain"):
        t.add_column(c, justify="right")
    for name, r in d["engines"].items():
        acc, length = r["acceptance"], r.get("accept_length")
        t.add_row(
            name,
            _f(r["decode_tokens_per_s"]),
            _x(r["over_plain"]),
            "" if acc is None else f"{acc:.0%} of {r['drafts']}",
            "" if length is None else f"{length:.2f}",
            "yes" if r["tokens_equal_plain"] else "NO",
        )
    con.print(t)
    for k, per in d.get("batches", {}).items():
        for b, r in per.items():
            con.print(
                f"  {k}, {b} requests together, drafts always right: {_f(r['oracle 100%'])} "
                f"tok/s vs plain {_f(r['plain'])} ({_x(r['over_plain'])}); steps sampling more "
                f"than {d['max_verify_seqs']} sequences draft for none"
            )


def _dtype(con: Console, d: dict, impl: str) -> None:
    caps = ", ".join(k for k, v in d["cpu_bf16"].items() if v) or "unknown"
    t = Table(
        title=f"Our engine by weight dtype (prompt {d['prompt_len']}, {d['new_tokens']} new "
        f"tokens, {d['rounds']} rounds; CPU: {caps})"
    )
    for c in ("dtype", "weights GiB", "prefill tok/s", "decode ms/token", "decode tok/s"):
        t.add_column(c, justify="right")
    for name, r in d["dtypes"].items():
        t.add_row(
            name,
            _f(r["weight_bytes"] / 2**30),
            _f(r["prefill_tokens_per_s"], ".1f"),
            _f(r["decode_ms_per_token"], ".1f"),
            _f(r["decode_tokens_per_s"]),
        )
    for label, key in (("bf16 / fp32", "bf16_over_fp32"),
                       ("fp32+bf16 / fp32", "bf16_storage_over_fp32"),
                       ("fp32+int8 / fp32", "int8_over_fp32")):  # fmt: skip
        if key in d:  # (documents written before a row lack its ratio)
            x = d[key]
            t.add_row(label, "", _x(x["prefill"]), "", _x(x["decode"]))
    con.print(t)
    con.print(f"  faster here: prefill {d['faster']['prefill']}, decode {d['faster']['decode']}")


def _structured(con: Console, d: dict, impl: str = "") -> None:
    t = Table(
        title=f"Structured outputs: decode step at batch {d['batch']}, every row constrained vs "
        f"none (median of {d['num_steps_timed']} steps, {d['rounds']} interleaved rounds)"
    )
    for c in ("unconstrained ms", "constrained ms", "overhead", "mask ms / step",
              "vocab build s", "compile ms (median)", "cache hit ms"):  # fmt: skip
        t.add_column(c, justify="right")
    t.add_row(
        _f(d["step_ms_unconstrained"]), _f(d["step_ms_constrained"]), f"{d['overhead']:+.1%}",
        _f(d["mask_ms_per_step"]), _f(d["vocab_build_s"]), _f(d["compile_ms_median"]),
        _f(d["compile_ms_cache_hit"]),
    )  # fmt: skip
    con.print(t)


def _quality(con: Console, d: dict, impl: str = "") -> None:
    w = "random weights: ranks the formats only" if d["random_weights"] else "checkpoint"
    t = Table(title=f"Quantized vs BF16 on the same weights ({d['positions']} positions, {w})")
    for c in ("format", "weights GiB", "top-1 agreement", "mean KL", "decode kernels: top-1",
              "mean KL"):  # fmt: skip
        t.add_column(c, justify="right")
    t.add_row("bf16", _f(d["bf16_weight_bytes"] / 2**30), "1", "0", "1", "0")
    for name, r in d["formats"].items():
        t.add_row(
            name, _f(r["weight_bytes"] / 2**30), _pct(r["top1_agreement"]), _f(r["mean_kl"], ".2e"),
            _pct(r["decode_top1_agreement"]), _f(r["decode_mean_kl"], ".2e"),
        )  # fmt: skip
    con.print(t)


def _peers(con: Console, d: dict, impl: str = "") -> None:
    t = Table(
        title=f"Batch-1 decode and prefill by weight format (prompt {d['prompt_len']}, "
        f"{d['new_tokens']} new tokens, {d['rounds']} interleaved rounds)"
    )
    sizes = next(iter(d["engines"].values()))["prefill_tokens_per_s"].keys()
    for c in ("engine", "compute+weights", "KV", "weights GiB", "decode tok/s", "vs qwen35 bf16"):
        t.add_column(c, justify="right")
    for p in sizes:
        t.add_column(f"prefill@{p} tok/s", justify="right")
    big = str(d["long_context"])
    t.add_column(f"decode@{big} tok/s", justify="right")
    for name, r in d["engines"].items():
        t.add_row(
            name,
            r.get("weights", ""),  # (older documents lack it)
            r.get("kv_cache", "").replace("bfloat", "bf").replace("float", "fp"),
            _f(r["weight_bytes"] / 2**30),
            _f(r["decode_tokens_per_s"]),
            _x(r["decode_vs_qwen35_bf16"]),
            *(_f(r["prefill_tokens_per_s"][p], ".1f") for p in sizes),
            _f(r["decode_tokens_per_s_at_context"][big]),
        )
    con.print(t)
    if d["llama_cpp"] != "ran":
        con.print(f"  llama.cpp skipped: {d['llama_cpp']}")
    groups = d.get("groups") or []  # (older documents lack them)
    if len(groups) > 1:
        con.print("  one pair at a time (memory): " + "; ".join(" + ".join(g) for g in groups)
                  + " (rounds interleave within a pair; 'vs qwen35 bf16' compares pairs run "
                  "minutes apart)")  # fmt: skip
    for name, why in d.get("skipped", {}).items():
        con.print(f"  {name} skipped: {why}")
    for ours, each in d["decode_ratio_per_round"].items():
        con.print(f"  decode {ours} vs llama.cpp at the same precision, per round: "
                  + " ".join(f"{x:.2f}x" for x in each))  # fmt: skip
    each_round = d.get("decode_at_context_ratio_per_round", {})  # (older documents lack it)
    for ours, x in d["decode_at_context_ratio"].items():
        rounds = " ".join(f"{r:.2f}x" for r in each_round.get(ours, []))
        con.print(f"  decode@{big} {ours} vs llama.cpp at the same precision: {_x(x)}"
                  + (f" (per round: {rounds})" if rounds else ""))  # fmt: skip
    batches = [str(b) for b in d.get("batches", [])]  # (older documents lack them)
    if not batches:
        return
    t = Table(
        title=f"Batched decode: B sequences of {d['prompt_len']}-token prompts decoding together, "
        f"total tok/s (median of {d['rounds']} rounds, {d['batch_steps']} steps each)"
    )
    t.add_column("engine", justify="right")
    for b in batches:
        t.add_column(f"B={b}", justify="right")
    for name, r in d["engines"].items():
        t.add_row(name, *(_f(r["batched_decode_tokens_per_s"][b], ".1f") for b in batches))
    con.print(t)
    for ours, by_b in d["batched_decode_ratio_per_round"].items():
        con.print(f"  batched {ours} vs llama.cpp, per round: " + "; ".join(
            f"B={b} " + " ".join(f"{x:.2f}x" for x in each) for b, each in by_b.items()))  # fmt: skip


def _tp(con: Console, d: dict, impl: str = "") -> None:
    n = d["tensor_parallel_size"]
    t = Table(
        title=f"Tensor parallelism: one process vs {n} ranks"
        + (" + expert parallelism" if d["expert_parallel"] else "")
        + f", same weights, {d['new_tokens']} new tokens per prompt, median of {d['rounds']} "
        f"interleaved rounds ({d['cores']} threads; {d['threads_per_rank']} per rank)"
    )
    for c in ("workload", "engine", "threads", "tokens/s", "same tokens as 1 process"):
        t.add_column(c, justify="right")
    for r in d["rows"]:
        t.add_row(r["workload"], r["engine"], str(r["threads"]), _f(r["tokens_per_s"], ".1f"),
                  "yes" if r["same_tokens"] else "NO")  # fmt: skip
    con.print(t)


def _serve(con: Console, d: dict, impl: str = "") -> None:
    rate = "all at once" if d["request_rate"] is None else f"{d['request_rate']:g} requests/s"
    cap = "" if d["max_concurrency"] is None else f", at most {d['max_concurrency']} in flight"
    where = d.get("base_url") or f"qwen35 serve vs the engine without HTTP, {d['rounds']} rounds"
    t = Table(
        title=f"Serving ({where}): {d['num_prompts']} streamed completions, prompts "
        f"~{d['input_len']} tokens, {d['output_len']} out, {rate}{cap} (ms: mean / median / p99)"
    )
    for c in ("", "done", "req/s", "out tok/s", "total tok/s", "TTFT", "TPOT", "ITL", "E2E"):
        t.add_column(c, justify="right")
    sides = [("server", d["server"])] + ([("engine", d["engine"])] if "engine" in d else [])
    for name, r in sides:
        t.add_row(
            name,
            f"{r['completed']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
            _f(r["request_throughput"]),
            _f(r["output_throughput"], ".1f"),
            _f(r["total_token_throughput"], ".1f"),
            *(_ms3(r[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
        )
    con.print(t)
    if "server_over_engine" in d:
        per = " ".join(_x(x) for x in d["server_over_engine_per_round"])
        con.print(f"  server / engine output throughput {_x(d['server_over_engine'])} (per round "
                  f"{per}); the engine's TTFT counts from all requests added at once")  # fmt: skip
    if d["server"].get("first_error"):
        con.print(f"  first error: {d['server']['first_error']}", markup=False)


def _ms3(m: dict) -> str:
    if m["mean"] is None:
        return "-"
    return f"{m['mean']:.0f} / {m['median']:.0f} / {m['p99']:.0f}"
