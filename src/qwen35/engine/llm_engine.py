"""The inference engine: requests in, streamed text out, many requests per step.

`LLMEngine` is the step-wise core the server drives (add_request / step / abort_request);
`LLM` is the offline API in the style of vLLM (`generate`, `stream`, `chat`).
Memory: the KV block pool, the DeltaNet state slots and the prefix-cache checkpoints are sized
from `cache_spec` (the planner's formula) under `max_memory`; see `cache_sizing.py`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen35.chat_format import ChatTemplate, default_thinking_for
from qwen35.devices import resolve_dtype
from qwen35.engine.cache_sizing import CachePlan, plan_caches
from qwen35.engine.config import EngineConfig
from qwen35.engine.forward_batch import allocate_caches
from qwen35.engine.model_runner import ModelRunner
from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.engine.scheduler import Scheduler, SchedulerConfig
from qwen35.engine.sequence import Sequence
from qwen35.errors import Qwen35Error
from qwen35.loader import load_model
from qwen35.request import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob
from qwen35.tokenizer import IncrementalDetokenizer, StopStringMatcher, load_tokenizer

log = logging.getLogger("qwen35")


class PromptTooLongError(Qwen35Error, ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens, self.max_tokens, self.max_model_len = (
            prompt_tokens,
            max_tokens,
            max_model_len,
        )
        over = prompt_tokens + max_tokens - max_model_len
        super().__init__(
            f"this model's context is {max_model_len} tokens, but the request asks for "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} prompt + {max_tokens} to generate): "
            f"{over} too many; shorten the prompt or lower max_tokens"
        )


@dataclass
class _SeqState:
    seq: Sequence
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    text: str = ""
    sent_tokens: int = 0  # output tokens already returned
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_logprobs: int = 0
    done: bool = False  # the scheduler finished it (length, EOS, stop string)
    final_sent: bool = False  # its last output (with finish_reason) has been returned


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    arrival: float
    first_token: float | None = None


class LLMEngine:
    """The step-wise engine. Options: an `EngineConfig`, or its flat keyword options
    (`LLMEngine(path, max_num_seqs=4)`); `model` may also be an already-loaded module."""

    def __init__(
        self,
        model: str | torch.nn.Module,
        config: EngineConfig | None = None,
        *,
        progress: bool = False,
        verbose: bool = True,
        **options,
    ):
        loaded = model if isinstance(model, torch.nn.Module) else None
        if loaded is not None:
            # an already-loaded model (from load_model): engines can share one set of weights
            report = getattr(loaded, "load_report", None)
            model = report.source if report is not None else loaded.config.name
        if config is None:
            config = EngineConfig.create(str(model), **options)
        elif options:
            config = config.replace(**options)
        self.engine_config = ec = config
        cc, sc = ec.cache, ec.scheduler
        dtype = resolve_dtype(ec.load.dtype, ec.device.device)  # auto: see devices.py
        if ec.device.configure_runtime:
            configure_cpu_runtime(ec.device.threads)
        if loaded is not None:
            self.model = loaded
        else:
            self.model = load_model(
                model,
                dtype=dtype,
                device=ec.device.device,
                load_format=ec.load.load_format,
                progress=progress,
                quantization=ec.load.quantization,
            )
        self.config = self.model.config
        self.model_name = model
        self.device = torch.device(ec.device.device)
        model_dir = Path(model) if Path(model).is_dir() else getattr(self.model, "model_dir", None)
        self.tokenizer = load_tokenizer(model_dir)
        self.default_thinking = default_thinking_for(self.config)
        self.chat_template = ChatTemplate.from_model_dir(
            model_dir, default_thinking=self.default_thinking
        )
        self.eos_token_ids = tuple(
            dict.fromkeys((*self.config.eos_token_ids, *self.tokenizer.eos_token_ids))
        )
        model_dtype = getattr(self.model, "dtype", None) or next(self.model.parameters()).dtype
        self.plan: CachePlan = plan_caches(
            self.config,
            model_dtype=model_dtype,
            device=self.device,
            max_memory=cc.max_memory,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            block_size=cc.block_size,
            max_model_len=sc.max_model_len,
            enable_prefix_caching=cc.enable_prefix_caching,
            prefix_cache_memory=cc.prefix_cache_memory,
            weight_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters()),
            num_blocks_override=cc.num_kv_blocks,
        )
        self.max_model_len = self.plan.max_model_len
        if verbose:
            log.warning(self.plan.describe())
        caches = allocate_caches(
            self.config,
            num_blocks=self.plan.num_blocks,
            block_size=cc.block_size,
            num_slots=self.plan.num_state_slots + self.plan.num_checkpoint_slots,
            dtype=model_dtype,
            device=self.device,
        )
        self.runner = ModelRunner(self.model, caches, self.eos_token_ids, self.device, seed=ec.seed)
        sched_cfg = SchedulerConfig(
            max_num_seqs=self.plan.num_state_slots,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=cc.block_size,
            enable_prefix_caching=cc.enable_prefix_caching,
            checkpoint_interval=cc.checkpoint_interval or self.plan.checkpoint_interval,
            eos_token_ids=self.eos_token_ids,
        )
        self.scheduler = Scheduler(
            sched_cfg,
            num_blocks=self.plan.num_blocks,
            num_slots=self.plan.num_state_slots,
            num_checkpoint_slots=self.plan.num_checkpoint_slots,
        )
        self._requests: dict[str, _Request] = {}
        self._seq_to_req: dict[str, tuple[_Request, _SeqState]] = {}
        self._ids = itertools.count()
        self.stats_totals = {"prompt_tokens_total": 0, "generation_tokens_total": 0}

    # ---- requests -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            bad = [t for t in ids if t >= self.config.vocab_size]
            if bad:
                raise Qwen35Error(
                    f"the tokenizer gave id {bad[0]}, outside the model's vocabulary of "
                    f"{self.config.vocab_size}: the model directory needs its own tokenizer.json"
                )
            return ids
        if not prompt or not all(
            isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt
        ):
            raise Qwen35Error(
                f"prompt token ids must be a non-empty list of ints in [0, {self.config.vocab_size})"
            )
        return list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        params.validate()
        if request_id in self._requests:
            raise Qwen35Error(f"request id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt)
        if not ids:
            raise Qwen35Error("the prompt is empty")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - len(ids)
            params.max_tokens = max(max_tokens, 1)
        if len(ids) + max_tokens > self.max_model_len:
            raise PromptTooLongError(len(ids), max_tokens, self.max_model_len)
        req = _Request(
            request_id, prompt if isinstance(prompt, str) else None, ids, params, [], time.time()
        )
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Sequence(
                seq_id=seq_id, token_ids=list(ids), num_prompt_tokens=len(ids), params=params
            )
            st = _SeqState(
                seq,
                IncrementalDetokenizer(
                    self.tokenizer, skip_special_tokens=params.skip_special_tokens
                ),
                StopStringMatcher(params.stop, params.include_stop_str_in_output),
            )
            req.seqs.append(st)
            self._seq_to_req[seq_id] = (req, st)
            seed = None if params.seed is None else params.seed + i
            self.runner.add_sequence(seq_id, seed)
            self.scheduler.add(seq)
        self._requests[request_id] = req
        self.stats_totals["prompt_tokens_total"] += len(ids)

    def abort_request(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        for st in req.seqs:
            self.scheduler.abort(st.seq.seq_id)
            self._forget(st.seq.seq_id)

    def _forget(self, seq_id: str) -> None:
        self._seq_to_req.pop(seq_id, None)
        self.runner.remove_sequence(seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- stepping -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        result = self.runner.execute(out.scheduled)
        finished = {s.seq_id for s in self.scheduler.update(out, result.sampled)}
        now = time.time()
        touched: dict[str, _Request] = {}
        for seq_id, token in result.sampled.items():
            req, st = self._seq_to_req[seq_id]
            touched[req.request_id] = req
            if req.first_token is None:
                req.first_token = now
            self.stats_totals["generation_tokens_total"] += 1
            if seq_id in result.logprobs:
                st.logprobs.append(result.logprobs[seq_id])
            emit, stopped, stop_str = st.stop.feed(st.detok.add(token))
            st.text += emit
            if stopped and seq_id not in finished:
                self.scheduler.finish(seq_id, "stop", stop_str)
                finished.add(seq_id)
            if seq_id in finished:
                st.done = True
                if not stopped:
                    st.text += st.stop.feed(st.detok.flush())[0] + st.stop.flush()
        outputs = [self._delta(req, now) for req in touched.values()]
        for req in touched.values():
            if all(st.done for st in req.seqs):
                del self._requests[req.request_id]
                for st in req.seqs:
                    self._forget(st.seq.seq_id)
        return outputs

    def _delta(self, req: _Request, now: float) -> RequestOutput:
        outs = []
        for i, st in enumerate(req.seqs):
            if st.final_sent:  # n > 1: a sibling still runs; this one has said all it will
                continue
            seq = st.seq
            new_ids = seq.output_token_ids[st.sent_tokens :]
            new_lps = st.logprobs[st.sent_logprobs :] if req.params.logprobs is not None else None
            if not new_ids and not st.text and not (st.done and seq.finish_reason):
                continue
            outs.append(
                CompletionOutput(
                    index=i,
                    text=st.text,
                    token_ids=list(new_ids),
                    finish_reason=seq.finish_reason if st.done else None,
                    stop_reason=seq.stop_reason if st.done else None,
                    logprobs=new_lps,
                )
            )
            st.text = ""
            st.sent_tokens += len(new_ids)
            st.sent_logprobs = len(st.logprobs)
            st.final_sent = st.done
        done = all(st.done for st in req.seqs)
        metrics = {"arrival_time": req.arrival, "first_token_time": req.first_token or now}
        if done:
            metrics["finished_time"] = now
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_ids,
            outputs=outs,
            finished=done,
            num_cached_tokens=max((st.seq.num_cached_tokens for st in req.seqs), default=0),
            metrics=metrics,
        )

    def get_stats(self) -> dict:
        sched, pc = self.scheduler, self.scheduler.prefix_cache_stats()
        kv, state = sched.kv, sched.state
        return {
            "num_running": sched.num_running,
            "num_waiting": sched.num_waiting,
            "num_preemptions": sched.num_preemptions,
            "kv_blocks_total": kv.num_blocks,
            "kv_blocks_used": kv.num_used_blocks,
            "kv_blocks_cached": kv.num_evictable_blocks,
            "state_slots_total": state.num_slots,
            "state_slots_used": state.num_slots - state.num_free_slots,
            "prefix_cache_queries": pc.queries,
            "prefix_cache_hits": pc.hits,
            "prefix_cache_query_tokens": pc.query_tokens,
            "prefix_cache_hit_tokens": pc.hit_tokens,
            "prefix_cache_checkpoints": pc.num_checkpoints,
            **self.stats_totals,
        }


class LLM:
    """Offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, config: EngineConfig | None = None, **options):
        self.engine = LLMEngine(model, config, **options)
        self._counter = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _new_id(self) -> str:
        return f"llm-{next(self._counter)}"

    def generate(
        self,
        prompts: str | list[int] | abc.Sequence[str | list[int]],
        params: SamplingParams | abc.Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(plist)
        ids = []
        for p, sp in zip(plist, params):
            rid = self._new_id()
            self.engine.add_request(rid, p, SamplingParams(**vars(sp)))
            ids.append(rid)
        merged = {rid: None for rid in ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id in merged:
                    merged[out.request_id] = _merge(merged[out.request_id], out)
        return [merged[rid] for rid in ids]

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Deltas of one request as they are produced (other queued requests progress too)."""
        rid = self._new_id()
        self.engine.add_request(rid, prompt, SamplingParams(**vars(params or SamplingParams())))
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **template_kwargs):
        prompt = self.engine.chat_template.render(
            messages, add_generation_prompt=True, **template_kwargs
        )
        return self.generate([prompt], params)[0]


def _merge(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {o.index: o for o in acc.outputs}
    for o in delta.outputs:
        cur = by_index.get(o.index)
        if cur is None:
            cur = CompletionOutput(o.index, "", [], logprobs=[] if o.logprobs is not None else None)
            by_index[o.index] = cur
        cur.text += o.text
        cur.token_ids.extend(o.token_ids)
        if o.logprobs is not None and cur.logprobs is not None:
            cur.logprobs.extend(o.logprobs)
        cur.finish_reason = o.finish_reason or cur.finish_reason
        cur.stop_reason = o.stop_reason if o.stop_reason is not None else cur.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
    acc.metrics = {**acc.metrics, **delta.metrics}
    return acc
