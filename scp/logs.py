"""Logging set-up: human-readable text by default, JSON lines with ``--log-format json``.

Records that matter to operators (one per association, one per publication) carry their facts as
structured ``fields``; the text format shows the message, the JSON format adds every field, so a log
shipper needs no regular expressions.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import orjson


def event(logger: logging.Logger, level: int, name: str, message: str, /, **fields: Any) -> None:
    """Log ``message`` with structured ``fields`` under the event ``name``."""
    logger.log(level, message, extra={"event": name, "fields": fields})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, event and its fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "event", None):
            document["event"] = record.event  # type: ignore[attr-defined]
            document.update(getattr(record, "fields", {}))
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the process's logs to stderr in the chosen format (replaces earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings (pydicom's) become records in the same format
