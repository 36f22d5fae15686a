"""The gRPC service, through a real server process on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from smg_grpc_proto.generated import vllm_engine_pb2 as vllm_pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vllm_grpc
from xds.data.orca.v3.orca_load_report_pb2 import OrcaLoadReport

from helpers import METRICS, make_engine, server_log, start_server
from tandem.engine import InvalidRequestError, SamplingParams, StoppingCriteria
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server():
    proc, target = start_server("--model", "tiny-llama", "--metrics-port", "0")
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
    return pb.GenerateStreamRequest(
        text=text,
        sampling=pb.SamplingParams(temperature=0),
        stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
        **kw,
    )


def test_stream_and_unary_equal_the_offline_engine(stub, offline) -> None:
    want = offline.generate(
        ["Once upon a time"], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24, ignore_eos=True)
    )[0]
    call = stub.GenerateStream(_greedy("Once upon a time", 24), metadata=(("x-request-id", "abc-123"),))
    responses = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    assert responses[0].HasField("prompt_tokens") and responses[0].request_id == "abc-123"
    assert [t for r in responses for t in r.token_ids] == want.token_ids
    assert "".join(r.text for r in responses) == want.text
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 24
    assert last.timings.time_to_first_token_seconds > 0
    assert 0 < last.timings.queue_seconds <= last.timings.time_to_first_token_seconds
    unary = stub.Generate(
        pb.GenerateRequest(
            text="Once upon a time",
            sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_new_tokens=24, ignore_eos=True),
        )
    )
    assert list(unary.token_ids) == want.token_ids and unary.text == want.text


def test_tokenize(stub, offline) -> None:
    got = stub.Tokenize(pb.TokenizeRequest(text="héllo 😀"))
    assert list(got.token_ids) == offline.tokenizer.encode("héllo 😀", add_special_tokens=False)


@pytest.mark.parametrize(
    "request_kwargs,field",
    [
        (dict(text="hi", sampling=pb.SamplingParams(top_p=2.0)), "sampling.top_p"),
        (dict(), "prompt"),
        (dict(text=""), "text"),
        (dict(token_ids=pb.TokenIds(ids=[5, 99999])), "token_ids.ids"),
        (dict(text="hi", stopping=pb.StoppingCriteria(max_new_tokens=0)), "stopping.max_new_tokens"),
        (dict(text="hi", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
        (dict(text="hi", ttft_target_s=-1.0), "ttft_target_s"),
    ],
)
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
    want = offline.generate(
        ["steady"], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=40, ignore_eos=True)
    )[0].token_ids
    result: dict[str, Any] = {}
    steady = threading.Thread(
        target=lambda: result.setdefault(
            "tokens", [t for r in stub.GenerateStream(_greedy("steady", 40)) for t in r.token_ids]
        )
    )
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
    res = subprocess.run(
        [
            str(BIN / "buf"),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            body,
            f"http://{server}/tandem.v1.GenerationService/GenerateStream",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
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
                    pb.GenerateRequest(text="late", stopping=pb.StoppingCriteria(max_new_tokens=2)), timeout=5
                )
        assert proc.wait(30) == 0
        events = [json.loads(line) for line in server_log(proc).splitlines() if line.startswith("{")]
        finished = [e for e in events if e["event"] == "request_finished"]
        assert finished and finished[0]["completion_tokens"] == 150 and finished[0]["request_id"]
        assert {"serving", "draining", "stopped"} <= {e["event"] for e in events}
    finally:
        proc.kill()


def _info(target: str):
    from tandem.v1 import info_pb2, info_pb2_grpc

    channel = grpc.insecure_channel(target)
    return info_pb2, info_pb2_grpc.InfoServiceStub(channel)


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_info_service_and_blocks_back_after_cancel(server, stub) -> None:
    info_pb2, info = _info(server)
    model = info.GetModelInfo(info_pb2.GetModelInfoRequest())
    assert (model.name, model.architecture, model.context_length, model.vocab_size) == (
        "tiny-llama",
        "LlamaForCausalLM",
        1024,
        512,
    )
    assert list(model.eos_token_ids) == [1] and model.dtype == "float32" and model.device == "cpu"
    assert model.attention in ("cpu-kernel", "gather") and list(model.cuda_graph_buckets) == []  # no CUDA here
    server_info = info.GetServerInfo(info_pb2.GetServerInfoRequest())
    assert server_info.scheduler == "fcfs" and server_info.max_waiting == 1024 and server_info.kv_blocks > 0
    call = stub.GenerateStream(_greedy("hold some blocks", 500))
    next(call)
    assert info.GetLoad(info_pb2.GetLoadRequest()).kv_blocks_used > 0
    call.cancel()
    assert _wait_for(lambda: info.GetLoad(info_pb2.GetLoadRequest()).kv_blocks_used == 0)
    with pytest.raises(grpc.RpcError) as err:  # a deadline that expires mid-stream frees them too
        for _ in stub.GenerateStream(_greedy("deadline", 900), timeout=0.3):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_for(lambda: info.GetLoad(info_pb2.GetLoadRequest()).kv_blocks_used == 0)
    load = info.GetLoad(info_pb2.GetLoadRequest())
    assert load.running == 0 and load.waiting == 0 and load.output_tokens_per_second > 0


FLOOD = """
import sys, grpc
from tandem.v1 import generation_pb2 as pb, generation_pb2_grpc as pb_grpc
target, rounds = sys.argv[1], int(sys.argv[2])
huge = "lorem ipsum " * 290_000  # ~3.5 MB: under the 4 MiB message cap, far over the prompt limit
codes = []
with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
    stub = pb_grpc.GenerationServiceStub(channel)
    for _ in range(rounds):
        try:
            stub.Generate(pb.GenerateRequest(text=huge), timeout=60)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name + ":" + (exc.details() or "")[:40])
print(codes)
"""


def _worst_gap(stub: pb_grpc.GenerationServiceStub, n: int) -> float:
    """The longest wait for a stream's next message, the first one's from the call included
    (a stalled server delivers late, and then everything at once)."""
    last, worst = time.perf_counter(), 0.0
    for _ in stub.GenerateStream(_greedy("gaps", n)):
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    return worst


def test_huge_prompts_do_not_stall_other_streams(server: str) -> None:
    """Prompts are tokenized off the event loop, and a text that cannot fit the prompt limit
    is refused before tokenizing: a flood of ~3.5 MB prompts leaves other streams flowing."""
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        alone = min(_worst_gap(stub, 120) for _ in range(2))
        floods = [
            subprocess.Popen([sys.executable, "-c", FLOOD, server, "6"], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        time.sleep(0.5)  # the floods are under way
        flooded = _worst_gap(stub, 120)
        outputs = [f.communicate(timeout=120)[0] for f in floods]
    for out in outputs:
        assert out.count("INVALID_ARGUMENT:text:") == 6, out
    print(f"\nworst gap alone {alone * 1e3:.1f} ms, under the flood {flooded * 1e3:.1f} ms")
    assert flooded < max(5 * alone, 0.25)


def test_port_opens_first_and_health_says_not_serving_while_loading(tmp_path: Path) -> None:
    """On a fresh preset cache the model takes seconds to build: probes must see NOT_SERVING
    (not connection refused) and RPCs UNAVAILABLE until it is loaded and warmed up."""
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path)}
    args = [str(Path(sys.executable).parent / "tandem"), "serve", "--port", "0", "--model", "tiny-llama"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("tandem starting on"), first
        target = first.split()[3]
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            vllm = vllm_grpc.VllmEngineStub(channel)  # smg's worker protocol follows the same health
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not vllm.HealthCheck(vllm_pb.HealthCheckRequest(), timeout=10).healthy
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(text="early"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in (err.value.details() or "")
            seen = set()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest()).status
                seen.add(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                time.sleep(0.1)
            assert status == health_pb2.HealthCheckResponse.SERVING, seen
            assert vllm.HealthCheck(vllm_pb.HealthCheckRequest(), timeout=10).healthy
        assert proc.stdout.readline().startswith("tandem serving on")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_max_waiting_holds_exactly_under_a_burst() -> None:
    """Admission and enqueue are one step: concurrent handlers cannot all pass the check."""
    bound, burst = 4, 24
    proc, target = start_server("--model", "tiny-llama", "--max-num-seqs", "1", "--max-waiting", str(bound))
    try:
        info_pb2, info = _info(target)
        with grpc.insecure_channel(target) as channel:
            running = pb_grpc.GenerationServiceStub(channel).GenerateStream(_greedy("first", 1000))
            next(running)  # admitted: it holds the only sequence slot until cancelled
            assert _wait_for(lambda: info.GetLoad(info_pb2.GetLoadRequest()).running == 1)

            async def fire() -> list[str]:
                async with grpc.aio.insecure_channel(target) as aio:
                    stub = pb_grpc.GenerationServiceStub(aio)

                    async def one(i: int) -> str:
                        try:
                            req = pb.GenerateRequest(text=f"burst {i}", stopping=pb.StoppingCriteria(max_new_tokens=2))
                            await stub.Generate(req, timeout=120)
                            return "OK"
                        except grpc.aio.AioRpcError as exc:
                            return exc.code().name

                    calls = [asyncio.ensure_future(one(i)) for i in range(burst)]
                    # The refused answer at once; the admitted wait behind `running` until it ends.
                    while sum(c.done() for c in calls) < burst - bound:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.5)  # nothing further is refused or admitted meanwhile
                    assert sum(c.done() for c in calls) == burst - bound
                    assert (await asyncio.to_thread(info.GetLoad, info_pb2.GetLoadRequest())).waiting == bound
                    running.cancel()
                    return list(await asyncio.gather(*calls))

            codes = asyncio.run(fire())
        assert codes.count("OK") == bound and codes.count("RESOURCE_EXHAUSTED") == burst - bound, codes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_full_queue_gets_resource_exhausted_with_retry_info() -> None:
    proc, target = start_server("--model", "tiny-llama", "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        info_pb2, info = _info(target)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            running = stub.GenerateStream(_greedy("first", 1000))
            next(running)
            waiting = stub.GenerateStream(_greedy("second", 10))
            assert _wait_for(lambda: info.GetLoad(info_pb2.GetLoadRequest()).waiting == 1)
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(pb.GenerateRequest(text="third", stopping=pb.StoppingCriteria(max_new_tokens=2)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = error_details_pb2.RetryInfo()
            assert rpc_status.from_call(err.value).details[0].Unpack(retry) and retry.retry_delay.seconds == 1
            running.cancel()
            assert list(waiting)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_generate_target_streams_from_the_server(server, offline) -> None:
    want = offline.generate(
        ["Hello there"], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=16, ignore_eos=True)
    )[0]
    res = subprocess.run(
        [
            str(BIN / "tandem"),
            "generate",
            "Hello there",
            "--target",
            server,
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--stats",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == want.text + "\n" and "16 tokens" in res.stderr
    bad = subprocess.run(
        [str(BIN / "tandem"), "generate", "x", "--target", server, "--top-p", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "sampling.top_p" in bad.stderr


def test_prometheus_metrics(server, stub) -> None:
    import urllib.request

    list(stub.GenerateStream(_greedy("metrics", 4)))
    last = list(stub.GenerateStream(_greedy("metrics", 4), metadata=(("x-tenant-id", "acme-metrics"),)))[-1]
    stub.Generate(_greedy("metrics", 3), metadata=(("x-tenant-id", "acme-metrics"),))
    body = urllib.request.urlopen(f"http://{METRICS[server]}/metrics", timeout=10).read().decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[-1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert values['tandem_requests_total{code="OK",finish_reason="length"}'] >= 1
    # usage by tenant: this tenant's two requests exactly, the untagged ones under "(none)"
    acme = 'tandem_tenant_tokens_total{kind="%s",tenant="acme-metrics"}'
    assert values[acme % "completion"] == 7
    assert values[acme % "prompt"] == 2 * last.usage.prompt_tokens > 0
    assert values['tandem_tenant_tokens_total{kind="completion",tenant="(none)"}'] >= 4
    assert values["tandem_time_to_first_token_seconds_count"] >= 1
    assert values["tandem_steps_total"] > 0 and values["tandem_kv_blocks_total"] > 0
    for name in (
        "tandem_waiting_requests",
        "tandem_running_requests",
        "tandem_kv_usage_ratio",
        "tandem_prefix_cache_hit_ratio",
        "tandem_device_idle_ratio",
        "tandem_mean_step_tokens",
        "tandem_mean_step_seconds",
        "tandem_inter_token_latency_seconds_count",
        "tandem_e2e_latency_seconds_count",
    ):
        assert name in values, name


def _orca_via_buf(target: str, method: str, body: str) -> OrcaLoadReport:
    """gRPC's own clients consume `endpoint-load-metrics-bin` in their core (it is the ORCA
    key), so the trailer is read the way a proxy sees it: with buf curl (Go), verbosely."""
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "buf"),
            "curl",
            "-v",
            "--schema",
            str(Path(__file__).resolve().parents[1]),
            "--protocol",
            "grpc",
        ]
        + ["--http2-prior-knowledge", "-d", body, f"http://{target}/tandem.v1.GenerationService/{method}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "Endpoint-Load-Metrics-Bin:" in ln]
    assert lines, out.stderr
    value = lines[-1].split("Endpoint-Load-Metrics-Bin:")[1].strip()  # unpadded base64
    return OrcaLoadReport.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))


def test_each_generation_carries_an_orca_load_report(server, stub) -> None:
    """Envoy's load-aware balancing reads `endpoint-load-metrics-bin`: while a long stream holds
    KV blocks, a short request's report shows it running and the KV in use."""
    long = stub.GenerateStream(_greedy("a long one", 600))
    next(long)  # admitted and holding blocks
    body = '{"text": "a short one", "stopping": {"max_new_tokens": 2}}'
    for method in ("GenerateStream", "Generate"):
        report = _orca_via_buf(server, method, body)
        assert report.named_metrics["running_requests"] >= 1
        assert 0 < report.application_utilization <= 1
        assert report.utilization["kv_cache"] == report.application_utilization
        assert report.rps_fractional > 0
    long.cancel()


def test_the_last_response_says_which_stop_ended_it(stub) -> None:
    full = list(stub.GenerateStream(_greedy("where does it stop", 16)))
    text, ids = "".join(r.text for r in full), [t for r in full for t in r.token_ids]
    assert full[-1].WhichOneof("matched_stop") is None  # length: nothing matched
    stop = next(text[i : i + 3] for i in range(2, len(text) - 3) if text.find(text[i : i + 3]) == i)
    at = text.find(stop)

    def last(**stopping: Any) -> pb.GenerateStreamResponse:
        msg = _greedy("where does it stop", 16)
        for key, value in stopping.items():
            if isinstance(value, list):
                getattr(msg.stopping, key).extend(value)
            else:
                setattr(msg.stopping, key, value)
        parts = list(stub.GenerateStream(msg))
        unary = stub.Generate(pb.GenerateRequest(text=msg.text, sampling=msg.sampling, stopping=msg.stopping))
        assert unary.text == "".join(p.text for p in parts)
        assert unary.WhichOneof("matched_stop") == parts[-1].WhichOneof("matched_stop")
        parts[-1].text = unary.text  # the whole text, for the caller
        return parts[-1]

    cut = last(stop_strings=[stop])
    assert cut.finish_reason == pb.FINISH_REASON_STOP_STRING and cut.matched_stop_string == stop
    assert cut.text == text[:at]
    kept = last(stop_strings=[stop], include_stop_string=True)
    assert kept.matched_stop_string == stop and kept.text == text[: at + len(stop)]
    token = last(stop_token_ids=[ids[3]])
    assert token.finish_reason == pb.FINISH_REASON_STOP_TOKEN and token.matched_token_id == ids[3]


def test_chat_messages_are_rendered_with_the_models_template(stub) -> None:
    from transformers import AutoTokenizer

    from tandem.engine.model.presets import preset_path

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny-llama"))
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    stopping = pb.StoppingCriteria(max_new_tokens=6, ignore_eos=True)
    messages = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat])
    greedy = pb.SamplingParams(temperature=0)
    by_chat = list(stub.GenerateStream(pb.GenerateStreamRequest(messages=messages, sampling=greedy, stopping=stopping)))
    by_ids = list(
        stub.GenerateStream(
            pb.GenerateStreamRequest(token_ids=pb.TokenIds(ids=ids), sampling=greedy, stopping=stopping)
        )
    )
    assert by_chat[0].prompt_tokens == len(ids)  # the rendered prompt, counted
    assert [t for r in by_chat for t in r.token_ids] == [t for r in by_ids for t in r.token_ids]
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(messages=pb.ChatMessages(), stopping=stopping))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("messages:")


def test_a_model_without_a_chat_template_refuses_messages(tmp_path: Path) -> None:
    import shutil

    from tandem.engine.model.presets import preset_path

    model = tmp_path / "no-template"
    shutil.copytree(preset_path("tiny-llama"), model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    engine = make_engine(model=str(model))
    try:
        with pytest.raises(InvalidRequestError) as err:
            asyncio.run(engine.render_chat([{"role": "user", "content": "hi"}]))
        assert err.value.field == "messages" and "no chat template" in err.value.message
    finally:
        engine.shutdown()


def test_constraints_through_tandem_v1(stub) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    request = pb.GenerateStreamRequest(
        text="give json",
        sampling=pb.SamplingParams(temperature=1.0, seed=5),
        stopping=pb.StoppingCriteria(max_new_tokens=64),
        constraint=pb.Constraint(json_schema=json.dumps(schema)),
    )
    parts = list(stub.GenerateStream(request))
    assert parts[-1].finish_reason == pb.FINISH_REASON_EOS
    jsonschema.validate(json.loads("".join(p.text for p in parts)), schema)
    choices = ["alpha", "beta", "gamma delta"]
    for seed in range(3):
        reply = stub.Generate(
            pb.GenerateRequest(
                text="pick one",
                sampling=pb.SamplingParams(temperature=1.0, seed=seed),
                constraint=pb.Constraint(choice=pb.Choices(choices=choices)),
            )
        )
        assert reply.text in choices and reply.finish_reason == pb.FINISH_REASON_EOS


def test_fuzzed_constraints_are_refused_by_field_and_the_server_stays_healthy(stub, server) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    kinds = st.sampled_from(["json_schema", "regex", "grammar"])
    texts = st.one_of(
        st.text(max_size=30),
        st.sampled_from(['{"type": "object", "properties": ', "[a-", "(?<=x)y", "start: foo", "root ::= (", "{}"]),
        st.builds(json.dumps, st.recursive(st.none() | st.booleans() | st.text(max_size=5), st.lists, max_leaves=4)),
    )

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kind=kinds, text=texts)
    def check(kind: str, text: str) -> None:
        request = pb.GenerateRequest(text="x", stopping=pb.StoppingCriteria(max_new_tokens=3))
        setattr(request.constraint, kind, text)
        try:
            stub.Generate(request, timeout=60)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            bad = error_details_pb2.BadRequest()
            assert rpc_status.from_call(err).details[0].Unpack(bad)
            assert bad.field_violations[0].field == f"constraint.{kind}", err.details()

    check()
    with grpc.insecure_channel(server) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Generate(pb.GenerateRequest(text="still serving", stopping=pb.StoppingCriteria(max_new_tokens=2)))


def test_n_samples_through_tandem_v1(stub) -> None:
    request = pb.GenerateStreamRequest(
        text="three ways to say it",
        sampling=pb.SamplingParams(temperature=1.0, seed=40),
        stopping=pb.StoppingCriteria(max_new_tokens=8, ignore_eos=True),
        n=3,
    )
    parts = list(stub.GenerateStream(request))
    by_index: dict[int, list[int]] = {}
    for p in parts:
        by_index.setdefault(p.index, []).extend(p.token_ids)
    assert sorted(by_index) == [0, 1, 2] and all(len(t) == 8 for t in by_index.values())
    assert sum(1 for p in parts if p.finish_reason == pb.FINISH_REASON_LENGTH) == 3
    usage = parts[-1].usage
    assert usage.prompt_tokens == parts[0].prompt_tokens and usage.completion_tokens == 24  # the prompt once
    # Sample i is the request seeded seed + i.
    for i in range(3):
        alone = pb.GenerateRequest(text=request.text, sampling=pb.SamplingParams(temperature=1.0, seed=40 + i))
        alone.stopping.CopyFrom(request.stopping)
        assert list(stub.Generate(alone).token_ids) == by_index[i]
    unary = pb.GenerateRequest(text=request.text, sampling=request.sampling, stopping=request.stopping, n=3)
    reply = stub.Generate(unary)
    assert [list(s.token_ids) for s in reply.samples] == [by_index[i] for i in range(3)]
    assert list(reply.token_ids) == by_index[0] and reply.usage.completion_tokens == 24
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(text="x", n=1000))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and (err.value.details() or "").startswith("n:")


def test_tenant_labels_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """x-tenant-id is the client's to choose: past MAX_TENANTS names, tokens count as "(other)"."""
    from tandem.service import metrics

    monkeypatch.setattr(metrics, "MAX_TENANTS", 2)
    monkeypatch.setattr(metrics, "_tenants", set())
    for name in ("t-one", "t-two", "t-three", "t-one"):
        metrics.count_tenant_tokens(name, 5, 1)

    def value(tenant: str) -> float:
        labels = {"tenant": tenant, "kind": "prompt"}
        return metrics.REGISTRY.get_sample_value("tandem_tenant_tokens_total", labels) or 0

    assert (value("t-one"), value("t-two"), value("t-three")) == (10, 5, 0)
    assert value("(other)") >= 5
