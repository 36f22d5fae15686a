"""Greedy generation of many prompts batched together equals transformers' generate alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_greedy_matches, make_engine, ordinary_model, random_prompts, reference_model
from tandem.engine import Engine, SamplingParams, StoppingCriteria

NEW = 12


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
def test_greedy_batch_equals_transformers_generate(preset: str) -> None:
    prompts = random_prompts(np.random.default_rng(2), 16, 1, 90)
    # A small token budget forces chunked prefill mixed with decodes.
    with make_engine(model=preset, max_batch_tokens=48, max_num_seqs=8, block_size=8) as eng:
        stop = StoppingCriteria(max_new_tokens=NEW, min_new_tokens=NEW)
        got = eng.generate(prompts, SamplingParams(temperature=0), stop)
        ref = reference_model(eng.model.path)
    for prompt, completion in zip(prompts, got):
        with torch.inference_mode():
            out = ref.generate(
                torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=2
            )
        assert completion.token_ids == out[0, len(prompt) :].tolist()
        assert completion.finish_reason.value == "length"


# Logit difference under which a greedy choice may flip: ours (paged, batched) and transformers'
# eager attention agree to about 1e-6 of the logits' scale in float32.
TIE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ordinary_model(tmp_path_factory.mktemp("ordinary-init"))


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_greedy_on_ordinary_weights_is_the_models_choice(ordinary: Path, scheduler: str) -> None:
    """Real models have near-ties: batched greedy output equals the reference's argmax wherever
    the argmax leads by more than TIE_TOLERANCE, under a policy and async overlap over it."""
    prompts = random_prompts(np.random.default_rng(5), 12, 1, 60)
    with make_engine(scheduler, model=str(ordinary), max_batch_tokens=48, max_num_seqs=8, block_size=8) as eng:
        got = eng.generate(prompts, SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=16, ignore_eos=True))
    ref = reference_model(ordinary)
    flips = sum(assert_greedy_matches(p, c.token_ids, ref, TIE_TOLERANCE) for p, c in zip(prompts, got))
    print(f"\nordinary init ({scheduler}): {len(prompts)} x 16 greedy tokens, {flips} near-tie flips")


def test_prefix_cache_hits_keep_outputs(engine: Engine) -> None:
    rng = np.random.default_rng(3)
    shared = rng.integers(3, 500, 40).tolist()
    prompts = [shared + rng.integers(3, 500, 5).tolist() for _ in range(3)]
    greedy, stop = SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=8)
    first = engine.generate(prompts[:1], greedy, stop)[0]
    again = engine.generate(prompts, greedy, stop)
    assert again[0].token_ids == first.token_ids
    assert again[0].num_cached_tokens >= 40
    assert all(c.num_cached_tokens >= 40 for c in again[1:])
    assert engine.core.blocks.stats.hit_tokens > 0


def test_prefix_cache_hits_keep_every_output(engine: Engine) -> None:
    """Several prompts over one cached prefix, and over each other's: every output equals the
    output computed with no cache at all."""
    rng = np.random.default_rng(11)
    shared = rng.integers(3, 500, 37).tolist()
    prompts = [shared + rng.integers(3, 500, int(n)).tolist() for n in rng.integers(1, 30, 8)]
    prompts += [p + rng.integers(3, 500, 9).tolist() for p in prompts[:3]]  # extend earlier prompts
    greedy, stop = SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=10, ignore_eos=True)
    engine.generate(prompts[:2], greedy, stop)  # warm the cache
    cached = engine.generate(prompts, greedy, stop)
    assert sum(c.num_cached_tokens for c in cached) >= 36 * len(prompts)
    with make_engine(model="tiny-llama", enable_prefix_caching=False, block_size=4) as cold:
        fresh = cold.generate(prompts, greedy, stop)
    assert [c.token_ids for c in cached] == [f.token_ids for f in fresh]


def test_prefix_cache_off_has_no_hits() -> None:
    prompt = list(range(3, 60))
    with make_engine(model="tiny-llama", enable_prefix_caching=False, block_size=4) as eng:
        a, b = eng.generate([prompt, prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=4))
        c = eng.generate([prompt], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=4))[0]
        assert c.num_cached_tokens == 0 and eng.core.blocks.num_cached == 0
        assert a.token_ids == b.token_ids == c.token_ids


def test_start_up_objects_are_frozen_while_the_engine_runs_and_a_closed_engine_is_freed() -> None:
    """The model's objects leave the garbage collector's walks once the engine is built (a full
    collection over them paused the loop 258 ms); closing thaws them, so the model can go."""
    import gc
    import weakref

    eng = make_engine(model="tiny-llama")
    try:
        assert gc.get_freeze_count() > 10_000
        model = weakref.ref(eng.core.executor.model)
        eng.generate([[5, 6, 7]], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=2))
    finally:
        eng.shutdown()
    assert gc.get_freeze_count() == 0
    del eng
    gc.collect()
    assert model() is None
