"""Helpers the tests share: engines and cores of the tiny presets, reference models, servers."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem.engine import Engine, EngineConfig
from tandem.engine.build import build_core
from tandem.engine.host.core import EngineCore
from tandem.schedulers import load_scheduler

TINY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-granite"]


def reference_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:  # a PreTrainedModel
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def ordinary_model(out: Path) -> Path:
    """tiny-llama's shape and tokenizer with transformers' ordinary initialisation (std 0.02):
    logits close together, near-ties as in real models (the presets' wide weights have none)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from tandem.engine.model.presets import preset_path

    src = preset_path("tiny-llama")
    config = AutoConfig.from_pretrained(src)
    config.initializer_range = 0.02
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def assert_greedy_matches(prompt: list[int], got: list[int], ref: Any, tol: float) -> int:
    """Greedy tokens `got` are the reference model's choices, tie-aware: the reference is run on
    prompt + got (teacher forcing) and a token differing from its argmax counts as a mismatch
    only where the argmax leads by more than `tol` (a near-tie may flip with rounding).
    Returns how many near-tie flips it allowed."""
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1].float()
    flips = 0
    for i, token in enumerate(got):
        best = int(logits[i].argmax())
        if token == best:
            continue
        margin = float(logits[i, best] - logits[i, token])
        assert margin <= tol, f"token {i}: {token}, the reference picks {best} by {margin:.2e} > {tol:.0e}"
        flips += 1
    return flips


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


def replica_load(target: str) -> Any:  # tandem.v1 GetLoadResponse
    import grpc

    from tandem.v1 import info_pb2, info_pb2_grpc

    with grpc.insecure_channel(target) as ch:
        return info_pb2_grpc.InfoServiceStub(ch).GetLoad(info_pb2.GetLoadRequest(), timeout=5)


def wait_until_idle(targets: list[str], timeout: float = 15.0) -> list[Any]:
    """Poll until no replica runs, queues or owns KV blocks (or time is up); the last loads."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [replica_load(t) for t in targets]
        idle = all(x.running == 0 and x.waiting == 0 and x.kv_blocks_used == 0 for x in loads)
        if idle or time.monotonic() > deadline:
            return loads
        time.sleep(0.1)


def assert_aborted_and_freed(replicas: list[tuple[ServerProcess, str]], marker: str = "") -> None:
    """A request was cut short (logged as aborted, with `marker` in the logs) and every replica
    is idle again with its KV blocks back."""
    loads = wait_until_idle([t for _, t in replicas])
    assert all(x.running == 0 and x.kv_blocks_used == 0 for x in loads), loads
    logs = "".join(server_log(proc) for proc, _ in replicas)
    assert '"request_aborted"' in logs and marker in logs


def server_log(proc: ServerProcess) -> str:
    return Path(proc.log_path).read_text()
