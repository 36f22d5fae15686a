"""The gRPC service, through a real server process on loopback."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from conftest import make_engine
from engine import SamplingParams, StoppingCriteria
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(BIN / "tandem"), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("tandem serving on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def server():
    proc, target = start_server("--model", "tiny-llama")
    yield target
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def offline():
    with make_engine(model="tiny-llama") as eng:
        yield eng


def _greedy(text: str, n: int, **kw) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(text=text, sampling=pb.SamplingParams(temperature=0),
                                    stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True), **kw)


def test_stream_and_unary_equal_the_offline_engine(stub, offline) -> None:
    want = offline.generate(["Once upon a time"], SamplingParams(temperature=0),
                            StoppingCriteria(max_new_tokens=24, ignore_eos=True))[0]
    call = stub.GenerateStream(_greedy("Once upon a time", 24), metadata=(("x-request-id", "abc-123"),))
    responses = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    assert responses[0].HasField("prompt_tokens") and responses[0].request_id == "abc-123"
    assert [t for r in responses for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in responses) == want.text
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 24
    assert last.timings.time_to_first_token_seconds > 0
    unary = stub.Generate(pb.GenerateRequest(text="Once upon a time", sampling=pb.SamplingParams(temperature=0),
                                             stopping=pb.StoppingCriteria(max_new_tokens=24, ignore_eos=True)))
    assert list(unary.token_ids) == want.token_ids and unary.text == want.text


def test_tokenize(stub, offline) -> None:
    got = stub.Tokenize(pb.TokenizeRequest(text="héllo 😀"))
    assert list(got.token_ids) == offline.tokenizer.encode("héllo 😀", add_special_tokens=False)


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(text="hi", sampling=pb.SamplingParams(top_p=2.0)), "sampling.top_p"),
    (dict(), "prompt"),
    (dict(text=""), "text"),
    (dict(token_ids=pb.TokenIds(ids=[5, 99999])), "token_ids.ids"),
    (dict(text="hi", stopping=pb.StoppingCriteria(max_new_tokens=0)), "stopping.max_new_tokens"),
    (dict(text="hi", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
])
def test_bad_requests_get_invalid_argument_naming_the_field(stub, request_kwargs, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(pb.GenerateStreamRequest(**request_kwargs)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert stub.Generate(pb.GenerateRequest(text="still serving", stopping=pb.StoppingCriteria(max_new_tokens=2)))


def test_health_is_serving(server) -> None:
    with grpc.insecure_channel(server) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cancel_and_abort_leave_other_streams_alone(stub, offline) -> None:
    want = offline.generate(["steady"], SamplingParams(temperature=0),
                            StoppingCriteria(max_new_tokens=40, ignore_eos=True))[0].token_ids
    result = {}
    steady = threading.Thread(target=lambda: result.setdefault(
        "tokens", [t for r in stub.GenerateStream(_greedy("steady", 40)) for t in r.token_ids]))
    steady.start()
    cancelled = stub.GenerateStream(_greedy("to cancel", 500))
    next(cancelled)
    cancelled.cancel()
    aborted = stub.GenerateStream(_greedy("to abort", 500, request_id="abort-me"))
    next(aborted)
    stub.Abort(pb.AbortRequest(request_ids=["abort-me", "abort-me", "unknown"]))
    rest = list(aborted)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORTED
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(_greedy("deadline", 100000 // 100), timeout=0.05))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    steady.join(60)
    assert result["tokens"] == want
    stub.Abort(pb.AbortRequest(request_ids=["abort-me"]))  # idempotent after the fact


def test_buf_curl_through_reflection(server) -> None:
    body = json.dumps({"text": "Hello", "stopping": {"max_new_tokens": 8}})
    res = subprocess.run([str(BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", body,
                          f"http://{server}/tandem.v1.GenerationService/GenerateStream"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "finishReason" in res.stdout and "tokenIds" in res.stdout


def test_sigterm_finishes_in_flight_streams_and_exits_zero() -> None:
    proc, target = start_server("--model", "tiny-llama", "--grace", "20")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            call = stub.GenerateStream(_greedy("long", 150))
            first = next(call)
            proc.send_signal(signal.SIGTERM)
            rest = list(call)
            assert (rest or [first])[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(r.token_ids) for r in [first, *rest]) == 150
        time.sleep(0.5)
        with grpc.insecure_channel(target) as channel:
            with pytest.raises(grpc.RpcError):
                pb_grpc.GenerationServiceStub(channel).Generate(
                    pb.GenerateRequest(text="late", stopping=pb.StoppingCriteria(max_new_tokens=2)), timeout=5)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
