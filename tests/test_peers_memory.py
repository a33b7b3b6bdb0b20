"""The peers workload on models whose engines do not fit in memory together (a 4B's five engines
are ~30 GB): one pair at a time, what cannot fit skipped with the reason, every engine freed
before the next pair loads; the converter's checkpoint written in shards. No timings asserted."""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref

import pytest
from rich.console import Console
from safetensors.torch import load_file

from qwen35.benchmarks import gguf, peers
from qwen35.benchmarks.common import BenchOptions, load_bench_model
from qwen35.benchmarks.report import print_workload
from tiny import tiny_config_dict

FORMATS = ("bf16", "int8", "int4", "fp8")


@pytest.fixture(scope="module")
def bm_opts(tmp_path_factory):
    d = tiny_config_dict(model_type="qwen3_5_text", vocab_size=512)
    d["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    path = tmp_path_factory.mktemp("peers") / "config.json"
    path.write_text(json.dumps(d))
    opts = BenchOptions(model=str(path), quick=True, threads=None, formats=FORMATS)
    return load_bench_model(opts), opts


class _File:
    def __init__(self, n):
        self.n = n

    def stat(self):
        return type("S", (), {"st_size": self.n})()


def test_groups_all_together_when_they_fit(bm_opts):
    bm, opts = bm_opts
    paths = {"bf16": _File(100), "q8_0": _File(60), "q4_0": _File(40)}
    groups, skipped, release = peers.engine_groups(bm, FORMATS, paths, opts, available=1 << 40)
    assert groups == [["qwen35 bf16", "llama.cpp bf16", "qwen35 int8", "llama.cpp q8_0",
                       "qwen35 int4", "llama.cpp q4_0", "qwen35 fp8"]]  # fmt: skip
    assert skipped == {} and release is None
    # unknown memory (no /proc/meminfo): assumed to fit, as before
    assert peers.engine_groups(bm, FORMATS, paths, opts, available=None)[0] == groups


def test_groups_one_pair_at_a_time_and_what_cannot_fit(bm_opts):
    bm, opts = bm_opts
    need = {f: peers.our_bytes(bm, f, opts) for f in FORMATS}
    assert need["bf16"] == 0  # the bench model itself (loaded already)
    assert need["int4"] < need["int8"] < need["fp8"] * 1.2 and need["int8"] > 0
    q8, q4 = need["int8"], need["int4"]
    # every pair fits alone, not all together
    paths = {"bf16": _File(q8), "q8_0": _File(q8), "q4_0": _File(q4)}
    avail = 2 * q8 + 1
    groups, skipped, release = peers.engine_groups(bm, FORMATS, paths, opts, available=avail)
    assert groups == [["qwen35 bf16", "llama.cpp bf16"], ["qwen35 int8", "llama.cpp q8_0"],
                      ["qwen35 int4", "llama.cpp q4_0"], ["qwen35 fp8"]]  # fmt: skip
    assert skipped == {} and release is None
    # the bench model's own format runs first, whatever the order asked
    order = ("int8", "bf16", "int4")
    got = peers.engine_groups(bm, order, paths, opts, available=avail)[0]
    assert [g[0] for g in got] == ["qwen35 bf16", "qwen35 int8", "qwen35 int4"]
    # a pair that fits only without the bench model's weights: they are freed before it
    w = bm.weight_bytes
    paths["q8_0"] = _File(avail - q8 + w // 2)
    groups, skipped, release = peers.engine_groups(bm, FORMATS, paths, opts, available=avail)
    assert skipped == {} and release == 1 and groups[1] == ["qwen35 int8", "llama.cpp q8_0"]
    # a twin that does not fit beside ours even then is skipped (ours runs alone)
    paths["q8_0"] = _File(avail - q8 + w + 1)
    groups, skipped, release = peers.engine_groups(bm, FORMATS, paths, opts, available=avail)
    assert ["qwen35 int8"] in groups and "llama.cpp q8_0" not in str(groups) and release is None
    assert set(skipped) == {"llama.cpp q8_0"} and "available" in skipped["llama.cpp q8_0"]
    # ours too large even alone (and a bench model too small to make room): skipped
    paths["q8_0"] = _File(q8)
    small = dataclasses.replace(bm, weight_bytes=0)
    groups, skipped, release = peers.engine_groups(small, FORMATS, paths, opts, available=q4 + 1)
    assert groups[0] == ["qwen35 bf16"] and ["qwen35 int4"] in groups
    assert {"qwen35 int8", "qwen35 fp8", "llama.cpp bf16"} <= set(skipped)
    assert "with nothing else loaded" in skipped["qwen35 int8"]


def test_peers_one_pair_at_a_time_end_to_end(bm_opts, monkeypatch):
    """Forced into pairs (memory said to be short): every engine measured, rows and ratios as
    in one group, each engine freed (nothing keeps its model alive) before the next loads."""
    bm, opts = bm_opts

    def pairs(bm, formats, paths, opts, available=None):  # engine_groups' answer, memory short
        twin = lambda f: [f"llama.cpp {peers.PAIRS[f]}"] if peers.PAIRS.get(f) in paths else []  # noqa: E731
        return [[f"qwen35 {f}", *twin(f)] for f in formats], {}, 1  # the bench model freed too

    monkeypatch.setattr(peers, "engine_groups", pairs)
    alive = {}
    load = peers._load_engine

    def tracked(name, *a):
        eng, facts = load(name, *a)
        if isinstance(eng, peers._Ours) and eng.bm is not bm:
            for g in alive.values():  # the pair before this one is gone already
                gc.collect()
                assert g() is None
            alive[name] = weakref.ref(eng.bm.model)
        return eng, facts

    monkeypatch.setattr(peers, "_load_engine", tracked)
    first = weakref.ref(bm.model)
    before = {n: t.clone() for n, t in bm.model.state_dict().items()}
    doc = peers.run_peers(bm, opts)
    assert len(doc["groups"]) == len(FORMATS) and doc["skipped"] == {}
    assert doc["bench_model_released_before_group"] == 1
    # the bench model was freed after its own pair and loaded again at the end, the same weights
    gc.collect()
    assert first() is None and bm.model is not None and not isinstance(bm.model, peers._Released)
    after = bm.model.state_dict()
    assert set(after) == set(before) and all(after[n].equal(before[n]) for n in before)
    assert [g[0] for g in doc["groups"]] == [f"qwen35 {f}" for f in FORMATS]
    assert {f"qwen35 {f}" for f in FORMATS} <= set(doc["engines"])
    for r in doc["engines"].values():
        assert r["decode_tokens_per_s"] > 0 and len(r["decode_tokens_per_s_per_round"]) == 1
    if doc["llama_cpp"] == "ran":
        assert set(doc["decode_ratio_per_round"]) == {"bf16", "int8", "int4"}
    gc.collect()
    assert alive and all(g() is None for g in alive.values())


class _FakeLlama:
    """llama.cpp's stand-in: a GGUF 'conversion' that records whether the bench model's weights
    were loaded while it ran, and runners that time nothing real."""

    GGUFError = gguf.GGUFError

    def __init__(self, tmp_path, bm):
        self.tmp, self.bm, self.converted_while = tmp_path, bm, []

    def available(self):
        return None

    def remove_stale(self):
        return []

    def check_disk(self, num_params, quants):
        self.disk_checked = quants

    def checkpoint(self, bm):
        self.written_with = not isinstance(bm.model, peers._Released)

    def convert(self, bm, q, opts):
        self.converted_while.append(isinstance(bm.model, peers._Released))
        path = self.tmp / f"{q}.gguf"
        path.write_bytes(b"x" * 100)
        return path

    class LlamaRunner:
        def __init__(self, path, max_len, threads):
            pass

        def run(self, prompt, new, rid=""):
            return 1e-3, [1e-3] * (new - 1)

        def steps(self, prompt, new, rid=""):
            yield from [1e-3] * (new - 1)

        def run_batch(self, prompts, steps, rid=""):
            return [1e-3] * steps

        def close(self):
            pass


def test_bench_model_freed_while_llama_cpp_converts(bm_opts, tmp_path, monkeypatch):
    """Where the converter would not fit beside the bench model (a 9B's bf16 on 24 GiB), its
    weights are freed after the checkpoint is written, loaded again for its own pair, and
    are the same weights at the end."""
    bm, opts = bm_opts
    fake = _FakeLlama(tmp_path, bm)
    monkeypatch.setattr(peers, "converter_bytes", lambda bm: 1 << 60)
    seen = {}
    load = peers._load_engine

    def tracked(name, *a):
        seen[name] = not isinstance(bm.model, peers._Released)
        return load(name, *a)

    monkeypatch.setattr(peers, "_load_engine", tracked)
    before = {n: t.clone() for n, t in bm.model.state_dict().items()}
    doc = peers._run_peers(bm, dataclasses.replace(opts, formats=("bf16", "int4"), rounds=3), fake)
    assert fake.written_with and fake.converted_while == [True, True]
    # the summaries are the medians of the paired per-round ratios
    for f in ("bf16", "int4"):
        each = doc["decode_at_context_ratio_per_round"][f]
        assert len(each) == 3 and doc["decode_at_context_ratio"][f] == sorted(each)[1]
        g = next(g for g in doc["goals"] if g["name"].startswith(f"{f} decode vs"))
        assert g["measured"] == sorted(doc["decode_ratio_per_round"][f])[1]
    assert seen["qwen35 bf16"]  # its own pair: loaded again before it
    assert set(doc["engines"]) == {"qwen35 bf16", "llama.cpp bf16", "qwen35 int4", "llama.cpp q4_0"}
    after = bm.model.state_dict()
    assert all(after[n].equal(before[n]) for n in before)


def test_checkpoint_in_shards_equals_one_file(bm_opts, monkeypatch):
    """The converter's transformers checkpoint: shards with an index (one shard's bf16 copy in
    memory at a time) hold exactly what one file holds."""
    bm, opts = bm_opts
    assert peers  # (the module above, whose workload writes it)
    whole = load_file(str(gguf._hf_dir(bm, opts) / "model.safetensors"))
    gguf.cleanup()
    monkeypatch.setattr(gguf, "SHARD_BYTES", 64 << 10)
    try:
        hf = gguf._hf_dir(bm, opts)
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 2 and not (hf / "model.safetensors").exists()
        got = {}
        for f in files:
            part = load_file(str(hf / f))
            assert sum(t.numel() * 2 for t in part.values()) <= 64 << 10 or len(part) == 1
            got |= part
        assert set(got) == set(whole) == set(index["weight_map"])
        assert all(got[n].equal(whole[n]) for n in whole)
        assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in whole.values())
    finally:
        gguf.cleanup()


def test_shards_cut_in_order():
    assert gguf._shards([("a", 3), ("b", 3), ("c", 5), ("d", 1), ("e", 2)], 6) == [
        ["a", "b"], ["c", "d"], ["e"]]  # fmt: skip
    assert gguf._shards([("big", 10), ("x", 1)], 4) == [["big"], ["x"]]


def test_no_room_on_disk_skips_llama_cpp_with_the_reason(bm_opts, tmp_path, monkeypatch):
    """Too little disk for the conversions: said before any is tried (not a converter's
    traceback halfway), llama.cpp skipped with the reason, ours still measured."""
    bm, opts = bm_opts
    fake = _FakeLlama(tmp_path, bm)
    fake.check_disk = gguf.check_disk
    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 10})())
    with pytest.raises(gguf.GGUFError, match=r"needs ~.* GiB in .*0\.0 GiB free.*TMPDIR"):
        gguf.check_disk(bm.num_params * 1000, ["bf16", "q4_0"])
    doc = peers._run_peers(bm, dataclasses.replace(opts, formats=("bf16", "int8")), fake)
    assert "TMPDIR" in doc["llama_cpp"] and fake.converted_while == []
    assert set(doc["engines"]) == {"qwen35 bf16", "qwen35 int8"}
    # what the report says: the reason, and (a document of pairs) the pairs and what was skipped
    doc |= {"groups": [["qwen35 bf16"], ["qwen35 int8"]], "skipped": {"llama.cpp bf16": "needs X"}}
    con = Console(record=True, width=200)
    print_workload({"workloads": {"peers": doc}}, "peers", con)
    text = con.export_text()
    assert "llama.cpp skipped: llama.cpp: converting" in text and "TMPDIR" in text
    assert "one pair at a time (memory): qwen35 bf16; qwen35 int8" in text
    assert "llama.cpp bf16 skipped: needs X" in text
    gguf.check_disk(100, ["bf16", "q8_0", "q4_0"])  # 1 KiB is enough for 100 parameters


def test_work_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setattr(gguf.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name, pid in (("dead", dead), ("mine", str(__import__("os").getpid())), ("old", None)):
        d = tmp_path / (gguf.PREFIX + name)
        (d / "hf").mkdir(parents=True)
        if pid is not None:
            (d / "pid").write_text(pid)
    (tmp_path / "other-dead").mkdir()
    (tmp_path / "other-dead" / "pid").write_text(dead)
    assert gguf.remove_stale() == [tmp_path / (gguf.PREFIX + "dead")]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["other-dead", gguf.PREFIX + "mine", gguf.PREFIX + "old"]


def test_bench_model_not_reloaded_when_nothing_follows(bm_opts, monkeypatch):
    """The last workload of a run (runner.run_bench says so) leaves a freed bench model freed:
    reloading a 9B's weights nobody reads again took ~40 s."""
    bm, opts = bm_opts
    monkeypatch.setattr(peers, "engine_groups",
                        lambda bm, formats, paths, opts, available=None: ([[f"qwen35 {f}"] for f in formats], {}, 1))  # fmt: skip
    monkeypatch.setattr(bm, "needed_after", False)
    try:
        peers.run_peers(bm, dataclasses.replace(opts, formats=("bf16", "int4")))
        assert isinstance(bm.model, peers._Released)
    finally:
        peers._restore(bm, opts)  # (the module's other tests use it)
    assert not isinstance(bm.model, peers._Released)


def test_runner_says_whether_a_workload_follows(bm_opts, monkeypatch):
    from qwen35.benchmarks import runner

    bm, opts = bm_opts
    seen = []
    monkeypatch.setattr(runner, "load_bench_model", lambda opts, mtp=False: bm)
    monkeypatch.setattr(runner, "_workload_fns", lambda: {
        w: (lambda bm, opts: seen.append(bm.needed_after) or {}) for w in ("quality", "peers")})  # fmt: skip
    runner.run_bench(dataclasses.replace(opts, baseline=False), ["quality", "peers"])
    assert seen == [True, False]
    bm.needed_after = True
