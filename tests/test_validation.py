"""Every invalid input gets an error naming its field; other requests keep running."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from helpers import make_engine
from tandem.engine import (
    Engine,
    GenerationRequest,
    InvalidRequestError,
    OutputOptions,
    SamplingParams,
    StoppingCriteria,
)

S, T = SamplingParams, StoppingCriteria
CASES: list[tuple[str, dict[str, Any]]] = [
    ("prompt", dict(prompt="")),
    ("prompt", dict(prompt=[])),
    ("prompt.token_ids", dict(prompt=[5, 512])),
    ("prompt.token_ids", dict(prompt=[-1])),
    ("prompt", dict(prompt=[5] * 1024)),  # the context length of tiny-llama
    ("stopping.max_new_tokens", dict(stopping=T(max_new_tokens=0))),
    ("stopping.max_new_tokens", dict(stopping=T(max_new_tokens=2000))),
    ("stopping.min_new_tokens", dict(stopping=T(max_new_tokens=4, min_new_tokens=5))),
    ("stopping.stop_token_ids", dict(stopping=T(stop_token_ids=[99999]))),
    ("stopping.stop_strings", dict(stopping=T(stop_strings=[""]))),
    ("sampling.temperature", dict(sampling=S(temperature=-0.1))),
    ("sampling.temperature", dict(sampling=S(temperature=math.nan))),
    ("sampling.top_p", dict(sampling=S(top_p=0.0))),
    ("sampling.top_p", dict(sampling=S(top_p=1.5))),
    ("sampling.top_k", dict(sampling=S(top_k=-1))),
    ("sampling.min_p", dict(sampling=S(min_p=1.5))),
    ("sampling.repetition_penalty", dict(sampling=S(repetition_penalty=0.0))),
    ("sampling.presence_penalty", dict(sampling=S(presence_penalty=math.inf))),
    ("sampling.frequency_penalty", dict(sampling=S(frequency_penalty=3.0))),
    ("sampling.logit_bias", dict(sampling=S(logit_bias={600: 1.0}))),
    ("sampling.logit_bias[5]", dict(sampling=S(logit_bias={5: math.nan}))),
    ("sampling.seed", dict(sampling=S(seed=-3))),
    ("output.top_logprobs", dict(output=OutputOptions(top_logprobs=1000))),
]


@pytest.mark.parametrize("field,kwargs", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_invalid_request_names_its_field(engine: Engine, field, kwargs) -> None:
    request = GenerationRequest(**{"prompt": [5, 6, 7], **kwargs})
    with pytest.raises(InvalidRequestError) as info:
        engine.submit(request, lambda out: None)
    assert info.value.field == field
    assert field.split(".")[-1].split("[")[0] in str(info.value)


def test_prompt_over_kv_capacity_is_refused() -> None:
    with make_engine(model="tiny-llama", kv_blocks=4, block_size=16) as eng:
        assert eng.core.limits.kv_capacity_tokens == 64
        with pytest.raises(InvalidRequestError, match="KV cache") as info:
            eng.generate([[5] * 70])
        assert info.value.field == "prompt"
        with pytest.raises(InvalidRequestError, match="KV cache") as info:
            eng.generate([[5] * 40], stopping=StoppingCriteria(max_new_tokens=30))
        assert info.value.field == "stopping.max_new_tokens"


def test_bad_requests_do_not_disturb_running_ones(engine: Engine) -> None:
    done = threading.Event()
    parts = []

    def sink(out):
        parts.append(out)
        if out.finished:
            done.set()

    stop = StoppingCriteria(max_new_tokens=60, ignore_eos=True)
    engine.submit(GenerationRequest(list(range(3, 40)), SamplingParams(temperature=0), stop), sink)
    for _field, kwargs in CASES:
        with pytest.raises(InvalidRequestError):
            engine.submit(GenerationRequest(**{"prompt": [5, 6, 7], **kwargs}), lambda out: None)
    assert done.wait(60)
    tokens = [t for p in parts for t in p.token_ids]
    alone = engine.generate([list(range(3, 40))], SamplingParams(temperature=0), stop)[0]
    assert tokens == alone.token_ids and len(tokens) == 60


def test_abort_frees_blocks_and_is_idempotent(engine: Engine) -> None:
    import asyncio

    async def run():
        request = GenerationRequest([7] * 30, SamplingParams(temperature=0), StoppingCriteria(500, ignore_eos=True))
        request.request_id = "to-abort"
        outs = []
        async for out in engine.stream(request):
            outs.append(out)
            if len(outs) == 3:
                engine.abort("to-abort")
                engine.abort("to-abort")
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finish_reason.value == "aborted" and len(outs) < 100
    engine.abort("to-abort")
    engine.abort("never-existed")
    assert engine.generate([[1, 2, 3]], stopping=StoppingCriteria(max_new_tokens=2))[0].finish_reason
    assert engine.core.blocks.num_used == 0


def test_a_failing_consumer_does_not_stop_the_engine(engine: Engine) -> None:
    def broken(out):
        raise RuntimeError("consumer went away")

    engine.submit(GenerationRequest([9, 9, 9], stopping=StoppingCriteria(200, ignore_eos=True)), broken)
    out = engine.generate([[4, 5, 6]], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=5))[0]
    assert len(out.token_ids) >= 1
    engine.generate([[4]], stopping=StoppingCriteria(max_new_tokens=1))
    assert engine.core.num_requests == 0 and engine.core.blocks.num_used == 0
