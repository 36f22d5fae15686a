"""Test-only fault injection, for the reliability tests.

TANDEM_TEST_FAULT=raise:N makes the Nth forward step (counted from engine start, warm-up
included) raise InjectedFault; hang:N makes it block forever, as a wedged device would.
Unset, the cost is one comparison per step.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

ENV = "TANDEM_TEST_FAULT"
KINDS = ("raise", "hang")


class InjectedFault(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultPlan:
    kind: str
    step: int

    def check(self, step: int) -> None:
        if step != self.step:
            return
        if self.kind == "raise":
            raise InjectedFault(f"injected fault at forward step {step} ({ENV})")
        threading.Event().wait()  # hang: never returns


def from_env() -> FaultPlan | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, _, step = spec.partition(":")
    if kind not in KINDS or not step.isdigit():
        raise ValueError(f"{ENV} must be raise:N or hang:N, got {spec!r}")
    return FaultPlan(kind, int(step))
