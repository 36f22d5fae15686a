"""`tandem bench offline`: one workload through each tandem scheduler and through
transformers' own batching, in one process, one after the other."""
from __future__ import annotations

import gc
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
from service.bench.workloads import Workload, make
from schedulers import load_scheduler

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


def run_tandem(spec: str, model: str, work: Workload, device: str | None, dtype: str | None) -> Result:
    name, _, policy = spec.partition(":")
    options = {"policy": policy} if policy else {}
    result = Result(f"tandem {spec}", dict(scheduler=name, **options))
    config = EngineConfig(model=model, device=device, dtype=dtype)
    with Engine(config, load_scheduler(name, options)) as engine:
        stops = [StoppingCriteria(max_new_tokens=n, ignore_eos=True) for n in work.output_lens]
        engine.generate(work.prompts[:1], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=2))
        stats = engine.core.executor.stats
        busy, idle = stats.busy_seconds, stats.idle_seconds
        start = time.perf_counter()
        done = engine.generate(work.prompts, SamplingParams(temperature=0), stops)
        result.seconds = time.perf_counter() - start
        busy, idle = stats.busy_seconds - busy, stats.idle_seconds - idle
        result.device_idle_fraction = idle / (busy + idle) if busy + idle else None
        result.settings.update(max_num_seqs=config.max_num_seqs, max_batch_tokens=config.max_batch_tokens)
    result.output_tokens = sum(len(c.token_ids) for c in done)
    result.tokens_per_s = result.output_tokens / result.seconds
    return result


def _hf_model(path, device: str, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def run_hf_generate_batch(path, work: Workload, device: str, dtype, scheduler: str, use_async: bool) -> Result:
    """transformers' continuous batching; one generation config, so the longest output
    length is asked of every request and only each request's own length is counted."""
    result = Result(f"transformers generate_batch {scheduler}{' async' if use_async else ''}",
                    dict(scheduler_type=scheduler, use_async_batching=use_async))
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = _hf_model(path, device, dtype)
        longest = max(work.output_lens)
        gen = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, do_sample=False, eos_token_id=1,
                               pad_token_id=2)
        cfg = ContinuousBatchingConfig(scheduler_type=scheduler, use_async_batching=use_async,
                                       auto_switch_to_flash=False)
        model.generate_batch(work.prompts[:1], generation_config=gen, continuous_batching_config=cfg)
        start = time.perf_counter()
        model.generate_batch(work.prompts, generation_config=gen, continuous_batching_config=cfg)
        result.seconds = time.perf_counter() - start
        result.output_tokens = longest * len(work.prompts)
        result.tokens_per_s = result.output_tokens / result.seconds
        result.extra["note"] = "every request generates the workload's longest output length"
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a row, not a crash
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


def run_hf_static(path, work: Workload, device: str, dtype, batch_size: int) -> Result:
    """transformers' static `generate`, left-padded batches in arrival order."""
    result = Result(f"transformers generate (static, batch {batch_size})", dict(batch_size=batch_size))
    try:
        model = _hf_model(path, device, dtype)
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
                model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(lens),
                               min_new_tokens=max(lens), do_sample=False, pad_token_id=2)
            tokens += sum(lens)  # only what each request asked for counts
        result.seconds = time.perf_counter() - start
        result.output_tokens = tokens
        result.tokens_per_s = tokens / result.seconds
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


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


def bench_offline(model: str, workload: str, systems: list[str], peers: list[str], static_batch: int,
                  device: str | None, dtype_name: str | None, json_path: str | None, seed: int = 0,
                  requests: int | None = None, progress=print) -> dict:
    from engine.model_loader import default_device, resolve_dtype, resolve_path

    dev = device or str(default_device())
    dtype = resolve_dtype(dtype_name, torch.device(dev))
    path = resolve_path(model)
    from transformers import AutoConfig

    work = make(workload, AutoConfig.from_pretrained(path).vocab_size, seed, requests)
    results: list[Result] = []
    for spec in systems:
        progress(f"tandem {spec} ...")
        results.append(run_tandem(spec, model, work, device, dtype_name))
        gc.collect()
    for peer in peers:
        progress(f"{peer} ...")
        if peer == "hf-static":
            results.append(run_hf_static(path, work, dev, dtype, static_batch))
        else:
            sched = "prefill_first" if peer.endswith("prefill-first") else "fifo"
            results.append(run_hf_generate_batch(path, work, dev, dtype, sched, use_async=peer.startswith("hf-async")))
        gc.collect()
    report = dict(
        workload=dict(name=work.name, requests=len(work.prompts), prompt_tokens=work.prompt_tokens,
                      output_tokens=work.output_tokens, seed=seed),
        environment=environment(model, dev, dtype),
        results=[asdict(r) for r in results],
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report


def table(report: dict) -> str:
    lines = [f"{'system':<48}{'tok/s':>10}{'seconds':>9}{'idle':>8}"]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['system']:<48}{'-':>10}{'-':>9}{'-':>8}  ({r['error'][:60]})")
            continue
        idle = f"{r['device_idle_fraction']:.1%}" if r["device_idle_fraction"] is not None else "-"
        lines.append(f"{r['system']:<48}{r['tokens_per_s']:>10.1f}{r['seconds']:>9.2f}{idle:>8}")
    return "\n".join(lines)
