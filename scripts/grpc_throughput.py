"""Output tokens/s through gRPC at N concurrent streams vs. the offline engine, same workload.

    .venv/bin/python scripts/grpc_throughput.py --model bench-llama --concurrency 64

Starts `tandem serve` as a subprocess on loopback, sends the workload of offline_bench.py
(token-id prompts, ignore EOS, greedy) with N streams in flight, then runs the same workload
offline in this process (the server is stopped first, so they never share the CPU).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Engine, EngineConfig, SamplingParams, StoppingCriteria  # noqa: E402
from schedulers import load_scheduler  # noqa: E402
from tandem.v1 import generation_pb2 as pb  # noqa: E402
from tandem.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402


def workload(n: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, vocab, int(rng.integers(16, 257))).tolist() for _ in range(n)]
    outputs = [int(rng.integers(16, 129)) for _ in range(n)]
    return prompts, outputs


async def run_grpc(target: str, prompts, outputs, concurrency: int) -> tuple[int, float]:
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def one(prompt, n):
            async with sem:
                req = pb.GenerateStreamRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(temperature=0),
                                               stopping=pb.StoppingCriteria(max_new_tokens=n, ignore_eos=True))
                return sum([len(r.token_ids) async for r in stub.GenerateStream(req)])

        await one(prompts[0][:8], 2)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, outputs)))
        return sum(counts), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--scheduler", default="fcfs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    vocab = 32000 if args.model == "bench-llama" else 512
    prompts, outputs = workload(args.requests, vocab, args.seed)

    server = subprocess.Popen([str(Path(sys.executable).parent / "tandem"), "serve", "--model", args.model,
                               "--port", "0", "--scheduler", args.scheduler, "--log-format", "console"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        target = server.stdout.readline().split()[3]
        cpu0 = time.process_time()
        grpc_tokens, grpc_wall = asyncio.run(run_grpc(target, prompts, outputs, args.concurrency))
        client_cpu = time.process_time() - cpu0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    with Engine(EngineConfig(model=args.model), load_scheduler(args.scheduler)) as engine:
        stops = [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in outputs]
        engine.generate(prompts[:1], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=2))
        start = time.perf_counter()
        done = engine.generate(prompts, SamplingParams(temperature=0), stops)
        offline_wall = time.perf_counter() - start
    offline_tokens = sum(len(c.token_ids) for c in done)
    g, o = grpc_tokens / grpc_wall, offline_tokens / offline_wall
    print(f"model={args.model} requests={args.requests} concurrency={args.concurrency} scheduler={args.scheduler}")
    print(f"grpc    {grpc_tokens} tokens in {grpc_wall:.2f}s = {g:.1f} tok/s "
          f"(the client, on the same 2 cores, used {client_cpu:.2f} s of CPU)")
    print(f"offline {offline_tokens} tokens in {offline_wall:.2f}s = {o:.1f} tok/s")
    print(f"grpc/offline = {g / o:.3f}")


if __name__ == "__main__":
    main()
