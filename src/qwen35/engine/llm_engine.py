"""The inference engine: requests in, streamed text out, many requests per step.

`LLMEngine` is the step-wise core the server drives (add_request / step / abort_request);
`LLM` is the offline API in the style of vLLM (`generate`, `stream`, `chat`).
Memory: the KV block pool, the DeltaNet state slots and the prefix-cache checkpoints are sized
from `cache_spec` (the planner's formula) under `max_memory`; see `cache_sizing.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen35.chat_format import (
    ChatFormatError,
    ChatTemplate,
    cache_points,
    check_text_only,
    default_thinking_for,
    read_template_arg,
)
from qwen35.config import non_negative_int
from qwen35.devices import dtype_advice, model_kv_dtype, resolve_dtype, resolve_state_dtype
from qwen35.engine.cache_sizing import (
    CachePlan,
    parse_bytes,
    plan_caches,
    warn_if_caches_exceed_memory,
)
from qwen35.engine.config import EngineConfig
from qwen35.engine.forward_batch import allocate_caches
from qwen35.engine.lora_adapters import LoraAdapters
from qwen35.engine.model_runner import GraphSpec, ModelRunner, StepResult
from qwen35.engine.prefill_pacer import PrefillPacer
from qwen35.engine.preflight import gpu_start
from qwen35.engine.runtime import configure_cpu_runtime
from qwen35.engine.sampler import NoTokenAllowedError
from qwen35.engine.scheduler import Scheduler, SchedulerConfig
from qwen35.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus
from qwen35.engine.structured import StructuredOutputManager
from qwen35.errors import Qwen35Error
from qwen35.loader import auto_quantization, load_model
from qwen35.model_source import local, needs_resolving
from qwen35.multimodal.chat import extract_media
from qwen35.multimodal.engine_glue import (
    encoder_working_memory,
    make_mm_processor,
    split_mm_prompt,
)
from qwen35.multimodal.sizing import MediaError
from qwen35.request import (
    CompletionOutput,
    RequestOutput,
    SamplingParams,
    SamplingParamsError,
    TokenLogprob,
)
from qwen35.tokenizer import IncrementalDetokenizer, StopStringMatcher, load_tokenizer

log = logging.getLogger("qwen35")


class PromptTooLongError(Qwen35Error, ValueError):
    """The prompt (plus max_tokens, when given) does not fit the context; OpenAI's
    `context_length_exceeded`. max_tokens None: the prompt leaves no room for one token."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int):
        self.prompt_tokens, self.max_tokens, self.max_model_len = (
            prompt_tokens,
            max_tokens,
            max_model_len,
        )
        if max_tokens is None:
            msg = (
                f"this model's context is {max_model_len} tokens, but the prompt has "
                f"{prompt_tokens}: {prompt_tokens - max_model_len + 1} too many to generate even "
                "one token; shorten the prompt"
            )
        else:
            over = prompt_tokens + max_tokens - max_model_len
            msg = (
                f"this model's context is {max_model_len} tokens, but the request asks for "
                f"{prompt_tokens + max_tokens} ({prompt_tokens} prompt + {max_tokens} to "
                f"generate): {over} too many; shorten the prompt or lower max_tokens"
            )
        super().__init__(msg)


class EngineBrokenError(Qwen35Error, RuntimeError):
    """The model step failed MAX_FAILED_STEPS times in a row: the device or the model is broken,
    not one request. The engine cannot go on; a server lets its loop die (and restarts)."""

    fatal = True


class RequestFailedError(Qwen35Error, RuntimeError):
    """LLM.generate / LLM.stream: the engine failed these requests (others completed).
    `outputs` holds every request's output, failed ones with `error` set."""

    def __init__(self, message: str, outputs: list[RequestOutput] | None = None):
        super().__init__(message)
        self.outputs = outputs or []


MAX_FAILED_STEPS = 3  # consecutive model steps that raised before the engine gives up


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
    error: str | None = None
    prompt_logprobs_sent: bool = False
    lora: str | None = None  # the LoRA adapter's name


def _auto_storage(config: EngineConfig, model: str) -> EngineConfig:
    """--dtype auto on a CPU that computes in fp32: keep a BF16 checkpoint's weights in bf16
    (loader.auto_quantization; the engine config then says quantization "bf16")."""
    ld = config.load
    quant = auto_quantization(model, ld.load_format, ld.dtype, config.device.device)
    return config if quant is None else config.replace(quantization=quant)


def source_defaults(config: EngineConfig, src) -> EngineConfig:
    """A resolved model's vision tower and sampling parameters (model_source.Source: an Ollama
    model's, a Hub GGUF repository's mmproj) where the options name none of their own."""
    extra = {}
    if src.mmproj is not None and config.load.mmproj is None:
        extra["mmproj"] = src.mmproj
    if src.sampling and config.load.override_generation_config is None:
        extra["override_generation_config"] = dict(src.sampling)
    return config.replace(**extra) if extra else config


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
        source = None
        if needs_resolving(model):  # ollama:NAME, USER/REPO-GGUF:QUANT: a GGUF file (model_source)
            source = local(model)
            model = source.path
        if config is None:
            config = EngineConfig.create(str(model), **options)
        elif options:
            config = config.replace(**options)
        if source is not None:
            config = source_defaults(config, source)
        if config.load.mmproj is not None:  # before anything reads the file's model directory
            if loaded is not None:
                raise Qwen35Error("mmproj applies when the engine loads a GGUF file: pass its path")
            from qwen35.gguf_checkpoint import use_mmproj

            use_mmproj(str(model), config.load.mmproj)
        if loaded is None and config.load.quantization is None:  # --dtype auto's storage
            config = _auto_storage(config, str(model))
        self.engine_config = ec = config
        dtype = resolve_dtype(ec.load.dtype, ec.device.device)  # auto: see devices.py
        if verbose and (advice := dtype_advice(ec.load.dtype, ec.device.device)):
            log.warning(advice)
        tp_size = ec.parallel.tensor_parallel_size
        threads = ec.device.threads
        self._threads_before = torch.get_num_threads()
        self.device = torch.device(ec.device.device)
        self.workers = None  # parallel.group.WorkerGroup under tensor parallelism
        tp = None
        if tp_size > 1:
            from qwen35.parallel import setup as tp_setup

            if loaded is not None:
                raise Qwen35Error("tensor parallelism loads its own shards: pass a model path")
            if self.device.type == "cpu":  # the ranks share the cores
                threads = tp_setup.cpu_threads(threads, tp_size)
                torch.set_num_threads(threads)
            # under torchrun, ranks other than 0 run as workers inside this call and exit
            self.workers, tp, self.device = tp_setup.start(ec, str(model), dtype)
        if ec.device.configure_runtime:
            configure_cpu_runtime(threads)
        try:
            self._init_engine(model, loaded, ec, dtype, progress, verbose, tp)
        except BaseException:
            self.shutdown()
            raise

    def _init_engine(self, model, loaded, ec, dtype, progress, verbose, tp) -> None:
        cc, sc = ec.cache, ec.scheduler
        template = None  # --chat-template: read and compiled before the weights load
        if ec.load.chat_template is not None:
            template = read_template_arg(ec.load.chat_template)
        if loaded is not None:
            self.model = loaded
            y = loaded.config.yarn
            if ec.load.yarn is not None and (y is None or y.factor != ec.load.yarn):
                raise Qwen35Error(
                    "yarn applies when the engine loads the model: pass a model path, or "
                    "load_model(..., yarn=FACTOR)"
                )
        else:
            kw = {} if tp is None else {"tp": tp}
            self.model = load_model(
                model,
                dtype=dtype,
                device=self.device,
                load_format=ec.load.load_format,
                progress=progress,
                seed=0 if ec.seed is None else ec.seed,  # random weights: reproducible
                **kw,
                vision=False if ec.multimodal.vision_disabled else "auto",
                quantization=ec.load.quantization,
                mtp=bool(sc.num_speculative_tokens) and sc.speculative_method == "mtp",
                yarn=ec.load.yarn,
                gguf_int4=ec.load.gguf_int4,
            )
        self.config = self.model.config
        from qwen35.quant.layers import set_int4_activations

        set_int4_activations(self.model, ec.load.int4_activations == "int8")  # (process-wide)
        self.model_name = model
        spec = bool(sc.num_speculative_tokens)
        mtp = spec and sc.speculative_method == "mtp"  # (ngram drafts need no MTP head)
        if mtp and not getattr(self.model, "has_mtp", False):
            raise Qwen35Error(
                "num_speculative_tokens needs the model loaded with its MTP head: pass a model "
                "path, or load_model(..., mtp=True)"
            )
        model_dir = Path(model) if Path(model).is_dir() else getattr(self.model, "model_dir", None)
        self.tokenizer = load_tokenizer(model_dir)
        # the built-in renderer thinks by model size; a checkpoint's own template by itself
        self.chat_template = ChatTemplate.from_model_dir(
            model_dir, default_thinking=default_thinking_for(self.config), override=template
        )
        thinking = self.chat_template.thinking_default()
        self.default_thinking = default_thinking_for(self.config) if thinking is None else thinking
        # the checkpoint's recommended sampling for what a request leaves unset
        self.default_sampling: dict = {}
        if ec.load.generation_config == "auto":
            from qwen35.generation_config import sampling_defaults

            self.default_sampling = sampling_defaults(model_dir)
        overrides = ec.load.override_generation_config or {}
        self.default_sampling.update(overrides)  # (checked by EngineConfig.validate)
        if self.default_sampling and verbose:
            from qwen35.generation_config import describe

            log.warning(describe(self.default_sampling, overridden=bool(overrides)))
        self.eos_token_ids = tuple(
            dict.fromkeys((*self.config.eos_token_ids, *self.tokenizer.eos_token_ids))
        )
        self.loras = None  # engine/lora_adapters.py: LoRA adapters served per request
        if ec.lora.enabled:
            if not hasattr(self.model, "lora_step"):
                raise Qwen35Error("this model cannot serve LoRA adapters per request")
            from qwen35.parallel.setup import lora_layout

            stacked, max_loras, max_rank = lora_layout(ec, self.device)
            send = None
            if self.workers is not None:  # each change to the other ranks (after rank 0's)
                from qwen35.parallel.group import broadcast

                w = self.workers
                send = lambda msg: w.guard(broadcast, w.control, msg)  # noqa: E731
            self.loras = LoraAdapters(self.model, max_loras, max_rank, stacked, send)
            for name, path in (ec.lora.lora_modules or {}).items():
                lora = self.loras.add(name, path)
                if verbose:
                    log.warning("LoRA adapter %r: rank %d, %.1f MiB (%s)", name, lora.rank,
                                lora.nbytes / 2**20, path)  # fmt: skip
        model_dtype = getattr(self.model, "dtype", None) or next(self.model.parameters()).dtype
        kv_dtype = getattr(torch, model_kv_dtype(self.model, self.device, cc.kv_cache_dtype))
        state_dtype = getattr(
            torch, resolve_state_dtype(cc.mamba_ssm_cache_dtype, self.config.mamba_ssm_dtype)
        )
        self.head_screen = None  # models/head_screen.py: CPU, one rank, plain fp32 / bf16 head
        if self.device.type == "cpu" and self.workers is None and ec.device.head_screen:
            from qwen35.models.head_screen import HeadScreen

            self.head_screen = HeadScreen.build(self.model)
        head_bytes = 0 if self.head_screen is None else self.head_screen.nbytes
        backend, working = None, None
        if self.device.type == "cuda":  # engine/preflight.py: kernels this GPU cannot build
            backend, working = gpu_start(
                self.model, model_dtype, sc.max_num_batched_tokens, sc.max_num_seqs, cc.block_size,
                alone=self.workers is None,  # (a tensor-parallel rank: the planner's formula)
                kv_dtype=kv_dtype,
            )  # fmt: skip
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
            weight_bytes=sum(p.numel() * p.element_size() for p in self.model.parameters())
            + head_bytes
            + (self.loras.nbytes if self.loras is not None else 0),
            num_blocks_override=cc.num_kv_blocks,
            working_bytes=working,  # GPU: measured peak of one largest prefill chunk
            tp=ec.parallel.tensor_parallel_size,
            extra_working_bytes=encoder_working_memory(self.model, model_dir, ec),
            speculative=sc.num_speculative_tokens,
            kv_dtype=kv_dtype,
            speculative_mtp=mtp,
            state_dtype=state_dtype,
        )
        self.max_model_len = self.plan.max_model_len
        if verbose:
            log.warning(self.plan.describe())
        # CUDA graphs (one device, not under tensor parallelism): one more block and one more
        # state slot as padding (model_runner.GraphSpec)
        graphs = self.device.type == "cuda" and not ec.device.enforce_eager and self.workers is None
        if graphs and spec:  # decode and verify steps and the MTP head's passes replay
            log.warning(
                "speculative decoding on %s (decode and verify steps replayed from CUDA graphs) "
                "has not been measured on a GPU yet: compare with --num-speculative-tokens 0",
                self.device,
            )
        # slots: running sequences, prefix-cache checkpoints, speculative spares, graph padding
        first_spare = self.plan.num_state_slots + self.plan.num_checkpoint_slots
        sizes = dict(
            num_blocks=self.plan.num_blocks + graphs,
            block_size=cc.block_size,
            num_slots=first_spare + self.plan.num_spare_slots + graphs,
            dtype=model_dtype,
            kv_dtype=kv_dtype,
            state_dtype=state_dtype,
            mtp_layers=int(mtp),
        )
        tp_size = ec.parallel.tensor_parallel_size
        caches = allocate_caches(self.config, device=self.device, tp=tp_size, **sizes)
        from qwen35.parallel.worker import rank_memory

        self.rank_memory = [rank_memory(self.model, caches, 0)]  # per rank (planner's per GPU)
        if self.device.type == "cpu" and self.workers is None:
            warn_if_caches_exceed_memory(self.rank_memory[0])
        if head_bytes:
            self.rank_memory[0]["head_screen_bytes"] = head_bytes
        steps_kw = dict(  # speculative decoding (engine/speculative.py), multi-step decoding
            decode_steps=sc.num_scheduler_steps,
            spec_slots=range(first_spare, first_spare + self.plan.num_spare_slots)
            if self.plan.num_spare_slots else None,
            spec_tokens=sc.num_speculative_tokens,
            spec_adaptive=sc.speculative_adaptive,
            spec_ngram=None if mtp else (sc.prompt_lookup_min, sc.prompt_lookup_max),
        )  # fmt: skip
        if self.workers is None:
            gspec = GraphSpec(min(sc.max_num_seqs, self.plan.num_state_slots), self.max_model_len)
            self.runner = ModelRunner(
                self.model, caches, self.eos_token_ids, self.device, backend=backend,
                decode_graphs=gspec if graphs else None, seed=ec.seed,
                head_screen=self.head_screen, **steps_kw,
            )  # fmt: skip
        else:
            from qwen35.parallel import setup as tp_setup
            from qwen35.parallel.runner import ParallelModelRunner

            tp_setup.share_caches(self.workers, **sizes)
            self.rank_memory = tp_setup.gather_memory(self.workers, self.rank_memory[0])
            self.runner = ParallelModelRunner(
                self.model, caches, self.eos_token_ids, self.device, self.workers, seed=ec.seed,
                **steps_kw,
            )  # fmt: skip
        if verbose:
            from qwen35.parallel.setup import describe_memory

            log.warning(
                describe_memory(
                    self.rank_memory, sizes["num_blocks"], cc.block_size, sizes["num_slots"]
                )
            )
        self.structured = StructuredOutputManager(
            self.tokenizer, self.config.vocab_size, self.eos_token_ids
        )
        self.runner.logits_processor = self.structured.apply
        if self.runner.spec is not None:
            self.runner.spec.grammar = self.structured.drafts
        self.mm_processor = make_mm_processor(self.model, model_dir, self.tokenizer, ec.multimodal)
        sched_cfg = SchedulerConfig(
            max_num_seqs=self.plan.num_state_slots,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=cc.block_size,
            enable_prefix_caching=cc.enable_prefix_caching,
            checkpoint_interval=cc.checkpoint_interval or self.plan.checkpoint_interval,
            eos_token_ids=self.eos_token_ids,
            max_num_encoder_tokens=ec.multimodal.max_num_encoder_tokens or 0,
            # positions a decode step may run past its token: drafts, or multi-step decoding
            num_lookahead_tokens=sc.num_speculative_tokens or sc.num_scheduler_steps - 1,
            scheduling_policy=sc.scheduling_policy,
            short_prompt_tokens=sc.short_prompt_tokens,
        )
        self.scheduler = Scheduler(
            sched_cfg,
            num_blocks=self.plan.num_blocks,
            num_slots=self.plan.num_state_slots,
            num_checkpoint_slots=self.plan.num_checkpoint_slots,
        )
        self.pacer = PrefillPacer(sc.max_decode_step_ms or 0)
        self.prefix_store = None  # engine/prefix_store.py: --prefix-cache-dir
        if cc.prefix_cache_dir is not None:
            from qwen35.engine import prefix_store as ps

            finger = ps.fingerprint(
                self.model, caches, quantization=ec.load.quantization, device=self.device.type,
                int4_activations=ec.load.int4_activations, yarn=ec.load.yarn,
                backend=getattr(getattr(self.runner, "backend", None), "name", None),
                tensor_parallel=ec.parallel.tensor_parallel_size,
                expert_parallel=ec.parallel.enable_expert_parallel,
            )  # fmt: skip
            self.prefix_store = ps.PrefixStore(
                cc.prefix_cache_dir, parse_bytes(cc.prefix_cache_dir_size),
                cc.prefix_cache_dir_min_tokens, finger,
            )  # fmt: skip
            if self.workers is not None:  # each rank keeps its shard of every segment
                self.prefix_store.ranks = ps.RankShards(self.workers)
                self.prefix_store.ranks.start(self.prefix_store)
            if verbose:
                log.warning("prefix cache on disk: %s (up to %s)", self.prefix_store.dir,
                            cc.prefix_cache_dir_size)  # fmt: skip
        self._requests: dict[str, _Request] = {}
        self._seq_to_req: dict[str, tuple[_Request, _SeqState]] = {}
        self._ids = itertools.count()
        self._failed_steps = 0  # consecutive model steps that raised
        self.stats_totals = {
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "request_errors_total": 0,
        }

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (if any) and finish the prefix-cache files being
        written; the engine cannot step afterwards."""
        if getattr(self, "prefix_store", None) is not None:
            self.prefix_store.close()
        if self.workers is not None:
            self.workers.stop()
            if torch.get_num_threads() != self._threads_before:
                torch.set_num_threads(self._threads_before)

    # ---- requests -----------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._tokenizer_ids_in_vocab(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)):
            raise Qwen35Error(
                f"a prompt must be a text or a list of token ids, got {type(prompt).__name__}"
            )
        if not prompt or not all(
            non_negative_int(t) and t < self.config.vocab_size for t in prompt
        ):
            raise Qwen35Error(
                f"prompt token ids must be a non-empty list of ints in [0, {self.config.vocab_size})"
            )
        return list(prompt)

    def _tokenizer_ids_in_vocab(self, ids: list[int]) -> list[int]:
        """ids the tokenizer made (a text prompt; a video's frame timestamps), checked against
        the model's vocabulary: a tokenizer that does not match the checkpoint is refused here,
        not by the embedding in the middle of a step."""
        bad = [t for t in ids if t >= self.config.vocab_size]
        if bad:
            raise Qwen35Error(
                f"the tokenizer gave id {bad[0]}, outside the model's vocabulary of "
                f"{self.config.vocab_size}: the model directory needs its own tokenizer.json"
            )
        return ids

    def _think_end_if_open(self, ids: list[int]) -> int | None:
        """The end-of-think token id where the prompt leaves the model inside a think block
        (its last <think> after its last </think>): what thinking_token_budget forces; None
        where the prompt does not (thinking off, or a completion prompt without one)."""
        start, end = (self.tokenizer.token_to_id(t) for t in ("<think>", "</think>"))
        if start is None or end is None or max(start, end) >= self.config.vocab_size:
            raise SamplingParamsError(
                "thinking_token_budget needs <think> and </think> tokens, which this model's "
                "tokenizer does not have", "thinking_token_budget",
            )  # fmt: skip
        for t in reversed(ids):
            if t == end:
                return None
            if t == start:
                return end
        return None

    @property
    def has_vision(self) -> bool:
        """True when images and videos are accepted (the vision tower is loaded)."""
        return self.mm_processor is not None

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams,
        multi_modal_data: dict | None = None,
        lora: str | None = None,
    ) -> None:
        """Queue a request (params.n sequences). prompt: text, token ids, or {"prompt" |
        "prompt_token_ids": ..., "multi_modal_data": {"image": ..., "video": ...}}; images need
        one <|image_pad|> each in the prompt. lora: the name of a loaded LoRA adapter to run
        with (`lora_modules`, add_lora). All or nothing: every check runs before anything is
        registered, and a failure while registering undoes what was done."""
        if not isinstance(params, SamplingParams):
            raise Qwen35Error(
                f"params must be a SamplingParams, got {type(params).__name__}"
                + (": SamplingParams(**that_dict)" if isinstance(params, dict) else "")
            )
        params = dataclasses.replace(params).validate()  # our own copy: max_tokens is filled in
        params.check_vocab(self.config.vocab_size)
        if params.priority and self.scheduler.config.scheduling_policy != "priority":
            raise SamplingParamsError(
                f"priority={params.priority} needs priority scheduling, which this engine does "
                "not run: start it with --scheduling-policy priority (scheduling_policy="
                "'priority'), or leave priority out",
                "priority",
            )
        if request_id in self._requests:
            raise Qwen35Error(f"request id {request_id!r} is already in use")
        prompt, multi_modal_data = split_mm_prompt(prompt, multi_modal_data)
        ids = self.encode_prompt(prompt)
        mm = None
        if multi_modal_data:
            if params.truncate_prompt_tokens is not None:
                raise SamplingParamsError(
                    "truncate_prompt_tokens would cut images / videos out of the prompt: leave "
                    "it out for multimodal prompts", "truncate_prompt_tokens",
                )  # fmt: skip
            mm = self._mm_prompt(ids, multi_modal_data)
            ids = self._tokenizer_ids_in_vocab(mm.token_ids)  # (video timestamps are text)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens :]
        if not ids:
            raise Qwen35Error("the prompt is empty")
        if params.bad_words:
            params.bad_words_token_ids = self._bad_words_ids(params.bad_words)
        if params.thinking_token_budget is not None:
            params.think_end_token_id = self._think_end_if_open(ids)
        room = self.max_model_len - len(ids)
        if params.max_tokens is None:
            if room < 1:
                raise PromptTooLongError(len(ids), None, self.max_model_len)
            params.max_tokens = room
        elif params.max_tokens > room:
            raise PromptTooLongError(len(ids), params.max_tokens, self.max_model_len)
        adapter = None
        if lora is not None:
            if self.loras is None:
                raise Qwen35Error(
                    f"LoRA adapter {lora!r} requested but this engine serves none: start it "
                    "with lora_modules (--lora-modules NAME=PATH) or enable_lora"
                )
            adapter = self.loras.get(lora)
        seq_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        taken = [x for x in seq_ids if x in self._seq_to_req or self.scheduler.get(x)]
        if taken:
            raise Qwen35Error(f"request id {request_id!r} clashes with sequence {taken[0]!r}")
        spec = params.structured_outputs
        if spec is not None:
            self.structured.compile(spec)  # cached when the server compiled it already
        req = _Request(
            request_id, prompt if isinstance(prompt, str) else None, ids, params, [], time.time(),
            lora=lora,
        )  # fmt: skip
        try:
            for i, seq_id in enumerate(seq_ids):
                seq = Sequence(
                    seq_id=seq_id, token_ids=list(ids), num_prompt_tokens=len(ids), params=params
                )
                if mm is not None:
                    seq.mm_items, seq.mrope, seq.rope_delta = mm.items, mm.mrope, mm.rope_delta
                if adapter is not None:
                    seq.lora_id, seq.cache_salt = adapter.key, adapter.cache_salt
                if params.cache_salt is not None:  # (a request's own salt, and its adapter's)
                    seq.cache_salt = f"{seq.cache_salt or ''}\x00{params.cache_salt}"
                if i == 0 and params.prompt_logprobs is not None:
                    seq.prompt_logprobs = []  # (the first sequence computes them for all n)
                detok = IncrementalDetokenizer(
                    self.tokenizer, skip_special_tokens=params.skip_special_tokens
                )
                st = _SeqState(
                    seq, detok, StopStringMatcher(params.stop, params.include_stop_str_in_output)
                )
                req.seqs.append(st)
                self._seq_to_req[seq_id] = (req, st)
                self.runner.add_sequence(seq_id, None if params.seed is None else params.seed + i)
                if spec is not None:
                    self.structured.add(seq_id, spec)
                self.scheduler.add(seq)
        except BaseException:
            for st in req.seqs:
                self.scheduler.abort(st.seq.seq_id)
                self._forget(st.seq.seq_id)
            raise
        self._requests[request_id] = req
        self.stats_totals["prompt_tokens_total"] += len(ids)

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad_words: each word as written and with one leading space
        (the form it takes after another word), distinct token sequences only."""
        out: list[list[int]] = []
        for w in words:
            for text in (w.lstrip(), " " + w.lstrip()):
                ids = self._tokenizer_ids_in_vocab(self.tokenizer.encode(text))
                if ids and ids not in out:
                    out.append(ids)
        return out

    # ---- LoRA adapters (engine/lora_adapters.py) --------------------------------------------
    def add_lora(self, name: str, path) -> None:
        """Load a PEFT LoRA adapter that requests may then name (`add_request(..., lora=name)`);
        needs enable_lora or lora_modules. Raises (naming the file or module) and changes
        nothing if the adapter cannot be served. path: a directory, or a qwen35.lora
        LoraAdapter already read."""
        if self.loras is None:
            raise Qwen35Error(
                "this engine was started without LoRA support: pass enable_lora=True "
                "(--enable-lora) or lora_modules"
            )
        self.loras.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while requests that use it run."""
        if self.loras is None:
            raise Qwen35Error("this engine serves no LoRA adapters")
        self.loras.get(name)
        using = sum(1 for r in self._requests.values() if r.lora == name)
        if using:
            raise Qwen35Error(
                f"LoRA adapter {name!r} is in use by {using} request(s): unload it when they end"
            )
        self.loras.remove(name)

    def list_loras(self) -> dict[str, str]:
        """Loaded adapters: name -> the directory it was loaded from."""
        return {} if self.loras is None else {x.name: x.path for x in self.loras.loaded.values()}

    def _mm_prompt(self, ids: list[int], mm_data: dict):
        if self.mm_processor is None:
            raise MediaError(
                "this model was loaded without a vision tower (text only): images and videos "
                "are not accepted"
            )
        return self.mm_processor.process(ids, mm_data)

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
        self.structured.remove(seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ---- stepping -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduled step. A sequence whose step fails (the model forward, its sampling or
        its detokenizing raised) ends its request with `error` set; the others go on."""
        t0 = time.perf_counter()
        if self.prefix_store is not None:
            self._import_prefixes()
        out = self.scheduler.schedule(self.pacer.cap(), short_first=self.pacer.short_first)
        try:
            result = self.runner.execute(out.scheduled)
            self.pacer.record(out.num_prefill_tokens, time.perf_counter() - t0)
        except Exception as e:
            if getattr(e, "fatal", False):  # e.g. a tensor-parallel worker died: no retry
                raise
            self._failed_steps += 1
            log.exception("model step failed; failing its %d sequences", len(out.scheduled))
            result = StepResult({}, {}, {s.seq.seq_id: e for s in out.scheduled})
        else:
            self._failed_steps = 0
        errors: dict[str, Exception] = dict(result.errors)
        for seq_id in errors:  # before update(), which then skips them
            self.scheduler.finish(seq_id, "error")
        finished = {s.seq_id for s in self.scheduler.update(out, result.sampled, result.bonus)}
        if self.prefix_store is not None:
            from qwen35.engine.prefix_store import export_prefixes

            export_prefixes(self.prefix_store, self.scheduler, self.runner.caches, out, set(errors))
        for seq_id, lps in result.prompt_logprobs.items():
            if seq_id not in errors:
                self._seq_to_req[seq_id][1].seq.prompt_logprobs.extend(lps)
        now = time.time()
        touched: dict[str, _Request] = {}
        for seq_id, token in result.sampled.items():
            req, st = self._seq_to_req[seq_id]
            touched[req.request_id] = req
            if req.first_token is None:
                req.first_token = now
            # speculative decoding: the tokens after accepted drafts came in the same step
            toks = [token, *result.bonus.get(seq_id, [])[: out.bonus_applied.get(seq_id, 0)]]
            try:
                for k, tok in enumerate(toks):
                    self.structured.advance(seq_id, tok)
                    self.stats_totals["generation_tokens_total"] += 1
                    if k:  # a bonus token's logprob info (speculative decoding)
                        lps = result.bonus_logprobs.get(seq_id)
                        if lps is not None and k <= len(lps):
                            st.logprobs.append(lps[k - 1])
                    elif seq_id in result.logprobs:
                        st.logprobs.append(result.logprobs[seq_id])
                    if self._process_token(st, seq_id, tok, finished, len(toks) - 1 - k):
                        break
            except Exception as e:
                log.exception("processing the output of %s failed", seq_id)
                errors[seq_id] = e
                self.scheduler.finish(seq_id, "error")
        for seq_id, e in errors.items():
            req, _ = self._seq_to_req[seq_id]
            touched[req.request_id] = req
            if req.error is None:
                req.error = f"{type(e).__name__}: {e}"
                self.stats_totals["request_errors_total"] += 1
                # what the request itself asked for (constraints that leave no token, a grammar
                # this checkpoint cannot follow) is the client's, not the server's, failure
                mine = isinstance(e, (NoTokenAllowedError, SamplingParamsError))
                log.log(logging.WARNING if mine else logging.ERROR, "request %s failed: %s",
                        req.request_id, req.error)  # fmt: skip
            for st in req.seqs:  # its other sequences stop too: the request has failed
                self.scheduler.abort(st.seq.seq_id)
                st.done = True
        outputs = [d for req in touched.values() if (d := self._delta(req, now)) is not None]
        for req in touched.values():
            if all(st.done for st in req.seqs):
                del self._requests[req.request_id]
                for st in req.seqs:
                    self._forget(st.seq.seq_id)
        if self._failed_steps >= MAX_FAILED_STEPS:
            raise EngineBrokenError(
                f"the model step failed {self._failed_steps} times in a row (last: "
                f"{next(iter(errors.values()), None)!r}); the engine cannot go on"
            )
        if result.decode_rows:  # speculative decoding: the whole step's time by its rows
            self.runner.spec.cost.record(result.decode_rows, time.perf_counter() - t0)
        return outputs

    def reset_prefix_cache(self, external: bool = False) -> int:
        """Forget the cached prefixes: KV blocks and state checkpoints (running requests keep
        what they hold), e.g. between benchmark runs; external: also remove --prefix-cache-dir's
        files of this engine's fingerprint (every rank's). -> files removed."""
        self.scheduler.reset_prefix_cache()
        if external and self.prefix_store is not None:
            return self.prefix_store.clear()
        return 0

    def _import_prefixes(self) -> None:
        """--prefix-cache-dir: the prompts that may be admitted this step, not looked up yet, take
        what the folder holds beyond the memory cache (engine/prefix_store.py)."""
        from qwen35.engine.prefix_store import import_prefix

        sched = self.scheduler
        seats = sched.config.max_num_seqs - len(sched.running)
        for seq in list(itertools.islice(sched.waiting, max(seats, 0))):
            if not seq.disk_checked:
                seq.disk_checked = True
                import_prefix(self.prefix_store, sched, self.runner.caches, seq)

    def _process_token(
        self, st: _SeqState, seq_id: str, token: int, finished, pending: int = 0
    ) -> bool:
        """Detokenize one new token and match stop strings. pending: tokens update() appended
        after this one (a speculative bonus); True when a stop string ends in this token and
        they are dropped (they were never generated)."""
        seq = st.seq  # (update() has appended the token: a stop string may end in the text of
        # tokens after the first min_tokens, as EOS and stop ids may only follow them)
        # The EOS or stop id that ended the sequence stays in its token ids but not in its text,
        # unless include_stop_str_in_output (as vLLM: a stop id's text is not the output's)
        ended_by_id = (not pending and seq_id in finished
                       and seq.status is SequenceStatus.FINISHED_STOPPED
                       and not isinstance(seq.stop_reason, str)
                       and not seq.params.include_stop_str_in_output)  # fmt: skip
        emit, stopped, stop_str = st.stop.feed(
            "" if ended_by_id else st.detok.add(token),
            check=seq.num_output_tokens - pending > seq.params.min_tokens,
        )
        st.text += emit
        if pending:
            if not stopped:
                return False
            del seq.token_ids[len(seq.token_ids) - pending :]
            if not self.scheduler.finish(seq_id, "stop", stop_str):  # a later token ended it
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.finish_reason, seq.stop_reason = FINISH_REASONS[seq.status], stop_str
            finished.add(seq_id)
            st.done = True
            return True
        if stopped and seq_id not in finished:
            self.scheduler.finish(seq_id, "stop", stop_str)
            finished.add(seq_id)
        elif stopped and seq.status is SequenceStatus.FINISHED_LENGTH:
            # the last token the length allowed completed a stop string: it stopped there
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.finish_reason, seq.stop_reason = FINISH_REASONS[seq.status], stop_str
        if seq_id in finished:
            st.done = True
            if not stopped:
                st.text += st.stop.feed(st.detok.flush())[0] + st.stop.flush()
        return stopped

    def _delta(self, req: _Request, now: float) -> RequestOutput | None:
        """What is new in the request; None: nothing to say yet (n > 1 with prompt logprobs:
        a sibling's tokens wait for the first sequence's prompt, whose logprobs come first)."""
        outs, prompt_lps = [], None
        first = req.seqs[0].seq
        if first.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            if not first.needs_prompt_logprobs:  # (its prompt has run: the first token's step)
                prompt_lps = [None, *first.prompt_logprobs]
                req.prompt_logprobs_sent = True
            elif req.error is None and not all(st.done for st in req.seqs):
                return None
        for i, st in enumerate(req.seqs):
            if st.final_sent:  # n > 1: a sibling still runs; this one has said all it will
                continue
            seq = st.seq
            new_ids = seq.token_ids[seq.num_prompt_tokens + st.sent_tokens :]  # (no O(len) copy)
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
            error=req.error,
            prompt_logprobs=prompt_lps,
        )

    def request_tables(self) -> dict[str, int]:
        """The tables the engine keeps per request or sequence (its own, the scheduler's, the
        runner's, speculative decoding's, structured outputs', images') that hold entries now,
        with how many: {} once it is idle, whatever the requests did (finished, aborted, failed,
        preempted). Tests check that after their workloads (tests/server_fakes.py
        assert_recovered): an entry left behind is memory a long-running server never gets
        back. Add a new table here."""
        runner, spec = self.runner, self.runner.spec
        tables = {
            "requests": self._requests, "seq_to_req": self._seq_to_req,
            "scheduler.seqs": self.scheduler._seqs, "scheduler.waiting": self.scheduler.waiting,
            "scheduler.running": self.scheduler.running,
            "scheduler.short_ids": self.scheduler._short_ids, "runner.generators": runner._generators,
            "runner.tables": runner._tables, "structured.seqs": self.structured._seqs,
        }  # fmt: skip
        if spec is not None:
            tables.update({"spec.drafts": spec.drafts, "spec.accept": spec.accept,
                           "spec.misses": spec.misses, "spec.paused": spec.paused})  # fmt: skip
        if runner.vision is not None:
            tables["vision.cache"] = runner.vision.cache
        return {name: len(t) for name, t in tables.items() if t}

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
            **({} if self.prefix_store is None else {f"prefix_cache_{k}": v for k, v in
                                                     self.prefix_store.stats.items()}),
            **self._spec_stats(),
            **self._lora_stats(),
            **self.stats_totals,
        }

    def _lora_stats(self) -> dict:
        if self.loras is None:
            return {}
        running: dict[str, int] = {name: 0 for name in self.loras.loaded}
        for r in self._requests.values():
            if r.lora is not None:
                running[r.lora] = running.get(r.lora, 0) + 1
        return {"lora_adapters_loaded": len(self.loras.loaded), "lora_requests": running}


    def _spec_stats(self) -> dict:
        spec = getattr(self.runner, "spec", None)
        if spec is None:
            return {}
        return {"spec_drafts_total": spec.stats.drafts, "spec_accepted_total": spec.stats.accepted}


class LLM:
    """Offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, config: EngineConfig | None = None, **options):
        self.engine = LLMEngine(model, config, **options)
        self._counter = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit)."""
        self.engine.shutdown()

    def _new_id(self) -> str:
        return f"llm-{next(self._counter)}"

    def default_params(self) -> SamplingParams:
        """What `generate` / `stream` / `chat` use without params: SamplingParams' defaults
        with the checkpoint's generation_config.json sampling over them (generation_config.py;
        `generation_config="none"`: SamplingParams())."""
        return SamplingParams(**self.engine.default_sampling)

    def generate(
        self,
        prompts: str | list[int] | abc.Sequence[str | list[int]],
        params: SamplingParams | abc.Sequence[SamplingParams] | None = None,
        lora: str | None = None,
        priority: abc.Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. `params`: one SamplingParams for all prompts or one
        per prompt; `lora`: a loaded LoRA adapter's name (`lora_modules`); `priority`: one per
        prompt (vLLM's; engines with scheduling_policy="priority" run lower ones first). Raises
        RequestFailedError (after the others finish) if the engine failed some request; nothing
        is queued if any prompt is refused."""
        if not isinstance(prompts, (str, dict, abc.Sequence)):
            raise Qwen35Error(
                f"prompts must be a text, a list of token ids, a prompt dict, or a list of "
                f"those; got {type(prompts).__name__}"
            )
        single = isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.default_params()] * len(plist)
        params = list(params)
        if len(params) != len(plist):
            raise Qwen35Error(
                f"got {len(plist)} prompts but {len(params)} SamplingParams: pass one "
                "SamplingParams for all prompts, or exactly one per prompt"
            )
        if priority is not None:
            if isinstance(priority, (int, str)) or len(priority) != len(plist):
                raise Qwen35Error(f"priority needs one integer per prompt ({len(plist)})")
            params = [
                dataclasses.replace(sp, priority=x)
                for sp, x in zip(params, priority, strict=True)
            ]
        ids: list[str] = []
        try:
            for p, sp in zip(plist, params, strict=True):
                rid = self._new_id()
                self.engine.add_request(rid, p, sp, lora=lora)
                ids.append(rid)
        except BaseException:
            for rid in ids:  # all or none
                self.engine.abort_request(rid)
            raise
        merged: dict[str, RequestOutput | None] = {rid: None for rid in ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.request_id in merged:
                    merged[out.request_id] = _merge(merged[out.request_id], out)
        outs = [merged[rid] for rid in ids]
        failed = [i for i, o in enumerate(outs) if o is not None and o.error]
        if failed:
            raise RequestFailedError(
                f"the engine failed {len(failed)} of {len(outs)} prompts (indices {failed[:10]}"
                f"{'...' if len(failed) > 10 else ''}): {outs[failed[0]].error}; the outputs "
                "(failed ones with .error) are in this exception's .outputs",
                outs,
            )
        return outs

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, lora: str | None = None
    ) -> Iterator[RequestOutput]:
        """Deltas of one request as they are produced (other queued requests progress too).
        Raises RequestFailedError if the engine fails the request."""
        rid = self._new_id()
        self.engine.add_request(rid, prompt, params or self.default_params(), lora=lora)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.error:
                            raise RequestFailedError(f"the engine failed: {out.error}", [out])
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def chat(
        self,
        messages: list[dict],
        params: SamplingParams | None = None,
        lora: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs,
    ):
        """Messages may carry image / video parts (OpenAI `image_url`, vLLM `video_url`).
        continue_final_message (with add_generation_prompt=False): the model continues the
        final message (e.g. an assistant reply begun by the caller) instead of starting a turn."""
        if not isinstance(messages, list):
            raise ChatFormatError(
                f"messages must be a list of message objects, got {type(messages).__name__}"
            )
        if not self.engine.has_vision:
            check_text_only(messages)  # names the part; the engine would refuse it later anyway
        messages, media = extract_media(messages)
        template = self.engine.chat_template
        prompt = template.render(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **template_kwargs,
        )  # fmt: skip
        if media:
            prompt = {"prompt": prompt, "multi_modal_data": media}
        elif add_generation_prompt and not continue_final_message:  # prefix-cache checkpoints
            # where the system prompt and the conversation before this turn end
            enc = self.engine.encode_prompt
            shared = template.shared_prefixes(messages, **template_kwargs)
            points = cache_points(enc, shared, enc(prompt), prompt)
            params = dataclasses.replace(params or self.default_params(), cache_points=points)
        return self.generate([prompt], params, lora=lora)[0]


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
    acc.prompt_logprobs = delta.prompt_logprobs or acc.prompt_logprobs
    acc.metrics = {**acc.metrics, **delta.metrics}
    acc.error = delta.error or acc.error
    return acc
