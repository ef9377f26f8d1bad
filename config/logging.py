"""Logging set-up for the node: one dictConfig, text or JSON lines, third-party loggers quietened."""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

#: Attributes every LogRecord has; anything else passed via ``extra=`` is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def logging_config(level: str = "INFO", fmt: str = "text") -> dict[str, Any]:
    """The dictConfig for the node's loggers (``node``, ``dicom_io``, ``models``, ``config``)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"Log format '{fmt}' is not supported: use 'text' or 'json'.")
    level = level.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError(f"Log level '{level}' is not a logging level.")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "text": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"},
            "json": {"()": JsonFormatter},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": fmt, "stream": "ext://sys.stderr"},
        },
        "loggers": {
            **{name: {"level": level, "handlers": ["stderr"], "propagate": False}
               for name in ("node", "dicom_io", "models", "config")},
            # Third-party loggers: pynetdicom logs whole datasets at DEBUG (patient identifiers).
            **{name: {"level": "WARNING", "handlers": ["stderr"], "propagate": False}
               for name in ("pynetdicom", "pydicom", "highdicom", "PIL", "httpx", "urllib3")},
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))
