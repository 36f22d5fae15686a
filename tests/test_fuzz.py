"""Property-based fuzzing of GenerateRequest against a real server: every request, however
malformed, gets OK, INVALID_ARGUMENT naming a field, or RESOURCE_EXHAUSTED for its size, and
the server stays healthy. TANDEM_FUZZ_EXAMPLES raises the case count (CI: 300)."""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import start_server
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("TANDEM_FUZZ_EXAMPLES", 300))
MAX_MESSAGE = 65536
FIELDS = ("text", "token_ids", "prompt", "request_id", "sampling.", "stopping.", "output.")
SEEN: dict[str, int] = {}

i32 = st.integers(-(2**31), 2**31 - 1)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(-3, 3, width=32))


def _opt(strategy):
    return st.one_of(st.none(), strategy)


def _field(valid: bool, good, bad):
    """A field's strategy: in range when the request is meant to be valid, anything otherwise."""
    return good if valid else st.one_of(good, bad)


def _pick(draw, valid: bool, good, bad):
    return draw(_field(valid, good, bad))


@st.composite
def requests(draw) -> pb.GenerateRequest:
    """Half the requests draw every field from its valid range (random values still); the other
    half may put anything anywhere: NaN, infinities, huge and negative numbers, out-of-vocabulary
    ids, huge lists and maps, empty and oversized prompts, control characters."""
    valid = draw(st.booleans())
    msg = pb.GenerateRequest()
    prompt = draw(st.sampled_from(["text", "ids"] if valid else ["text", "ids", "none", "huge"]))
    if prompt == "text":
        msg.text = _pick(draw, valid, st.text(min_size=1, max_size=200), st.just(""))
    elif prompt == "ids":
        ids = _pick(draw, valid, st.lists(st.integers(0, 511), min_size=1, max_size=60), st.lists(i32, max_size=60))
        msg.token_ids.ids.extend(ids)
    elif prompt == "huge":
        msg.token_ids.ids.extend([300] * draw(st.sampled_from([2000, 40000])))  # over the context / the message limit
    if draw(st.booleans()):
        msg.request_id = _pick(
            draw,
            valid,
            st.text("abcdef0123456789-", min_size=1, max_size=40),
            st.one_of(st.text(max_size=20), st.just("r" * 5000)),
        )
    s = msg.sampling
    ranges = dict(
        temperature=(0, 2),
        top_p=(0.01, 1),
        min_p=(0, 1),
        repetition_penalty=(0.5, 2),
        presence_penalty=(-2, 2),
        frequency_penalty=(-2, 2),
    )
    for name, (lo, hi) in ranges.items():
        value = draw(_opt(st.floats(lo, hi) if valid else floats))
        if value is not None:
            setattr(s, name, value)
    if (k := draw(_opt(_field(valid, st.integers(0, 50), i32)))) is not None:
        s.top_k = k
    if (seed := draw(_opt(st.integers(0, 2**64 - 1)))) is not None:
        s.seed = seed
    bias = _pick(
        draw,
        valid,
        st.dictionaries(st.integers(0, 511), st.floats(-100, 100), max_size=3),
        st.dictionaries(i32, floats, max_size=draw(st.sampled_from([3, 400]))),
    )
    for token, value in bias.items():
        s.logit_bias[token] = value
    t = msg.stopping
    if (n := draw(_opt(_field(valid, st.integers(1, 32), i32)))) is not None:
        t.max_new_tokens = n
    if (n := draw(_opt(_field(valid, st.integers(0, 1), i32)))) is not None:
        t.min_new_tokens = n
    t.stop_strings.extend(
        _pick(
            draw,
            valid,
            st.lists(st.text(min_size=1, max_size=8), max_size=2),
            st.lists(st.one_of(st.text(max_size=8), st.just("x" * 300)), max_size=draw(st.sampled_from([2, 20]))),
        )
    )
    t.stop_token_ids.extend(
        _pick(
            draw,
            valid,
            st.lists(st.integers(0, 511), max_size=2),
            st.lists(i32, max_size=draw(st.sampled_from([2, 80]))),
        )
    )
    t.ignore_eos = draw(st.booleans())
    msg.output.logprobs = draw(st.booleans())
    msg.output.top_logprobs = _pick(draw, valid, st.integers(0, 20), i32)
    msg.priority = draw(i32)
    return msg


@pytest.fixture(scope="module")
def fuzz_target():
    proc, target = start_server(
        "--model", "tiny-llama", "--max-new-tokens", "32", "--max-message-bytes", str(MAX_MESSAGE)
    )
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 1 << 24)])
    yield pb_grpc.GenerationServiceStub(channel), channel
    channel.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(msg=requests())
def test_every_request_gets_a_precise_status(fuzz_target, msg) -> None:
    stub, _ = fuzz_target
    try:
        response = stub.Generate(msg, timeout=60)
        code = grpc.StatusCode.OK
        assert 1 <= len(response.token_ids) <= 32
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            status = rpc_status.from_call(exc)
            bad = error_details_pb2.BadRequest()
            assert status is not None and status.details[0].Unpack(bad), exc.details()
            field = bad.field_violations[0].field
            assert field.startswith(FIELDS), field
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert msg.ByteSize() > MAX_MESSAGE, exc.details()  # only the size limit, never the queue here
        else:
            pytest.fail(f"{code.name}: {exc.details()}")
    SEEN[code.name] = SEEN.get(code.name, 0) + 1


def test_server_is_healthy_after_the_fuzzing(fuzz_target) -> None:
    stub, channel = fuzz_target
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = stub.Generate(
        pb.GenerateRequest(text="still here", stopping=pb.StoppingCriteria(max_new_tokens=3)), timeout=30
    )
    assert len(ok.token_ids) >= 1
    print(f"\nfuzz: {sum(SEEN.values())} cases: {SEEN}")
    assert sum(SEEN.values()) >= EXAMPLES and {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(SEEN)
