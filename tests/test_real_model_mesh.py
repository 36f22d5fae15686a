"""The real default model behind smg, reached as users reach OpenAI: one `tandem serve` with no
--model (SmolLM2-135M-Instruct), a real `smg launch` in front, the official openai SDK, and
guidellm (a load tool users already run against OpenAI endpoints), shared by the module."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from helpers import BIN, start_server
from tandem.bench.mesh import Router, start_router
from tandem.engine.config import DEFAULT_MODEL
from tandem.engine.model.loader import resolve_path

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def replica() -> Iterator[str]:
    proc, target = start_server()  # the default model
    yield target
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def router(replica: str) -> Iterator[Router]:
    router = start_router(DEFAULT_MODEL, [replica], "cache_aware")
    yield router
    router.stop()


def test_tandem_v1_messages_use_the_models_template_and_eos(replica: str) -> None:
    """GenerateStream with chat messages: the template's system prompt is added, <|im_end|>
    (the model's EOS) ends the answer and never appears in the text; GetModelInfo reports the
    file's EOS and context."""
    import grpc

    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc as pb_grpc
    from tandem.v1 import info_pb2, info_pb2_grpc

    with grpc.insecure_channel(replica) as ch:
        messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=QUESTION[0]["content"])])
        stopping = pb.StoppingCriteria(max_new_tokens=40)
        request = pb.GenerateStreamRequest(
            messages=messages, sampling=pb.SamplingParams(temperature=0), stopping=stopping
        )
        responses = list(pb_grpc.GenerationServiceStub(ch).GenerateStream(request, timeout=120))
        info = info_pb2_grpc.InfoServiceStub(ch).GetModelInfo(info_pb2.GetModelInfoRequest(), timeout=10)
    text = "".join(r.text for r in responses)
    assert "Paris" in text and "<|im_" not in text
    assert responses[-1].finish_reason == pb.FINISH_REASON_EOS
    assert responses[-1].usage.prompt_tokens > 30  # "You are a helpful AI assistant named SmolLM, ..."
    assert list(info.eos_token_ids) == [2] and info.context_length == 8192 and info.vocab_size == 49152


def _client(router: Router) -> Any:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_chat_completion_answers_a_factual_question_streamed_and_not(router: Router) -> None:
    client = _client(router)
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=40)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text and reply.choices[0].finish_reason == "stop"  # <|im_end|>, the model's EOS
    assert "<|im_" not in text
    # The template's system prompt and turn markers come before the 7-word question.
    assert reply.usage.prompt_tokens > 30
    parts, finish = [], None
    for chunk in client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, temperature=0, max_tokens=40, stream=True
    ):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert ("".join(parts), finish) == (text, "stop")


def test_a_json_schema_answer_parses_and_carries_the_fact(router: Router) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    reply = _client(router).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        temperature=0,
        max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
    )
    answer = json.loads(reply.choices[0].message.content or "")
    assert set(answer) == {"country", "capital"} and "Paris" in answer["capital"]


def test_guidellm_drives_it_through_smg_without_errors(router: Router, tmp_path: Path) -> None:
    out = tmp_path / "guidellm.json"
    cmd = [
        str(BIN / "guidellm"), "run",
        "--backend", f"kind=openai_http,target={router.url},model={DEFAULT_MODEL}",
        "--profile", "kind=concurrent,streams=4",
        "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
        "--tokenizer", f"kind=huggingface_auto,model={resolve_path(DEFAULT_MODEL)}",
        "--constraint", "kind=max_requests,count=16",
        "--output", f"kind=json,path={out}",
        "--disable-progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    requests = json.loads(out.read_text())["benchmarks"][0]["requests"]
    assert (len(requests["successful"]), len(requests["errored"]), len(requests["incomplete"])) == (16, 0, 0)
