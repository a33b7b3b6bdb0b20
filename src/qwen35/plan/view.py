"""Terminal tables (rich) and the `--plot` chart of `qwen35 plan`. Imported only to print."""

from __future__ import annotations

import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from qwen35.plan.params import bytes_fn, has_fp8, weight_tensors
from qwen35.plan.planner import (
    GIB,
    Deployment,
    Fit,
    LayoutError,
    PlanError,
    decode_step_bytes,
    decode_tokens_per_s,
    runtime_overhead_bytes,
    working_memory_bytes,
)

MOE_VS_DENSE = ("Qwen3.5-35B-A3B", "Qwen3.5-4B", "Qwen3.5-9B")


# ---- number formats --------------------------------------------------------------------------


def params_str(n: int) -> str:
    """The article's style: 873M, 2.27B, 403.40B."""
    return f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def gib(b: int | float | None) -> str:
    return "–" if b is None else f"{b / GIB:.2f}"


def ctx_str(n: int) -> str:
    """Tokens with K = 1024: 262144 -> 256K, 15324 -> 15.0K."""
    if n < 1024:
        return str(n)
    return f"{n / 1024:.0f}K" if n >= 10 * 1024 or n % 1024 == 0 else f"{n / 1024:.1f}K"


def size_str(b: int) -> str:
    return f"{b / 2**10:.0f} KiB" if b < 2**20 else f"{b / 2**20:.1f} MiB"


def short(name: str) -> str:
    return name.removeprefix("Qwen3.5-")


def layout_str(f: Fit) -> str:
    d = f.deployment
    s = f"tp{d.tp}" + (f"x{d.dp}" if d.dp > 1 else "")
    return s + ("+ep" if d.ep_size > 1 else "")


def tps(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _console() -> Console:
    # not a terminal (a pipe, a file): a fixed width that holds the widest table
    tty = sys.stdout.isatty()
    return Console(width=None if tty else 120, highlight=False, soft_wrap=False)


# ---- views -----------------------------------------------------------------------------------


def _drafts(args) -> str:
    return "n-gram drafts" if args.speculative_method == "ngram" else "MTP drafts"


def render(rows, gpu, args, common) -> None:
    con = _console()
    settings = (
        f"context {args.context:,}, batch {args.batch}, KV {args.kv_dtype}, state "
        f"{args.state_dtype}, prefill chunk {args.chunk:,}"
        + (", text-only (no vision tower, no MTP head)" if args.text_only else "")
        + (
            f", {_drafts(args)} ({args.num_speculative_tokens} a step)"
            if args.num_speculative_tokens
            else ""
        )
    )
    if args.model:
        _model_detail(con, rows[0], args)
    else:
        _family_table(con, rows, args)
    if common is not None:
        _what_fits(con, rows, common, args, settings)
    elif gpu is not None:
        _gpu_table(con, rows, gpu, args, settings)
    if args.model is None:
        _moe_vs_dense(con, rows, gpu, args)
    at_load = [r.summary.cfg.name for r in rows if "fp8" in r.dtypes and not has_fp8(r.summary.cfg)]
    if at_load:
        con.print(f"FP8 of {', '.join(at_load)} (no FP8 checkpoint): the BF16 weights quantized at "
                  "load (--quantization fp8) into the official block layout counted here.")  # fmt: skip


def _header(con: Console, text: str) -> None:
    con.print(f"[bold]{text}[/]")


def _family_table(con: Console, rows, args) -> None:
    scope = "of the text model only" if args.text_only else "as on disk: text + vision + MTP"
    _header(con, f"Qwen 3.5: parameters and weights (GiB = 2^30 B; weights {scope})")
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ("model", "params", "text", "vision", "MTP", "active", "BF16 GiB", "FP8 GiB",
            "KV/token", "state/seq")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        s, p = r.summary, r.summary.params
        w = s.weights_bytes_text_only if args.text_only else s.weights_bytes
        t.add_row(
            short(s.cfg.name),
            params_str(p.total),
            params_str(p.text),
            params_str(p.vision),
            params_str(p.mtp),
            params_str(p.active),
            gib(w["bf16"]),
            gib(w["fp8"]),
            size_str(s.kv_bytes_per_token),
            size_str(s.state_bytes_per_sequence),
        )
    con.print(t)
    k = args.num_speculative_tokens
    head = " and the MTP head's layer" if args.speculative_method == "mtp" else ""
    mtp = (
        f"{head} (--num-speculative-tokens), state/seq {1 + k} times over: "
        f"{'a spare' if k == 1 else f'{k} spares'} per sequence"
        if k
        else " only"
    )
    con.print(
        f"KV/token: K+V of the full-attention layers{mtp} ({args.kv_dtype}); state/seq: Gated "
        f"DeltaNet recurrent ({args.state_dtype}) + conv state of the other 3/4 of the layers. "
        "FP8: e4m3 weights with 128x128 BF16 scales; embeddings, head, routers, norms and the "
        "vision tower stay BF16."
    )


def _cell(fits: dict[str, Fit | str]) -> str:
    """The dtype that serves the request (BF16 first) and the longest context it reaches."""
    ok = [(d, f) for d, f in fits.items() if isinstance(f, Fit)]
    for d, f in ok:
        if f.fits:
            return f"[green]{d.upper()} {ctx_str(f.max_context)}[/]"
    loads = [(d, f) for d, f in ok if f.loads]
    if loads:
        d, f = max(loads, key=lambda x: x[1].max_context)
        return f"[yellow]{d.upper()} {ctx_str(f.max_context)}[/]"
    return "[dim]–[/]"


def _what_fits(con: Console, rows, common, args, settings) -> None:
    where = "one GPU" if args.num_gpus == 1 else f"{args.num_gpus} GPUs"
    _header(con, f"What fits {where} ({settings})")
    t = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    t.add_column("model")
    for g, _ in common:
        t.add_column(f"{g.name} {g.memory_gib:g}G", justify="right")
    for r in rows:
        t.add_row(short(r.summary.cfg.name), *(_cell(r.by_gpu[g.name]) for g, _ in common))
    con.print(t)
    con.print(
        "Cell: the dtype that serves the context (BF16 first) and the longest context one "
        "sequence reaches; yellow: loads, short of the context."
    )
    con.print("[bold]Best per GPU[/] (most parameters that serve the context; BF16 before FP8):")
    for g, rec in common:
        if rec is None:
            con.print(f"  {g.name}: nothing fits")
            continue
        d = rec.fit.deployment
        con.print(
            f"  [bold]{g.name}[/]: [bold cyan]{short(d.cfg.name)} {d.dtype.upper()}[/], {rec.why}"
        )


def _gpu_table(con: Console, rows, gpu, args, settings) -> None:
    where = f"{args.num_gpus}x {gpu.name}" if args.num_gpus > 1 else gpu.name
    bw = f", {gpu.bandwidth_gb_s:,.0f} GB/s" if gpu.bandwidth_gb_s else ""
    _header(con, f"On {where} ({gpu.memory_gib:g} GiB{bw} each): {settings}")
    t = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    cols = [
        "model",
        "dtype",
        "layout",
        "weights/GPU",
        f"{ctx_str(args.context)} x {args.batch}",
        "max context",
        f"seqs @ {ctx_str(args.context)}",
        "tok/s b=1",
    ]
    if args.batch > 1:
        cols.append(f"tok/s b={args.batch}")
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "dtype", "layout") else "right")
    notes = []
    for r in rows:
        for d in r.dtypes:
            f = r.fits[d]
            name = short(r.summary.cfg.name)
            if isinstance(f, str):
                notes.append(f"{name} {d.upper()}: {f}")
                t.add_row(name, d.upper(), "[red]none[/]", *["–"] * (len(cols) - 3))
                continue
            ok = "[green]fits[/]" if f.fits else "[yellow]short[/]" if f.loads else "[red]no[/]"
            cells = [
                name,
                d.upper(),
                layout_str(f),
                gib(f.weights),
                ok,
                ctx_str(f.max_context) if f.loads else "–",
                f"{f.max_concurrency:,}",
                tps(f.decode_tokens_per_s_batch1),
            ]
            if args.batch > 1:
                cells.append(tps(f.decode_tokens_per_s))
            t.add_row(*cells)
    con.print(t)
    for n in notes:
        con.print(f"  [red]no layout[/] {n}")
    from qwen35.commands.plan import _recommend

    rec = _recommend(rows)
    if rec is None:
        con.print(
            "[bold]Recommendation:[/] nothing serves this context here; try --text-only, "
            "--dtype fp8, a shorter --context or more --num-gpus"
        )
    else:
        d = rec.fit.deployment
        con.print(
            f"[bold]Recommendation:[/] [bold cyan]{d.cfg.name} {d.dtype.upper()}[/] "
            f"({layout_str(rec.fit)}): {rec.why}"
        )
        from qwen35.plan.gguf import launch_model
        from qwen35.plan.launch import launch_commands

        replicas = f" (x{d.dp} replicas)" if d.dp > 1 else ""
        for engine, cmd in launch_commands(d, args.context, launch_model(args.model)).items():
            con.print(f"  {engine}{replicas}: {cmd}", markup=False, soft_wrap=True)
    if args.dtype is None and any(not f.fits for r in rows for f in r.fits.values()
                                  if isinstance(f, Fit)):  # fmt: skip
        con.print("Larger models in int4 (about a quarter of BF16's weights; `--quantization "
                  "int4`, its GPU kernels not yet timed): the same plan with --dtype int4.")
    con.print(
        "tok/s: decode roofline (bytes read per step over bandwidth, or FLOPs over the "
        "BF16 peak); an upper bound."
        + (
            f" Counted without drafts: each accepted {_drafts(args)[:-1]} adds a token to a step."
            if args.num_speculative_tokens
            else ""
        )
    )


def _moe_vs_dense(con: Console, rows, gpu, args) -> None:
    from qwen35.catalog.gpus import load_gpu

    g = gpu if gpu is not None and gpu.bandwidth_gb_s else load_gpu("H100 SXM")
    by_name = {r.summary.cfg.name: r.summary for r in rows}
    if not all(n in by_name for n in MOE_VS_DENSE):
        return
    parts = []
    for n in MOE_VS_DENSE:
        dep = Deployment(
            by_name[n].cfg, "bf16", args.kv_dtype, args.state_dtype, text_only=args.text_only
        )
        read = decode_step_bytes(dep, 1, args.context)
        rate = decode_tokens_per_s(dep, g, 1, args.context)
        parts.append((n, read, rate, dep.rank_weights.total))
    moe, small, mid = parts
    con.print(
        f"[bold]MoE vs dense[/] (BF16, batch 1, {ctx_str(args.context)} context, {g.name} "
        f"roofline): {short(moe[0])} reads {moe[1] / GIB:.1f} GiB per token -> ~{moe[2]:,.0f} tok/s; "
        f"{short(small[0])} {small[1] / GIB:.1f} GiB -> ~{small[2]:,.0f}; {short(mid[0])} "
        f"{mid[1] / GIB:.1f} GiB -> ~{mid[2]:,.0f}. Knowledge of "
        f"{params_str(by_name[moe[0]].params.total)} parameters at small-dense speed, but all "
        f"{moe[3] / GIB:.1f} GiB must stay resident ({short(small[0])}: {small[3] / GIB:.1f})."
    )


def _groups(cfg, text_only: bool) -> dict[str, list]:
    out: dict[str, list] = {}
    for t in weight_tensors(cfg, text_only):
        n = t.name
        if t.part != "text":
            key = "vision tower" if t.part == "vision" else "MTP head"
        elif "embed_tokens" in n:
            key = "embed_tokens" + (" (tied head)" if cfg.tie_word_embeddings else "")
        elif n == "lm_head.weight":
            key = "lm_head"
        elif "linear_attn" in n:
            key = f"Gated DeltaNet x{cfg.num_linear_attention_layers}"
        elif "self_attn" in n:
            key = f"gated attention x{cfg.num_full_attention_layers}"
        elif t.expert:
            key = f"routed experts {cfg.num_experts} x{cfg.num_hidden_layers}"
        elif "shared_expert" in n:
            key = "shared experts + gates"
        elif ".mlp.gate." in n:
            key = "routers"
        elif ".mlp." in n:
            key = f"MLP x{cfg.num_hidden_layers}"
        else:
            key = "norms"
        out.setdefault(key, []).append(t)
    return out


def _model_detail(con: Console, row, args) -> None:
    cfg, p = row.summary.cfg, row.summary.params
    fp8 = has_fp8(cfg)
    kind = (
        f"MoE {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}" if cfg.is_moe else "dense"
    )
    con.print(
        f"[bold]{cfg.name}[/] ({kind}; {cfg.num_hidden_layers} layers: "
        f"{cfg.num_linear_attention_layers} Gated DeltaNet + {cfg.num_full_attention_layers} "
        f"gated attention): {params_str(p.total)} parameters = text {params_str(p.text)} + "
        f"vision {params_str(p.vision)} + MTP {params_str(p.mtp)}; {params_str(p.active)} "
        "active per token"
    )
    _header(con, "Weights" + (" (text-only)" if args.text_only else ""))
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    dts = ("bf16", "fp8") if fp8 else ("bf16",)
    dts += tuple(d for d in row.dtypes if d in ("int8", "int4"))  # (GPU plans of them)
    for c in ("tensors", "params", *(f"{d.upper()} GiB" for d in dts)):
        t.add_column(c, justify="left" if c == "tensors" else "right")
    of = {d: bytes_fn(cfg, d) for d in dts}  # (as the engine holds them; a GGUF file's: as
    for d, f in row.fits.items():  # the plan counted them, Deployment.bytes_of)
        if isinstance(f, Fit) and f.deployment.bytes_of is not None:
            of[d] = f.deployment.bytes_of
    groups = _groups(cfg, args.text_only)
    groups["total"] = [x for ts in groups.values() for x in ts]
    for key, ts in groups.items():
        sizes = [gib(sum(of[d](x) for x in ts)) for d in dts]
        t.add_row(
            key, f"{sum(x.params for x in ts):,}", *sizes, style="bold" if key == "total" else ""
        )
    con.print(t)
    # the layout the GPU plan chose, else --tp
    chosen = [f.deployment for f in row.fits.values() if isinstance(f, Fit)]
    tp = args.tp or (chosen[0].tp if chosen else 1)
    dp = chosen[0].dp if chosen else max(1, args.num_gpus // tp)
    batch = -(-args.batch // dp)  # sequences on the busiest replica
    deps = {
        d: Deployment(
            cfg,
            d,
            args.kv_dtype,
            args.state_dtype,
            tp=tp,
            dp=dp,
            ep=args.ep,
            text_only=args.text_only,
            chunk_tokens=args.chunk,
            speculative_tokens=args.num_speculative_tokens,
            lora_slots=(args.max_loras, args.max_lora_rank),
            speculative_method=args.speculative_method,
        )
        for d in row.dtypes
    }
    spec = next(iter(deps.values())).caches
    mtp_kv = f" + {spec.mtp_layers} MTP" if spec.mtp_layers else ""
    n = spec.spare_states
    spare = f"{1 + n} states, {'one a spare' if n == 1 else f'{n} spares'} for {_drafts(args)}, x " * bool(n)
    con.print(
        f"Caches per GPU (tp={tp}): KV {spec.kv_bytes_per_token:,} B/token ({args.kv_dtype}: "
        f"{spec.num_attention_layers}{mtp_kv} layers x {spec.attention.num_kv_heads} KV heads x "
        f"{spec.attention.head_dim} x K,V); DeltaNet state {spec.running_state_bytes:,} "
        f"B/sequence ({spare}{spec.num_linear_layers} layers x (recurrent "
        f"{spec.linear.recurrent_bytes:,} + conv {spec.linear.conv_bytes:,})). Working memory "
        f"({args.chunk:,}-token chunk): "
        f"{gib(working_memory_bytes(cfg, args.chunk, 1, tp=tp))} GiB; runtime overhead "
        f"{gib(runtime_overhead_bytes(tp))} GiB."
    )
    if args.max_loras:
        from qwen35.plan.sharding import lora_slot_bytes

        slots = lora_slot_bytes(cfg, args.max_loras, args.max_lora_rank, tp=tp)
        con.print(
            f"LoRA adapters per request: {args.max_loras} slots of rank {args.max_lora_rank} on "
            f"every decoder linear, {gib(slots)} GiB per GPU (in the weights below)."
        )
    spread = f" ({args.batch} over {dp} replicas)" if dp > 1 else ""
    _header(con, f"GiB per GPU for {batch} sequence(s){spread}, tp={tp}")
    m = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    m.add_column("context")
    for d in row.dtypes:
        m.add_column(d.upper(), justify="right")
    top = cfg.max_position_embeddings
    notes: dict[str, str] = {}
    for ctx in sorted({c for c in (4096, 32768, 131072, top, args.context) if c <= top}):
        cells = []
        for dep in deps.values():
            try:
                cells.append(gib(dep.bytes_per_gpu(batch, ctx)))
            except LayoutError as e:
                cells.append("no layout")
                notes[dep.dtype] = str(e)
        m.add_row(f"{ctx:,}", *cells)
    con.print(m)
    for n in notes.values():
        con.print(f"  [red]no layout[/] {n}")


# ---- plot ------------------------------------------------------------------------------------


def plot(rows, gpu, args) -> Path:
    """Memory per GPU vs context length (batch --batch), one line per model and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--plot needs matplotlib: pip install 'qwen35[plot]'") from None
    path = Path(args.plot)
    if not path.parent.is_dir():
        raise PlanError(f"--plot {path}: directory {path.parent} does not exist")
    fig, ax = plt.subplots(figsize=(11, 6))
    colors = plt.get_cmap("tab10").colors
    for i, r in enumerate(rows):
        cfg = r.summary.cfg
        top = cfg.max_position_embeddings
        xs = [top * j // 64 for j in range(65)]
        for d in r.dtypes:
            f = r.fits.get(d)
            if isinstance(f, str):
                continue  # no layout on this GPU: nothing to draw
            dep = (
                f.deployment
                if isinstance(f, Fit)
                else Deployment(
                    cfg,
                    d,
                    args.kv_dtype,
                    args.state_dtype,
                    tp=args.tp or 1,
                    text_only=args.text_only,
                    chunk_tokens=args.chunk,
                    speculative_tokens=args.num_speculative_tokens,
                    speculative_method=args.speculative_method,
                )
            )
            try:
                b = -(-args.batch // dep.dp)
                ys = [dep.bytes_per_gpu(b, x) / GIB for x in xs]
            except LayoutError:
                continue
            label = f"{short(cfg.name)} {d.upper()}" + (f" tp{dep.tp}" if dep.tp > 1 else "")
            ax.plot(
                [x / 1024 for x in xs],
                ys,
                "-" if d == "bf16" else "--",
                color=colors[i % len(colors)],
                label=label,
            )
    if gpu is not None:
        ax.axhline(
            gpu.memory_gib,
            color="black",
            linewidth=2.5,
            label=f"{gpu.name}: {gpu.memory_gib:g} GiB",
        )
    ax.set_xlabel("context length (K tokens, K = 1024)")
    ax.set_ylabel("GiB per GPU")
    ax.set_yscale("log")
    ax.set_title(
        f"Qwen 3.5 memory per GPU, batch {args.batch}: weights + overhead + working "
        "memory + DeltaNet state + KV",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise PlanError(f"--plot {path}: {e}") from None
    finally:
        plt.close(fig)
    return path
