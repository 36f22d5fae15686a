"""Named, seeded workloads: the exact prompts (token ids) and output lengths are reproducible."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def _uniform(rng, n, lo, hi):
    return [int(x) for x in rng.integers(lo, hi + 1, n)]


def _lognormal(rng, n, median, sigma, lo, hi):
    return [int(x) for x in np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi)]


def make(name: str, vocab: int, seed: int = 0, requests: int | None = None) -> Workload:
    """offline-small (CI-sized), streams, offline, shared-prefix, prefix-groups, chat."""
    rng = np.random.default_rng(seed)

    def tokens(n: int) -> list[int]:  # ids 0-3 are special in the presets
        return [int(t) for t in rng.integers(4, vocab, n)]

    if name == "offline-small":
        n = requests or 8
        plens, olens = _uniform(rng, n, 16, 64), _uniform(rng, n, 8, 16)
        prompts = [tokens(p) for p in plens]
    elif name == "streams":  # short chats, every answer 64 tokens: tokens/s and ms per token at N streams
        n = requests or 64
        plens, olens = _uniform(rng, n, 32, 128), [64] * n
        prompts = [tokens(p) for p in plens]
    elif name == "offline":
        n = requests or 128
        plens, olens = _uniform(rng, n, 16, 512), _uniform(rng, n, 16, 256)
        prompts = [tokens(p) for p in plens]
    elif name == "shared-prefix":
        n = requests or 64
        prefix = tokens(384)
        prompts = [prefix + tokens(s) for s in _uniform(rng, n, 16, 64)]
        olens = _uniform(rng, n, 32, 64)
    elif name == "prefix-groups":  # 8 system prompts, each shared by a group, arriving interleaved
        n = requests or 128
        prefixes = [tokens(384) for _ in range(8)]
        groups = rng.integers(0, len(prefixes), n)
        prompts = [prefixes[g] + tokens(s) for g, s in zip(groups, _uniform(rng, n, 16, 64))]
        olens = _uniform(rng, n, 32, 64)
    elif name == "chat":
        n = requests or 128
        plens, olens = _lognormal(rng, n, 128, 0.8, 8, 1024), _lognormal(rng, n, 96, 0.7, 8, 512)
        prompts = [tokens(p) for p in plens]
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(NAMES)}")
    return Workload(name, prompts, olens)


NAMES = ("offline-small", "streams", "offline", "shared-prefix", "prefix-groups", "chat")
