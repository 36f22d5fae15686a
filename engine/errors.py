"""Typed errors. Each names what was wrong so the service layer can map it to a status."""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error tandem raises on purpose."""


class InvalidRequestError(TandemError, ValueError):
    """A request field is out of range or malformed; `field` is its dotted path (e.g. `sampling.top_p`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnsupportedModelError(TandemError):
    """The model uses an attention feature the paged executor does not reproduce exactly."""

    def __init__(self, feature: str, detail: str) -> None:
        super().__init__(f"unsupported model feature '{feature}': {detail}")
        self.feature = feature


class EngineDeadError(TandemError, RuntimeError):
    """The engine loop failed; no further requests can be served by this engine."""


class EngineHungError(EngineDeadError):
    """A step ran past the watchdog's timeout; the engine thread is presumed wedged."""


class EngineBusyError(TandemError):
    """The waiting queue is at its bound (`--max-waiting`); the request was not taken."""

    def __init__(self, max_waiting: int) -> None:
        super().__init__(f"{max_waiting} requests are already waiting (--max-waiting); retry later")
        self.max_waiting = max_waiting


class RequestRejectedError(TandemError):
    """The scheduling policy refused the request before running it (`ctx.reject`): `kind`
    "deadline" (it cannot meet its deadline) or "overload"."""

    def __init__(self, policy: str, kind: str, reason: str) -> None:
        super().__init__(f"scheduler '{policy}' refused the request: {reason}")
        self.policy, self.kind, self.reason = policy, kind, reason
