"""GPU validation of async overlap: one short, self-contained run (nothing downloaded).

    python scripts/gpu_check.py --json gpu_check.json

On CUDA it builds a random-weight Llama-architecture model of about 0.5B parameters (bf16),
checks that synchronous fcfs and async-overlap give identical tokens, and prints output
tokens/s (the median of `--repeats` timed runs on one engine), the device-idle fraction and
device time per step at two batch sizes, for the default path (the Triton paged kernel and
CUDA graphs) and without graphs, and without the kernel (gather + SDPA), next to
transformers' own continuous batching (`generate_batch`) with and without its async
batching, on the same model and prompts. Each tandem row's greedy tokens are checked against
a float32 transformers reference, tie-aware, and so are two built-in presets. Without CUDA it
makes the same pass on a tiny model on the CPU (CI runs it).

The schedulers are found through the package's entry points, so the package must be installed
(on a bare GPU machine: `pip install --no-deps --no-build-isolation --no-index .`, or carry the
wheel that `pip wheel --no-deps -w DIR .` builds here, with the structlog, transformers and
llguidance wheels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tandem.engine import Engine, EngineConfig, SamplingParams, StoppingCriteria  # noqa: E402
from tandem.engine.device.executor import attention_backends  # noqa: E402
from tandem.engine.model.presets import train_tokenizer  # noqa: E402
from tandem.schedulers import load_scheduler  # noqa: E402

GPU_MODELS: dict[str, dict[str, Any]] = {
    "0.5b": dict(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    # Llama-3-8B's shape (random weights): the size users serve, a 128k vocabulary.
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
    ),
}
CPU_MODEL: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
)


def build_model(out: Path, cuda: bool, shape: str = "0.5b") -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = GPU_MODELS[shape] if cuda else CPU_MODEL
    config = LlamaConfig(
        **spec,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.02 if cuda else 0.3,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # random init of billions of weights: on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    train_tokenizer(spec["vocab_size"]).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


# (scheduler, attention, CUDA graphs): the default path first, then what each part buys.
VARIANTS_CUDA = [("fcfs", "auto", True), ("async-overlap", "auto", True), ("fcfs", "auto", False),
                 ("async-overlap", "auto", False), ("fcfs", "gather", False)]  # fmt: skip
VARIANTS_CPU = [("fcfs", "auto", True), ("async-overlap", "auto", True), ("fcfs", "gather", False)]
SCHEDULERS = ("fcfs", "async-overlap")  # the --tensor-parallel rows


def run_tandem(
    path: Path, scheduler: str, batch: int, prompts, new: int, device: str, attention: str = "auto",
    graphs: bool = True, tensor_parallel: int = 1, repeats: int = 1,
) -> dict:  # fmt: skip
    config = EngineConfig(
        model=str(path), device=device, max_num_seqs=batch, max_batch_tokens=max(2048, batch * 16),
        attention=attention, cuda_graphs=graphs, tensor_parallel=tensor_parallel,
        enable_prefix_caching=False,  # each timed run computes every prompt, as the first did
    )  # fmt: skip
    sched = load_scheduler(scheduler, {"policy": "fcfs"} if scheduler == "async-overlap" else {})
    stop = StoppingCriteria(max_new_tokens=new, ignore_eos=True)
    started = time.perf_counter()
    with Engine(config, sched) as engine:
        ready = time.perf_counter() - started  # model load, KV, kernel builds, graph capture
        engine.generate(prompts[:2], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=4))
        s0 = engine.stats()
        compiled0 = triton_variants()
        walls, runs = [], []
        for _ in range(repeats):  # a timed run is short: its median is steadier than one
            start = time.perf_counter()
            runs.append(engine.generate(prompts, SamplingParams(temperature=0), stop))
            walls.append(time.perf_counter() - start)
        done = runs[0]
        compiled = triton_variants()  # Triton compiles while timed: should be none
        compiles = compiled - compiled0 if compiled is not None and compiled0 is not None else None
        s1 = engine.stats()
        busy, idle = s1.device_busy_seconds - s0.device_busy_seconds, s1.device_idle_seconds - s0.device_idle_seconds
        steps = s1.steps - s0.steps
        kernel = {"cpu-kernel": "c++"}.get(engine.info.attention, engine.info.attention)
        replays = s1.graph_replays
    tokens = sum(len(c.token_ids) for c in done)
    tp = f", TP {tensor_parallel}" if tensor_parallel > 1 else ""
    return dict(
        system=f"tandem {scheduler} ({kernel}{', graphs' if replays else ''}{tp})",
        batch=batch,
        tokens_per_s=tokens / float(np.median(walls)),
        runs_tokens_per_s=[tokens / w for w in walls],
        wall_s=float(np.median(walls)),
        repeats_identical=all([c.token_ids for c in r] == [c.token_ids for c in done] for r in runs),
        idle_fraction=idle / (busy + idle) if busy + idle else None,
        step_ms=1e3 * busy / steps if steps else None,  # device time per step (CUDA events on CUDA)
        graph_steps=replays,
        ready_s=ready,
        compiles=compiles,
        outputs=[c.token_ids for c in done],
    )


def triton_variants() -> int | None:
    try:
        from tandem.engine.device.paged_triton import compiled_variants
    except ImportError:  # no Triton (the CPU dry pass)
        return 0
    return compiled_variants()


def preset_check(device: str) -> dict:
    """Greedy on two built-in presets through the default path, against transformers (float32)."""
    from tandem.engine.model.presets import preset_path

    rng = np.random.default_rng(1)
    results = {}
    for name in ("tiny-llama", "tiny-qwen3"):
        prompts = [rng.integers(4, 500, int(rng.integers(4, 200))).tolist() for _ in range(12)]
        config = EngineConfig(model=name, device=device, max_num_seqs=8)
        with Engine(config, load_scheduler("fcfs")) as engine:
            done = engine.generate(prompts, SamplingParams(temperature=0), StoppingCriteria(24, ignore_eos=True))
        ref = reference(preset_path(name), device)
        results[name] = greedy_check(ref, prompts, [c.token_ids for c in done], device)
    return dict(presets=results, presets_match=all(r["mismatches"] == 0 for r in results.values()))


def structured_check(path: Path, device: str) -> dict:
    """JSON-schema requests (greedy and seeded) and one n = 4 request, mixed with unconstrained
    rows, under fcfs and async-overlap: every constrained answer's tokens must be ones the
    grammar accepts, replayed through a fresh matcher (the masks hold on this device), and
    every answer must parse unless max_new_tokens cut it off; whether the two schedulers agree is reported
    (EOS ends these requests at different steps, so batch shapes differ and bf16 near-ties may
    flip)."""
    from tandem.bench.schemas import ORDER_SCHEMA
    from tandem.engine import Constraint, ConstraintKind, GenerationRequest

    schema = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(ORDER_SCHEMA))
    stop = StoppingCriteria(max_new_tokens=400)
    runs = {}
    for name in ("fcfs", "async-overlap"):
        with Engine(EngineConfig(model=str(path), device=device), load_scheduler(name)) as engine:
            requests = [
                GenerationRequest(
                    f"order {i}",
                    SamplingParams(temperature=0) if i % 2 else SamplingParams(temperature=1.0, seed=i),
                    stop if i < 12 else StoppingCriteria(max_new_tokens=64, ignore_eos=True),
                    constraint=schema if i < 12 else None,
                    n=4 if i == 0 else 1,
                )
                for i in range(16)
            ]

            async def run_all(engine: Engine = engine, requests: list[GenerationRequest] = requests) -> list[dict]:
                async def one(request: GenerationRequest) -> dict[int, tuple[list[int], str, str | None]]:
                    got: dict[int, tuple[list[int], str, str | None]] = {}
                    async for out in engine.stream(request):
                        tokens, text, _ = got.get(out.index, ([], "", None))
                        reason = out.finish_reason.value if out.finish_reason else None
                        got[out.index] = (tokens + out.token_ids, text + out.text, reason)
                    return got

                return list(await asyncio.gather(*(one(r) for r in requests)))

            outputs = asyncio.run(run_all())
            answers = [answer for got in outputs[:12] for answer in got.values()]
            # every answer's tokens, replayed through a fresh matcher: a token the grammar refuses
            # is a mask that failed on this device, however the answer ended
            refused = [tokens for tokens, _, _ in answers if not engine.grammar_accepts(schema, tokens)]
        parsed, truncated, failed = 0, 0, [f"grammar refused a token of {tokens[-8:]}" for tokens in refused]
        for _, text, reason in answers:
            try:
                json.loads(text)
                parsed += 1
            except ValueError:  # cut off by max_new_tokens (its tokens replayed above): it ran long
                if reason == "length":
                    truncated += 1
                else:
                    failed.append(f"{reason}: {text[-80:]!r}")
        runs[name] = dict(outputs=outputs, parsed=parsed, truncated=truncated, failed=failed, answers=len(answers))
    return dict(
        structured_parsed={
            name: f"{r['parsed']}/{r['answers']}"
            + (f" ({r['truncated']} cut off at max_new_tokens)" * bool(r["truncated"]))
            for name, r in runs.items()
        },
        structured_failed={name: r["failed"] for name, r in runs.items() if r["failed"]},
        structured_all_parsed=all(not r["failed"] for r in runs.values()),
        structured_identical=runs["fcfs"]["outputs"] == runs["async-overlap"]["outputs"],
    )


@dataclass
class Reference:
    """transformers' float32 model (the judge) and, on CUDA, its bfloat16 model (the noise)."""

    exact: Any
    low: Any | None


def greedy_check(ref: Reference, prompts, outputs: list[list[int]], device: str) -> dict:
    """Tie-aware, at every position: the float32 reference is fed the engine's own tokens
    (teacher forcing), and a token differing from its argmax counts as wrong only where the
    argmax leads by more than bf16 rounding can move a margin: twice the largest deviation of
    transformers' own bf16 logits from float32 on that sequence (a floor of 1e-4 on the CPU's
    float32 dry pass). The logits' scale sets it: ~2 on tiny-llama's large-init logits, ~0.15
    on the ordinarily initialised 0.5B model (2026-11-28, H200)."""
    flips, wrong, worst, checked, noise = 0, 0, 0.0, 0, 0.0
    with torch.inference_mode():
        for prompt, got in zip(prompts, outputs):
            ids = torch.tensor([prompt + got], device=device)
            logits = ref.exact(ids).logits[0, len(prompt) - 1 : -1].float()
            tol = 1e-4
            if ref.low is not None:
                low = ref.low(ids).logits[0, len(prompt) - 1 : -1].float()
                deviation = float((low - logits).abs().max())
                noise, tol = max(noise, deviation), max(tol, 2 * deviation)
            best = logits.argmax(-1)
            chosen = torch.tensor(got, device=device)
            margins = (logits.gather(1, best[:, None]) - logits.gather(1, chosen[:, None]))[:, 0]
            differ = best != chosen
            checked += len(got)
            flips += int((differ & (margins <= tol)).sum())
            wrong += int((differ & (margins > tol)).sum())
            worst = max(worst, float(margins.max())) if len(got) else worst
    return dict(tokens_checked=checked, near_tie_flips=flips, mismatches=wrong, worst_margin=worst, bf16_noise=noise)


def reference(path: Path | str, device: str) -> Reference:
    from transformers import AutoModelForCausalLM

    def load(dtype: torch.dtype) -> Any:
        # device_map: loaded straight onto the device (an 8B float32 judge is 32 GB)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, use_kernels=False).eval()

    return Reference(load(torch.float32), load(torch.bfloat16) if device == "cuda" else None)


def run_transformers(path: Path, batch: int, prompts, new: int, device: str, use_async: bool) -> dict:
    row = dict(
        system=f"transformers generate_batch{' async' if use_async else ''}",
        batch=batch,
        tokens_per_s=None,
        wall_s=None,
        idle_fraction=None,
    )
    try:
        from transformers import AutoModelForCausalLM, GenerationConfig

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_kernels=False).to(device).eval()  # type: ignore[arg-type]
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=1, pad_token_id=2)
        kwargs = {}
        try:
            from transformers import ContinuousBatchingConfig

            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
                use_async_batching=use_async, max_requests_per_batch=batch, auto_switch_to_flash=False
            )
        except (ImportError, TypeError) as exc:
            if use_async:
                raise RuntimeError(f"async batching not configurable in this transformers: {exc}") from exc
        with attention_backends(device):  # the backends tandem uses, so both pay the same attention
            model.generate_batch(prompts[:2], generation_config=gen, **kwargs)
            start = time.perf_counter()
            out = model.generate_batch(prompts, generation_config=gen, **kwargs)
            wall = time.perf_counter() - start
        tokens = sum(len(o.generated_tokens) for o in out.values())
        row.update(tokens_per_s=tokens / wall, wall_s=wall)
    except Exception as exc:  # noqa: BLE001 - a peer's API drift must not stop our check
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


HEADER = (
    f"{'system':<44}{'batch':>6}{'tok/s':>10}{'idle':>8}{'step ms':>9}{'ready s':>8}{'jit':>4}"
    f"{'flips':>7}{'wrong':>7}{'worst':>8}"
)


def row_line(r: dict) -> str:
    tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
    idle = f"{r['idle_fraction']:.1%}" if r["idle_fraction"] is not None else "-"
    step = f"{r['step_ms']:.2f}" if r.get("step_ms") else "-"
    ready = f"{r['ready_s']:.1f}" if r.get("ready_s") else "-"
    jit = f"{r['compiles']:>4}" if r.get("compiles") is not None else f"{'-':>4}"
    check = f"{r['near_tie_flips']:>7}{r['mismatches']:>7}{r['worst_margin']:>8.3f}" if "mismatches" in r else ""
    error = f"  ({r['error']})" if "error" in r else ""
    return f"{r['system']:<44}{r['batch']:>6}{tps:>10}{idle:>8}{step:>9}{ready:>8}{jit}{check}{error}"


def record(report: dict, row: dict, json_path: str) -> None:
    """Print and save each row as it lands: a device lease can end before the run does."""
    report["rows"].append(row)
    print(row_line(row), flush=True)
    Path(json_path).write_text(json.dumps(report, indent=2))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default="gpu_check.json")
    p.add_argument("--cpu", action="store_true", help="force the CPU dry pass")
    p.add_argument(
        "--peers",
        choices=("all", "sync", "none"),
        default="all",
        help="transformers rows: with and without its async batching, without only, or none",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="also run fcfs and async-overlap sharded over N GPUs (a multi-GPU machine; greedy checked too)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tandem row (same engine); the median")
    p.add_argument("--shape", choices=tuple(GPU_MODELS), default="0.5b", help="the random model's shape (CUDA)")
    p.add_argument(
        "--rows",
        choices=("all", "default"),
        default="all",
        help="default: only fcfs and async-overlap on the default path (no structured-output or preset checks)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (CUDA default: 8 64)")
    p.add_argument(
        "--paged-prefill-max",
        type=int,
        default=None,
        metavar="N",
        help="fresh prompts up to N tokens go through the paged kernel (the threshold to tune; 0: all SDPA)",
    )
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    batches, new = ((8, 64), 64) if cuda else ((4, 8), 16)
    batches = tuple(args.batches or batches)
    if args.paged_prefill_max is not None:
        from tandem.engine.device import batch as batch_module

        batch_module.PAGED_PREFILL_MAX = args.paged_prefill_max
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        shape=args.shape if cuda else "cpu",
        paged_prefill_max=args.paged_prefill_max,
        rows=[],
    )
    import transformers

    report["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        report["parameters"] = build_model(path, cuda, args.shape)
        if cuda:
            torch.cuda.empty_cache()  # the built model's memory back, before engines size their KV
        rng = np.random.default_rng(0)
        identical, ok = True, True
        ref = reference(path, device)
        print(HEADER, flush=True)
        workloads = []
        for batch in batches:
            prompts = [rng.integers(4, 500, int(rng.integers(32, 257))).tolist() for _ in range(2 * batch)]
            variants = VARIANTS_CUDA if cuda else VARIANTS_CPU
            runs = [(name, att, graphs, 1) for name, att, graphs in variants[: 2 if args.rows == "default" else None]]
            runs += [(name, "auto", False, args.tensor_parallel) for name in SCHEDULERS if args.tensor_parallel > 1]
            outputs = []
            for name, att, graphs, tp in runs:
                row = run_tandem(path, name, batch, prompts, new, device, att, graphs, tp, args.repeats)
                outputs.append(row.pop("outputs"))
                row.update(greedy_check(ref, prompts, outputs[-1], device))
                ok &= row["mismatches"] == 0 and row["repeats_identical"]
                record(report, row, args.json)
            identical &= outputs[0] == outputs[1]  # fcfs and async-overlap on the default path
            if args.peers != "none":
                record(report, run_transformers(path, batch, prompts, new, device, False), args.json)
            workloads.append((batch, prompts))
        report["sync_async_identical"] = identical
        report["greedy_matches_reference"] = ok
        extras = args.rows == "all"
        report.update(structured_check(path, device) if extras else dict(structured_parsed={}, structured_failed={},
                      structured_all_parsed=True, structured_identical=True))  # fmt: skip
        report.update(preset_check(device) if extras else dict(presets={}, presets_match=True))
        Path(args.json).write_text(json.dumps(report, indent=2))
        for batch, prompts in workloads if args.peers == "all" else []:  # the slowest rows last
            record(report, run_transformers(path, batch, prompts, new, device, True), args.json)
    print(
        f"device={report['device']} params={report['parameters'] / 1e6:.1f}M torch={report['torch']} "
        f"transformers={report['transformers']} sync==async: {identical} "
        f"greedy==reference (tie-aware): {ok} structured output parsed: {report['structured_parsed']} "
        f"(fcfs==async-overlap: {report['structured_identical']})"
    )
    print(f"presets greedy==reference: {report['presets']}")
    if report["structured_failed"]:
        print(f"structured answers that did not parse: {report['structured_failed']}")
    print(HEADER)
    for r in report["rows"]:
        print(row_line(r))
    Path(args.json).write_text(json.dumps(report, indent=2))
    passed = identical and ok and report["structured_all_parsed"] and report["presets_match"]
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
