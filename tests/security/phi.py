"""Canary patient identifiers and a capture of every log record (helpers of the no-PHI-in-logs tests)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom

#: Recognisable values written into the test data; none may appear in any log line.
CANARY = {"PatientName": "CANARY^ZEBULON^QUIXOTE", "PatientID": "CNRYPID4711", "PatientBirthDate": "19020304",
          "AccessionNumber": "CNRYACC0815"}
#: What is searched for (each value, and the name's components).
NEEDLES = ("ZEBULON", "QUIXOTE", "CNRYPID4711", "19020304", "CNRYACC0815")

#: Loggers set to DEBUG besides every logger that exists already (the node's, and third parties').
LOGGERS = ("", "node", "dicom_io", "models", "config", "pynetdicom", "pydicom", "highdicom", "uvicorn",
           "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "urllib3", "asyncio", "starlette", "PIL",
           "py.warnings")

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def with_canary(paths: list[Path], out: Path | None = None) -> list[Path]:
    """Rewrite DICOM files (in place, or into ``out``) with the canary patient identifiers."""
    written = []
    for p in paths:
        ds = pydicom.dcmread(p)
        for key, value in CANARY.items():
            setattr(ds, key, value)
        target = p if out is None else out / p.name
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def make_sr(out: Path, study_uid: str) -> Path:
    """A Basic Text SR in the canary patient's study (a wrong SOP class for segmentation)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    for key, value in CANARY.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception as exc:  # noqa: BLE001 - a record that cannot be formatted is still inspected
            text = f"{record.name}: {record.msg!r} {record.args!r} ({exc})"
        extra = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        self.lines.append(text + (" " + extra if extra else ""))


@contextmanager
def all_loggers_at_debug() -> Iterator[list[str]]:
    """Every logger at DEBUG, propagating to one capturing handler on the root; yields the captured lines."""
    capture = _Capture()
    manager = logging.Logger.manager
    names = set(LOGGERS) | set(manager.loggerDict)
    saved: dict[str, tuple[int, bool, bool]] = {}
    for name in names:
        lg = logging.getLogger(name) if name else logging.getLogger()
        saved[name] = (lg.level, lg.propagate, lg.disabled)
        lg.setLevel(logging.DEBUG)
        lg.disabled = False
        if name:
            lg.propagate = True
    root = logging.getLogger()
    root.addHandler(capture)
    try:
        yield capture.lines
    finally:
        root.removeHandler(capture)
        for name, (level, propagate, disabled) in saved.items():
            lg = logging.getLogger(name) if name else logging.getLogger()
            lg.setLevel(level)
            lg.propagate = propagate
            lg.disabled = disabled


def leaks(texts: list[str] | str) -> list[str]:
    """The lines that contain a canary value."""
    lines = texts.splitlines() if isinstance(texts, str) else texts
    return [line[:300] for line in lines if any(n in line.upper() for n in NEEDLES)]


def scan(lines: Any) -> None:
    found = leaks(lines)
    assert not found, f"{len(found)} log line(s) carry patient identifiers:\n" + "\n".join(found[:20])
