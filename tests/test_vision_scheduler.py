"""Scheduler with images (no torch): the encoder-token budget per step and block hashes keyed
by image content."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen35.engine.scheduler import Scheduler, SchedulerConfig
from qwen35.engine.sequence import Sequence


@dataclass
class Item:  # the fields the scheduler reads of multimodal.inputs.MMItem
    segments: list[tuple[int, int]]
    content_hash: bytes = b"img"
    num_tokens: int = field(init=False)

    def __post_init__(self):
        self.num_tokens = sum(n for _, n in self.segments)

    @property
    def start(self) -> int:
        return self.segments[0][0]

    @property
    def end(self) -> int:
        return self.segments[-1][0] + self.segments[-1][1]


def seq(name: str, n: int, items: list[Item]) -> Sequence:
    s = Sequence(name, list(range(100, 100 + n)))
    s.mm_items = items
    return s


def test_encoder_budget_cuts_chunks_before_images():
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_encoder_tokens=10, block_size=4,
                          max_model_len=128)  # fmt: skip
    sch = Scheduler(cfg, num_blocks=200)
    a = seq("a", 20, [Item([(2, 12)])])  # larger than the budget: first of the step, encoded
    b = seq("b", 20, [Item([(3, 4)]), Item([(9, 6)])])
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    got = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
    assert got == {"a": 20, "b": 3}  # b stops right before its first image
    sch.update(out, {"a": 1})
    out = sch.schedule()
    got = {s.seq.seq_id: (s.start, s.num_new_tokens) for s in out.scheduled}
    assert got == {"a": (20, 1), "b": (3, 17)}  # 4 + 6 image tokens fit the budget of 10
    sch.update(out, {"a": 1, "b": 2})
    sch.check_integrity()


def test_block_hashes_depend_on_image_content():
    cfg = SchedulerConfig(max_num_batched_tokens=64, block_size=4, max_model_len=64)
    sch = Scheduler(cfg, num_blocks=100)
    plain = seq("p", 16, [])
    same1 = seq("s1", 16, [Item([(5, 4)], b"cat")])
    same2 = seq("s2", 16, [Item([(5, 4)], b"cat")])
    other = seq("o", 16, [Item([(5, 4)], b"dog")])
    h = {s.seq_id: sch._hashes(s) for s in (plain, same1, same2, other)}
    assert h["s1"] == h["s2"]
    assert h["s1"][0] == h["o"][0] == h["p"][0]  # block 0 holds no image token
    assert h["s1"][1] != h["o"][1] and h["s1"][1] != h["p"][1]  # blocks 1-2 hold the image
    assert h["s1"][3] != h["o"][3]  # and everything after it differs through the chain


def test_multimodal_options_are_checked():
    import pytest

    from qwen35.engine.config import EngineConfig
    from qwen35.errors import Qwen35Error

    assert EngineConfig.create("m", limit_mm_per_prompt={"image": 0}).multimodal.vision_disabled
    assert EngineConfig.create("m", text_only=True).multimodal.vision_disabled
    assert not EngineConfig.create("m").multimodal.vision_disabled
    for bad in ({"audio": 1}, {"image": -1}, [1]):
        with pytest.raises(Qwen35Error, match="limit_mm_per_prompt"):
            EngineConfig.create("m", limit_mm_per_prompt=bad)
    with pytest.raises(Qwen35Error, match="max_num_encoder_tokens"):
        EngineConfig.create("m", max_num_encoder_tokens=0)
