"""What a model argument names (model_source.py): GGUF files by their magic bytes; models that
Ollama has pulled (`ollama:NAME[:TAG]`): the name read as Ollama reads it, the manifest's GGUF
blob loaded as the file it is, its projector blob as the vision tower and its params as request
defaults, a server answering to Ollama's names; Hub GGUF repositories (`USER/REPO-GGUF[:QUANT]`):
the file of that quantization (and an mmproj) picked from the repository, from the Hugging Face
cache. What is not there, or not a GGUF model, is refused with the reason. Ollama's store and the
Hub cache are built here as they are laid out; GGUF files as tests/gguf_writer.py writes them."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra (pip install gguf) reads GGUF files")

from gguf_writer import write_gguf, write_mmproj  # noqa: E402
from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.model_source import (  # noqa: E402
    is_gguf_file,
    parse_ollama_name,
    resolve_ollama,
)

MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"
PARAMS = "application/vnd.ollama.image.params"
SAMPLING = {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1}  # (params' valid ones)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN35_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _forget_towers():
    from qwen35.gguf_checkpoint import _EXPLICIT_MMPROJ

    yield
    _EXPLICIT_MMPROJ.clear()  # (process-wide, as --mmproj is)


def _blob(store: Path, src: Path) -> str:
    digest = "sha256:" + hashlib.sha256(src.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, store / "blobs" / digest.replace(":", "-"))
    return digest


def _manifest(store: Path, name: str, layers: dict[str, str]) -> Path:
    """name: HOST/NAMESPACE/MODEL/TAG; layers: media type -> digest."""
    p = store / "manifests" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schemaVersion": 2,
           "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                      "digest": "sha256:" + "0" * 64, "size": 2},
           "layers": [{"mediaType": k, "digest": v, "size": 1} for k, v in layers.items()]}
    p.write_text(json.dumps(doc))
    return p


def test_names_read_as_ollama_reads_them():
    cases = {
        "ollama:qwen3.5": ("registry.ollama.ai", "library", "qwen3.5", "latest"),
        "ollama:qwen3.5:0.8b": ("registry.ollama.ai", "library", "qwen3.5", "0.8b"),
        "OLLAMA:me/tuned:q8": ("registry.ollama.ai", "me", "tuned", "q8"),
        "ollama:hf.co/unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M":
            ("hf.co", "unsloth", "Qwen3.5-0.8B-GGUF", "Q4_K_M"),
    }  # fmt: skip
    for spec, want in cases.items():
        assert parse_ollama_name(spec).parts() == want, spec
    assert parse_ollama_name("ollama:qwen3.5").short() == "qwen3.5:latest"
    assert parse_ollama_name("ollama:me/tuned:q8").short() == "me/tuned:q8"
    short = parse_ollama_name("ollama:hf.co/unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M").short()
    assert short == "hf.co/unsloth/Qwen3.5-0.8B-GGUF:Q4_K_M"
    assert parse_ollama_name("ollama:localhost:5000/me/m:q8").parts() == ("localhost:5000", "me",
                                                                           "m", "q8")
    for bad in ("ollama:", "ollama:a/b/c/d", "ollama:qwen3.5:", "ollama://x", "ollama:m@sha256:0",
                "ollama:../x", "ollama:a/../x", "ollama:.hidden", "ollama:m:../../x"):
        with pytest.raises(Qwen35Error, match="Ollama model name|digest"):
            parse_ollama_name(bad)


def _vlm_store(tmp_path, monkeypatch):
    """A tiny VLM as a GGUF file with its mmproj beside it, and the same two files as an Ollama
    store's blobs under `tiny`; an F16 file of it, without a tower, under an hf.co name (what
    `ollama pull hf.co/...` keeps)."""
    from test_gguf import _vlm_source

    src, tokens = _vlm_source(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    f = write_gguf(src, models / "m.gguf", "F32", tokens=tokens, eos=1)
    tower = write_mmproj(src, models / "mmproj-F32.gguf", "F32")
    store = tmp_path / "ollama"
    params = tmp_path / "params.json"  # (as a Modelfile's PARAMETER lines are kept)
    params.write_text(json.dumps({"temperature": 0.6, "top_k": 20, "repeat_penalty": 1.1,
                                  "top_p": "high", "stop": ["<|im_end|>"], "num_ctx": 4096}))
    layers = {MODEL: _blob(store, f), PROJECTOR: _blob(store, tower), PARAMS: _blob(store, params),
              "application/vnd.ollama.image.template": "sha256:" + "1" * 64}  # fmt: skip
    _manifest(store, "registry.ollama.ai/library/tiny/latest", layers)
    f16 = write_gguf(src, tmp_path / "m-f16.gguf", "F16", tokens=tokens, eos=1)
    _manifest(store, "hf.co/someone/Tiny-GGUF/F16", {MODEL: _blob(store, f16)})
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return src, f, store, layers


def test_an_ollama_model_is_its_blobs(tmp_path, monkeypatch):
    """`ollama:tiny` loads the model blob as the GGUF file it is (no .gguf suffix: read by its
    magic bytes) with the projector blob as its vision tower: the same weights, and the same
    tokens for an image request, as the file with its mmproj beside it; its params layer's
    sampling values the engine takes become its request defaults (unless the options give
    their own); a manifest without a projector loads text only, without params no defaults."""
    from qwen35 import LLM
    from qwen35.loader import load_model
    from test_vision_engine import GREEDY, rand_image, req

    _, f, store, layers = _vlm_store(tmp_path, monkeypatch)
    src = resolve_ollama("ollama:tiny")
    assert Path(src.path) == store / "blobs" / layers[MODEL].replace(":", "-")
    assert Path(src.mmproj) == store / "blobs" / layers[PROJECTOR].replace(":", "-")
    assert src.names == ("tiny", "tiny:latest") and dict(src.sampling) == SAMPLING
    assert is_gguf_file(src.path) and not is_gguf_file(tmp_path / "vlm" / "config.json")
    assert resolve_ollama("ollama:TINY:LATEST").path == src.path  # (names: any case)

    want = load_model(f, dtype="fp32", vision="auto").state_dict()
    got = load_model("ollama:tiny", dtype="fp32", vision="auto").state_dict()
    assert got.keys() == want.keys() and any(k.startswith("model.visual.") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)

    opts = dict(dtype="fp32", max_num_seqs=2, max_model_len=256, block_size=8, verbose=False)
    img = rand_image(90, 130, 0)
    ours = LLM("ollama:tiny", **opts)
    assert ours.engine.has_vision and ours.engine.default_sampling == SAMPLING
    mine = LLM("ollama:tiny", override_generation_config={"top_p": 0.5}, **opts)
    assert mine.engine.default_sampling == {"top_p": 0.5}  # (the user's own, not Ollama's)
    a = ours.generate(req(img), GREEDY)[0].outputs[0].token_ids
    assert a == LLM(str(f), **opts).generate(req(img), GREEDY)[0].outputs[0].token_ids
    text = LLM("ollama:hf.co/someone/Tiny-GGUF:F16", **opts)
    assert not text.engine.has_vision and text.engine.default_sampling == {}


def test_the_cli_serves_it_under_ollamas_names(tmp_path, monkeypatch, capsys):
    """The commands take `ollama:NAME` where they take a model: the engine commands get the blob
    and its tower as --mmproj, its sampling as --override-generation-config (one named on the
    command line wins), `serve` answers to the
    name typed and Ollama's full name (clients that called Ollama keep their `model`), and
    `plan` plans the blob as the GGUF file it is, `quantize` writes it out with its tower."""
    from qwen35.cli import _local_models, main

    _, f, store, layers = _vlm_store(tmp_path, monkeypatch)
    blob = str(store / "blobs" / layers[MODEL].replace(":", "-"))
    tower = str(store / "blobs" / layers[PROJECTOR].replace(":", "-"))
    args = argparse.Namespace(command="serve", model="ollama:tiny", mmproj=None,
                              served_model_name=None, override_generation_config=None)  # fmt: skip
    _local_models(args)
    assert (args.model, args.mmproj) == (blob, tower)
    assert args.served_model_name == ["tiny", "tiny:latest"]
    assert args.override_generation_config == SAMPLING
    args = argparse.Namespace(command="serve", model="ollama:tiny", mmproj="/x/mine.gguf",
                              served_model_name=["mine"])  # fmt: skip
    _local_models(args)
    assert (args.mmproj, args.served_model_name) == ("/x/mine.gguf", ["mine"])
    args = argparse.Namespace(command="run-batch", model="ollama:tiny", mmproj=None,
                              served_model_name=None)  # fmt: skip
    _local_models(args)
    assert args.served_model_name == "tiny"

    assert main(["plan", "-m", "ollama:tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny:latest" in out and "(F32)" in out, out  # (the blob named as Ollama names it)
    assert main(["plan", "-m", "ollama:tiny", "--cpu-memory", "4", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["models"]
    assert row["memory"]["serve"].startswith("qwen35 serve --model ollama:tiny:latest ")
    assert main(["plan", "-m", "ollama:nope"]) == 2
    assert "Ollama has no model nope:latest" in capsys.readouterr().err
    out_dir = tmp_path / "bf16"  # quantize: the blob and its tower, as a checkpoint directory
    assert main(["quantize", "ollama:tiny", str(out_dir), "--to", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(str(out_dir / "model-00001-of-00001.safetensors"), "pt") as h:
        assert any(k.startswith("model.visual.") for k in h.keys())


def test_what_is_not_an_ollama_gguf_model_is_refused(tmp_path, monkeypatch):
    _, f, store, layers = _vlm_store(tmp_path, monkeypatch)
    with pytest.raises(Qwen35Error, match=r"no model tiny:q4.*did you mean tiny:latest"):
        resolve_ollama("ollama:tiny:q4")
    _manifest(store, "registry.ollama.ai/library/lora/latest",
              {MODEL: layers[MODEL], "application/vnd.ollama.image.adapter": "sha256:" + "2" * 64})
    with pytest.raises(Qwen35Error, match="adapter layer"):
        resolve_ollama("ollama:lora")
    _manifest(store, "registry.ollama.ai/library/notext/latest", {PROJECTOR: layers[PROJECTOR]})
    with pytest.raises(Qwen35Error, match="no GGUF weights layer"):
        resolve_ollama("ollama:notext")
    _manifest(store, "registry.ollama.ai/library/gone/latest", {MODEL: "sha256:" + "3" * 64})
    with pytest.raises(Qwen35Error, match="is missing .*pull"):
        resolve_ollama("ollama:gone")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a gguf file")
    _manifest(store, "registry.ollama.ai/library/junk/latest", {MODEL: _blob(store, junk)})
    with pytest.raises(Qwen35Error, match="is not a GGUF file"):
        resolve_ollama("ollama:junk")
    (store / "manifests" / "registry.ollama.ai" / "library" / "broken").mkdir()
    (store / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest").write_text("{")
    with pytest.raises(Qwen35Error, match="not an Ollama manifest"):
        resolve_ollama("ollama:broken")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(Qwen35Error, match="no Ollama models directory .*OLLAMA_MODELS"):
        resolve_ollama("ollama:tiny")
    # a file without a suffix that is not GGUF: still "pass the model directory"
    from qwen35.loader import load_model

    with pytest.raises(Qwen35Error, match="is a file; pass the model directory"):
        load_model(junk, dtype="fp32")


def test_ollamas_layout_key_is_read(tmp_path, monkeypatch):
    """Ollama's files say `ssm.v_head_reordered` (true for Qwen 3.5, as llama.cpp always tiles
    the V heads): true loads as the file always did, false (Qwen3-Next's layout) is refused."""
    from qwen35 import gguf_checkpoint as gc
    from tiny import save_checkpoint

    src = tmp_path / "src"
    save_checkpoint(src, layout="vlm", vocab_size=512)
    f = write_gguf(src, tmp_path / "m.gguf", "F32")
    real = gc.metadata
    for flag in (True, False):
        monkeypatch.setattr(gc, "metadata", lambda p, flag=flag: {
            **real(p), "qwen35.ssm.v_head_reordered": flag})
        monkeypatch.setenv("QWEN35_CACHE_DIR", str(tmp_path / f"cache-{flag}"))
        if flag:
            assert gc.model_dir(f).is_dir()
        else:
            with pytest.raises(gc.GGUFError, match="V heads are not tiled"):
                gc.model_dir(f)


# ---- Hub GGUF repositories ------------------------------------------------------------------
REPO_FILES = ["README.md", "Tiny-Q4_K_M.gguf", "Tiny-Q4_K.gguf", "Tiny-UD-Q4_K_XL.gguf",
              "Q8_0/Tiny-Q8_0-00001-of-00002.gguf", "Q8_0/Tiny-Q8_0-00002-of-00002.gguf",
              "mmproj-F32.gguf", "mmproj-F16.gguf", "mmproj-BF16.gguf"]  # fmt: skip


def test_the_quantization_is_picked_as_llama_cpp_does():
    from qwen35.model_source import is_hub_gguf, pick_gguf

    assert pick_gguf(REPO_FILES, None, "r") == (["Tiny-Q4_K_M.gguf"], "mmproj-F16.gguf")
    assert pick_gguf(REPO_FILES, "Q4_K", "r")[0] == ["Tiny-Q4_K.gguf"]  # (not Q4_K_M)
    assert pick_gguf(REPO_FILES, "ud-q4_k_xl", "r")[0] == ["Tiny-UD-Q4_K_XL.gguf"]
    assert pick_gguf(REPO_FILES, "Q8_0", "r")[0] == [
        "Q8_0/Tiny-Q8_0-00001-of-00002.gguf", "Q8_0/Tiny-Q8_0-00002-of-00002.gguf"]
    assert pick_gguf(["a-BF16.gguf", "mmproj-x.gguf"], None, "r") == (["a-BF16.gguf"],
                                                                       "mmproj-x.gguf")
    for names, tag, why in ((REPO_FILES, "Q2_K", "no Q2_K file.*Tiny-Q4_K_M.gguf"),
                            (["a-Q8_0.gguf", "a-F16.gguf"], None, "no Q4_K_M file"),
                            (["README.md", "mmproj-F16.gguf"], None, "holds no GGUF model"),
                            (REPO_FILES[:5] + REPO_FILES[6:], "Q8_0",
                             "one of 2 shards .*00002-of-00002.gguf is not")):
        with pytest.raises(Qwen35Error, match=why):
            pick_gguf(names, tag, "r")
    assert is_hub_gguf("unsloth/Qwen3.5-4B-GGUF") and is_hub_gguf("someone/tiny:Q8_0")
    assert is_hub_gguf("hf.co/unsloth/Qwen3.5-4B-GGUF:Q4_K_M")  # (as Ollama's pull names it)
    assert not is_hub_gguf("Qwen/Qwen3.5-0.8B") and not is_hub_gguf("27B")


def _hub_repo(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A tiny VLM's Q8_0 file and F16 mmproj in an offline Hugging Face cache as `hf download`
    leaves them (snapshot names are links into blobs/), -> (snapshot dir, source checkpoint)."""
    from test_gguf import _vlm_source
    from tiny import hub_snapshot

    src, tokens = _vlm_source(tmp_path)
    snap = hub_snapshot(tmp_path, monkeypatch, "someone/Tiny-GGUF")
    blobs = snap.parent.parent / "blobs"
    blobs.mkdir()
    snap.mkdir(parents=True)
    made = {"Tiny-Q8_0.gguf": write_gguf(src, tmp_path / "q8.gguf", "Q8_0", tokens=tokens, eos=1),
            "mmproj-F16.gguf": write_mmproj(src, tmp_path / "t16.gguf", "F16")}  # fmt: skip
    for name, f in made.items():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.move(f, blob)
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    return snap, src


def test_a_hub_gguf_repository_loads_from_the_cache(tmp_path, monkeypatch, capsys):
    """`someone/Tiny-GGUF:Q8_0` is the cached Q8_0 file with the mmproj beside it (names and
    folder the snapshot's links', not the blobs'), as the file named by its path; no tag: the
    only file; a quantization that is not there, or a repository not cached, is refused
    offline with how to fetch it; `plan` plans the cached file and never downloads."""
    from qwen35 import LLM
    from qwen35.cli import main
    from qwen35.model_source import local

    snap, _ = _hub_repo(tmp_path, monkeypatch)
    src = local("someone/Tiny-GGUF:Q8_0")
    assert (src.path, src.mmproj, src.names) == (str(snap / "Tiny-Q8_0.gguf"),
                                                 str(snap / "mmproj-F16.gguf"),
                                                 ("someone/Tiny-GGUF:Q8_0",))  # fmt: skip
    opts = dict(dtype="fp32", max_num_seqs=2, max_model_len=256, block_size=8, verbose=False)
    assert local("hf.co/someone/Tiny-GGUF:Q8_0").path == src.path
    llm = LLM("someone/Tiny-GGUF:q8_0", **opts)
    assert llm.engine.has_vision and llm.engine.config.name == "Tiny-Q8_0"
    by_path = LLM(str(snap / "Tiny-Q8_0.gguf"), **opts)  # (a link: named and paired as one)
    assert by_path.engine.has_vision and by_path.engine.config.name == "Tiny-Q8_0"
    from qwen35.request import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8)
    a = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert a == by_path.generate([[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert local("someone/Tiny-GGUF").path == src.path  # (no tag, no Q4_K_M: the only file)
    with pytest.raises(Qwen35Error, match="has no Q4_K file; .*Tiny-Q8_0.gguf"):
        local("someone/Tiny-GGUF:Q4_K")
    with pytest.raises(Qwen35Error, match="not in the Hugging Face cache .*HF_HUB_OFFLINE.*hf "
                                          "download other/Thing-GGUF"):
        LLM("other/Thing-GGUF:Q4_0", **opts)
    assert main(["plan", "-m", "someone/Tiny-GGUF:Q8_0"]) == 0
    assert "Tiny-Q8_0" in capsys.readouterr().out
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["plan", "-m", "other/Thing-GGUF:Q4_0"]) == 2
    assert "plan reads the file, not the Hub" in capsys.readouterr().err


def test_only_the_chosen_files_are_downloaded(tmp_path, monkeypatch):
    """Not cached and online: the repository's file list, then a download of the chosen shards
    and mmproj only (huggingface_hub's calls stood in for: no network in tests); a failed
    download says how to fetch it by hand."""
    import huggingface_hub

    from qwen35.model_source import local

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched = []

    def download(repo, name, cache_dir=None):
        fetched.append((repo, name))
        out = tmp_path / "dl" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"GGUF")
        return str(out)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: REPO_FILES)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    src = local("someone/Big-GGUF:Q8_0")
    assert fetched == [("someone/Big-GGUF", "Q8_0/Tiny-Q8_0-00001-of-00002.gguf"),
                       ("someone/Big-GGUF", "Q8_0/Tiny-Q8_0-00002-of-00002.gguf"),
                       ("someone/Big-GGUF", "mmproj-F16.gguf")]  # fmt: skip
    assert src.path == str(tmp_path / "dl" / "Q8_0/Tiny-Q8_0-00001-of-00002.gguf")

    def refused(repo, name, cache_dir=None):
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refused)
    with pytest.raises(Qwen35Error, match="failed .*connection reset.*hf download"):
        local("someone/Big-GGUF")
