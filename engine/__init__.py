"""tandem's engine: paged KV cache, executor, sampling, model loading and the offline Engine."""

from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine
from tandem.engine.errors import (
    EngineBusyError,
    EngineDeadError,
    InvalidRequestError,
    TandemError,
    UnsupportedModelError,
)
from tandem.engine.request import (
    Completion,
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationRequest,
    OutputOptions,
    RequestLimits,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)

__all__ = [
    "Completion",
    "Constraint",
    "ConstraintKind",
    "Engine",
    "EngineBusyError",
    "EngineConfig",
    "EngineDeadError",
    "FinishReason",
    "GenerationRequest",
    "InvalidRequestError",
    "OutputOptions",
    "RequestLimits",
    "RequestOutput",
    "SamplingParams",
    "StoppingCriteria",
    "TandemError",
    "UnsupportedModelError",
]
