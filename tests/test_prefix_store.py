"""The prefix cache on disk (`--prefix-cache-dir`, engine/prefix_store.py): an engine started later
takes a prompt's prefix from the files another wrote, token-exact with computing it, and the
folder stays a whole tree within its budget whatever happens to its files."""

from __future__ import annotations

import os
import random

import pytest
from safetensors import safe_open

from qwen35.chat_format import shared_prefix
from qwen35.engine.llm_engine import LLM
from qwen35.engine.prefix_store import SUFFIX, PrefixStore, disk_interval
from qwen35.errors import Qwen35Error
from qwen35.request import SamplingParams
from tiny import save_checkpoint

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
BS = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("store") / "m"
    save_checkpoint(d, moe=False, layout="vlm", max_position_embeddings=16384)
    return d


@pytest.fixture(scope="module")
def off(ckpt):
    return LLM(str(ckpt), dtype="fp32", block_size=BS, verbose=False, enable_prefix_caching=False)


def toks(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 256) for _ in range(n)]


def engine(ckpt, store, **kw) -> LLM:
    kw = {"dtype": "fp32", "prefix_cache_dir_min_tokens": 32, **kw}
    return LLM(str(ckpt), block_size=BS, verbose=False, prefix_cache_dir=str(store), **kw)


def run(llm: LLM, prompt: list[int]):
    out = llm.generate([prompt], GREEDY)[0]
    llm.engine.prefix_store.flush()
    llm.engine.scheduler.check_integrity()
    return out


def segments(llm: LLM) -> dict[str, tuple[str, int, int]]:
    """file stem -> (parent, start block, end block)"""
    out = {}
    for p in llm.engine.prefix_store.dir.glob("*" + SUFFIX):
        with safe_open(p, framework="pt") as f:
            m = f.metadata()
        out[p.stem] = (m["parent"], int(m["start"]), int(m["end"]))
    return out


def test_a_restarted_engine_takes_the_prefix_from_disk(ckpt, off, tmp_path):
    system = toks(2100, 1)
    first = engine(ckpt, tmp_path)
    run(first, system + toks(40, 2))
    stats = first.engine.get_stats()
    assert stats["prefix_cache_disk_saves"] == 3  # at 1,024 and 2,048 tokens, and the prompt end
    assert disk_interval(first.engine.scheduler.config.checkpoint_interval) == 1024
    # a restart: another question after the same system prompt resumes from 2,048 tokens
    later = engine(ckpt, tmp_path)
    prompt = system + toks(30, 3)
    got = run(later, prompt)
    assert got.num_cached_tokens == 2048
    assert got.outputs[0].token_ids == off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    # the first prompt again: from its own end, past what memory now holds
    prompt = system + toks(40, 2)
    got = run(later, prompt)
    assert got.num_cached_tokens == (len(prompt) - 1) // BS * BS
    assert got.outputs[0].token_ids == off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    stats = later.engine.get_stats()
    assert stats["prefix_cache_disk_hits"] == 2 and stats["prefix_cache_disk_read_errors"] == 0
    assert stats["prefix_cache_disk_hit_tokens"] == 2048 + got.num_cached_tokens
    from qwen35.server.metrics import _ENGINE_SERIES  # (the server's /metrics series)

    disk = {k for k in _ENGINE_SERIES if "_disk_" in k}
    assert len(disk) == 5 and disk <= stats.keys()


@pytest.mark.parametrize(
    "moe,options",
    [
        (False, {"dtype": "bf16", "kv_cache_dtype": "fp8"}),
        (True, {"dtype": "bf16", "mamba_ssm_cache_dtype": "bf16"}),
        (False, {"dtype": "fp32", "num_speculative_tokens": 2}),
    ],
    ids=["bf16-fp8-kv", "moe-bf16-state", "mtp-drafts"],
)
def test_a_disk_hit_is_a_memory_hit(tmp_path, moe, options):
    """The same bytes back: logprobs equal those of a memory hit at the same depth."""
    save_checkpoint(tmp_path / "m", moe=moe, layout="vlm", max_position_embeddings=4096,
                    mtp="num_speculative_tokens" in options)  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    prompt = toks(600, 13)
    first = engine(tmp_path / "m", tmp_path / "store", **options)
    run(first, prompt)
    memory = first.generate([prompt], params)[0]
    later = engine(tmp_path / "m", tmp_path / "store", **options)
    disk = later.generate([prompt], params)[0]
    assert later.engine.get_stats()["prefix_cache_disk_hits"] == 1
    assert disk.num_cached_tokens == memory.num_cached_tokens == (len(prompt) - 1) // BS * BS
    assert disk.outputs[0].token_ids == memory.outputs[0].token_ids
    assert disk.outputs[0].logprobs == memory.outputs[0].logprobs


def test_a_conversation_goes_on_after_a_restart(ckpt, off, tmp_path):
    convo, previous = toks(200, 4), 0
    for turn in range(3):
        llm = engine(ckpt, tmp_path)  # a new engine every turn
        out = run(llm, convo)
        assert out.outputs[0].token_ids == off.generate([convo], GREEDY)[0].outputs[0].token_ids
        assert out.num_cached_tokens >= previous  # the last turn's prompt, from disk
        previous = (len(convo) - 1) // BS * BS
        convo = convo + out.outputs[0].token_ids + toks(40, 10 + turn)


def test_segments_form_a_tree_without_copies(ckpt, tmp_path):
    llm = engine(ckpt, tmp_path)
    system = toks(1100, 5)
    for q in range(3):  # the second and third share the first's system prompt in memory
        run(llm, system + toks(50 + q, 20 + q))
    segs = segments(llm)
    assert len(segs) == 1 + 1 + 3  # 1,024; the branch point (end of the system prompt); 3 ends
    for stem, (parent, start, _) in segs.items():
        assert (parent == "") == (start == 0), stem
        assert parent == "" or segs[parent][2] == start  # each starts where its parent ends
    # blocks stored once, but for the first prompt's tail: its end's segment starts at 1,024,
    # written before the second request made the end of the system prompt a branch point
    sys_blocks, end_blocks, at = 1100 // BS, (1100 + 50 - 1) // BS, 1024 // BS
    stored = sum(end - start for _, start, end in segs.values())
    assert stored == at + (end_blocks - at) + (sys_blocks - at) + 2 * (end_blocks - sys_blocks)


def test_the_folder_keeps_its_budget_and_stays_whole(ckpt, tmp_path):
    llm = engine(ckpt, tmp_path)
    run(llm, toks(300, 30))
    one = sum(p.stat().st_size for p in llm.engine.prefix_store.dir.glob("*" + SUFFIX))
    llm = engine(ckpt, tmp_path, prefix_cache_dir_size=str(int(3.5 * one)))
    for i in range(8):
        run(llm, toks(300, 31 + i))
    files = list(llm.engine.prefix_store.dir.glob("*" + SUFFIX))
    assert 1 <= len(files) <= 3
    assert sum(p.stat().st_size for p in files) <= 3.5 * one
    assert not [p for p in llm.engine.prefix_store.dir.iterdir() if p.name.startswith(".tmp")]
    # a tree pruned leaves first: every file left still reads back to the root
    store = llm.engine.prefix_store
    assert all(store.chain(bytes.fromhex(p.stem)) is not None for p in files)


def test_pruning_takes_leaves_before_the_segments_they_build_on(ckpt, tmp_path):
    llm = engine(ckpt, tmp_path)
    system = toks(1100, 6)
    run(llm, system + toks(20, 40))
    store = llm.engine.prefix_store
    segs = segments(llm)
    root = next(s for s, (parent, _, _) in segs.items() if parent == "")
    sizes = {p.stem: p.stat().st_size for p in store.dir.glob("*" + SUFFIX)}
    store.max_bytes = sizes[root]  # room for one: the root stays, whatever was used last
    store._prune()
    assert [p.stem for p in store.dir.glob("*" + SUFFIX)] == [root]


def test_a_damaged_or_foreign_file_is_a_miss(ckpt, off, tmp_path):
    prompt = toks(400, 7)
    first = engine(ckpt, tmp_path)
    run(first, prompt)
    (path,) = first.engine.prefix_store.dir.glob("*" + SUFFIX)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    later = engine(ckpt, tmp_path)
    got = run(later, prompt)
    want = off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert got.outputs[0].token_ids == want and got.num_cached_tokens == 0
    assert later.engine.get_stats()["prefix_cache_disk_read_errors"] == 1
    # written again by that run; now give another prompt's file this prompt's name
    other = toks(400, 8)
    run(later, other)
    store = later.engine.prefix_store
    (mine,) = [p for p in store.dir.glob("*" + SUFFIX) if p != path]
    os.replace(mine, path)
    third = engine(ckpt, tmp_path)
    got = run(third, prompt)
    assert got.outputs[0].token_ids == want and got.num_cached_tokens == 0
    assert third.engine.get_stats()["prefix_cache_disk_read_errors"] == 1
    assert path.exists()  # the miss was computed and written back
    with safe_open(path, framework="pt") as f:
        assert f.get_tensor("tokens").tolist() == prompt[: (len(prompt) - 1) // BS * BS]


@pytest.mark.parametrize("damage", ["a block short", "another dtype", "no state"])
def test_a_file_of_the_wrong_shapes_is_a_miss(ckpt, off, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    prompt = toks(400, 14)
    run(engine(ckpt, tmp_path), prompt)
    store = engine(ckpt, tmp_path).engine.prefix_store
    (path,) = store.dir.glob("*" + SUFFIX)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    data = load_file(path)
    if damage == "a block short":
        data["k.0"] = data["k.0"][1:]
    elif damage == "another dtype":
        data["v.0"] = data["v.0"].half()
    else:
        del data["rec.0"]
    save_file(data, path, metadata=meta)
    later = engine(ckpt, tmp_path)
    got = run(later, prompt)
    assert got.num_cached_tokens == 0
    assert got.outputs[0].token_ids == off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    assert later.engine.get_stats()["prefix_cache_disk_read_errors"] == 1


def test_other_numerics_and_short_prompts_stay_apart(ckpt, tmp_path):
    a = engine(ckpt, tmp_path)
    b = engine(ckpt, tmp_path, dtype="bf16")
    c = engine(ckpt, tmp_path, prefix_cache_dir_min_tokens=512)
    assert len({a.engine.prefix_store.dir, b.engine.prefix_store.dir}) == 2
    assert c.engine.prefix_store.dir == a.engine.prefix_store.dir  # (min tokens: not numerics)
    run(c, toks(300, 9))  # under its 512 tokens: nothing stored
    assert c.engine.get_stats()["prefix_cache_disk_saves"] == 0
    run(b, toks(300, 9))
    assert b.engine.get_stats()["prefix_cache_disk_saves"] == 1
    assert not list(a.engine.prefix_store.dir.glob("*" + SUFFIX))


def test_prompts_that_must_compute_every_row_do_not_read_the_disk(ckpt, off, tmp_path):
    prompt = toks(300, 11)
    run(engine(ckpt, tmp_path), prompt)
    llm = engine(ckpt, tmp_path)
    p = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    got = llm.generate([prompt], p)[0]
    assert got.num_cached_tokens == 0 and len(got.prompt_logprobs) == len(prompt)
    assert llm.engine.get_stats()["prefix_cache_disk_hits"] == 0


def test_bad_settings_are_refused_before_loading(ckpt, tmp_path):
    with pytest.raises(Qwen35Error, match="prefix caching"):
        engine(ckpt, tmp_path, enable_prefix_caching=False)
    (tmp_path / "f").write_text("")
    with pytest.raises(Qwen35Error, match="a file"):
        engine(ckpt, tmp_path / "f")
    with pytest.raises(Qwen35Error, match="not a size"):
        engine(ckpt, tmp_path, prefix_cache_dir_size="lots")
    with pytest.raises(Qwen35Error, match="min_tokens"):
        engine(ckpt, tmp_path, prefix_cache_dir_min_tokens=0)


def test_a_folder_that_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(Qwen35Error, match="cannot write there"):
        PrefixStore(tmp_path / "f" / "cache", 1 << 30, 32, {"format": 1})


def test_a_failing_disk_never_fails_a_request(ckpt, off, tmp_path, monkeypatch):
    llm = engine(ckpt, tmp_path)
    import safetensors.torch

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    prompt = toks(300, 12)
    got = run(llm, prompt)
    assert got.outputs[0].token_ids == off.generate([prompt], GREEDY)[0].outputs[0].token_ids
    stats = llm.engine.get_stats()
    assert stats["prefix_cache_disk_write_errors"] == 1 and stats["prefix_cache_disk_saves"] == 0
    assert not [p for p in llm.engine.prefix_store.dir.iterdir() if p.name.startswith(".tmp")]


# ---- cache points: where a chat's system prompt ends -------------------------------------------

SYSTEM = " ".join(f"Rule {i}: answer in the voice of character {i * 7 % 13}." for i in range(40))


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    from tiny import VOCAB_REAL

    d = tmp_path_factory.mktemp("store-chat") / "m"
    save_checkpoint(d, vocab_size=VOCAB_REAL, hidden_size=32, max_position_embeddings=4096)
    return d


def head_tokens(llm: LLM, messages) -> int:
    template, enc = llm.engine.chat_template, llm.engine.encode_prompt
    return shared_prefix(enc(template.head(messages)), enc(template.render(messages)))


def test_a_chats_system_prompt_is_stored_from_its_first_request(chat_ckpt, tmp_path):
    """LLM.chat marks where the system prompt ends (SamplingParams.cache_points): one request
    leaves a checkpoint (and a segment) there, so the next conversation, in this engine or one
    started later, starts from it: it needs no second request to find the branch point."""
    msgs = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]  # noqa: E731
    p = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine(chat_ckpt, tmp_path)
    first.chat(msgs("What is the capital of France?"), p)
    n = head_tokens(first, msgs("x"))
    assert n > 300 and first.engine.chat_template.head(msgs("x")).endswith("<|im_start|>user\n")
    first.engine.prefix_store.flush()
    assert n // BS in {end for _, _, end in segments(first).values()}
    again = first.chat(msgs("Name a prime number."), p)
    assert again.num_cached_tokens == n // BS * BS  # a memory hit at the system prompt's end
    later = engine(chat_ckpt, tmp_path)
    got = later.chat(msgs("How far is the moon?"), p)
    assert got.num_cached_tokens == n // BS * BS
    plain = LLM(str(chat_ckpt), dtype="fp32", block_size=BS, verbose=False,
                enable_prefix_caching=False)  # fmt: skip
    want = plain.chat(msgs("How far is the moon?"), p)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


@pytest.mark.parametrize("thinking", [False, True])
def test_the_next_turn_starts_where_this_turns_conversation_ends(chat_ckpt, tmp_path, thinking):
    """The prompt opens the reply with text the next turn renders otherwise (a think block, or
    an empty one): its last block boundary may lie past what the next turn shares. The
    conversation before the reply is a cache point instead, so the next turn (in a restarted
    engine: from disk) resumes at its last block boundary whatever the lengths."""
    llm = engine(chat_ckpt, tmp_path)
    system = {"role": "system", "content": SYSTEM}
    template, enc = llm.engine.chat_template, llm.engine.encode_prompt
    for pad in range(16, 80):  # a question whose history ends just before a block boundary
        msgs = [system, {"role": "user", "content": "Tell me more" + " please" * pad}]
        history = enc(template.render(msgs, add_generation_prompt=False))
        prompt = enc(template.render(msgs, enable_thinking=thinking))
        shared = len(history) + 3  # <|im_start|> assistant \n: what the next turn renders too
        head = shared_prefix(enc(template.head(msgs)), prompt)
        # the prompt's end lies past it, and the question ends blocks after the system prompt
        if (len(prompt) - 1) // BS * BS > shared and len(history) // BS > head // BS + 1:
            break
    else:
        pytest.skip("no question length puts the prompt's end past the shared prefix")
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.chat(msgs, p, enable_thinking=thinking)
    llm.engine.prefix_store.flush()
    nxt = msgs + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And?"}]
    later = engine(chat_ckpt, tmp_path)
    got = later.chat(nxt, p, enable_thinking=thinking)
    assert got.num_cached_tokens == len(history) // BS * BS
    memory = LLM(str(chat_ckpt), dtype="fp32", block_size=BS, verbose=False)  # (no folder)
    memory.chat(msgs, p, enable_thinking=thinking)
    assert memory.chat(nxt, p, enable_thinking=thinking).num_cached_tokens == got.num_cached_tokens


def test_the_server_marks_the_system_prompt_too(chat_ckpt, tmp_path):
    import openai

    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.server.app import ServerConfig, create_app
    from server_fakes import ServerThread

    def serve():
        eng = LLMEngine(str(chat_ckpt), dtype="fp32", block_size=BS, verbose=False,
                        prefix_cache_dir=str(tmp_path), prefix_cache_dir_min_tokens=32)  # fmt: skip
        srv = ServerThread(create_app(eng, ServerConfig(served_model_name="tiny")))
        return srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0), eng

    def ask(client, q):
        r = client.chat.completions.create(
            model="tiny", max_tokens=2, temperature=0.0,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        )  # fmt: skip
        return r.usage.prompt_tokens_details.cached_tokens

    srv, client, eng = serve()
    try:
        assert ask(client, "What is the capital of France?") == 0
        cached = ask(client, "Name a prime number.")
    finally:
        srv.close()
        eng.shutdown()
    assert cached > 300 and cached % BS == 0
    srv, client, eng = serve()  # a restart
    try:
        assert ask(client, "How far is the moon?") == cached
        assert eng.get_stats()["prefix_cache_disk_hits"] == 1
    finally:
        srv.close()
        eng.shutdown()


@pytest.mark.parametrize("seed", range(4))
def test_random_workloads_across_restarts(tmp_path, seed):
    """Requests arriving between steps, sharing system prefixes and extending earlier
    conversations, over engines restarted on one folder (small budgets: pruning; small pools:
    evictions and preemption; now and then a damaged file): every request equals its run alone
    without prefix caching (fp32), the pools end empty, the folder stays within its budget."""
    from test_fuzz_workloads import _drive

    rng = random.Random(seed)
    save_checkpoint(tmp_path / "m", moe=seed % 2 == 1, max_position_embeddings=4096)
    alone = LLM(str(tmp_path / "m"), dtype="fp32", block_size=BS, verbose=False,
                enable_prefix_caching=False)  # fmt: skip
    systems = [toks(rng.randrange(40, 1400), 1000 * seed + i) for i in range(3)]
    history: list[list[int]] = []

    def make():
        if history and rng.random() < 0.3:  # a conversation goes on
            prompt = rng.choice(history) + toks(rng.randrange(1, 60), rng.randrange(1 << 30))
        else:
            prompt = rng.choice(systems) + toks(rng.randrange(1, 200), rng.randrange(1 << 30))
        how = rng.choice([dict(temperature=0.0), dict(temperature=0.8, seed=rng.randrange(99))])
        return prompt, SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True, **how)

    store = tmp_path / "store"
    hits = 0
    for session in range(4):
        budget = rng.choice([300_000, 1_500_000, 1 << 26])  # (tiny files: 20-500 KB)
        opts = dict(num_kv_blocks=rng.choice([150, 400, 4000]), max_num_seqs=rng.choice([2, 8]),
                    max_num_batched_tokens=rng.choice([128, 512, 2048]),
                    prefix_cache_dir_size=str(budget),
                    checkpoint_interval=rng.choice([64, 256, 512]))  # fmt: skip
        llm = engine(tmp_path / "m", store, **opts)
        reqs, done, aborted = _drive(llm.engine, rng, 10, make, abort_p=0.03)
        llm.engine.shutdown()
        llm.engine.scheduler.check_integrity()
        hits += llm.engine.get_stats()['prefix_cache_disk_hits']
        for rid, out in done.items():
            prompt, params = reqs[rid]
            want = alone.generate([prompt], params)[0]
            assert out.outputs[0].token_ids == want.outputs[0].token_ids, (session, rid)
            history.append(prompt + list(want.outputs[0].token_ids))
        files = list(llm.engine.prefix_store.dir.glob("*" + SUFFIX))
        assert sum(p.stat().st_size for p in files) <= budget
        assert not [p for p in llm.engine.prefix_store.dir.iterdir() if p.name.startswith(".tmp")]
        if files and rng.random() < 0.5:  # damage one
            victim = rng.choice(files)
            victim.write_bytes(victim.read_bytes()[: rng.randrange(victim.stat().st_size)])
    assert hits > 0


def test_lora_requests_are_stored_under_their_adapters_weights(tmp_path):
    """An adapter's prefixes are keyed by a hash of its weights (LoraAdapter.digest): a restarted
    engine takes them from disk, whatever name or load order the adapter has there; another
    adapter, or the base model, never does."""
    from tiny import save_random_lora_adapter

    hf = save_checkpoint(tmp_path / "m", max_position_embeddings=4096)
    save_random_lora_adapter(hf, tmp_path / "a", seed=1)
    save_random_lora_adapter(hf, tmp_path / "b", seed=2)
    prompt = toks(300, 15)

    def ask(llm, lora):
        out = llm.generate([prompt], GREEDY, lora=lora)[0]
        llm.engine.prefix_store.flush()
        return out.num_cached_tokens, out.outputs[0].token_ids

    first = engine(tmp_path / "m", tmp_path / "store", lora_modules={"a": str(tmp_path / "a")})
    _, want_a = ask(first, "a")
    # a restart: b loaded first, a under another name (other ids): a's prefix is found, b's not
    later = engine(tmp_path / "m", tmp_path / "store",
                   lora_modules={"b": str(tmp_path / "b"), "again": str(tmp_path / "a")})  # fmt: skip
    cached, got = ask(later, "b")
    assert cached == 0 and got != want_a
    cached, got = ask(later, "again")
    assert cached == (len(prompt) - 1) // BS * BS and got == want_a
    assert ask(later, None)[0] == 0  # nor the base model
    plain = LLM(str(tmp_path / "m"), dtype="fp32", block_size=BS, verbose=False,
                enable_prefix_caching=False, lora_modules={"a": str(tmp_path / "a")})  # fmt: skip
    assert plain.generate([prompt], GREEDY, lora="a")[0].outputs[0].token_ids == want_a


def test_two_ranks_keep_their_shards(ckpt, off, tmp_path):
    """Tensor parallelism: each rank writes its shard of every segment (rank 1 in `rank1`
    under rank 0's folder) and reads it back with rank 0; a restore stands only where every
    rank read its shard, else it is a miss on all (and rank 0's file goes)."""
    prompt, more = toks(700, 16), toks(700, 16) + toks(9, 17)
    first = engine(ckpt, tmp_path, tensor_parallel_size=2)
    run(first, prompt)
    first.engine.shutdown()  # (the workers' writers finish)
    folder = first.engine.prefix_store.dir
    mine = sorted(p.name for p in folder.glob("*" + SUFFIX))
    assert mine and mine == sorted(p.name for p in (folder / "rank1").glob("*" + SUFFIX))
    want = off.generate([more], GREEDY)[0].outputs[0].token_ids
    later = engine(ckpt, tmp_path, tensor_parallel_size=2)
    try:
        got = later.generate([more], GREEDY)[0]
        assert got.num_cached_tokens == (len(prompt) - 1) // BS * BS
        assert got.outputs[0].token_ids == want
    finally:
        later.engine.shutdown()
    for p in (folder / "rank1").glob("*" + SUFFIX):  # rank 1's shards damaged
        p.write_bytes(p.read_bytes()[:100])
    third = engine(ckpt, tmp_path, tensor_parallel_size=2)
    try:
        got = third.generate([more], GREEDY)[0]
        assert got.num_cached_tokens == 0 and got.outputs[0].token_ids == want
        assert third.engine.get_stats()["prefix_cache_disk_read_errors"] >= 1
    finally:
        third.engine.shutdown()


def test_the_server_resets_the_prefix_cache_on_request(chat_ckpt, tmp_path):
    """POST /reset_prefix_cache (vLLM's) and /flush_cache (SGLang's): memory forgotten (the
    folder then serves the prefix); ?reset_external=true empties the folder too."""
    import httpx
    import openai

    from qwen35.engine.llm_engine import LLMEngine
    from qwen35.server.app import ServerConfig, create_app
    from server_fakes import ServerThread

    eng = LLMEngine(str(chat_ckpt), dtype="fp32", block_size=BS, verbose=False,
                    prefix_cache_dir=str(tmp_path), prefix_cache_dir_min_tokens=32)  # fmt: skip
    srv = ServerThread(create_app(eng, ServerConfig(served_model_name="tiny")))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

    def ask():
        r = client.chat.completions.create(
            model="tiny", max_tokens=2, temperature=0.0,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
        )  # fmt: skip
        return r.usage.prompt_tokens_details.cached_tokens

    try:
        assert ask() == 0
        hit = ask()
        assert hit > 0
        eng.prefix_store.flush()
        for path in ("/reset_prefix_cache", "/flush_cache"):
            r = httpx.post(srv.url + path)
            assert r.status_code == 200 and "reset" in r.text
            before = eng.get_stats()["prefix_cache_disk_hits"]
            # (from the folder: as deep as memory was, or deeper, the repeat's branch point)
            assert ask() >= hit and eng.get_stats()["prefix_cache_disk_hits"] == before + 1
        r = httpx.post(srv.url + "/reset_prefix_cache", params={"reset_external": "true"})
        assert r.status_code == 200 and "files removed" in r.text
        assert not list(eng.prefix_store.dir.glob("*" + SUFFIX))
        assert ask() == 0
        r = httpx.post(srv.url + "/reset_prefix_cache", params={"reset_external": "maybe"})
        assert r.status_code == 400 and "reset_external" in r.text
    finally:
        srv.close()
        eng.shutdown()
