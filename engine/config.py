"""Engine configuration, one dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tandem.engine.request import RequestLimits

CPU_DEFAULT_KV_GB = 1.0
# The real instruct model packaged on PyPI (engine/model/presets.py PACKAGED), served by default.
DEFAULT_MODEL = "smollm2-135m"
ATTENTION_BACKENDS = ("auto", "gather", "triton")


def cache_root() -> Path:
    """Where built presets and kernels are kept (TANDEM_CACHE_DIR, default ~/.cache/tandem)."""
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL  # a built-in model, a GGUF file or a local Hugging Face directory
    dtype: str | None = None  # float32 / bfloat16 / float16; default: bf16 on CUDA, fp32 on CPU
    device: str | None = None  # cpu / cuda[:N]; default: cuda when available
    block_size: int = 16  # tokens per KV block
    kv_cache_gb: float | None = None  # KV budget; default: CPU_DEFAULT_KV_GB on CPU, a fraction on CUDA
    kv_cache_fraction: float = 0.85  # of the GPU memory free after loading, when kv_cache_gb is unset
    kv_blocks: int | None = None  # exact number of KV blocks, overriding the budgets (tests, tuning)
    enable_prefix_caching: bool = True
    max_batch_tokens: int = 2048  # tokens per step (chunked-prefill budget)
    max_num_seqs: int = 64  # sequences per step
    seed: int = 0  # for requests that carry no seed of their own
    limits: RequestLimits = field(default_factory=RequestLimits)  # per-request bounds (server flags)
    step_timeout_s: float | None = None  # a step running longer marks the engine hung (watchdog)
    # Append each step's shape and wall time to this file, one JSON object per line (what
    # `tandem sim calibrate --serve` fits). Synchronous schedulers: under overlap a step's
    # wall time covers another step's work.
    step_trace: str | None = None
    # auto: the Triton paged kernel on CUDA, the C++ decode kernel on the CPU; gather: copy each
    # row's context out of the pool and run SDPA; triton: the Triton kernel (tests: on the CPU
    # under TRITON_INTERPRET=1).
    attention: str = "auto"
    cuda_graphs: bool = True  # decode steps through captured CUDA graphs (CUDA with the paged kernel)
    # Ranks the model is sharded over (transformers' TP plan, torch.distributed): cuda:0..N-1,
    # or N CPU processes (gloo). Rank 0 runs the engine; the others follow its steps.
    tensor_parallel: int = 1

    def validate(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be >= 1, got {self.kv_blocks}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.step_timeout_s is not None and self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {self.step_timeout_s}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
