"""Logging set-up for the node: one dictConfig, text or JSON lines, third-party loggers quietened."""

from __future__ import annotations

import json
import logging
import logging.config
import re
import sys
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


#: Query keys / DICOM tags whose values are patient identifiers (QIDO-RS URLs logged by httpx, data set
#: dumps of pynetdicom): their values are masked in every log record of the protected loggers.
_PHI_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
             "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
             "PatientTelephoneNumbers", "IssuerOfPatientID")
_PHI_TAGS = ("00100010", "00100020", "00100030", "00080050", "00101000", "00101001", "00101005", "00101060",
             "00101040", "00102154")
_PHI_QUERY = re.compile(r"(?i)\b(" + "|".join(_PHI_KEYS + _PHI_TAGS) + r")=([^&\s\"']*)")
_PHI_DUMP = re.compile(r"(?i)(\((?:0010|0008), ?(?:0010|0020|0030|0050|1000|1001|1005|1060|1040|2154)\))[^\n]*")
_PHI_KEYWORD = re.compile(r"\b(" + "|".join(_PHI_KEYS) + r")(\s*[:=]\s*)(\"[^\"]*\"|'[^']*'|\[[^\]]*\]|[^\s,;&\]]+)")

#: Third-party loggers that may print URLs or data set dumps; :func:`protect_loggers` filters them.
PROTECTED = ("httpx", "httpcore", "urllib3", "urllib3.connectionpool", "uvicorn", "uvicorn.error",
             "uvicorn.access", "pynetdicom", "pydicom", "highdicom", "dicomweb_client", "requests")


def redact(text: str) -> str:
    """``text`` with the values of patient-identifying query keys and data set elements masked."""
    text = _PHI_QUERY.sub(lambda m: f"{m.group(1)}=***", text)
    text = _PHI_DUMP.sub(lambda m: f"{m.group(1)} ***", text)
    return _PHI_KEYWORD.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class PhiFilter(logging.Filter):
    """Masks patient identifiers in a record's message (the record is kept, the values are not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is passed on as it is
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:  # the traceback's messages too (formatters reuse exc_text)
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = PhiFilter()


def protect_loggers() -> None:
    """Make third-party logging safe at any level (idempotent; the node service and the CLI call it).

    * :class:`PhiFilter` on the loggers of :data:`PROTECTED` and every ``pynetdicom.*`` module logger
      (a logger's filters apply to the records it creates itself, whoever handles them);
    * pynetdicom's identifier dumps of C-FIND/C-GET/C-MOVE requests and responses off.
    """
    import sys

    # list(...) copies the keys at once: other threads may import modules or create loggers meanwhile.
    known = list(logging.Logger.manager.loggerDict) + list(sys.modules)
    names = set(PROTECTED) | {n for n in known if n.startswith("pynetdicom.")}
    for name in names:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
    try:
        from pynetdicom import _config as pynetdicom_config
    except ImportError:  # pragma: no cover - pynetdicom is a runtime dependency
        return
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stderr`` is when a record is written, not when logging was set up.

    A stderr replaced later (a test's capture, an embedding application's redirect) then neither strands
    the node's log lines on the old stream nor ends them in "Logging error: I/O operation on closed file".
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


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
        "filters": {"phi": {"()": PhiFilter}},
        "handlers": {
            "stderr": {"()": StderrHandler, "formatter": fmt, "filters": ["phi"]},
        },
        "loggers": {
            **{name: {"level": level, "handlers": ["stderr"], "propagate": False}
               for name in ("node", "dicom_io", "models", "config")},
            # Third-party loggers: WARNING, or DEBUG when the node logs at DEBUG (full diagnostics). The
            # handler's PhiFilter and protect_loggers() keep patient identifiers out at any level.
            **{name: {"level": "DEBUG" if level == "DEBUG" else "WARNING", "handlers": ["stderr"],
                      "propagate": False}
               for name in ("pynetdicom", "pydicom", "highdicom", "PIL", "httpx", "httpcore", "urllib3", "uvicorn",
                            "asyncio", "py.warnings")},
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, fmt))
    logging.captureWarnings(True)  # warnings (pydicom's about element values) go through the filtered handler
    protect_loggers()
