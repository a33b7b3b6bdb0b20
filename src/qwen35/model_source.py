"""What a model argument names, told without torch: a GGUF file (by its suffix or, for a file
without one, its magic bytes), a model that Ollama has pulled (`ollama:NAME[:TAG]`), and a GGUF
repository on the Hugging Face Hub (`USER/REPO-GGUF[:QUANT]`, llama.cpp's `-hf` form).

A GGUF repository holds one file (or one split set) per quantization and, for a VLM, mmproj
files: `unsloth/Qwen3.5-4B-GGUF:Q4_K_M` is the file whose name has that tag (Q4_K_M when none
is given, else the only one), its shards, and an mmproj (F16, else BF16, else F32, else any) as
its vision tower; the Hugging Face cache is looked in first, and only what is chosen is
downloaded.

Ollama keeps what it pulls as content-addressed blobs: a manifest per model
(`<models>/manifests/<host>/<namespace>/<model>/<tag>`, a Docker image manifest) lists layers by
media type and digest, and each layer's bytes are `<models>/blobs/sha256-<hex>`. The weights
layer (`application/vnd.ollama.image.model`) is a GGUF file in llama.cpp's layout (what
`ollama pull hf.co/...` downloads is the repository's file itself; Ollama's own converter writes
the Qwen 3.5 names, keys and edits llama.cpp's does), and the vision tower, when the model has
one, is its own layer (`application/vnd.ollama.image.projector`, llama.cpp's mmproj layout). So
`ollama:qwen3.5:0.8b` is that blob with that tower (`--mmproj`), served under Ollama's name.
<models> is $OLLAMA_MODELS, else ~/.ollama/models, else the Linux service's
/usr/share/ollama/.ollama/models.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qwen35.errors import Qwen35Error, shown

GGUF_MAGIC = b"GGUF"
OLLAMA_PREFIX = "ollama:"
_HOST, _NAMESPACE, _TAG = "registry.ollama.ai", "library", "latest"
_PART = re.compile(r"[A-Za-z0-9][\w.-]*")  # a namespace, model or tag (no "..": no way out)
_HOST_PART = re.compile(r"[A-Za-z0-9][\w.-]*(:\d+)?")
_MODEL_LAYER = "application/vnd.ollama.image.model"
_PROJECTOR_LAYER = "application/vnd.ollama.image.projector"
_ADAPTER_LAYER = "application/vnd.ollama.image.adapter"
_PARAMS_LAYER = "application/vnd.ollama.image.params"
# Ollama's parameter names -> the request defaults they become (--override-generation-config)
_PARAMS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
           "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}  # fmt: skip


def file_path(path: str | Path) -> Path:
    """A file's absolute path with symbolic links kept: a file in the Hugging Face cache is a
    link into its blobs/, and its name (split shards, the model's name) and the folder it sits
    in (an mmproj beside it) are the link's, not the blob's."""
    return Path(os.path.abspath(Path(path).expanduser()))


def is_gguf_file(path: str | Path) -> bool:
    """A file named *.gguf, or any file that starts with GGUF's magic bytes (an Ollama blob, a
    download saved without its suffix)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Source:
    """A model argument made local: `path` is what the loader reads (a file, a directory, a Hub
    id), `mmproj` the vision tower that goes with it (None: as usual), `names` what a server
    answers to by default (Ollama's names for an Ollama model; empty: the argument), `sampling`
    request defaults that come with it (an Ollama model's parameters)."""

    path: str
    mmproj: str | None = None
    names: tuple[str, ...] = ()
    sampling: tuple[tuple[str, float], ...] = ()


def needs_resolving(spec) -> bool:
    """Whether `local` turns this model argument into something else: an Ollama name, or a Hub
    GGUF repository (a path that exists is always itself)."""
    return is_ollama(spec) or is_hub_gguf(spec)


def local(spec: str, download: bool = True) -> Source:
    """`ollama:NAME` resolved to its blobs (resolve_ollama), `USER/REPO-GGUF[:QUANT]` to its
    file in the Hugging Face cache (resolve_hub_gguf; download: fetch it when not there);
    anything else as it is."""
    if is_ollama(spec):
        return resolve_ollama(spec)
    if is_hub_gguf(spec):
        return resolve_hub_gguf(spec, download)
    return Source(str(spec))


# ---- Hub GGUF repositories, in the Hugging Face cache -------------------------------------
def hub_cache_dir() -> str | None:
    # read here, not at import: huggingface_hub freezes HF_HOME when it is first imported
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# (an optional hf.co/ or huggingface.co/ first, as Ollama's `pull hf.co/...` names them)
_HUB_GGUF = re.compile(r"^(?:(?:https://)?(?:hf\.co|huggingface\.co)/)?"
                       r"(?P<repo>[\w.-]+/[\w.-]+?)(?::(?P<tag>[\w.-]+))?$")
DEFAULT_QUANT = "Q4_K_M"  # (llama.cpp's -hf default)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_TOWER_ORDER = ("F16", "BF16", "F32")


def is_hub_gguf(spec) -> bool:
    """USER/REPO:QUANT, or USER/REPO whose name says GGUF; not a path that exists."""
    if not isinstance(spec, str) or Path(spec).expanduser().exists():
        return False
    m = _HUB_GGUF.match(spec)
    return m is not None and (m["tag"] is not None or "gguf" in m["repo"].lower())


def _tag_matches(name: str, tag: str) -> bool:
    """The quantization tag as a whole part of the file's path: Q4_K in x-Q4_K.gguf, not in
    x-Q4_K_M.gguf; UD-Q4_K_XL in x-UD-Q4_K_XL.gguf; a Q4_K_M/ folder of shards too."""
    return re.search(rf"(^|[-_./]){re.escape(tag)}([-./]|$)", name, re.IGNORECASE) is not None


def pick_gguf(names: list[str], tag: str | None, repo: str) -> tuple[list[str], str | None]:
    """(the model file's shards, the vision tower or None) among a repository's file names."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    towers = [n for n in ggufs if Path(n).name.lower().startswith("mmproj")]
    models = [n for n in ggufs if n not in towers]
    if not models:
        raise Qwen35Error(f"{repo} holds no GGUF model file; pass a repository of GGUF files "
                          "(USER/REPO-GGUF:QUANT) or a model directory")  # fmt: skip
    firsts = [n for n in models if _SHARD.search(n) is None or _SHARD.search(n)[1] == "00001"]
    chosen = [n for n in firsts if _tag_matches(n, tag or DEFAULT_QUANT)]
    if not chosen and tag is None and len(firsts) == 1:
        chosen = firsts
    if not chosen:
        have = ", ".join(Path(n).name for n in firsts[:12]) + (" ..." if len(firsts) > 12 else "")
        what = f"no {tag} file" if tag else f"no {DEFAULT_QUANT} file (the default)"
        raise Qwen35Error(f"{repo} has {what}; name one of its files' quantizations as "
                          f"{repo}:QUANT: {have}")  # fmt: skip
    first = min(chosen, key=lambda n: (n.count("/"), n))
    m = _SHARD.search(first)
    shards = [first]
    if m is not None:
        stem = first[: m.start()]
        shards = [f"{stem}-{i:05d}-of-{m[2]}.gguf" for i in range(1, int(m[2]) + 1)]
        missing = [n for n in shards if n not in names]
        if missing:
            raise Qwen35Error(f"{repo}: {first} is one of {int(m[2])} shards but {missing[0]} "
                              "is not in the repository")  # fmt: skip

    def rank(n: str):
        kinds = [k for k in _TOWER_ORDER if _tag_matches(Path(n).name, k)]
        return (_TOWER_ORDER.index(kinds[0]) if kinds else len(_TOWER_ORDER), n)

    return shards, (min(towers, key=rank) if towers else None)


def _cached_snapshot(repo: str) -> Path | None:
    """The repository's cached snapshot directory (its main revision), without the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True, cache_dir=hub_cache_dir(),
                                      allow_patterns=["*.gguf"]))  # fmt: skip
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        return None


def resolve_hub_gguf(spec: str, download: bool = True) -> Source:
    """A Hub GGUF repository's chosen file (and tower) in the Hugging Face cache: the cached
    snapshot when it holds them, else the repository's file list and a download of just those
    (huggingface_hub); offline (HF_HUB_OFFLINE), without it or without `download`, the reason
    and how to fetch."""
    m = _HUB_GGUF.match(spec)
    repo, tag = m["repo"], m["tag"]
    snap = _cached_snapshot(repo)
    if snap is not None:
        names = [p.relative_to(snap).as_posix() for p in snap.rglob("*.gguf")]
        try:
            shards, tower = pick_gguf(names, tag, repo)
            return Source(str(snap / shards[0]), str(snap / tower) if tower else None, (spec,))
        except Qwen35Error:
            if hub_offline() or not download:
                raise
    fetch = f"`hf download {repo} --include '*{tag or DEFAULT_QUANT}*'`"
    if hub_offline() or not download:
        why = "HF_HUB_OFFLINE is set" if download else "qwen35 plan reads the file, not the Hub"
        raise Qwen35Error(f"{repo}{f':{tag}' if tag else ''} is not in the Hugging Face cache "
                          f"({why}); fetch it first with {fetch}, or pass a local GGUF "
                          "file")  # fmt: skip
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise Qwen35Error(f"{spec!r} names a Hub GGUF repository but huggingface_hub is not "
                          "installed; pass a local GGUF file instead") from None
    try:
        names = HfApi().list_repo_files(repo)
    except Exception as e:
        raise Qwen35Error(f"cannot list {repo} on the Hugging Face Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); fetch it with {fetch} "
                          "where the Hub is reachable, or pass a local GGUF file") from None
    shards, tower = pick_gguf(names, tag, repo)
    try:
        paths = [hf_hub_download(repo, n, cache_dir=hub_cache_dir()) for n in shards]
        tower_path = hf_hub_download(repo, tower, cache_dir=hub_cache_dir()) if tower else None
    except Exception as e:
        raise Qwen35Error(f"downloading {repo}'s {Path(shards[0]).name} failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"try again, or fetch it with {fetch}") from None
    return Source(paths[0], tower_path, (spec,))


# ---- Ollama's store ---------------------------------------------------------------------------
def is_ollama(spec) -> bool:
    return isinstance(spec, str) and spec.lower().startswith(OLLAMA_PREFIX)


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def parts(self) -> tuple[str, str, str, str]:
        return self.host, self.namespace, self.model, self.tag

    def short(self) -> str:
        """As `ollama list` shows it: the default host and namespace left out."""
        lead = [] if self.host == _HOST else [self.host]
        if lead or self.namespace != _NAMESPACE:
            lead.append(self.namespace)
        return "/".join([*lead, self.model]) + f":{self.tag}"


def parse_ollama_name(spec: str) -> OllamaName:
    """`[ollama:][host/][namespace/]model[:tag]` as Ollama reads a model name (host
    registry.ollama.ai, namespace library and tag latest by default)."""
    text = spec[len(OLLAMA_PREFIX):] if is_ollama(spec) else spec
    text = text.strip()
    if "@" in text:
        raise Qwen35Error(f"{shown(spec)}: name the model by its tag (NAME:TAG), not a digest")
    head, slash, last = text.rpartition("/")
    model, colon, tag = last.partition(":")
    parts = head.split("/") if slash else []
    ok = [_PART.fullmatch(x) for x in (*parts[-1:], model, tag or _TAG)]  # (the host: below)
    if (not all(ok) or (colon and not tag) or len(parts) > 2
            or (len(parts) == 2 and not _HOST_PART.fullmatch(parts[0]))):  # fmt: skip
        raise Qwen35Error(
            f"{shown(spec)} is not an Ollama model name: use ollama:MODEL[:TAG], e.g. "
            "ollama:qwen3.5:0.8b or ollama:hf.co/unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M"
        )
    if len(parts) == 2:
        host, namespace = parts
    else:
        host, namespace = _HOST, (parts[0] if parts else _NAMESPACE)
    return OllamaName(host, namespace, model, tag or _TAG)


def ollama_dirs() -> list[Path]:
    """Where Ollama may keep its models, in the order it would be looked for."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path("~/.ollama/models").expanduser(), Path("/usr/share/ollama/.ollama/models")]


def _manifest(root: Path, name: OllamaName) -> Path | None:
    """The manifest file, the name matched case-insensitively as Ollama does."""
    here = root / "manifests"
    for part in name.parts():
        exact = here / part
        if exact.exists():
            here = exact
            continue
        try:
            near = [p for p in here.iterdir() if p.name.lower() == part.lower()]
        except OSError:
            return None
        if not near:
            return None
        here = near[0]
    return here if here.is_file() else None


def _manifests(root: Path) -> dict[str, Path]:
    """{name as `ollama list` names it: manifest file} under an Ollama directory, by name."""
    base = root / "manifests"
    if not base.is_dir():
        return {}
    found = {OllamaName(*p.relative_to(base).parts).short(): p
             for p in base.glob("*/*/*/*") if p.is_file()}  # fmt: skip
    return dict(sorted(found.items()))


def installed(root: Path) -> list[str]:
    """The models under an Ollama directory, named as `ollama list` names them."""
    return list(_manifests(root))


def _layers(manifest: Path) -> dict[str, str]:
    """A manifest's layers, {media type: digest}; a ValueError for a file that is not one."""
    try:
        layers = json.loads(manifest.read_text()).get("layers") or []
        return {layer["mediaType"]: layer["digest"] for layer in layers}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(str(e)) from None


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def resolve_ollama(spec: str) -> Source:
    """The GGUF blob (and vision tower) of a model Ollama has pulled; refused with the reason
    where there is none or it is not a GGUF model."""
    name = parse_ollama_name(spec)
    roots = [r for r in ollama_dirs() if r.is_dir()]
    if not roots:
        where = " or ".join(str(r) for r in ollama_dirs())
        raise Qwen35Error(
            f"{shown(spec)}: no Ollama models directory ({where}); pull the model with Ollama "
            "first, or set OLLAMA_MODELS to the directory that holds its manifests/ and blobs/"
        )
    found = next(((r, m) for r in roots if (m := _manifest(r, name)) is not None), None)
    if found is None:
        have = sorted({n for r in roots for n in installed(r)})
        import difflib

        near = difflib.get_close_matches(name.short(), have, n=3, cutoff=0.5)
        hint = (f"; did you mean {', '.join(near)}?" if near else
                f"; installed: {', '.join(have[:8])}{' ...' if len(have) > 8 else ''}"
                if have else "; none is installed")  # fmt: skip
        raise Qwen35Error(f"Ollama has no model {name.short()} in {roots[0]}{hint} "
                          f"(`ollama pull {name.short()}` fetches it)")  # fmt: skip
    root, manifest = found
    try:
        kinds = _layers(manifest)
    except ValueError as e:
        raise Qwen35Error(f"{manifest}: not an Ollama manifest ({e})") from None
    if _ADAPTER_LAYER in kinds:
        raise Qwen35Error(f"{name.short()} is a base model plus an Ollama adapter layer; serve "
                          "the base model with the adapter as --lora-modules "
                          "NAME=PEFT_DIR")  # fmt: skip
    if _MODEL_LAYER not in kinds:
        have = ", ".join(sorted(kinds)) or "none"
        raise Qwen35Error(f"{name.short()}: its manifest has no GGUF weights layer "
                          f"({_MODEL_LAYER}); layers: {have}")  # fmt: skip
    model = _blob(root, kinds[_MODEL_LAYER])
    if not model.is_file():
        raise Qwen35Error(f"{name.short()}: its weights blob {model} is missing (an interrupted "
                          "pull? `ollama pull` it again)")  # fmt: skip
    if not is_gguf_file(model):
        raise Qwen35Error(f"{name.short()}: its weights blob {model} is not a GGUF file")
    tower = kinds.get(_PROJECTOR_LAYER)
    tower_path = _blob(root, tower) if tower is not None else None
    mmproj = str(tower_path) if tower_path is not None and tower_path.is_file() else None
    typed = spec[len(OLLAMA_PREFIX):].strip()
    names = tuple(dict.fromkeys([typed, name.short()]))
    params = kinds.get(_PARAMS_LAYER)
    sampling = _sampling(_blob(root, params)) if params is not None else ()
    return Source(str(model), mmproj, names, sampling)


def _sampling(params: Path) -> tuple[tuple[str, float], ...]:
    """The request defaults among an Ollama params layer's values (`PARAMETER temperature 0.6`
    in its Modelfile): the valid ones of those the engine takes, the rest (stop, num_ctx, ...)
    left to the engine's own settings."""
    from qwen35.generation_config import check_overrides

    try:
        values = json.loads(params.read_text())
    except (OSError, ValueError):
        return ()
    out = []
    for k, v in (values.items() if isinstance(values, dict) else ()):
        if k in _PARAMS:
            try:
                out.append(tuple(check_overrides({_PARAMS[k]: v}).items())[0])
            except Qwen35Error:
                continue
    return tuple(out)


def ollama_name_of(path: str | Path) -> str | None:
    """The Ollama name of a weights blob (`<models>/blobs/sha256-HEX`): the first manifest, as
    `ollama list` orders names, whose weights layer it is; None for any other file."""
    p = Path(path).expanduser()
    if p.parent.name != "blobs" or not p.name.startswith("sha256-"):
        return None
    root, digest = p.parent.parent, p.name.replace("-", ":", 1)
    for name, manifest in _manifests(root).items():
        try:
            if _layers(manifest).get(_MODEL_LAYER) == digest:
                return name
        except ValueError:  # (not a manifest: not this blob's)
            continue
    return None
