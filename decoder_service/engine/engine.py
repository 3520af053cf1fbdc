"""``LLMEngine``: admit requests, run steps, hand back tokens and text.

Contract: ``add_request`` validates everything a caller controls and raises a typed
``InvalidRequestError`` before the request touches the batch (requests in flight never notice).
``step()`` is one iteration: schedule -> execute -> update -> outputs; it returns one
``RequestOutput`` per request that produced a token or finished in that step. With
``overlap_outputs`` the next step is scheduled and launched before the outputs are built, so
the device runs it while the host detokenises and the caller consumes the outputs. Tokens, texts
and the order of outputs stay the same, but a request added or given its media between two calls
joins one step later (the step in flight does not change), and one aborted between two calls or
ended by a stop string has one more token computed and dropped. ``attach_media``
delivers embeddings that arrive after admission; ``abort_request`` ends a request and frees its
blocks. ``stats()`` reports queue lengths, KV usage, preemptions and prefix-cache counters.
With tensor parallelism (``workers`` from ``parallel.start_workers``) this object is rank 0:
it schedules and samples while every step also runs on the worker ranks; ``close()`` stops them.
Start-up binds the KV cache and then configures decode steps on every rank: on CUDA (unless
``--enforce-eager``) that captures the decode CUDA graphs, so they exist before the first
request (``cuda_graphs.py``; ``uses_cuda_graphs`` says whether they do).
The engine is single-threaded: callers serialise add/abort/step. Loading weights,
chat templates and media decoding belong to the callers (``generate.py``, the decoder service).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from decoder_service.engine.config import CPU_DEFAULT_NUM_BLOCKS, EngineConfig
from decoder_service.engine.cuda_graphs import DecodeSettings, decode_settings
from decoder_service.engine.detokenizer import IncrementalDetokenizer, TokenBytes
from decoder_service.engine.errors import (
    DuplicateRequestError,
    MediaSpanError,
    UnknownRequestError,
)
from decoder_service.engine.kv_cache_manager import KVCacheManager
from decoder_service.engine.model_runner import (
    ModelRunner,
    PendingStep,
    RunnerOutput,
    TokenLogprobs,
)
from decoder_service.engine.parallel import GuardedStep, ParallelExecutor, WorkerGroup
from decoder_service.engine.request import MediaItem, Request, RequestStatus
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine.scheduler import Scheduler, SchedulerOutput
from decoder_service.engine.validation import RequestValidator
from decoder_service.engine.workers import DecodeMessage, agree_on_graphs
from models.glm4v.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # tokens generated this step (empty for an abort)
    new_text: str  # text released this step (stop strings and partial characters held back)
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" once finished
    stop_reason: str | int | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs] | None = None  # one per new token (forced ones too), if asked


@dataclass
class CompletedRequest:
    """Accumulated outputs of one request (see ``LLMEngine.run_to_completion``)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class StepRecord:
    """What the last step computed and how long it took."""

    kind: str  # "decode": one token per request (CUDA-graph eligible); "mixed": prefill tokens too
    num_seqs: int
    num_tokens: int
    seconds: float  # from its launch (or the previous step's result, if later) to its result


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # requests holding KV blocks
    num_waiting: int  # queued, preempted or waiting for media
    kv_usage: float  # fraction of KV blocks referenced by requests (0..1)
    num_blocks: int  # KV pool size
    num_preemptions: int  # since start
    prefix_queries: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int  # of which found
    last_step: StepRecord | None = None  # None before the first step, or after an idle one


class _InFlight(NamedTuple):
    scheduled: SchedulerOutput  # the step
    pending: PendingStep | GuardedStep  # its launch; ``result()`` waits for the device
    launched_at: float  # time.perf_counter()


class LLMEngine:
    # NOTE: the runner binds its KV tensors to the model's attention layers, so a model serves
    # one engine at a time; building a second engine on the same model retires the first.
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        config: EngineConfig,
        tokenizer: Any | None = None,
        workers: WorkerGroup | None = None,  # ranks 1..tp-1 (``parallel.start_workers``)
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_model_len = (
            config.scheduler.max_model_len or model_config.text.max_position_embeddings
        )
        self.runner = ModelRunner(model, config.cache.block_size, self._media)
        # with tensor parallelism every runner call is mirrored on the worker ranks
        self.executor: ModelRunner | ParallelExecutor = (
            self.runner if workers is None else ParallelExecutor(self.runner, workers)
        )
        num_blocks = config.cache.num_blocks
        if num_blocks is None:
            if self.runner.device.type == "cuda":
                num_blocks = self.executor.profile_num_blocks(
                    config.scheduler.max_num_batched_tokens,
                    config.scheduler.max_running_requests,
                    config.cache.mem_fraction_static,
                )
                reserved = config.cache.reserved_gpu_mb << 20
                num_blocks -= -(-reserved // self.runner.bytes_per_block())  # whole blocks
            else:
                num_blocks = CPU_DEFAULT_NUM_BLOCKS
        if num_blocks < 1:
            raise RuntimeError(
                "no GPU memory left for the KV cache after the weights, the activation peak and "
                f"{config.cache.reserved_gpu_mb} MiB reserved for vision features; raise "
                "--mem-fraction-static, lower --mm-device-budget-mb or --max-num-batched-tokens"
            )
        self.executor.allocate_kv_cache(num_blocks)
        self._configure_decode(
            decode_settings(
                config.execution,
                self.runner.device,
                self.max_model_len,
                config.scheduler.max_running_requests,
            )
        )
        self.kv = KVCacheManager(
            num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.validator = RequestValidator(
            vocab_size=model_config.text.vocab_size,
            hidden_size=model_config.text.hidden_size,
            max_model_len=self.max_model_len,
            media=config.media,
            num_blocks=num_blocks,
            block_size=config.cache.block_size,
            has_tokenizer=tokenizer is not None,
        )
        self._detok: dict[str, IncrementalDetokenizer] = {}
        # decodes of single token ids, per skip_special_tokens setting, shared by every request
        self._single_texts: dict[bool, dict[int, str]] = {True: {}, False: {}}
        # a ByteLevel tokenizer's per-id bytes, shared too: detokenising without decode calls
        self._token_bytes = None if tokenizer is None else TokenBytes.of(tokenizer)
        self._aborted: list[Request] = []
        self._in_flight: _InFlight | None = None  # the step launched ahead (overlap_outputs)
        self.last_step: StepRecord | None = None
        self.last_launched: SchedulerOutput | None = None
        self._last_result_at = 0.0  # perf_counter() when the last step's result came
        self.idle = False

    def _configure_decode(self, settings: DecodeSettings) -> None:
        if not isinstance(self.executor, ParallelExecutor):
            self.runner.configure_decode(settings)
            return
        workers = self.executor.workers
        with workers.guard():  # every rank captures the same graphs, or none does
            workers.send(DecodeMessage(settings))
            agree_on_graphs(self.runner, self.runner.configure_decode(settings), workers.groups)

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.runner.graphs is not None

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        mm_items: Sequence[MediaItem] = (),
        mrope_positions: torch.Tensor | None = None,  # [3, P] int64
        rope_delta: int = 0,
    ) -> Request:
        params = sampling_params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        items = sorted(mm_items, key=lambda it: it.offset)
        if request_id in self.scheduler.requests:
            raise DuplicateRequestError(f"request id {request_id!r} is in flight", "request_id")
        self.validator.check(prompt, params, items, mrope_positions)
        for item in items:
            if item.embeds is not None:
                item.embeds = self._to_device(item.embeds)
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            eos_token_ids=tuple(self.model_config.text.eos_token_ids),
            mm_items=list(items),
            mrope_positions=None
            if mrope_positions is None
            else mrope_positions.to("cpu", torch.long),
            rope_delta=int(rope_delta),
        )
        if self.tokenizer is not None:
            skip = params.skip_special_tokens
            self._detok[request_id] = IncrementalDetokenizer(
                self.tokenizer, skip, params.stop, self._single_texts[skip], self._token_bytes
            )
        self.scheduler.add_request(request)
        return request

    def attach_media(self, request_id: str, index: int, embeds: torch.Tensor) -> None:
        """Deliver the embeddings [n, H] of media item ``index`` of a request already admitted."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            raise UnknownRequestError(request_id)
        if not 0 <= index < len(req.mm_items):
            raise MediaSpanError(f"request {request_id} has no media item {index}", "mm_items")
        item = req.mm_items[index]
        self.validator.check_embeds(item, embeds)
        item.embeds = self._to_device(embeds)

    def abort_request(self, request_id: str) -> bool:
        """End a request now; False if it is unknown or already finished."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(req)
        return True

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._aborted)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage,
            num_blocks=self.kv.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=self.kv.prefix_queries,
            prefix_hits=self.kv.prefix_hits,
            last_step=self.last_step,
        )

    # ---- the loop ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled, pending, launched_at = self._in_flight or self._launch()
        self._in_flight = None
        self.idle = scheduled.is_empty  # nothing could run (e.g. all wait for media)
        result = pending.result()
        done = time.perf_counter()
        self.last_step = None
        if not self.idle:
            n_seqs, n_tokens = len(scheduled.sequences), scheduled.num_batched_tokens
            self.last_step = StepRecord(
                "decode" if n_tokens == n_seqs else "mixed",
                n_seqs,
                n_tokens,
                done - max(launched_at, self._last_result_at),
            )
        self._last_result_at = done
        updates = self.scheduler.update_from_output(scheduled, result.sampled)
        if self.config.execution.overlap_outputs and self.scheduler.has_unfinished:
            # NOTE: the next step is scheduled and queued before this one's outputs are built. A
            # request that ends there (stop string) is in it already: its token from that step
            # is dropped by update_from_output, like one aborted between schedule and update.
            self._in_flight = self._launch()
        return self._outputs(updates, result)

    def _launch(self) -> _InFlight:
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.last_launched = scheduled  # what a failing step was (the loop logs it)
        return _InFlight(scheduled, self.executor.launch(scheduled), start)

    def close(self) -> None:
        """Stop the worker ranks of a tensor-parallel engine (nothing to do in one process)."""
        if isinstance(self.executor, ParallelExecutor):
            self.executor.close()

    def run_to_completion(self) -> dict[str, CompletedRequest]:
        """Step until every request has finished; accumulate their outputs (offline use)."""
        done: dict[str, CompletedRequest] = {}
        unfinished = [*self.scheduler.requests.values(), *self._aborted]
        pending = {
            r.request_id: CompletedRequest(r.request_id, r.prompt_token_ids) for r in unfinished
        }
        while self.has_unfinished_requests:
            outputs = self.step()
            if not outputs and self.idle:
                raise RuntimeError("requests wait for media embeddings that were never attached")
            for out in outputs:
                acc = pending[out.request_id]
                acc.token_ids += out.new_token_ids
                acc.text += out.new_text
                acc.logprobs += out.logprobs or []
                if out.finished:
                    acc.finish_reason, acc.stop_reason = out.finish_reason, out.stop_reason
                    acc.num_cached_tokens = out.num_cached_tokens
                    done[out.request_id] = pending.pop(out.request_id)
        return done

    def _outputs(
        self, updates: list[tuple[Request, list[int]]], result: RunnerOutput
    ) -> list[RequestOutput]:
        outputs = [self._output(req, [], "", None) for req in self._aborted]
        self._aborted = []
        detoks = self._detok
        want_logprobs = bool(result.logprobs)
        for req, new_ids in updates:
            text = ""
            rid = req.request_id
            detok = detoks.get(rid)
            if detok is not None:
                text = detok.push(new_ids)
                if detok.stop_string is not None and not req.finished:
                    self.scheduler.finish_request(
                        req, RequestStatus.FINISHED_STOPPED, detok.stop_string
                    )
                elif req.finished:
                    text += detok.flush()
            lp = result.logprobs_of(rid, new_ids[0]) if want_logprobs else None
            outputs.append(self._output(req, new_ids, text, [lp] if lp else None))
        return outputs

    def _output(self, req: Request, new_ids: list[int], text: str, logprobs) -> RequestOutput:
        finished = req.finished
        if finished:
            self._detok.pop(req.request_id, None)
        # positional: one is built per running request per step
        return RequestOutput(
            req.request_id,
            new_ids,
            text,
            finished,
            req.finish_reason,
            req.stop_reason,
            req.num_prompt_tokens,
            max(req.num_cached_tokens, 0),
            logprobs,
        )

    # ---- helpers ------------------------------------------------------------------------------

    def _to_device(self, embeds: torch.Tensor) -> torch.Tensor:
        # features parked in host memory (the decoder's device budget) stay there: prefill
        # copies the rows each step needs (model_runner._media_rows)
        device = embeds.device if embeds.device.type == "cpu" else self.runner.device
        return embeds.to(device, self.runner.dtype)

    def _media(self, request_id: str, index: int) -> torch.Tensor:
        embeds = self.scheduler.requests[request_id].mm_items[index].embeds
        if embeds is None:  # the scheduler never schedules past a missing item
            raise RuntimeError(f"embeddings of item {index} of {request_id} are missing")
        return embeds
