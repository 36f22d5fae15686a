"""Model loading: presets, dtypes, and refusal of attention we would compute differently."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_engine
from tandem.engine import EngineConfig, SamplingParams, StoppingCriteria, UnsupportedModelError
from tandem.engine.model.loader import load_model
from tandem.engine.model.presets import PRESETS, preset_path


def _config_dir(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)


@pytest.mark.parametrize(
    "feature,config",
    [
        ("sliding_window", dict(BASE, model_type="mistral", sliding_window=64)),
        (
            "attn_logit_softcapping",
            dict(BASE, model_type="gemma2", attn_logit_softcapping=50.0, sliding_window=4096, head_dim=16),
        ),
        (
            "sliding_window",
            dict(BASE, model_type="qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=1),
        ),
        ("layer_types", dict(BASE, model_type="qwen3_next")),
    ],
)
def test_unsupported_attention_is_refused_by_name(tmp_path, feature, config) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        load_model(_config_dir(tmp_path, **config))
    assert info.value.feature == feature and feature in str(info.value)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="neither a built-in preset"):
        load_model("/nonexistent/model")


def test_presets_are_plain_hf_directories() -> None:
    from transformers import AutoConfig, AutoTokenizer

    for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite"):
        path = preset_path(name)
        config = AutoConfig.from_pretrained(path)
        assert config.vocab_size == PRESETS[name].vocab_size
        assert len(AutoTokenizer.from_pretrained(path)) == config.vocab_size
    assert PRESETS["bench-llama"].config["vocab_size"] == 32000


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(dtype) -> None:
    with make_engine(model="tiny-qwen2", dtype=dtype, device="cpu") as eng:
        assert eng.core.executor.kv.k.dtype == getattr(torch, dtype)
        out = eng.generate(
            [[5, 6, 7, 8]], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=8, ignore_eos=True)
        )
        assert len(out[0].token_ids) == 8


def test_preset_directories_take_the_users_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache shared between users (TANDEM_CACHE_DIR) must be readable by the others."""
    from tandem.engine.model import presets

    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(presets, "build", lambda preset, out: (out / "config.json").write_text("{}"))
    old = os.umask(0o022)
    try:
        path = presets.preset_path("tiny-llama")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755


def test_a_kv_budget_too_small_for_one_step_is_refused_at_start() -> None:
    from tandem.engine.engine import build_core
    from tandem.schedulers import load_scheduler

    config = EngineConfig(model="tiny-llama", kv_cache_gb=1e-5, max_batch_tokens=512)
    with pytest.raises(ValueError, match=r"KV cache would hold \d+ tokens .* too few for one full step"):
        build_core(config, load_scheduler("fcfs"))


# A few bf16 ulps of the logits' size: tiny-llama's reach ~10 (an ulp there is 0.0625, and the
# gather path and transformers' eager attention differ by up to 0.19 on them), ordinary ~1.
@pytest.mark.parametrize(("model", "tol"), [("tiny-llama", 0.25), ("ordinary", 0.03)])
def test_bf16_on_the_cpu_kernel_is_transformers_bf16_greedy_choice(model: str, tol: float, tmp_path: Path) -> None:
    """bf16 weights and KV through the CPU decode kernel (it reads the bf16 pool widened):
    transformers' bf16 greedy choice wherever it leads by more than bf16's rounding of the logits."""
    from helpers import assert_greedy_matches, ordinary_model, random_prompts, reference_model

    path = str(ordinary_model(tmp_path)) if model == "ordinary" else model
    prompts = random_prompts(np.random.default_rng(4), 8, 1, 60)
    with make_engine(model=path, dtype="bfloat16", device="cpu", max_num_seqs=8) as eng:
        assert eng.core.executor.attention_kind in ("cpu-kernel", "gather")
        got = eng.generate(prompts, SamplingParams(temperature=0), StoppingCriteria(12, ignore_eos=True))
    ref = reference_model(preset_path(path) if model != "ordinary" else path, torch.bfloat16)
    for p, c in zip(prompts, got):
        assert_greedy_matches(p, c.token_ids, ref, tol)
