"""Conformance kit: the checks every scheduler plugin must pass, usable from pytest.

    from tandem.schedulers.testing import check_scheduler

    def test_conformance():
        report = check_scheduler(lambda: MyScheduler(), max_examples=25)

It drives a real engine core (the `tiny-llama` preset, built locally) with property-based
workloads (hypothesis): random arrivals, prompt and output lengths, shared prefixes, aborts,
and a KV pool small enough to force preemption. After every step it checks the token budget,
the sequence limit and the block accounting; at the end, that every request finished with
the right number of tokens, no block leaked, no request starved, and every completed greedy
request produced exactly the tokens it produces when run alone. (Seeded sampled requests run
too, but are not compared: when a policy chunks a prompt differently, or a preempted request
recomputes its K/V, logits move by float rounding, about 1e-5, which can move a sampled token
across a CDF boundary. Greedy choices have no such knife edge at the presets' logit scale.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tandem.engine.build import EngineInfo, build_core
from tandem.engine.config import EngineConfig
from tandem.engine.host.core import EngineCore
from tandem.engine.request import FinishReason, GenerationRequest, RequestOutput, SamplingParams, StoppingCriteria
from tandem.schedulers.api import Scheduler

TIGHT = dict(block_size=4, kv_blocks=12, max_batch_tokens=24, max_num_seqs=6)
ROOMY = dict(block_size=4, kv_blocks=64, max_batch_tokens=64, max_num_seqs=8)
MAX_IDLE_STEPS = 3  # steps in a row with work waiting but nothing scheduled


class ConformanceError(AssertionError):
    pass


@dataclass
class ConformanceReport:
    scheduler: str
    workloads: int = 0
    requests: int = 0
    steps: int = 0
    aborted: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0


@dataclass
class Arrival:
    step: int
    request: GenerationRequest
    abort_after: int | None = None  # steps after arrival


def _core(factory: Callable[[], Scheduler], model: str, limits: dict) -> tuple[EngineCore, EngineInfo]:
    scheduler = factory()
    if not isinstance(scheduler, Scheduler):
        raise ConformanceError(f"factory returned {scheduler!r}, not a Scheduler")
    return build_core(EngineConfig(model=model, **limits), scheduler)


class HookLedger:
    """Records the lifecycle callbacks (API version 2) the core makes on a scheduler instance,
    so a workload can check them: each request added once and finished once, every completed
    step reported with what ran."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.added: list[str] = []
        self.finished: list[tuple[str, str]] = []
        self.steps: list[list[tuple[str, int]]] = []
        added, finished, step_done = scheduler.on_request_added, scheduler.on_request_finished, scheduler.on_step_done

        def on_added(request) -> None:
            self.added.append(request.request_id)
            added(request)

        def on_finished(request, reason: str) -> None:
            self.finished.append((request.request_id, reason))
            finished(request, reason)

        def on_step(report) -> None:
            self.steps.append([(r.request_id, n) for r, n in report.rows])
            step_done(report)

        # Instance attributes shadow the class's methods: the core calls these.
        scheduler.on_request_added = on_added  # type: ignore[method-assign]
        scheduler.on_request_finished = on_finished  # type: ignore[method-assign]
        scheduler.on_step_done = on_step  # type: ignore[method-assign]

    @staticmethod
    def of(core: EngineCore) -> HookLedger:
        ledger = getattr(core, "_hook_ledger", None)
        if ledger is None:
            assert isinstance(core.scheduler, Scheduler), "the kit builds its cores with a Scheduler"
            ledger = HookLedger(core.scheduler)
            core._hook_ledger = ledger  # type: ignore[attr-defined]
        return ledger

    def check(self, name: str, done: dict) -> None:
        added, finished = sorted(self.added), sorted(rid for rid, _ in self.finished)
        if added != finished or len(set(added)) != len(added):
            raise ConformanceError(f"{name}: lifecycle callbacks: added {added}, finished {finished}")
        reasons = dict(self.finished)
        for key, (_, reason) in done.items():
            rid = key.replace("#", "\x1f")
            # A sample aborted before it forked off its request's prompt was never added.
            if reason is not None and rid in reasons and reasons[rid] != reason.value:
                raise ConformanceError(
                    f"{name}: {rid} finished {reason.value}, on_request_finished said {reasons.get(rid)}"
                )


def run_workload(
    core: EngineCore, info: EngineInfo, arrivals: list[Arrival], name: str
) -> dict[str, tuple[list[int], FinishReason | None]]:
    """Drive `core` step by step, checking limits and accounting after each step, and the
    lifecycle callbacks at the end."""
    ledger = HookLedger.of(core)
    ledger.added, ledger.finished, ledger.steps = [], [], []
    pending = sorted(arrivals, key=lambda a: a.step)
    aborts: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    done: dict[str, tuple[list[int], FinishReason | None]] = {}
    steps_at_start = core.num_steps
    total = sum(len(a.request.prompt) + a.request.stopping.max_new_tokens for a in arrivals)
    bound = 4 * total + max((a.step for a in arrivals), default=0) + 50
    step = idle = 0
    while pending or core.has_work():
        while pending and pending[0].step <= step:
            a = pending.pop(0)
            core.add(core.make_sequence(a.request))
            if a.abort_after is not None and a.request.request_id is not None:
                aborts[a.request.request_id] = step + a.abort_after
        for rid in [r for r, at in aborts.items() if at <= step]:
            del aborts[rid]
            for out in core.abort(rid):
                done[_key(out)] = (tokens.get(_key(out), []), out.finish_reason)
        had_work = core.has_work()
        for out in core.step():
            tokens.setdefault(_key(out), []).extend(out.token_ids)
            if out.finished:
                done[_key(out)] = (tokens[_key(out)], out.finish_reason)
        scheduled = core.last_step
        if sum(n for _, n in scheduled) > info.max_batch_tokens:
            raise ConformanceError(f"{name}: step {step} exceeded the token budget: {scheduled}")
        if len(scheduled) > info.max_num_seqs:
            raise ConformanceError(f"{name}: step {step} exceeded the sequence limit: {scheduled}")
        try:
            core.check_invariants()
        except AssertionError as exc:
            raise ConformanceError(f"{name}: block accounting broken after step {step}: {exc}") from exc
        idle = idle + 1 if had_work and not scheduled else 0
        if idle > MAX_IDLE_STEPS:
            raise ConformanceError(f"{name}: scheduled nothing for {idle} steps with requests waiting")
        step += 1
        if step > bound:
            raise ConformanceError(f"{name}: workload of {len(arrivals)} requests did not finish in {bound} steps")
    if core.num_blocks_used:
        raise ConformanceError(f"{name}: {core.num_blocks_used} KV blocks still owned after every request ended")
    ledger.check(name, done)
    if len(ledger.steps) != core.num_steps - steps_at_start:
        raise ConformanceError(
            f"{name}: {len(ledger.steps)} on_step_done calls for {core.num_steps - steps_at_start} steps"
        )
    return done


def _key(out: RequestOutput) -> str:
    """A sample's name in a workload's results: the request id, then `#i` for samples i > 0."""
    return out.request_id if out.index == 0 else f"{out.request_id}#{out.index}"


def _reset(core: EngineCore) -> None:
    """End whatever a failed workload left behind and empty the prefix cache, so every
    example starts from the same state (hypothesis replays failures to shrink them)."""
    for seq in list(core.waiting) + list(core.running):
        core.abort(seq.family.parent_id)
    core.clear_prefix_cache()


class _Alone:
    """Each request's output when it runs by itself (cached per request content)."""

    def __init__(self, factory: Callable[[], Scheduler], model: str) -> None:
        self.core, self.info = _core(factory, model, ROOMY)
        self.cache: dict[tuple, list[int]] = {}

    def __call__(self, request: GenerationRequest, name: str) -> list[int]:
        s = request.sampling
        key = (tuple(request.prompt), s.temperature, s.seed, request.stopping.max_new_tokens)
        if key not in self.cache:
            solo = GenerationRequest(request.prompt, request.sampling, request.stopping, request_id="alone")
            self.cache[key] = run_workload(self.core, self.info, [Arrival(0, solo)], name)["alone"][0]
        return self.cache[key]


def _arrivals(spec: list[tuple], seed: int) -> list[Arrival]:
    rng = np.random.default_rng(seed)
    prefixes = {g: rng.integers(4, 500, 16).tolist() for g in (1, 2)}
    out = []
    for i, (plen, new, group, abort_after, step, sampled, priority) in enumerate(spec):
        prompt = ((prefixes[group] if group else []) + rng.integers(4, 500, plen).tolist())[:plen]
        sampling = SamplingParams(temperature=0.8, seed=i) if sampled else SamplingParams(temperature=0)
        stopping = StoppingCriteria(max_new_tokens=new, ignore_eos=True)
        tenant = "heavy" if i % 3 else "light"  # for policies that share between tenants
        request = GenerationRequest(prompt, sampling, stopping, request_id=f"r{i}", priority=priority, tenant=tenant)
        out.append(Arrival(step, request, abort_after))
    return out


def check_random_workloads(
    factory: Callable[[], Scheduler], max_examples: int = 25, model: str = "tiny-llama"
) -> ConformanceReport:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    core, info = _core(factory, model, TIGHT)
    name = info.scheduler
    alone = _Alone(factory, model)
    report = ConformanceReport(name)
    request = st.tuples(
        st.integers(1, 30),  # prompt length (prompt + output fit the 48-token pool)
        st.integers(1, 16),  # max_new_tokens
        st.integers(0, 2),  # shared-prefix group (0: none)
        st.one_of(st.none(), st.none(), st.integers(0, 10)),  # abort this many steps after arrival
        st.integers(0, 8),  # arrival step
        st.booleans(),  # seeded sampling instead of greedy
        st.integers(-2, 2),  # priority
    )

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(request, min_size=1, max_size=10), st.integers(0, 2**16))
    def workload(spec, seed):
        arrivals = _arrivals(spec, seed)
        steps_before = core.num_steps
        try:
            done = run_workload(core, info, arrivals, name)
        finally:
            _reset(core)
        report.workloads += 1
        report.requests += len(arrivals)
        report.steps += core.num_steps - steps_before
        for a in arrivals:
            rid, want = a.request.request_id, a.request.stopping.max_new_tokens
            if rid not in done:
                raise ConformanceError(f"{name}: request {rid} never finished")
            tokens, reason = done[rid]
            if reason is FinishReason.ABORTED:
                report.aborted += 1
                continue
            if reason is not FinishReason.LENGTH or len(tokens) != want:
                raise ConformanceError(f"{name}: {rid} ended {reason} after {len(tokens)} tokens, wanted {want}")
            if a.request.sampling.temperature > 0:
                continue
            solo = alone(a.request, name)
            if tokens != solo:
                raise ConformanceError(f"{name}: {rid} produced {tokens} in the workload but {solo} alone")

    workload()
    report.preemptions = core.num_preemptions
    report.prefix_hit_tokens = core.prefix_hit_tokens
    return report


def check_scheduler(
    factory: Callable[[], Scheduler], max_examples: int = 25, model: str = "tiny-llama"
) -> ConformanceReport:
    """Run the whole kit; raises ConformanceError (an AssertionError) on the first failure."""
    return check_random_workloads(factory, max_examples, model)
