"""The paged-KV executor: one per process, owns the model, the KV pools and the device.

Its interface is split in two: `launch(batch, prev)` prepares the step on the host and starts
the forward pass and sampling, returning a handle; `collect(handle)` waits for the sampled
tokens and reads them back. `prev` is the handle of the step launched just before, whose
output tensor resolves this step's placeholder tokens on the device.

`Executor` runs each step inside `launch` (synchronous). `tandem.engine.device.executor_worker` (a CPU
worker thread) and `tandem.engine.device.executor_cuda` (CUDA streams) run launched steps in the
background, in launch order, so the host can prepare step N+1 while step N computes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import structlog
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from tandem.engine.config import ATTENTION_BACKENDS
from tandem.engine.device import faults, paged_cpu
from tandem.engine.device.attention import STEP_KWARG
from tandem.engine.device.batch import (
    DECODE_GROUP_COST_SLOTS,
    DEFAULT_GROUP_COST,
    NO_GROUPING,
    HostBatch,
    PreparedStep,
    StepBatch,
    build_host_batch,
    device_step,
)
from tandem.engine.device.graphs import DecodeGraphs
from tandem.engine.device.kv_cache import KVCache
from tandem.engine.device.sampling import SampleOutput, SamplingTensors, build_sampling, sample

if TYPE_CHECKING:
    from tandem.engine.device.tensor_parallel import TensorParallel

log = structlog.get_logger("tandem.engine")

# NOTE: cuDNN's SDPA builds an execution plan for every new shape, and a step's context lengths
# change every step: on an H200 that made a 0.5B model's decode step ~75 ms of plan building.
# Flash (no mask) and memory-efficient (masked decodes) have no per-shape setup.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The SDPA backends tandem's attention runs under on `device`."""
    cuda = torch.device(device).type == "cuda"
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if cuda else contextlib.nullcontext()


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepResult:
    """Sampled tokens, one per row that asked to sample, in row order."""

    choices: list[TokenChoice]


@dataclass
class StepHandle:
    """A launched step. Background executors subclass it with what they wait on."""

    host: HostBatch
    sampling: SamplingTensors | None
    prev: StepHandle | None
    output: SampleOutput | None = None
    error: BaseException | None = None


H = TypeVar("H", bound=StepHandle)


@dataclass(frozen=True)
class StepTrace:
    """One step's shape and device time, for utilisation figures (FLOPs per step)."""

    tokens: int  # query tokens computed
    decode_rows: int
    sampled_rows: int  # rows that reached the LM head
    attended_keys: int  # sum over query tokens of the keys each attends to
    busy_seconds: float


@dataclass
class ExecutorStats:
    """Where step time goes. Host: preparing batches. Device busy: the forward pass and
    sampling. Device idle: gaps between busy periods while the engine had work (the device
    waiting on the host); time with no work at all is not counted."""

    steps: int = 0
    tokens: int = 0
    prepare_seconds: float = 0.0
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    trace: list[StepTrace] | None = None  # set to a list to record every step (benchmarks)

    def record(self, host: HostBatch, busy: float, idle: float | None) -> None:
        self.busy_seconds += busy
        if idle is not None:
            self.idle_seconds += max(0.0, idle)
        self.steps += 1
        if self.trace is not None:
            rows = sum(size for size, _ in host.decode_groups)
            sampled = host.sections.sample_rows[1]
            self.trace.append(StepTrace(host.num_tokens, rows, sampled, host.attended_keys, busy))


def paged_kernel_for(choice: str, device: torch.device) -> Callable | None:
    """The Triton paged kernel where `choice` wants it: "auto" on CUDA when Triton imports,
    "triton" always (on the CPU only under TRITON_INTERPRET=1: tests); "gather" never."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {choice!r}")
    if choice == "gather" or (choice == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention 'triton' runs on CUDA (on the CPU only under TRITON_INTERPRET=1, for tests)")
    try:
        from tandem.engine.device.paged_triton import paged_attention
    except ImportError as exc:
        if choice == "triton":
            raise ValueError(f"attention 'triton' needs the triton package: {exc}") from None
        log.warning("triton_unavailable", error=str(exc), fallback="gather")
        return None
    return paged_attention


class Executor:
    def __init__(
        self,
        model: Any,
        kv: KVCache,
        device: torch.device,
        seed: int = 0,
        attention: str = "auto",
        tp: TensorParallel | None = None,
    ) -> None:
        # model: a transformers PreTrainedModel (Any: its attributes are built at run time)
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.layout.block_size
        self.paged_kernel = paged_kernel_for(attention, device)
        fused = attention == "auto" and self._fused_fits(model, kv, device)
        self.fused_decode = paged_cpu.decode_kernel() if fused else None
        self.graphs: DecodeGraphs | None = None  # use_graphs
        self.group_cost = (
            NO_GROUPING if self.fused_decode else DECODE_GROUP_COST_SLOTS.get(device.type, DEFAULT_GROUP_COST)
        )
        self.rng = np.random.default_rng(seed)
        self.stats = ExecutorStats()
        self._last_busy_end: float | None = None
        self._last_end_event: torch.cuda.Event | None = None  # synchronous CUDA steps: the device timeline
        self._fault = faults.from_env()
        self._computed = 0
        self.tp = tp  # rank 0 of a tensor-parallel group: followers run each step too

    @property
    def attention_kind(self) -> str:
        """How attention reads the cache: triton, cpu-kernel or gather."""
        return "triton" if self.paged_kernel else "cpu-kernel" if self.fused_decode else "gather"

    def use_graphs(self, max_rows: int, max_context: int, capture: bool = True) -> None:
        """Decode steps of up to `max_rows` rows through CUDA graphs, captured now (the paged
        kernel only). `capture=False`: the same static-buffer path, eagerly (CPU tests)."""
        if self.paged_kernel is None:
            raise ValueError("CUDA graphs need the paged attention kernel (attention 'auto' on CUDA, or 'triton')")
        try:
            self.graphs = DecodeGraphs(self.forward, self.kv, self.paged_kernel, max_rows, max_context, capture)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # e.g. a model whose forward syncs with the host (dynamic RoPE)
            log.warning("cuda_graphs_unavailable", error=str(exc)[:300], fallback="eager decode steps")
            self.graphs = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @staticmethod
    def _fused_fits(model: Any, kv: KVCache, device: torch.device) -> bool:
        text = model.config.get_text_config()
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        heads = text.num_attention_heads * kv.layout.num_kv_heads // kv_heads  # this rank's share under TP
        return (
            device.type == "cpu"
            and kv.layout.dtype in (torch.float32, torch.bfloat16)
            and paged_cpu.supports(heads, kv.layout.num_kv_heads, kv.layout.head_dim)
        )

    # -- the launch / collect interface ----------------------------------------------------
    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        handle = self._prepare(batch, prev, StepHandle)
        try:
            self._execute(handle)
        except BaseException as exc:
            if self.tp is not None:  # the followers wait in this step's collectives
                self.tp.abort(repr(exc))
            raise
        return handle

    def collect(self, handle: StepHandle) -> StepResult:
        handle.prev = None  # computed: its predecessor's outputs are no longer needed (no chain)
        if handle.error is not None:
            raise handle.error
        return self._read(handle.output)

    def step(self, batch: StepBatch) -> StepResult:
        return self.collect(self.launch(batch))

    def pause(self) -> None:
        """The engine ran out of work: the gap until the next step is not device idle time."""
        self._last_busy_end = None
        self._last_end_event = None

    def close(self) -> None:
        if self.tp is not None:
            self.tp.close()

    # -- pieces ----------------------------------------------------------------------------
    def _prepare(self, batch: StepBatch, prev: StepHandle | None, kind: type[H]) -> H:
        started = time.perf_counter()
        host = build_host_batch(batch, self.block_size, self.group_cost, self.paged_kernel is not None)
        specs = [spec for row in batch.rows if row.sample is not None for spec in (row.sample, *row.forks)]
        sampling = build_sampling(specs, self.device, self.rng, batch.grammar) if specs else None
        if self.tp is not None:  # at launch: under overlap the followers get step N+1 while N computes
            self.tp.send_step(host, len(specs))
        self.stats.prepare_seconds += time.perf_counter() - started
        self.stats.tokens += host.num_tokens
        return kind(host, sampling, prev)

    def _compute(self, handle: StepHandle, flat: torch.Tensor) -> None:
        """Forward and sample, on the current device stream."""
        logits = self._forward_step(handle, flat)
        if handle.sampling is not None:
            self._sample_step(handle, logits)

    def _forward_step(self, handle: StepHandle, flat: torch.Tensor) -> torch.Tensor:
        self._computed += 1
        if self._fault is not None:
            self._fault.check(self._computed)
        return self._run_forward(handle.host, flat, self._prev_tokens(handle))

    def _run_forward(self, host: HostBatch, flat: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            prepared = device_step(host, flat, self.kv, prev, self.fused_decode, self.paged_kernel)
            if self.graphs is not None and self.graphs.fits(host):
                logits = self.graphs.run(prepared)  # no SDPA inside: no backend switch
            else:
                with attention_backends(self.device):
                    logits = self.forward(prepared, prepared.sample_rows)
            if prepared.copy_src.numel():  # samples forking off a prompt this step wrote
                self.kv.copy_slots(prepared.copy_src, prepared.copy_dst)
            return logits

    def follow_step(self, host: HostBatch, prev: torch.Tensor | None) -> None:
        """A tensor-parallel follower's step: rank 0's host batch through this rank's shard
        (the logits are rank 0's to sample)."""
        self._run_forward(host, torch.from_numpy(host.flat).to(self.device), prev)

    def _sample_step(self, handle: StepHandle, logits: torch.Tensor) -> None:
        """Sample `handle`'s rows. With grammar masks, waits until the host has filled them."""
        assert handle.sampling is not None
        with torch.inference_mode():
            if handle.sampling.has_placeholders:
                prev_tokens = self._prev_tokens(handle)
                assert prev_tokens is not None, "penalty histories hold placeholders but no step preceded"
                handle.sampling.resolve(prev_tokens)
            handle.output = sample(logits, handle.sampling)
        if self.tp is not None:  # in step order with the forwards' collectives: this thread runs both
            self.tp.send_tokens(handle.output.tokens)

    @staticmethod
    def _prev_tokens(handle: StepHandle) -> torch.Tensor | None:
        return handle.prev.output.tokens if handle.prev is not None and handle.prev.output else None

    def masks_filled(self, handle: StepHandle) -> None:
        """The host filled `handle`'s grammar masks after its launch (overlap). Executors that
        run sampling in the background have been waiting on them; the CUDA one enqueues it now."""

    def _execute(self, handle: StepHandle) -> None:
        if self.device.type == "cuda":
            self._execute_timed_on_device(handle)
            return
        start = time.perf_counter()
        self._compute(handle, torch.from_numpy(handle.host.flat))
        self._account(handle, start, time.perf_counter())

    def _execute_timed_on_device(self, handle: StepHandle) -> None:
        """On CUDA, busy and idle come from events on the device's timeline, as the overlap
        executor measures them, so that the two compare like for like."""
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        self._compute(handle, torch.from_numpy(handle.host.flat).to(self.device))
        end.record()
        end.synchronize()
        idle = self._last_end_event.elapsed_time(begin) / 1e3 if self._last_end_event is not None else None
        self.stats.record(handle.host, begin.elapsed_time(end) / 1e3, idle)
        self._last_end_event = end

    def _account(self, handle: StepHandle, start: float, end: float) -> None:
        idle = start - self._last_busy_end if self._last_busy_end is not None else None
        self.stats.record(handle.host, end - start, idle)
        self._last_busy_end = end

    @staticmethod
    def _read(out: SampleOutput | None) -> StepResult:
        if out is None:
            return StepResult([])
        tokens = out.tokens.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        choices = []
        for i, token in enumerate(tokens):
            top = list(zip(top_ids[i], top_lps[i])) if top_ids is not None and top_lps is not None else []
            choices.append(TokenChoice(token, lps[i] if lps is not None else None, top))
        return StepResult(choices)

    def forward(self, prepared: PreparedStep, logits_rows: torch.Tensor) -> torch.Tensor:
        """Run the model over the flattened step; logits of the tokens at `logits_rows`."""
        out = self.model(
            input_ids=prepared.input_ids,
            position_ids=prepared.positions,
            use_cache=False,
            logits_to_keep=logits_rows,
            **{STEP_KWARG: prepared.attention},
        )
        return out.logits[0]

    def prepare(self, batch: StepBatch) -> PreparedStep:
        """The step's device tensors (no placeholders); for tests and tools."""
        host = build_host_batch(batch, self.block_size, self.group_cost, self.paged_kernel is not None)
        flat = torch.from_numpy(host.flat).to(self.device)
        return device_step(host, flat, self.kv, None, self.fused_decode, self.paged_kernel)
