"""async-overlap: any policy, with host preparation of step N+1 overlapped with step N."""

from __future__ import annotations

from tandem.schedulers.api import RequestView, Scheduler, StepContext, StepReport


class AsyncOverlap(Scheduler):
    """Wraps another policy and runs the engine pipelined: step N+1 is planned and launched
    before step N's sampled tokens reach the host (they reach N+1 on the device), so the
    device never waits for the host's batch preparation. Options other than `policy` go to
    the wrapped policy. Priority: as the wrapped policy."""

    name = "async-overlap"
    overlap = True

    def __init__(self, policy: str = "fcfs", **policy_options: str) -> None:
        from tandem.schedulers.registry import load_scheduler

        if policy == self.name:
            raise ValueError("async-overlap cannot wrap itself")
        self.inner = load_scheduler(policy, policy_options)
        self.policy = policy
        self.uses_priority = self.inner.uses_priority

    def schedule(self, ctx: StepContext) -> None:
        self.inner.schedule(ctx)

    # The wrapped policy keeps its hooks.
    def select_victim(self, ctx: StepContext, candidates: list[RequestView]) -> RequestView:
        return self.inner.select_victim(ctx, candidates)

    def on_request_added(self, request: RequestView) -> None:
        self.inner.on_request_added(request)

    def on_request_finished(self, request: RequestView, reason: str) -> None:
        self.inner.on_request_finished(request, reason)

    def on_step_done(self, report: StepReport) -> None:
        self.inner.on_step_done(report)
