"""Sampling: seeded determinism under batching, filters, penalties, bias, logprobs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from helpers import random_prompts, reference_model
from tandem.engine import Engine, OutputOptions, SamplingParams, StoppingCriteria
from tandem.engine.device.sampling import SampleSpec, SamplingTensors, apply_processors, build_sampling, sample
from tandem.engine.request import GenerationRequest, TokenLogprob

STOP = StoppingCriteria(max_new_tokens=16, ignore_eos=True)


def test_seeded_request_same_alone_and_in_busy_batch(engine: Engine) -> None:
    prompt = list(range(10, 40))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate([prompt], params, STOP)[0].token_ids
    rng = np.random.default_rng(5)
    others = random_prompts(rng, 11, 1, 60)
    mixed = [SamplingParams(temperature=t) for t in (0.0, 0.5, 1.3)] * 4
    batch = engine.generate(others[:5] + [prompt] + others[5:], mixed[:5] + [params] + mixed[5:11], STOP)
    assert batch[5].token_ids == alone
    again = engine.generate([prompt], params, STOP)[0].token_ids
    assert again == alone


def test_different_seeds_differ(engine: Engine) -> None:
    prompt = list(range(10, 40))
    outs = engine.generate([prompt] * 4, [SamplingParams(temperature=1.0, seed=s) for s in range(4)], STOP)
    assert len({tuple(o.token_ids) for o in outs}) == 4


def test_filters_that_leave_one_token_equal_greedy(engine: Engine) -> None:
    prompt = list(range(50, 70))
    greedy = engine.generate([prompt], SamplingParams(temperature=0), STOP)[0].token_ids
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=1),
        SamplingParams(temperature=1.5, top_p=1e-9, seed=2),
        SamplingParams(temperature=1.5, min_p=1.0, seed=3),
    ):
        assert engine.generate([prompt], params, STOP)[0].token_ids == greedy


def test_logit_bias_forces_a_token(engine: Engine) -> None:
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, logit_bias={77: 100.0}), STOP)[0]
    assert out.token_ids == [77] * 16


def test_repetition_penalty_avoids_repeats(engine: Engine) -> None:
    prompt = list(range(100, 110))
    out = engine.generate([prompt], SamplingParams(temperature=0, repetition_penalty=1e6), STOP)[0].token_ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


def test_logprobs_are_the_model_distribution(engine: Engine) -> None:
    out = engine.generate(
        [list(range(20, 30))], SamplingParams(temperature=0), STOP, OutputOptions(logprobs=True, top_logprobs=3)
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 16
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.logprob <= 0
        assert [t for t, _ in lp.top][0] == token  # greedy picks the top-1
        assert abs(lp.top[0][1] - lp.logprob) < 1e-6
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)


def test_logprobs_equal_the_models_log_softmax(engine: Engine) -> None:
    """Each token's logprob and top-N are the model's own distribution at that position
    (transformers' reference model on prompt + output, eager attention, float32)."""
    prompt = list(range(20, 30))
    options = OutputOptions(logprobs=True, top_logprobs=3)
    out = engine.generate([prompt], SamplingParams(temperature=0), STOP, options)[0]
    assert out.logprobs is not None
    ref = reference_model(engine.model.path)
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + out.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # the distribution each token came from
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.logprob == pytest.approx(expected[i, token].item(), abs=1e-4)
        top_lps, top_ids = expected[i].topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_lps.tolist(), abs=1e-4)


def _tensors(params: list[SamplingParams], **spec: Any) -> SamplingTensors:
    specs = [SampleSpec(p, num_generated=i, **spec) for i, p in enumerate(params)]
    return build_sampling(specs, torch.device("cpu"), np.random.default_rng(0))


def test_penalties_arithmetic() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    st = _tensors(
        [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)],
        prompt_ids=np.array([0]),
        output_ids=np.array([1, 1, 2]),
    )
    got = apply_processors(logits.clone(), st)
    # token 0: prompt only -> 2/2; token 1: 2x in output -> -2*2 - 0.5 - 0.5; token 2: 1/2 - 0.5 - 0.25.
    torch.testing.assert_close(got, torch.tensor([[1.0, -5.0, -0.25, 0.5]]))


def test_draws_follow_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    n = 20000
    for params, expected in (
        (SamplingParams(temperature=1.0), [0.5, 0.2, 0.15, 0.1, 0.05]),
        (SamplingParams(temperature=1.0, top_k=2), [5 / 7, 2 / 7, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (SamplingParams(temperature=1.0, min_p=0.35), [5 / 7, 2 / 7, 0, 0, 0]),
    ):
        st = build_sampling([SampleSpec(params, 0)] * n, torch.device("cpu"), np.random.default_rng(0))
        tokens = sample(logits.expand(n, -1), st).tokens
        freq = torch.bincount(tokens, minlength=5).double() / n
        assert torch.allclose(freq, torch.tensor(expected, dtype=torch.float64), atol=0.015), (params, freq)


def test_stream_yields_deltas(engine: Engine) -> None:
    import asyncio

    async def run():
        return [o async for o in engine.stream(GenerationRequest([3, 4, 5], SamplingParams(temperature=0), STOP))]

    outs = asyncio.run(run())
    assert sum(len(o.token_ids) for o in outs) == 16 and outs[-1].finished and not outs[0].finished
    assert outs[0].num_prompt_tokens == 3


def test_top_p_applies_to_the_renormalized_top_k() -> None:
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    n = 20000
    st = build_sampling(
        [SampleSpec(SamplingParams(top_k=3, top_p=0.75), 0)] * n, torch.device("cpu"), np.random.default_rng(1)
    )
    freq = torch.bincount(sample(logits.expand(n, -1), st).tokens, minlength=5).double() / n
    assert torch.allclose(freq, torch.tensor([5 / 7, 2 / 7, 0, 0, 0], dtype=torch.float64), atol=0.015)


def test_degenerate_rows_still_give_a_valid_token() -> None:
    logits = torch.full((3, 5), float("-inf"))
    logits[2] = float("nan")
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2)):
        st = build_sampling([SampleSpec(params, 0)] * 3, torch.device("cpu"), np.random.default_rng(0))
        tokens = sample(logits, st).tokens
        assert ((tokens >= 0) & (tokens < 5)).all()


def test_each_request_gets_its_own_number_of_top_logprobs(engine: Engine) -> None:
    import threading

    got: dict[str, list[TokenLogprob]] = {}
    done = threading.Semaphore(0)

    def sink(out):
        got.setdefault(out.request_id, []).extend(out.logprobs or [])
        if out.finished:
            done.release()

    for rid, opts in (
        ("five", OutputOptions(logprobs=True, top_logprobs=5)),
        ("two", OutputOptions(top_logprobs=2)),
        ("none", OutputOptions(logprobs=True)),
    ):
        engine.submit(GenerationRequest([4, 5, 6], SamplingParams(temperature=0), STOP, opts, request_id=rid), sink)
    for _ in range(3):
        done.acquire()
    assert {rid: {len(lp.top) for lp in lps} for rid, lps in got.items()} == {"five": {5}, "two": {2}, "none": {0}}
