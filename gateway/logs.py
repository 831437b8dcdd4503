"""Logs as one JSON object a line, for the gateway's own records and uvicorn's.

A record's structured fields go in `extra={"fields": {...}}`; they become top-level
keys of the line. Prompts appear only where the registry says `log_prompts: true`;
keys, hashes and worker credentials never (they are never put into a record).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

ACCESS_LOGGER = "gateway.access"


# One encoder for every line: json.dumps with options builds a new one each call,
# which was a third of an access-log line's cost.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    _second = -1
    _stamp = ""  # "%Y-%m-%dT%H:%M:%S" of `_second`: strftime once a second, not a line

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        line: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


def log_config(level: str = "info") -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config`: JSON lines on stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    loggers = ("gateway", "uvicorn", "uvicorn.error", "uvicorn.access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": handler},
        "loggers": {
            name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
            for name in loggers
        },
    }
