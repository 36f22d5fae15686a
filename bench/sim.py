"""`tandem sim`: a scheduler plugin on the real engine core, in virtual time, without the model.

The core (queues, KV accounting, prefix cache, scheduling interface, stop checks) is the real
one; the executor is simulated: each step takes what a cost model fitted on the real executor
says (engine/device/simulated.py) and samples random tokens. Requests arrive as `tandem bench
serve` sends them (the same workloads, Poisson arrivals, concurrency cap), and the report has
the same figures, computed on the virtual clock. `tandem sim calibrate` fits the cost model.
"""

from __future__ import annotations

import heapq
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.bench.serve import Mix, Record, arrival_offsets, by_group, summarize
from tandem.bench.workloads import Workload, make
from tandem.engine.build import build_core, build_simulated_core
from tandem.engine.config import EngineConfig
from tandem.engine.device.simulated import FEATURES, CostModel, Overheads
from tandem.engine.host import clock
from tandem.engine.host.core import EngineCore
from tandem.engine.model.loader import resolve_path
from tandem.engine.request import GenerationRequest, SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler

CALIBRATIONS = Path(__file__).parent / "data"  # shipped: the presets on this project's CPU machine
NOISE_QUANTILES = 101  # of real less fitted step time, kept in the calibration
BUSY_GAP_S = 0.02  # a gap between two steps longer than this: the engine had nothing to do


def calibration_path(model: str, device: str = "cpu") -> Path:
    return CALIBRATIONS / f"calibration-{Path(model).name}-{device}.json"


@dataclass
class VirtualClock:
    t: float = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def simulated_core(
    model: str, scheduler: str, options: dict[str, str], cost: CostModel, seed: int = 0, max_num_seqs: int = 64
) -> tuple[EngineCore, VirtualClock]:
    """An engine core over the simulated executor, reading time from a new virtual clock."""
    vc = VirtualClock()
    config = EngineConfig(model=model, block_size=cost.block_size, kv_blocks=cost.kv_blocks, max_num_seqs=max_num_seqs)
    core, _ = build_simulated_core(config, load_scheduler(scheduler, options), cost, vc.advance, seed)
    clock.use(vc.now)  # last: nothing above can fail and leave the process on virtual time
    return core, vc


def simulate(
    model: str,
    scheduler: str,
    work: Workload,
    rate: float,
    concurrency: int | None,
    cost: CostModel,
    seed: int = 0,
    options: dict[str, str] | None = None,
    mix: Mix | None = None,
    max_num_seqs: int = 64,
) -> dict:
    """Run the workload through the core in virtual time; `tandem bench serve`'s figures."""
    core, vc = simulated_core(model, scheduler, options or {}, cost, seed, max_num_seqs)
    o = cost.overheads
    try:
        offsets = arrival_offsets(len(work.prompts), rate, seed)
        records = [Record(len(p)) for p in work.prompts]
        if mix is not None:
            mix.apply(records)
        sent: dict[int, float] = {}  # when the client sent it
        last: dict[int, float] = {}  # when its latest tokens reached the client
        pending = list(range(len(records)))  # not sent yet
        ready: list[tuple[float, int]] = []  # sent: (when it reaches the engine's queue, index)
        releases: list[float] = []  # when finished requests freed their client slots
        in_flight, end = 0, 0.0
        started = time.perf_counter()
        while pending or ready or core.has_work():
            while pending and offsets[pending[0]] <= vc.t and (concurrency is None or in_flight < concurrency):
                i = pending.pop(0)
                sent[i] = records[i].sent_at = _send_time(offsets[i], in_flight, releases, concurrency)
                heapq.heappush(ready, (sent[i] + o.admit_s, i))
                in_flight += 1
            while ready and ready[0][0] <= vc.t:  # the engine takes new requests between steps
                core.add(core.make_sequence(_sent_request(work, records, *heapq.heappop(ready))))
            if not core.has_work():  # idle until the next request reaches the engine
                due = [ready[0][0]] if ready else []
                if pending and (concurrency is None or in_flight < concurrency):
                    due.append(offsets[pending[0]])
                vc.t = max(vc.t, min(due))
                continue
            outputs = core.step()
            at = vc.t + o.deliver_s  # when this step's tokens reach their clients
            vc.advance(o.step_gap_s)
            for out in outputs:
                i, rec = int(out.request_id), records[int(out.request_id)]
                if out.rejected:  # what the service would answer with a status
                    rec.error = "DEADLINE_EXCEEDED" if out.rejected[1] == "deadline" else "RESOURCE_EXHAUSTED"
                if out.token_ids:
                    if rec.ttft is None:
                        rec.ttft, rec.first_at = at - sent[i], at
                    else:
                        rec.itl.append(at - last[i])
                    last[i] = at
                    rec.output_tokens += len(out.token_ids)
                if out.finished:
                    rec.e2e = at - sent[i]
                if out.finished or out.rejected:
                    in_flight -= 1
                    releases.append(at)
                    end = max(end, at)
        report = summarize(records, end)  # as bench serve: from the first offset's zero to the last reply
        report["preemptions"] = core.num_preemptions
        report["simulated_seconds"] = vc.t
        report["wall_seconds"] = time.perf_counter() - started
        if mix is not None and mix.tenants:
            report["tenants"] = by_group(records, "tenant")
        report["records"] = records
        return report
    finally:
        clock.use(None)


def _send_time(offset: float, in_flight: int, releases: list[float], cap: int | None) -> float:
    """When the client sends a request due at `offset`: then, or under a concurrency cap when
    enough of the requests in flight at `offset` have finished. Drops the releases before it."""
    releases[:] = sorted(r for r in releases if r > offset)
    busy = in_flight + len(releases)  # in flight at `offset`
    return offset if cap is None or busy < cap else releases[busy - cap]


def _sent_request(work: Workload, records: list[Record], received: float, i: int) -> GenerationRequest:
    rec = records[i]
    request = _request(work, i, prefix="", limit=None)
    request.priority, request.tenant = rec.priority, rec.tenant
    if rec.deadline_s is not None:
        request.deadline = received + rec.deadline_s  # as the service sets it
    return request


def calibrate(model: str, device: str | None = None, requests: int = 96, seed: int = 0) -> CostModel:
    """Fit the cost model on the real engine: a varied workload (the `chat` shapes, arriving in
    bursts so steps mix prefill chunks and decode rows of every size) through the real core,
    one (features, wall seconds) pair per step, least squares; the fit is judged on a held-out
    fifth of the steps."""
    core, info = build_core(EngineConfig(model=model, device=device), load_scheduler("fcfs"))
    try:
        trace = core.trace_steps()
        work = make("chat", info.vocab_size, seed, requests)
        rng = np.random.default_rng(seed)
        samples: list[tuple[list[float], float]] = []
        order = list(range(len(work.prompts)))
        core.add(core.make_sequence(_request(work, 0)))  # warm-up
        while core.has_work():
            core.step()
        trace.clear()
        while order or core.has_work():
            for i in order[: int(rng.integers(0, 6))] if order else []:  # bursts of 0-5 arrivals
                core.add(core.make_sequence(_request(work, i)))
                order.remove(i)
            if not core.has_work():
                continue
            start = time.perf_counter()
            core.step()
            seconds = time.perf_counter() - start
            if trace:
                t = trace.pop()
                features = [1.0, t.tokens, t.decode_rows, t.attended_keys / 1e3, t.sampled_rows]
                samples.append((features, seconds))
        return fit_steps(
            samples, "in-process: the engine core alone on the device", model=model, device=info.device,
            kv_blocks=info.kv_blocks, block_size=info.block_size,
        )  # fmt: skip
    finally:
        core.close()


def fit_steps(samples: list[tuple[list[float], float]], how: str, **identity: Any) -> CostModel:
    """Least squares over (features, seconds); judged on a held-out fifth of the steps. The
    spread of real less fitted time over every step becomes the model's noise."""
    x = np.array([f for f, _ in samples])
    y = np.array([s for _, s in samples])
    held = np.arange(len(y)) % 5 == 4
    coef = np.linalg.lstsq(x[~held], y[~held], rcond=None)[0]
    err = np.abs(x[held] @ coef - y[held]) / y[held]
    fit = {
        "steps": len(y),
        "held_out_steps": int(held.sum()),
        "mean_abs_error": float(err.mean()),
        "p90_abs_error": float(np.percentile(err, 90)),
        "median_step_ms": 1e3 * statistics.median(y.tolist()),
        "features": list(FEATURES),
        "how": how,
    }
    noise = np.percentile(y - x @ coef, np.linspace(0, 100, NOISE_QUANTILES))
    return CostModel(tuple(float(c) for c in coef), fit=fit, noise=tuple(noise.round(6).tolist()), **identity)


def calibrate_serving(
    model: str, requests: int = 96, rates: tuple[float, ...] = (1.5, 4.0), seed: int = 0
) -> CostModel:
    """Fit the cost model on a real `tandem serve` under `tandem bench serve`'s load (the chat
    workload at `rates`): its steps share the machine with the gRPC server and the load
    generator, as they do when the simulation is compared with that benchmark; and the time
    outside the steps (admission, the loop between steps, delivery) measured on the same run."""
    import asyncio
    import json
    import tempfile

    import grpc
    from transformers import AutoConfig

    from tandem.bench.serve import LocalServer, run_load
    from tandem.v1 import info_pb2, info_pb2_grpc

    vocab = AutoConfig.from_pretrained(resolve_path(model)).get_text_config().vocab_size
    work = make("chat", vocab, seed, requests)
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "steps.jsonl"
        with LocalServer(model, "fcfs", ["--step-trace", str(trace)]) as server:
            for rate in rates:
                records += asyncio.run(run_load(server.target, work, rate, None, seed))[0]
            with grpc.insecure_channel(server.target) as channel:
                info = info_pb2_grpc.InfoServiceStub(channel).GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=30)
        steps = [json.loads(line) for line in trace.read_text().splitlines()]
    features = [[1.0, s["tokens"], s["decode_rows"], s["attended_keys"] / 1e3, s["sampled_rows"]] for s in steps]
    return fit_steps(
        list(zip(features, [s["wall_seconds"] for s in steps])),
        f"tandem serve under tandem bench serve's chat load at {', '.join(map(str, rates))} req/s",
        model=model, device="cpu", kv_blocks=info.kv_blocks, block_size=info.block_size,
        overheads=serving_overheads(steps, records),
    )  # fmt: skip


def serving_overheads(steps: list[dict], records: list[Record]) -> Overheads:
    """The time a served request spends outside the engine's steps, from the server's step
    trace and the client's timestamps (one clock: CLOCK_MONOTONIC). Per request, the step that
    made its first token is the last to end before the client had it: its end to then is
    delivery; its start less the server's queue time is when the request reached the engine's
    queue, and from the send to then is admission. Medians: the machine's hiccups are its noise,
    not the path's cost. Between steps: the mean gap while the engine was busy."""
    start = np.array([s["started"] for s in steps])
    end = start + np.array([s["wall_seconds"] for s in steps])
    gaps = start[1:] - end[:-1]
    busy = gaps[gaps < BUSY_GAP_S]  # longer: the engine was idle, waiting for a request
    admit, deliver = [], []
    for r in records:
        if r.first_at is None or r.sent_at is None or r.queue_s is None:
            continue
        k = int(np.searchsorted(end, r.first_at)) - 1
        deliver.append(r.first_at - end[k])
        admit.append(start[k] - r.queue_s - r.sent_at)
    if not admit:
        raise ValueError("no request finished under the calibration load: no overheads to measure")
    return Overheads(
        admit_s=max(0.0, float(statistics.median(admit))),
        step_gap_s=float(busy.mean()) if busy.size else 0.0,
        deliver_s=max(0.0, float(statistics.median(deliver))),
    )


def _request(work: Workload, i: int, prefix: str = "cal", limit: int | None = 1024) -> GenerationRequest:
    """The workload's i-th request, greedy to its output length (calibration: prompts capped)."""
    stop = StoppingCriteria(max_new_tokens=work.output_lens[i], ignore_eos=True)
    return GenerationRequest(work.prompts[i][:limit], SamplingParams(temperature=0), stop, request_id=f"{prefix}{i}")
