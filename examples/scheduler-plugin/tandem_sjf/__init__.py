"""Shortest job first, with priority and aging: an example tandem scheduler plugin."""

from __future__ import annotations

from tandem.schedulers import API_VERSION, RequestView, Scheduler, StepContext, admit_waiting, continue_running


class ShortestJobFirst(Scheduler):
    """Admit waiting requests by priority, then by least work left (prompt tokens still to
    prefill plus tokens still to generate), each step of waiting taking `aging` tokens off a
    request's work so long ones cannot starve. Running requests keep going first."""

    name = "sjf"
    api_version = API_VERSION
    uses_priority = True

    def __init__(self, aging: float = 8.0) -> None:
        if aging < 0:
            raise ValueError(f"aging must be >= 0, got {aging}")
        self.aging = aging
        self._first_seen: dict[str, int] = {}

    def _key(self, req: RequestView, step: int) -> tuple[int, float, int]:
        waited = step - self._first_seen.setdefault(req.request_id, step)
        work = req.remaining + req.max_new_tokens - req.generated_len
        return (-req.priority, work - self.aging * waited, req.arrival_index)

    def schedule(self, ctx: StepContext) -> None:
        waiting = ctx.waiting
        live = {r.request_id for r in waiting}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in live}
        if continue_running(ctx):
            return
        admit_waiting(ctx, sorted(waiting, key=lambda r: self._key(r, ctx.step_index)))
