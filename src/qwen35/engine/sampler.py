"""Batched token sampler: every row of the batch carries its own `SamplingParams`.

Order of operations (vLLM v1's order, so results match what users expect from it):
1. min_tokens: EOS / stop token ids get -inf while fewer than `min_tokens` tokens are generated;
   then logit_bias (OpenAI: added to the logits, greedy rows included).
2. penalties: repetition (HF/vLLM: over prompt + output, positive logits divided, negative
   multiplied), then frequency and presence (OpenAI: over output tokens only).
   Then vLLM's thinking_token_budget: a row at its budget inside a think block may only close it.
3. greedy rows (temperature < 1e-5) take the argmax of the penalised logits.
4. sampled rows: divide by temperature, then min-p, top-k, top-p masks, then one draw with the
   exponential race: argmax(probs / q), q ~ Exp(1), which samples exactly from `probs`.
Logprobs are log_softmax of the RAW model logits by default (vLLM's default `raw_logprobs`);
`Sampler(logprobs_mode="processed")` gives them from the logits actually sampled from instead.

Reproducibility: a row with a generator (the engine makes one per seeded request) draws its V
exponentials from it, so its sample depends only on its seed, its inputs and its step count,
not on the rest of the batch (up to float rounding at exact ties). Other rows share the
sampler's global generator.

Cost: nothing is done that no row asks for. A pure-greedy batch is one argmax; penalties touch
only the tokens each row has seen; min-p, top-k and top-p reduce to one threshold per row, found
among `topk(max(1024, k))` candidates; the vocabulary is sorted only when a top-p row without a
top-k spreads its mass over more tokens than that. Per-row parameters travel to the device as
one small tensor; the only Python loops are over rows (per-request generators, histories).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwen35.engine.forward_batch import send_to_device
from qwen35.kernels import small_ops
from qwen35.request import SamplingParams, TokenLogprob

GREEDY_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)


@dataclass(slots=True)
class SamplingRow:
    """One row of logits to sample from, with the request state the processors need."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()  # read only when repetition_penalty != 1
    output_token_ids: Sequence[int] = ()  # generated so far (penalties, min_tokens)
    generator: torch.Generator | None = None  # own noise; required when params.seed is set
    eos_token_ids: tuple[int, ...] = ()  # masked until min_tokens unless params.ignore_eos


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # [S]; None in the rows of `errors`
    logprobs: list[TokenLogprob | None]  # [S]; None where params.logprobs is None
    errors: dict[int, Exception] = field(default_factory=dict)  # row -> why it has no token


class NoTokenAllowedError(ValueError):
    """A row whose constraints ban every token at this step (allowed_token_ids, bad words,
    a grammar, or min_tokens holding back the only ids allowed ids leave): its request fails
    with this message instead of drawing a banned token (an all -inf row's argmax is token 0).
    (min_tokens never fails a grammar's row: apply_min_tokens lets the grammar end it.)"""


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for `params.seed` (None for unseeded requests).

    The engine keeps it for the request's lifetime; with n > 1 give each child its own seed
    (e.g. seed + index) or all children draw the same tokens.
    """
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def device_tensor(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, device=device), but on CUDA without waiting for the stream (a
    blocking copy from pageable memory does: a sync per step of multi-step decoding's rounds)."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else send_to_device(host, device)


def is_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_EPS


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def exponential_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill t with Exp(1) noise in place. On CPU -log(U) is much faster than exponential_."""
    if t.device.type == "cpu":
        return t.uniform_(generator=generator).log_().neg_()  # U in [0, 1): q in (0, inf]
    return t.exponential_(generator=generator)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (a NaN counts as the maximum), as torch's
    max(-1).indices: on CPU fp32 rows the compiled kernel (kernels/small_ops.py; torch's
    index-tracking reduction is scalar, ~0.2 ms a 248K-vocabulary row on a Zen 4)."""
    if x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1 and x.numel():
        mod = small_ops.load()  # None where it can't be had, or QWEN35_NO_KERNELS=1
        if mod is not None:
            return mod.argmax_rows(x)
    return x.max(dim=-1).indices


class Sampler:
    def __init__(self, seed: int | None = None, logprobs_mode: str = "raw"):
        if logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be 'raw' or 'processed', got {logprobs_mode!r}")
        self.seed = seed
        self.logprobs_mode = logprobs_mode
        self._generators: dict[str, torch.Generator] = {}  # the global one, per device

    def global_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(str(device))
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed) if self.seed is not None else g.seed()
            self._generators[str(device)] = g
        return g

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [S, V] (any float dtype; computed in float32), one SamplingRow per row."""
        tokens, raw, processed, dead = self._tokens(logits, rows)
        src = raw if self.logprobs_mode == "raw" else processed
        pending = logprob_tensors(src, rows, tokens)  # queued before the first device sync
        if dead is not None:  # read with the tokens: -1 where a row has no token
            tokens = tokens.masked_fill(dead, -1)
        token_ids = tokens.tolist()
        lps = to_token_logprobs(rows, token_ids, pending)
        errors: dict[int, Exception] = {}
        for i in (i for i, t in enumerate(token_ids) if t < 0):
            token_ids[i] = lps[i] = None  # type: ignore[call-overload]
            errors[i] = NoTokenAllowedError(_dead_end(rows[i]))
        return SamplerOutput(token_ids, lps, errors)

    def tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The rows' next tokens [S] int64 on the logits' device, read nothing back to the host
        (multi-step decoding feeds them to the next step; no logprobs; its rows have none of
        the constraints that can ban every token: model_runner.device_sampled)."""
        return self._tokens(logits, rows)[0]

    def _tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]):
        """(tokens [S], raw fp32 logits, the processed logits the tokens were drawn from, the
        rows whose constraints left no token [S] bool or None where no row has such constraints)."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows, vocab] with one SamplingRow per row, got shape "
                f"{tuple(logits.shape)} for {len(rows)} rows"
            )
        raw = logits.float()
        x = apply_min_tokens(raw, rows)
        x = apply_logit_bias(x, rows)
        x = apply_allowed_and_bad_words(x, rows)
        x = apply_penalties(x, rows)
        x = apply_thinking_budget(x, rows)
        dead = _no_token_left(x, rows)
        greedy = [is_greedy(r.params) for r in rows]
        tokens = argmax(x) if any(greedy) else None  # [S]
        processed = x
        if not all(greedy):
            idx = [i for i, g in enumerate(greedy) if not g]
            sub_rows = [rows[i] for i in idx]
            sub = x if len(idx) == len(rows) else x[device_tensor(idx, x.device)]
            sub = apply_top_filters(sub, [r.params for r in sub_rows])  # [R, V], new tensor
            drawn = self._draw(sub, sub_rows)  # [R]
            if tokens is None:
                tokens, processed = drawn, sub
            else:
                idx_t = device_tensor(idx, x.device)
                tokens = tokens.index_copy(0, idx_t, drawn)
                if self.logprobs_mode == "processed":
                    processed = x.index_copy(0, idx_t, sub)
        return tokens, raw, processed, dead

    def _draw(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """One sample per row of masked, temperature-scaled logits x: [R, V] -> [R] int64."""
        probs = x.softmax(dim=-1)  # [R, V]
        q = torch.empty_like(probs)  # [R, V], Exp(1) noise
        for r in rows:
            if r.params.seed is not None and r.generator is None:
                raise ValueError(
                    "a seeded request needs a generator: create it once per request with "
                    "make_generator(params.seed, device) and pass it in every step"
                )
        own = [i for i, r in enumerate(rows) if r.generator is not None]
        if len(own) < len(rows):
            g = self.global_generator(x.device)
            if not own:
                exponential_(q, g)
            else:
                free = [i for i, r in enumerate(rows) if r.generator is None]
                noise = torch.empty(len(free), x.shape[1], device=x.device)  # [F, V]
                q[device_tensor(free, x.device)] = exponential_(noise, g)
        for i in own:  # the one loop that cannot be vectorised: one generator per request
            g = rows[i].generator
            if g.device.type != x.device.type or (g.device.index or 0) != (x.device.index or 0):
                raise ValueError(f"a generator on {g.device} cannot sample logits on {x.device}")
            exponential_(q[i], g)
        # q == 0 is possible in principle: 0/0 = NaN, which argmax would pick (a masked token).
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return argmax(probs.div_(q))


def sample_isolated(
    sampler: Sampler, logits: torch.Tensor, rows: Sequence[SamplingRow]
) -> tuple[SamplerOutput, dict[int, Exception]]:
    """sampler(logits, rows), but a row that makes sampling fail fails alone.

    The batch is sampled at once; only if that raises is each row sampled by itself, and the
    rows that still raise come back in the error dict (row -> exception) with token None.
    Seeded rows of such a step may draw other noise than they would have (the failed batch
    attempt may have advanced their generators); steps without a failure are unaffected.
    """
    try:
        out = sampler(logits, rows)
        return out, dict(out.errors)
    except Exception as batch_error:
        if len(rows) == 1:
            return SamplerOutput([None], [None]), {0: batch_error}  # type: ignore[list-item]
    tokens: list[int | None] = []
    lps: list[TokenLogprob | None] = []
    errors: dict[int, Exception] = {}
    for i, row in enumerate(rows):
        try:
            one = sampler(logits[i : i + 1], [row])
        except Exception as e:
            tokens.append(None)
            lps.append(None)
            errors[i] = e
        else:
            tokens.append(one.token_ids[0])
            lps.append(one.logprobs[0])
            if one.errors:
                errors[i] = one.errors[0]
    return SamplerOutput(tokens, lps), errors  # type: ignore[arg-type]


def _flat_keys(seqs: Sequence[Sequence[int] | torch.Tensor], rows: Sequence[int], vocab: int):
    """Host tensor of `row * vocab + token` over every token of seqs[j] in batch row rows[j]."""
    parts = [torch.zeros(0, dtype=torch.long)]
    for seq, i in zip(seqs, rows, strict=True):  # per row, never per vocab entry
        if len(seq):
            t = seq if isinstance(seq, torch.Tensor) else torch.tensor(
                seq if isinstance(seq, list) else list(seq), dtype=torch.long
            )  # (a TokenTail is read once, in order)
            t = t.to("cpu", torch.long)  # [n]
            lo, hi = int(t.min()), int(t.max())  # host tensor: no device sync
            if lo < 0 or hi >= vocab:
                raise ValueError(f"token id out of range [0, {vocab}): min {lo}, max {hi}")
            parts.append(t + i * vocab)
    return torch.cat(parts)  # [N]


# The constraints that can leave a row no token (the grammar's mask came before the sampler;
# min_tokens bans its stop ids, which may be all a grammar or allowed ids leave): name, test
_BANS = (
    ("allowed_token_ids", lambda r: bool(r.params.allowed_token_ids)),
    ("bad_words", lambda r: bool(r.params.bad_words_token_ids)),
    ("the structured output's grammar", lambda r: r.params.structured_outputs is not None),
    ("min_tokens (end-of-sequence and stop ids wait for it)",
     lambda r: len(r.output_token_ids) < r.params.min_tokens),
)  # fmt: skip


def _no_token_left(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor | None:
    """[S] bool: the rows whose every logit is -inf (a NaN row is not), checked among the rows
    whose constraints can do that only (one max over each of them); None where there are none."""
    risky = [i for i, r in enumerate(rows) if any(on(r) for _, on in _BANS)]
    if not risky:
        return None
    if len(risky) == len(rows):
        return x.amax(dim=-1) == -math.inf
    idx = device_tensor(risky, x.device)
    dead = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
    return dead.index_copy_(0, idx, x.index_select(0, idx).amax(dim=-1) == -math.inf)


def _dead_end(r: SamplingRow) -> str:
    """What banned every token of row r, for its request's error."""
    what = [name for name, on in _BANS if on(r)]
    return (f"no token can be sampled after {len(r.output_token_ids)} generated tokens: "
            f"{' and '.join(what) or 'the logits'} leave every token banned; loosen them so that "
            "they always leave one (e.g. allowed_token_ids that can spell what the grammar needs, and "
            "an end-of-sequence id to end it)")


def apply_min_tokens(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """-inf on EOS / stop ids of rows still under min_tokens; returns a new tensor if any.
    A row with a grammar keeps them where the ban would leave it nothing (the grammar is
    complete and allows only its end): the output ends there, shorter than min_tokens, rather
    than failing (scheduler.py `_check_stop` stops on them); checked on the device, no sync."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
            stops = {t for t in stops if 0 <= t < x.shape[1]}
            r_idx += [i] * len(stops)
            t_idx += sorted(stops)
    if not r_idx:
        return x
    where = (torch.tensor(r_idx, device=x.device), torch.tensor(t_idx, device=x.device))
    out = x.index_put(where, torch.tensor(-math.inf, device=x.device))
    grammar = sorted({i for i in r_idx if rows[i].params.structured_outputs is not None})
    if grammar:
        idx = device_tensor(grammar, x.device)
        banned = out.index_select(0, idx)
        left = banned.amax(dim=1, keepdim=True) > -math.inf  # [G, 1]: a token besides the stops
        out.index_copy_(0, idx, torch.where(left, banned, x.index_select(0, idx)))
    return out


def apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias (token id -> bias); returns a new tensor if any row has one."""
    r_idx: list[int] = []
    t_idx: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if not 0 <= t < x.shape[1]:
                raise ValueError(f"logit_bias token {t} is outside the vocabulary of {x.shape[1]}")
            r_idx.append(i)
            t_idx.append(t)
            vals.append(b)
    if not r_idx:
        return x
    dev = x.device
    where = (torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev))
    return x.index_put(where, torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)


def banned_by_bad_words(row: SamplingRow) -> set[int]:
    """Tokens a row may not sample now: each bad word's last token where the output ends in
    the word's other tokens (a one-token word: always)."""
    out = row.output_token_ids
    n = len(out)
    banned = set()
    for word in row.params.bad_words_token_ids or ():
        k = len(word) - 1
        if k == 0 or (n >= k and all(out[n - k + j] == word[j] for j in range(k))):
            banned.add(word[-1])
    return banned


def apply_allowed_and_bad_words(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """vLLM's allowed_token_ids (every other token -inf) and bad_words (banned_by_bad_words);
    returns a new tensor if any row has either."""
    todo = [(i, r) for i, r in enumerate(rows)
            if r.params.allowed_token_ids or r.params.bad_words_token_ids]  # fmt: skip
    if not todo:
        return x
    x = x.clone()
    for i, r in todo:
        if r.params.allowed_token_ids:
            keep = _allowed_ids(r.params, x.device)
            row = torch.full_like(x[i], -math.inf)
            row[keep] = x[i, keep]
            x[i] = row
        banned = banned_by_bad_words(r)
        if banned:
            x[i, torch.tensor(sorted(banned), device=x.device)] = -math.inf
    return x


def thinking_budget_due(row: SamplingRow) -> bool:
    """Whether the row must close its think block now: exactly thinking_token_budget tokens
    generated, none of them the end-of-think token (the scan runs once, at that position)."""
    p, out = row.params, row.output_token_ids
    return (p.think_end_token_id is not None and p.thinking_token_budget is not None
            and len(out) == p.thinking_token_budget and p.think_end_token_id not in out)  # fmt: skip


def apply_thinking_budget(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """vLLM's thinking_token_budget: a due row (thinking_budget_due) gets only its end-of-think
    token (logit 0, every other -inf; whatever earlier constraints did); returns a new tensor
    if any row is due."""
    due = [i for i, r in enumerate(rows) if thinking_budget_due(r)]
    if not due:
        return x
    x = x.clone()
    for i in due:
        x[i] = -math.inf
        x[i, rows[i].params.think_end_token_id] = 0.0
    return x


def _allowed_ids(params: SamplingParams, device: torch.device) -> torch.Tensor:
    """params.allowed_token_ids as a tensor on `device`, built once per request (kept on the
    params object: a list of ~100K ids took milliseconds a step to convert)."""
    cached = params.__dict__.get("_allowed_ids_tensor")
    if cached is None or cached[0] is not params.allowed_token_ids or cached[1].device != device:
        cached = (params.allowed_token_ids, torch.tensor(params.allowed_token_ids, device=device))
        params.__dict__["_allowed_ids_tensor"] = cached
    return cached[1]


def apply_penalties(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties; returns x itself when no row has any.

    Penalties only touch tokens a row has seen, so the work is sparse, O(history), with no dense
    [S, V] count tensor: the (row, token) keys of every history token, duplicates included, go
    to the device once. Duplicates are harmless: repetition and presence write the same value
    for each copy of a key (all read before any write), and frequency accumulates -f once per
    occurrence, which is the count without counting (and order-free: the addends are equal).
    """
    idx = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    if not idx:
        return x
    vocab, dev = x.shape[1], x.device
    rep_idx = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    out_keys = _flat_keys([rows[i].output_token_ids for i in idx], idx, vocab)  # [No]
    prompt_keys = _flat_keys([rows[i].prompt_token_ids for i in rep_idx], rep_idx, vocab)  # [Np]
    if not len(out_keys) and not len(prompt_keys):
        return x
    keys = torch.cat([out_keys, prompt_keys]).to(dev, non_blocking=True)  # [N]
    coef = torch.tensor(
        [[r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty]
         for r in rows], device=dev,
    )[keys // vocab]  # fmt: skip
    rep, pres, freq = coef.unbind(1)  # [N] each: the penalties of each key's row
    y = x.flatten().clone()  # [S*V]; the caller's logits stay untouched
    val = y[keys]  # [N]
    y[keys] = torch.where(val > 0, val / rep, val * rep)  # rep == 1 for rows without it
    n_out = len(out_keys)
    y[keys[:n_out]] = y[keys[:n_out]] - pres[:n_out]  # once per seen token
    y.index_put_((keys[:n_out],), -freq[:n_out], accumulate=True)  # once per occurrence
    return y.view_as(x)


CANDIDATE_LIMIT = 1024  # top-k / top-p look at torch.topk of this many before a full sort


def filter_thresholds(x: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Per-row cutoff of min-p, top-k and top-p: keep logits >= thr. x: [R, V] -> thr: [R, 1].

    All three keep an upper set of the (temperature-scaled) logits, so one threshold per row
    describes them; top-p renormalises after min-p and top-k (vLLM's order); tokens tied with
    the k-th logit are kept (vLLM). The work is on the top K = max(1024, largest k) candidates
    from torch.topk; the whole vocabulary is sorted only when some top-p row without a top-k
    needs more than K tokens to reach its mass (a flat distribution), found with one sync.
    """
    vocab, ninf = x.shape[1], -math.inf
    prm = device_tensor(
        [[p.min_p, p.top_p, min(p.top_k, vocab) or vocab] for p in ps], x.device, torch.float32
    )  # [R, 3]: one host->device copy
    min_p, top_p, k = prm[:, 0:1], prm[:, 1:2], prm[:, 2:3].long()  # [R, 1] each
    thr = torch.full_like(min_p, ninf)  # [R, 1]
    if any(p.min_p > 0 for p in ps):
        # probs < min_p * max_prob  <=>  logit < max_logit + log(min_p); log(0) = -inf
        thr = x.amax(dim=-1, keepdim=True) + min_p.log()
    ks = [p.top_k for p in ps if 0 < p.top_k < vocab]
    use_p = any(p.top_p < 1.0 for p in ps)
    if not ks and not use_p:
        return thr
    k_on = k < vocab  # [R, 1]
    lse = None  # [R, 1] log-normaliser over the whole vocabulary, for top-p rows without top-k
    if any(p.top_p < 1.0 and not 0 < p.top_k < vocab for p in ps):
        lse = torch.where(x < thr, ninf, x).logsumexp(dim=-1, keepdim=True)
    num = min(vocab, max(ks + [CANDIDATE_LIMIT if use_p else 0]))
    while True:
        if num < vocab:
            srt = x.topk(num, dim=-1).values  # [R, K], sorted descending
        else:
            srt = x.sort(dim=-1, descending=True).values  # [R, V]
        srt.masked_fill_(srt < thr, ninf)
        kth = torch.where(k_on, srt.gather(1, k.clamp(max=num) - 1), ninf)  # [R, 1]
        srt.masked_fill_(srt < kth, ninf)
        if not use_p:
            return torch.maximum(thr, kth)
        # Rows with a top-k hold all their mass among the candidates; others use the full lse.
        norm = srt.logsumexp(dim=-1, keepdim=True)
        probs = (srt - (norm if lse is None else torch.where(k_on, norm, lse))).exp()  # [R, K]
        cum = probs.cumsum(dim=-1)  # [R, K]
        if num == vocab or all(0 < p.top_k < vocab or p.top_p >= 1.0 for p in ps):
            break  # every row's cutoff is among the candidates: no need to look (no sync)
        covered = k_on | (top_p >= 1.0) | (cum[:, -1:] >= top_p)  # the cutoff is within K
        if bool(covered.all()):  # the one sync, only for top-p rows without a top-k
            break
        num = vocab
    # [R, 1]; >= 1 in exact arithmetic as top_p > 0, but a top_p that is 0 in float32 or NaN
    # logits (a broken model) give 0: keep at least the top token (gather at -1 would fail).
    n_keep = (cum - probs < top_p).sum(dim=-1, keepdim=True)
    cut = srt.gather(1, n_keep.clamp(min=1, max=num) - 1)  # [R, 1]
    return torch.maximum(torch.maximum(thr, kth), torch.where(top_p >= 1.0, ninf, cut))


def apply_top_filters(x: torch.Tensor, ps: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, then min-p, top-k, top-p as -inf masks. x: [R, V] -> new [R, V]."""
    temp = device_tensor([p.temperature for p in ps], x.device, torch.float32)[:, None]  # [R, 1]
    x = x / temp  # [R, V]
    return x.masked_fill_(x < filter_thresholds(x, ps), -math.inf)


def logprob_tensors(src: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor):
    """Device work for logprobs: (rows wanted, chosen [W], top values [W, n], top ids [W, n])."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return None
    idx_t = torch.tensor(want, device=src.device)
    lp = src[idx_t].log_softmax(dim=-1)  # [W, V]
    chosen = lp.gather(1, tokens[idx_t][:, None])[:, 0]  # [W]
    n_max = max(rows[i].params.logprobs for i in want)
    vals, ids = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())  # [W, n]
    return want, chosen, vals, ids  # topk: sorted descending


def to_token_logprobs(
    rows: Sequence[SamplingRow], token_ids: list[int], pending
) -> list[TokenLogprob | None]:
    """TokenLogprob per row that asked for logprobs (top-n of params.logprobs), else None."""
    out: list[TokenLogprob | None] = [None] * len(rows)
    if pending is None:
        return out
    want, chosen, vals, ids = (t if isinstance(t, list) else t.tolist() for t in pending)
    for j, i in enumerate(want):
        n = rows[i].params.logprobs
        top = dict(zip(ids[j][:n], vals[j][:n], strict=True))
        out[i] = TokenLogprob(token_ids[i], chosen[j], top)
    return out


def reference_sample(
    logits: torch.Tensor, row: SamplingRow, generator: torch.Generator | None = None
) -> tuple[int, TokenLogprob | None]:
    """Plain one-row reference (test oracle and benchmark baseline); same semantics, other math.

    logits: [V]; histories as lists. Draws V exponentials from row.generator, else `generator`,
    exactly as Sampler does, so seeded rows must give the same token.
    """
    p, raw = row.params, logits.float()
    x = raw.clone()
    if len(row.output_token_ids) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(row.eos_token_ids)):
            x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.allowed_token_ids:
        x = torch.where(torch.isin(torch.arange(x.shape[0]), torch.tensor(p.allowed_token_ids)),
                        x, torch.tensor(-math.inf))  # fmt: skip
    out = list(row.output_token_ids)
    for word in p.bad_words_token_ids or ():
        if len(word) == 1 or out[len(out) - len(word) + 1 :] == word[:-1]:
            x[word[-1]] = -math.inf
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt_token_ids) | set(row.output_token_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(row.output_token_ids):
        x[t] -= p.frequency_penalty * list(row.output_token_ids).count(t) + p.presence_penalty
    if (p.think_end_token_id is not None and p.thinking_token_budget == len(out)
            and p.think_end_token_id not in out):  # fmt: skip
        x = torch.full_like(x, -math.inf)
        x[p.think_end_token_id] = 0.0
    if is_greedy(p):
        token = int(x.argmax())
    else:
        x = x / p.temperature
        if p.min_p > 0:
            probs = x.softmax(-1)
            x[probs < p.min_p * probs.max()] = -math.inf
        if 0 < p.top_k < x.numel():
            x[x < x.topk(p.top_k).values[-1]] = -math.inf
        if p.top_p < 1.0:  # vLLM's form: drop the ascending prefix holding <= 1 - top_p
            asc = x.sort().values
            drop = asc.softmax(-1).cumsum(-1) <= 1 - p.top_p
            drop[-1] = False
            x[x < asc[~drop][0]] = -math.inf
        g = row.generator if row.generator is not None else generator
        q = exponential_(torch.empty_like(x), g).clamp_min_(torch.finfo(x.dtype).tiny)
        token = int((x.softmax(-1) / q).argmax())
    if p.logprobs is None:
        return token, None
    lp = raw.log_softmax(-1)
    vals, ids = lp.topk(p.logprobs) if p.logprobs else (lp[:0], lp[:0].long())
    return token, TokenLogprob(
        token, float(lp[token]), dict(zip(ids.tolist(), vals.tolist(), strict=True))
    )
