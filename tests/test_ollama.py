"""Models that Ollama has pulled (`ollama:NAME[:TAG]`, model_source.py): the name read as Ollama
reads it, the manifest's GGUF blob loaded as the file it is and its projector blob as the vision
tower, a server answering to Ollama's names; a store without the model, or a manifest that is not
a GGUF model, refused with the reason. The store is built here as Ollama lays it out (manifests/
HOST/NAMESPACE/MODEL/TAG, blobs/sha256-HEX); GGUF files as tests/gguf_writer.py writes them."""

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
    for bad in ("ollama:", "ollama:a/b/c/d", "ollama:qwen3.5:", "ollama://x", "ollama:m@sha256:0"):
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
    from qwen35.cli import _ollama_models, main

    _, f, store, layers = _vlm_store(tmp_path, monkeypatch)
    blob = str(store / "blobs" / layers[MODEL].replace(":", "-"))
    tower = str(store / "blobs" / layers[PROJECTOR].replace(":", "-"))
    args = argparse.Namespace(command="serve", model="ollama:tiny", mmproj=None,
                              served_model_name=None, override_generation_config=None)  # fmt: skip
    _ollama_models(args)
    assert (args.model, args.mmproj, args.served_model_name) == (blob, tower,
                                                                 ["tiny", "tiny:latest"])  # fmt: skip
    assert args.override_generation_config == SAMPLING
    args = argparse.Namespace(command="serve", model="ollama:tiny", mmproj="/x/mine.gguf",
                              served_model_name=["mine"])  # fmt: skip
    _ollama_models(args)
    assert (args.mmproj, args.served_model_name) == ("/x/mine.gguf", ["mine"])
    args = argparse.Namespace(command="run-batch", model="ollama:tiny", mmproj=None,
                              served_model_name=None)  # fmt: skip
    _ollama_models(args)
    assert args.served_model_name == "tiny"

    assert main(["plan", "-m", "ollama:tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny:latest" in out and "(F32)" in out, out  # (the blob named as Ollama names it)
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
