"""Measure the two grammar engines tandem could use (llguidance, xgrammar) on this machine.

For a realistic JSON schema (bench.schemas.ORDER_SCHEMA), at a 32k vocabulary (bench-llama's)
and a 150k one (trained here on site-packages' Python): tokenizer setup, schema compile time
(no cache), single-row mask time per token along a valid answer, and a 64-row batched fill.

    .venv/bin/pip install xgrammar==0.2.8   # not a dependency: measured only
    .venv/bin/python scripts/grammar_choice.py [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sysconfig
import time

import torch

from tandem.bench.schemas import ORDER_EXAMPLE, ORDER_SCHEMA
from tandem.engine.model.presets import preset_path

ROWS = 64


def tokenizer_150k():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "**", "*.py"), recursive=True))

    def texts():
        total = 0
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as f:
                text = f.read()
            total += len(text)
            yield text
            if total > 60e6:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=150_000,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _stats(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "mean_us": 1e6 * statistics.fmean(times),
        "p50_us": 1e6 * times[len(times) // 2],
        "p99_us": 1e6 * times[int(len(times) * 0.99)],
    }


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        t = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
        self.setup_s = time.perf_counter() - t
        self.vocab = vocab
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        self.llt.fill_next_token_bitmask(matcher, self.llt.allocate_token_bitmask(1, self.vocab), 0)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.ll.LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher, bitmask, row: int) -> None:
        self.llt.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def allocate(self, rows: int):
        return self.llt.allocate_token_bitmask(rows, self.vocab)

    def apply(self, logits, bitmask) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int) -> None:
        import importlib

        xgrammar = importlib.import_module("xgrammar")  # measured only: not a dependency, not type-checked
        self.xgr = xgrammar
        t = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.setup_s = time.perf_counter() - t
        self.vocab = vocab
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher, bitmask, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def allocate(self, rows: int):
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


def measure(engine, tok) -> dict:
    compiles = []
    for _ in range(3):
        t = time.perf_counter()
        grammar = engine.compile(ORDER_SCHEMA)
        compiles.append(time.perf_counter() - t)
    answer = tok.encode(json.dumps(ORDER_EXAMPLE, separators=(",", ":")), add_special_tokens=False)
    bitmask = engine.allocate(1)
    single = []
    for _ in range(3):
        m = engine.matcher(grammar)
        for token in answer:
            t = time.perf_counter()
            engine.fill(m, bitmask, 0)
            single.append(time.perf_counter() - t)
            word, bit = divmod(token, 32)
            assert (int(bitmask[0, word]) >> bit) & 1, "the mask refuses a token of a valid answer"
            engine.accept(m, token)
    batched = []
    big = engine.allocate(ROWS)
    matchers = [engine.matcher(grammar) for _ in range(ROWS)]
    for token in answer:
        t = time.perf_counter()
        engine.fill_batch(matchers, big)
        batched.append(time.perf_counter() - t)
        for m in matchers:
            engine.accept(m, token)
    logits = torch.randn(ROWS, engine.vocab)
    applies = []
    for _ in range(50):
        t = time.perf_counter()
        engine.apply(logits, big)
        applies.append(time.perf_counter() - t)
    applies = applies[5:]  # llguidance's first call compiles a kernel (seconds)
    return {
        "tokenizer_setup_s": engine.setup_s,
        "compile_ms": [1e3 * c for c in compiles],
        "answer_tokens": len(answer),
        "mask_per_token": _stats(single),
        f"fill_{ROWS}_rows": _stats(batched),
        f"apply_{ROWS}_rows": _stats(applies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    bench = AutoTokenizer.from_pretrained(preset_path("bench-llama"), local_files_only=True)
    vocabs = {"32k (bench-llama)": bench, "150k (trained here)": tokenizer_150k()}
    out: dict = {"torch_threads": torch.get_num_threads()}
    for label, tok in vocabs.items():
        for cls in (Llguidance, Xgrammar):
            figures = measure(cls(tok, len(tok)), tok)
            out[f"{cls.name} @ {label}"] = figures
            print(f"{cls.name} @ {label}: {json.dumps(figures)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
