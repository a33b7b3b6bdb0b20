"""Grammar compilation off the engine loop: worker threads, a cache by constraint, a timeout.

`GrammarCompiler.submit(spec)` returns a future of a compiled, validated template matcher; every
sequence gets a `deep_copy()` of it (cheap: the lexer and the token trie are shared). Compiled
grammars (and compile errors) are cached by `spec.key()`, least recently used out first. The
llguidance vocabulary (the 248K-token trie) is built once, on first use, in a worker too.

llguidance drops the GIL while it builds a grammar, and bounds its own work (`LIMITS`); on top of
that a caller waits at most `timeout_s` and then gets a clear error, so a pathological schema
never holds up the engine loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any

import llguidance

from qwen35.engine.structured.grammar import grammar_for
from qwen35.request import SamplingParamsError, StructuredOutputs

# llguidance's own bounds on grammar work (its defaults, tighter where a request could abuse
# them): lexer fuel ~50k/ms, so 2M is ~40 ms of regex analysis at most.
LIMITS = dict(initial_lexer_fuel=2_000_000, max_grammar_size=200_000)


class StructuredOutputError(SamplingParamsError):
    """A constraint that cannot be compiled (bad schema / regex / grammar, or too slow): a 400."""

    def __init__(self, message: str, param: str = "structured_outputs"):
        super().__init__(message, param)


def build_ll_tokenizer(tokenizer: Any, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: every id's bytes (ids past the tokenizer, where the
    model pads its vocabulary, are empty and never allowed); added tokens are special, so text
    grammars never produce them and Lark reaches them only as `<[id]>`."""

    class _Wrapped:
        def __init__(self) -> None:
            self.eos_token_id = (tokenizer.eos_token_ids or (0,))[0]
            self.bos_token_id = None
            self.tokens = [tokenizer.token_bytes(i) or b"" for i in range(vocab_size)]
            self.special_token_ids = sorted(
                i for i in tokenizer.added_tokens.values() if i < vocab_size
            )

        def __call__(self, text: bytes | str) -> list[int]:
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="replace")
            return tokenizer.encode(text)

    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_Wrapped()),
        n_vocab=vocab_size,
        eos_token=list(tokenizer.eos_token_ids) or None,
    )


class GrammarCompiler:
    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        *,
        timeout_s: float = 10.0,
        cache_size: int = 256,
        num_workers: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._pool = concurrent.futures.ThreadPoolExecutor(
            num_workers, thread_name_prefix="qwen35-grammar"
        )
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, concurrent.futures.Future] = (
            collections.OrderedDict()
        )
        self._ll_tokenizer: concurrent.futures.Future | None = None

    def ll_tokenizer_future(self) -> concurrent.futures.Future:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._pool.submit(
                    build_ll_tokenizer, self.tokenizer, self.vocab_size
                )
            return self._ll_tokenizer

    def submit(self, spec: StructuredOutputs) -> concurrent.futures.Future:
        """The compiled template matcher of `spec`, as a future (cached by spec.key())."""
        key = spec.key()
        tok = self.ll_tokenizer_future()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not fut.cancelled():
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec, tok)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def get(self, spec: StructuredOutputs, timeout_s: float | None = None) -> llguidance.LLMatcher:
        """Wait for the compiled template (raises StructuredOutputError)."""
        fut = self.submit(spec)
        self.ll_tokenizer_future().result()  # the one-off vocabulary build is not the grammar's
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise StructuredOutputError(
                f"compiling the constraint took longer than {timeout:g} s; simplify the "
                "schema / regex / grammar"
            ) from None

    @staticmethod
    def _compile(spec: StructuredOutputs, tok_fut: concurrent.futures.Future):
        ll = tok_fut.result()
        what = describe(spec)
        try:
            grammar = grammar_for(spec)
        except Exception as e:  # noqa: BLE001 - any failure on user input is that input's fault
            raise StructuredOutputError(f"invalid {what}: {e}") from None
        limits = llguidance.LLParserLimits(**LIMITS)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, ll, limits=limits
        )
        if is_error:
            raise StructuredOutputError(f"invalid {what}: {_first_line(messages[0])}")
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {what}: {_first_line(matcher.get_error())}")
        return matcher

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def describe(spec: StructuredOutputs) -> str:
    if spec.json is not None:
        return "JSON schema"
    if spec.json_object:
        return "json_object constraint"
    if spec.regex is not None:
        return "regex"
    if spec.choice is not None:
        return "choice"
    return "grammar"


def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else "unknown error"
