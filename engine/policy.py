"""The scheduling decision, behind one small interface.

Each step the engine core asks its policy which sequences run and how many tokens each
computes. The policy reserves KV blocks through the core (`reserve`, `admit`, `preempt`), so
the core's bookkeeping stays consistent whatever it decides. The plugin API of the
`schedulers` package builds on this; `FcfsPolicy` is the engine's default.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core import EngineCore
    from engine.sequence import Sequence


class SchedulingPolicy(ABC):
    @abstractmethod
    def schedule(self, core: EngineCore) -> list[tuple[Sequence, int]]:
        """Sequences to run this step with their token counts; blocks already reserved."""


class FcfsPolicy(SchedulingPolicy):
    """Running sequences first, in admission order; then waiting ones in arrival order.

    When KV runs out, the most recently admitted running sequence is preempted (recompute).
    """

    def schedule(self, core: EngineCore) -> list[tuple[Sequence, int]]:
        budget, slots = core.config.max_batch_tokens, core.config.max_num_seqs
        chosen: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(core.running) and budget > 0 and len(chosen) < slots:
            seq = core.running[i]
            n = min(seq.num_uncomputed, budget)
            while not core.reserve(seq, n):
                victim = core.running[-1]
                core.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                chosen.append((seq, n))
                budget -= n
                i += 1
                continue
            break
        while not preempted and core.waiting and budget > 0 and len(chosen) < slots:
            seq = core.waiting[0]
            core.match_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not core.reserve(seq, n):
                core.release(seq)
                break
            core.admit(seq)
            chosen.append((seq, n))
            budget -= n
        return chosen
