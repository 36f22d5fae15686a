"""The engine on the real default model (SmolLM2-135M-Instruct, dequantized from its GGUF) in
float32, against transformers' own float32 model, tie-aware: a token differing from the
reference's greedy choice counts only where the reference's top-2 margin exceeds TOL.

Real chat prompts share the template's system prompt, so every engine here also hits the prefix
cache; `max_batch_tokens` below the prompts' length chunks every prefill."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import assert_greedy_matches, make_engine, reference_model
from tandem.engine import (
    Constraint,
    ConstraintKind,
    Engine,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StoppingCriteria,
)
from tandem.engine.model.loader import resolve_path

MODEL = "smollm2-135m"
# float32 paged attention against transformers' eager float32: measured differences in the
# logits are ~1e-5; a flip where the reference leads by more than this is a wrong token.
TOL = 1e-3
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "Translate 'good morning' into French.",
]
SCHEDULERS = ["fcfs", "prefill-priority", "async-overlap", "priority", "fair-share", "deadline"]
SMALL: dict[str, Any] = dict(model=MODEL, device="cpu", dtype="float32", block_size=16, kv_blocks=96)


@pytest.fixture(scope="module")
def reference() -> Any:
    return reference_model(resolve_path(MODEL))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(MODEL))
    return [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = make_engine(**SMALL, max_batch_tokens=32, max_num_seqs=4)
    yield eng
    eng.shutdown()


def _check(prompts: list[list[int]], got: list[list[int]], reference: Any) -> None:
    for p, tokens in zip(prompts, got):
        assert tokens, "no tokens"
        assert_greedy_matches(p, tokens, reference, TOL)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_greedy_is_transformers_choice_under_every_scheduler(scheduler: str, prompts, reference) -> None:
    """Chunked prefill (32 tokens a step against ~45-token prompts), 4 of 6 at a time, the
    system prompt's blocks from the prefix cache, and EOS (<|im_end|>) ending each answer."""
    with make_engine(scheduler, **SMALL, max_batch_tokens=32, max_num_seqs=4) as eng:
        done = eng.generate(prompts, SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24))
    _check(prompts, [d.token_ids for d in done], reference)
    assert sum(d.num_cached_tokens for d in done) > 0  # the shared system prompt
    assert any(d.finish_reason == FinishReason.EOS for d in done)
    assert all("<|im_end|>" not in d.text and "<|im_start|>" not in d.text for d in done)


def test_the_answers_are_right(engine: Engine, prompts) -> None:
    """Questions a 135M model gets right (it also says Neptune is the largest planet)."""
    done = engine.generate(prompts[:4], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=48))
    assert "Paris" in done[0].text and done[0].finish_reason == FinishReason.EOS
    assert all(color in done[1].text for color in ("Red", "Blue", "Yellow"))
    assert "Shakespeare" in done[3].text


def test_a_second_pass_hits_the_prefix_cache_and_changes_nothing(engine: Engine, prompts, reference) -> None:
    stop = StoppingCriteria(max_new_tokens=12, ignore_eos=True)
    first = engine.generate(prompts, SamplingParams(temperature=0), stop)
    again = engine.generate(prompts, SamplingParams(temperature=0), stop)
    assert [d.token_ids for d in again] == [d.token_ids for d in first]
    assert all(d.num_cached_tokens >= len(p) - 16 for d, p in zip(again, prompts))  # all but the last block
    _check(prompts, [d.token_ids for d in again], reference)


def test_preemption_keeps_greedy_outputs(prompts, reference) -> None:
    """12 blocks of 16 tokens for six ~70-token sequences: some must give theirs back and redo them."""
    config = dict(SMALL, kv_blocks=12, max_batch_tokens=256, max_num_seqs=6)
    with make_engine(**config) as eng:
        done = eng.generate(
            prompts, SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=24, ignore_eos=True)
        )
        assert eng.core.num_preemptions > 0
    _check(prompts, [d.token_ids for d in done], reference)


def test_n_samples_share_the_prompt_and_each_is_its_own_seeded_request(engine: Engine, prompts, reference) -> None:
    async def run(request: GenerationRequest) -> dict[int, list[int]]:
        got: dict[int, list[int]] = {}
        async for out in engine.stream(request):
            got.setdefault(out.index, []).extend(out.token_ids)
        return got

    stop = StoppingCriteria(max_new_tokens=12, ignore_eos=True)
    greedy = asyncio.run(run(GenerationRequest(prompts[1], SamplingParams(temperature=0), stop, n=2)))
    assert greedy[0] == greedy[1]
    _check([prompts[1]], [greedy[0]], reference)
    sampled = asyncio.run(run(GenerationRequest(prompts[1], SamplingParams(temperature=1.0, seed=7), stop, n=3)))
    alone = [asyncio.run(run(GenerationRequest(prompts[1], SamplingParams(temperature=1.0, seed=7 + i), stop)))[0]
             for i in range(3)]  # fmt: skip
    assert [sampled[i] for i in range(3)] == alone
    assert len({tuple(t) for t in alone}) > 1


def test_a_json_schema_answer_parses_and_carries_the_fact(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    prompt = asyncio.run(
        engine.render_chat([{"role": "user", "content": "What is the capital of France? Answer in JSON."}])
    )
    done = engine.generate(
        [prompt],
        SamplingParams(temperature=0),
        StoppingCriteria(max_new_tokens=64),
        constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)),
    )[0]
    answer = json.loads(done.text)
    assert set(answer) == {"country", "capital"} and "Paris" in answer["capital"]
    assert done.finish_reason == FinishReason.EOS


def test_tensor_parallel_over_two_ranks_is_refused_by_the_head_counts() -> None:
    """SmolLM2 has 9 attention and 3 KV heads: two ranks cannot split them, refused by name
    before loading. (Three could, but tensor parallelism on the CPU wants a core per rank and this
    machine has two: TP is proven on the presets, tests/test_tensor_parallel.py.)"""
    from tandem.engine.model.loader import check_tensor_parallel

    with pytest.raises(ValueError, match=r"tensor_parallel 2 must divide .* heads \(9\) and KV heads \(3\)"):
        check_tensor_parallel(MODEL, 2)
    check_tensor_parallel(MODEL, 3)
