"""Tensor parallelism: `tandem serve --tensor-parallel 2` as two CPU processes on gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers import (
    BIN,
    ServerProcess,
    assert_greedy_matches,
    make_engine,
    ordinary_model,
    random_prompts,
    reference_model,
    server_log,
    start_server,
    wait_until_idle,
)
from tandem.engine import SamplingParams, StoppingCriteria
from tandem.engine.config import EngineConfig
from tandem.engine.device.faults import EXIT_RANK_CODE
from tandem.engine.device.tensor_parallel import check_devices
from tandem.engine.model.presets import preset_path
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc
from tandem.v1 import info_pb2, info_pb2_grpc

KV_BLOCKS = 256
PROMPTS = random_prompts(np.random.default_rng(5), 5, 3, 40)
NEW = 16
TOL = 1e-4  # float32: the sharded sums round differently from the whole ones by ~1e-6


class Servers:
    """TP=2 servers by (model, scheduler), started on first use, stopped with the module."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str], tuple[ServerProcess, str]] = {}

    def get(self, model: str, scheduler: str = "fcfs") -> str:
        if (model, scheduler) not in self.running:
            self.running[(model, scheduler)] = start_tp(model, scheduler)
        return self.running[(model, scheduler)][1]

    def stop(self) -> None:
        for proc, _ in self.running.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.running.values():
            proc.wait(30)


def start_tp(model: str, scheduler: str = "fcfs", *extra: str) -> tuple[ServerProcess, str]:
    args = ["--model", model, "--scheduler", scheduler, "--tensor-parallel", "2", "--kv-blocks", str(KV_BLOCKS)]
    return start_server(*args, *extra)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers()
    yield s
    s.stop()


def _greedy(prompt: list[int], n: int = NEW, rid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0),
        stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
        request_id=rid,
    )


def _generate_all(target: str, requests: list[pb.GenerateRequest]) -> list[list[int]]:
    """All at once, so that the steps batch them."""
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate.future(r, timeout=120) for r in requests]
        return [list(c.result().token_ids) for c in calls]


def _tp1(model: str, scheduler: str, sampling: SamplingParams) -> list[list[int]]:
    with make_engine(scheduler, model=model, kv_blocks=KV_BLOCKS) as eng:
        done = eng.generate(PROMPTS, sampling, StoppingCriteria(max_new_tokens=NEW, ignore_eos=True))
    return [c.token_ids for c in done]


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_greedy_over_two_ranks_is_the_single_ranks_choice(servers: Servers, model: str, scheduler: str) -> None:
    got = _generate_all(servers.get(model, scheduler), [_greedy(p) for p in PROMPTS])
    ref = reference_model(preset_path(model))
    for prompt, tokens in zip(PROMPTS, got):
        assert len(tokens) == NEW
        assert_greedy_matches(prompt, tokens, ref, TOL)
    # The presets' wide weights leave no near-ties: the tokens are TP=1's exactly.
    assert got == _tp1(model, scheduler, SamplingParams(temperature=0))


def test_greedy_over_two_ranks_on_ordinarily_initialised_weights(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = ordinary_model(tmp_path_factory.mktemp("ordinary"))
    proc, target = start_tp(str(path))
    try:
        got = _generate_all(target, [_greedy(p) for p in PROMPTS])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    ref = reference_model(path)
    flips = sum(assert_greedy_matches(p, t, ref, TOL) for p, t in zip(PROMPTS, got))
    assert flips <= 1, f"{flips} near-tie flips"


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_seeded_sampling_over_two_ranks_is_the_single_ranks(servers: Servers, scheduler: str) -> None:
    requests = [
        pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=p),
            sampling=pb.SamplingParams(temperature=1.0, top_p=0.9, seed=11),
            stopping=pb.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
        )
        for p in PROMPTS
    ]
    got = _generate_all(servers.get("tiny-llama", scheduler), requests)
    assert got == _tp1("tiny-llama", scheduler, SamplingParams(temperature=1.0, top_p=0.9, seed=11))


def test_each_rank_holds_half_the_kv_of_one(servers: Servers) -> None:
    with grpc.insecure_channel(servers.get("tiny-llama")) as ch:
        info = info_pb2_grpc.InfoServiceStub(ch).GetModelInfo(info_pb2.GetModelInfoRequest(), timeout=10)
    with make_engine(model="tiny-llama", kv_blocks=KV_BLOCKS) as eng:
        whole = eng.core.executor.kv.nbytes
    assert info.tensor_parallel == 2
    assert list(info.kv_bytes_per_rank) == [whole // 2, whole // 2]


def test_cancel_and_abort_free_the_blocks_and_later_steps_stay_right(servers: Servers) -> None:
    target = servers.get("tiny-llama", "async-overlap")
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        long = pb.GenerateStreamRequest(
            token_ids=pb.TokenIds(ids=PROMPTS[0]),
            sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_new_tokens=400, ignore_eos=True),
        )
        call = stub.GenerateStream(long)
        next(call), next(call)
        call.cancel()
        aborted = stub.GenerateStream(
            pb.GenerateStreamRequest(
                token_ids=long.token_ids, sampling=long.sampling, stopping=long.stopping, request_id="tp-abort"
            )
        )
        next(aborted)
        stub.Abort(pb.AbortRequest(request_ids=["tp-abort"]))
        assert list(aborted)[-1].finish_reason == pb.FINISH_REASON_ABORTED
    (load,) = wait_until_idle([target])
    assert load.kv_blocks_used == 0 and load.running == 0
    # The freed blocks are written again by new requests on both ranks: outputs stay TP=1's.
    got = _generate_all(target, [_greedy(p) for p in PROMPTS])
    assert got == _tp1("tiny-llama", "async-overlap", SamplingParams(temperature=0))


def _follower_pids(server: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("when", ["mid-step", "idle"])
def test_a_follower_that_dies_ends_the_service_with_a_status(when: str) -> None:
    """Mid-step the leader's collective fails at once; idle, its watcher notices the exit."""
    proc, target = start_tp("tiny-llama")
    try:
        (follower,) = _follower_pids(proc)
        if when == "idle":
            os.kill(follower, signal.SIGKILL)
        else:
            with grpc.insecure_channel(target) as ch:
                call = pb_grpc.GenerationServiceStub(ch).GenerateStream(_stream(PROMPTS[0], 400), timeout=120)
                next(call)
                os.kill(follower, signal.SIGKILL)
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
            # gloo says "Connection reset" or "closed" by the peer; the watcher may say it first
            details = str(info.value.details())
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert any(w in details for w in ("Connection reset", "Connection closed", "rank 1 exited")), details
        assert proc.wait(60) == 70  # EXIT_ENGINE_FAILED: the orchestrator restarts it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if when == "idle":
        assert "tensor-parallel rank 1 exited with code -9" in server_log(proc)


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_a_failed_step_on_rank_0_stops_the_follower_waiting_in_its_collective(scheduler: str) -> None:
    """Rank 0's fourth forward raises (warm-up included) after the step went to the follower,
    which then waits in the forward's first all-reduce (under overlap rank 0's engine thread
    is meanwhile sending the next step): the stream gets the real error at once, the server
    exits, and takes the follower with it."""
    args = ["--model", "tiny-llama", "--scheduler", scheduler, "--tensor-parallel", "2"]
    proc, target = start_server(*args, env={"TANDEM_TEST_FAULT": "raise:4"})
    (follower,) = _follower_pids(proc)
    try:
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.GenerationServiceStub(ch).GenerateStream(_stream(PROMPTS[0], 32), timeout=30))
        assert info.value.code() == grpc.StatusCode.INTERNAL and "injected fault" in str(info.value.details())
        assert proc.wait(60) == 70
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _gone(follower)


def _stream(prompt: list[int], n: int) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0),
        stopping=pb.StoppingCriteria(max_new_tokens=min(n, 400), ignore_eos=True),
    )


def test_sigterm_drains_then_stops_every_rank() -> None:
    proc, target = start_tp("tiny-llama")
    (follower,) = _follower_pids(proc)
    with grpc.insecure_channel(target) as ch:
        call = pb_grpc.GenerationServiceStub(ch).GenerateStream(_stream(PROMPTS[1], 48), timeout=120)
        next(call)
        proc.send_signal(signal.SIGTERM)
        rest = list(call)  # the in-flight stream finishes: drained, not cut
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while not _gone(follower) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(follower)


def test_sizes_that_cannot_split_the_model_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="must divide the model's attention heads"):
        make_engine(model="tiny-llama", tensor_parallel=3)
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"needs {cores + 1} CPU cores"):
        check_devices(EngineConfig(device="cpu", tensor_parallel=cores + 1))
    out = subprocess.run(
        [str(BIN / "tandem"), "serve", "--port", "0", "--model", "tiny-llama", "--tensor-parallel", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "tensor_parallel 3 must divide" in out.stderr


def test_a_follower_that_dies_before_joining_fails_the_start_at_once() -> None:
    """Rank 0's rendezvous would wait out the collective timeout (600 s) for a dead rank: it
    watches the followers instead, and the server exits with the reason."""
    started = time.monotonic()
    out = subprocess.run(
        [str(BIN / "tandem"), "serve", "--port", "0", "--model", "tiny-llama", "--tensor-parallel", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TANDEM_TEST_FAULT": "exit-rank:1"},
    )
    assert out.returncode != 0
    assert f"tensor-parallel rank 1 exited with code {EXIT_RANK_CODE} before joining" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - started < 120
