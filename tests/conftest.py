from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, EngineConfig
from engine.engine import build_core
from engine.model_loader import load_model
from schedulers import load_scheduler

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite"]


@pytest.fixture(scope="session")
def engine() -> Engine:
    """A shared tiny-llama engine; tests must leave it idle."""
    eng = make_engine(model="tiny-llama", max_batch_tokens=64, max_num_seqs=16, block_size=4)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


def reference_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def make_engine(scheduler: str = "fcfs", **config) -> Engine:
    return Engine(EngineConfig(**config), load_scheduler(scheduler))


def small_core(num_blocks: int, block_size: int = 4, scheduler: str = "fcfs", **kw):
    """A core whose KV pool holds exactly `num_blocks` blocks of tiny-llama."""
    cfg = EngineConfig(model="tiny-llama", block_size=block_size, kv_blocks=num_blocks, **kw)
    return build_core(cfg, load_scheduler(scheduler))[0]


def random_prompts(rng: np.random.Generator, n: int, low: int, high: int, vocab: int = 512) -> list[list[int]]:
    return [rng.integers(3, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


BIN = Path(sys.executable).parent
METRICS: dict[str, str] = {}  # server target -> its metrics address


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`tandem serve` on a free loopback port; returns the process and HOST:PORT once it serves."""
    # stderr (the JSON logs) goes to a file: a pipe nobody drains would block a busy server.
    log = tempfile.NamedTemporaryFile("w", prefix="tandem-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([str(BIN / "tandem"), "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=log, text=True, env={**os.environ, **(env or {})})
    proc.log_path = log.name
    line = proc.stdout.readline()
    if not line.startswith("tandem serving on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {server_log(proc)}")
    words = line.split()
    if "metrics" in words:
        METRICS[words[3]] = words[-1]
    return proc, words[3]


def server_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()
