"""The KV pools: one preallocated key and one value tensor holding every layer's blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def num_blocks_for(layout: KVLayout, budget_bytes: float, max_tokens: int | None = None) -> int:
    """Blocks that fit `budget_bytes`, capped at what `max_tokens` tokens could ever use."""
    blocks = int(budget_bytes // layout.bytes_per_block)
    if max_tokens is not None:
        blocks = min(blocks, -(-max_tokens // layout.block_size))
    return blocks


def cuda_budget_bytes(device: torch.device, fraction: float) -> float:
    """A fraction of the memory still free on the device after the model is loaded."""
    free, _total = torch.cuda.mem_get_info(device)
    return free * fraction


class KVCache:
    """Slots are addressed flat: slot = block * block_size + offset, the same in every layer.

    Zero-initialised on purpose: masked-out padding slots are still read by batched attention,
    and an uninitialised NaN there would turn 0-weight products into NaN.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError("KV cache budget is too small for a single block")
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (layout.num_layers, num_blocks * layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.k = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.v = torch.zeros(shape, dtype=layout.dtype, device=device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.layout.block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
