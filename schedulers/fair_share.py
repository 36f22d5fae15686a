"""Fair share between tenants: the virtual token counter (VTC) policy.

Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024): each tenant has a
counter of the service it has received, prefill and decode tokens weighted, divided by the
tenant's weight; new work is admitted from the tenant with the least. A tenant that becomes
active again is lifted to the least counter among the active ones, so idle time banks no credit.
"""

from __future__ import annotations

from tandem.schedulers.api import RequestView, Scheduler, StepContext, StepReport
from tandem.schedulers.building_blocks import continue_running


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
        self.counters: dict[str, float] = {}  # tenant -> weighted service received
        self._active: dict[str, int] = {}  # tenant -> requests not finished

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def on_request_added(self, request: RequestView) -> None:
        tenant = request.tenant
        if not self._active.get(tenant):
            active = [self.counters[t] for t, n in self._active.items() if n and t in self.counters]
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), min(active, default=0.0))
        self._active[tenant] = self._active.get(tenant, 0) + 1

    def on_request_finished(self, request: RequestView, reason: str) -> None:
        self._active[request.tenant] -= 1

    def on_step_done(self, report: StepReport) -> None:
        for request, tokens in report.rows:
            # A decode row computes the token sampled last step; a prefill chunk, prompt tokens.
            cost = self.decode_weight if request.generated_len > 0 and tokens == 1 else self.prefill_weight * tokens
            self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + cost / self.weight(request.tenant)

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
