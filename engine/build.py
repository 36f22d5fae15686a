"""Assembling an engine core: load the model, size and allocate the KV pools, wire tensor
parallelism, and describe the result in one immutable `EngineInfo`.

`build_core` is the front door for everything that drives a core itself (the conformance kit,
scripts); `Engine` calls it on its own thread. `build_simulated_core` assembles the same core
over the simulated executor (`tandem sim`). Nothing is patched after construction: each object
gets what it needs in its constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from tandem.engine.config import CPU_DEFAULT_KV_GB, EngineConfig
from tandem.engine.device.executor import Executor
from tandem.engine.device.executor_worker import WorkerExecutor
from tandem.engine.device.kv_cache import KVCache, KVLayout, cuda_budget_bytes, num_blocks_for
from tandem.engine.device.simulated import CostModel, SimulatedExecutor
from tandem.engine.device.tensor_parallel import TensorParallel, check_devices, gather, rank_device
from tandem.engine.device.warmup import step_peak_bytes
from tandem.engine.host.block_manager import BlockManager
from tandem.engine.host.core import EngineCore
from tandem.engine.host.heap import freeze_startup_heap
from tandem.engine.host.kv_events import KvEventLog
from tandem.engine.host.scheduling import SchedulerPort
from tandem.engine.model.loader import LoadedModel, check_tensor_parallel, load_model
from tandem.engine.model.support import context_length
from tandem.engine.request import ModelLimits

log = structlog.get_logger("tandem.engine")


@dataclass(frozen=True)
class EngineInfo:
    """What an assembled engine is, fixed at build time: what callers outside the engine read
    instead of reaching into the core, executor or pools."""

    model_name: str
    model_path: str
    architecture: str  # the Hugging Face architecture (the model class when the config names none)
    architectures: tuple[str, ...]
    model_type: str
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    vocab_size: int
    limits: ModelLimits  # what request validation checks against
    device: str
    dtype: str  # without "torch."
    attention: str  # how attention reads the KV cache: triton, cpu-kernel, gather
    kv_bytes_per_rank: tuple[int, ...]  # each rank's KV pool (one entry without tensor parallelism)
    kv_blocks: int
    block_size: int
    graph_buckets: tuple[int, ...]  # decode batch sizes replayed from a captured CUDA graph
    tensor_parallel: int
    max_batch_tokens: int
    max_num_seqs: int
    prefix_caching: bool
    scheduler: str  # the policy's label: its registry name, else its class name
    scheduler_options: tuple[tuple[str, str], ...]  # as loaded, stringified

    @property
    def kv_capacity_tokens(self) -> int:
        return self.limits.kv_capacity_tokens


def make_executor(
    loaded: LoadedModel,
    kv: KVCache,
    seed: int,
    overlap: bool,
    attention: str = "auto",
    tp: TensorParallel | None = None,
) -> Executor:
    """Synchronous, or for overlap a background one: a worker thread on the CPU, streams on CUDA."""
    kind: type[Executor] = Executor
    if overlap and loaded.device.type == "cuda":
        from tandem.engine.device.executor_cuda import CudaExecutor

        kind = CudaExecutor
    elif overlap:
        kind = WorkerExecutor
    return kind(loaded.model, kv, loaded.device, seed, attention, tp)


def build_core(config: EngineConfig, scheduler: SchedulerPort) -> tuple[EngineCore, EngineInfo]:
    """Load the model, size and allocate the KV pools, and wire the core together."""
    core, info, _ = assemble(config, scheduler)
    return core, info


def assemble(config: EngineConfig, scheduler: SchedulerPort) -> tuple[EngineCore, EngineInfo, LoadedModel]:
    """`build_core`, also returning the loaded model (its tokenizer and weights, for `Engine`)."""
    try:
        return _build_core(config, scheduler)
    except torch.OutOfMemoryError as exc:
        reason = str(exc).splitlines()[0]
        raise ValueError(
            f"out of device memory starting {config.model!r}: {reason} Give it a device with more free memory, "
            "a smaller dtype, or smaller --max-batch-tokens / --max-num-seqs / --kv-cache-fraction"
        ) from None


def _build_core(config: EngineConfig, scheduler: SchedulerPort) -> tuple[EngineCore, EngineInfo, LoadedModel]:
    config.validate()
    tp = None
    if config.tensor_parallel > 1:
        check_tensor_parallel(config.model, config.tensor_parallel)
        check_devices(config)
        tp = TensorParallel(config, scheduler.overlap, build_follower)  # the followers load alongside
    try:
        return _build_leader(config, scheduler, tp)
    except BaseException:
        if tp is not None:
            tp.close()
        raise


def kv_layout(loaded: LoadedModel, config: EngineConfig) -> KVLayout:
    """This rank's KV pool layout: under tensor parallelism its share of the KV heads."""
    text = loaded.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return KVLayout(
        text.num_hidden_layers, kv_heads // config.tensor_parallel, head_dim, config.block_size, loaded.dtype
    )


def kv_blocks(config: EngineConfig, loaded: LoadedModel, layout: KVLayout) -> int:
    """How many KV blocks this rank's budget holds (every rank runs this: on CUDA it measures a forward)."""
    if config.kv_cache_gb is not None:
        budget = config.kv_cache_gb * 2**30
    elif loaded.device.type == "cuda":
        tokens = min(config.max_batch_tokens, loaded.max_model_len)
        peak = step_peak_bytes(loaded.model, layout, loaded.device, tokens, config.max_num_seqs, config.attention)
        budget = cuda_budget_bytes(loaded.device, config.kv_cache_fraction, reserve=peak)
    else:
        budget = CPU_DEFAULT_KV_GB * 2**30
    # More than every slot filled to the context length can never be used.
    num_blocks = config.kv_blocks or num_blocks_for(layout, budget, config.max_num_seqs * loaded.max_model_len)
    if not config.kv_blocks and num_blocks * config.block_size < min(loaded.max_model_len, config.max_batch_tokens):
        raise ValueError(
            f"the KV cache would hold {num_blocks * config.block_size} tokens ({budget / 2**30:.2f} GiB on "
            f"{loaded.device} after the model and one step's activations): too few for one full step; give "
            "more memory (--kv-cache-gb, --kv-cache-fraction), a smaller --max-batch-tokens or dtype"
        )
    return num_blocks


def build_follower(config: EngineConfig, control: Any) -> Executor:
    """A tensor-parallel follower's executor: its shard, and a KV pool of as many blocks as every rank holds."""
    loaded = load_model(config.model, config.dtype, config.device, config.tensor_parallel)
    layout = kv_layout(loaded, config)
    kv = KVCache(layout, min(gather(kv_blocks(config, loaded, layout), control)), loaded.device)
    gather(kv.nbytes, control)  # in step with rank 0, which reports every rank's pool
    executor = Executor(loaded.model, kv, loaded.device, config.seed, config.attention)
    freeze_startup_heap()
    return executor


def _build_leader(
    config: EngineConfig, scheduler: SchedulerPort, tp: TensorParallel | None
) -> tuple[EngineCore, EngineInfo, LoadedModel]:
    device = str(rank_device(config, 0)) if tp is not None else config.device
    loaded = load_model(config.model, config.dtype, device, config.tensor_parallel)
    layout = kv_layout(loaded, config)
    num_blocks = kv_blocks(config, loaded, layout)
    if tp is not None:  # every rank holds as many blocks as the smallest budget allows
        num_blocks = min(gather(num_blocks, tp.control))
    kv = KVCache(layout, num_blocks, loaded.device)
    kv_bytes = tuple(gather(kv.nbytes, tp.control)) if tp is not None else (kv.nbytes,)
    if tp is not None:
        tp.started()
    executor = make_executor(loaded, kv, config.seed, scheduler.overlap, config.attention, tp)
    # NOTE: no graphs under TP: capturing the forward's NCCL collectives is not done (nor tested) yet.
    if config.cuda_graphs and loaded.device.type == "cuda" and executor.paged_kernel is not None and tp is None:
        executor.use_graphs(min(config.max_num_seqs, config.max_batch_tokens), loaded.max_model_len)
    blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, events=KvEventLog())
    limits = ModelLimits(loaded.vocab_size, loaded.max_model_len, kv.capacity_tokens, requests=config.limits)
    core = EngineCore(executor, blocks, loaded.tokenizer, limits, loaded.eos_token_ids, scheduler, config)
    info = _describe(config, scheduler, loaded, limits, executor, kv_bytes, num_blocks)
    log.info(
        "engine_ready",
        model=config.model,
        scheduler=scheduler.engine_label,
        device=info.device,
        dtype=info.dtype,
        kv_blocks=num_blocks,
        kv_tokens=kv.capacity_tokens,
        kv_mib=round(kv.nbytes / 2**20, 1),
        tensor_parallel=config.tensor_parallel,
    )
    return core, info, loaded


def _describe(
    config: EngineConfig,
    scheduler: SchedulerPort,
    loaded: LoadedModel,
    limits: ModelLimits,
    executor: Executor,
    kv_bytes: tuple[int, ...],
    num_blocks: int,
) -> EngineInfo:
    graphs = executor.graphs
    architectures = tuple(loaded.config.architectures or [])
    return EngineInfo(
        model_name=loaded.name,
        model_path=str(loaded.path),
        architecture=(architectures or (type(loaded.model).__name__,))[0],
        architectures=architectures,
        model_type=getattr(loaded.config, "model_type", "") or "",
        eos_token_ids=tuple(loaded.eos_token_ids),
        max_model_len=loaded.max_model_len,
        vocab_size=loaded.vocab_size,
        limits=limits,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        attention=executor.attention_kind,
        kv_bytes_per_rank=kv_bytes,
        kv_blocks=num_blocks,
        graph_buckets=tuple(graphs.buckets) if graphs is not None and graphs.capture else (),
        **_settings(config, scheduler),
    )


def _settings(config: EngineConfig, scheduler: SchedulerPort) -> dict[str, Any]:
    """The EngineInfo fields that come from the configuration and the policy."""
    return dict(
        block_size=config.block_size,
        tensor_parallel=config.tensor_parallel,
        max_batch_tokens=config.max_batch_tokens,
        max_num_seqs=config.max_num_seqs,
        prefix_caching=config.enable_prefix_caching,
        scheduler=scheduler.engine_label,
        scheduler_options=tuple((k, str(v)) for k, v in scheduler.loaded_with.items()),
    )


def build_simulated_core(
    config: EngineConfig, scheduler: SchedulerPort, cost: CostModel, advance: Callable[[float], None], seed: int = 0
) -> tuple[EngineCore, EngineInfo]:
    """The real core over the simulated executor (no weights: the model's config and tokenizer
    only); each step advances the caller's clock by `advance(seconds)`. The pool is the one the
    cost model was fitted with."""
    from transformers import AutoConfig, AutoTokenizer

    from tandem.engine.model.loader import resolve_path

    path = resolve_path(config.model)
    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)  # as LoadedModel holds it
    vocab = int(hf.get_text_config().vocab_size)
    executor = SimulatedExecutor(cost, vocab, advance, seed)
    blocks = BlockManager(cost.kv_blocks, cost.block_size, config.enable_prefix_caching)
    limits = ModelLimits(vocab, context_length(hf), blocks.num_blocks * cost.block_size, requests=config.limits)
    eos = tuple(i for i in {hf.eos_token_id, tokenizer.eos_token_id} if isinstance(i, int))
    core = EngineCore(executor, blocks, tokenizer, limits, eos, scheduler, config)
    architectures = tuple(getattr(hf, "architectures", None) or [])
    info = EngineInfo(
        model_name=config.model,
        model_path=str(path),
        architecture=(architectures or ("",))[0],
        architectures=architectures,
        model_type=getattr(hf, "model_type", "") or "",
        eos_token_ids=eos,
        max_model_len=limits.max_model_len,
        vocab_size=vocab,
        limits=limits,
        device="simulated",
        dtype="",
        attention="simulated",
        kv_bytes_per_rank=(),
        kv_blocks=cost.kv_blocks,
        graph_buckets=(),
        **_settings(config, scheduler),
    )
    return core, info
