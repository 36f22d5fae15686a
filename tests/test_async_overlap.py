"""async-overlap: same tokens as the synchronous policy, safe finishing, the carry-over."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_engine
from tandem.engine import EngineConfig
from tandem.engine.build import build_core
from tandem.engine.device.batch import StepBatch, StepRow
from tandem.engine.device.executor import Executor
from tandem.engine.device.executor_worker import WorkerExecutor
from tandem.engine.device.kv_cache import KVCache, KVLayout
from tandem.engine.device.placeholders import placeholder
from tandem.engine.device.sampling import SampleSpec
from tandem.engine.model.loader import load_model
from tandem.engine.request import FinishReason, GenerationRequest, SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler
from tandem.schedulers.testing import Arrival, check_scheduler, run_workload


def test_carry_over_feeds_the_previous_steps_tokens() -> None:
    """Step 2 is launched before step 1 is collected; its inputs are step 1's samples."""
    loaded = load_model("tiny-llama")
    layout = KVLayout(2, 2, 16, 4, torch.float32)
    greedy = SampleSpec(SamplingParams(temperature=0), 0, logprobs=True)
    a, b = np.arange(4, 14), np.arange(20, 27)

    def first():
        return StepBatch([StepRow(a, 0, [0, 1, 2], greedy), StepRow(b, 0, [3, 4], greedy)])

    def second(ta, tb):
        return StepBatch([StepRow(np.array([tb]), 7, [3, 4], greedy), StepRow(np.array([ta]), 10, [0, 1, 2], greedy)])

    sync = Executor(loaded.model, KVCache(layout, 8, loaded.device), loaded.device)
    t1 = sync.step(first()).choices
    t2 = sync.step(second(t1[0].token_id, t1[1].token_id)).choices

    overlapped = WorkerExecutor(loaded.model, KVCache(layout, 8, loaded.device), loaded.device)
    try:
        h1 = overlapped.launch(first())
        h2 = overlapped.launch(second(placeholder(0), placeholder(1)), prev=h1)
        assert [c.token_id for c in overlapped.collect(h1).choices] == [c.token_id for c in t1]
        got = overlapped.collect(h2).choices
    finally:
        overlapped.close()
    assert [c.token_id for c in got] == [c.token_id for c in t2]
    assert [c.logprob for c in got] == pytest.approx([c.logprob for c in t2], abs=1e-5)


def _workload(seed: int, sampled: bool) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    arrivals = []
    for i in range(10):
        stop = StoppingCriteria(
            max_new_tokens=int(rng.integers(4, 20)),
            stop_strings=["e"] if i % 3 == 0 else [],
            stop_token_ids=[int(rng.integers(4, 500))] if i % 4 == 1 else [],
            ignore_eos=i % 2 == 0,
        )
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i) if sampled else SamplingParams(temperature=0)
        prompt = rng.integers(4, 500, int(rng.integers(2, 28))).tolist()
        abort_after = 3 if i in (2, 7) else None
        arrivals.append(
            Arrival(int(rng.integers(0, 12)), GenerationRequest(prompt, params, stop, request_id=f"r{i}"), abort_after)
        )
    return arrivals


def _core(policy: str, overlap: bool):
    name, opts = ("async-overlap", {"policy": policy}) if overlap else (policy, {})
    cfg = EngineConfig(model="tiny-llama", block_size=4, kv_blocks=14, max_batch_tokens=24, max_num_seqs=5)
    return build_core(cfg, load_scheduler(name, opts))


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("policy", ["fcfs", "prefill-priority"])
def test_async_overlap_gives_the_policys_tokens(policy: str, sampled: bool) -> None:
    for seed in range(3):
        (sync_core, sync_info), (async_core, async_info) = _core(policy, False), _core(policy, True)
        sync = run_workload(sync_core, sync_info, _workload(seed, sampled), policy)
        overlapped = run_workload(async_core, async_info, _workload(seed, sampled), "async-overlap")
        assert sync_core.num_preemptions > 0 and async_core.num_preemptions > 0
        reasons = set()
        for rid, (tokens, reason) in sync.items():
            got, got_reason = overlapped[rid]
            if FinishReason.ABORTED in (reason, got_reason):
                shorter, longer = sorted([tokens, got], key=len)
                assert longer[: len(shorter)] == shorter, rid
            else:
                assert (got, got_reason) == (tokens, reason), rid
            reasons.add(reason)
        async_core.executor.close()
    assert {FinishReason.LENGTH, FinishReason.ABORTED} <= reasons


@pytest.mark.parametrize("policy", ["fcfs", "prefill-priority"])
def test_async_overlap_passes_the_conformance_kit(policy: str) -> None:
    report = check_scheduler(lambda: load_scheduler("async-overlap", {"policy": policy}), max_examples=40)
    assert report.preemptions > 0 and report.aborted > 0


def test_engine_streams_and_aborts_under_overlap() -> None:
    prompts = [list(range(4 + i, 30 + i)) for i in range(6)]
    stop = StoppingCriteria(max_new_tokens=12, stop_strings=["a"])
    with make_engine(model="tiny-llama", block_size=4) as sync_eng:
        want = sync_eng.generate(prompts, SamplingParams(temperature=0), stop)
    with make_engine("async-overlap", model="tiny-llama", block_size=4) as eng:
        got = eng.generate(prompts, SamplingParams(temperature=0), stop)
        assert [(c.token_ids, c.text, c.finish_reason) for c in got] == [
            (c.token_ids, c.text, c.finish_reason) for c in want
        ]
        import asyncio

        async def abort_mid_stream():
            request = GenerationRequest([5] * 20, stopping=StoppingCriteria(300, ignore_eos=True), request_id="x")
            n = 0
            async for out in eng.stream(request):  # noqa: B007 - the last one is returned
                n += 1
                if n == 2:
                    eng.abort("x")
            return out

        last = asyncio.run(abort_mid_stream())
        assert last.finish_reason is FinishReason.ABORTED
        eng.generate([[4, 5]], stopping=StoppingCriteria(max_new_tokens=2))
        assert eng.core.blocks.num_used == 0 and eng.core.executor.stats.steps > 0


def test_async_overlap_option_errors_name_the_wrapped_policy() -> None:
    from tandem.schedulers import SchedulerLoadError

    with pytest.raises(SchedulerLoadError, match="'prefill-priority' has no option 'bogus'"):
        load_scheduler("async-overlap", {"policy": "prefill-priority", "bogus": "1"})
    with pytest.raises(SchedulerLoadError, match="unknown scheduler 'nope'"):
        load_scheduler("async-overlap", {"policy": "nope"})
    inner = load_scheduler("async-overlap", {"policy": "prefill-priority", "max_decode_stall": "3"}).inner  # type: ignore[attr-defined]
    assert inner.max_decode_stall == 3


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_length_finished_requests_still_fill_the_prefix_cache(scheduler: str) -> None:
    with make_engine(scheduler, model="tiny-llama", block_size=4) as eng:
        prompt = list(range(4, 13))  # two full blocks, then one token
        eng.generate([prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=1))
        again = eng.generate([prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=1))[0]
        assert again.num_cached_tokens == 8
        assert eng.core.blocks.num_used == 0
