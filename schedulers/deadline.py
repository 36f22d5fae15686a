"""Deadline: earliest deadline first on time to first token, refusing what would miss it."""

from __future__ import annotations

import math

from tandem.schedulers.api import RequestView, Scheduler, StepContext, StepReport
from tandem.schedulers.building_blocks import admit_waiting, continue_running


class Deadline(Scheduler):
    """Waiting requests are admitted earliest deadline first (`ttft_target_s`, else the RPC's
    deadline, else arrival + `ttft_s` when that is set; requests with none come last, first
    come first served), before running ones continue; if a running request has been left out
    `max_decode_stall` steps in a row, running ones go first that step. Short of KV, requests
    that already have their first token are preempted first (newest first), then the latest
    deadline.

    With `refuse_late`, a waiting request whose first token cannot come before its deadline at
    the prefill rate measured over recent steps (the tokens queued ahead of it in deadline
    order, plus its own) is refused at once with DEADLINE_EXCEEDED rather than queued to fail
    late; `margin` scales the estimate (above 1: refuse more readily). Never one that has
    streamed tokens: preempted and waiting again, it met its first-token deadline already."""

    name = "deadline"
    api_version = 2

    def __init__(
        self, ttft_s: float = 0.0, refuse_late: bool = False, margin: float = 1.0, max_decode_stall: int = 4
    ) -> None:
        if ttft_s < 0 or margin <= 0 or max_decode_stall < 1:
            raise ValueError("ttft_s must be >= 0, margin > 0 and max_decode_stall >= 1")
        self.ttft_s, self.refuse_late, self.margin = ttft_s, refuse_late, margin
        self.max_decode_stall = max_decode_stall
        self._stalled = 0
        self.tokens_per_s: float | None = None  # computed tokens per second, smoothed over steps

    def due(self, request: RequestView) -> float:
        if request.deadline is not None:
            return request.deadline
        return request.arrival_time + self.ttft_s if self.ttft_s > 0 else math.inf

    def on_step_done(self, report: StepReport) -> None:
        tokens = sum(n for _, n in report.rows)
        if report.seconds > 0 and tokens:
            rate = tokens / report.seconds
            self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate

    def select_victim(self, ctx: StepContext, candidates: list[RequestView]) -> RequestView:
        return max(candidates, key=lambda r: (r.generated_len > 0, self.due(r), r.arrival_index))

    def schedule(self, ctx: StepContext) -> None:
        waiting = sorted(ctx.waiting, key=lambda r: (self.due(r), r.arrival_index))
        if self.refuse_late and self.tokens_per_s:
            waiting = self._refuse_late(ctx, waiting)
        running = sorted(ctx.running, key=lambda r: (self.due(r), r.arrival_index))
        if self._stalled >= self.max_decode_stall:  # running requests were left out: they go first
            if not continue_running(ctx, running):
                admit_waiting(ctx, waiting)
        else:
            admit_waiting(ctx, waiting)
            continue_running(ctx, running)
        left_out = any(r.is_running and not ctx.is_scheduled(r) for r in ctx.running)
        self._stalled = self._stalled + 1 if left_out else 0

    def _refuse_late(self, ctx: StepContext, waiting: list[RequestView]) -> list[RequestView]:
        assert self.tokens_per_s
        ahead = sum(r.remaining for r in ctx.running if r.generated_len == 0)  # prefills under way
        kept = []
        for req in waiting:
            if req.generated_len:  # preempted after its first token: the target no longer applies
                kept.append(req)
                continue
            due = self.due(req)
            eta = ctx.now + self.margin * (ahead + req.remaining) / self.tokens_per_s
            if due != math.inf and eta > due:
                late = eta - due
                ctx.reject(req, f"its first token would come about {late:.2f} s after its deadline at the current load")
                continue
            ahead += req.remaining
            kept.append(req)
        return kept
