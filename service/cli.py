"""The `tandem` command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import structlog


def _configure_logging(verbose: bool, fmt: str = "console") -> None:
    """JSON lines (for log pipelines) or console text, to stderr."""
    level = logging.INFO if verbose else logging.WARNING
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="tiny-llama", help="built-in preset (see `tandem models`) or local HF directory")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget in GiB")
    g.add_argument("--kv-blocks", type=int, default=None, help="exact number of KV blocks (overrides --kv-cache-gb)")
    g.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens per step (chunked prefill budget)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--scheduler", default="fcfs", help="scheduling policy (see `tandem schedulers`)")
    g.add_argument("--scheduler-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the scheduler (repeatable)")
    g.add_argument("-v", "--verbose", action="store_true", help="log engine events to stderr")


def _engine_config(args: argparse.Namespace):
    from engine import EngineConfig

    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_gb=args.kv_cache_gb,
        kv_blocks=args.kv_blocks,
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
    )


def _scheduler(args: argparse.Namespace):
    from schedulers import load_scheduler, parse_options

    return load_scheduler(args.scheduler, parse_options(args.scheduler_opt))


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.add_argument("--target", default=None, metavar="HOST:PORT", help="stream from a running tandem server")
    p.add_argument("--tls-ca", default=None, help="with --target: connect over TLS, trusting this PEM CA bundle")
    p.add_argument("--tls-cert", default=None, help="with --target: client certificate (mTLS), PEM")
    p.add_argument("--tls-key", default=None, help="with --target: private key of --tls-cert, PEM")
    p.add_argument("--auth-token-file", default=None, help="with --target: send the first token in this file")


def _channel(args: argparse.Namespace):
    import grpc

    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    return grpc.secure_channel(args.target, creds)


def _generate_remote(args: argparse.Namespace) -> int:
    """Stream from a running server (`--target host:port`)."""
    import grpc

    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc as pb_grpc

    sampling = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty)
    if args.seed is not None:
        sampling.seed = args.seed
    request = pb.GenerateStreamRequest(
        text=args.prompt,
        sampling=sampling,
        stopping=pb.StoppingCriteria(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                                     stop_strings=args.stop, ignore_eos=args.ignore_eos),
    )
    count, reason = 0, None
    metadata = None
    if args.auth_token_file:
        from service.auth import load_tokens

        metadata = (("authorization", f"Bearer {load_tokens(args.auth_token_file)[0].decode()}"),)
    with _channel(args) as channel:
        try:
            for response in pb_grpc.GenerationServiceStub(channel).GenerateStream(request, metadata=metadata):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                count += len(response.token_ids)
                reason = pb.FinishReason.Name(response.finish_reason)
        except grpc.RpcError as exc:
            print(f"tandem: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{count} tokens, finish={reason}]", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import Engine, GenerationRequest, InvalidRequestError, SamplingParams, StoppingCriteria

    if args.target:
        return _generate_remote(args)

    request = GenerationRequest(
        prompt=args.prompt,
        sampling=SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        ),
        stopping=StoppingCriteria(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            stop_strings=args.stop,
            ignore_eos=args.ignore_eos,
        ),
    )
    scheduler = _scheduler(args)  # fails fast, before the model loads
    with Engine(_engine_config(args), scheduler) as engine:

        async def run() -> tuple[int, str | None, float]:
            count, reason, start = 0, None, time.perf_counter()
            async for out in engine.stream(request):
                sys.stdout.write(out.text)
                sys.stdout.flush()
                count += len(out.token_ids)
                reason = out.finish_reason.value if out.finish_reason else None
            return count, reason, time.perf_counter() - start

        try:
            count, reason, seconds = asyncio.run(run())
        except InvalidRequestError as exc:
            print(f"tandem: invalid request: {exc}", file=sys.stderr)
            return 2
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{count} tokens, finish={reason}, {count / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from engine import Engine
    from schedulers import parse_options
    from service.server import ServerOptions, server_credentials, run

    from dataclasses import replace

    from engine import RequestLimits
    from service.auth import load_tokens

    scheduler = _scheduler(args)
    opts = ServerOptions(args.host, args.port, args.grace, args.max_waiting, parse_options(args.scheduler_opt),
                         args.metrics_port, args.max_message_bytes, args.tls_cert, args.tls_key, args.tls_client_ca,
                         load_tokens(args.auth_token_file) if args.auth_token_file else None, args.log_prompts)
    limits = RequestLimits(args.max_prompt_tokens, args.max_new_tokens, args.max_stop_strings,
                           args.max_stop_string_length, args.max_stop_token_ids, args.max_logit_bias)
    config = replace(_engine_config(args), limits=limits, step_timeout_s=args.step_timeout or None)
    server_credentials(opts)  # bad TLS flags fail before the model loads
    return run(Engine(config, scheduler), opts)


def cmd_bench_offline(args: argparse.Namespace) -> int:
    from service.bench.offline import bench_offline, table

    report = bench_offline(args.model, args.workload, args.systems, args.peers, args.static_batch, args.device,
                           args.dtype, args.json, args.seed, args.requests, args.repeats, not args.no_tune,
                           args.tune_requests, progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                           hf_grid=[_hf_setting(item) for item in args.hf_grid] or None)
    w = report["workload"]
    print(f"workload {w['name']}: {w['requests']} requests, {w['prompt_tokens']} prompt tokens, "
          f"{w['output_tokens']} output tokens; {report['environment']}")
    print(table(report))
    _plots(report, args.plots)
    return 0


def _hf_setting(item: str) -> dict:
    """`TOKENS:REQUESTS` -> generate_batch's max_batch_tokens and max_requests_per_batch."""
    tokens, sep, reqs = item.partition(":")
    if not (sep and tokens.isdigit() and reqs.isdigit()):
        raise ValueError(f"--hf-grid: expected MAX_BATCH_TOKENS:MAX_REQUESTS_PER_BATCH, got {item!r}")
    return dict(max_batch_tokens=int(tokens), max_requests_per_batch=int(reqs))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from service.bench.serve import bench_serve, table

    rates = [float(r) for r in args.rate]  # a bad rate is a ValueError: main() reports it, exit 2
    report = bench_serve(args.workload, rates, args.concurrency, args.target, args.model, tuple(args.schedulers),
                         args.requests, args.seed, args.goodput, args.json, offline_baseline=args.offline_baseline)
    print(f"workload {args.workload}; {report['environment']}")
    print(table(report))
    _plots(report, args.plots)
    return 0


def _plots(report: dict, out_dir: str | None) -> None:
    if not out_dir:
        return
    from service.bench.plots import plot_offline, plot_serve

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path in (plot_serve if report["kind"] == "serve" else plot_offline)(report, out_dir):
        print(f"plot: {path}")


def cmd_models(args: argparse.Namespace) -> int:
    from engine.presets import PRESETS

    width = max(len(name) for name in PRESETS)
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from schedulers.registry import available_schedulers, load_class, options_of

    for name, ep in available_schedulers().items():
        try:
            cls = load_class(name)
        except Exception as exc:  # noqa: BLE001 - list broken plugins too, with the reason
            print(f"{name}  [cannot load: {exc}]")
            continue
        opts = ", ".join(f"{k}={p.default!r}" for k, p in options_of(cls).items()) or "no options"
        summary = " ".join((cls.__doc__ or "").split()).split(". ")[0]
        print(f"{name}  ({ep.value}; {opts}) {summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="LLM text generation with pluggable schedulers")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline and stream it to stdout")
    _generate_args(gen)
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="serve tandem.v1 over gRPC")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 or [::] in a mesh)")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM")
    serve.add_argument("--max-waiting", type=int, default=1024,
                       help="waiting requests beyond which new ones get RESOURCE_EXHAUSTED")
    serve.add_argument("--log-format", choices=["json", "console"], default="json")
    serve.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    serve.add_argument("--step-timeout", type=float, default=300.0,
                       help="seconds one engine step may run before the engine is declared hung (0: never)")
    sec = serve.add_argument_group("security")
    sec.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    sec.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    sec.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    sec.add_argument("--auth-token-file", default=None,
                     help="bearer tokens, one per line: every RPC but health needs 'authorization: Bearer <token>'")
    sec.add_argument("--log-prompts", action="store_true", help="log prompt and output text (off by default)")
    lim = serve.add_argument_group("request limits")
    lim.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context length")
    lim.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's context length")
    lim.add_argument("--max-stop-strings", type=int, default=16)
    lim.add_argument("--max-stop-string-length", type=int, default=256, help="characters")
    lim.add_argument("--max-stop-token-ids", type=int, default=64)
    lim.add_argument("--max-logit-bias", type=int, default=300, help="logit_bias entries")
    lim.add_argument("--max-message-bytes", type=int, default=4 * 2**20,
                     help="largest request message; larger ones get RESOURCE_EXHAUSTED")
    _engine_args(serve)
    serve.set_defaults(func=cmd_serve, verbose=True)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    offline = bench.add_parser("offline", help="one workload through each scheduler and through transformers")
    from service.bench.offline import TANDEM_SYSTEMS
    from service.bench.workloads import NAMES

    offline.add_argument("--model", default="bench-llama")
    offline.add_argument("--workload", choices=NAMES, default="offline")
    offline.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    offline.add_argument("--seed", type=int, default=0)
    offline.add_argument("--systems", nargs="*", default=list(TANDEM_SYSTEMS),
                         help="tandem schedulers: NAME or async-overlap:POLICY")
    offline.add_argument("--peers", nargs="*", default=["hf-fifo", "hf-prefill-first", "hf-async-fifo", "hf-static"],
                         choices=["hf-fifo", "hf-prefill-first", "hf-async-fifo", "hf-static"])
    offline.add_argument("--static-batch", type=int, nargs="+", default=[8, 16, 32, 64],
                         help="batch sizes of transformers' static generate (each is a row)")
    offline.add_argument("--repeats", type=int, default=1, help="runs of each tandem system, interleaved; medians")
    offline.add_argument("--no-tune", action="store_true", help="run generate_batch at its defaults only")
    offline.add_argument("--tune-requests", type=int, default=None,
                         help="tune generate_batch on the workload's first N requests, then run the best on all "
                              "(default: every setting runs the whole workload and the best is the result)")
    offline.add_argument("--hf-grid", nargs="*", default=[], metavar="TOKENS:REQUESTS",
                         help="generate_batch settings to tune over (default: its defaults, 512 and 2048 x 16 and 32)")
    offline.add_argument("--device", default=None)
    offline.add_argument("--dtype", default=None)
    offline.add_argument("--json", default=None, help="write every figure and the environment here")
    offline.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    offline.set_defaults(func=cmd_bench_offline)

    serve_b = bench.add_parser("serve", help="gRPC load generator: Poisson arrivals or fixed concurrency")
    serve_b.add_argument("--target", default=None, metavar="HOST:PORT",
                         help="a running server; without it, a local `tandem serve` per --schedulers entry")
    serve_b.add_argument("--model", default="bench-llama", help="model of the local servers")
    serve_b.add_argument("--schedulers", nargs="+", default=["fcfs"], help="local servers, one after the other")
    serve_b.add_argument("--workload", choices=NAMES, default="chat")
    serve_b.add_argument("--requests", type=int, default=None, help="override the workload's request count")
    serve_b.add_argument("--rate", nargs="+", default=["inf"], help="requests/s (Poisson); several make a sweep")
    serve_b.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    serve_b.add_argument("--goodput", nargs="*", default=[], metavar="ttft:MS|tpot:MS",
                         help="SLOs; goodput counts requests meeting all of them")
    serve_b.add_argument("--offline-baseline", action="store_true",
                         help="after each local server, run the same workload in-process; report gRPC / offline")
    serve_b.add_argument("--seed", type=int, default=0)
    serve_b.add_argument("--json", default=None, help="write every figure, per-request latencies and the environment")
    serve_b.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots here")
    serve_b.set_defaults(func=cmd_bench_serve)
    models = sub.add_parser("models", help="list the built-in model presets")
    models.set_defaults(func=cmd_models)
    scheds = sub.add_parser("schedulers", help="list the installed scheduler plugins")
    scheds.set_defaults(func=cmd_schedulers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", False), getattr(args, "log_format", "console"))
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
