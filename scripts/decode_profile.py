"""Where a saturated decode step's time goes, and how many KV bytes it must move.

    .venv/bin/python scripts/decode_profile.py --model bench-llama --steps 20

Admits the first 64 requests of the `offline` workload (prompts 16-512 tokens), runs until every
prompt is prefilled and a number of decode steps have passed (so contexts are mid-run), then
profiles `--steps` steps of 64 single-token rows with torch.profiler and groups the time:
matmuls (the model's linear layers), KV gathers into the attention scratch, the attention
kernel, everything else. Also prints the KV bytes a step must read at the least (each row's
real context, K and V, every layer) against the weights it reads.
"""

from __future__ import annotations

import argparse
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

GROUPS = {
    "matmul (linear layers)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "KV gather (index_select)": ("aten::index_select", "aten::index"),
    "fused paged decode (C++)": ("tandem::paged_decode",),
    "attention kernel (SDPA)": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_flash_attention_forward",
    ),
    "KV write (index_copy_)": ("aten::index_copy_",),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warm-decode-steps", type=int, default=40)
    p.add_argument("--top", type=int, default=0, help="also list the N costliest ops outside the groups")
    args = p.parse_args()
    core, info = build_core(EngineConfig(model=args.model), load_scheduler("fcfs"))
    work = make("offline", info.vocab_size, requests=64)
    for prompt in work.prompts:
        request = GenerationRequest(
            prompt, SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=400, ignore_eos=True)
        )
        core.add(core.make_sequence(request))
    while core.waiting or any(s.kv.num_computed < len(s.prompt_ids) for s in core.running):
        core.step()
    for _ in range(args.warm_decode_steps):
        core.step()
    contexts = [s.kv.num_computed for s in core.running]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            core.step()
    wall = (time.perf_counter() - start) / args.steps
    totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(totals.values())
    print(
        f"{len(contexts)} rows, contexts {min(contexts)}-{max(contexts)} (mean {sum(contexts) / len(contexts):.0f}); "
        f"{wall * 1e3:.1f} ms per step under the profiler"
    )
    for name, ops in GROUPS.items():
        t = sum(totals.get(op, 0) for op in ops)
        print(f"  {name:<28}{t / 1e3 / args.steps:8.1f} ms/step {t / total:6.1%}")
    rest = total - sum(totals.get(op, 0) for ops in GROUPS.values() for op in ops)
    print(f"  {'everything else':<28}{rest / 1e3 / args.steps:8.1f} ms/step {rest / total:6.1%}")
    grouped = {op for ops in GROUPS.values() for op in ops}
    others = sorted(((t, k) for k, t in totals.items() if k not in grouped), reverse=True)[: args.top]
    for t, name in others:
        print(f"    {name:<40}{t / 1e3 / args.steps:8.2f} ms/step")
    per_token = info.kv_bytes_per_rank[0] // info.limits.kv_capacity_tokens
    weights = sum(p.numel() * p.element_size() for p in core.model.parameters())
    print(
        f"KV bytes a step must read: {sum(contexts) * per_token / 2**20:.0f} MiB "
        f"(weights: {weights / 2**20:.0f} MiB, read once per step)"
    )


if __name__ == "__main__":
    main()
