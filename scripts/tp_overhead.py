"""What tensor parallelism costs per step on this machine: TP=1 against TP=2, side by side.

    .venv/bin/python scripts/tp_overhead.py --model bench-llama --rows 32 --steps 20

For each size: admits `--rows` requests of the `offline` workload, runs until every prompt is
prefilled and a few decode steps have passed, then profiles `--steps` decode steps on rank 0
(torch.profiler) and groups the time: collectives (the forward's all-reduces and the LM head's
gather, the step message and the sampled tokens), matmuls, everything else. Rank 0's time in a
collective includes waiting for the slowest follower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench.workloads import make  # noqa: E402
from tandem.engine import EngineConfig, SamplingParams, StoppingCriteria  # noqa: E402
from tandem.engine.build import build_core  # noqa: E402
from tandem.engine.request import GenerationRequest  # noqa: E402
from tandem.schedulers import load_scheduler  # noqa: E402

COLLECTIVE = ("c10d", "gloo", "nccl", "allreduce", "all_reduce", "allgather", "all_gather", "broadcast")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")


def measure(model: str, tp: int, rows: int, steps: int) -> dict:
    core, info = build_core(EngineConfig(model=model, tensor_parallel=tp), load_scheduler("fcfs"))
    try:
        work = make("offline", info.vocab_size, requests=rows)
        for prompt in work.prompts:
            stop = StoppingCriteria(max_new_tokens=steps + 60, ignore_eos=True)
            core.add(core.make_sequence(GenerationRequest(prompt, SamplingParams(temperature=0), stop)))
        while core.waiting or any(s.kv.num_computed < len(s.prompt_ids) for s in core.running):
            core.step()
        for _ in range(10):
            core.step()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                core.step()
        wall = (time.perf_counter() - start) / steps
        totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    finally:
        core.close()
    per_step = lambda keys: sum(t for k, t in totals.items() if any(w in k.lower() for w in keys)) / 1e3 / steps  # noqa: E731
    collective = per_step(COLLECTIVE)
    matmul = per_step(MATMUL)
    grouped = COLLECTIVE + MATMUL
    others = sorted(((t, k) for k, t in totals.items() if not any(w in k.lower() for w in grouped)), reverse=True)
    top = {k: round(t / 1e3 / steps, 2) for t, k in others[:5]}
    return dict(tp=tp, rows=rows, ms_per_step=wall * 1e3, collectives_ms=collective, matmul_ms=matmul, top_others=top)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="TP=1 and TP=2 alternated, this many times each")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    results = [measure(args.model, tp, args.rows, args.steps) for _ in range(args.rounds) for tp in (1, 2)]
    print(
        f"{'TP':>3}{'ms/step':>10}{'collectives':>13}{'matmuls':>10}"
        f"  (rank 0, {args.rows} decode rows, under the profiler)"
    )
    for r in results:
        top = ", ".join(f"{k} {v:.1f}" for k, v in r["top_others"].items())
        print(f"{r['tp']:>3}{r['ms_per_step']:>10.1f}{r['collectives_ms']:>13.1f}{r['matmul_ms']:>10.1f}  {top}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
