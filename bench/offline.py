"""`tandem bench offline`: one workload through each tandem scheduler and through
transformers' own batching, in one process, one after the other."""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from tandem.bench.progress import Progress
from tandem.bench.workloads import Workload, make
from tandem.engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
from tandem.engine.host.threads import on_fresh_thread
from tandem.schedulers import load_scheduler

WARMUP_PROMPT = [3] * 20  # a full KV block and more, of a token no workload uses
TANDEM_SYSTEMS = ("fcfs", "prefill-priority", "async-overlap:fcfs", "async-overlap:prefill-priority")


@dataclass
class Result:
    system: str
    settings: dict
    output_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    device_idle_fraction: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def run_tandem(
    spec: str,
    model: str,
    work: Workload,
    device: str | None,
    dtype: str | None,
    rooflines: dict[int, float],
    streams: int | None = None,
) -> Result:
    """One timed run of the workload; `rooflines` caches the matmul roofline per batch size."""
    from tandem.bench.utilisation import matmul_roofline, model_flops, read_bandwidth, utilisation

    name, _, policy = spec.partition(":")
    options = {"policy": policy} if policy else {}
    result = Result(f"tandem {spec}", dict(scheduler=name, **options))
    config = EngineConfig(model=model, device=device, dtype=dtype)
    if streams:
        config.max_num_seqs = streams
    with Engine(config, load_scheduler(name, options)) as engine:
        model_ = engine.model.model
        # NOTE: before the engine's first step, and on a thread that exits: a second live
        # OpenMP team slows every GEMM (engine/host/threads.py); measured with one, the roofline
        # read 12% low (192 vs 217 GFLOP/s) and flattered the fraction.
        roofline_at = lambda b: rooflines.setdefault(b, on_fresh_thread(matmul_roofline, model_, b))  # noqa: E731
        roofline_at(config.max_num_seqs)
        stops = [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in work.output_lens]
        # Warm-up on a prompt of no workload (ids 0-3 are the presets' specials, never drawn): a
        # workload prompt would put its blocks (a shared prefix) in the cache before timing.
        engine.generate([WARMUP_PROMPT], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=2))
        before = engine.stats()
        trace = engine.trace_steps()
        progress = Progress(result.system, len(work.prompts))
        start = time.perf_counter()
        done = engine.generate(work.prompts, SamplingParams(temperature=0), stops, on_finish=progress.advance)
        result.seconds = time.perf_counter() - start
        progress.close()
        after = engine.stats()
        busy = after.device_busy_seconds - before.device_busy_seconds
        idle = after.device_idle_seconds - before.device_idle_seconds
    result.device_idle_fraction = idle / (busy + idle) if busy + idle else None
    result.settings.update(max_num_seqs=config.max_num_seqs, max_batch_tokens=config.max_batch_tokens)
    decode_batches = [t.decode_rows for t in trace if t.decode_rows == t.tokens]
    if decode_batches:  # after the engine has stopped: a roofline measured now has the CPU alone
        bandwidth = on_fresh_thread(read_bandwidth, model_.device)
        util = utilisation(trace, model_flops(model_), roofline_at, max(decode_batches), bandwidth)
        if util is not None:
            result.extra["utilisation"] = asdict(util) | util.figures()
    result.extra["steps"] = len(trace)
    result.output_tokens = sum(len(c.token_ids) for c in done)
    result.extra["cached_tokens"] = [c.num_cached_tokens for c in done]  # prefix-cache hits, per request
    result.tokens_per_s = result.output_tokens / result.seconds
    return result


def _hf_model(path, device: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # type: ignore[arg-type]


def run_hf_generate_batch(
    model, work: Workload, scheduler: str, use_async: bool, settings: dict, label: str = ""
) -> Result:
    """transformers' continuous batching through its manager, each request with its own
    max_new_tokens and no EOS (eos id -1), so it generates exactly the workload's lengths."""
    result = Result(
        label or f"transformers generate_batch {scheduler}{' async' if use_async else ''}",
        dict(scheduler_type=scheduler, use_async_batching=use_async, **settings),
    )
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        longest = max(work.output_lens)
        gen = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=1, pad_token_id=2)
        cfg = ContinuousBatchingConfig(
            scheduler_type=scheduler, use_async_batching=use_async, auto_switch_to_flash=False, **settings
        )
        hints = WorkloadHints(
            max_prompt_length=max(map(len, work.prompts)), max_generated_length=longest, num_requests=len(work.prompts)
        )
        with model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=cfg, block=True, timeout=5, workload_hints=hints
        ) as manager:
            progress = Progress(result.system, len(work.prompts))
            start = time.perf_counter()
            for prompt, n in zip(work.prompts, work.output_lens):
                manager.add_request(prompt, max_new_tokens=n, eos_token_id=-1)
            while progress.done < len(work.prompts):
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    if out.error:
                        raise RuntimeError(out.error)
                    result.output_tokens += len(out.generated_tokens)
                    progress.advance()
                elif out is None and not manager.is_running():
                    raise RuntimeError("transformers' batching thread stopped")
            result.seconds = time.perf_counter() - start
            progress.close()
        result.tokens_per_s = result.output_tokens / result.seconds
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a row, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


def run_hf_static(model, work: Workload, batch_size: int) -> Result:
    """transformers' static `generate`, left-padded batches in arrival order; each batch runs
    to its longest member, but only what each request asked for counts."""
    result = Result(f"transformers generate (static, batch {batch_size})", dict(batch_size=batch_size))
    try:
        device = model.device
        progress = Progress(result.system, len(work.prompts))
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(work.prompts), batch_size):
            prompts, lens = work.prompts[i : i + batch_size], work.output_lens[i : i + batch_size]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), 2, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(prompts):
                ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            with torch.inference_mode():
                model.generate(
                    ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max(lens),
                    min_new_tokens=max(lens),
                    do_sample=False,
                    pad_token_id=2,
                )
            tokens += sum(lens)
            progress.advance(len(prompts))
        result.seconds = time.perf_counter() - start
        progress.close()
        result.output_tokens = tokens
        result.tokens_per_s = tokens / result.seconds
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


def tune_hf(
    model, work: Workload, scheduler: str, grid: list[dict] | None = None, tune_requests: int | None = None
) -> tuple[Result, list[Result]]:
    """transformers' generate_batch on the workload (or its first `tune_requests` requests) at
    each setting of `grid`, or by default at the settings `lattice_search` picks. Returns the
    fastest trial (its extra["search"] says where it lies) and all of them."""
    if tune_requests is not None:
        work = Workload(work.name, work.prompts[:tune_requests], work.output_lens[:tune_requests])
    trials: list[Result] = []

    def measure(settings: dict[str, int]) -> float | None:
        label = f"tune {scheduler} {settings or 'defaults'}"
        trials.append(run_hf_generate_batch(model, work, scheduler, False, settings, label=label))
        return trials[-1].tokens_per_s if trials[-1].error is None else None

    if grid is not None:
        for settings in grid:
            measure(settings)
        where = "the best of the given grid"
    else:
        where = lattice_search(measure, HF_GRID)[1]
    ok = [t for t in trials if t.error is None]
    best = max(ok, key=lambda t: t.tokens_per_s) if ok else trials[0]
    best.extra["search"] = where
    return best, trials


def lattice_search(
    measure: Callable[[dict[str, int]], float | None], start: list[dict[str, int]]
) -> tuple[dict[str, int], str]:
    """The fastest setting by `measure` (tok/s; None for a failed run), searched coarse to fine:
    the `start` settings, then the best one's neighbours on the HF_TOKENS x HF_REQUESTS lattice
    (powers of two) until every neighbour has run or lies past the lattice's bound, then the
    settings halfway to its neighbours. Returns the best setting and where it lies."""
    speeds: dict[tuple, float | None] = {}

    def run(settings: dict[str, int]) -> None:
        key = tuple(sorted(settings.items()))
        if key not in speeds:
            speeds[key] = measure(settings)

    def best() -> dict[str, int]:
        done = [(v, k) for k, v in speeds.items() if v is not None]
        return dict(max(done)[1]) if done else {}

    for settings in start:
        run(settings)
    while True:  # coarse: powers of two
        knobs = best()
        if knobs.get("max_batch_tokens") not in HF_TOKENS or knobs.get("max_requests_per_batch") not in HF_REQUESTS:
            return knobs, "transformers' defaults"
        t, r = HF_TOKENS.index(knobs["max_batch_tokens"]), HF_REQUESTS.index(knobs["max_requests_per_batch"])
        around = [(t + dt, r + dr) for dt, dr in ((-1, 0), (1, 0), (0, -1), (0, 1))]
        fresh = [(i, j) for i, j in around if 0 <= i < len(HF_TOKENS) and 0 <= j < len(HF_REQUESTS)]
        fresh = [(i, j) for i, j in fresh if _lattice(i, j) not in speeds]
        if not fresh:
            break
        for i, j in fresh:
            run(dict(_lattice(i, j)))
    at_bound = t in (0, len(HF_TOKENS) - 1) or r in (0, len(HF_REQUESTS) - 1)
    tokens, requests = HF_TOKENS[t], HF_REQUESTS[r]
    halfway = [("max_batch_tokens", tokens * 3 // 4), ("max_batch_tokens", tokens * 3 // 2)]
    halfway += [("max_requests_per_batch", requests * 3 // 4), ("max_requests_per_batch", requests * 3 // 2)]
    for knob, value in halfway:  # fine: between the best and its neighbours
        run({"max_batch_tokens": tokens, "max_requests_per_batch": requests, knob: value})
    return best(), "at the search's bound" if at_bound else "interior: slower settings tried on every side"


def _lattice(i: int, j: int) -> tuple:
    """The trial key of lattice point (HF_TOKENS[i], HF_REQUESTS[j])."""
    return (("max_batch_tokens", HF_TOKENS[i]), ("max_requests_per_batch", HF_REQUESTS[j]))


def _knobs(result: Result) -> dict:
    return {k: v for k, v in result.settings.items() if k not in ("scheduler_type", "use_async_batching")}


# transformers' own defaults first, then its two batching budgets, where the search starts. On
# the CPU fewer requests per batch ran faster: (512, 32) 153.9 tok/s against (512, 64) 94.1 on
# the `offline` workload.
HF_TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192)
HF_REQUESTS = (4, 8, 16, 32, 64, 128)
HF_GRID: list[dict[str, int]] = [{}] + [
    dict(max_batch_tokens=t, max_requests_per_batch=r) for t in (512, 2048) for r in (16, 32)
]
HF_STREAM_TOKENS = (512, 2048)  # the token budgets tried at a fixed number of streams


def environment(model: str, device: str, dtype) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    return dict(
        device=torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({cpu})",
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        model=model,
        dtype=str(dtype).removeprefix("torch."),
    )


def bench_offline(
    model: str,
    workload: str,
    systems: list[str],
    peers: list[str],
    static_batches: list[int],
    device: str | None,
    dtype_name: str | None,
    json_path: str | None,
    seed: int = 0,
    requests: int | None = None,
    repeats: int = 1,
    tune: bool = True,
    tune_requests: int | None = None,
    progress=print,
    hf_grid: list[dict] | None = None,
    streams: int | None = None,
) -> dict:
    """`streams`: at most this many requests run at once in every system (tandem's
    max_num_seqs, generate_batch's max_requests_per_batch, the static batch)."""
    from tandem.engine.model.loader import default_device, resolve_dtype, resolve_path

    dev = device or str(default_device())
    dtype = resolve_dtype(dtype_name, torch.device(dev))
    path = resolve_path(model)
    from transformers import AutoConfig

    work = make(workload, AutoConfig.from_pretrained(path).vocab_size, seed, requests)
    results: list[Result] = []
    rooflines: dict[int, float] = {}
    for rep in range(repeats):  # interleaved, so drift on a shared machine hits every system alike
        for spec in systems:
            progress(f"tandem {spec} (run {rep + 1} of {repeats}) ...")
            results.append(run_tandem(spec, model, work, device, dtype_name, rooflines, streams))
            results[-1].extra["repeat"] = rep
            gc.collect()
    tuning: dict[str, list[dict]] = {}
    tuned: dict[str, dict] = {}  # per scheduler: the best setting and where it lies in the search
    if streams:  # generate_batch tuned over its token budget only; one static batch size
        hf_grid = hf_grid or [dict(max_batch_tokens=t, max_requests_per_batch=streams) for t in HF_STREAM_TOKENS]
        static_batches = [streams]
    hf = on_fresh_thread(_hf_model, path, dev, dtype) if peers else None
    for peer in peers:
        if peer == "hf-static":
            for size in static_batches:
                progress(f"transformers static generate, batch {size} ...")
                results.append(on_fresh_thread(run_hf_static, hf, work, size))
            continue
        sched = "prefill_first" if peer.endswith("prefill-first") else "fifo"
        use_async = peer.startswith("hf-async")
        if tune and not use_async:
            progress(f"tuning transformers generate_batch {sched} on {tune_requests or 'all'} requests ...")
            best, trials = on_fresh_thread(tune_hf, hf, work, sched, hf_grid, tune_requests)
            where = best.extra.get("search", "")
            tuning[sched] = [asdict(t) for t in trials]
            tuned[sched] = dict(best=_knobs(best), where=where)
            progress(f"transformers generate_batch {sched}: best {_knobs(best) or 'defaults'}, {where}")
            if tune_requests is None:  # the best trial ran the whole workload: it is the result
                best.system = f"transformers generate_batch {sched}"
                results.append(best)
                continue
            settings = _knobs(best)
        else:
            settings = {}
        progress(f"{peer} {settings or 'defaults'} ...")
        results.append(on_fresh_thread(run_hf_generate_batch, hf, work, sched, use_async, settings))
        gc.collect()
    report = dict(
        kind="offline",
        workload=dict(
            name=work.name,
            requests=len(work.prompts),
            prompt_tokens=work.prompt_tokens,
            output_tokens=work.output_tokens,
            seed=seed,
        ),
        environment=environment(model, dev, dtype),
        streams=streams,
        rooflines={str(b): f for b, f in rooflines.items()},
        results=[asdict(r) for r in _medians(results, repeats)],
        runs=[asdict(r) for r in results],
        hf_tuning=tuning,
        hf_tuned=tuned,
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _medians(results: list[Result], repeats: int) -> list[Result]:
    """One row per system: the run with the median tok/s (all runs stay in the report's `runs`)."""
    if repeats == 1:
        return results
    by_system: dict[str, list[Result]] = {}
    for r in results:
        by_system.setdefault(r.system, []).append(r)
    rows = []
    for runs in by_system.values():
        ok = sorted((r for r in runs if r.error is None), key=lambda r: r.tokens_per_s)
        row = ok[(len(ok) - 1) // 2] if ok else runs[0]
        row.extra["runs_tokens_per_s"] = [round(r.tokens_per_s, 1) for r in runs]
        rows.append(row)
    return rows


def speedups(report: dict) -> dict:
    """The issue's ratios: best tandem against the best of each peer kind, async against sync."""
    ok = {r["system"]: r["tokens_per_s"] for r in report["results"] if r["error"] is None}
    tandem = {k: v for k, v in ok.items() if k.startswith("tandem")}
    out: dict[str, float] = {}
    if not tandem:
        return out
    best = max(tandem.values())
    batch = [v for k, v in ok.items() if "generate_batch" in k]
    static = [v for k, v in ok.items() if "static" in k]
    if batch:
        out["best tandem / best generate_batch"] = best / max(batch)
    if static:
        out["best tandem / best static generate"] = best / max(static)
    for name, value in tandem.items():
        if name.startswith("tandem async-overlap:"):
            sync = tandem.get("tandem " + name.split(":", 1)[1])
            if sync:
                out[f"{name.removeprefix('tandem ')} / {name.split(':', 1)[1]}"] = value / sync
    return out


def table(report: dict) -> str:
    lines = [
        f"{'system':<48}{'tok/s':>9}{'seconds':>9}{'idle':>7}{'decode GFLOP/s':>16}{'roofline':>10}"
        f"{'step ms':>9}{'limit ms':>10}{'ceiling':>9}"
    ]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['system']:<48}{'-':>9}{'-':>9}{'-':>7}  ({r['error'][:60]})")
            continue
        idle = f"{r['device_idle_fraction']:.1%}" if r["device_idle_fraction"] is not None else "-"
        util = r["extra"].get("utilisation")
        flops = f"{util['achieved_flops'] / 1e9:.1f} @{util['batch']}" if util else "-"
        frac = f"{util['fraction']:.0%}" if util else "-"
        limit = (
            f"{util['step_seconds'] * 1e3:>9.1f}{util['limit_seconds'] * 1e3:>10.1f}{util['ceiling']:>9.0%}"
            if util and util.get("limit_seconds")
            else ""
        )
        lines.append(
            f"{r['system']:<48}{r['tokens_per_s']:>9.1f}{r['seconds']:>9.2f}{idle:>7}{flops:>16}{frac:>10}{limit}"
        )
    for name, value in speedups(report).items():
        lines.append(f"{name}: {value:.2f}x")
    return "\n".join(lines)
