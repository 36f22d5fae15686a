"""A long steady run of one engine for a sampling profiler: where the host's time goes per step.

    py-spy record -r 200 --format raw -o host.txt -- python scripts/host_profile.py --batch 64

Builds gpu_check's model (about 0.5B parameters, bf16 on CUDA; the tiny one on the CPU) and
runs `--rounds` greedy generates of 4 x batch prompts on one engine (async-overlap over fcfs,
the default kernel and CUDA graphs), printing tokens/s, the device-idle fraction and device time
per step of each round, so the profile can be read against the step the device needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import build_model  # noqa: E402

from tandem.engine import Engine, EngineConfig, SamplingParams, StoppingCriteria  # noqa: E402
from tandem.schedulers import load_scheduler  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scheduler", default="async-overlap", choices=("fcfs", "async-overlap"))
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), cuda)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(4, 500, int(rng.integers(32, 257))).tolist() for _ in range(4 * args.batch)]
        config = EngineConfig(
            model=tmp, device="cuda" if cuda else "cpu", max_num_seqs=args.batch,
            max_batch_tokens=max(2048, args.batch * 16), enable_prefix_caching=False,
        )  # fmt: skip
        options = {"policy": "fcfs"} if args.scheduler == "async-overlap" else {}
        stop = StoppingCriteria(max_new_tokens=args.new, ignore_eos=True)
        with Engine(config, load_scheduler(args.scheduler, options)) as engine:
            for i in range(args.rounds):
                s0 = engine.stats()
                start = time.perf_counter()
                done = engine.generate(prompts, SamplingParams(temperature=0), stop)
                wall = time.perf_counter() - start
                s1 = engine.stats()
                busy = s1.device_busy_seconds - s0.device_busy_seconds
                idle = s1.device_idle_seconds - s0.device_idle_seconds
                steps = s1.steps - s0.steps
                tokens = sum(len(c.token_ids) for c in done)
                print(
                    f"round {i}: {tokens / wall:.0f} tok/s, {steps} steps, wall/step {1e3 * wall / steps:.2f} ms, "
                    f"device/step {1e3 * busy / steps:.2f} ms, idle {idle / (busy + idle):.1%}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
