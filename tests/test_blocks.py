"""Block accounting: every block free, cached or owned; none leaked or freed twice."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import small_core
from tandem.engine.host.block_manager import BlockManager, OutOfBlocksError, chain_hash
from tandem.engine.request import FinishReason, GenerationRequest, SamplingParams, StoppingCriteria


def test_allocate_release_and_lru_eviction() -> None:
    bm = BlockManager(4, block_size=2)
    a = bm.allocate(2)
    tokens = np.array([1, 2, 3, 4])
    bm.register(a[0], 11, tokens[:2])
    bm.register(a[1], 12, tokens[2:])
    bm.release(a)
    assert bm.num_free == 4 and bm.num_cached == 2 and bm.num_evictable == 2
    b = bm.allocate(3)  # two plain free blocks, then the LRU cached one (a's tail first)
    assert a[1] in b and a[0] not in b and bm.num_cached == 1
    with pytest.raises(OutOfBlocksError):
        bm.allocate(2)
    bm.check_invariants([b])
    bm.release(b)
    with pytest.raises(AssertionError):
        bm.release([b[0]])


def _chain(tokens: np.ndarray, bs: int) -> list[int]:
    hashes, parent = [], None
    for i in range(len(tokens) // bs):
        parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
        hashes.append(parent)
    return hashes


def test_prefix_match_checks_content_and_chain() -> None:
    bm = BlockManager(8, block_size=2)
    seq = np.array([5, 6, 7, 8, 9, 10])
    blocks = bm.allocate(3)
    for block, h, i in zip(blocks, _chain(seq, 2), range(3)):
        bm.register(block, h, seq[2 * i : 2 * i + 2])
    other = np.array([5, 6, 7, 8, 1, 1])
    assert bm.match_prefix(_chain(other, 2), other) == blocks[:2]
    swapped = np.array([7, 8, 5, 6])  # the same blocks in another order: no hit
    assert bm.match_prefix(_chain(swapped, 2), swapped) == []
    forged = np.array([9, 9, 9, 9])  # a colliding hash must not hand out another's K/V
    assert bm.match_prefix(_chain(seq, 2)[:1], forged) == []
    bm.release(blocks)
    assert bm.num_unreferenced(blocks) == 3
    bm.acquire(blocks[:1])
    assert bm.num_unreferenced(blocks) == 2
    bm.check_invariants([blocks[:1]])
    bm.clear_cache()
    assert bm.num_cached == 1 and bm.num_free == 7  # only the owned block stays findable
    bm.check_invariants([blocks[:1]])


@pytest.fixture(scope="module")
def tight_core():
    return small_core(num_blocks=12, block_size=4, max_batch_tokens=24, max_num_seqs=6)


_request = st.tuples(
    st.integers(1, 30),  # prompt length
    st.integers(1, 16),  # max_new_tokens
    st.integers(0, 2),  # shared-prefix group (0: none)
    st.one_of(st.none(), st.integers(0, 12)),  # abort after this many steps
    st.integers(0, 6),  # arrives at this step
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_request, min_size=1, max_size=10), st.integers(0, 2**16))
def test_random_workloads_with_aborts_leak_nothing(tight_core, workload, seed) -> None:
    core = tight_core
    rng = np.random.default_rng(seed)
    prefixes = {g: rng.integers(3, 500, 12).tolist() for g in (1, 2)}
    pending: list[tuple[int, GenerationRequest]] = []
    aborts: dict[str, int] = {}
    wanted: dict[str, int] = {}
    finished: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for i, (plen, new, group, abort_at, arrive) in enumerate(workload):
        prompt = (prefixes[group] if group else [])[:plen] + rng.integers(3, 500, plen).tolist()
        prompt = prompt[: max(plen, 1)]
        temp = float(rng.choice([0.0, 1.0]))
        req = GenerationRequest(
            prompt, SamplingParams(temperature=temp, seed=i), StoppingCriteria(new, ignore_eos=True), request_id=f"r{i}"
        )
        pending.append((arrive, req))
        wanted[f"r{i}"] = new
        if abort_at is not None:
            aborts[f"r{i}"] = arrive + abort_at
    step = 0
    while pending or core.has_work():
        for arrive, req in [p for p in pending if p[0] <= step]:
            core.add(core.make_sequence(req))
            pending.remove((arrive, req))
        for rid, at in list(aborts.items()):
            if at <= step:
                for out in core.abort(rid):
                    finished[rid] = out
                del aborts[rid]
        for out in core.step():
            counts[out.request_id] = counts.get(out.request_id, 0) + len(out.token_ids)
            if out.finished:
                finished[out.request_id] = out
        core.check_invariants()
        step += 1
        assert step < 2000, "workload did not finish"
    assert core.blocks.num_used == 0
    core.check_invariants()
    for rid, new in wanted.items():
        if finished[rid].finish_reason is FinishReason.ABORTED:
            assert counts.get(rid, 0) < new
        else:
            assert finished[rid].finish_reason is FinishReason.LENGTH and counts[rid] == new


def test_random_workloads_did_preempt_and_hit_the_prefix_cache(tight_core) -> None:
    assert tight_core.num_preemptions > 0
    assert tight_core.blocks.stats.hit_tokens > 0


def test_preemption_keeps_greedy_outputs() -> None:
    """A pool too small for all requests at once forces preemption; outputs don't change."""
    prompts = [list(range(3 + i, 33 + i)) for i in range(6)]
    params, stop = SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=12)
    roomy = small_core(num_blocks=128, block_size=4)
    tight = small_core(num_blocks=16, block_size=4)
    results = {}
    for name, core in (("roomy", roomy), ("tight", tight)):
        seqs = [
            core.make_sequence(GenerationRequest(p, params, stop, request_id=str(i))) for i, p in enumerate(prompts)
        ]
        for s in seqs:
            core.add(s)
        while core.has_work():
            core.step()
            core.check_invariants()
        results[name] = [s.output_ids.tolist() for s in seqs]
        assert core.blocks.num_used == 0
    assert sum(s.queue.num_preemptions for s in seqs) > 0
    assert results["tight"] == results["roomy"]


def test_decode_groups_minimize_padding_plus_per_group_cost() -> None:
    import numpy as np

    from tandem.engine.device.batch import decode_group_sizes

    lengths = np.array([768, 760, 700, 300, 290, 40, 30, 20], dtype=np.int64)
    assert decode_group_sizes(lengths, cost=0) == [1] * 8  # free calls: no padding at all
    assert decode_group_sizes(lengths, cost=10**9) == [8]  # costly calls: one padded batch
    assert decode_group_sizes(lengths, cost=1024) == [3, 5]  # 820 padded slots < one more call
    assert decode_group_sizes(lengths, cost=200) == [3, 2, 3]
    assert sum(decode_group_sizes(np.sort(np.random.default_rng(0).integers(1, 900, 64))[::-1])) == 64
