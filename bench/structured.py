"""`tandem bench structured`: what structured output and n samples cost, in-process.

Constrained against unconstrained: the same prompts and seeds, first with a realistic JSON
schema (bench.schemas.ORDER_SCHEMA, ended by the grammar), then without it, each request
generating exactly the tokens its constrained run did (ignore_eos); `concurrency` streams in
flight. The two alternate `repeats` times on one engine, so both see the same machine.

n samples against separate requests: `requests` prompts with n = 4, against each prompt sent
four times (seeds seed + i, the same samples): prompt tokens computed and output tok/s.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

from tandem.bench.schemas import ORDER_SCHEMA
from tandem.bench.workloads import make
from tandem.engine import Constraint, ConstraintKind, Engine, EngineConfig, GenerationRequest
from tandem.engine.request import SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler

SCHEMA = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(ORDER_SCHEMA))


@dataclass
class Run:
    tokens: list[int]  # output tokens per request
    texts: list[str]
    seconds: float

    @property
    def tok_s(self) -> float:
        return sum(self.tokens) / self.seconds


async def _stream_all(engine: Engine, requests: list[GenerationRequest], concurrency: int) -> Run:
    gate = asyncio.Semaphore(concurrency)

    async def one(request: GenerationRequest) -> tuple[int, str]:
        async with gate:
            count, text = 0, []
            async for out in engine.stream(request):
                count += len(out.token_ids)
                text.append(out.text)
            return count, "".join(text)

    start = time.perf_counter()
    done = await asyncio.gather(*(one(r) for r in requests))
    return Run([c for c, _ in done], [t for _, t in done], time.perf_counter() - start)


def _prompts(model: str, requests: int, seed: int) -> list[list[int]]:
    from transformers import AutoConfig

    from tandem.engine.model.loader import resolve_path

    vocab = AutoConfig.from_pretrained(resolve_path(model)).vocab_size
    return [p[:256] for p in make("chat", vocab, seed, requests).prompts]


def constrained_vs_free(
    model: str, scheduler: str, requests: int, concurrency: int, repeats: int, max_new: int, seed: int
) -> dict:
    prompts = _prompts(model, requests, seed)
    with Engine(EngineConfig(model=model), load_scheduler(scheduler)) as engine:

        def constrained() -> list[GenerationRequest]:
            stop = StoppingCriteria(max_new_tokens=max_new)
            return [
                GenerationRequest(p, SamplingParams(temperature=1.0, seed=seed + i), stop, constraint=SCHEMA)
                for i, p in enumerate(prompts)
            ]

        def free(lengths: list[int]) -> list[GenerationRequest]:
            return [
                GenerationRequest(
                    p, SamplingParams(temperature=1.0, seed=seed + i), StoppingCriteria(n, ignore_eos=True)
                )
                for i, (p, n) in enumerate(zip(prompts, lengths))
            ]

        # Warm: the schema compiles once and llguidance's lexer fills its caches at the first
        # requests' states; a whole round at full concurrency, discarded.
        asyncio.run(_stream_all(engine, constrained()[:concurrency], concurrency))
        rounds: list[dict] = []
        for _ in range(repeats):
            s0 = engine.stats()
            c = asyncio.run(_stream_all(engine, constrained(), concurrency))
            s1 = engine.stats()
            steps, mask_s = s1.steps - s0.steps, s1.grammar_mask_seconds - s0.grammar_mask_seconds
            f = asyncio.run(_stream_all(engine, free(c.tokens), concurrency))
            valid = sum(_valid(t) for t in c.texts)
            rounds.append(
                {
                    "constrained_tok_s": c.tok_s,
                    "unconstrained_tok_s": f.tok_s,
                    "ratio": c.tok_s / f.tok_s,
                    "output_tokens": sum(c.tokens),
                    "valid_json": f"{valid}/{len(c.texts)}",
                    "mask_ms_per_step": 1e3 * mask_s / max(steps, 1),
                    "mask_us_per_token": 1e6 * mask_s / max(sum(c.tokens), 1),
                    "step_ms": 1e3 * c.seconds / max(steps, 1),
                }
            )
    ratios = [float(r["ratio"]) for r in rounds]
    return {"scheduler": scheduler, "rounds": rounds, "median_ratio": statistics.median(ratios)}


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), ORDER_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def samples_vs_separate(model: str, scheduler: str, requests: int, n: int, max_new: int, seed: int) -> dict:
    prompts = _prompts(model, requests, seed)
    stop = StoppingCriteria(max_new_tokens=max_new, ignore_eos=True)
    out: dict = {}
    with Engine(EngineConfig(model=model), load_scheduler(scheduler)) as engine:
        grouped = [
            GenerationRequest(p, SamplingParams(temperature=1.0, seed=seed + 10 * i), stop, n=n)
            for i, p in enumerate(prompts)
        ]
        separate = [
            GenerationRequest(p, SamplingParams(temperature=1.0, seed=seed + 10 * i + j), stop)
            for i, p in enumerate(prompts)
            for j in range(n)
        ]
        asyncio.run(_stream_all(engine, separate[:4], len(separate)))  # warm
        for label, batch in (
            ("n", grouped),
            ("separate", separate),
            ("n again", grouped),
            ("separate again", separate),
        ):
            engine.clear_prefix_cache()  # neither run reuses the other's prompts
            tokens0 = engine.stats().step_tokens
            run = asyncio.run(_stream_all(engine, batch, len(batch)))
            computed = engine.stats().step_tokens - tokens0
            decode = sum(run.tokens) - sum(r.n for r in batch)  # every sample's tokens but its last are computed
            out[label] = {
                "prompt_tokens_computed": computed - decode,
                "output_tok_s": run.tok_s,
                "seconds": run.seconds,
            }
    out["prompt_tokens"] = sum(map(len, prompts))
    return out
