"""tandem behind SGLang Model Gateway (smg, pinned in the test extra), reached with the official
OpenAI SDK: two real `tandem serve` replicas and a real `smg launch` (cache-aware, following the
replicas' KV events), shared by the module."""

from __future__ import annotations

import hashlib
import io
import signal
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vgrpc

from helpers import ServerProcess, assert_aborted_and_freed, replica_load, start_server
from tandem.bench.mesh import Router, start_router
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc as pb_grpc

MODEL = "tiny-llama"


@dataclass
class Mesh:
    replicas: list[tuple[ServerProcess, str]]
    router: Router

    def client(self, **kw: Any) -> Any:  # the SDK's overloads do not take **kwargs dicts
        return openai.OpenAI(base_url=f"{self.router.url}/v1", api_key="unused", max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    replicas = [start_server("--model", MODEL) for _ in range(2)]
    try:
        router = start_router(MODEL, [t for _, t in replicas], "cache_aware")
    except BaseException:
        for proc, _ in replicas:
            proc.kill()
        raise
    yield Mesh(replicas, router)
    router.stop()
    for proc, _ in replicas:
        proc.kill()
        proc.wait(10)


def direct_text(target: str, prompt: str, max_new: int) -> str:
    with grpc.insecure_channel(target) as ch:
        msg = pb.GenerateRequest(
            text=prompt,
            sampling=pb.SamplingParams(temperature=0),
            stopping=pb.StoppingCriteria(max_new_tokens=max_new, ignore_eos=True),
        )
        return pb_grpc.GenerationServiceStub(ch).Generate(msg, timeout=30).text


def streamed(stream: Any) -> tuple[str, str | None, Any]:
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            parts.append(getattr(choice, "text", None) or getattr(getattr(choice, "delta", None), "content", "") or "")
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return "".join(parts), finish, usage


def test_openai_chat_and_completions_streaming_and_not(mesh: Mesh) -> None:
    client = mesh.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    ask = dict(model=MODEL, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "hello there"}], **ask)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 10
    # The preset's chat template wraps the turn: more prompt tokens than the bare text.
    bare = client.completions.create(prompt="hello there", **ask)
    assert chat.usage.prompt_tokens > bare.usage.prompt_tokens
    text, finish, usage = streamed(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "hello there"}],
            stream=True,
            stream_options={"include_usage": True},
            **ask,
        )
    )
    assert (text, finish) == (chat.choices[0].message.content, "length")
    assert usage.completion_tokens == 10 and usage.prompt_tokens == chat.usage.prompt_tokens
    text, finish, usage = streamed(
        client.completions.create(prompt="hello there", stream=True, stream_options={"include_usage": True}, **ask)
    )
    assert (text, finish, usage.completion_tokens) == (bare.choices[0].text, "length", 10)


def test_stop_strings_are_matched_in_the_worker(mesh: Mesh) -> None:
    client = mesh.client()
    ask = dict(model=MODEL, prompt="The quick brown fox", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=16, **ask).choices[0].text
    stop = full[6:9]
    assert stop and full.find(stop) == 6, full
    cut = client.completions.create(max_tokens=16, stop=[stop], **ask)
    assert cut.choices[0].text == full[:6] and cut.choices[0].finish_reason == "stop"
    assert (cut.choices[0].model_extra or {}).get("matched_stop") == stop  # what smg reports from the worker
    assert cut.usage.completion_tokens < 16
    text, finish, _ = streamed(client.completions.create(max_tokens=16, stop=[stop], stream=True, **ask))
    assert (text, finish) == (full[:6], "stop")


def test_the_same_greedy_tokens_through_smg_and_directly(mesh: Mesh) -> None:
    prompt = "Routers tokenize; replicas generate."
    via_router = mesh.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    for _, target in mesh.replicas:
        assert direct_text(target, prompt, 12) == via_router.choices[0].text


def test_unsupported_fields_are_refused_by_name(mesh: Mesh) -> None:
    target = mesh.replicas[0][1]
    with grpc.insecure_channel(target) as ch:
        stub = vgrpc.VllmEngineStub(ch)
        cases = {
            "sampling_params.structural_tag": vpb.SamplingParams(structural_tag="{}"),
            "sampling_params.json_schema": vpb.SamplingParams(json_schema="{not json"),
            "sampling_params.regex": vpb.SamplingParams(regex="[a-"),
            "sampling_params.prompt_logprobs": vpb.SamplingParams(prompt_logprobs=1),
            "sampling_params.max_tokens": vpb.SamplingParams(max_tokens=5000),
        }
        for field, params in cases.items():
            msg = vpb.GenerateRequest(request_id=f"bad-{field}", tokenized=vpb.TokenizedInput(input_ids=[5, 6]))
            msg.sampling_params.CopyFrom(params)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(msg, timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(field), err.value.details()
        health = stub.HealthCheck(vpb.HealthCheckRequest(), timeout=5)
        assert health.healthy
    # The server is still serving through the router.
    assert mesh.client().completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_a_client_that_disconnects_has_its_request_aborted_on_the_replica(mesh: Mesh) -> None:
    client = mesh.client()
    stream = client.completions.create(
        model=MODEL, prompt="a long story", max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert_aborted_and_freed(mesh.replicas)  # cut short, not run to its 900 tokens


def test_kv_events_show_the_blocks_a_request_left_in_the_cache(mesh: Mesh) -> None:
    """What smg's cache-aware policy reads: after a request, its prompt's full blocks are
    stored, each chained to the one before, with their tokens."""
    target = mesh.replicas[0][1]
    prompt = list(range(100, 140))  # 40 tokens: two full blocks of 16
    with grpc.insecure_channel(target) as ch:
        call = vgrpc.VllmEngineStub(ch).SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=30)
        first = next(call)
        assert first.events[0].HasField("cleared") and first.sequence_number == 1
        pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), stopping=pb.StoppingCriteria(max_new_tokens=2)),
            timeout=30,
        )
        stored: list[common_pb2.KvBlocksStored] = []
        for batch in call:
            stored += [e.stored for e in batch.events if e.HasField("stored")]
            if sum(len(s.blocks) for s in stored) >= 2:
                break
        call.cancel()
    mine = [s for s in stored if list(s.blocks[0].token_ids) in (prompt[:16], prompt[16:32])]
    assert [list(s.blocks[0].token_ids) for s in mine] == [prompt[:16], prompt[16:32]]
    assert not mine[0].HasField("parent_block_hash")
    assert mine[1].parent_block_hash == mine[0].blocks[0].block_hash
    # The router follows the same stream: it has applied stored blocks from the replicas.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(mesh.router.metrics, timeout=5).read().decode()
        rows = [line for line in text.splitlines() if line.startswith("smg_kv_event_blocks_total{")]
        stored_by_router = sum(float(line.split()[-1]) for line in rows if 'op="stored"' in line)
        if stored_by_router >= 2:
            break
        time.sleep(0.5)
    assert stored_by_router >= 2, text[-2000:]


def test_model_info_tokenizer_bundle_and_loads_for_the_router(mesh: Mesh) -> None:
    """What smg reads from a worker: its model and tokenizer (as a zip when the router cannot
    see the path) and its load, while a stream runs."""
    target = mesh.replicas[0][1]
    with grpc.insecure_channel(target) as ch:
        stub = vgrpc.VllmEngineStub(ch)
        info = stub.GetModelInfo(vpb.GetModelInfoRequest(), timeout=10)
        assert info.served_model_name == MODEL and info.max_context_length == 1024 and list(info.eos_token_ids) == [1]
        chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=30))
        data = b"".join(c.data for c in chunks)
        assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
        names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
        assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
        assert Path(info.tokenizer_path, "tokenizer.json").read_bytes() == zipfile.ZipFile(io.BytesIO(data)).read(
            "tokenizer.json"
        )
        running = pb_grpc.GenerationServiceStub(ch).GenerateStream(
            pb.GenerateStreamRequest(text="busy", stopping=pb.StoppingCriteria(max_new_tokens=800, ignore_eos=True))
        )
        next(running)
        load = stub.GetLoads(vpb.GetLoadsRequest(), timeout=10).loads[0]
        assert load.num_running_reqs >= 1 and 0 < load.token_usage <= 1 and load.max_total_num_tokens > 0
        running.cancel()


def test_killing_a_replica_under_load(mesh: Mesh) -> None:
    """Last in the module: it kills a replica (SIGKILL) while streams run on it, on both where the
    router spread them within 5 s (cache-aware routing may keep these similar prompts on one).
    Streams on the dead one end in an error the client sees; those on the survivor finish;
    requests sent afterwards all succeed through the survivor."""
    client = mesh.client()
    results: list[str] = []

    def stream_one(i: int) -> None:
        try:
            text, finish, _ = streamed(
                client.completions.create(
                    model=MODEL, prompt=f"load {i}", max_tokens=800, stream=True, extra_body={"ignore_eos": True}
                )
            )
            results.append("finished" if finish in ("length", "stop") else f"cut short: {finish!r}")
        except openai.OpenAIError as exc:
            results.append(f"error: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=stream_one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started, running = time.monotonic(), {}
    while time.monotonic() - started < 20:
        running = {t: replica_load(t).running for _, t in mesh.replicas}
        if all(running.values()) or (any(running.values()) and time.monotonic() - started > 5):
            break
        time.sleep(0.05)
    victim, victim_target = max(mesh.replicas, key=lambda r: running.get(r[1], 0))
    on_victim = running.get(victim_target, 0)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    for t in threads:
        t.join(120)
    failed = [r for r in results if r != "finished"]
    print(f"on the killed replica: {on_victim} streams; outcomes: {results}")
    assert 1 <= len(failed) <= on_victim and len(results) == 6, (on_victim, results)
    assert all(r.startswith("error: ") for r in failed), failed  # a clear error, not a silent truncation
    after = [client.completions.create(model=MODEL, prompt=f"after {i}", max_tokens=4, temperature=0) for i in range(6)]
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in after)


def test_openai_response_format_json_schema_and_n(mesh: Mesh) -> None:
    import json

    import jsonschema

    client = mesh.client()
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"enum": ["cheap", "quiet", "central"]}, "maxItems": 3},
        },
        "required": ["city", "rating"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "review a hotel as JSON"}],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)

    ask = dict(model=MODEL, max_tokens=8, temperature=1.0, seed=4, extra_body={"ignore_eos": True})
    one = client.completions.create(prompt="three ways", **ask)
    three = client.completions.create(prompt="three ways", n=3, **ask)
    assert sorted(c.index for c in three.choices) == [0, 1, 2]
    assert len({c.text for c in three.choices}) == 3  # independent samples, not copies
    assert three.usage.prompt_tokens == one.usage.prompt_tokens and three.usage.completion_tokens == 24
    parts: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        messages=[{"role": "user", "content": "three ways"}], n=3, stream=True, **ask
    ):
        for choice in chunk.choices:
            parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(parts) == [0, 1, 2]
    # n samples and a schema together: every sample validates.
    both = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "review a hotel as JSON"}],
        max_tokens=120,
        temperature=1.0,
        n=3,
        response_format=response_format,
    )
    assert len(both.choices) == 3
    for choice in both.choices:
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
