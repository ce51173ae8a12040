"""Pino-compatible JSON log lines: numeric level, epoch-ms time, msg, pid, hostname, context."""

from __future__ import annotations

import logging
import re
import socket
import sys
from types import TracebackType
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from pythonjsonlogger.orjson import OrjsonFormatter

TRACE = 5
PINO_LEVELS = {TRACE: 10, logging.DEBUG: 20, logging.INFO: 30, logging.WARNING: 40}
PINO_LEVELS.update({logging.ERROR: 50, logging.CRITICAL: 60})
LEVEL_NAMES = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "silent": logging.CRITICAL + 10,
}
_HOSTNAME = socket.gethostname()
# A query string can hold a Bakong token or an email: the compat route takes them there.
_QUERY = re.compile(r"\?[^\s'\"<>]+")
_REDACTED = "?[redacted]"
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class PinoFilter(logging.Filter):
    """Adds pino's fields to every record so the formatter can emit them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.pino_level = PINO_LEVELS.get(record.levelno, 30)
        record.pino_time = int(record.created * 1000)
        return True


class RedactFilter(logging.Filter):
    """Keeps aiohttp's own words and drops what a client sent: aiohttp quotes request lines,
    their query strings and header lines in its log lines. Our loggers never log a query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp"):
            record.msg = _QUERY.sub(_REDACTED, record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = _exception_text(record.exc_info)
                record.exc_info = None
        return True


def _exception_text(exc_info: _ExcInfo) -> str:
    exc = exc_info[1]
    if isinstance(exc, HttpProcessingError):
        # Its message is the raw bytes that failed to parse: a header line may be
        # `Authorization: Bearer <key>`, so none of it is kept.
        return f"{type(exc).__name__}: {exc.code} (the bytes the client sent are not logged)"
    return _QUERY.sub(_REDACTED, logging.Formatter().formatException(exc_info))


class PinoFormatter(OrjsonFormatter):
    """Emits `{"level","time","pid","hostname","msg",...context}` with pino's key order."""

    def __init__(self) -> None:
        super().__init__(
            "%(pino_level)s %(pino_time)s %(process)s %(message)s",
            rename_fields={
                "pino_level": "level",
                "pino_time": "time",
                "process": "pid",
                "message": "msg",
            },
            static_fields={"hostname": _HOSTNAME},
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data.setdefault("name", "khqr-gateway")
        return log_data


def pino_handler(stream: Any = None) -> logging.Handler:
    """A handler writing pino JSON lines to `stream` (stdout by default), redacted."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.addFilter(RedactFilter())
    handler.addFilter(PinoFilter())
    handler.setFormatter(PinoFormatter())
    return handler


def setup_logging(level: str = "info", stream: Any = None) -> None:
    """Send every log record to `stream` (stdout by default) as one pino JSON line."""
    logging.addLevelName(TRACE, "TRACE")
    handler = pino_handler(stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVEL_NAMES.get(level, logging.INFO))
    # Third-party chatter at info would drown the per-request lines.
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
    # A tick still running when its next run comes is skipped on purpose (one run at a
    # time); APScheduler warns of each skip. Our tick wrapper logs what really fails.
    logging.getLogger("apscheduler").setLevel(max(root.level, logging.ERROR))
