"""The `tandem` console script, run as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TANDEM = shutil.which("tandem", path=str(Path(sys.executable).parent)) or "tandem"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TANDEM, *args], capture_output=True, text=True, timeout=300)


def test_generate_streams_text() -> None:
    res = run(
        "generate",
        "--model",
        "tiny-llama",
        "Once upon a time",
        "--max-new-tokens",
        "32",
        "--ignore-eos",
        "--seed",
        "1",
        "--stats",
    )
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip()) > 0
    assert "32 tokens" in res.stderr and "finish=length" in res.stderr


def test_generate_greedy_is_reproducible() -> None:
    args = (
        "generate",
        "--model",
        "tiny-llama",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--ignore-eos",
    )
    assert run(*args).stdout == run(*args).stdout


def test_bad_argument_names_the_field() -> None:
    res = run("generate", "--model", "tiny-llama", "Hello", "--top-p", "2")
    assert res.returncode == 2 and "sampling.top_p" in res.stderr


def test_models_lists_the_real_default_then_the_presets() -> None:
    res = run("models")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["smollm2-135m", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite", "bench-llama"]
    assert "[default]" in lines[0] and "Apache-2.0" in lines[0]


def test_chat_on_the_default_model_answers_a_question() -> None:
    """The README's exchange: no --model, the real instruct model through its chat template."""
    res = run("generate", "--chat", "What is the capital of France?", "--temperature", "0", "--stats")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout and "<|im_end|>" not in res.stdout
    assert "finish=eos" in res.stderr  # <|im_end|> ended it, and was not printed


def test_every_request_limit_is_a_serve_flag() -> None:
    """docs/service.md names `--max-n`; every RequestLimits field must be settable the same way."""
    import dataclasses

    from tandem.engine.request import RequestLimits
    from tandem.service.cli import build_parser
    from tandem.service.flags import from_flags

    args = build_parser().parse_args(["serve", "--max-n", "2", "--max-logit-bias", "7"])
    limits = from_flags(RequestLimits, args)
    assert (limits.max_n, limits.max_logit_bias) == (2, 7)
    assert {f.name for f in dataclasses.fields(RequestLimits)} <= {
        a.split(".", 1)[1] for a in vars(args) if a.startswith("RequestLimits.")
    }
