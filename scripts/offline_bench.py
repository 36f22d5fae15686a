"""Offline throughput of the engine on a fixed, seeded workload (a first figure; `tandem bench`
comes with the benchmark issue).

    .venv/bin/python scripts/offline_bench.py --model bench-llama --requests 64
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import transformers

from engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
from schedulers import load_scheduler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128))
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", default="fcfs")
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    config = EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens)
    with Engine(config, load_scheduler(args.scheduler)) as engine:
        vocab = engine.model.vocab_size
        prompts = [rng.integers(4, vocab, int(rng.integers(*args.prompt_len, endpoint=True))).tolist()
                   for _ in range(args.requests)]
        outs = [int(rng.integers(*args.output_len, endpoint=True)) for _ in range(args.requests)]
        stops = [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in outs]
        engine.generate(prompts[:2], SamplingParams(temperature=0), stops[:2])  # warm-up
        stats = engine.core.executor.stats
        core = engine.core.stats
        before = (stats.steps, stats.prepare_seconds, stats.compute_seconds, core.schedule_seconds, core.output_seconds)
        start = time.perf_counter()
        done = engine.generate(prompts, SamplingParams(temperature=0), stops)
        wall = time.perf_counter() - start
        out_tokens = sum(len(c.token_ids) for c in done)
        steps = stats.steps - before[0]
        prep, comp = stats.prepare_seconds - before[1], stats.compute_seconds - before[2]
        sched, outp = core.schedule_seconds - before[3], core.output_seconds - before[4]
    print(f"model={args.model} requests={args.requests} prompt_tokens={sum(map(len, prompts))} "
          f"output_tokens={out_tokens}")
    print(f"wall={wall:.2f}s output_tokens/s={out_tokens / wall:.1f} steps={steps} "
          f"host_prepare={prep / steps * 1e3:.2f}ms/step compute={comp / steps * 1e3:.2f}ms/step "
          f"schedule={sched / steps * 1e3:.2f}ms/step outputs={outp / steps * 1e3:.2f}ms/step "
          f"host_fraction={(prep + sched + outp) / (prep + comp + sched + outp):.3f}")
    print(f"torch={torch.__version__} transformers={transformers.__version__} threads={torch.get_num_threads()} "
          f"cpu={platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
