"""Priority: larger `priority` first, with preemption of lower levels and optional aging."""

from __future__ import annotations

from tandem.schedulers.api import RequestView, Scheduler, StepContext


class Priority(Scheduler):
    """Requests run in order of priority level (larger first; FCFS within a level, running
    before waiting). A waiting request may preempt running ones of a strictly lower level when
    KV runs short; running requests short of KV preempt the lowest level first (newest first
    within it). With `aging_s` > 0, a waiting request gains one level per `aging_s` seconds it
    has waited, so low priority cannot starve forever."""

    name = "priority"
    api_version = 2
    uses_priority = True

    def __init__(self, aging_s: float = 0.0) -> None:
        if aging_s < 0:
            raise ValueError(f"aging_s must be >= 0, got {aging_s}")
        self.aging_s = aging_s

    def level(self, request: RequestView) -> float:
        aged = request.waiting_seconds / self.aging_s if self.aging_s > 0 else 0.0
        return request.priority + aged

    def select_victim(self, ctx: StepContext, candidates: list[RequestView]) -> RequestView:
        return min(candidates, key=lambda r: (self.level(r), -r.arrival_index))

    def schedule(self, ctx: StepContext) -> None:
        order = sorted(ctx.running + ctx.waiting, key=lambda r: (-self.level(r), not r.is_running, r.arrival_index))
        admitting = True  # FCFS within a level: a waiting request that does not fit stops the rest
        for req in order:
            if ctx.token_budget == 0 or ctx.seq_budget == 0:
                return
            if ctx.is_scheduled(req) or not (req.is_running or admitting):
                continue
            n = min(req.remaining, ctx.token_budget)
            if self._make_room(ctx, req, n):
                ctx.schedule(req, n)
            elif not req.is_running:
                admitting = False

    def _make_room(self, ctx: StepContext, req: RequestView, n: int) -> bool:
        """Preempt running requests of a lower level (for a running one: any not yet scheduled,
        which come later in the order) until `req` fits; False if it cannot. A running request
        that still cannot fit preempts itself, so the blocks it holds go to those scheduled."""
        level = self.level(req)
        while not ctx.fits(req, n):
            lower = [
                r
                for r in ctx.running
                if not ctx.is_scheduled(r) and r is not req and (req.is_running or self.level(r) < level)
            ]
            if not lower:
                if req.is_running:
                    ctx.preempt(req)
                return False
            ctx.preempt(ctx.choose_victim(lower))
        return True
