"""The `tandem` command line. Flags set config dataclasses by field name (service.flags)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import tandem
from tandem.engine.config import ATTENTION_BACKENDS, EngineConfig
from tandem.engine.request import (
    Constraint,
    ConstraintKind,
    GenerationRequest,
    RequestLimits,
    SamplingParams,
    StoppingCriteria,
)
from tandem.schedulers import Scheduler, load_scheduler, parse_options
from tandem.service.flags import HelpFormatter, field_flag, from_flags
from tandem.service.logs import configure_logging
from tandem.service.server import ServerOptions


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    E = EngineConfig
    field_flag(g, E, "model", help="built-in model (see `tandem models`), a .gguf file, or a local HF directory")
    field_flag(
        g,
        E,
        "dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on the CPU",
    )
    field_flag(g, E, "device", help="cpu, cuda, cuda:N (default: cuda when available)")
    field_flag(g, E, "block_size", type=int, help="tokens per KV block")
    field_flag(
        g, E, "kv_cache_gb", type=float, help="KV cache budget in GiB (default: 1 on the CPU, a fraction on CUDA)"
    )
    field_flag(g, E, "kv_blocks", type=int, help="exact number of KV blocks (overrides --kv-cache-gb)")
    field_flag(g, E, "max_batch_tokens", type=int, help="tokens per step (chunked prefill budget)")
    field_flag(g, E, "max_num_seqs", type=int, help="sequences per step")
    field_flag(
        g, E, "enable_prefix_caching", "--no-prefix-caching", action="store_false", help="turn prefix caching off"
    )
    field_flag(
        g, E, "attention", choices=list(ATTENTION_BACKENDS),
        help="auto: the Triton paged kernel on CUDA, the C++ decode kernel on the CPU; gather: copy + SDPA",
    )  # fmt: skip
    field_flag(g, E, "cuda_graphs", "--no-cuda-graphs", action="store_false", help="run decode steps eagerly on CUDA")
    field_flag(
        g, E, "tensor_parallel", type=positive_int, help="shard the model over N ranks: N GPUs, or N CPU processes"
    )
    field_flag(g, E, "step_trace", metavar="FILE", help="append each step's shape and wall time (JSON lines)")
    g.add_argument("--scheduler", default="fcfs", help="scheduling policy (see `tandem schedulers`)")
    g.add_argument(
        "--scheduler-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the scheduler (repeatable)",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log engine events to stderr")


def seconds_or_never(text: str) -> float | None:
    """A number of seconds; 0 means never."""
    return float(text) or None


def _scheduler(args: argparse.Namespace) -> Scheduler:
    return load_scheduler(args.scheduler, parse_options(args.scheduler_opt))


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    S, T = SamplingParams, StoppingCriteria
    field_flag(p, T, "max_new_tokens", type=int, default=64, help="tokens to generate at most")
    field_flag(p, T, "min_new_tokens", type=int, help="tokens before EOS or a stop may end it")
    field_flag(p, S, "temperature", type=float, help="0 means greedy")
    field_flag(p, S, "top_k", type=int, help="0: off")
    field_flag(p, S, "top_p", type=float, help="1: off")
    field_flag(p, S, "min_p", type=float, help="0: off")
    field_flag(p, S, "repetition_penalty", type=float, help="1: off")
    field_flag(p, S, "seed", type=int, help="seed this request's draws (default: the engine's generator)")
    field_flag(p, T, "stop_strings", "--stop", action="append", help="stop string (repeatable)")
    field_flag(p, T, "ignore_eos", action="store_true", help="generate past the EOS token")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="structured output: JSON valid under this schema")
    shape.add_argument("--json-object", action="store_true", help="structured output: any JSON object")
    shape.add_argument("--regex", help="structured output: text that fully matches this regex")
    shape.add_argument("--grammar", metavar="FILE", help="structured output: a Lark or GBNF grammar")
    shape.add_argument("--choice", action="append", help="structured output: one of these strings (repeatable)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    p.add_argument("--target", default=None, metavar="HOST:PORT", help="stream from a running tandem server")
    p.add_argument("--tls-ca", default=None, help="with --target: connect over TLS, trusting this PEM CA bundle")
    p.add_argument("--tls-cert", default=None, help="with --target: client certificate (mTLS), PEM")
    p.add_argument("--tls-key", default=None, help="with --target: private key of --tls-cert, PEM")
    p.add_argument("--auth-token-file", default=None, help="with --target: send the first token in this file")


def _constraint(args: argparse.Namespace) -> Constraint | None:
    if args.json_schema:
        return Constraint(ConstraintKind.JSON_SCHEMA, Path(args.json_schema).read_text())
    if args.json_object:
        return Constraint(ConstraintKind.JSON_OBJECT)
    if args.regex:
        return Constraint(ConstraintKind.REGEX, args.regex)
    if args.grammar:
        return Constraint(ConstraintKind.GRAMMAR, Path(args.grammar).read_text())
    if args.choice:
        return Constraint(ConstraintKind.CHOICE, tuple(args.choice))
    return None


def _request(args: argparse.Namespace) -> GenerationRequest:
    sampling, stopping = from_flags(SamplingParams, args), from_flags(StoppingCriteria, args)
    return GenerationRequest(args.prompt, sampling, stopping, constraint=_constraint(args))


def _channel(args: argparse.Namespace):  # -> grpc.Channel
    import grpc

    if not args.tls_ca:
        return grpc.insecure_channel(args.target)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    return grpc.secure_channel(args.target, creds)


def _generate_remote(args: argparse.Namespace, request: GenerationRequest) -> int:
    """Stream from a running server (`--target host:port`)."""
    import grpc

    from tandem.service.convert import to_message
    from tandem.v1 import generation_pb2 as pb
    from tandem.v1 import generation_pb2_grpc as pb_grpc

    count, reason = 0, None
    metadata = None
    if args.auth_token_file:
        from tandem.service.auth import load_tokens

        metadata = (("authorization", f"Bearer {load_tokens(args.auth_token_file)[0].decode()}"),)
    with _channel(args) as channel:
        try:
            message = to_message(request)
            if args.chat:
                message.messages.messages.add(role="user", content=args.prompt)
            for response in pb_grpc.GenerationServiceStub(channel).GenerateStream(message, metadata=metadata):
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
    from tandem.engine import Engine, InvalidRequestError

    request = _request(args)
    if args.target:
        return _generate_remote(args, request)
    scheduler = _scheduler(args)  # fails fast, before the model loads
    with Engine(from_flags(EngineConfig, args), scheduler) as engine:

        async def run() -> tuple[int, str | None, float]:
            count, reason, start = 0, None, time.perf_counter()
            if args.chat:
                request.prompt = await engine.render_chat([{"role": "user", "content": args.prompt}])
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _serve_args(serve: argparse.ArgumentParser) -> None:
    opts = ServerOptions
    field_flag(serve, opts, "host", help="address to bind (0.0.0.0 or [::] in a mesh)")
    field_flag(serve, opts, "port", type=int, help="0 picks a free port")
    field_flag(serve, opts, "grace", type=float, help="seconds in-flight streams get on SIGTERM")
    field_flag(serve, opts, "max_waiting", type=int, help="waiting requests past which new ones get RESOURCE_EXHAUSTED")
    serve.add_argument("--log-format", choices=["json", "console"], default="json", help="log lines as")
    field_flag(serve, opts, "metrics_port", type=int, help="serve Prometheus metrics on this port (0 picks one)")
    field_flag(
        serve, opts, "otlp_endpoint", help="export OpenTelemetry traces over OTLP/gRPC here (the 'tracing' extra)"
    )
    field_flag(
        serve,
        EngineConfig,
        "step_timeout_s",
        "--step-timeout",
        type=seconds_or_never,
        default=300.0,
        help="seconds one engine step may run before the engine is declared hung (0: never)",
    )
    sec = serve.add_argument_group("security")
    field_flag(sec, opts, "tls_cert", help="PEM certificate chain: serve TLS")
    field_flag(sec, opts, "tls_key", help="PEM private key of --tls-cert")
    field_flag(sec, opts, "tls_client_ca", help="PEM CA bundle: require client certificates (mTLS)")
    sec.add_argument(
        "--auth-token-file",
        default=None,
        help="bearer tokens, one per line: every RPC but health needs 'authorization: Bearer <token>'",
    )
    field_flag(sec, opts, "log_prompts", action="store_true", help="log prompt and output text")
    field_flag(
        sec, opts, "max_health_watches_per_peer", type=int, help="health Watch streams one client address may hold"
    )
    lim = serve.add_argument_group("request limits")
    L = RequestLimits
    field_flag(lim, L, "max_prompt_tokens", type=int, help="default: the model's context length")
    field_flag(lim, L, "max_new_tokens", type=int, help="default: the model's context length")
    field_flag(lim, L, "max_stop_strings", type=int, help="stop strings per request")
    field_flag(lim, L, "max_stop_string_chars", "--max-stop-string-length", type=int, help="characters")
    field_flag(lim, L, "max_stop_token_ids", type=int, help="stop token ids per request")
    field_flag(lim, L, "max_logit_bias", type=int, help="logit_bias entries")
    field_flag(lim, L, "max_n", type=int, help="samples per request (n)")
    field_flag(lim, L, "max_constraint_chars", type=int, help="characters of a schema, regex, grammar or choices")
    field_flag(
        lim, opts, "max_message_bytes", type=int, help="largest request message; larger ones get RESOURCE_EXHAUSTED"
    )
    _engine_args(serve)
    serve.set_defaults(func=cmd_serve, verbose=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from tandem.engine import Engine
    from tandem.service.auth import load_named_tokens
    from tandem.service.server import run, server_credentials

    scheduler = _scheduler(args)
    named = load_named_tokens(args.auth_token_file) if args.auth_token_file else None
    tokens = [token for _, token in named] if named else None
    opts = from_flags(ServerOptions, args, auth_tokens=tokens, token_names=named)
    server_credentials(opts)  # bad TLS flags fail before the model loads
    if opts.otlp_endpoint:
        from tandem.service.tracing import setup_otlp

        setup_otlp(opts.otlp_endpoint)  # a missing extra fails before the model loads
    config = from_flags(EngineConfig, args, limits=from_flags(RequestLimits, args))
    return run(lambda: Engine(config, scheduler), opts)


def cmd_bench(argv: list[str]) -> int:
    from tandem.bench.cli import main as bench_main  # only here: serving never imports bench code

    return bench_main(argv)


def cmd_models(args: argparse.Namespace) -> int:
    from tandem.engine.config import DEFAULT_MODEL
    from tandem.engine.model.presets import PACKAGED, PRESETS

    rows = [(n, p.description + (" [default]" if n == DEFAULT_MODEL else "")) for n, p in PACKAGED.items()]
    rows += [(n, f"{p.description} [random weights]") for n, p in PRESETS.items()]
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from tandem.schedulers.registry import available_schedulers, load_class, options_of

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
    parser.add_argument("--version", action="version", version=f"tandem {tandem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate text offline and stream it to stdout", formatter_class=HelpFormatter
    )
    _generate_args(gen)
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    serve = sub.add_parser("serve", help="serve tandem.v1 over gRPC", formatter_class=HelpFormatter)
    _serve_args(serve)
    # Listed for --help; main() hands `tandem bench ...` to tandem.bench, which has its own flags.
    sub.add_parser("bench", help="benchmarks against transformers (needs the 'bench' extra)", add_help=False)
    sub.add_parser("sim", help="a scheduler on the engine core in simulated time; `sim calibrate`", add_help=False)
    sub.add_parser("models", help="list the built-in models").set_defaults(func=cmd_models)
    sub.add_parser("schedulers", help="list the installed scheduler plugins").set_defaults(func=cmd_schedulers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    if argv[:1] == ["sim"]:
        from tandem.bench.sim_cli import main as sim_main  # only here: serving never imports bench code

        return sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False), getattr(args, "log_format", "console"))
    try:
        return int(args.func(args))
    except (FileNotFoundError, ValueError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
