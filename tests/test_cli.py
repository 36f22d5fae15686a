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
    args = ("generate", "Hello", "--temperature", "0", "--max-new-tokens", "16", "--ignore-eos")
    assert run(*args).stdout == run(*args).stdout


def test_bad_argument_names_the_field() -> None:
    res = run("generate", "Hello", "--top-p", "2")
    assert res.returncode == 2 and "sampling.top_p" in res.stderr


def test_models_lists_presets() -> None:
    res = run("models")
    assert res.returncode == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    assert names == ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite", "bench-llama"]
