"""Helpers the tests share: engines and cores of the tiny presets, reference models, servers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.engine import Engine, EngineConfig
from tandem.engine.engine import build_core
from tandem.engine.host.core import EngineCore
from tandem.schedulers import load_scheduler

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite"]


def reference_model(path: str | Path) -> Any:  # a transformers PreTrainedModel
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def make_engine(scheduler: str = "fcfs", **config: object) -> Engine:
    return Engine(EngineConfig(**config), load_scheduler(scheduler))  # type: ignore[arg-type]


def small_core(num_blocks: int, block_size: int = 4, scheduler: str = "fcfs", **kw: object) -> EngineCore:
    """A core whose KV pool holds exactly `num_blocks` blocks of tiny-llama."""
    cfg = EngineConfig(model="tiny-llama", block_size=block_size, kv_blocks=num_blocks, **kw)  # type: ignore[arg-type]
    return build_core(cfg, load_scheduler(scheduler))[0]


def random_prompts(rng: np.random.Generator, n: int, low: int, high: int, vocab: int = 512) -> list[list[int]]:
    return [rng.integers(3, vocab, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


BIN = Path(sys.executable).parent
METRICS: dict[str, str] = {}  # server target -> its metrics address


class ServerProcess(subprocess.Popen[str]):
    log_path: str


def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[ServerProcess, str]:
    """`tandem serve` on a free loopback port; returns the process and HOST:PORT once it serves."""
    # stderr (the JSON logs) goes to a file: a pipe nobody drains would block a busy server.
    log = tempfile.NamedTemporaryFile("w", prefix="tandem-serve-", suffix=".log", delete=False)
    proc = ServerProcess(
        [str(BIN / "tandem"), "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, **(env or {})},
    )
    proc.log_path = log.name
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.startswith("tandem starting on"):  # the port is open; the model loads
        line = proc.stdout.readline()
    if not line.startswith("tandem serving on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r} {server_log(proc)}")
    words = line.split()
    if "metrics" in words:
        METRICS[words[3]] = words[-1]
    return proc, words[3]


def server_log(proc: ServerProcess) -> str:
    return Path(proc.log_path).read_text()
