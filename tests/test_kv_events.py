"""The prefix cache as events: blocks stored with their parents and tokens, removed when
evicted, a snapshot for late subscribers, and a reader that fell behind told so."""

from __future__ import annotations

import numpy as np

from tandem.engine.host.block_manager import BlockManager, chain_hash
from tandem.engine.host.kv_events import BlockRemoved, BlockStored, KvEventLog


def fill(blocks: BlockManager, tokens: np.ndarray) -> list[int]:
    """Allocate and register a chain of full blocks for `tokens`, then release them (cached)."""
    bs = blocks.block_size
    table = blocks.allocate(len(tokens) // bs)
    parent = None
    for i, block in enumerate(table):
        h = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
        blocks.register(block, h, tokens[i * bs : (i + 1) * bs], parent)
        parent = h
    blocks.release(table)
    return table


def test_stored_blocks_chain_to_their_parents_and_eviction_removes_them() -> None:
    log = KvEventLog()
    blocks = BlockManager(num_blocks=4, block_size=2, events=log)
    tokens = np.array([5, 6, 7, 8, 9, 10], dtype=np.int64)
    fill(blocks, tokens)
    next_id, cached = log.snapshot()
    assert [b.token_ids for b in cached] == [(5, 6), (7, 8), (9, 10)]
    assert cached[0].parent_hash is None
    assert [b.parent_hash for b in cached[1:]] == [b.block_hash for b in cached[:-1]]
    # Two more blocks: one comes from the free list, one evicts the least recently released
    # cached block (release runs tail first, so the chain's tail goes first).
    blocks.allocate(2)
    got = log.since(next_id)
    assert got is not None
    assert got[1] == [BlockRemoved(cached[2].block_hash)]
    assert [b.block_hash for b in log.snapshot()[1]] == [cached[0].block_hash, cached[1].block_hash]


def test_a_reader_that_fell_behind_is_told_to_take_a_snapshot() -> None:
    log = KvEventLog(max_events=3)
    for h in range(5):
        log.stored(h, None, [h])
    assert log.since(1) is None  # events 1 and 2 were dropped
    next_id, events = log.since(3) or (0, [])
    assert next_id == 6 and [e.block_hash for e in events] == [2, 3, 4]
    assert all(isinstance(e, BlockStored) for e in events)
    assert log.since(6) == (6, [])
