"""`tandem bench serve`: a gRPC load generator in the manner of `vllm bench serve`.

Requests arrive as a Poisson process at `rate` per second (inf: all at once), optionally capped
at `concurrency` in flight. Each is a stream of token-id prompts with ignore_eos, so every
request generates exactly its workload output length. Per request: time to first token,
inter-token latencies (gaps between streamed responses that carry tokens; a response may carry
several tokens when the client reads slower than the engine produces), time per output token
((e2e - ttft) / (tokens - 1)) and end-to-end latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import signal
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem.bench.progress import Progress
from tandem.bench.workloads import Workload
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc


@dataclass
class Record:
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    error: str | None = None  # the gRPC status code's name
    tenant: str = ""  # sent as x-tenant-id
    priority: int = 0
    deadline_s: float | None = None  # sent as ttft_target_s: when the first token is due
    # For `tandem sim calibrate --serve`: when it was sent and its first token came (this
    # process's perf_counter: CLOCK_MONOTONIC on Linux, the server's clock too), and the
    # server's own account of its time waiting in the engine's queue.
    sent_at: float | None = None
    first_at: float | None = None
    queue_s: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Mix:
    """Who sends each request (for the scheduling policies' figures): tenants, priorities and a
    deadline, each drawn per request from `"name:share,..."`-style proportions."""

    tenants: list[str] | None = None
    priorities: list[int] | None = None
    deadline_s: float | None = None

    def apply(self, records: list[Record]) -> None:
        for i, r in enumerate(records):
            r.tenant = self.tenants[i] if self.tenants else ""
            r.priority = self.priorities[i] if self.priorities else 0
            r.deadline_s = self.deadline_s


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: Poisson arrivals at `rate`/s."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
    return np.cumsum(gaps).tolist()


async def _one(stub, prompt: list[int], max_new: int, record: Record) -> None:
    req = pb.GenerateStreamRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0),
        stopping=pb.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
        priority=record.priority,
        ttft_target_s=record.deadline_s,
    )
    metadata = (("x-tenant-id", record.tenant),) if record.tenant else None
    start = last = record.sent_at = time.perf_counter()
    try:
        async for resp in stub.GenerateStream(req, metadata=metadata):
            now = time.perf_counter()
            if resp.timings.total_seconds:  # the last response
                record.queue_s = resp.timings.queue_seconds
            if not resp.token_ids:
                continue
            if record.ttft is None:
                record.ttft = now - start
                record.first_at = now
            else:
                record.itl.append(now - last)
            last = now
            record.output_tokens += len(resp.token_ids)
        record.e2e = time.perf_counter() - start
    except grpc.aio.AioRpcError as exc:
        record.error = exc.code().name


async def run_load(
    target: str,
    work: Workload,
    rate: float,
    concurrency: int | None,
    seed: int = 0,
    label: str = "",
    mix: Mix | None = None,
) -> tuple[list[Record], float]:
    """Send the workload; returns one record per request and the wall time from first send to last reply."""
    offsets = arrival_offsets(len(work.prompts), rate, seed)
    records = [Record(len(p)) for p in work.prompts]
    if mix is not None:
        mix.apply(records)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await _one(stub, work.prompts[0][:8], 2, Record(8))  # warm-up: connection and first step
        progress = Progress(label or f"rate {rate}", len(records))
        start = time.perf_counter()

        async def send(i: int) -> None:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            if gate is None:
                await _one(stub, work.prompts[i], work.output_lens[i], records[i])
            else:
                async with gate:
                    await _one(stub, work.prompts[i], work.output_lens[i], records[i])
            progress.advance()

        await asyncio.gather(*(send(i) for i in range(len(records))))
        wall = time.perf_counter() - start
        progress.close()
    return records, wall


def _stats(values: list[float]) -> dict:
    if not values:
        return dict(mean=None, p50=None, p90=None, p99=None)
    a = np.asarray(values) * 1e3
    return dict(
        mean=float(a.mean()),
        p50=float(np.percentile(a, 50)),
        p90=float(np.percentile(a, 90)),
        p99=float(np.percentile(a, 99)),
    )


def summarize(
    records: list[Record], wall: float, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None
) -> dict:
    """Throughputs and latency statistics in milliseconds; goodput counts requests meeting every SLO given."""
    ok = [r for r in records if r.error is None]
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    output = sum(r.output_tokens for r in ok)

    def meets(r: Record) -> bool:
        return (slo_ttft_ms is None or (r.ttft or 0) * 1e3 <= slo_ttft_ms) and (
            slo_tpot_ms is None or (r.tpot or 0) * 1e3 <= slo_tpot_ms
        )

    summary = dict(
        completed=len(ok),
        errors=errors,
        seconds=wall,
        request_throughput=len(ok) / wall,
        output_throughput=output / wall,
        total_token_throughput=(output + sum(r.prompt_tokens for r in ok)) / wall,
        ttft_ms=_stats([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=_stats([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=_stats([x for r in ok for x in r.itl]),
        e2e_ms=_stats([r.e2e for r in ok if r.e2e is not None]),
    )
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        summary["goodput"] = dict(
            slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, request_throughput=sum(map(meets, ok)) / wall
        )
    return summary


def server_info(target: str) -> tuple[dict, int]:
    """The server's scheduler and options, and the model's vocabulary size."""
    with grpc.insecure_channel(target) as channel:
        info = info_pb2_grpc.InfoServiceStub(channel)
        model = info.GetModelInfo(info_pb2.GetModelInfoRequest(), timeout=30)
        server = info.GetServerInfo(info_pb2.GetServerInfoRequest(), timeout=30)
    return dict(
        scheduler=server.scheduler,
        scheduler_options=dict(server.scheduler_options),
        model=model.name,
        device=model.device,
        dtype=model.dtype,
        max_num_seqs=server.max_num_seqs,
        max_batch_tokens=server.max_batch_tokens,
    ), model.vocab_size


class LocalServer:
    """`tandem serve` in a subprocess on a free loopback port, stopped with SIGTERM."""

    def __init__(self, model: str, scheduler: str, extra: list[str] | None = None) -> None:
        name, _, policy = scheduler.partition(":")
        args = [
            str(Path(sys.executable).parent / "tandem"),
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--scheduler",
            name,
            "--log-format",
            "console",
            "--max-waiting",
            "100000",
            *(extra or []),
        ]
        if policy:
            args += ["--scheduler-opt", f"policy={policy}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.startswith("tandem starting on"):  # the port is open; the model loads
            line = self.proc.stdout.readline()
        if not line.startswith("tandem serving on"):
            self.proc.kill()
            raise RuntimeError(f"tandem serve did not start (exit {self.proc.wait()})")
        self.target = line.split()[3]

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def sweep(
    target: str,
    work: Workload,
    rates: list[float],
    concurrency: int | None,
    seed: int,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    label: str,
) -> list[dict]:
    """One run per rate against one server; each entry has the summary and the raw latencies."""
    runs = []
    for rate in rates:
        records, wall = asyncio.run(run_load(target, work, rate, concurrency, seed, f"{label} rate {rate:g}"))
        runs.append(
            dict(
                rate=rate,
                concurrency=concurrency,
                **summarize(records, wall, slo_ttft_ms, slo_tpot_ms),
                records=[asdict(r) for r in records],
            )
        )
    return runs


def table(report: dict) -> str:
    head = (
        f"{'server':<40}{'rate':>6}{'req/s':>7}{'out tok/s':>10}{'TTFT p50':>9}{'p99':>8}"
        f"{'TPOT p50':>9}{'ITL p50':>8}{'p99':>8}{'E2E p50':>9}{'good/s':>7}{'/offline':>9}"
    )
    lines = [head]
    if len(report["rates"]) > 1:
        fresh = report.get("fresh_server_per_rate")
        warm = "one server for every rate: rates after the first meet a prefix cache the earlier ones warmed"
        lines.insert(0, "each rate on a fresh server (a cold prefix cache)" if fresh else warm)
    for server in report["servers"]:
        for run in server["runs"]:
            good = run.get("goodput", {}).get("request_throughput")
            ratio = run.get("of_offline")
            ms = lambda k, q, run=run: f"{run[k][q]:.0f}" if run[k][q] is not None else "-"
            lines.append(
                f"{server['label']:<40}{run['rate']:>6g}{run['request_throughput']:>7.2f}"
                f"{run['output_throughput']:>10.1f}{ms('ttft_ms', 'p50'):>9}{ms('ttft_ms', 'p99'):>8}"
                f"{ms('tpot_ms', 'p50'):>9}{ms('itl_ms', 'p50'):>8}{ms('itl_ms', 'p99'):>8}"
                f"{ms('e2e_ms', 'p50'):>9}{(f'{good:.2f}' if good is not None else '-'):>7}"
                f"{(f'{ratio:.3f}' if ratio is not None else '-'):>9}"
                + (f"  errors {run['errors']}" if run["errors"] else "")
            )
    return "\n".join(lines)


def _add_offline_baseline(server: dict, scheduler: str, model: str, work: Workload) -> None:
    from tandem.bench.offline import run_tandem

    result = run_tandem(scheduler, model, work, None, None, {})
    server["offline"] = dict(output_throughput=result.tokens_per_s, seconds=result.seconds)
    for run in server["runs"]:
        run["of_offline"] = run["output_throughput"] / result.tokens_per_s


def _median_of_offline(servers: list[dict], scheduler: str, rate: float) -> float:
    """The median gRPC / offline fraction of `scheduler`'s rounds at `rate`."""
    rounds = [sv for sv in servers if sv["scheduler"] == scheduler]
    ratios = [r["of_offline"] for sv in rounds for r in sv["runs"] if r["rate"] == rate]
    return float(np.median(ratios))


def parse_goodput(items: list[str]) -> tuple[float | None, float | None]:
    """`ttft:500 tpot:50` (milliseconds) -> (ttft, tpot)."""
    slo: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot"):
            raise ValueError(f"--goodput: expected ttft:MS or tpot:MS, got {item!r}")
        slo[key] = float(value)
    return slo.get("ttft"), slo.get("tpot")


def bench_serve(
    workload: str,
    rates: list[float],
    concurrency: int | None,
    target: str | None = None,
    model: str = "bench-llama",
    schedulers: tuple[str, ...] = ("fcfs",),
    requests: int | None = None,
    seed: int = 0,
    goodput: list[str] | None = None,
    json_path: str | None = None,
    server_args: list[str] | None = None,
    offline_baseline: bool = False,
    repeats: int = 1,
) -> dict:
    """Against `target`, or against a local `tandem serve` per scheduler, one after the other.
    `offline_baseline` (local servers only): after each server stops, the same workload runs
    through the engine in this process, and every run reports its throughput as a fraction of it.
    `repeats` (local servers): the whole round, every scheduler, that many times, alternated;
    with the baseline, the report adds each scheduler's median fraction per rate."""
    import json

    from tandem.bench.offline import environment
    from tandem.bench.workloads import make

    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    slo_ttft, slo_tpot = parse_goodput(goodput or [])
    servers: list[dict[str, Any]] = []

    def measure(addrs: Iterator[str], label: str) -> Workload:
        """One run per rate, each against the next address `addrs` yields."""
        runs = []
        for rate, addr in zip(rates, addrs):
            info, vocab = server_info(addr)
            work = make(workload, vocab, seed, requests)
            runs += [
                dict(run, target=addr)
                for run in sweep(addr, work, [rate], concurrency, seed, slo_ttft, slo_tpot, label)
            ]
        servers.append(
            dict(
                label=label,
                target=addr,
                info=info,
                runs=runs,
                workload=dict(
                    name=work.name,
                    requests=len(work.prompts),
                    prompt_tokens=work.prompt_tokens,
                    output_tokens=work.output_tokens,
                ),
            )
        )
        return work

    if target:
        if offline_baseline:
            raise ValueError("--offline-baseline runs the local servers' model in-process: leave out --target")
        if repeats > 1:
            raise ValueError("--repeats starts local servers afresh each round: leave out --target")
        measure(itertools.repeat(target), target)  # one server: later rates meet a warm prefix cache
    else:
        # NOTE: rounds alternate, so drift on a shared machine reaches every scheduler (and,
        # with the baseline, the served and the offline side) alike.
        for rep, scheduler in itertools.product(range(repeats), schedulers):

            def fresh(scheduler: str = scheduler) -> Generator[str, None, None]:
                # NOTE: a fresh server per rate: one kept across rates would serve every rate
                # after the first from a prefix cache warmed by the earlier ones.
                for _ in rates:
                    with LocalServer(model, scheduler, server_args) as server:
                        yield server.target

            label = f"tandem {scheduler}" + (f" #{rep + 1}" if repeats > 1 else "")
            with contextlib.closing(fresh()) as servers_per_rate:  # closing stops the last one
                work = measure(servers_per_rate, label)
            servers[-1]["scheduler"] = scheduler
            if offline_baseline:  # the server has stopped: the two never share the CPU
                _add_offline_baseline(servers[-1], scheduler, model, work)
    report = dict(
        kind="serve",
        workload=workload,
        seed=seed,
        rates=rates,
        concurrency=concurrency,
        fresh_server_per_rate=target is None,
        environment=environment(servers[0]["info"]["model"], servers[0]["info"]["device"], servers[0]["info"]["dtype"]),
        servers=servers,
    )
    if offline_baseline and repeats > 1:
        report["of_offline_median"] = {
            scheduler: {str(rate): _median_of_offline(servers, scheduler, rate) for rate in rates}
            for scheduler in schedulers
        }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def by_group(records: list[Record], key: str, deadline_s: float | None = None) -> dict:
    """Per tenant or priority (`key`): requests, share of output tokens, TTFT p50/p99 of the
    completed, and with a deadline the fraction whose first token came within it."""
    total = sum(r.output_tokens for r in records) or 1
    out = {}
    for group in sorted({getattr(r, key) for r in records}):
        mine = [r for r in records if getattr(r, key) == group]
        ttft = [r.ttft for r in mine if r.ttft is not None and r.error is None]
        row = {
            "requests": len(mine),
            "token_share": sum(r.output_tokens for r in mine) / total,
            "ttft_ms": _stats(ttft),
            "errors": sum(r.error is not None for r in mine),
        }
        if deadline_s is not None:
            met = sum(r.error is None and r.ttft is not None and r.ttft <= deadline_s for r in mine)
            row["met_deadline"] = met / len(mine)
        out[str(group)] = row
    return out
