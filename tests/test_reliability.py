"""Load, faults and KV exhaustion against real server processes on loopback.

Each test prints its figures (run with -s to see them); docs/RELIABILITY.md records them.
TANDEM_SOAK_STREAMS / TANDEM_SOAK_ROUNDS make the soak test longer than CI's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import METRICS, make_engine, server_log, start_server
from tandem.engine import SamplingParams, StoppingCriteria
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _load(target: str) -> info_pb2.GetLoadResponse:
    with grpc.insecure_channel(target) as channel:
        return info_pb2_grpc.InfoServiceStub(channel).GetLoad(info_pb2.GetLoadRequest(), timeout=10)


def _settled(target: str, timeout: float = 20.0) -> info_pb2.GetLoadResponse:
    """GetLoad once nothing runs or waits (or the last reading at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        load = _load(target)
        if (load.running == load.waiting == load.kv_blocks_used == 0) or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _ids_request(prompt: list[int], n: int, request_id: str = "") -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0),
        stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
    )


def _reference(prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
    with make_engine(model="tiny-llama") as engine:
        stops = [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in lens]
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0), stops)]


# -- load -----------------------------------------------------------------------------------
async def _soak_round(target: str, prompts, lens, kinds, rng) -> dict:
    figures: dict[str, Any] = dict(
        streams=len(prompts), tokens=0, completed=0, cancelled=0, deadline=0, aborted=0, statuses={}
    )
    outputs: list[list[int] | None] = [None] * len(prompts)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(i: int) -> None:
            kind = kinds[i]
            rid = f"soak-{i}-{rng.integers(1 << 30)}"
            timeout = float(rng.uniform(0.05, 0.6)) if kind == "deadline" else 120
            call = stub.GenerateStream(_ids_request(prompts[i], lens[i], rid), timeout=timeout)
            got: list[int] = []
            cut = int(rng.integers(1, 4))
            try:
                async for resp in call:
                    got += resp.token_ids
                    if kind == "cancel" and len(got) >= cut:
                        call.cancel()
                        break
                    if kind == "abort" and len(got) >= cut and not resp.finish_reason:
                        await stub.Abort(pb.AbortRequest(request_ids=[rid]), timeout=10)
                        kind = "aborted"  # keep reading: the stream ends with FINISH_REASON_ABORTED
                    if resp.finish_reason == pb.FINISH_REASON_ABORTED:
                        figures["aborted"] += 1
                code = (await call.code()) if kind != "cancel" else grpc.StatusCode.CANCELLED
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
            figures["tokens"] += len(got)
            figures["statuses"][code.name] = figures["statuses"].get(code.name, 0) + 1
            if code == grpc.StatusCode.CANCELLED:
                figures["cancelled"] += 1
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                figures["deadline"] += 1
            elif code == grpc.StatusCode.OK and kind in ("plain", "deadline"):
                outputs[i] = got

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    figures["outputs"] = outputs
    return figures


# Every service-level guarantee holds under the synchronous policy and under async overlap
# (steps pipelined on the CPU worker executor: its failed-step path included).
SCHEDULERS = ["fcfs", "async-overlap"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_soak_streams_cancels_deadlines_aborts_lose_nothing_and_leak_nothing(scheduler: str) -> None:
    streams = int(os.environ.get("TANDEM_SOAK_STREAMS", 256))
    rounds = int(os.environ.get("TANDEM_SOAK_ROUNDS", 2))
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, 512, int(rng.integers(4, 48))).tolist() for _ in range(streams)]
    lens = [int(rng.integers(8, 128)) for _ in range(streams)]
    kinds = rng.choice(["plain", "cancel", "deadline", "abort"], streams, p=[0.6, 0.2, 0.1, 0.1]).tolist()
    want = _reference(prompts, lens)
    proc, target = start_server(
        "--model", "tiny-llama", "--max-waiting", "100000", "--metrics-port", "0", "--scheduler", scheduler
    )  # fmt: skip
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            figures = asyncio.run(_soak_round(target, prompts, lens, kinds, rng))
            assert set(figures["statuses"]) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, figures["statuses"]
            checked = [(i, out) for i, out in enumerate(figures.pop("outputs")) if out is not None]
            mismatched = [i for i, out in checked if out != want[i]]
            assert not mismatched, f"streams {mismatched[:5]} differ from the offline engine"
            load = _settled(target)
            leaked = load.kv_blocks_used
            assert leaked == 0 and load.running == load.waiting == 0
            assert load.kv_blocks_free == load.kv_blocks_total  # free counts cached blocks (evictable)
            assert figures["cancelled"] >= streams // 10 and figures["aborted"] > 0
            print(
                f"\nsoak ({scheduler}): {figures['streams']} streams, {figures['tokens']} tokens, "
                f"{len(checked)} completed streams equal to offline, {figures['cancelled']} cancelled, "
                f"{figures['deadline']} deadline hits, "
                f"{figures['aborted']} aborted, statuses {figures['statuses']}, leaked blocks {leaked}, "
                f"{time.perf_counter() - start:.1f} s"
            )
        assert _health(target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        _stop(proc)


# -- engine faults --------------------------------------------------------------------------
def _streams_under_fault(target: str, n: int) -> tuple[list[str], float]:
    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def one(i):
                try:
                    async for _ in stub.GenerateStream(_ids_request([5 + i, 6, 7], 200), timeout=60):
                        pass
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            start = time.perf_counter()
            codes = await asyncio.gather(*(one(i) for i in range(n)))
            return list(codes), time.perf_counter() - start

    return asyncio.run(run())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("fault,code", [("raise", "INTERNAL"), ("hang", "UNAVAILABLE")])
def test_engine_fault_ends_every_stream_turns_not_serving_and_exits_nonzero(fault, code, scheduler) -> None:
    # Warm-up takes two forward steps; the 12th is mid-generation for every stream.
    proc, target = start_server(
        "--model",
        "tiny-llama",
        "--step-timeout",
        "2",
        "--scheduler",
        scheduler,
        env={"TANDEM_TEST_FAULT": f"{fault}:12"},
    )
    try:
        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        codes, seconds = _streams_under_fault(target, 4)
        # docs: 0.0 s after the raise, 2.5 s with a 2 s watchdog
        assert codes == [code] * 4 and seconds < (5 if fault == "raise" else 10)
        statuses = []
        try:
            for update in watch:
                statuses.append(update.status)
        except grpc.RpcError:
            pass  # the server went away after reporting
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        exit_code = proc.wait(30)
        assert exit_code == 70
        assert "exiting_engine_failed" in server_log(proc)
        print(f"\nfault {fault} ({scheduler}): 4 streams {code} in {seconds:.1f} s; NOT_SERVING; exit {exit_code}")
        channel.close()
    finally:
        _stop(proc)


# -- client faults --------------------------------------------------------------------------
@pytest.fixture(scope="module", params=SCHEDULERS)
def small_queue_server(request: pytest.FixtureRequest):
    proc, target = start_server("--model", "tiny-llama", "--max-waiting", "32", "--scheduler", request.param)
    yield proc, target
    _stop(proc)


def _timed_requests(target: str, n: int) -> float:
    start = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        for i in range(n):
            list(stub.GenerateStream(_ids_request([9, 10, 11 + i], 32), timeout=60))
    return time.perf_counter() - start


def test_a_client_that_stops_reading_blocks_nobody(small_queue_server) -> None:
    _, target = small_queue_server
    baseline = _timed_requests(target, 6)

    async def stalled_reader():
        async with grpc.aio.insecure_channel(target) as channel:
            # Text output without being read: far more than the HTTP/2 window ever in flight.
            req = _ids_request([4, 5, 6], 900)
            req.output.logprobs, req.output.top_logprobs = True, 20
            call = pb_grpc.GenerationServiceStub(channel).GenerateStream(req, timeout=120)
            await call.initial_metadata()
            busy = await asyncio.to_thread(_timed_requests, target, 6)
            load = await asyncio.to_thread(_settled, target, 60)
            call.cancel()
            return busy, load

    busy, load = asyncio.run(stalled_reader())
    # The engine finished the unread request (its blocks are back) while its stream sat unread.
    assert load.running == 0 and load.kv_blocks_used == 0
    assert busy < 1.5 * baseline + 0.5  # docs: 0.55 s with it unread, 0.50 s alone
    print(f"\nnon-reading client: 6 other requests took {busy:.2f} s (alone: {baseline:.2f} s)")


def test_a_dropped_connection_frees_its_request(small_queue_server) -> None:
    proc, target = small_queue_server
    script = (
        "import grpc, os, sys\n"
        "from tandem.v1 import generation_pb2 as pb, generation_pb2_grpc as g\n"
        "ch = grpc.insecure_channel(sys.argv[1])\n"
        "call = g.GenerationServiceStub(ch).GenerateStream(pb.GenerateStreamRequest(request_id='dropped',"
        " token_ids=pb.TokenIds(ids=[4, 5, 6]), stopping=pb.StoppingCriteria(max_new_tokens=900, ignore_eos=True)))\n"
        "next(call)\n"
        "print('reading', flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    client = subprocess.run(
        [sys.executable, "-c", script, target],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert "reading" in client.stdout and client.returncode == -9
    load = _settled(target, 30)
    assert load.running == 0 and load.kv_blocks_used == 0
    events = [json.loads(line) for line in server_log(proc).splitlines() if line.startswith("{")]
    assert any(e["event"] == "request_aborted" and e.get("request_id") == "dropped" for e in events)


def test_a_burst_of_1000_requests_is_admitted_or_refused_and_memory_stays_bounded(small_queue_server) -> None:
    proc, target = small_queue_server

    def rss_mib() -> float:
        with open(f"/proc/{proc.pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024

    before = rss_mib()

    async def burst():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def one(i):
                try:
                    await stub.Generate(
                        pb.GenerateRequest(
                            token_ids=pb.TokenIds(ids=[4 + i % 500, 5]), stopping=pb.StoppingCriteria(max_new_tokens=4)
                        ),
                        timeout=120,
                    )
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            return await asyncio.gather(*(one(i) for i in range(1000)))

    start = time.perf_counter()
    codes = asyncio.run(burst())
    seconds = time.perf_counter() - start
    counts = {c: codes.count(c) for c in set(codes)}
    after = rss_mib()
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"}, counts
    assert _health(target) == health_pb2.HealthCheckResponse.SERVING
    assert _settled(target).kv_blocks_used == 0
    assert after - before < 300
    print(f"\nburst: 1000 requests in {seconds:.1f} s: {counts}; server RSS {before:.0f} -> {after:.0f} MiB")


# -- KV exhaustion --------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_kv_exhaustion_under_load_preempts_and_every_request_finishes(scheduler: str) -> None:
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 512, int(rng.integers(24, 64))).tolist() for _ in range(24)]
    lens = [int(rng.integers(40, 80)) for _ in range(24)]
    want = _reference(prompts, lens)
    # 24 blocks of 16 tokens: room for about 4 of these requests at once, 24 arrive together.
    proc, target = start_server(
        "--model", "tiny-llama", "--kv-blocks", "24", "--metrics-port", "0", "--scheduler", scheduler
    )  # fmt: skip
    try:

        async def run():
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)

                async def one(i):
                    return [
                        t
                        async for r in stub.GenerateStream(_ids_request(prompts[i], lens[i]), timeout=300)
                        for t in r.token_ids
                    ]

                return await asyncio.gather(*(one(i) for i in range(len(prompts))))

        start = time.perf_counter()
        got = asyncio.run(run())
        seconds = time.perf_counter() - start
        assert got == want
        metrics = urllib.request.urlopen(f"http://{METRICS[target]}/metrics", timeout=10).read().decode()
        found = re.search(r"^tandem_preemptions_total (\S+)", metrics, re.M)
        assert found is not None, metrics
        preemptions = float(found.group(1))
        assert preemptions > 0
        assert _settled(target).kv_blocks_used == 0
        print(
            f"\nKV exhaustion ({scheduler}): 24 requests over a 24-block pool finished in {seconds:.1f} s, "
            f"{preemptions:.0f} preemptions, outputs equal to offline"
        )
    finally:
        _stop(proc)
