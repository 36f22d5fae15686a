"""Paged attention in Triton: queries attend over K/V read in place through block tables.

The gather path copies each row's context out of the pool before SDPA (a full copy of the
context per layer per step); this kernel reads the pool where it lies. One program per
(query token, KV head): it holds that head's group of query heads (GQA) and walks the token's
context in tiles of keys, block table entry by entry, with an online softmax in float32. One
kernel serves decode rows (one query, the whole context) and prefill chunks over a cached
prefix (each query attends causally: `lens` says how many keys). Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported) runs it on the CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tile_for(head_dim: int) -> int:
    """Keys per loop iteration: K and V tiles are widened to float32 in shared memory, so wide
    heads take shorter tiles (parts with ~100 KB of shared memory per block)."""
    return 64 if head_dim <= 128 else 32


# NOTE: the table stride (blocks per row) changes from step to step; specialized on its value
# (1, a multiple of 16, other) it would compile a variant for each class mid-serving.
@triton.jit(do_not_specialize=["stride_table"])
def _paged_attention_kernel(
    q_ptr,  # [N, H, D]
    k_ptr,  # [slots, KVH, D]
    v_ptr,
    out_ptr,  # [N, H, D]
    tables_ptr,  # [R, max_blocks]
    table_of_ptr,  # [N]: which table row each query reads
    lens_ptr,  # [N]: keys each query attends (its causal limit)
    scale,
    stride_qn,
    stride_qh,
    stride_kslot,
    stride_kh,
    stride_table,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # the KV pool's block size
    HEAD_DIM_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    TILE: tl.constexpr,  # keys per iteration
    # NOTE: products in float32. "tf32" for bf16/fp16 pools is exact on their values (tf32 keeps
    # 10 mantissa bits, they have 7 and 10) and runs on tensor cores; fp32 pools take "ieee".
    PRECISION: tl.constexpr,
):
    n = tl.program_id(0)
    kvh = tl.program_id(1)
    heads = kvh * GROUP + tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + n * stride_qn + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    length = tl.load(lens_ptr + n)
    table = tables_ptr + tl.load(table_of_ptr + n) * stride_table

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for start in range(0, length, TILE):
        pos = start + tl.arange(0, TILE)
        key_ok = pos < length
        block = tl.load(table + pos // BLOCK_SIZE, mask=key_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_kslot + kvh * stride_kh + dims[None, :]
        kv_ok = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, TILE], float32
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        correction = tl.exp(m - m_new)
        total = total * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    acc = acc / tl.where(total > 0, total, 1.0)[:, None]  # no keys (lens 0): zeros, not NaN
    tl.store(
        out_ptr + n * stride_qn + heads[:, None] * stride_qh + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & dim_ok[None, :],
    )


def compiled_variants() -> int | None:
    """How many variants of the kernel Triton has compiled in this process, on every device
    (None where this Triton keeps its cache elsewhere: `device_caches` is not public API)."""
    caches = getattr(_paged_attention_kernel, "device_caches", None)
    if caches is None:
        return None
    return sum(len(entry[0]) for entry in caches.values())


def paged_attention(
    q: torch.Tensor,  # [N, H, D]
    k_cache: torch.Tensor,  # [slots, KVH, D]
    v_cache: torch.Tensor,
    tables: torch.Tensor,  # [R, max_blocks] block ids
    table_of: torch.Tensor,  # [N] row of `tables` each query reads
    lens: torch.Tensor,  # [N] keys each query attends, >= 1
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of each query over the first `lens[i]` positions of its table's sequence."""
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if k_cache.stride(2) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("the K and V pools must share one layout, head dim contiguous")
    q = q.contiguous()
    out = torch.empty_like(q)
    if n == 0:
        return out
    group = heads // kv_heads
    _paged_attention_kernel[(n, kv_heads)](
        q, k_cache, v_cache, out, tables, table_of, lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0),
        HEAD_DIM=dim, GROUP=group, BLOCK_SIZE=block_size,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(dim)), GROUP_PAD=max(16, triton.next_power_of_2(group)),
        TILE=tile_for(dim), PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out
