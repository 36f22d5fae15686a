"""Log output of the `tandem` commands: JSON lines (for log pipelines) or console text, to stderr."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(verbose: bool, fmt: str = "console") -> None:
    level = logging.INFO if verbose else logging.WARNING
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
