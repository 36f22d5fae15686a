"""Time to first token vs. inter-token latency, per scheduling policy, on one mixed workload.

    .venv/bin/python scripts/scheduler_tradeoff.py --model bench-llama

Requests arrive as a Poisson process; prompts and outputs have mixed lengths. Each policy
runs the same seeded workload on a fresh engine, one after the other, in this one process.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from tandem.engine import Engine, EngineConfig, GenerationRequest, SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler


def run(policy: str, args, prompts, outputs, gaps) -> dict:
    config = EngineConfig(model=args.model, max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs)
    with Engine(config, load_scheduler(policy)) as engine:
        engine.generate([prompts[0][:8]], stopping=StoppingCriteria(max_new_tokens=2))  # warm-up
        times: list[list[float]] = [[] for _ in prompts]
        submitted = [0.0] * len(prompts)
        finished = threading.Semaphore(0)

        def sink_for(i):
            def sink(out):
                times[i].append(time.perf_counter())
                if out.finished:
                    finished.release()

            return sink

        start = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, outputs)):
            time.sleep(max(0.0, start + gaps[i] - time.perf_counter()))
            submitted[i] = time.perf_counter()
            request = GenerationRequest(
                prompt, SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=n, ignore_eos=True)
            )
            engine.submit(request, sink_for(i))
        for _ in prompts:
            finished.acquire()
        wall = time.perf_counter() - start
    ttft = np.array([t[0] - s for t, s in zip(times, submitted)])
    itl = np.concatenate([np.diff(t) for t in times])
    return dict(ttft=ttft, itl=itl, tokens=sum(outputs), wall=wall)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    p.add_argument("--max-batch-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--policies", nargs="+", default=["fcfs", "prefill-priority"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per policy, interleaved, samples pooled")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = [
        rng.integers(4, 32000 if args.model == "bench-llama" else 500, int(rng.integers(16, 513))).tolist()
        for _ in range(args.requests)
    ]
    outputs = [int(rng.integers(32, 129)) for _ in range(args.requests)]
    gaps = np.cumsum(rng.exponential(1 / args.rate, args.requests))
    print(f"model={args.model} requests={args.requests} rate={args.rate}/s max_batch_tokens={args.max_batch_tokens}")
    print(f"{'policy':<18}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>10}{'ITL p99':>10}{'tok/s':>8}")
    runs: dict[str, list[dict]] = {policy: [] for policy in args.policies}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every policy alike
        for policy in args.policies:
            runs[policy].append(run(policy, args, prompts, outputs, gaps))
    for policy, rs in runs.items():
        ttft = np.concatenate([r["ttft"] for r in rs]) * 1e3
        itl = np.concatenate([r["itl"] for r in rs]) * 1e3
        rate = sum(r["tokens"] for r in rs) / sum(r["wall"] for r in rs)
        pct = lambda a, q: np.percentile(a, q)
        print(
            f"{policy:<18}{pct(ttft, 50):>8.0f}ms{pct(ttft, 99):>8.0f}ms{pct(itl, 50):>8.0f}ms{pct(itl, 99):>8.0f}ms"
            f"{rate:>8.0f}"
        )


if __name__ == "__main__":
    main()
