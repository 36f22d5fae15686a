"""Load a causal LM through transformers' Auto classes, offline, with our paged attention.

A model whose attention we do not reproduce exactly is refused here, by name of the feature,
rather than run wrongly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tandem.engine.device import attention  # noqa: F401  (registers the paged attention function)
from tandem.engine.device.attention import ATTENTION_NAME
from tandem.engine.errors import UnsupportedModelError
from tandem.engine.model import gguf
from tandem.engine.model.presets import PACKAGED, PRESETS, preset_path
from tandem.engine.model.support import check_supported, context_length

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    path: Path
    # transformers' objects: Any, since their attributes are made from the config at run time
    model: Any  # a PreTrainedModel
    tokenizer: Any
    config: Any
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    max_model_len: int

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[name]


def resolve_path(model: str) -> Path:
    """The Hugging Face directory `model` names: a random preset (built on first use), a packaged
    real model or a GGUF file (converted on first use), or a local directory as it is."""
    if model in PRESETS:
        return preset_path(model)
    if model in PACKAGED:
        return gguf.converted(PACKAGED[model].gguf_path())
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    source = gguf.gguf_file(path)
    if source is not None:
        return gguf.converted(source)
    raise FileNotFoundError(
        f"model {model!r} is neither a built-in preset ({', '.join([*PACKAGED, *PRESETS])}), "
        "a GGUF file, nor a local directory with a config.json or one .gguf file"
    )


def _check_modules(model: torch.nn.Module) -> None:
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            "attention_backend", f"{type(model).__name__} does not route attention through transformers' registry"
        )
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "attention", "attn")) and hasattr(module, "sinks"):
            raise UnsupportedModelError("attention_sinks", f"learned attention sinks in {name}")


def _eos_ids(model, config, tokenizer) -> tuple[int, ...]:
    for source in (getattr(model, "generation_config", None), config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()


def check_tensor_parallel(model: str, n: int) -> None:
    """Refuse a TP size the model cannot be split by: it must divide the attention and KV heads,
    and transformers must have a TP plan for the architecture."""
    if n == 1:
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_path(model), local_files_only=True)
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % n or kv_heads % n:
        raise ValueError(
            f"tensor_parallel {n} must divide the model's attention heads ({heads}) and KV heads ({kv_heads})"
        )
    if not getattr(text, "base_model_tp_plan", None):
        raise ValueError(f"tensor_parallel {n}: transformers has no tensor-parallel plan for {type(config).__name__}")


def load_model(
    model: str, dtype: str | None = None, device: str | None = None, tensor_parallel: int = 1
) -> LoadedModel:
    """`tensor_parallel` > 1: this rank's shard, by transformers' TP plan, in the process group
    the caller has initialised (tandem.engine.device.tensor_parallel)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DistributedConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_path(model)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    check_supported(config)
    sharded = {}
    if tensor_parallel > 1:
        check_tensor_parallel(model, tensor_parallel)
        sharded["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tensor_parallel)
    # NOTE: use_kernels=False: transformers (5.25) otherwise swaps layers for Hub kernels it
    # fetches at load time; tandem plugs in its own attention and runs only code it ships.
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=ATTENTION_NAME, local_files_only=True, use_kernels=False,
        **sharded,
    )  # fmt: skip
    _check_modules(hf_model)
    hf_model.to(dev).eval()  # type: ignore[arg-type]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return LoadedModel(
        name=model,
        path=path,
        model=hf_model,
        tokenizer=tokenizer,
        config=hf_model.config,
        device=dev,
        dtype=torch_dtype,
        eos_token_ids=_eos_ids(hf_model, hf_model.config, tokenizer),
        max_model_len=context_length(hf_model.config.get_text_config()),
    )
