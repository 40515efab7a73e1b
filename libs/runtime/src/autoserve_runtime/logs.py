"""structlog set-up shared by every service: JSON lines for machines, console for people.

Our own loggers write through structlog directly (no stdlib ``logging`` on their path).
What libraries log through the standard library (aiohttp, aiodocker, clickhouse-connect,
nats, asyncio) goes through structlog's ``ProcessorFormatter`` into the same lines, with
the same keys (``event``, ``level``, ``logger``, ``service``, ``timestamp``): at WARNING
and above unless our own level is higher, and with credentials in their text masked, since
we do not control what a library writes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

OUR_LOGGERS = "autoserve"  # stdlib loggers under this name log at our level
LIBRARY_LEVEL = logging.WARNING  # everyone else's, unless ours is higher

_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@]+@")  # nats://user:secret@host
_SECRET_VALUE = re.compile(
    r"(?i)\b(authorization|password|passwd|token|secret|api[_-]?key)(\"?'?\s*[:=]\s*\"?'?)(?:(?:bearer|basic)\s+)?[^\s\"',;&]+"
)


def mask_secrets(text: str) -> str:
    """``nats://u:p@h`` -> ``nats://***@h``; ``password=x``, ``Authorization: Bearer x`` -> ``***``."""
    return _SECRET_VALUE.sub(r"\1\2***", _URL_USERINFO.sub(r"\1***@", text))


def _mask_foreign(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = mask_secrets(value)
    return event_dict


class _ServiceName:
    def __init__(self, service: str) -> None:
        self._service = service

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", self._service)
        return event_dict


class _NamedPrintLogger(structlog.PrintLogger):
    """A ``PrintLogger`` that knows its name, so our lines carry ``logger`` as a library's do."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self._file, str(args[0]) if args else OUR_LOGGERS)


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler ``configure_logging`` puts on the root logger (replaced, never doubled)."""


def configure_logging(
    service: str, level: str | None = None, json: bool | None = None, stream: TextIO | None = None
) -> None:
    level_name = (level or os.environ.get("AUTOSERVE_LOG_LEVEL", "info")).upper()
    level_no = getattr(logging, level_name, logging.INFO)
    as_json = json if json is not None else os.environ.get("AUTOSERVE_LOG_FORMAT", "json") == "json"
    out = stream or sys.stderr
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _ServiceName(service),  # a thread's records too (a library's pool has no contextvars)
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=_NamedPrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    _route_stdlib_logging(out, level_no, shared, renderer)


def _route_stdlib_logging(out: TextIO, level_no: int, shared: list[Processor], renderer: Processor) -> None:
    handler = _Handler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _mask_foreign,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(LIBRARY_LEVEL, level_no))
    logging.getLogger(OUR_LOGGERS).setLevel(level_no)
