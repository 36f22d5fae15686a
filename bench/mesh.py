"""tandem behind smg: what the router costs, and what cache-aware routing buys.

- `overhead`: one replica; the workload at a fixed concurrency straight over tandem.v1 gRPC
  (token ids) and through `smg` with the OpenAI SDK (the prompts decoded to text, which the
  router tokenizes again: prompt lengths can differ a little, both are reported).
- `routing`: two fresh replicas per policy behind smg; prefix-cache hit rate and output tok/s
  with `cache_aware` (which follows the replicas' KV events) against `round_robin`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tandem.bench.serve import LocalServer, Record, run_load
from tandem.bench.workloads import Workload
from tandem.engine.model.loader import resolve_path

BIN = Path(sys.executable).parent


@dataclass
class Router:
    """`smg launch` in a subprocess, its workers registered and healthy."""

    proc: subprocess.Popen
    url: str  # the OpenAI API's base, http://HOST:PORT
    metrics: str  # its Prometheus endpoint
    log: Path

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy_workers(url: str) -> int:
    workers = json.loads(urllib.request.urlopen(f"{url}/workers", timeout=2).read())["workers"]
    return sum(1 for w in workers if w.get("is_healthy"))


def start_router(model: str, targets: list[str], policy: str, timeout: float = 60.0) -> Router:
    port, metrics = free_port(), free_port()
    cmd = [str(BIN / "smg"), "launch", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics)]
    cmd += ["--model-path", str(resolve_path(model)), "--worker-urls", *(f"grpc://{t}" for t in targets)]
    log = Path(tempfile.mkstemp(prefix="smg-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    router = Router(proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if healthy_workers(router.url) == len(targets):
                return router
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    router.stop()
    raise RuntimeError(f"smg did not register {len(targets)} healthy workers: {log.read_text()[-3000:]}")


def texts(model: str, work: Workload) -> list[str]:
    """The workload's prompts as text (the router tokenizes them again)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(model))
    return [str(tok.decode(p)) for p in work.prompts]


async def openai_load(url: str, model: str, prompts: list[str], output_lens: list[int], concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    out: dict[str, float] = {"output_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0, "errors": 0}

    async def one(prompt: str, max_new: int) -> None:
        async with gate:
            try:
                stream = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=max_new,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if chunk.usage:
                        out["output_tokens"] += chunk.usage.completion_tokens
                        out["prompt_tokens"] += chunk.usage.prompt_tokens
                        details = chunk.usage.prompt_tokens_details
                        out["cached_tokens"] += (details.cached_tokens or 0) if details else 0
            except Exception:  # noqa: BLE001 - counted, reported
                out["errors"] += 1

    await one(prompts[0][:32], 2)  # warm-up: connection, tokenizer, first step
    out.update(output_tokens=0, prompt_tokens=0, cached_tokens=0, errors=0)
    start = time.perf_counter()
    await asyncio.gather(*(one(p, n) for p, n in zip(prompts, output_lens)))
    out["wall_s"] = time.perf_counter() - start
    out["output_tok_s"] = out["output_tokens"] / out["wall_s"]
    out["hit_rate"] = out["cached_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
    await client.close()
    return out


def direct(target: str, work: Workload, concurrency: int) -> dict:
    records, wall = asyncio.run(run_load(target, work, float("inf"), concurrency, label="direct gRPC"))
    done: list[Record] = [r for r in records if r.error is None]
    tokens = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens for r in done)
    return {
        "output_tokens": tokens,
        "prompt_tokens": prompt,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "errors": len(records) - len(done),
    }


def overhead(model: str, work: Workload, concurrency: int) -> dict:
    """Direct first, then through smg, on one fresh replica each (caches start cold)."""
    with LocalServer(model, "fcfs", ["--no-prefix-caching"]) as server:
        grpc_row = direct(server.target, work, concurrency)
    with LocalServer(model, "fcfs", ["--no-prefix-caching"]) as server:
        router = start_router(model, [server.target], "round_robin")
        try:
            smg_row = asyncio.run(openai_load(router.url, model, texts(model, work), work.output_lens, concurrency))
        finally:
            router.stop()
    return {"direct": grpc_row, "smg": smg_row, "ratio": smg_row["output_tok_s"] / grpc_row["output_tok_s"]}


def routing(model: str, work: Workload, concurrency: int, policies: tuple[str, ...]) -> dict:
    rows = {}
    prompts = texts(model, work)
    for policy in policies:
        with LocalServer(model, "fcfs") as a, LocalServer(model, "fcfs") as b:
            router = start_router(model, [a.target, b.target], policy)
            try:
                rows[policy] = asyncio.run(openai_load(router.url, model, prompts, work.output_lens, concurrency))
            finally:
                router.stop()
    return rows
