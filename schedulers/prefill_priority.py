"""Prefill first: lower time to first token, with a guard so decodes cannot starve."""

from __future__ import annotations

from tandem.schedulers.api import Scheduler, StepContext
from tandem.schedulers.building_blocks import admit_waiting, continue_running


class PrefillPriority(Scheduler):
    """Admit and prefill waiting requests first, then fill the rest of the budget with the
    running ones. If a running request has been left out for `max_decode_stall` steps in a
    row, that step runs first-come-first-served order instead. Ignores priority."""

    name = "prefill-priority"

    def __init__(self, max_decode_stall: int = 4) -> None:
        if max_decode_stall < 1:
            raise ValueError(f"max_decode_stall must be >= 1, got {max_decode_stall}")
        self.max_decode_stall = max_decode_stall
        self._stalled = 0

    def schedule(self, ctx: StepContext) -> None:
        if self._stalled >= self.max_decode_stall:
            if not continue_running(ctx):
                admit_waiting(ctx)
        else:
            admit_waiting(ctx)
            continue_running(ctx)
        left_out = any(r.is_running and not ctx.is_scheduled(r) for r in ctx.running)
        self._stalled = self._stalled + 1 if left_out else 0
