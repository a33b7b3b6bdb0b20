"""A broken model directory is a one-line error, never a traceback: the CLI (`generate`,
`generate --chat`, `plan -m`, `quantize`) run in-process on tiny checkpoints that were damaged on
purpose, one way at a time (the regressions: each failed with a traceback before) and at random
(`_mutate`: config values of the wrong type, truncated / rewritten files, safetensors headers with
bad dtypes, shapes, offsets and entries, NaN weights, broken templates and tokenizer files)."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from test_tokenizer import _train_tiny
from tiny import save_checkpoint, save_fp8_checkpoint

TEMPLATE = Path(__file__).parent / "fixtures" / "qwen3_5_chat_template.jinja"


def _add_files(d: Path) -> Path:
    """The files a release has beside its weights: tokenizer.json (a tiny trained BPE),
    tokenizer_config.json with the chat template, generation and preprocessor configs."""
    _train_tiny(d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": TEMPLATE.read_text()}))
    gen = {"eos_token_id": [401, 402], "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    (d / "generation_config.json").write_text(json.dumps(gen))
    pre = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}  # fmt: skip
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    return d


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    dense = root / "dense"
    save_checkpoint(dense, shards=2, dtype=torch.bfloat16, vocab_size=512)
    fp8 = root / "fp8moe"
    save_fp8_checkpoint(fp8, root / "fp8_bf16", moe=True, experts="fused", vocab_size=512,
                        hidden_size=128, moe_intermediate_size=128)  # fmt: skip
    return {"dense": _add_files(dense), "fp8moe": _add_files(fp8)}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in this process: (exit status, stderr). Anything but a clean exit fails."""
    from qwen35.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def generate(d: Path, *extra: str) -> list[str]:
    return ["generate", str(d), "--prompt", "Hi there", "--max-tokens", "3", "--max-memory",
            "256MiB", *extra]  # fmt: skip


def copy(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(base, d)
    return d


# ---- safetensors headers ------------------------------------------------------------------------
def read_header(f: Path) -> tuple[dict, bytes]:
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def write_header(f: Path, head: dict, data: bytes) -> None:
    h = json.dumps(head).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_header(f: Path, fn) -> None:
    head, data = read_header(f)
    fn(head)
    write_header(f, head, data)


def a_tensor(head: dict, part: str) -> str:
    return next(k for k in head if part in k)


@pytest.mark.parametrize("command", ["generate", "quantize"])
@pytest.mark.parametrize(
    "damage",
    [
        lambda h: h[a_tensor(h, "norm.weight")].update(dtype="U8"),  # size no longer matches
        lambda h: h[a_tensor(h, "in_proj_z")].update(shape=[0, 0]),
        lambda h: h.update(__metadata__="x"),
        lambda h: h.update({a_tensor(h, "embed_tokens"): {"dtype": "BF16"}}),
    ],
    ids=["dtype", "shape", "metadata", "entry"],
)
def test_a_corrupt_safetensors_header_names_the_file(bases, tmp_path, capsys, command, damage):
    """safetensors' own errors were tracebacks where the loader's vision probe and
    `qwen35 quantize` opened files themselves; every open now goes through one helper."""
    d = copy(bases["dense"], tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    if not any("embed_tokens" in k for k in read_header(shard)[0]):
        shard = d / "model-00002-of-00002.safetensors"
    edit_header(shard, damage)
    argv = generate(d) if command == "generate" else ["quantize", str(d), str(tmp_path / "o")]
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and err.startswith(f"error: cannot read {shard}"), err
    assert not (tmp_path / "o").exists()


def test_an_index_mapping_a_tensor_to_no_file_is_refused(bases, tmp_path, capsys):
    d = copy(bases["dense"], tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = False
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    for argv in (generate(d), ["quantize", str(d), str(tmp_path / "o")]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and "not a valid safetensors index: 'weight_map' must map" in err, err


def test_quantize_checks_the_weights_before_writing(bases, tmp_path, capsys):
    """An FP8 scale of the wrong shape (same bytes) was copied through to the output, which then
    failed to load; `qwen35 quantize` now scans the checkpoint as loading does, first."""
    d = copy(bases["fp8moe"], tmp_path)
    key = "model.language_model.layers.0.linear_attn.in_proj_z.weight_scale_inv"
    edit_header(d / "model.safetensors", lambda h: h[key].update(shape=[1]))
    rc, err = run_cli(["quantize", str(d), str(tmp_path / "o"), "--to", "fp8"], capsys)
    assert rc == 2 and "does not match its config" in err and key in err, err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    shutil.rmtree(d)
    rc, err = run_cli(["quantize", str(copy(bases["fp8moe"], tmp_path)), str(tmp_path / "o")],
                      capsys)  # fmt: skip
    assert rc == 0 and (tmp_path / "o" / "model.safetensors.index.json").is_file(), err


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-1"])
def test_quantize_shard_size_must_be_a_positive_number(bases, tmp_path, capsys, size):
    argv = ["quantize", str(bases["dense"]), str(tmp_path / "o"), "--shard-size", size]
    rc, err = run_cli(argv, capsys)  # (nan: a ValueError traceback before, inf an OverflowError)
    assert rc == 2 and "--shard-size must be a positive number of GiB" in err, err
    assert not (tmp_path / "o").exists()


# ---- config, generation and preprocessor files ---------------------------------------------------
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rms_norm_eps", [], "'text_config.rms_norm_eps' must be a positive number, got []"),
        ("rms_norm_eps", 0, "'text_config.rms_norm_eps' must be a positive number, got 0"),
        ("rope_theta", "", "'text_config.rope_theta' must be a positive number"),
        ("partial_rotary_factor", 2, "'text_config.partial_rotary_factor' must be a number in (0, 1]"),
        ("mrope_section", "abc", "'text_config.rope_parameters.mrope_section' must list"),
        ("eos_token_id", "abc", "'eos_token_id' must be a token id or a list of them"),
        ("eos_token_id", [1, 0.5], "'eos_token_id' must be a token id or a list of them"),
        ("vision:depth", "x", "'vision_config' has a value of the wrong type"),
        ("vision:num_heads", -1, "'vision_config' sizes must be positive integers"),
        # each built 10**12 modules (memory ran out) before anything compared them with weights
        ("vision:depth", 10**12, "'vision_config.depth' is 1,000,000,000,000: beyond"),
        ("num_hidden_layers", 10**12, "'text_config.num_hidden_layers' is 1,000,000,000,000"),
    ],
)
def test_config_values_of_the_wrong_type_name_the_field(bases, tmp_path, capsys, field, value,
                                                          message):  # fmt: skip
    d = copy(bases["dense"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    if field.startswith("vision:"):
        cfg["vision_config"][field[7:]] = value
    elif field in ("partial_rotary_factor", "rope_theta", "mrope_section"):
        cfg["text_config"]["rope_parameters"][field] = value
    else:
        cfg["text_config"][field] = value
        cfg["text_config"].pop("layer_types") if field == "num_hidden_layers" else None
    (d / "config.json").write_text(json.dumps(cfg))
    for argv in (generate(d), ["plan", "-m", str(d), "--context", "4096"]):
        rc, err = run_cli(argv, capsys)
        assert rc == 2 and message in err, err


@pytest.mark.parametrize(
    "field,value",
    [("weight_block_size", [0.5, 128]), ("weight_block_size", 128), ("modules_to_not_convert", "x")],
)
def test_fp8_quantization_config_of_the_wrong_type(bases, tmp_path, capsys, field, value):
    """A block size of 0.5 was an integer modulo by zero in the first FP8 layer."""
    d = copy(bases["fp8moe"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli(generate(d), capsys)
    assert rc == 2 and f"'quantization_config.{field}' must be" in err, err


def test_generation_config_eos_of_the_wrong_type(bases, tmp_path, capsys):
    d = copy(bases["dense"], tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [401, {}]}))
    rc, err = run_cli(generate(d), capsys)
    assert rc == 2 and "generation_config.json: 'eos_token_id' must be a token id" in err, err


@pytest.mark.parametrize(
    "field,value",
    [("merge_size", "float8"), ("patch_size", 0), ("image_std", [0.5, 0, 0.5]), ("image_mean", 3)],
)
def test_preprocessor_config_values_of_the_wrong_type(bases, tmp_path, capsys, field, value):
    d = copy(bases["dense"], tmp_path)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**pre, field: value}))
    rc, err = run_cli(generate(d), capsys)
    assert rc == 2 and "preprocessor_config.json has a value of the wrong type" in err, err
    assert field in err, err


# ---- at random ------------------------------------------------------------------------------------
WEIRD = [None, -1, 0, 1, 3, 10**12, 0.5, 1e308, float("nan"), "abc", "", [], [1], {}, {"a": 1},
         True, False, "bfloat16"]  # fmt: skip


def _paths(obj, path=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:4]) if isinstance(obj, list) else ()
    for k, v in items:
        yield path + (k,)
        yield from _paths(v, path + (k,))


def _mutate_json(f: Path, r: random.Random) -> str:
    text = f.read_text()
    if r.random() < 0.1:
        f.write_text(r.choice([text[: r.randrange(len(text))], "[]", "null", "", "{"]))
        return f"rewrite {f.name}"
    obj = json.loads(text)
    path = r.choice(list(_paths(obj)) or [None])
    if path is None:
        return "none"
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if r.random() < 0.3:
        del parent[path[-1]]
        desc = f"del {f.name}:{path}"
    else:
        parent[path[-1]] = v = r.choice(WEIRD)
        desc = f"set {f.name}:{path}={v!r}"
    f.write_text(json.dumps(obj))
    return desc


def _mutate_weights(f: Path, r: random.Random) -> str:
    head, data = read_header(f)
    k = r.choice([k for k in head if k != "__metadata__"])
    kind = r.randrange(8)
    if kind == 0:
        b = f.read_bytes()
        f.write_bytes(b[: r.randrange(len(b))])
        return f"truncate {f.name}"
    if kind == 1:
        b = bytearray(f.read_bytes())
        n = struct.unpack("<Q", b[:8])[0]
        for _ in range(r.randint(1, 4)):
            b[r.randrange(8 + n)] = r.randrange(256)
        f.write_bytes(bytes(b))
        return f"flip header bytes {f.name}"
    if kind == 2:
        head[k]["dtype"] = r.choice(["F8_E4M3", "I8", "I32", "F64", "BOOL", "U8", "F16", "XX"])
    elif kind == 3:
        s = head[k]["shape"]
        head[k]["shape"] = r.choice([s[:-1], s + [1], s[::-1], [0] * len(s)])
    elif kind == 4:
        a, e = head[k]["data_offsets"]
        head[k]["data_offsets"] = r.choice([[a, e + 8], [a + 2, e], [e, a], [a, 10**12]])
    elif kind == 5:
        head[k + ".x" if r.random() < 0.5 else k.replace("layers.", "layers.9")] = head.pop(k)
    elif kind == 6:
        del head[k]
    else:  # NaN / inf values (bf16 and fp32 alike: the high half of an fp32 NaN is a bf16 NaN)
        a, e = head[k]["data_offsets"]
        d = bytearray(data)
        for i in range(a, e - 1, 2):
            if r.random() < 0.5:
                d[i : i + 2] = b"\xc0\x7f"
        data = bytes(d)
    write_header(f, head, data)
    return f"{('dtype', 'shape', 'offsets', 'rename', 'drop', 'nan')[kind - 2]} {k}"


def _mutate(d: Path, r: random.Random) -> str:
    files = sorted(p for p in d.iterdir() if p.is_file())
    x = r.random()
    if x < 0.05:
        victim = r.choice(files)
        victim.unlink()
        return f"delete {victim.name}"
    if x < 0.5:
        jsons = [p for p in files if p.suffix == ".json" and p.name != "tokenizer.json"]
        return _mutate_json(r.choice(jsons + [d / "config.json"] * 3), r)
    if x < 0.55:
        t = (d / "tokenizer.json").read_text()
        (d / "tokenizer.json").write_text(t[: r.randrange(len(t))])
        return "truncate tokenizer.json"
    if x < 0.6:
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = r.choice(["{% if %}", "{{ raise_exception('no') }}", 3, None,
                                        "{% for m in messages %}{{ m.content + 1 }}{% endfor %}"])  # fmt: skip
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        return f"template {tc['chat_template']!r}"
    return _mutate_weights(r.choice([p for p in files if p.suffix == ".safetensors"]), r)


def _fuzz(bases, tmp_path, capsys, base: str, seeds) -> None:
    for seed in seeds:
        r = random.Random(seed)
        d = tmp_path / f"c{seed}"
        shutil.copytree(bases[base], d)
        done = []
        for _ in range(r.choice([1, 1, 1, 2])):
            try:
                done.append(_mutate(d, r))
            except (ValueError, OSError, KeyError, IndexError, struct.error):
                done.append("(a second change to a file the first broke)")
        which = r.choice(["generate", "generate", "chat", "plan", "quantize"])
        argv = {
            "generate": generate(d, *r.choice([[], ["--quantization", "int8"], ["--quantization",
                                               "int4"], ["--quantization", "fp8"]])),  # fmt: skip
            "chat": generate(d, "--chat"),
            "plan": ["plan", "-m", str(d), "--context", "4096"],
            "quantize": ["quantize", str(d), str(tmp_path / f"q{seed}")],
        }[which]
        try:
            rc, err = run_cli(argv, capsys)
        except BaseException as e:
            raise AssertionError(f"seed {seed} {which} after {done}: {e!r}") from e
        assert rc in (0, 2), (seed, which, done, rc, err)
        assert rc == 0 or err.startswith("error:"), (seed, which, done, err)
        shutil.rmtree(d)
        shutil.rmtree(tmp_path / f"q{seed}", ignore_errors=True)


@pytest.mark.parametrize("base", ["dense", "fp8moe"])
def test_damaged_checkpoints_at_random(bases, tmp_path, capsys, base):
    _fuzz(bases, tmp_path, capsys, base, range(40))


@pytest.mark.slow
@pytest.mark.parametrize("base", ["dense", "fp8moe"])
def test_damaged_checkpoints_at_random_more(bases, tmp_path, capsys, base):
    _fuzz(bases, tmp_path, capsys, base, range(40, 400))
