"""Fair share between tenants: the virtual token counter (VTC) policy.

Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024): each tenant has a
counter of the service it has received, prefill and decode tokens weighted, divided by the
tenant's weight; new work is admitted from the tenant with the least. A tenant that becomes
active again is lifted to the least counter among the active ones, so idle time banks no credit.

That same rule lets the policy forget: an idle tenant whose counter is at or below the active
minimum would be lifted to it on return, so its counter is dropped (and the idle ones beyond
`MAX_IDLE_TENANTS` with the least service first); every event costs O(active tenants).
"""

from __future__ import annotations

import heapq

from tandem.schedulers.api import RequestView, Scheduler, StepContext, StepReport
from tandem.schedulers.building_blocks import continue_running

MAX_IDLE_TENANTS = 1024  # idle tenants remembered with service above the active minimum


def parse_weights(spec: str) -> dict[str, float]:
    """`"alice:2,bob:1"` -> {"alice": 2.0, "bob": 1.0}; unnamed tenants weigh 1."""
    weights: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, value = item.rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = 0.0
        if not sep or weight <= 0:
            raise ValueError(f"weights: expected TENANT:WEIGHT with a positive weight, got {item!r}")
        weights[tenant] = weight
    return weights


class FairShare(Scheduler):
    """Running requests continue (admission order); waiting ones are admitted from the tenant
    with the least weighted service so far, FCFS within a tenant. Short of KV, the running
    request of the most-served tenant is preempted. Tenants: `RequestView.tenant` (the
    service's `x-tenant-id`, or the bearer token's name)."""

    name = "fair-share"
    api_version = 2

    def __init__(self, prefill_weight: float = 1.0, decode_weight: float = 2.0, weights: str = "") -> None:
        if prefill_weight < 0 or decode_weight < 0:
            raise ValueError("prefill_weight and decode_weight must be >= 0")
        self.prefill_weight, self.decode_weight = prefill_weight, decode_weight
        self.weights = parse_weights(weights)
        self.counters: dict[str, float] = {}  # tenant -> weighted service received (active, or idle above the floor)
        self._active: dict[str, int] = {}  # active tenant -> its requests not finished
        self._idle: list[tuple[float, str]] = []  # idle tenants by counter (entries go stale: checked on pop)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def on_request_added(self, request: RequestView) -> None:
        tenant = request.tenant
        if tenant not in self._active:
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), self._floor() or 0.0)
            self._active[tenant] = 0
        self._active[tenant] += 1

    def on_request_finished(self, request: RequestView, reason: str) -> None:
        tenant = request.tenant
        self._active[tenant] -= 1
        if not self._active[tenant]:
            del self._active[tenant]
            heapq.heappush(self._idle, (self.counters.get(tenant, 0.0), tenant))
            self._forget()

    def on_step_done(self, report: StepReport) -> None:
        for request, tokens in report.rows:
            # A decode row computes the token sampled last step; a prefill chunk, prompt tokens.
            cost = self.decode_weight if request.generated_len > 0 and tokens == 1 else self.prefill_weight * tokens
            tenant = request.tenant
            self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)
            if tenant not in self._active:  # its last request finished within this step
                heapq.heappush(self._idle, (self.counters[tenant], tenant))
        self._forget()

    def _floor(self) -> float | None:
        """The least counter among active tenants (None: none is active)."""
        return min((self.counters[t] for t in self._active), default=None)

    def _forget(self) -> None:
        """Drop idle tenants the lift would erase anyway, then the least-served beyond the cap."""
        floor = self._floor()
        while self._idle:
            counter, tenant = self._idle[0]
            stale = tenant in self._active or self.counters.get(tenant) != counter
            if not (stale or (floor is not None and counter <= floor) or len(self._idle) > MAX_IDLE_TENANTS):
                return
            heapq.heappop(self._idle)
            if not stale:
                del self.counters[tenant]

    def select_victim(self, ctx: StepContext, candidates: list[RequestView]) -> RequestView:
        return max(candidates, key=lambda r: (self.counters.get(r.tenant, 0.0), r.arrival_index))

    def schedule(self, ctx: StepContext) -> None:
        if continue_running(ctx):
            return
        queues: dict[str, list[RequestView]] = {}
        for req in ctx.waiting:
            queues.setdefault(req.tenant, []).append(req)
        # This step's admissions are charged provisionally, so one step interleaves tenants;
        # the counters themselves move when the step is done (on_step_done).
        provisional = dict(self.counters)
        while queues and ctx.token_budget and ctx.seq_budget:
            tenant = min(queues, key=lambda t: (provisional.get(t, 0.0), queues[t][0].arrival_index))
            req = queues[tenant][0]
            n = min(req.remaining, ctx.token_budget)
            if not ctx.fits(req, n):
                return
            ctx.schedule(req, n)
            provisional[tenant] = provisional.get(tenant, 0.0) + self.prefill_weight * n / self.weight(tenant)
            queues[tenant].pop(0)
            if not queues[tenant]:
                del queues[tenant]
