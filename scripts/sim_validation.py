"""The simulator against the real server, side by side in one run (BENCHMARKS.md).

    .venv/bin/python scripts/sim_validation.py --json docs/bench/sim_validation.json

Each round: (1) `tandem sim calibrate --serve` on another draw of the `chat` workload (seed + 1:
the validation requests are not the ones fitted); (2) per scheduler, `tandem bench serve` (a
fresh server per rate) on the validation requests; (3) `tandem sim` on the same requests and
arrivals with the calibration of (1). Calibrating in the same run matters: this machine is
shared, and its step times drift by 20% and more between hours.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.bench.serve import bench_serve  # noqa: E402
from tandem.bench.sim import calibrate_serving, simulate  # noqa: E402
from tandem.bench.workloads import make  # noqa: E402

FIGURES = (("output tok/s", "output_throughput", None), ("TTFT p50", "ttft_ms", "p50"), ("TTFT p99", "ttft_ms", "p99"),
           ("ITL p50", "itl_ms", "p50"), ("ITL p99", "itl_ms", "p99"))  # fmt: skip
TARGET = 0.15


def figure(run: dict, key: str, q: str | None) -> float:
    return float(run[key] if q is None else run[key][q])


def one_round(args: argparse.Namespace, vocab: int) -> dict:
    cost = calibrate_serving(args.model, args.calibration_requests, tuple(args.rate), args.seed + 1)
    print(f"calibration: {cost.fit['steps']} steps, held-out error {cost.fit['mean_abs_error']:.1%}; {cost.overheads}")
    work = make("chat", vocab, args.seed, args.requests)
    real = bench_serve("chat", args.rate, None, model=args.model, schedulers=tuple(args.schedulers),
                       requests=args.requests, seed=args.seed)  # fmt: skip
    rows = []
    for server, scheduler in zip(real["servers"], args.schedulers):
        for run in server["runs"]:
            sim = simulate(args.model, scheduler, work, run["rate"], None, cost, args.seed)
            pairs = {name: (figure(run, key, q), figure(sim, key, q)) for name, key, q in FIGURES}
            rows.append(dict(scheduler=scheduler, rate=run["rate"], figures=pairs))
    return dict(calibration=asdict(cost), rows=rows)


def table(rounds: list[dict]) -> str:
    lines = ["| round | scheduler | rate | " + " | ".join(n for n, _, _ in FIGURES) + " |"]
    lines.append("|" + " --- |" * (3 + len(FIGURES)))
    for k, rnd in enumerate(rounds, 1):
        for row in rnd["rows"]:
            cells = []
            for name, _, _ in FIGURES:
                real, sim = row["figures"][name]
                diff = (sim - real) / real
                mark = "" if abs(diff) <= TARGET else " ✗"
                cells.append(f"{real:.1f} / {sim:.1f} ({diff:+.0%}){mark}")
            lines.append(f"| {k} | {row['scheduler']} | {row['rate']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bench-llama")
    p.add_argument("--schedulers", nargs="+", default=["fcfs", "prefill-priority"])
    p.add_argument("--rate", type=float, nargs="+", default=[1.5, 4.0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--calibration-requests", type=int, default=96)
    p.add_argument("--rounds", type=int, default=1, help="repeat: the spread between rounds is the machine's noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from transformers import AutoConfig

    from tandem.engine.model.loader import resolve_path

    vocab = AutoConfig.from_pretrained(resolve_path(args.model)).get_text_config().vocab_size
    rounds = [one_round(args, vocab) for _ in range(args.rounds)]
    print(table(rounds))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rounds=rounds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
