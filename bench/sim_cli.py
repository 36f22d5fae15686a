"""`tandem sim` and `tandem sim calibrate`: flags and the printed report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tandem.bench.workloads import NAMES
from tandem.service.logs import configure_logging


def tenants_for(spec: str, n: int, seed: int) -> list[str] | None:
    """`"heavy:5,light:1"`: each request's tenant, drawn in those proportions."""
    if not spec:
        return None
    names, weights = [], []
    for item in spec.split(","):
        name, _, weight = item.partition(":")
        names.append(name)
        weights.append(float(weight or 1))
    p = np.array(weights) / sum(weights)
    return [names[k] for k in np.random.default_rng(seed + 1).choice(len(names), size=n, p=p)]


def cmd_run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from tandem.bench.sim import calibration_path, simulate
    from tandem.bench.workloads import make
    from tandem.engine.device.simulated import CostModel
    from tandem.engine.model.loader import resolve_path
    from tandem.schedulers import parse_options

    path = Path(args.calibration) if args.calibration else calibration_path(args.model)
    if not path.exists():
        raise FileNotFoundError(f"no calibration at {path}: run `tandem sim calibrate --model {args.model}` first")
    cost = CostModel.load(path)
    vocab = AutoConfig.from_pretrained(resolve_path(args.model)).get_text_config().vocab_size
    work = make(args.workload, vocab, args.seed, args.requests)
    tenants = tenants_for(args.tenants, len(work.prompts), args.seed)
    from tandem.bench.serve import Mix

    report = {"model": args.model, "workload": args.workload, "calibration": str(path), "runs": []}
    for rate in args.rate:
        r = simulate(
            args.model,
            args.scheduler,
            work,
            float(rate),
            args.concurrency,
            cost,
            args.seed,
            parse_options(args.scheduler_opt),
            Mix(tenants=tenants),
        )
        r.pop("records")
        r["rate"] = float(rate)
        report["runs"].append(r)
        ttft, itl = r["ttft_ms"], r["itl_ms"]
        print(
            f"{args.scheduler} rate {rate}: {r['output_throughput']:.1f} output tok/s, TTFT p50/p99 "
            f"{ttft['p50']:.0f}/{ttft['p99']:.0f} ms, ITL p50/p99 {itl['p50']:.1f}/{itl['p99']:.1f} ms, "
            f"{r['preemptions']} preemptions ({r['simulated_seconds']:.1f} s simulated in {r['wall_seconds']:.1f} s)"
        )
        for tenant, t in (r.get("tenants") or {}).items():
            ttft = t["ttft_ms"]
            print(f"  tenant {tenant}: {t['requests']} requests, token share {t['token_share']:.1%}, "
                  f"TTFT p50/p99 {ttft['p50'] or 0:.0f}/{ttft['p99'] or 0:.0f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tandem.bench.sim import calibrate, calibrate_serving, calibration_path

    if args.serve:
        cost = calibrate_serving(args.model, args.requests, tuple(float(r) for r in args.rates), args.seed)
    else:
        cost = calibrate(args.model, args.device, args.requests, args.seed)
    out = Path(args.out) if args.out else calibration_path(args.model, cost.device.split(":")[0])
    cost.save(out)
    fit = cost.fit
    print(
        f"{args.model} on {cost.device}: {fit['steps']} steps, held-out error mean {fit['mean_abs_error']:.1%}, "
        f"p90 {fit['p90_abs_error']:.1%}; coefficients {dict(zip(fit['features'], cost.coefficients))}; saved {out}"
    )
    o = cost.overheads
    if args.serve:
        print(f"outside the steps: admission {o.admit_s * 1e3:.2f} ms, between steps {o.step_gap_s * 1e3:.2f} ms, "
              f"delivery {o.deliver_s * 1e3:.2f} ms")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem sim", description=__doc__)
    parser.add_argument("--model", default="bench-llama", help="preset or local model directory")
    parser.add_argument("--scheduler", default="fcfs", help="an installed scheduler plugin")
    parser.add_argument("--scheduler-opt", action="append", default=[], metavar="KEY=VALUE", help="its options")
    parser.add_argument("--workload", choices=NAMES, default="chat")
    parser.add_argument("--rate", nargs="+", default=["inf"], help="requests per second (Poisson); inf: all at once")
    parser.add_argument("--concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--tenants", default="", help='tenants and their share of requests: "heavy:5,light:1"')
    parser.add_argument("--calibration", default=None, help="cost model file (default: the shipped one for --model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report here")
    parser.set_defaults(func=cmd_run)
    sub = parser.add_subparsers(dest="command")
    cal = sub.add_parser("calibrate", help="fit the cost model on the real executor")
    cal.add_argument("--model", default="bench-llama")
    cal.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    cal.add_argument("--requests", type=int, default=96, help="requests of the chat workload to time")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument(
        "--serve", action="store_true", help="time a real `tandem serve` under bench-serve load (CPU) instead"
    )
    cal.add_argument("--rates", nargs="+", default=["1.5", "4"], help="with --serve: the load's request rates")
    cal.add_argument("--out", default=None, help="where to save it (default: tandem/bench/data/)")
    cal.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging(verbose=False)
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
