"""A fused paged decode-attention kernel for the CPU, compiled on first use.

Decode attention on the CPU is bound by KV memory traffic: gathering each row's blocks into a
contiguous copy and then running SDPA over it moves the K/V three times. This kernel walks
each row's slots in place (OpenMP over rows, longest first; online softmax over chunks of 16
keys) and reads every byte once, prefetching a few slots ahead because the slots' order is
data-dependent and the hardware prefetcher cannot follow it (2x on its own, measured). Built
for this machine's CPU (-march=native; the build's name carries a hash of the CPU's flags)
with torch's C++ extension loader (g++ and ninja), cached under tandem's cache (`build_dir`);
where it cannot be built, or TANDEM_CPU_KERNEL=0, the gather + SDPA path is used instead.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from tandem.engine.config import cache_root

log = structlog.get_logger("tandem.engine")

_SOURCE = Path(__file__).with_name("paged_cpu.cpp")


MAX_GROUP_DIMS = 4096  # MAX_GD in paged_cpu.cpp: query heads per KV head x head dim


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return num_heads % num_kv_heads == 0 and num_heads // num_kv_heads * head_dim <= MAX_GROUP_DIMS


@functools.cache
def decode_kernel() -> Callable | None:
    """The compiled kernel, or None (disabled, or it cannot be built here)."""
    if os.environ.get("TANDEM_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        build = build_dir()
        build.mkdir(parents=True, exist_ok=True)
        # NOTE: torch's loader guards a build with a lock file it waits on without a timeout, so a
        # build killed midway (Ctrl-C, SIGKILL) would hang every later start. Builders here first
        # take an flock, which the OS drops when its holder dies: whoever holds it and still
        # finds torch's lock file knows that file's owner is gone.
        with open(build / ".tandem-build.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            stale = build / TORCH_LOCK
            if stale.exists():
                log.warning("cpu_kernel_stale_lock_removed", path=str(stale))
                stale.unlink()
            # -ffast-math lets g++ vectorize exp (libmvec); the kernel never forms an inf or a NaN
            module = load(
                build.name,
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffast-math"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
            )
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja...: the portable path serves
        log.warning("cpu_kernel_unavailable", error=repr(exc)[:300])
        return None
    return _float_queries(module.paged_decode)


def _float_queries(kernel: Callable) -> Callable:
    """The kernel reads float32 or bfloat16 pools but takes and returns float32 queries: a bf16
    model's rows are widened on the way in and narrowed on the way out (a few KB per row)."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots, lens, scale: float) -> torch.Tensor:
        if q.dtype == torch.float32:
            return kernel(q, k, v, slots, lens, scale)
        return kernel(q.float(), k, v, slots, lens, scale).to(q.dtype)

    return run


TORCH_LOCK = "lock"  # the file torch.utils.cpp_extension's FileBaton creates in the build directory


def build_dir() -> Path:
    """This CPU's build of this copy of the kernel's source, under tandem's cache. (Its path is
    in the build's commands: two checkouts sharing one build would rebuild it in turn.)"""
    where = hashlib.sha256(str(_SOURCE.resolve()).encode()).hexdigest()[:6]
    return cache_root() / "kernels" / f"tandem_paged_cpu_v7_{_cpu_tag()}_{where}"


def _cpu_tag() -> str:
    """A short hash of the CPU's model and flags: a cached -march=native build never runs on another CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    lines = sorted({ln for ln in info.splitlines() if ln.startswith(("flags", "model name", "Features"))})
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]
