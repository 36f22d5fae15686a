"""The priority and fair-share policies and plugin API version 2, through a real engine core."""

from __future__ import annotations

import pytest

from helpers import small_core
from tandem.engine.request import GenerationRequest, SamplingParams, StoppingCriteria
from tandem.schedulers import SUPPORTED_API_VERSIONS, Scheduler, SchedulerLoadError, load_scheduler
from tandem.schedulers.registry import load_class
from tandem.schedulers.testing import check_scheduler


def _request(rid: str, prompt_len: int = 8, new: int = 6, priority: int = 0, tenant: str = "") -> GenerationRequest:
    seed = sum(map(ord, rid))  # not hash(): that changes per process
    prompt = [4 + (seed * 7 + i * 13) % 400 for i in range(prompt_len)]
    stop = StoppingCriteria(max_new_tokens=new, ignore_eos=True)
    return GenerationRequest(
        prompt, SamplingParams(temperature=0), stop, request_id=rid, priority=priority, tenant=tenant
    )


def _first_token_steps(core, requests: list[GenerationRequest], late: dict[str, int] | None = None) -> dict[str, int]:
    """Run to completion; the step at which each request got its first token."""
    late = late or {}
    pending = [r for r in requests if r.request_id not in late]
    for r in pending:
        core.add(core.make_sequence(r))
    first: dict[str, int] = {}
    step = 0
    while core.has_work() or any(at >= step for at in late.values()):
        for r in requests:
            if late.get(r.request_id or "") == step:
                core.add(core.make_sequence(r))
        for out in core.step():
            first.setdefault(out.request_id, step)
        core.check_invariants()
        step += 1
        assert step < 500
    return first


@pytest.mark.parametrize("name", ["priority", "fair-share", "deadline"])
def test_the_new_policies_pass_the_conformance_kit(name: str) -> None:
    report = check_scheduler(lambda: load_scheduler(name), max_examples=30)
    assert report.preemptions > 0


def test_priority_admits_higher_levels_first() -> None:
    core = small_core(64, max_num_seqs=2, scheduler="priority")
    try:
        requests = [_request(f"low{i}", priority=0) for i in range(4)] + [_request("high", priority=5)]
        first = _first_token_steps(core, requests)
    finally:
        core.close()
    assert first["high"] <= min(first[f"low{i}"] for i in range(4))


def test_a_waiting_high_priority_request_preempts_lower_ones_for_kv() -> None:
    # 12 blocks of 4: two low-priority requests of 8 + 14 tokens hold 10 blocks when the
    # high-priority one (needs 6) arrives: it must preempt, not wait for them to finish.
    core = small_core(12, max_num_seqs=4, scheduler="priority")
    try:
        low = [_request(f"low{i}", prompt_len=8, new=14, priority=0) for i in range(2)]
        high = _request("high", prompt_len=8, new=14, priority=3)
        first = _first_token_steps(core, low + [high], late={"high": 4})
        preempted = core.num_preemptions
    finally:
        core.close()
    assert preempted > 0
    assert first["high"] <= 6  # admitted on arrival (step 4), not after the low ones finish


def test_aging_lets_low_priority_through() -> None:
    policy = load_scheduler("priority", {"aging_s": "0.000001"})
    assert policy.aging_s == 1e-6  # type: ignore[attr-defined]
    with pytest.raises(SchedulerLoadError):
        load_scheduler("priority", {"aging_s": "-1"})


def test_fair_share_serves_the_light_tenant_before_the_heavy_backlog() -> None:
    core = small_core(64, max_num_seqs=2, scheduler="fair-share")
    try:
        heavy = [_request(f"h{i}", tenant="heavy") for i in range(8)]
        light = [_request(f"l{i}", tenant="light") for i in range(2)]
        first = _first_token_steps(core, heavy + light, late={"l0": 2, "l1": 2})
        counters = dict(core.scheduler.counters)  # type: ignore[attr-defined]
    finally:
        core.close()
    # Under fcfs the light tenant would wait for all eight heavy requests.
    assert max(first["l0"], first["l1"]) < max(first[f"h{i}"] for i in range(8))
    # The light tenant, idle now below the active heavy one, is forgotten (its return lifts it).
    assert set(counters) == {"heavy"} and counters["heavy"] > 0


def test_fair_share_counters_converge_when_both_tenants_are_backlogged() -> None:
    core = small_core(128, max_num_seqs=4, scheduler="fair-share")
    try:
        both = [_request(f"{t}{i}", new=8, tenant=t) for i in range(10) for t in ("a", "b")]
        _first_token_steps(core, both)
        counters = core.scheduler.counters  # type: ignore[attr-defined]
    finally:
        core.close()
    assert abs(counters["a"] - counters["b"]) <= 0.1 * max(counters.values())


def test_fair_share_weights() -> None:
    policy = load_scheduler("fair-share", {"weights": "gold:3,silver:1.5"})
    assert policy.weights == {"gold": 3.0, "silver": 1.5}  # type: ignore[attr-defined]
    with pytest.raises(SchedulerLoadError):
        load_scheduler("fair-share", {"weights": "gold"})


def test_api_version_1_plugins_still_load_and_unknown_versions_do_not() -> None:
    from tandem.schedulers.fcfs import Fcfs

    assert SUPPORTED_API_VERSIONS == (1, 2)

    class WrittenForVersion1(Fcfs):  # a version 1 plugin: schedule() only, no hooks
        name = "v1"
        api_version = 1

    from tandem.schedulers.registry import check_class as check

    assert check("v1", WrittenForVersion1) is WrittenForVersion1
    assert check_scheduler(WrittenForVersion1, max_examples=5).requests > 0

    class Future(Scheduler):
        name = "future"
        api_version = 3

        def schedule(self, ctx) -> None:
            pass

    from tandem.schedulers.registry import check_class

    with pytest.raises(SchedulerLoadError, match="API version 3"):
        check_class("future", Future)
    assert check_class("fcfs", load_class("fcfs")).name == "fcfs"


def test_a_victim_outside_the_candidates_is_refused() -> None:
    from tandem.schedulers import SchedulerError, continue_running
    from tandem.schedulers.fcfs import Fcfs

    class Rogue(Fcfs):
        name = "rogue"
        api_version = 2

        def select_victim(self, ctx, candidates):
            others = [r for r, _ in ctx.scheduled] + ctx.waiting  # real requests, none a candidate
            return others[0]

        def schedule(self, ctx) -> None:
            continue_running(ctx)
            for req in ctx.waiting:
                if ctx.fits(req, min(req.remaining, ctx.token_budget)):
                    ctx.schedule(req, min(req.remaining, ctx.token_budget))

    from tandem.engine import EngineConfig
    from tandem.engine.build import build_core

    core = build_core(EngineConfig(model="tiny-llama", block_size=4, kv_blocks=8, max_batch_tokens=64), Rogue())[0]
    try:
        for i in range(3):
            core.add(core.make_sequence(_request(f"r{i}", prompt_len=8, new=8)))
        with pytest.raises(SchedulerError, match="not one of the candidates"):
            for _ in range(40):
                core.step()
    finally:
        core.close()


def test_deadline_admits_earliest_deadline_first() -> None:
    import time

    core = small_core(64, max_num_seqs=1, scheduler="deadline")
    try:
        now = time.monotonic()
        requests = [_request(f"d{i}") for i in range(3)]
        for r, due in zip(requests, (30.0, 10.0, 20.0)):
            r.deadline = now + due
        first = _first_token_steps(core, requests)
    finally:
        core.close()
    assert first["d1"] < first["d2"] < first["d0"]


def test_deadline_refuses_what_cannot_make_it_and_serves_the_rest() -> None:
    import time

    core = small_core(256, max_num_seqs=4, max_batch_tokens=16, scheduler="deadline")
    core.scheduler.refuse_late = True  # type: ignore[attr-defined]
    try:
        backlog = [_request(f"b{i}", prompt_len=60, new=4) for i in range(6)]
        for r in backlog:
            core.add(core.make_sequence(r))
        for _ in range(3):
            core.step()  # the policy measures the prefill rate
        assert core.scheduler.tokens_per_s  # type: ignore[attr-defined]
        hopeless = _request("hopeless", prompt_len=60)
        hopeless.deadline = time.monotonic() + 1e-4  # far less than 300 queued tokens take
        easy = _request("easy", prompt_len=4)
        easy.deadline = time.monotonic() + 3600
        core.add(core.make_sequence(hopeless))
        core.add(core.make_sequence(easy))
        outs = []
        while core.has_work():
            outs += core.step()
    finally:
        core.close()
    [refused] = [o for o in outs if o.request_id == "hopeless"]
    assert refused.finished and refused.rejected and refused.rejected[1] == "deadline"
    assert "after its deadline" in refused.rejected[2]
    assert any(o.request_id == "easy" and o.finished and not o.rejected for o in outs)


def test_deadline_never_refuses_a_request_that_has_streamed_tokens() -> None:
    """A TTFT target applies before the first token: a request preempted mid-output and
    waiting again past its deadline is resumed, not ended with DEADLINE_EXCEEDED."""
    import time

    core = small_core(256, max_num_seqs=4, scheduler="deadline")
    core.scheduler.refuse_late = True  # type: ignore[attr-defined]
    try:
        core.add(core.make_sequence(_request("streaming", prompt_len=8, new=12)))
        outs = core.step() + core.step() + core.step()
        assert sum(len(o.token_ids) for o in outs) >= 2  # it has streamed tokens
        [seq] = core.running
        core.queues.requeue(seq)  # preempted, as a short KV pool would
        core.kv.release(seq)
        seq.request.deadline = time.monotonic() - 1.0  # long past
        core.scheduler.tokens_per_s = 1e-3  # type: ignore[attr-defined]  # any prefill is late
        while core.has_work():
            outs += core.step()
    finally:
        core.close()
    assert not any(o.rejected for o in outs)
    assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 12


def test_fair_share_forgets_idle_tenants() -> None:
    """Thousands of one-off tenants (junk x-tenant-id values) leave the policy's state bounded:
    an idle tenant at or below the active minimum is forgotten, since its return lifts it there."""
    from tandem.schedulers import fair_share

    core = small_core(256, max_num_seqs=8, scheduler="fair-share")
    policy = core.scheduler
    try:
        core.add(core.make_sequence(_request("steady", new=400, tenant="steady")))
        for i in range(600):
            core.add(core.make_sequence(_request(f"r{i}", prompt_len=4, new=1, tenant=f"junk-{i}")))
            if i % 8 == 7:
                core.step()
        while core.has_work():
            core.step()
    finally:
        core.close()
    assert len(policy.counters) <= fair_share.MAX_IDLE_TENANTS  # type: ignore[attr-defined]
    assert len(policy.counters) < 50  # type: ignore[attr-defined]  # all but a few lifted away
    assert not policy._active  # type: ignore[attr-defined]


def test_a_rejected_request_surfaces_as_an_error_from_the_engine() -> None:
    import asyncio

    from tandem.engine.errors import RequestRejectedError
    from tandem.schedulers.fcfs import Fcfs

    class RejectAll(Fcfs):
        name = "reject-all"
        api_version = 2

        def schedule(self, ctx) -> None:
            for req in ctx.waiting:
                ctx.reject(req, "closed for the test", kind="overload")

    from tandem.engine import Engine, EngineConfig

    with Engine(EngineConfig(model="tiny-llama"), RejectAll()) as eng:

        async def run() -> None:
            async for _ in eng.stream(_request("x")):
                pass

        with pytest.raises(RequestRejectedError) as info:
            asyncio.run(run())
        assert info.value.kind == "overload" and "closed for the test" in str(info.value)
        assert eng.core.blocks.num_used == 0 and not eng.core.has_work()


def test_the_service_refuses_with_deadline_exceeded_what_would_miss_its_deadline() -> None:
    import signal
    import threading
    import time

    import grpc

    from helpers import replica_load, start_server
    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc as pb_grpc

    proc, target = start_server(
        "--model", "tiny-llama", "--scheduler", "deadline", "--scheduler-opt", "refuse_late=true",
        "--max-batch-tokens", "32",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            backlog = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[5 + i % 400 for i in range(900)]),
                stopping=pb.StoppingCriteria(max_new_tokens=4, ignore_eos=True),
            )
            threads = [threading.Thread(target=stub.Generate, args=(backlog,), daemon=True) for _ in range(24)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while replica_load(target).running == 0 and time.monotonic() < deadline:
                time.sleep(0.02)  # steps are running: the policy has measured its prefill rate
            time.sleep(0.1)
            hurried = pb.GenerateRequest()
            hurried.CopyFrom(backlog)
            hurried.ttft_target_s = 0.005  # its own 900-token prefill alone takes longer
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(hurried, timeout=60)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "refused the request" in (err.value.details() or ""), err.value.details()
            for t in threads:
                t.join(120)
            easy = stub.Generate(pb.GenerateRequest(text="fine", stopping=pb.StoppingCriteria(max_new_tokens=2)))
            assert len(easy.token_ids) >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
