"""GGUF files as models. transformers' own GGUF reader dequantizes the file once into an ordinary
Hugging Face directory (float32 safetensors, tokenizer with its chat template, generation config
with the EOS ids) in the model cache, keyed by the file's hash; later starts read that directory
like any other, so a start after the first costs a read of the safetensors, not a conversion.

What tandem cannot serve is refused by name before the weights are dequantized: an architecture
transformers cannot read from GGUF, a model that is not a causal LM, or an attention feature
the paged executor would compute differently (support.check_supported).
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import structlog

from tandem.engine.errors import UnsupportedModelError
from tandem.engine.model.cache import built_once
from tandem.engine.model.support import check_supported

CONVERT_VERSION = 1  # bump when a conversion's output changes: old cache entries are then ignored
SUFFIX = ".gguf"
log = structlog.get_logger("tandem.engine")


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only .gguf file in a directory (None: neither).
    A directory holding several is an error that lists them: which one is meant is not ours to guess."""
    if path.is_file() and path.suffix.lower() == SUFFIX:
        return path
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise FileNotFoundError(f"model directory {str(path)!r} holds {len(found)} GGUF files ({names}): name one")
    return found[0] if found else None


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def architecture(path: Path) -> str:
    """The file's `general.architecture` (read from its header; the tensors stay on disk)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise UnsupportedModelError("gguf_architecture", f"{path.name} names no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def read_config(path: Path):  # -> a transformers PretrainedConfig
    """The model's config from the file's metadata, refused by name where tandem cannot serve it."""
    _require_gguf()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = architecture(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except ValueError as exc:
        if "not supported" in str(exc):  # transformers' words for an architecture it cannot map
            raise UnsupportedModelError("gguf_architecture", f"transformers cannot read {arch!r} from GGUF") from None
        raise
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError("architecture", f"GGUF architecture {arch!r} is not a causal language model")
    check_supported(config)
    return config


def convert(path: Path, out: Path, digest: str) -> None:
    """Dequantize `path` to float32 and save it, with its tokenizer, as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    read_config(path)
    log.info("gguf_converting", file=str(path), into=str(out.parent), note="once; later starts read the result")
    start = time.perf_counter()
    hf_logging.disable_progress_bar()
    kw = dict(gguf_file=path.name, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, use_kernels=False, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    # The EOS the file declares is the generation config's (a list where a model has several);
    # the tokenizer's is the fallback for files whose metadata names none.
    if model.generation_config.eos_token_id is None and tokenizer.eos_token_id is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Dequantized, it is an ordinary model: saved without the GGUF quantizer's marks, it loads as one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "SOURCE").write_text(f"converted by tandem from {path.name} (sha256 {digest})\n")
    log.info("gguf_converted", file=path.name, seconds=round(time.perf_counter() - start, 1))


def converted(path: Path) -> Path:
    """The Hugging Face directory of GGUF file `path`, converted on first use."""
    stem, digest = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80], file_hash(path)
    return built_once("gguf", f"{stem}-{digest[:16]}-v{CONVERT_VERSION}", lambda out: convert(path, out, digest))


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise FileNotFoundError("reading GGUF files needs the gguf package: pip install gguf") from None
