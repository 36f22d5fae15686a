#!/usr/bin/env python3
"""The real model's CPU dtype, chosen by measurement: speed at 1 and 64 streams, and how far
bfloat16's greedy answers stay with float32's, alternated in one run.

    .venv/bin/python scripts/dtype_choice.py [--model smollm2-135m] [--rounds 2]

Agreement: each bf16 answer is teacher-forced through the float32 model; a token counts as
wrong only where float32's choice leads it by more than --tol (a near-tie may flip with any
rounding). Also printed: answers identical to float32's, and the mean common prefix.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tandem.engine import Engine, EngineConfig, SamplingParams, StoppingCriteria
from tandem.schedulers import load_scheduler

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Write one sentence about the moon.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into French.",
    "What is the largest planet in the solar system?",
    "Give a synonym for 'happy'.",
    "What gas do plants take in?",
    "What is the opposite of 'cold'?",
    "How many days are in a leap year?",
    "Name a programming language.",
    "What color is the sky on a clear day?",
    "What is the chemical symbol for gold?",
]


def run(model: str, dtype: str, prompts: list[list[int]], streams: int, tokens: int) -> tuple[float, list[list[int]]]:
    config = EngineConfig(model=model, dtype=dtype, device="cpu", max_num_seqs=streams)
    with Engine(config, load_scheduler("fcfs")) as engine:
        engine.generate([prompts[0]], SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=4))
        start = time.perf_counter()
        done = engine.generate(prompts, SamplingParams(temperature=0), StoppingCriteria(tokens, ignore_eos=True))
        seconds = time.perf_counter() - start
    return sum(len(d.token_ids) for d in done) / seconds, [d.token_ids for d in done]


def wrong_tokens(ref, prompt: list[int], got: list[int], tol: float) -> int:
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1].float()
    best = logits.argmax(-1)
    margins = logits.gather(1, best[:, None])[:, 0] - logits[torch.arange(len(got)), torch.tensor(got)]
    return int((margins > tol).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds of each dtype")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per answer")
    p.add_argument("--tol", type=float, default=0.05, help="logit margin under which a flip is a near-tie")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tandem.engine.model.loader import resolve_path

    path = resolve_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    ids = [tok.encode(t, add_special_tokens=False) for t in prompts]
    wide = (ids * 4)[:64]
    speed: dict[tuple[str, int], list[float]] = {}
    answers: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for dtype in ("float32", "bfloat16"):
            one, _ = run(args.model, dtype, ids[:2], 1, args.tokens)
            many, got = run(args.model, dtype, wide, 64, args.tokens)
            speed.setdefault((dtype, 1), []).append(one)
            speed.setdefault((dtype, 64), []).append(many)
            answers[dtype] = got[: len(ids)]
    for (dtype, streams), xs in sorted(speed.items()):
        med = statistics.median(xs)
        per = f", {1000 / med:.1f} ms/token" if streams == 1 else ""
        print(f"{dtype:9} {streams:2} streams: {med:7.1f} tok/s{per}  (runs {', '.join(f'{x:.1f}' for x in xs)})")
    for streams in (1, 64):
        ratio = statistics.median(speed[("bfloat16", streams)]) / statistics.median(speed[("float32", streams)])
        print(f"bfloat16 / float32 at {streams} streams: {ratio:.2f}x")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    f32, bf16 = answers["float32"], answers["bfloat16"]
    same = sum(a == b for a, b in zip(f32, bf16))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(f32, bf16)]
    wrong = sum(wrong_tokens(ref, p, b, args.tol) for p, b in zip(ids, bf16))
    wrong32 = sum(wrong_tokens(ref, p, a, args.tol) for p, a in zip(ids, f32))
    n = len(ids) * args.tokens
    print(f"bf16 answers identical to float32's: {same}/{len(ids)}; mean common prefix {statistics.mean(prefix):.1f}")
    print(f"tokens off float32's choice by more than {args.tol}: bf16 {wrong}/{n}, float32 engine {wrong32}/{n}")


if __name__ == "__main__":
    main()
