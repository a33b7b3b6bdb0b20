"""llama.cpp as a benchmark peer: the bench model's weights through llama.cpp's own converter.

`available()` says why llama.cpp can't run (None when it can): it needs `llama-cpp-python`
(`pip install llama-cpp-python`, a ~9 minute source build) and llama.cpp's
`convert_hf_to_gguf.py`, which the llama-cpp-python source distribution vendors
(`vendor/llama.cpp/`): point `QWEN35_LLAMA_CPP_DIR` at that llama.cpp directory.

`convert(bm, "f32" | "bf16" | "q8_0" | "q4_0")`: the model's weights saved as a transformers text
checkpoint (shards of ~1 GiB, so that writing it holds one shard's bf16 copy beside the model),
converted with the vendored script (f32 / bf16 / q8_0), q4_0 then made from the bf16 file with
llama.cpp's own `llama_model_quantize` (the same bytes as from an f32 file: the weights are bf16
values, widened exactly; half the disk and time); `cleanup()` deletes them (the peers workload
calls it when it ends, however it ends; at exit too). Random-weight models have no tokenizer, so the
converter gets a placeholder vocabulary of the right size (the benchmark feeds token ids, never
text). `LlamaRunner` times one prompt's prefill and each decode step through llama-cpp-python,
and (`run_batch`, `LlamaBatchRunner`) decode steps of several sequences at once.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen35.errors import Qwen35Error


class GGUFError(Qwen35Error):
    pass


_WORK: dict[str, Path] = {}
PREFIX = "qwen35-gguf-"  # this run's work folder in the temp folder: PREFIX + a random suffix
SHARD_BYTES = 1 << 30  # the checkpoint's shard size (bf16 bytes)
# bytes per parameter of each file (q8_0: 34 bytes a block of 32; q4_0: 18, with its q6_K head)
FILE_BYTES = {"hf": 2.0, "f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 0.65}


def llama_dir() -> Path | None:
    d = os.environ.get("QWEN35_LLAMA_CPP_DIR")
    return Path(d) if d and (Path(d) / "convert_hf_to_gguf.py").is_file() else None


def available() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "not installed (pip install llama-cpp-python)"
    if llama_dir() is None:
        return (
            "llama.cpp's convert_hf_to_gguf.py not found: set QWEN35_LLAMA_CPP_DIR to the "
            "vendor/llama.cpp directory of the llama-cpp-python source distribution"
        )
    return None


_CONVERT = r"""
import sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import convert_hf_to_gguf as c
from conversion import base

def synthetic_vocab(self):
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("gpt2")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
    self.gguf_writer.add_token_types([1] * n)
    self.gguf_writer.add_token_merges(["<t0> <t1>"])  # llama.cpp wants at least one
    self.gguf_writer.add_eos_token_id(1)
    self.gguf_writer.add_bos_token_id(1)

for name in ("set_vocab", "_set_vocab_gpt2", "_set_vocab_qwen", "_set_vocab_sentencepiece"):
    setattr(base.TextModel, name, synthetic_vocab)
import conversion.qwen as q
for cls in vars(q).values():
    if isinstance(cls, type) and "set_vocab" in vars(cls):
        cls.set_vocab = synthetic_vocab
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
c.main()
"""


def checkpoint(bm) -> Path:
    """The model's weights as a transformers text checkpoint, written now (once per run; the
    conversions read it, not the model)."""
    return _hf_dir(bm, None)


def _hf_dir(bm, opts) -> Path:
    """The model's weights as a transformers text checkpoint (written once per run)."""
    if "hf" in _WORK:
        return _WORK["hf"]
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    atexit.register(shutil.rmtree, work, True)  # also if the run dies before cleanup()
    (work / "pid").write_text(str(os.getpid()))  # (a run killed outright: remove_stale)
    hf = work / "hf"
    hf.mkdir()
    cfg = bm.config
    params = dict(bm.model.named_parameters())
    if cfg.tie_word_embeddings:
        params.pop("lm_head.weight", None)
    shards = _shards([(n, p.numel() * 2) for n, p in params.items()], SHARD_BYTES)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for fname, shard in zip(names, shards, strict=True):  # one shard's copy in memory at a time
        sd = {n: params[n].detach().bfloat16().contiguous().clone() for n in shard}
        save_file(sd, str(hf / fname), metadata={"format": "pt"})
        del sd
    if len(shards) > 1:
        index = {n: fname for fname, shard in zip(names, shards, strict=True) for n in shard}
        total = sum(p.numel() * 2 for p in params.values())
        (hf / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
        )
    text = {
        "architectures": ["Qwen3_5MoeForCausalLM" if cfg.is_moe else "Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_moe_text" if cfg.is_moe else "qwen3_5_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "layer_types": list(cfg.layer_types),
        "full_attention_interval": 4,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads,
        "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim,
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
        "intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            "mrope_section": list(cfg.mrope_section),
            "mrope_interleaved": True,
        },
        "eos_token_id": 1,
        "dtype": "bfloat16",
    }
    (hf / "config.json").write_text(json.dumps(text, indent=2))
    _WORK["hf"] = hf
    return hf


def _shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most `limit` bytes (a larger tensor alone)."""
    out: list[list[str]] = []
    used = limit
    for name, n in sizes:
        if used + n > limit:
            out.append([])
            used = 0
        out[-1].append(name)
        used += n
    return out


def cleanup() -> None:
    """Remove this run's checkpoint and GGUF files (several GB per model in the temp dir;
    a llama.cpp engine that still maps one keeps reading it until it closes)."""
    hf = _WORK.pop("hf", None)
    if hf is not None:
        shutil.rmtree(hf.parent, ignore_errors=True)


def remove_stale() -> list[Path]:
    """Remove the work folders of earlier runs whose process is gone (killed outright, e.g. by
    the OOM killer, before its clean-up ran: a 4B's 32 GB stayed behind and the next run's
    conversion ran out of disk). Folders of live processes, and those without a pid file, stay."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            pid = int((d / "pid").read_text())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # (someone else's process)
    return True


def check_disk(num_params: int, quants: list[str]) -> None:
    """A GGUFError saying how much room the conversions need where there is not that much free
    in the temp folder (the checkpoint, each file, and the bf16 file q4_0 is made from)."""
    files = {"hf", *quants} | ({"bf16"} if "q4_0" in quants else set())
    need = 1.05 * num_params * sum(FILE_BYTES[f] for f in files)
    tmp = tempfile.gettempdir()
    free = shutil.disk_usage(tmp).free
    if free < need:
        raise GGUFError(
            f"converting to {', '.join(quants)} needs ~{need / 2**30:.1f} GiB in {tmp}, "
            f"{free / 2**30:.1f} GiB free: free some, or point TMPDIR at a larger disk"
        )


def convert(bm, quant: str, opts) -> Path:
    hf = _hf_dir(bm, opts)
    out = hf.parent / f"model-{quant}.gguf"
    if out.exists():
        return out
    if quant == "q4_0":
        return _quantize(convert(bm, "bf16", opts), out)
    cmd = [sys.executable, "-c", _CONVERT, str(llama_dir()), str(hf)]
    cmd += ["--outtype", quant, "--outfile", str(out), "--no-mtp"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        raise GGUFError(f"convert_hf_to_gguf.py failed: {(r.stderr or r.stdout)[-600:]}")
    return out


def _quantize(src: Path, out: Path) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.exists():
        raise GGUFError(f"llama_model_quantize to q4_0 failed (rc {rc})")
    return out


class LlamaRunner:
    """One llama.cpp context; `run` = prefill of a prompt, then decode steps, timed."""

    def __init__(self, path: Path, max_len: int, threads: int | None):
        import llama_cpp

        n = self.threads = threads or os.cpu_count() or 1
        self.batched: dict[tuple[int, int], LlamaBatchRunner] = {}  # run_batch's contexts
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=max_len,
            n_batch=max_len,
            n_threads=n,
            n_threads_batch=n,
            verbose=False,
        )

    def close(self) -> None:
        """Free the contexts and the model (its mapped GGUF file)."""
        for b in self.batched.values():
            b.ctx.close()
        self.batched.clear()
        self.llm.close()

    def run(self, prompt: list[int], new: int, rid: str = "") -> tuple[float, list[float]]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t0
        return prefill, list(self._decode(prompt[-1], new - 1))

    def steps(self, prompt: list[int], new: int, rid: str = ""):
        """The prompt's prefill (untimed), then each of `new` - 1 decode steps' seconds, yielded
        one at a time (peers.py alternates them with our engine's steps)."""
        self.llm.reset()
        self.llm.eval(prompt)
        yield from self._decode(prompt[-1], new - 1)

    def _decode(self, tok: int, n: int):
        for _ in range(n):
            t0 = time.perf_counter()
            self.llm.eval([tok])  # the token's value doesn't change the step's cost
            yield time.perf_counter() - t0
            tok = (tok * 31 + 7) % self.llm.n_vocab()

    def run_batch(self, prompts: list[list[int]], steps: int, rid: str = "") -> list[float]:
        """LlamaBatchRunner.run in a context of len(prompts) sequences on this model's weights,
        made on first use for that batch and length."""
        key = (len(prompts), len(prompts[0]) + steps + 1)
        if key not in self.batched:
            self.batched[key] = LlamaBatchRunner(self, *key, self.threads)
        return self.batched[key].run(prompts, steps)


class LlamaBatchRunner:
    """B sequences decoding together in one llama.cpp context, as llama-server's parallel slots
    do: `n_seq_max` = B (one recurrent state per sequence), every step one `llama_decode` of B
    tokens (one a sequence, logits for each). Shares the weights of `runner`'s model."""

    def __init__(self, runner: LlamaRunner, batch: int, max_len: int, threads: int | None):
        import llama_cpp
        from llama_cpp import _internals

        n = threads or os.cpu_count() or 1
        p = llama_cpp.llama_context_default_params()  # kv_unified etc. as llama.cpp defaults
        per_seq = -(-max_len // 256) * 256  # llama.cpp pads a context to 256 tokens
        p.n_ctx, p.n_seq_max = batch * per_seq, batch
        p.n_batch = max(batch, min(batch * per_seq, 4096))
        p.n_threads = p.n_threads_batch = n
        self.batch = batch
        self.ctx = _internals.LlamaContext(model=runner.llm._model, params=p, verbose=False)
        self.buf = _internals.LlamaBatch(n_tokens=p.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_batch = p.n_batch
        self.vocab = runner.llm.n_vocab()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, logits?) in one llama_decode."""
        b = self.buf.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        self.ctx.decode(self.buf)

    def run(self, prompts: list[list[int]], steps: int) -> list[float]:
        """The prompts (one a sequence, equal lengths) prefilled in batches of n_batch tokens,
        then `steps` timed decode steps of every sequence at once: each step's seconds."""
        import llama_cpp

        assert len(prompts) == self.batch and len({len(p) for p in prompts}) == 1
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx.ctx), True)
        items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        for i in range(0, len(items), self.n_batch):
            self._decode(items[i : i + self.n_batch])
        pos, times = len(prompts[0]), []
        tok = prompts[0][-1]
        for _ in range(steps):
            step = [((tok + s) % self.vocab, pos, s, True) for s in range(self.batch)]
            t0 = time.perf_counter()
            self._decode(step)  # the tokens' values don't change the step's cost
            times.append(time.perf_counter() - t0)
            pos += 1
            tok = (tok * 31 + 7) % self.vocab
        return times
