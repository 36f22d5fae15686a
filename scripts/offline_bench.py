"""Offline throughput and device-idle fraction per scheduler, side by side, on one seeded workload.

    .venv/bin/python scripts/offline_bench.py --model bench-llama --requests 64 \
        --schedulers fcfs async-overlap

Each scheduler runs the same workload on a fresh engine; with --repeats the runs interleave
(a b a b ...) so the shared machine's noise falls on all of them alike.
"""
from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch
import transformers

from engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
from schedulers import load_scheduler, parse_options


def workload(args, vocab: int):
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(4, vocab, int(rng.integers(*args.prompt_len, endpoint=True))).tolist()
               for _ in range(args.requests)]
    outs = [int(rng.integers(*args.output_len, endpoint=True)) for _ in range(args.requests)]
    return prompts, [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in outs]


def run_once(args, spec: str) -> dict:
    import time

    name, _, opts = spec.partition(":")
    scheduler = load_scheduler(name, parse_options(opts.split(",")) if opts else {})
    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens)
    with Engine(config, scheduler) as engine:
        prompts, stops = workload(args, engine.model.vocab_size)
        engine.generate(prompts[:2], SamplingParams(temperature=0), stops[:2])  # warm-up
        ex, core = engine.core.executor.stats, engine.core.stats
        before = (ex.steps, ex.prepare_seconds, ex.busy_seconds, ex.idle_seconds, core.schedule_seconds,
                  core.output_seconds)
        start = time.perf_counter()
        done = engine.generate(prompts, SamplingParams(temperature=0), stops)
        wall = time.perf_counter() - start
        after = (ex.steps, ex.prepare_seconds, ex.busy_seconds, ex.idle_seconds, core.schedule_seconds,
                 core.output_seconds)
    steps, prep, busy, idle, sched, outp = (a - b for a, b in zip(after, before))
    tokens = sum(len(c.token_ids) for c in done)
    return dict(scheduler=spec, output_tokens=tokens, wall=wall, tokens_per_s=tokens / wall, steps=steps,
                prepare_ms=prep / steps * 1e3, busy_ms=busy / steps * 1e3, idle_fraction=idle / (busy + idle),
                schedule_ms=sched / steps * 1e3, outputs_ms=outp / steps * 1e3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", nargs="+", default=["fcfs", "async-overlap"],
                   help="NAME or NAME:key=value,key=value")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    runs: dict[str, list[dict]] = {s: [] for s in args.schedulers}
    for _ in range(args.repeats):
        for spec in args.schedulers:
            runs[spec].append(run_once(args, spec))
    print(f"model={args.model} requests={args.requests} prompt_len={args.prompt_len} output_len={args.output_len} "
          f"torch={torch.__version__} transformers={transformers.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}")
    print(f"{'scheduler':<34}{'tok/s':>8}{'steps':>7}{'prep ms':>9}{'busy ms':>9}{'sched ms':>9}{'out ms':>8}"
          f"{'idle':>8}")
    summary = []
    for spec, rs in runs.items():
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "scheduler"}
        summary.append(dict(scheduler=spec, runs=rs, median=med))
        print(f"{spec:<34}{med['tokens_per_s']:>8.1f}{med['steps']:>7.0f}{med['prepare_ms']:>9.2f}"
              f"{med['busy_ms']:>9.2f}{med['schedule_ms']:>9.2f}{med['outputs_ms']:>8.2f}{med['idle_fraction']:>8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
