"""The scheduler plugin API: registry, checked decisions, built-in policies, the example plugin."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from helpers import make_engine, small_core
from tandem.engine import Engine, EngineConfig, EngineDeadError, GenerationRequest, StoppingCriteria
from tandem.schedulers import (
    ENTRY_POINT_GROUP,
    Scheduler,
    SchedulerError,
    SchedulerLoadError,
    StepContext,
    admit_waiting,
    available_schedulers,
    continue_running,
    load_scheduler,
    parse_options,
    registry,
)
from tandem.schedulers.testing import check_scheduler

ROOT = Path(__file__).resolve().parents[1]


# -- the conformance kit over every built-in policy --------------------------------------
@pytest.mark.parametrize("name", ["fcfs", "prefill-priority"])
def test_builtin_policies_pass_the_conformance_kit(name: str) -> None:
    report = check_scheduler(lambda: load_scheduler(name), max_examples=60)
    assert report.preemptions > 0 and report.aborted > 0 and report.prefix_hit_tokens > 0


class Hoarder(Scheduler):
    """Admits everything at once, ignoring KV: the kit must catch it."""

    name = "hoarder"

    def schedule(self, ctx: StepContext) -> None:
        for req in ctx.running + ctx.waiting:
            ctx.schedule(req, min(req.remaining, 4))


def test_the_kit_rejects_a_policy_that_breaks_limits() -> None:
    with pytest.raises(SchedulerError, match="scheduler 'hoarder'"):
        check_scheduler(Hoarder, max_examples=20)


class Idle(Scheduler):
    name = "idle"

    def schedule(self, ctx: StepContext) -> None:
        pass


def test_the_kit_catches_starvation() -> None:
    with pytest.raises(AssertionError, match="scheduled nothing"):
        check_scheduler(Idle, max_examples=5)


# -- decisions the core refuses -----------------------------------------------------------
class Scripted(Scheduler):
    name = "scripted"

    def __init__(self, script) -> None:
        self.script = script

    def schedule(self, ctx: StepContext) -> None:
        self.script(ctx)


def _core_with(script, **kw):
    core = small_core(num_blocks=8, block_size=4, max_batch_tokens=16, max_num_seqs=2, **kw)
    core.scheduler = Scripted(script)
    return core


def _add(core, rid: str, n: int = 8) -> None:
    core.add(
        core.make_sequence(
            GenerationRequest(list(range(4, 4 + n)), request_id=rid, stopping=StoppingCriteria(4, ignore_eos=True))
        )
    )


@pytest.mark.parametrize(
    "script,message",
    [
        (lambda ctx: ctx.schedule(ctx.waiting[0], 0), "positive integer"),
        (lambda ctx: [ctx.schedule(r, 8) for r in ctx.waiting], "remaining budget of 0"),
        (lambda ctx: [ctx.schedule(r, 1) for r in ctx.waiting], "limit of 2 sequences"),
        (lambda ctx: [ctx.schedule(ctx.waiting[0], 1), ctx.schedule(ctx.running[0], 1)], "already scheduled"),
        (lambda ctx: ctx.preempt(ctx.waiting[0]), "not running"),
        (lambda ctx: ctx.schedule("r0", 1), "not a request of this engine"),
    ],
)
def test_refused_decisions_name_the_plugin(script, message) -> None:
    core = _core_with(script)
    for i in range(3):
        _add(core, f"r{i}")
    with pytest.raises(SchedulerError, match=f"scheduler 'scripted': .*{message}"):
        core.step()
    core.check_invariants()


def test_kv_overcommit_and_finished_requests_are_refused() -> None:
    kept = []

    def greedy_hoard(ctx):
        kept.extend(ctx.waiting)
        for r in ctx.waiting:
            ctx.schedule(r, r.remaining)

    core = _core_with(
        greedy_hoard,
    )
    core.config.max_num_seqs = 8
    core.config.max_batch_tokens = 64
    for i in range(3):
        _add(core, f"r{i}", 12)  # 3 blocks each: the third does not fit in 8
    with pytest.raises(SchedulerError, match="needs 3 KV blocks, only 2 are free"):
        core.step()
    core.check_invariants()
    core.abort("r0")
    core.scheduler = Scripted(lambda ctx: ctx.schedule(kept[0], 1))
    with pytest.raises(SchedulerError, match="'r0' is finished, aborted or unknown"):
        core.step()


def test_a_refused_decision_fails_the_engine_with_the_plugin_named() -> None:
    with Engine(EngineConfig(model="tiny-llama"), Scripted(lambda ctx: ctx.schedule(ctx.waiting[0], -1))) as eng:
        with pytest.raises(EngineDeadError, match="scheduler 'scripted'"):
            eng.generate([[5, 6, 7]])


# -- registry -----------------------------------------------------------------------------
def test_unknown_scheduler_and_options_list_the_valid_ones() -> None:
    with pytest.raises(SchedulerLoadError, match="unknown scheduler 'nope'; installed: .*fcfs.*prefill-priority"):
        load_scheduler("nope")
    with pytest.raises(SchedulerLoadError, match="has no option 'x'; its options: max_decode_stall"):
        load_scheduler("prefill-priority", {"x": "1"})
    with pytest.raises(SchedulerLoadError, match="takes a int"):
        load_scheduler("prefill-priority", {"max_decode_stall": "many"})
    with pytest.raises(SchedulerLoadError, match="max_decode_stall must be >= 1"):
        load_scheduler("prefill-priority", {"max_decode_stall": "0"})
    with pytest.raises(SchedulerLoadError, match="key=value"):
        parse_options(["oops"])
    assert load_scheduler("prefill-priority", parse_options(["max_decode_stall=7"])).max_decode_stall == 7  # type: ignore[attr-defined]


class FutureApi(Scheduler):
    name = "future"
    api_version = 99

    def schedule(self, ctx: StepContext) -> None:
        pass


def test_api_version_mismatch_is_refused_at_load(monkeypatch) -> None:
    ep = EntryPoint(name="future", value="test_schedulers:FutureApi", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "available_schedulers", lambda: {"future": ep})
    with pytest.raises(SchedulerLoadError, match="API version 99; this tandem provides 2 and loads 1, 2"):
        load_scheduler("future")


# -- the example plugin, installed as a user would ----------------------------------------
@pytest.fixture(scope="module")
def sjf_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The plugin built as a user's pip builds it (isolated, so it needs no setuptools in the
    venv) into a throwaway directory put on the path: nothing is left in the user's venv.
    Yields the environment that lets a `tandem` subprocess see it too."""
    target = tmp_path_factory.mktemp("sjf-site")
    plugin = ROOT / "examples" / "scheduler-plugin"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(plugin)]
    subprocess.run(pip, check=True, capture_output=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    sys.path.remove(str(target))
    sys.modules.pop("tandem_sjf", None)
    importlib.invalidate_caches()


def test_example_plugin_runs_by_its_entry_point_name(sjf_installed: dict[str, str]) -> None:
    assert "sjf" in available_schedulers()
    report = check_scheduler(lambda: load_scheduler("sjf", {"aging": "4"}), max_examples=60)
    assert report.preemptions > 0
    tandem = Path(sys.executable).parent / "tandem"
    listing = subprocess.run(
        [str(tandem), "schedulers"], capture_output=True, text=True, check=True, env=sjf_installed
    ).stdout
    names = [line.split()[0] for line in listing.splitlines()]
    assert names == ["async-overlap", "deadline", "fair-share", "fcfs", "prefill-priority", "priority", "sjf"]
    gen = subprocess.run(
        [
            str(tandem),
            "generate",
            "Hello",
            "--scheduler",
            "sjf",
            "--scheduler-opt",
            "aging=2",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--stats",
        ],
        capture_output=True,
        text=True,
        env=sjf_installed,
    )
    assert gen.returncode == 0 and "8 tokens" in gen.stderr, gen.stderr


def test_sjf_runs_short_jobs_first(sjf_installed: dict[str, str]) -> None:
    core = small_core(num_blocks=64, block_size=4, max_batch_tokens=16, max_num_seqs=1, scheduler="sjf")
    for rid, n in (("long", 40), ("short", 6), ("mid", 12)):
        core.add(
            core.make_sequence(
                GenerationRequest(list(range(4, 4 + n)), request_id=rid, stopping=StoppingCriteria(2, ignore_eos=True))
            )
        )
    order = []
    while core.has_work():
        order += [o.request_id for o in core.step() if o.finished]
    assert order == ["short", "mid", "long"]


def test_the_engine_reports_the_options_its_scheduler_was_loaded_with() -> None:
    scheduler = load_scheduler("prefill-priority", parse_options(["max_decode_stall=3"]))
    assert scheduler.max_decode_stall == 3  # type: ignore[attr-defined]
    with make_engine("prefill-priority", model="tiny-llama") as engine:
        assert engine.scheduler_name == "prefill-priority"
    engine = Engine(EngineConfig(model="tiny-llama"), scheduler)
    try:
        assert engine.scheduler_options == {"max_decode_stall": "3"}
    finally:
        engine.shutdown()


# -- one view per request ------------------------------------------------------------------
class IdentityWatch(Scheduler):
    """fcfs that records every view it meets under the request's id, and any second object."""

    name = "identity-watch"
    api_version = 2

    def __init__(self) -> None:  # NOTE: no super().__init__(), as plugins written today do
        self.views: dict[str, object] = {}
        self.strangers: list[tuple[str, str]] = []

    def _meet(self, where: str, request) -> None:
        if self.views.setdefault(request.request_id, request) is not request:
            self.strangers.append((where, request.request_id))

    def schedule(self, ctx: StepContext) -> None:
        for req in ctx.running + ctx.waiting:
            self._meet("schedule", req)
        continue_running(ctx)
        admit_waiting(ctx)

    def on_request_added(self, request) -> None:
        self._meet("added", request)

    def on_request_finished(self, request, reason: str) -> None:
        self._meet("finished", request)

    def on_step_done(self, report) -> None:
        for req, _ in report.rows:
            self._meet("step_done", req)


class IdentityWatchOverlap(IdentityWatch):
    name = "identity-watch-overlap"
    overlap = True


@pytest.mark.parametrize("cls", [IdentityWatch, IdentityWatchOverlap])
def test_a_request_keeps_one_view_from_arrival_to_its_last_report(cls) -> None:
    from tandem.engine.build import build_core

    scheduler = cls()
    config = EngineConfig(model="tiny-llama", block_size=4, kv_blocks=12, max_batch_tokens=24, max_num_seqs=6)
    core = build_core(config, scheduler)[0]
    try:
        for i in range(8):  # a pool too small for all of them: preemptions; samples fork; one is aborted
            stopping = StoppingCriteria(6 + i % 3, ignore_eos=True)
            prompt = list(range(5, 11 + i))
            core.add(core.make_sequence(GenerationRequest(prompt, request_id=f"r{i}", stopping=stopping, n=1 + i % 2)))
        steps = 0
        while core.has_work():
            core.step()
            steps += 1
            if steps == 5:
                core.abort("r7")
        assert core.num_preemptions > 0
    finally:
        core.close()
    assert scheduler.strangers == []
    assert len(scheduler.views) == 11  # 8 requests, 4 with a second sample; r7's never forked (aborted)
