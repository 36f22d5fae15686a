"""A sequence's KV blocks: prefix-cache hashes and hits, blocks a step needs, reserving,
releasing, and publishing full blocks to the prefix cache. The block manager below it knows
blocks only; this knows which sequence holds which."""

from __future__ import annotations

from tandem.engine.host.block_manager import BlockManager, chain_hash
from tandem.engine.host.sequence import SeqStatus, Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVAccounting:
    def __init__(self, blocks: BlockManager) -> None:
        self.blocks = blocks
        self.block_size = blocks.block_size

    # -- prefix cache ------------------------------------------------------------------------
    def chain_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The first `num_blocks` prefix-cache hashes of `seq` (tokens only ever grow)."""
        bs, hashes, tokens = self.block_size, seq.kv.chain_hashes, seq.tokens
        for i in range(len(hashes), num_blocks):
            hashes.append(chain_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks a waiting `seq` would reuse. At least one token is always left to
        compute, so the step yields logits."""
        if not self.blocks.enable_prefix_caching:
            return []
        hashes = self.chain_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        return self.blocks.match_prefix(hashes, seq.tokens)

    def prefix_hit_blocks(self, seq: Sequence) -> tuple[int, int]:
        """(cached blocks a waiting `seq` would reuse, how many of them have no owner now)."""
        hits = self.prefix_hits(seq)
        return len(hits), self.blocks.num_unreferenced(hits)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Make newly completed blocks findable by later requests with the same prefix."""
        if not self.blocks.enable_prefix_caching:
            return
        kv = seq.kv
        bs, full = self.block_size, kv.num_computed // self.block_size
        if full <= kv.num_registered:
            return
        hashes, tokens = self.chain_hashes(seq, full), seq.tokens
        for i in range(kv.num_registered, full):
            parent = hashes[i - 1] if i else None
            self.blocks.register(kv.block_table[i], hashes[i], tokens[i * bs : (i + 1) * bs], parent)
        kv.num_registered = full

    # -- reserving and releasing -------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks that computing `num_tokens` more of `seq` would consume (for a waiting
        one: after taking its prefix-cache hits)."""
        bs = self.block_size
        if seq.status is SeqStatus.RUNNING:
            return max(0, blocks_for(seq.kv.num_computed + num_tokens, bs) - len(seq.kv.block_table))
        hits, unowned = self.prefix_hit_blocks(seq)
        computed = hits * bs
        num_tokens = min(num_tokens, seq.num_tokens - computed)
        return blocks_for(computed + num_tokens, bs) - hits + unowned

    def take_prefix_hits(self, seq: Sequence) -> None:
        """A waiting `seq` takes its prefix-cache hits as computed blocks. The first time,
        the hit is what the request reports as cached and what the hit rate counts."""
        hits = self.prefix_hits(seq)
        self.blocks.acquire(hits)
        kv = seq.kv
        kv.block_table = list(hits)
        kv.num_registered = len(hits)
        kv.num_computed = len(hits) * self.block_size
        if kv.num_cached_tokens is None:
            kv.num_cached_tokens = kv.num_computed
            self.blocks.record_lookup(seq.num_tokens, kv.num_computed)

    def reserve(self, seq: Sequence, num_tokens: int) -> int:
        """Allocate the blocks for `seq`'s next `num_tokens` (the caller checked they fit).
        Returns the token count, clamped to what is left to compute."""
        num_tokens = min(num_tokens, seq.num_uncomputed)
        kv = seq.kv
        needed = blocks_for(kv.num_computed + num_tokens, self.block_size) - len(kv.block_table)
        if needed > 0:
            kv.block_table.extend(self.blocks.allocate(needed))
        return num_tokens

    def release(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks; its K/V must be recomputed if it runs again."""
        kv = seq.kv
        self.blocks.release(kv.block_table)
        kv.block_table = []
        kv.num_registered = 0
        kv.num_computed = 0

    def check(self, holders: list[Sequence], waiting: list[Sequence] | None = None) -> None:
        """Block accounting holds: refcounts match the holders' tables, waiting ones hold none."""
        self.blocks.check_invariants([s.kv.block_table for s in holders])
        for seq in waiting or []:
            assert not seq.kv.block_table, f"waiting {seq.request_id} holds blocks"
