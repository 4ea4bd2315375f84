"""structlog setup: JSON lines when stderr is not a TTY, readable colours when it is."""

from __future__ import annotations

import logging
import sys

import structlog

DEBUG = False
"""Whether debug lines are written (set by :func:`configure_logging`): hot paths check it
before building a line that would be filtered out anyway."""


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """``fmt`` is ``json``, ``console`` or ``auto`` (console on a TTY, JSON otherwise)."""
    global DEBUG
    DEBUG = level.lower() == "debug"
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
            if hasattr(logging, "getLevelNamesMapping")
            else getattr(logging, level.upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


log = structlog.get_logger("lorad")
