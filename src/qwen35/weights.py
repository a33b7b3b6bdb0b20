"""Checkpoint reading: safetensors files, name mapping, strict coverage check, streaming copy.

Checkpoint names are mapped onto the model's parameter names (transformers' text-only names):
- `model.language_model.X` (official VLM layout) and `model.X` (flat text layout) -> `model.X`;
- stale `rotary_emb.inv_freq` buffers are skipped and counted, and so are `model.visual.*`
  unless the model has a vision tower and `mtp.*` unless it has an MTP head (then they are
  loaded, strictly);
- per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` fill slices of the fused parameters
  `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first, then up) and `mlp.experts.down_proj`
  [E, H, I]; in FP8 checkpoints their `.weight_scale_inv` fill `..._scale_inv` the same way.
FP8 weights (F8_E4M3) go only into FP8 parameters (qwen35.quant swaps them in), and those take
nothing else; scales must be a float type.
Every header is scanned before any data is read, so a mismatched checkpoint fails fast with one
error listing all missing, unexpected and mis-shaped tensors. Data is then copied file by file
from memory-mapped safetensors, each file closed before the next is opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen35.errors import Qwen35Error
from qwen35.model_source import is_gguf_file

MAX_LISTED = 10  # names listed per kind of problem in an error message

_SKIP_PREFIXES = {"model.visual.": "model.visual", "mtp.": "mtp"}
_PER_EXPERT = re.compile(
    r"^(?P<base>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<kind>weight|weight_scale_inv)$"
)
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}


class CheckpointError(Qwen35Error):
    """A checkpoint that cannot be found, read, or does not match the model config."""


@dataclass
class LoadReport:
    """What a load did: files, skipped prefixes, casts, timings (attached as model.load_report)."""

    source: str
    load_format: str  # "safetensors" | "random"
    dtype: str
    device: str
    files: list[str] = field(default_factory=list)
    num_tensors: int = 0  # checkpoint tensors copied into parameters
    num_bytes: int = 0  # bytes of tensor data read from disk
    skipped: dict[str, int] = field(default_factory=dict)  # prefix -> tensors skipped
    cast: dict[str, int] = field(default_factory=dict)  # "F32->bfloat16" -> tensors
    notes: list[str] = field(default_factory=list)
    nonfinite_checked: bool = False  # every tensor read was counted for NaN / inf (check_finite)
    seconds_scan: float = 0.0
    seconds_read: float = 0.0
    seconds_total: float = 0.0
    config: object = None  # the parsed ModelConfig

    @property
    def random(self) -> bool:
        return self.load_format == "random"

    def summary(self) -> str:
        skipped = ", ".join(f"{k}.*: {v}" for k, v in sorted(self.skipped.items())) or "none"
        if self.random:
            return f"random weights ({self.dtype}, {self.device}) in {self.seconds_total:.2f} s"
        return (
            f"loaded {self.num_tensors} tensors ({self.num_bytes / 2**30:.2f} GiB) from "
            f"{len(self.files)} file(s) in {self.seconds_total:.2f} s as {self.dtype} on "
            f"{self.device}; skipped {skipped}"
        )


@dataclass(frozen=True)
class _Target:
    param: str  # model parameter name
    expert: int | None = None  # per-expert slice: expert index
    part: str | None = None  # "gate" | "up" | "down"


@dataclass
class _Entry:
    key: str  # name in the checkpoint
    target: _Target
    nbytes: int
    st_dtype: str


# ---- files --------------------------------------------------------------------------------------
def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, from its index when sharded (a GGUF file's
    model directory: its GGUF files, gguf_checkpoint.py)."""
    from qwen35.gguf_checkpoint import pointed

    gguf_files = pointed(directory)
    if gguf_files is not None:
        return gguf_files
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index} is not a valid safetensors index: 'weight_map' must map tensor names "
                "to shard file names (incomplete download? re-download it)"
            )
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists {len(names)} shard files but {len(missing)} are missing from "
                f"{directory}: {', '.join(missing[:MAX_LISTED])} (incomplete download?)"
            )
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    other = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt*")
    )
    hint = f" (found {', '.join(other[:3])}: only safetensors is supported)" if other else ""
    raise CheckpointError(
        f"no *.safetensors weights in {directory}{hint}; for random weights use "
        "load_format='random' (CLI: --load-format random)"
    )


class PresentedSlice:
    """safetensors' slice interface over one tensor a checkpoint view presents (GGUF,
    compressed-tensors: `ck._shapes`, `ck._dtypes`, `ck.get_tensor`); a slice reads the whole
    tensor, then indexes it."""

    def __init__(self, ck, key: str):
        self._ck, self._key = ck, key

    def get_shape(self) -> list[int]:
        return list(self._ck._shapes[self._key])

    def get_dtype(self) -> str:
        return self._ck._dtypes[self._key]

    def __getitem__(self, index) -> torch.Tensor:
        return self._ck.get_tensor(self._key)[index]


def open_safetensors(path: Path):
    """safe_open(path), a corrupt or unreadable file a CheckpointError naming it; a GGUF file
    is read through gguf_checkpoint.GGUFCheckpoint, a compressed-tensors one through
    compressed_tensors.CompressedCheckpoint, a GPTQ / AWQ one through gptq_awq (the same
    interface)."""
    from safetensors import SafetensorError, safe_open

    gguf = sys.modules.get("qwen35.gguf_checkpoint")  # (a tower named by --mmproj: any name)
    if is_gguf_file(path) or (gguf is not None and gguf.is_tower(path)):
        from qwen35.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(path)

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e} (truncated or corrupt file? re-download it)"
        ) from None
    from qwen35 import compressed_tensors, gptq_awq

    if gptq_awq.is_gptq_awq(f.keys()):  # (GPTQModel / AutoGPTQ / AutoAWQ's quantized weights)
        return gptq_awq.GptqAwqCheckpoint(f, path)
    if compressed_tensors.is_compressed(f.keys()):  # (llm-compressor's quantized weights)
        return compressed_tensors.CompressedCheckpoint(f, path)
    return f


def stored_embedding_dtype(files: list[Path]) -> str | None:
    """The safetensors dtype ("BF16", "F32", ...) the checkpoint stores its token embeddings in
    (what its unquantized weights are stored in; a config's torch_dtype may be missing or say
    otherwise), from the headers only; None if no embedding table is found."""
    for path in files:
        with open_safetensors(path) as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight") and not key.startswith("mtp."):
                    return f.get_slice(key).get_dtype()
    return None


# ---- names --------------------------------------------------------------------------------------
def map_key(key: str, keep_visual: bool = False, keep_mtp: bool = False) -> _Target | str:
    """The model target of a checkpoint key, or the skip-prefix (str) when it is ignored."""
    if keep_visual and key.startswith("model.visual."):
        return _Target(key)
    for prefix, label in _SKIP_PREFIXES.items():
        if key.startswith(prefix) and not (keep_mtp and label == "mtp"):
            return label
    if key.endswith("rotary_emb.inv_freq"):
        return "rotary_emb.inv_freq"  # a stale buffer; recomputed by the model
    if key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model.") :]
    m = _PER_EXPERT.match(key)
    if m:
        proj = m["proj"]
        param = f"{m['base']}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        param += "_scale_inv" if m["kind"] == "weight_scale_inv" else ""
        return _Target(param, int(m["e"]), proj.removesuffix("_proj"))
    return _Target(key)


def _slice_shape(target: _Target, full: torch.Size) -> tuple[int, ...] | None:
    """Expected checkpoint shape of a target; None when the expert index is out of range."""
    if target.expert is None:
        return tuple(full)
    if len(full) != 3 or target.expert >= full[0]:
        return None
    if target.part == "down":
        return tuple(full[1:])  # [H, I]
    return (full[1] // 2, full[2])  # gate or up half of [2I, H]


def _dest(param: torch.Tensor, target: _Target) -> torch.Tensor:
    if target.expert is None:
        return param
    if target.part == "down":
        return param[target.expert]
    half = param.shape[1] // 2
    lo = 0 if target.part == "gate" else half
    return param[target.expert, lo : lo + half]


# ---- scan ---------------------------------------------------------------------------------------
@dataclass
class _Scan:
    plan: dict[Path, list[_Entry]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    embed_shape: tuple[int, ...] | None = None  # the embedding's shape when it mismatched
    tied_duplicate: _Entry | None = None  # lm_head.weight stored beside a tied embedding
    tied_file: Path | None = None


def scan(
    files: list[Path],
    params: dict[str, torch.Tensor],
    aliases: dict[str, str],
) -> _Scan:
    """Read every header and match keys to parameters; reads no tensor data.

    params: canonical parameter name -> (meta) tensor; aliases: extra name -> canonical name
    (the tied `lm_head.weight`).
    """
    s = _Scan()
    keep_visual = any(n.startswith("model.visual.") for n in params)
    keep_mtp = any(n.startswith("mtp.") for n in params)
    written: dict[str, set] = defaultdict(set)  # param -> {(expert, part)}; fused: (None, None)
    tied_head: tuple[Path, _Entry] | None = None
    for path in files:
        entries: list[_Entry] = []
        with open_safetensors(path) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
                t = map_key(key, keep_visual, keep_mtp)
                if isinstance(t, str):
                    s.skipped[t] += 1
                    continue
                name = aliases.get(t.param, t.param)
                if name != t.param:
                    t = _Target(name, t.expert, t.part)
                if name not in params:
                    s.unexpected.append(f"{key} {list(shape)} ({path.name})")
                    continue
                want = _slice_shape(t, params[name].shape)
                if want is None:
                    s.unexpected.append(
                        f"{key} (expert {t.expert} but the model has {params[name].shape[0]})"
                    )
                    continue
                if shape != want:
                    written[name].add("mismatched")  # reported once, not also as missing
                    if name.endswith("embed_tokens.weight") and len(shape) == 2:
                        s.embed_shape = shape
                    s.mismatched.append(
                        f"{key}: checkpoint {list(shape)}, model expects {list(want)}"
                    )
                    continue
                if st_dtype not in _ST_DTYPES:
                    written[name].add("mismatched")
                    s.mismatched.append(
                        f"{key}: dtype {st_dtype} is not a float type this loader reads "
                        f"({', '.join(_ST_DTYPES)})"
                    )
                    continue
                bad = _dtype_problem(st_dtype, params[name].dtype, key)
                if bad:
                    written[name].add("mismatched")
                    s.mismatched.append(bad)
                    continue
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * _ST_DTYPES[st_dtype].itemsize
                e = _Entry(key, t, nbytes, st_dtype)
                if key == "lm_head.weight" and name != "lm_head.weight":
                    tied_head = (path, e)  # tied model: decided once all headers are read
                    continue
                slot = (t.expert, t.part)
                if slot in written[name]:
                    s.unexpected.append(f"{key} (duplicate: {name} written twice)")
                    continue
                written[name].add(slot)
                entries.append(e)
        s.plan[path] = entries
    if tied_head is not None:
        path, e = tied_head
        if written[e.target.param]:
            s.tied_duplicate, s.tied_file = e, path  # the embedding wins; compared after load
        else:
            s.plan[path].append(e)  # the head is the only copy of the shared matrix
            written[e.target.param].add((None, None))
    for name, p in params.items():
        got = written.get(name, set())
        if got == {(None, None)} or "mismatched" in got:
            continue
        if not got:
            s.missing.append(f"{name} {list(p.shape)}")
            continue
        if (None, None) in got:
            s.unexpected.append(f"{name}: stored both fused and per-expert in the checkpoint")
            continue
        parts = ("gate", "up") if "gate_up_proj" in name else ("down",)
        need = {(e, q) for e in range(p.shape[0]) for q in parts}
        lack = sorted(need - got)
        if lack:
            e, q = lack[0]
            s.missing.append(
                f"{name}: {len(lack)} of {len(need)} per-expert slices missing "
                f"(e.g. experts.{e}.{q}_proj.weight{'_scale_inv' * name.endswith('_scale_inv')})"
            )
    return s


def _dtype_problem(st_dtype: str, want: torch.dtype, key: str) -> str | None:
    fp8 = torch.float8_e4m3fn
    if want == fp8 and st_dtype != "F8_E4M3":
        return f"{key}: dtype {st_dtype}, but the model expects FP8 (F8_E4M3) here"
    if st_dtype == "F8_E4M3" and want != fp8:
        scale = key.removesuffix(".weight") + ".weight_scale_inv"
        if key.endswith("_scale_inv"):
            return f"{key}: a scale stored as F8_E4M3; scales must be BF16 or F32"
        return f"{key}: dtype F8_E4M3 but no FP8 layout here (its scale {scale} is missing?)"
    return None


# ---- errors -------------------------------------------------------------------------------------
def mismatch_error(source: str, cfg, s: _Scan) -> CheckpointError:
    lines = [f"checkpoint {source} does not match its config ({_describe(cfg)}):"]
    lines += [f"  hint: {h}" for h in _diagnose(cfg, s)]
    for title, items in (
        ("missing from the checkpoint", s.missing),
        ("unexpected in the checkpoint", s.unexpected),
        ("with a wrong shape or dtype", s.mismatched),
    ):
        if items:
            lines.append(f"  {len(items)} tensor(s) {title}:")
            lines += [f"    {x}" for x in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"    ... and {len(items) - MAX_LISTED} more")
    return CheckpointError("\n".join(lines))


def _describe(cfg) -> str:
    ffn = f"MoE {cfg.num_experts} experts" if cfg.is_moe else f"dense I={cfg.intermediate_size}"
    return (
        f"{cfg.num_hidden_layers} layers, hidden_size={cfg.hidden_size}, "
        f"vocab_size={cfg.vocab_size}, {ffn}"
    )


_LAYER = re.compile(r"model\.layers\.(\d+)\.(\w+)")


def _diagnose(cfg, s: _Scan) -> list[str]:
    """Plain-language reasons for common config/weights mismatches."""
    hints = []
    raw = [k.split()[0] for k in s.unexpected if k.startswith(("blk.", "v.", "mm.", "token_"))]
    if raw:  # a GGUF file's names the loader does not map (gguf_checkpoint.py presents them raw)
        hints.append(
            f"GGUF tensors the loader does not map ({', '.join(raw[:3])}{' ...' * (len(raw) > 3)}"
            "): a layout other than llama.cpp's converter's for Qwen 3.5 (e.g. an older Ollama "
            "build's, with ssm_ba fused or the vision tower inside the model file); a GGUF from "
            "llama.cpp's converter (such as hf.co/unsloth/... repositories) loads"
        )
    extra_layers = {int(m[1]) for k in s.unexpected if (m := _LAYER.match(_norm(k)))}
    extra_layers = {i for i in extra_layers if i >= cfg.num_hidden_layers}
    if extra_layers:
        hints.append(
            f"the checkpoint has layers up to {max(extra_layers)} ({max(extra_layers) + 1} "
            f"layers) but the config says num_hidden_layers={cfg.num_hidden_layers}"
        )
    lacking = {int(m[1]) for k in s.missing if (m := _LAYER.match(k))}
    present = {int(m[1]) for k in s.unexpected if (m := _LAYER.match(_norm(k)))}
    gone = sorted(lacking - present)
    if gone and len(gone) < cfg.num_hidden_layers and gone[-1] == cfg.num_hidden_layers - 1:
        n = gone[0]
        if all(i in gone for i in range(n, cfg.num_hidden_layers)):
            hints.append(
                f"the checkpoint has only {n} layers but the config says "
                f"num_hidden_layers={cfg.num_hidden_layers}"
            )
    if s.embed_shape is not None:
        v, h = s.embed_shape
        hints.append(
            f"the weights have vocab_size={v}, hidden_size={h} but the config says "
            f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}"
        )
    elif s.mismatched:
        hints.append("tensor shapes differ: the config does not describe these weights")
    swapped = sorted(
        {
            int(m[1])
            for k in s.unexpected
            if (m := _LAYER.match(_norm(k))) and m[2] in ("linear_attn", "self_attn")
        }
        & lacking
    )
    if swapped:
        hints.append(
            f"layers {swapped[:8]} have a different attention kind (linear_attn vs self_attn) "
            "in the checkpoint than in the config's layer_types"
        )
    if not cfg.tie_word_embeddings and any(k.startswith("lm_head.weight") for k in s.missing):
        hints.append(
            "no lm_head.weight in the checkpoint: if the head shares the embedding, the config "
            "should say tie_word_embeddings=true"
        )
    if any(k.startswith("mtp.") for k in s.missing):
        hints.append(
            "the checkpoint has no complete MTP head (mtp.*), which speculative decoding drafts "
            "with: run without --num-speculative-tokens"
        )
    if any(k.startswith("model.visual.") for k in s.missing):
        hints.append(
            "the vision tower (model.visual.*) is not in the checkpoint: load the model text "
            "only (--text-only, LLM(..., text_only=True))"
        )
    if any("mlp.experts" in k for k in s.unexpected) and not cfg.is_moe:
        hints.append("the checkpoint is a MoE model but the config describes a dense one")
    if any("mlp.gate_proj" in k for k in s.unexpected) and cfg.is_moe:
        hints.append("the checkpoint is a dense model but the config describes a MoE one")
    return hints


def _norm(entry: str) -> str:
    return entry.split(" ")[0].replace("model.language_model.", "model.")


# ---- NaN / inf ------------------------------------------------------------------------------
# Every tensor a load copies is checked for NaN and infinite values (as llama.cpp's
# --check-tensors, but always): a fine-tune that diverged, or values past fp16's range converted
# to it, would otherwise load silently and answer with one repeated token (int8 quantizing turns
# the NaNs into plausible-looking garbage). The CPU count is one pass at memory speed in
# kernels/small_ops_cpu.cpp (33 GB/s on 2 Zen 5 cores: <1 s for the 9B's 18 GB); torch's
# isfinite ran at 0.4 GB/s there, so without compiled kernels a CPU load is not checked
# (LoadReport.nonfinite_checked False; GPU tensors are counted with torch's ops).
ALLOW_NONFINITE_ENV = "QWEN35_ALLOW_NONFINITE_WEIGHTS"
_EXPONENT_BITS = {  # dtype: (integer view, the mask whose bits all set mean NaN / inf)
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float8_e4m3fn: (torch.uint8, 0x7F),  # (its only non-finite code: NaN)
    torch.float8_e5m2: (torch.uint8, 0x7C),
}


_COUNT_CHUNK = 1 << 26  # elements a GPU count takes at once (its temporaries: ~3 bytes each)


def count_nonfinite(t: torch.Tensor) -> int | None:
    """NaN / inf elements of t (0 for integer tensors); None where they cannot be counted fast
    (a CPU tensor without the compiled kernels). Allocates no copy of t: a non-contiguous view
    is counted a slice of its first dim at a time, a GPU tensor in chunks."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if not t.is_contiguous():
        if t.dim() == 1:
            return count_nonfinite(t.contiguous())
        counts = [count_nonfinite(row) for row in t]
        return None if None in counts else sum(counts)
    if t.device.type == "cpu":
        from qwen35.kernels import small_ops

        mod = small_ops.load()
        return None if mod is None else int(mod.count_nonfinite(t))
    return _count_torch(t)


def _count_torch(t: torch.Tensor) -> int:
    """count_nonfinite of a contiguous tensor with torch's ops (GPU tensors), in chunks."""
    flat, total = t.reshape(-1), 0
    for i in range(0, flat.numel(), _COUNT_CHUNK):
        c = flat[i : i + _COUNT_CHUNK]
        if t.dtype in _EXPONENT_BITS:
            view, mask = _EXPONENT_BITS[t.dtype]
            total += int(((c.view(view) & mask) == mask).sum())
        else:
            total += int((~torch.isfinite(c)).sum())
    return total


def check_finite(key: str, t: torch.Tensor, where: str, source: torch.Tensor | None = None):
    """Raise CheckpointError if t (tensor `key` of `where`, as loaded) holds NaN or inf values
    (with QWEN35_ALLOW_NONFINITE_WEIGHTS=1: a warning). source: what t was converted from, to
    tell values past t's dtype's range from values stored non-finite. Returns whether t was
    checked (count_nonfinite)."""
    bad = count_nonfinite(t)
    if not bad:
        return bad is not None
    name = str(t.dtype).removeprefix("torch.")
    if source is not None and source.dtype != t.dtype and count_nonfinite(source) == 0:
        msg = (f"{where}: tensor {key} holds {bad:,} infinite values (of {t.numel():,}) once "
               f"converted to {name}: the file's values are finite but past {name}'s range; "
               "load it in another --dtype (bf16 or fp32)")  # fmt: skip
    else:
        msg = (f"{where}: tensor {key} holds {bad:,} NaN or infinite values (of {t.numel():,}): "
               "the checkpoint is damaged (a fine-tune that diverged?) and the model would "
               "answer garbage")  # fmt: skip
    if os.environ.get(ALLOW_NONFINITE_ENV) == "1":
        logging.getLogger("qwen35.loader").warning("%s (loading it anyway: %s=1)", msg,
                                                   ALLOW_NONFINITE_ENV)  # fmt: skip
        return True
    raise CheckpointError(f"{msg}. Set {ALLOW_NONFINITE_ENV}=1 to load it anyway")


# ---- read ---------------------------------------------------------------------------------------
def read_into(
    s: _Scan,
    params: dict[str, torch.Tensor],
    report: LoadReport,
    progress: bool,
    shard=None,
    on_read=None,
) -> None:
    """Copy every planned tensor into its parameter, one memory-mapped file at a time.

    shard: a tensor-parallel rank's reader (parallel/loading.py) that copies only the rank's
    slices of each tensor, `shard(entry, safetensors_slice, param, file) -> bytes read`.
    on_read: a QuantizeOnRead (quant/apply.py): parameters left on meta are allocated by it, and
    it hears of every tensor written."""
    if on_read is not None:
        on_read.expect(Counter(e.target.param for es in s.plan.values() for e in es))

    def param(name: str) -> torch.Tensor:
        p = params[name]
        return on_read.allocate(name) if p.is_meta and on_read is not None else p

    skipped: dict[str, list] = {}  # expert slices read by their codes alone: (path, entry)
    total = sum(e.nbytes for entries in s.plan.values() for e in entries)
    bar = _progress_bar(total) if progress else None
    cast: Counter = Counter()
    checked = True  # (every tensor counted: the shard reader's too)
    t0 = time.perf_counter()
    try:
        for path, entries in s.plan.items():
            if not entries:
                continue
            # one open handle at a time: the mmap of a shard is released before the next
            with open_safetensors(path) as f:
                for e in entries:
                    if shard is not None:
                        try:
                            nbytes = shard(e, f.get_slice(e.key), param(e.target.param), str(path))
                        except CheckpointError:
                            raise
                        except Exception as exc:
                            raise CheckpointError(
                                f"cannot read tensor {e.key} from {path}: {exc} "
                                "(truncated or corrupt file? re-download it)"
                            ) from None
                        report.num_tensors += 1 if nbytes else 0
                        report.num_bytes += nbytes
                        if on_read is not None:
                            on_read.written(e.target.param)
                        if bar is not None:
                            bar[0].update(bar[1], advance=e.nbytes)
                        continue
                    dst = _dest(param(e.target.param), e.target)
                    hinted = (on_read is not None and hasattr(f, "quant_hint")  # GGUF, compressed
                              and on_read.wants_hint(e.target.param, f.hint_formats))
                    try:
                        hint = f.quant_hint(e.key) if hinted else None
                        if hinted:  # first: its codes may stand for the values
                            on_read.hint(e.target.param, hint, e.target)
                        skip = hinted and on_read.skips_values(e.target.param, e.target, hint)
                        src = None if skip else f.get_tensor(e.key)
                    except Exception as exc:  # safetensors raises its own types on bad data
                        raise CheckpointError(
                            f"cannot read tensor {e.key} from {path}: {exc} "
                            "(truncated or corrupt file? re-download it)"
                        ) from None
                    if skip:  # the lattices' steps and zero points (the scales) are all
                        for part in hint:  # there is to check
                            if part is not None and part.is_floating_point():
                                checked &= check_finite(e.key, part, str(path))
                        if e.target.expert is not None:  # (values wanted if the hint is lost)
                            skipped.setdefault(e.target.param, []).append((path, e))
                    else:
                        if src.dtype != dst.dtype:
                            cast[f"{e.st_dtype}->{str(dst.dtype).removeprefix('torch.')}"] += 1
                        dst.copy_(src)  # casts (e.g. the fp32 A_log / norm weights) on the way
                        checked &= check_finite(e.key, dst, str(path), src)
                    del src, dst
                    if hinted and on_read.lost(e.target.param) and e.target.param in skipped:
                        # experts' slices of different kinds: the skipped ones' values after all
                        for p, done in skipped.pop(e.target.param):
                            checked &= _read_values(p, done, param(done.target.param))
                    if on_read is not None:
                        on_read.written(e.target.param)
                    report.num_tensors += 1
                    report.num_bytes += e.nbytes
                    if bar is not None:
                        bar[0].update(bar[1], advance=e.nbytes)
        if s.tied_duplicate is not None and shard is None:
            _check_tied(s, params, report)
    finally:
        if bar is not None:
            bar[0].stop()
    report.cast = dict(cast)
    report.nonfinite_checked = checked and (shard is None or getattr(shard, "checked", True))
    report.seconds_read = time.perf_counter() - t0


def _read_values(path: Path, e, p: torch.Tensor) -> bool:
    """Entry e's values copied into its place of parameter p (an expert's slice first read by
    its codes alone); whether they were finite."""
    with open_safetensors(path) as f:
        src = f.get_tensor(e.key)
    dst = _dest(p, e.target)
    dst.copy_(src)
    return check_finite(e.key, dst, str(path), src)


def _check_tied(s: _Scan, params: dict[str, torch.Tensor], report: LoadReport) -> None:
    e, path = s.tied_duplicate, s.tied_file
    with open_safetensors(path) as f:
        head = f.get_tensor(e.key)
    emb = params[e.target.param]
    same = torch.equal(head.to(emb.dtype).to(emb.device), emb)
    report.notes.append(
        "lm_head.weight is stored beside the tied embedding; the embedding is used"
        + ("" if same else " (WARNING: they differ in the file)")
    )
    if not same:
        import logging

        logging.getLogger("qwen35.loader").warning(
            "%s: lm_head.weight differs from the tied embed_tokens.weight; using the embedding "
            "(tie_word_embeddings is true in config.json)",
            path,
        )


def _progress_bar(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(
        TextColumn("loading weights"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    p.start()
    return p, p.add_task("load", total=total)
