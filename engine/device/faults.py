"""Test-only fault injection, for the reliability tests.

TANDEM_TEST_FAULT=raise:N makes the Nth forward step (counted from engine start, warm-up
included) raise InjectedFault; hang:N makes it block forever, as a wedged device would;
exit-rank:R makes tensor-parallel rank R's process exit before it joins the group (a follower
that dies at start-up). Unset, the cost is one comparison per step.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

ENV = "TANDEM_TEST_FAULT"
KINDS = ("raise", "hang", "exit-rank")
EXIT_RANK_CODE = 3


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    step: int  # the forward step; for exit-rank, the rank

    def check(self, step: int) -> None:
        if step != self.step or self.kind == "exit-rank":
            return
        if self.kind == "raise":
            raise InjectedFault(f"injected fault at forward step {step} ({ENV})")
        threading.Event().wait()  # hang: never returns

    def exit_before_join(self, rank: int) -> None:
        if self.kind == "exit-rank" and self.step == rank:
            os._exit(EXIT_RANK_CODE)


def from_env() -> FaultPlan | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, _, step = spec.partition(":")
    if kind not in KINDS or not step.isdigit():
        raise ValueError(f"{ENV} must be raise:N, hang:N or exit-rank:R, got {spec!r}")
    return FaultPlan(kind, int(step))
