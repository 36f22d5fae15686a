"""Scheduler plugins: the public plugin API, its registry and the built-in policies.

A plugin subclasses `Scheduler`, sets `name`, implements `schedule(ctx)`, and registers its
class under the `tandem.schedulers` entry-point group. See docs/schedulers.md.
"""

from tandem.schedulers.api import (
    API_VERSION,
    SUPPORTED_API_VERSIONS,
    RequestView,
    Scheduler,
    SchedulerError,
    StepContext,
    StepReport,
)
from tandem.schedulers.building_blocks import admit_waiting, continue_running
from tandem.schedulers.registry import (
    ENTRY_POINT_GROUP,
    SchedulerLoadError,
    available_schedulers,
    load_scheduler,
    parse_options,
)

__all__ = [
    "API_VERSION",
    "ENTRY_POINT_GROUP",
    "RequestView",
    "Scheduler",
    "SchedulerError",
    "SchedulerLoadError",
    "StepContext",
    "StepReport",
    "SUPPORTED_API_VERSIONS",
    "admit_waiting",
    "available_schedulers",
    "continue_running",
    "load_scheduler",
    "parse_options",
]
