"""`tandem bench offline` and `tandem bench serve`: the flags, and the reports printed and plotted."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from tandem.bench.offline import TANDEM_SYSTEMS
from tandem.bench.workloads import NAMES
from tandem.service.logs import configure_logging

EXTRA = "bench"
PEERS = ["hf-fifo", "hf-prefill-first", "hf-async-fifo", "hf-static"]


def missing_extra(args: argparse.Namespace) -> list[str]:
    """The `bench` extra's modules this run needs and lacks: matplotlib for --plots, psutil for
    transformers' continuous batching (the offline peers)."""
    needed = ["matplotlib"] if getattr(args, "plots", None) else []
    if args.bench == "mesh":
        needed += ["smg", "openai"]
    if args.bench == "offline" and any(p.startswith("hf-") for p in args.peers):
        needed.append("psutil")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def cmd_offline(args: argparse.Namespace) -> int:
    from tandem.bench.offline import bench_offline, table

    report = bench_offline(
        args.model,
        args.workload,
        args.systems,
        args.peers,
        args.static_batch,
        args.device,
        args.dtype,
        args.json,
        args.seed,
        args.requests,
        args.repeats,
        not args.no_tune,
        args.tune_requests,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        hf_grid=[_hf_setting(item) for item in args.hf_grid] or None,
        streams=args.streams,
    )
    w = report["workload"]
    print(
        f"workload {w['name']}: {w['requests']} requests, {w['prompt_tokens']} prompt tokens, "
        f"{w['output_tokens']} output tokens; {report['environment']}"
    )
    print(table(report))
    _plots(report, args.plots)
    return 0


def _hf_setting(item: str) -> dict[str, int]:
    """`TOKENS:REQUESTS` -> generate_batch's max_batch_tokens and max_requests_per_batch."""
    tokens, sep, reqs = item.partition(":")
    if not (sep and tokens.isdigit() and reqs.isdigit()):
        raise ValueError(f"--hf-grid: expected MAX_BATCH_TOKENS:MAX_REQUESTS_PER_BATCH, got {item!r}")
    return dict(max_batch_tokens=int(tokens), max_requests_per_batch=int(reqs))


def cmd_serve(args: argparse.Namespace) -> int:
    from tandem.bench.serve import bench_serve, table

    rates = [float(r) for r in args.rate]  # a bad rate is a ValueError: main() reports it, exit 2
    report = bench_serve(
        args.workload,
        rates,
        args.concurrency,
        args.target,
        args.model,
        tuple(args.schedulers),
        args.requests,
        args.seed,
        args.goodput,
        args.json,
        offline_baseline=args.offline_baseline,
        repeats=args.repeats,
    )
    print(f"workload {args.workload}; {report['environment']}")
    print(table(report))
    for scheduler, by_rate in report.get("of_offline_median", {}).items():
        medians = ", ".join(f"rate {rate}: {m:.3f}" for rate, m in by_rate.items())
        print(f"{scheduler} gRPC / offline, median of {args.repeats} rounds: {medians}")
    _plots(report, args.plots)
    return 0


def cmd_mesh(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoConfig

    from tandem.bench import mesh
    from tandem.bench.workloads import make
    from tandem.engine.model.loader import resolve_path

    vocab = AutoConfig.from_pretrained(resolve_path(args.model)).vocab_size
    report: dict = {"model": args.model, "concurrency": args.concurrency}
    if "overhead" in args.what:
        work = make(args.overhead_workload, vocab, requests=args.requests)
        report["overhead"] = row = mesh.overhead(args.model, work, args.concurrency)
        print(
            f"{args.overhead_workload}, {len(work.prompts)} requests at {args.concurrency} in flight: "
            f"direct gRPC {row['direct']['output_tok_s']:.1f} tok/s, through smg {row['smg']['output_tok_s']:.1f} "
            f"tok/s, ratio {row['ratio']:.3f} (errors {row['direct']['errors']} / {row['smg']['errors']})"
        )
    if "routing" in args.what:
        report["routing"] = {}
        for name in args.routing_workloads:
            work = make(name, vocab, requests=args.requests)
            report["routing"][name] = rows = mesh.routing(args.model, work, args.concurrency, tuple(args.policies))
            for policy, r in rows.items():
                print(
                    f"{name} over two replicas, {policy}: prefix-cache hit rate {r['hit_rate']:.1%}, "
                    f"{r['output_tok_s']:.1f} output tok/s, {r['errors']} errors"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_structured(args: argparse.Namespace) -> int:
    import json

    from tandem.bench import structured

    report: dict = {"model": args.model, "requests": args.requests, "concurrency": args.concurrency}
    for scheduler in args.schedulers:
        row = structured.constrained_vs_free(
            args.model, scheduler, args.requests, args.concurrency, args.repeats, args.max_new_tokens, args.seed
        )
        report.setdefault("constrained", []).append(row)
        for r in row["rounds"]:
            print(
                f"{scheduler}: JSON schema {r['constrained_tok_s']:.1f} tok/s, "
                f"unconstrained {r['unconstrained_tok_s']:.1f} tok/s, ratio {r['ratio']:.3f}; "
                f"masks {r['mask_ms_per_step']:.2f} ms/step of {r['step_ms']:.1f} "
                f"({r['mask_us_per_token']:.0f} us/token); valid {r['valid_json']}"
            )
    if args.n:
        row = structured.samples_vs_separate(
            args.model, args.schedulers[0], args.requests // args.n, args.n, args.n_max_new_tokens, args.seed
        )
        report["samples"] = row
        for label in ("n", "separate", "n again", "separate again"):
            r = row[label]
            print(
                f"{label}: {r['prompt_tokens_computed']} prompt tokens computed "
                f"(prompts: {row['prompt_tokens']}), {r['output_tok_s']:.1f} output tok/s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _plots(report: dict, out_dir: str | None) -> None:
    if not out_dir:
        return
    from tandem.bench.plots import plot_offline, plot_serve

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path in (plot_serve if report["kind"] == "serve" else plot_offline)(report, out_dir):
        print(f"plot: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem bench", description="benchmarks: tandem against transformers")
    bench = parser.add_subparsers(dest="bench", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    offline = bench.add_parser(
        "offline", help="one workload through each scheduler and through transformers", formatter_class=fmt
    )
    offline.add_argument("--model", default="bench-llama", help="built-in model, .gguf file or HF directory")
    offline.add_argument("--workload", choices=NAMES, default="offline", help="named, seeded workload")
    offline.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    offline.add_argument("--seed", type=int, default=0, help="workload seed")
    offline.add_argument(
        "--systems", nargs="*", default=list(TANDEM_SYSTEMS), help="tandem schedulers: NAME or async-overlap:POLICY"
    )
    offline.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS, help="transformers' systems")
    offline.add_argument(
        "--static-batch",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64],
        help="batch sizes of transformers' static generate (each is a row)",
    )
    offline.add_argument(
        "--streams",
        type=int,
        default=None,
        help="requests running at once in every system (tandem's max_num_seqs, generate_batch's "
        "max_requests_per_batch, the static batch)",
    )
    offline.add_argument("--repeats", type=int, default=1, help="runs of each tandem system, interleaved; medians")
    offline.add_argument("--no-tune", action="store_true", help="run generate_batch at its defaults only")
    offline.add_argument(
        "--tune-requests",
        type=int,
        default=None,
        help="tune generate_batch on the workload's first N requests, then run the best on all "
        "(default: every setting runs the whole workload and the best is the result)",
    )
    offline.add_argument(
        "--hf-grid",
        nargs="*",
        default=[],
        metavar="TOKENS:REQUESTS",
        help="generate_batch settings to tune over (default: its defaults, 512 and 2048 x 16 and 32)",
    )
    offline.add_argument("--device", default=None, help="default: cuda when available")
    offline.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on CUDA, else fp32"
    )
    offline.add_argument("--json", default=None, help="write every figure and the environment here")
    offline.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    offline.set_defaults(func=cmd_offline)

    serve = bench.add_parser(
        "serve", help="gRPC load generator: Poisson arrivals or fixed concurrency", formatter_class=fmt
    )
    serve.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="a running server; without it, a local `tandem serve` per --schedulers entry",
    )
    serve.add_argument("--model", default="bench-llama", help="model of the local servers")
    serve.add_argument("--schedulers", nargs="+", default=["fcfs"], help="local servers, one after the other")
    serve.add_argument("--workload", choices=NAMES, default="chat", help="named, seeded workload")
    serve.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    serve.add_argument("--rate", nargs="+", default=["inf"], help="requests/s (Poisson); several make a sweep")
    serve.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    serve.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        metavar="ttft:MS|tpot:MS",
        help="SLOs; goodput counts requests meeting all of them",
    )
    serve.add_argument(
        "--offline-baseline",
        action="store_true",
        help="after each local server, run the same workload in-process; report gRPC / offline",
    )
    serve.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every local server (and baseline), alternated; with --offline-baseline, the median",
    )
    serve.add_argument("--seed", type=int, default=0, help="workload seed")
    serve.add_argument("--json", default=None, help="write every figure, per-request latencies and the environment")
    serve.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    serve.set_defaults(func=cmd_serve)

    mesh = bench.add_parser(
        "mesh", help="behind smg: the router's cost, and cache-aware against round-robin", formatter_class=fmt
    )
    mesh.add_argument("--model", default="bench-llama", help="preset or local model directory")
    mesh.add_argument("--what", nargs="+", choices=("overhead", "routing"), default=["overhead", "routing"])
    mesh.add_argument("--overhead-workload", choices=NAMES, default="chat", help="for the router's cost")
    mesh.add_argument("--requests", type=int, default=None, help="override the workloads' request counts")
    mesh.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    mesh.add_argument("--routing-workloads", nargs="+", choices=NAMES, default=["shared-prefix", "prefix-groups"])
    mesh.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"], help="smg policies compared")
    mesh.add_argument("--json", default=None, help="write every figure")
    mesh.set_defaults(func=cmd_mesh)

    st = bench.add_parser(
        "structured",
        help="a JSON schema against no constraint; n samples against separate requests",
        formatter_class=fmt,
    )
    st.add_argument("--model", default="bench-llama", help="preset or local model directory")
    st.add_argument("--schedulers", nargs="+", default=["fcfs", "async-overlap"], help="one engine each")
    st.add_argument("--requests", type=int, default=128, help="requests per run")
    st.add_argument("--concurrency", type=int, default=64, help="streams in flight")
    st.add_argument("--repeats", type=int, default=2, help="constrained/unconstrained pairs, alternating")
    st.add_argument("--max-new-tokens", type=int, default=512, help="cap on a constrained answer")
    st.add_argument("--n", type=int, default=4, help="samples per request against separate requests (0: skip)")
    st.add_argument("--n-max-new-tokens", type=int, default=64, help="tokens per sample")
    st.add_argument("--seed", type=int, default=0, help="workload seed")
    st.add_argument("--json", default=None, help="write every figure")
    st.set_defaults(func=cmd_structured)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(verbose=False)
    if missing := missing_extra(args):
        print(
            f"tandem bench needs the '{EXTRA}' extra ({', '.join(missing)} missing): pip install 'tandem[{EXTRA}]'",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
