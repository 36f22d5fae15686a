"""First come, first served."""

from __future__ import annotations

from tandem.schedulers.api import Scheduler, StepContext
from tandem.schedulers.building_blocks import admit_waiting, continue_running


class Fcfs(Scheduler):
    """Running requests first (decodes and prefill chunks, in admission order), then waiting
    ones in arrival order. When KV runs out the newest running request is preempted by
    recompute, and nothing new is admitted that step. Ignores priority."""

    name = "fcfs"

    def schedule(self, ctx: StepContext) -> None:
        if not continue_running(ctx):
            admit_waiting(ctx)
