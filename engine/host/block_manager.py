"""Block allocator for the paged KV cache: reference counts, prefix hashing, LRU eviction.

Every block is in exactly one state:
- free: refcount 0, no hash, in `_free`;
- cached: refcount 0, hashed, in `_evictable` (least recently released first), reusable by a
  request with the same prefix until evicted to satisfy an allocation;
- owned: refcount > 0 (shared by every sequence whose block table lists it).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from tandem.engine.host.kv_events import KvEventLog


class OutOfBlocksError(RuntimeError):
    pass


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def chain_hash(parent: int | None, tokens: np.ndarray) -> int:
    """Hash of a full block, chained to its parent so equal blocks at different prefixes differ."""
    return hash((parent, tokens.tobytes()))


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, events: KvEventLog | None = None
    ) -> None:
        self.num_blocks = num_blocks
        self.events = events  # what routers see of the prefix cache
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, int] = {}
        self._tokens_of: dict[int, bytes] = {}  # guards against hash collisions
        self._block_of: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    # -- counts a scheduler looks at -------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # -- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, hashes: list[int], tokens: np.ndarray) -> list[int]:
        """Cached blocks for the leading chain `hashes` of `tokens`, up to the first miss.

        Does not take references. The stored tokens are compared too, so a hash collision
        can never hand a sequence someone else's K/V.
        """
        blocks: list[int] = []
        if not self.enable_prefix_caching:
            return blocks
        bs = self.block_size
        for i, h in enumerate(hashes):
            block = self._block_of.get(h)
            if block is None or self._tokens_of[block] != tokens[i * bs : (i + 1) * bs].tobytes():
                break
            blocks.append(block)
        return blocks

    def num_unreferenced(self, blocks: list[int]) -> int:
        """How many of `blocks` are cached with no owner (acquiring them costs free blocks)."""
        return int(np.count_nonzero(self.ref_counts[blocks] == 0)) if blocks else 0

    def record_lookup(self, queried: int, hit: int) -> None:
        self.stats.queried_tokens += queried
        self.stats.hit_tokens += hit

    def register(self, block: int, block_hash: int, tokens: np.ndarray, parent_hash: int | None = None) -> None:
        """Make a full, computed block findable by its hash (first writer wins)."""
        if not self.enable_prefix_caching or block_hash in self._block_of or block in self._hash_of:
            return
        self._block_of[block_hash] = block
        self._hash_of[block] = block_hash
        self._tokens_of[block] = tokens.tobytes()
        if self.events is not None:
            self.events.stored(block_hash, parent_hash, tokens.tolist())

    def clear_cache(self) -> None:
        """Forget every cached block that nobody owns (owned ones stay findable)."""
        for block in self._evictable:
            self._forget(block)
            self._free.append(block)
        self._evictable.clear()

    # -- ownership -------------------------------------------------------------------------
    def acquire(self, blocks: list[int]) -> None:
        """Take a reference on already-computed blocks (prefix-cache hits)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        # Reversed, so a sequence's tail blocks are evicted before its (more shareable) head.
        for block in reversed(blocks):
            count = self.ref_counts[block]
            if count <= 0:
                raise AssertionError(f"block {block} released more often than referenced")
            self.ref_counts[block] = count - 1
            if count == 1:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def _forget(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._block_of[h]
            del self._tokens_of[block]
            if self.events is not None:
                self.events.removed(h)

    # -- checking --------------------------------------------------------------------------
    def check_invariants(self, owned: list[list[int]] | None = None) -> None:
        """Every block is free, cached or owned, exactly once; with `owned` (all live block
        tables), reference counts equal the number of tables listing each block."""
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & evictable, "a block is both free and cached"
        for block in range(self.num_blocks):
            ref = int(self.ref_counts[block])
            assert ref >= 0, f"block {block} has negative refcount"
            in_lists = (block in free) + (block in evictable)
            assert (ref > 0) + in_lists == 1, f"block {block}: ref {ref}, free/cached {in_lists}"
            if block in free:
                assert block not in self._hash_of, f"free block {block} still hashed"
            if block in evictable:
                assert block in self._hash_of, f"cached block {block} has no hash"
        assert len(self._block_of) == len(self._hash_of) == len(self._tokens_of)
        if owned is not None:
            expected = np.zeros(self.num_blocks, dtype=np.int64)
            for table in owned:
                np.add.at(expected, np.asarray(table, dtype=np.int64), 1)
            bad = np.nonzero(expected != self.ref_counts)[0]
            assert bad.size == 0, f"refcounts disagree with block tables at blocks {bad[:10].tolist()}"
