"""Multi-turn chat with prefix caching on vs off: time to first token and prompt tokens computed.

N conversations share one system prompt; each runs T turns. Turn t's prompt is the previous
turn's prompt + its reply + a new user message (token ids directly, seeded lengths), so with
caching only the reply and the new message need computing. Each turn of every conversation is
submitted together (the server's view: N users at once); the two engines (caching on, caching
off) share one model and alternate turn by turn so machine noise hits both alike.
Per request: TTFT = first_token_time - arrival_time; prompt tokens computed = prompt length -
RequestOutput.num_cached_tokens. Engine-wide: prefix_cache_hit_tokens from get_stats().
"""

from __future__ import annotations

import random

from qwen35.benchmarks.common import BenchModel, BenchOptions, make_engine, median, ratio
from qwen35.request import SamplingParams


def sizes(opts: BenchOptions) -> dict:
    if opts.quick:
        return {"conversations": 2, "turns": 3, "system": 32, "user": (4, 16), "reply": 4}
    return {"conversations": 8, "turns": 4, "system": 512, "user": (32, 128), "reply": 32}


class _Chat:
    """One engine's copy of the workload: conversation histories and per-turn measurements."""

    def __init__(self, bm: BenchModel, caching: bool, sz: dict):
        longest = sz["system"] + sz["turns"] * (sz["user"][1] + sz["reply"]) + 16
        self.engine = make_engine(
            bm,
            max_num_seqs=sz["conversations"],
            max_model_len=longest,
            enable_prefix_caching=caching,
        )
        self.history: list[list[int]] = []
        self.turns: list[dict] = []

    def run_turn(self, turn: int, users: list[list[int]], reply_len: int) -> None:
        if not self.history:
            self.history = [[] for _ in users]
        sp = SamplingParams(max_tokens=reply_len, temperature=0.0, ignore_eos=True)
        prompts = []
        for i, user in enumerate(users):
            self.history[i] = self.history[i] + user
            prompts.append(len(self.history[i]))
            self.engine.add_request(f"t{turn}-c{i}", list(self.history[i]), sp)
        replies: dict[int, list[int]] = {i: [] for i in range(len(users))}
        ttft, cached = {}, {}
        while self.engine.has_unfinished_requests():
            for o in self.engine.step():
                i = int(o.request_id.rsplit("-c", 1)[1])
                replies[i].extend(o.outputs[0].token_ids if o.outputs else [])
                ttft[i] = o.metrics["first_token_time"] - o.metrics["arrival_time"]
                cached[i] = max(cached.get(i, 0), o.num_cached_tokens)
        for i in replies:
            self.history[i] += replies[i]
        self.turns.append(
            {
                "turn": turn,
                "prompt_tokens": sum(prompts),
                "computed_prompt_tokens": sum(p - cached[i] for i, p in enumerate(prompts)),
                "median_ttft_s": median(ttft.values()),
                "mean_ttft_s": sum(ttft.values()) / len(ttft),
            }
        )

    def summary(self) -> dict:
        stats = self.engine.get_stats()
        ttfts = [t["mean_ttft_s"] for t in self.turns]
        return {
            "turns": self.turns,
            "prompt_tokens": sum(t["prompt_tokens"] for t in self.turns),
            "computed_prompt_tokens": sum(t["computed_prompt_tokens"] for t in self.turns),
            "mean_ttft_s": sum(ttfts) / len(ttfts),
            "mean_ttft_after_first_turn_s": sum(ttfts[1:]) / max(1, len(ttfts) - 1),
            "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
            "prefix_cache_query_tokens": stats["prefix_cache_query_tokens"],
        }


def run_multi_turn(bm: BenchModel, opts: BenchOptions) -> dict:
    sz = sizes(opts)
    rng = random.Random(opts.seed)
    vocab = bm.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(sz["system"])]
    on, off = _Chat(bm, True, sz), _Chat(bm, False, sz)
    for turn in range(sz["turns"]):
        users = [
            [rng.randrange(vocab) for _ in range(rng.randint(*sz["user"]))]
            for _ in range(sz["conversations"])
        ]
        if turn == 0:
            users = [system + u for u in users]
        off.run_turn(turn, users, sz["reply"])
        on.run_turn(turn, users, sz["reply"])
        opts.say(f"  turn {turn + 1} of {sz['turns']} done")
    s_on, s_off = on.summary(), off.summary()
    return {
        "conversations": sz["conversations"],
        "turns": sz["turns"],
        "system_prompt_tokens": sz["system"],
        "user_message_tokens": list(sz["user"]),
        "reply_tokens": sz["reply"],
        "caching_on": s_on,
        "caching_off": s_off,
        # > 1 means caching helps: off / on
        "ttft_ratio": ratio(s_off["mean_ttft_s"], s_on["mean_ttft_s"]),
        "ttft_ratio_after_first_turn": ratio(
            s_off["mean_ttft_after_first_turn_s"], s_on["mean_ttft_after_first_turn_s"]
        ),
        "computed_tokens_ratio": ratio(
            s_off["computed_prompt_tokens"], s_on["computed_prompt_tokens"]
        ),
    }
