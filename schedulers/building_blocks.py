"""Building blocks the built-in policies share: continue running requests, admit waiting ones."""

from __future__ import annotations

from collections.abc import Iterable

from tandem.schedulers.api import RequestView, StepContext


def continue_running(ctx: StepContext, order: Iterable[RequestView] | None = None) -> bool:
    """Give running requests their next chunk or decode token, in `order` (default:
    admission order). When KV runs out, preempt the request the policy's `select_victim`
    picks among those not yet scheduled this step (possibly the one being placed; default:
    the most recently admitted). Returns whether anything was preempted."""
    preempted = False
    for req in list(ctx.running if order is None else order):
        if ctx.token_budget == 0 or ctx.seq_budget == 0:
            break
        if not req.is_running or ctx.is_scheduled(req):
            continue
        n = min(req.remaining, ctx.token_budget)
        while not ctx.fits(req, n):
            candidates = [r for r in ctx.running if not ctx.is_scheduled(r)]
            if not candidates:
                break
            victim = ctx.choose_victim(candidates)
            ctx.preempt(victim)
            preempted = True
            if victim is req:
                break
        else:
            ctx.schedule(req, n)
    return preempted


def admit_waiting(ctx: StepContext, order: Iterable[RequestView] | None = None) -> None:
    """Admit waiting requests in `order` (default: arrival order) while the token budget,
    the sequence limit and free KV allow; the first that does not fit stops admission."""
    for req in list(ctx.waiting if order is None else order):
        if ctx.token_budget == 0 or ctx.seq_budget == 0:
            return
        n = min(req.remaining, ctx.token_budget)
        if not ctx.fits(req, n):
            return
        ctx.schedule(req, n)
