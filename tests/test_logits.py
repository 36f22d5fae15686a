"""Our forward on ragged mixed batches equals transformers' own forward (teacher forcing)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import TINY_PRESETS, reference_model
from tandem.engine.device.batch import DECODE_GROUP_COST_SLOTS, StepBatch, StepRow
from tandem.engine.device.executor import Executor
from tandem.engine.device.kv_cache import KVCache, KVLayout
from tandem.engine.model.loader import load_model

BS = 4


def _logits(ex: Executor, rows: list[StepRow]) -> torch.Tensor:
    prepared = ex.prepare(StepBatch(rows))
    with torch.inference_mode():
        return ex.forward(prepared, torch.arange(prepared.input_ids.shape[1]))


# The decode paths, each against transformers' eager attention in the same dtype. The fused
# kernel serves float32 on the CPU; gather + SDPA serves GPUs, bf16/fp16 and machines without a
# compiler. Tolerance on logits, as a fraction of the largest reference logit: float32 1e-5 (a
# few ulps of accumulation order); bfloat16 and float16 round every activation (8 and 11
# mantissa bits), so ours (batched, paged) and the reference (one sequence) differ by rounding:
# 6% and 1% (measured worst over the presets: 3.0% and 0.5%; float32 1.4e-6).
PATHS = [
    ("float32", "fused", 1e-5),
    ("float32", "gather", 1e-5),
    ("bfloat16", "gather", 6e-2),
    ("float16", "gather", 1e-2),
]


@pytest.mark.parametrize("dtype,path,tolerance", PATHS)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_ragged_batches_match_transformers(preset: str, dtype: str, path: str, tolerance: float) -> None:
    loaded = load_model(preset, dtype=dtype, device="cpu")
    text = loaded.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    layout = KVLayout(text.num_hidden_layers, text.num_key_value_heads, head_dim, BS, loaded.dtype)
    ex = Executor(loaded.model, KVCache(layout, 64, loaded.device), loaded.device)
    if path == "gather":
        ex.fused_decode, ex.group_cost = None, DECODE_GROUP_COST_SLOTS["cpu"]
    elif ex.fused_decode is None:
        pytest.skip("the fused CPU kernel is not available here")
    ref = reference_model(loaded.path, loaded.dtype)

    rng = np.random.default_rng(1)
    a = rng.integers(3, 500, 26)
    b = rng.integers(3, 500, 43)
    c = np.concatenate([a[:16], rng.integers(3, 500, 16)])  # shares A's first 4 blocks
    d = rng.integers(3, 500, 1)  # one-token prompt
    with torch.inference_mode():
        want = {k: ref(torch.from_numpy(v)[None]).logits[0].float() for k, v in dict(a=a, b=b, c=c).items()}
    atol = tolerance * max(w.abs().max().item() for w in want.values())
    tables = dict(a=list(range(0, 7)), b=list(range(7, 18)), c=[0, 1, 2, 3, 18, 19, 20, 21], d=[22])

    def row(name, seq, start, end):
        return StepRow(seq[start:end], start, tables[name][: -(-end // BS)])

    def check(got, parts):
        at = 0
        for name, start, end in parts:
            n = end - start
            if name in want:
                torch.testing.assert_close(got[at : at + n].float(), want[name][start:end], atol=atol, rtol=0)
            at += n

    # Step 1: A's whole prompt, B's first chunk, a one-token prompt.
    parts = [("a", 0, 23), ("b", 0, 9), ("d", 0, 1)]
    check(_logits(ex, [row(n, dict(a=a, b=b, d=d)[n], s, e) for n, s, e in parts]), parts)
    # Step 2: A decodes, B's middle chunk, C starts after its 16 cached tokens.
    parts = [("b", 9, 30), ("a", 23, 24), ("c", 16, 29)]
    check(_logits(ex, [row(n, dict(a=a, b=b, c=c)[n], s, e) for n, s, e in parts]), parts)
    # Step 3: decodes mixed with B's last chunk.
    parts = [("c", 29, 30), ("a", 24, 25), ("b", 30, 43)]
    check(_logits(ex, [row(n, dict(a=a, b=b, c=c)[n], s, e) for n, s, e in parts]), parts)
    # Step 4: all decodes.
    parts = [("a", 25, 26), ("c", 30, 31), ("b", 42, 43)]
    got = _logits(ex, [row(n, dict(a=a, b=b, c=c)[n], s, e) for n, s, e in parts])
    check(got[:2], parts[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,heads,dim", [(2, 8, 32), (4, 8, 64), (4, 4, 128), (1, 8, 128)])
def test_fused_cpu_decode_kernel_equals_gather_and_sdpa(kv_heads: int, heads: int, dim: int, dtype) -> None:
    """(2, 8, 32) takes the kernel's generic path; the others its compiled-in shapes. A bf16 pool
    is read widened to float32: the same as SDPA in float32 over the same (bf16) values."""
    import shutil

    import torch.nn.functional as F

    from tandem.engine.device.paged_cpu import decode_kernel

    if os.environ.get("TANDEM_CPU_KERNEL") == "0":
        pytest.skip("the kernel is switched off (TANDEM_CPU_KERNEL=0)")
    kernel = decode_kernel()
    if kernel is None:
        assert not (shutil.which("g++") and shutil.which("ninja")), "a compiler is here but the kernel did not build"
        pytest.skip("no C++ toolchain: the gather + SDPA path serves")
    gen = torch.Generator().manual_seed(0)
    slots_total, rows = 4096, 7
    k = torch.randn(slots_total, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(slots_total, kv_heads, dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 5, 31, 32, 33, 100, 257])
    width = int(lens.max()) + 3  # padded past the longest, as a batch's rows are
    slots = torch.randint(0, slots_total, (rows, width), generator=gen)
    q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
    got = kernel(q, k, v, slots, lens, dim**-0.5)
    assert got.dtype == dtype
    q, k, v = q.float(), k.float(), v.float()
    mask = (torch.arange(width)[None] < lens[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k[slots].transpose(1, 2),
        v[slots].transpose(1, 2),
        attn_mask=mask,
        enable_gqa=True,
        scale=dim**-0.5,
    ).squeeze(2)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    assert torch.allclose(got.float(), want, atol=tol, rtol=tol)


def test_a_killed_kernel_build_does_not_hang_later_starts() -> None:
    """A build killed midway leaves torch's lock file behind; the next start must not wait on it
    forever (torch's own wait has no timeout)."""
    import subprocess
    import sys

    from tandem.engine.device.paged_cpu import TORCH_LOCK, build_dir

    if os.environ.get("TANDEM_CPU_KERNEL") == "0":
        pytest.skip("the CPU kernel is switched off (TANDEM_CPU_KERNEL=0)")
    import fcntl

    build_dir().mkdir(parents=True, exist_ok=True)
    with open(build_dir() / ".tandem-build.lock", "w") as guard:  # as a builder that then died
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir() / TORCH_LOCK).write_text("")  # what a SIGKILLed builder leaves
    code = "from tandem.engine.device.paged_cpu import decode_kernel; print(decode_kernel() is not None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "cpu_kernel_stale_lock_removed" in res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "True"
    assert not (build_dir() / TORCH_LOCK).exists()
