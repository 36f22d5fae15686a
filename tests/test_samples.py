"""n samples per request: one prefill, shared blocks, independent seeded samples, nothing leaked."""

from __future__ import annotations

import asyncio

import pytest

from helpers import make_engine, small_core
from tandem.engine import FinishReason, InvalidRequestError
from tandem.engine.host.kv_accounting import blocks_for
from tandem.engine.request import GenerationRequest, RequestLimits, SamplingParams, StoppingCriteria

PROMPT = list(range(5, 31))  # 26 tokens: 6 full blocks of 4 and a partial one


def _request(n: int, max_new: int = 6, seed: int | None = 3, rid: str = "r") -> GenerationRequest:
    sampling = SamplingParams(temperature=1.0, seed=seed)
    return GenerationRequest(list(PROMPT), sampling, StoppingCriteria(max_new, ignore_eos=True), request_id=rid, n=n)


def _drive(core, requests: list[GenerationRequest]) -> dict[tuple[str, int], list[int]]:
    for r in requests:
        core.add(core.make_sequence(r))
    got: dict[tuple[str, int], list[int]] = {}
    while core.has_work():
        for out in core.step():
            got.setdefault((out.request_id, out.index), []).extend(out.token_ids)
        core.check_invariants()
    return got


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_the_prompt_is_computed_once_and_its_blocks_shared(scheduler: str) -> None:
    n, max_new = 8, 6
    core = small_core(64, block_size=4, scheduler=scheduler)
    try:
        core.add(core.make_sequence(_request(n, max_new)))
        first = core.step()  # the prefill: every sample forks off it
        if core.overlap:
            first += core.step()
        full, partial = divmod(len(PROMPT), 4)
        shared = core.running[0].kv.block_table[:full]
        assert all(s.kv.block_table[:full] == shared for s in core.running) and len(core.running) == n
        assert (core.blocks.ref_counts[shared] == n).all()
        # The shared prompt plus each sample's own partial block (and a new block when decoding fills one).
        assert core.blocks.num_used == full + n * (1 if partial else 0)
        got = _drive(core, [])
        for out in first:
            got[(out.request_id, out.index)] = out.token_ids + got[(out.request_id, out.index)]
        assert core.executor.stats.tokens == len(PROMPT) + n * (max_new - 1)  # prompt tokens computed once
        assert core.blocks.num_used == 0
    finally:
        core.close()
    assert sorted(got) == [("r", i) for i in range(n)]
    assert all(len(tokens) == max_new for tokens in got.values())


def test_sample_i_is_the_request_seeded_seed_plus_i() -> None:
    core = small_core(64, block_size=4)
    try:
        together = _drive(core, [_request(4, seed=10)])
        alone = {i: _drive(core, [_request(1, seed=10 + i, rid=f"solo{i}")])[(f"solo{i}", 0)] for i in range(4)}
    finally:
        core.close()
    assert {i: together[("r", i)] for i in range(4)} == alone
    assert len({tuple(t) for t in alone.values()}) == 4  # independent, not copies


def test_without_blocks_to_fork_the_samples_go_their_own_way() -> None:
    # 26-token prompt + 6 new = 8 blocks per sample, 8 in the pool: the prompt takes 7, and the
    # two others cannot get a partial block each. They wait and hit the prefix cache instead.
    core = small_core(8, block_size=4)
    try:
        core.add(core.make_sequence(_request(3, seed=20)))
        first = core.step()
        assert len(core.waiting) == 2 and len(first) == 1
        together = _drive(core, [])
        together[("r", 0)] = first[0].token_ids + together[("r", 0)]
        alone = {i: _drive(core, [_request(1, seed=20 + i, rid=f"solo{i}")])[(f"solo{i}", 0)] for i in range(3)}
        assert core.blocks.num_used == 0
    finally:
        core.close()
    assert {i: together[("r", i)] for i in range(3)} == alone


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_aborting_frees_every_samples_blocks(scheduler: str) -> None:
    core = small_core(64, block_size=4, scheduler=scheduler)
    try:
        core.add(core.make_sequence(_request(5, max_new=50)))
        for _ in range(4):
            core.step()
        outs = core.abort("r")
        assert sorted(o.index for o in outs) == list(range(5))
        assert all(o.finished and o.finish_reason is FinishReason.ABORTED for o in outs)
        while core.has_work():
            core.step()
        assert core.blocks.num_used == 0
        core.check_invariants()
    finally:
        core.close()


def test_aborting_before_the_prefill_finishes_every_sample() -> None:
    core = small_core(64, block_size=4)
    try:
        core.add(core.make_sequence(_request(3)))
        outs = core.abort("r")
        assert sorted(o.index for o in outs) == [0, 1, 2] and not core.has_work()
    finally:
        core.close()


def test_stream_yields_every_sample_with_its_index() -> None:
    with make_engine("async-overlap", model="tiny-llama", block_size=4) as eng:

        async def run() -> dict[int, list]:
            got: dict[int, list] = {}
            async for out in eng.stream(_request(3, max_new=5)):
                got.setdefault(out.index, []).append(out)
            return got

        got = asyncio.run(run())
        assert sorted(got) == [0, 1, 2]
        for outs in got.values():
            assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finished
            assert outs[0].num_prompt_tokens == len(PROMPT)
        assert eng.core.blocks.num_used == 0


def test_n_is_validated(engine) -> None:
    for n, field in [(0, "n"), (17, "n")]:
        with pytest.raises(InvalidRequestError) as info:
            engine.core.make_sequence(_request(n))
        assert info.value.field == field
    with pytest.raises(InvalidRequestError) as info:
        engine.core.make_sequence(_request(4, seed=2**64 - 2))
    assert info.value.field == "sampling.seed"
    assert RequestLimits().max_n == 16 and blocks_for(26, 4) == 7
