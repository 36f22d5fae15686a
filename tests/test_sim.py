"""tandem sim: the real core in virtual time over a cost model fitted on the real executor."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.bench.serve import Mix
from tandem.bench.sim import BUSY_GAP_S, calibrate, calibrate_serving, calibration_path, simulate
from tandem.bench.sim_cli import tenants_for
from tandem.bench.workloads import make
from tandem.engine.device.simulated import FEATURES, CostModel, Overheads


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return CostModel.load(calibration_path("tiny-llama"))


def test_calibration_fits_and_reports_its_error(tmp_path: Path) -> None:
    fitted = calibrate("tiny-llama", "cpu", requests=16)
    assert len(fitted.coefficients) == len(FEATURES) and fitted.kv_blocks > 0
    assert fitted.fit["steps"] > 20 and 0 <= fitted.fit["mean_abs_error"] < 10
    fitted.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json") == fitted


def test_the_same_seed_gives_the_same_report(cost: CostModel) -> None:
    work = make("chat", 512, 0, 24)
    runs = [simulate("tiny-llama", "fcfs", work, 40.0, None, cost, seed=3) for _ in range(2)]
    for r in runs:
        r.pop("wall_seconds")
        r.pop("records")
    assert runs[0] == runs[1] and runs[0]["completed"] == 24
    other = simulate("tiny-llama", "fcfs", work, 40.0, None, cost, seed=4)
    assert other["ttft_ms"] != runs[0]["ttft_ms"]  # another arrival draw


@pytest.mark.parametrize(
    ("scheduler", "options"), [("priority", {}), ("fair-share", {}), ("deadline", {"ttft_s": "0.5"})]
)
def test_every_policy_runs_in_the_simulator(cost: CostModel, scheduler: str, options: dict) -> None:
    work = make("chat", 512, 1, 32)
    tenants = tenants_for("heavy:5,light:1", 32, 1)
    report = simulate("tiny-llama", scheduler, work, float("inf"), None, cost, options=options, mix=Mix(tenants))
    assert report["completed"] == 32 and not report["errors"]
    assert set(report["tenants"]) == {"heavy", "light"}
    assert report["simulated_seconds"] > 0


def test_cli(tmp_path: Path) -> None:
    tandem = Path(sys.executable).parent / "tandem"
    out = tmp_path / "sim.json"
    run = subprocess.run(
        [str(tandem), "sim", "--model", "tiny-llama", "--requests", "16", "--rate", "20", "inf", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert [r["rate"] for r in report["runs"]] == [20.0, float("inf")]
    assert "TTFT p50/p99" in run.stdout


def test_the_engine_writes_a_step_trace(tmp_path: Path) -> None:
    from tandem.engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
    from tandem.schedulers import load_scheduler

    path = tmp_path / "steps.jsonl"
    with Engine(EngineConfig(model="tiny-llama", step_trace=str(path)), load_scheduler("fcfs")) as eng:
        eng.generate([[5, 6, 7, 8]] * 3, SamplingParams(temperature=0), StoppingCriteria(4, ignore_eos=True))
        steps = eng.core.executor.stats.steps
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == steps == 4
    assert lines[0]["tokens"] == 12 and lines[1]["decode_rows"] == 3 and all(s["wall_seconds"] > 0 for s in lines)


def test_time_outside_the_steps_is_added_where_it_falls(cost: CostModel) -> None:
    """Admission delays every request alike, delivery every token alike: with all requests at
    once, TTFT grows by exactly their sum and ITL not at all; a gap between steps lengthens ITL."""
    work = make("chat", 512, 2, 12)
    runs = {
        o: simulate("tiny-llama", "fcfs", work, float("inf"), None, replace(cost, overheads=o))
        for o in (Overheads(), Overheads(admit_s=0.01, deliver_s=0.02), Overheads(step_gap_s=0.005))
    }
    base, path, gap = runs.values()
    assert path["ttft_ms"]["p50"] == pytest.approx(base["ttft_ms"]["p50"] + 30)
    assert path["itl_ms"] == pytest.approx(base["itl_ms"])
    assert gap["itl_ms"]["p50"] == pytest.approx(base["itl_ms"]["p50"] + 5)


def test_a_concurrency_cap_holds_requests_back(cost: CostModel) -> None:
    work = make("chat", 512, 1, 16)
    report = simulate("tiny-llama", "fcfs", work, float("inf"), 3, cost)
    spans = [(r.sent_at, r.sent_at + r.e2e) for r in report["records"]]
    assert report["completed"] == 16
    for t, _ in spans:  # at each send, at most the cap in flight (the one sent included)
        assert sum(a <= t < b for a, b in spans) <= 3
    assert max(a for a, _ in spans) > 0  # some waited for a slot


def test_serving_calibration_measures_the_path_outside_the_steps() -> None:
    served = calibrate_serving("tiny-llama", requests=12, rates=(20.0,))
    o = served.overheads
    assert served.fit["steps"] > 10
    assert 0 < o.deliver_s < 0.1 and 0 <= o.admit_s < 0.1 and 0 < o.step_gap_s < BUSY_GAP_S
