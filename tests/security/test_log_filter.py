"""The logging set-up's patient-identifier filter (config/logging.py)."""

from __future__ import annotations

import io
import logging

import pytest

from config.logging import PROTECTED, PhiFilter, logging_config, protect_loggers, redact


@pytest.mark.parametrize("text,kept,gone", [
    ("GET http://pacs/dicom-web/studies?PatientID=CNRY1&limit=3 200", ["limit=3", "PatientID=***"], ["CNRY1"]),
    ("QIDO 00100010=ZEB%5EQ&00080050=ACC9&StudyDate=2020", ["StudyDate=2020"], ["ZEB", "ACC9"]),
    ("(0010,0010) Patient's Name   PN: [CANARY^ZEB]\n(0020,000D) Study Instance UID  UI: 1.2.3",
     ["(0010,0010)", "1.2.3"], ["CANARY"]),
    ("(0010, 0030) Patient's Birth Date DA: '19020304'", ["(0010, 0030)"], ["19020304"]),
    ("PatientName='Doe^John' PatientBirthDate: 19020304, SeriesInstanceUID=1.2.3",
     ["SeriesInstanceUID=1.2.3"], ["Doe", "19020304"]),
    ("Stored 1.2.840.113619.2.55 from 'PACS'", ["1.2.840.113619.2.55", "'PACS'"], []),
])
def test_redact(text: str, kept: list[str], gone: list[str]) -> None:
    out = redact(text)
    for k in kept:
        assert k in out, out
    for g in gone:
        assert g not in out, out


def test_filter_on_protected_loggers_applies_whoever_handles_the_record() -> None:
    protect_loggers()
    from pynetdicom import _config

    assert not _config.LOG_REQUEST_IDENTIFIERS and not _config.LOG_RESPONSE_IDENTIFIERS
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)  # no filter of its own
    lg = logging.getLogger("httpx")
    old = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    try:
        lg.info("HTTP Request: GET %s", "http://x/studies?PatientName=ZEBULON")
        try:
            raise ValueError("AccessionNumber=CNRYACC0815 broken")
        except ValueError:
            lg.exception("failed")
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old)
    assert "ZEBULON" not in buf.getvalue() and "CNRYACC0815" not in buf.getvalue()
    assert "PatientName=***" in buf.getvalue() and "ValueError" in buf.getvalue()
    assert all(any(isinstance(f, PhiFilter) for f in logging.getLogger(n).filters) for n in PROTECTED)


def test_logging_config_levels() -> None:
    info = logging_config("INFO")
    debug = logging_config("DEBUG")
    assert info["loggers"]["pynetdicom"]["level"] == "WARNING" and info["loggers"]["node"]["level"] == "INFO"
    assert debug["loggers"]["pynetdicom"]["level"] == "DEBUG" and debug["loggers"]["httpx"]["level"] == "DEBUG"
    assert debug["handlers"]["stderr"]["filters"] == ["phi"]


def test_the_handler_writes_to_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured once, the node's handler follows sys.stderr when it is replaced (and closed) later."""
    import logging.config
    import sys

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate) for name in ("node", "dicom_io", "models", "config")}
    try:
        logging.config.dictConfig(logging_config("INFO"))
        logging.getLogger("node.test").info("one")
        monkeypatch.setattr(sys, "stderr", second)
        first.close()
        logging.getLogger("node.test").info("two")
        assert "two" in second.getvalue() and "one" not in second.getvalue()
    finally:
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
