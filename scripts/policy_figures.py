"""The scheduling policies' figures, on the real server and in the simulator beside it.

    .venv/bin/python scripts/policy_figures.py --json docs/bench/policy_figures.json

Past saturation (the `chat` workload at --rate requests/s, bench-llama on this CPU):
- tenants: "heavy" sends 5x "light"'s requests; fcfs against fair-share: each tenant's share
  of output tokens and TTFT p50/p99.
- priorities: one request in five at priority 1, the rest 0; fcfs against priority: TTFT by level.
- deadlines: every request wants its first token within --deadline seconds (ttft_target_s);
  fcfs against deadline (refuse_late): the fraction that got it in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench.serve import LocalServer, Mix, by_group, run_load  # noqa: E402
from tandem.bench.sim import calibration_path, simulate  # noqa: E402
from tandem.bench.sim_cli import tenants_for  # noqa: E402
from tandem.bench.workloads import make  # noqa: E402
from tandem.engine.device.simulated import CostModel  # noqa: E402


def scenarios(n: int, seed: int, deadline: float) -> dict[str, tuple[Mix, str, list[tuple[str, dict]]]]:
    rng = np.random.default_rng(seed + 2)
    priorities = [1 if x < 0.2 else 0 for x in rng.random(n)]
    return {
        "tenants": (Mix(tenants=tenants_for("heavy:5,light:1", n, seed)), "tenant", [("fcfs", {}), ("fair-share", {})]),
        "priorities": (Mix(priorities=priorities), "priority", [("fcfs", {}), ("priority", {})]),
        "deadlines": (Mix(deadline_s=deadline), "deadline_s", [("fcfs", {}), ("deadline", {"refuse_late": "true"})]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=6.0)
    p.add_argument("--deadline", type=float, default=2.0, help="seconds to the first token (deadlines scenario)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=8, help="seats per step: below the load, so requests queue")
    p.add_argument("--no-real", action="store_true", help="the simulator only")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from transformers import AutoConfig

    from tandem.engine.model.loader import resolve_path

    vocab = AutoConfig.from_pretrained(resolve_path(args.model)).get_text_config().vocab_size
    work = make("chat", vocab, args.seed, args.requests)
    cost = CostModel.load(calibration_path(args.model))
    report: dict = {k: getattr(args, k) for k in ("model", "rate", "requests", "deadline", "max_num_seqs", "seed")}
    for name, (mix, key, policies) in scenarios(args.requests, args.seed, args.deadline).items():
        for scheduler, options in policies:
            row: dict = {}
            if not args.no_real:
                extra = [a for k, v in options.items() for a in ("--scheduler-opt", f"{k}={v}")]
                extra += ["--max-num-seqs", str(args.max_num_seqs)]
                with LocalServer(args.model, scheduler, extra) as server:
                    records, _ = asyncio.run(run_load(server.target, work, args.rate, None, args.seed, mix=mix))
                row["real"] = by_group(records, key, mix.deadline_s)
            sim = simulate(
                args.model, scheduler, work, args.rate, None, cost, args.seed, options, mix, args.max_num_seqs
            )
            row["sim"] = by_group(sim["records"], key, mix.deadline_s)
            report.setdefault(name, {})[scheduler] = row
            for side, groups in row.items():
                for group, g in groups.items():
                    met = f", met deadline {g['met_deadline']:.0%}" if "met_deadline" in g else ""
                    print(
                        f"{name:<10} {scheduler:<10} {side:<4} {key}={group}: {g['requests']} requests, "
                        f"token share {g['token_share']:.1%}, TTFT p50/p99 {g['ttft_ms']['p50'] or 0:.0f}/"
                        f"{g['ttft_ms']['p99'] or 0:.0f} ms, errors {g['errors']}{met}",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
