"""Durable instance store: fsynced files renamed atomically into place, indexed in SQLite (WAL)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import sqlite3
import stat as statmod
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crc32c import crc32c
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError
from dicom_io.query import HEADER_KEYWORDS, SERIES_COLUMNS, STUDY_COLUMNS, IndexedAttributes

logger = logging.getLogger(__name__)

#: A UID that is safe to use as a path component: digits and dots, at most 64 characters (PS3.5 9.1).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Kinds of stored instances: received from a peer, or produced by the node (a result such as a SEG).
KIND_RECEIVED = "received"
KIND_RESULT = "result"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL DEFAULT '',
    instance_number     INTEGER,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    received_at         REAL NOT NULL,
    calling_ae_title    TEXT NOT NULL DEFAULT '',
    kind                TEXT NOT NULL DEFAULT 'received',
    delivered_at        REAL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_instance_uid);
CREATE INDEX IF NOT EXISTS instances_received ON instances(received_at);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    modality            TEXT NOT NULL DEFAULT '',
    series_number       INTEGER,
    series_description  TEXT NOT NULL DEFAULT '',
    calling_ae_title    TEXT NOT NULL DEFAULT '',
    kind                TEXT NOT NULL DEFAULT 'received',
    first_received      REAL NOT NULL,
    last_received       REAL NOT NULL,
    stable_at           REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    study_date         TEXT NOT NULL DEFAULT '',
    study_description  TEXT NOT NULL DEFAULT '',
    last_received      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    sop_instance_uid TEXT NOT NULL,
    holder           TEXT NOT NULL,
    PRIMARY KEY (sop_instance_uid, holder)
);
"""

#: Version of the index schema (``PRAGMA user_version``). Version 0 is :data:`_SCHEMA`; :meth:`Store._migrate`
#: brings an index up to this version when the store is opened (a new index too, by the same steps).
INDEX_VERSION = 1

# Version 1: what QIDO-RS searches need (dicom_io.query, docs/dicomweb.md "QIDO-RS"). Per study and series the
# kept header attributes (DICOM JSON, ``attrs``; NULL until filled) and matching columns read from one instance;
# counts and ModalitiesInStudy kept up to date by triggers; per instance its pixel-matrix attributes
# (``header_indexed`` = 0 for instances indexed before version 1, whose header is read when asked).
_V1_COLUMNS = {
    "studies": ["attrs TEXT", "num_series INTEGER NOT NULL DEFAULT 0", "num_instances INTEGER NOT NULL DEFAULT 0",
                "modalities TEXT NOT NULL DEFAULT ''"] + [f"{c} TEXT NOT NULL DEFAULT ''" for c in STUDY_COLUMNS],
    "series": ["attrs TEXT", "num_instances INTEGER NOT NULL DEFAULT 0"]
              + [f"{c} TEXT NOT NULL DEFAULT ''" for c in SERIES_COLUMNS],
    "instances": ["pixel_rows INTEGER", "pixel_columns INTEGER", "bits_allocated INTEGER", "number_of_frames INTEGER",
                  "header_indexed INTEGER NOT NULL DEFAULT 0"],
}
_MODALITIES = ("(SELECT COALESCE(group_concat(m, '\\'), '') FROM (SELECT DISTINCT modality AS m FROM series "
               "WHERE study_instance_uid = {study} AND modality != '' ORDER BY m))")
_SERIES_STUDY = "(SELECT study_instance_uid FROM series WHERE series_instance_uid = {series})"
_V1_SQL = f"""
CREATE INDEX IF NOT EXISTS studies_received ON studies(last_received, study_instance_uid);
CREATE INDEX IF NOT EXISTS studies_patient_id ON studies(patient_id);
CREATE INDEX IF NOT EXISTS studies_patient_name ON studies(patient_name_key);
CREATE INDEX IF NOT EXISTS studies_date ON studies(study_date);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_number);
CREATE INDEX IF NOT EXISTS series_received ON series(last_received, series_instance_uid);
CREATE TRIGGER IF NOT EXISTS instances_counted AFTER INSERT ON instances BEGIN
  UPDATE series SET num_instances = num_instances + 1 WHERE series_instance_uid = NEW.series_instance_uid;
  UPDATE studies SET num_instances = num_instances + 1
    WHERE study_instance_uid = {_SERIES_STUDY.format(series="NEW.series_instance_uid")};
END;
CREATE TRIGGER IF NOT EXISTS instances_uncounted AFTER DELETE ON instances BEGIN
  UPDATE series SET num_instances = num_instances - 1 WHERE series_instance_uid = OLD.series_instance_uid;
  UPDATE studies SET num_instances = num_instances - 1
    WHERE study_instance_uid = {_SERIES_STUDY.format(series="OLD.series_instance_uid")};
END;
CREATE TRIGGER IF NOT EXISTS instances_moved AFTER UPDATE OF series_instance_uid ON instances
  WHEN OLD.series_instance_uid != NEW.series_instance_uid BEGIN
  UPDATE series SET num_instances = num_instances - 1 WHERE series_instance_uid = OLD.series_instance_uid;
  UPDATE studies SET num_instances = num_instances - 1
    WHERE study_instance_uid = {_SERIES_STUDY.format(series="OLD.series_instance_uid")};
  UPDATE series SET num_instances = num_instances + 1 WHERE series_instance_uid = NEW.series_instance_uid;
  UPDATE studies SET num_instances = num_instances + 1
    WHERE study_instance_uid = {_SERIES_STUDY.format(series="NEW.series_instance_uid")};
END;
CREATE TRIGGER IF NOT EXISTS series_counted AFTER INSERT ON series BEGIN
  UPDATE studies SET num_series = num_series + 1, num_instances = num_instances + NEW.num_instances,
    modalities = {_MODALITIES.format(study="NEW.study_instance_uid")}
    WHERE study_instance_uid = NEW.study_instance_uid;
END;
CREATE TRIGGER IF NOT EXISTS series_uncounted AFTER DELETE ON series BEGIN
  UPDATE studies SET num_series = num_series - 1, num_instances = num_instances - OLD.num_instances,
    modalities = {_MODALITIES.format(study="OLD.study_instance_uid")}
    WHERE study_instance_uid = OLD.study_instance_uid;
END;
CREATE TRIGGER IF NOT EXISTS series_changed AFTER UPDATE OF modality, study_instance_uid ON series BEGIN
  UPDATE studies SET
    num_series = (SELECT COUNT(*) FROM series s WHERE s.study_instance_uid = studies.study_instance_uid),
    num_instances = (SELECT COALESCE(SUM(s.num_instances), 0) FROM series s
                     WHERE s.study_instance_uid = studies.study_instance_uid),
    modalities = {_MODALITIES.format(study="studies.study_instance_uid")}
    WHERE study_instance_uid IN (OLD.study_instance_uid, NEW.study_instance_uid);
END;
"""
# The counts as the triggers keep them, computed from scratch (the migration, in the transaction creating them).
_V1_RECOUNT = f"""
UPDATE series SET num_instances = (SELECT COUNT(*) FROM instances i
                                   WHERE i.series_instance_uid = series.series_instance_uid);
UPDATE studies SET
  num_series = (SELECT COUNT(*) FROM series s WHERE s.study_instance_uid = studies.study_instance_uid),
  num_instances = (SELECT COALESCE(SUM(s.num_instances), 0) FROM series s
                   WHERE s.study_instance_uid = studies.study_instance_uid),
  modalities = {_MODALITIES.format(study="studies.study_instance_uid")};
"""

#: Series whose kept attributes the migration reads per transaction.
_MIGRATION_BATCH = 200

#: Permissions of the index files (``index.sqlite`` and its ``-wal``/``-shm``): they hold patient names and IDs.
INDEX_FILE_MODE = 0o600


class InstanceValidationError(DicomInputError):
    """An instance cannot be stored: it cannot be decoded, or a required UID is missing or invalid.

    ``kind`` is ``"decode"``, ``"uid"``, ``"sop_class_mismatch"`` or ``"sop_instance_mismatch"``.
    """

    def __init__(self, message: str, kind: str = "decode") -> None:
        super().__init__(message)
        self.kind = kind


#: Longest pause (seconds) of the placer before it places acknowledged instances without a kick.
PLACER_PAUSE = 0.005

#: Room kept beyond a journaled instance's own size when checking free space (directory and inode blocks).
_SPACE_MARGIN = 256 * 1024


class StoreFullError(OSError):
    """The store's file system has less free space than the configured minimum."""


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UID that is safe as a file name (digits and dots, ≤ 64 chars)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_PATTERN.match(value) is not None


@dataclass(frozen=True)
class InstanceInfo:
    """The attributes the index keeps for one instance (no patient identifiers)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    instance_number: int | None = None
    study_date: str = ""
    study_description: str = ""
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    #: Raw values of the attributes QIDO-RS keeps per study and series (:data:`dicom_io.query.HEADER_KEYWORDS`),
    #: when read from the bytes (:meth:`from_raw`); None otherwise (the header is read when indexed).
    kept: dict[str, bytes] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str = "", *, walk: bool = False) -> InstanceInfo:
        """Read the index attributes of ``ds``.

        Parameters
        ----------
        ds
            A decoded (possibly lazily) data set.
        transfer_syntax_uid
            The transfer syntax it was encoded in (from the presentation context or file meta).
        walk
            Also convert every element, recursively, so that a structurally broken data set
            (bad lengths, broken sequences) is detected now rather than when it is used.

        Raises
        ------
        InstanceValidationError
            ``kind="decode"`` when an element cannot be decoded, ``kind="uid"`` when SOP Class/
            Instance, Study or Series Instance UID is missing or not a valid UID.
        """
        try:
            if walk:
                for _elem in ds.iterall():
                    pass
            values = {key: _raw_text(ds, key) for key in
                      ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
            modality = _raw_text(ds, "Modality")
            series_number = _raw_text(ds, "SeriesNumber")
            instance_number = _raw_text(ds, "InstanceNumber")
            extra = {key: _raw_text(ds, key) for key in ("SeriesDescription", "StudyDate", "StudyDescription")}
            pixels = {key: _raw_int(ds, key) for key in ("Rows", "Columns", "BitsAllocated", "NumberOfFrames")}
        except Exception as exc:  # pydicom raises many types for broken data
            raise InstanceValidationError(f"Data set cannot be decoded: {type(exc).__name__}: {exc}") from exc
        bad = [key for key, value in values.items() if not is_valid_uid(value)]
        if bad:
            raise InstanceValidationError(f"Missing or invalid UID(s): {', '.join(bad)}.", kind="uid")
        return cls(
            sop_class_uid=str(values["SOPClassUID"]),
            sop_instance_uid=str(values["SOPInstanceUID"]),
            study_instance_uid=str(values["StudyInstanceUID"]),
            series_instance_uid=str(values["SeriesInstanceUID"]),
            transfer_syntax_uid=str(transfer_syntax_uid or ""),
            modality=_text(modality),
            series_number=_int(series_number),
            series_description=_text(extra["SeriesDescription"]),
            instance_number=_int(instance_number),
            study_date=_text(extra["StudyDate"]),
            study_description=_text(extra["StudyDescription"]),
            rows=pixels["Rows"], columns=pixels["Columns"], bits_allocated=pixels["BitsAllocated"],
            number_of_frames=pixels["NumberOfFrames"],
        )

    @classmethod
    def from_raw(cls, values: dict[str, bytes], transfer_syntax_uid: str = "") -> InstanceInfo:
        """Build from the raw values :func:`check_encoding` returns (no pydicom decoding).

        Raises
        ------
        InstanceValidationError
            ``kind="uid"`` when an identifying UID is missing or invalid.
        """
        order = "big" if transfer_syntax_uid == _EXPLICIT_BE else "little"
        us = {k: int.from_bytes(values[k][:2], order) if len(values.get(k, b"")) >= 2 else None
              for k in ("Rows", "Columns", "BitsAllocated")}
        text = {k: v.decode("ascii", errors="replace").strip(" \x00") for k, v in values.items()
                if k not in us}
        uids = {k: text.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
        bad = [k for k, v in uids.items() if not is_valid_uid(v)]
        if bad:
            raise InstanceValidationError(f"Missing or invalid UID(s): {', '.join(bad)}.", kind="uid")
        return cls(
            sop_class_uid=str(uids["SOPClassUID"]),
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            study_instance_uid=str(uids["StudyInstanceUID"]),
            series_instance_uid=str(uids["SeriesInstanceUID"]),
            transfer_syntax_uid=str(transfer_syntax_uid or ""),
            modality=_text(text.get("Modality")),
            series_number=_int(text.get("SeriesNumber")),
            series_description=_text(text.get("SeriesDescription")),
            instance_number=_int(text.get("InstanceNumber")),
            study_date=_text(text.get("StudyDate")),
            study_description=_text(text.get("StudyDescription")),
            rows=us["Rows"], columns=us["Columns"], bits_allocated=us["BitsAllocated"],
            number_of_frames=_int(text.get("NumberOfFrames")),
            kept={k: values[k] for k in HEADER_KEYWORDS if k in values},
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> InstanceInfo:
        """Read the index attributes from a DICOM file (header only, no pixel data).

        Raises
        ------
        InstanceValidationError
            When the file cannot be read or lacks valid UIDs.
        """
        try:
            ds = dcmread(os.fspath(path), stop_before_pixels=True, force=True)
            ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        except Exception as exc:
            raise InstanceValidationError(f"File '{path}' cannot be read: {type(exc).__name__}: {exc}") from exc
        return cls.from_dataset(ds, ts)


def _raw_text(ds: Dataset, keyword: str) -> str | None:
    """An element's value as text without pydicom's value conversion (and its validation warnings)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        raw = elem.value
        if raw is None:
            return ""
        return bytes(raw).decode("ascii", errors="replace").strip(" \x00")
    value = elem.value
    return "" if value is None else str(value)


def _raw_int(ds: Dataset, keyword: str) -> int | None:
    """An integer element (US, IS) of ``ds``, or None when absent or not an integer."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        raw = bytes(elem.value or b"")
        if keyword == "NumberOfFrames":  # IS: text
            return _int(raw.decode("ascii", errors="replace").strip(" \x00"))
        # US (Rows, Columns, BitsAllocated)
        return int.from_bytes(raw[:2], "little" if elem.is_little_endian else "big") if len(raw) >= 2 else None
    try:
        value = elem.value
        return int(value[0] if isinstance(value, (list, tuple)) else value) if value not in (None, "") else None
    except (TypeError, ValueError, IndexError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    return text[:256]


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")


#: Top-level tags whose raw values :func:`check_encoding` returns (what the index needs).
INDEX_TAGS = {
    0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID", 0x00080060: "Modality", 0x00200011: "SeriesNumber",
    0x00200013: "InstanceNumber", 0x0008103E: "SeriesDescription", 0x00080020: "StudyDate",
    0x00081030: "StudyDescription", 0x00280010: "Rows", 0x00280011: "Columns", 0x00280100: "BitsAllocated",
    0x00280008: "NumberOfFrames",
    **{int(tag_for_keyword(kw)): kw for kw in HEADER_KEYWORDS},  # type: ignore[arg-type]
}


def check_encoding(data: bytes | bytearray | memoryview, transfer_syntax_uid: str) -> dict[str, bytes]:
    """Walk the element headers of an encoded data set and check that they fit together exactly.

    pydicom reads a truncated data set without complaint (a value cut short is returned short), so
    this walk is what tells a complete data set from a damaged one: every value must fit in the
    stream, every undefined-length sequence/item must be closed, and the stream must end on an
    element boundary. Values are not decoded.

    Returns
    -------
    dict
        Raw values of the top-level :data:`INDEX_TAGS` present, by keyword.

    Raises
    ------
    InstanceValidationError
        ``kind="decode"`` naming the offset where the encoding breaks.
    """
    import zlib

    buf = memoryview(data).cast("B")
    if transfer_syntax_uid in _DEFLATED:
        try:
            buf = memoryview(zlib.decompress(bytes(buf), -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise InstanceValidationError(f"Deflated data set cannot be inflated: {exc}") from exc
    implicit = transfer_syntax_uid == _IMPLICIT_LE
    little = transfer_syntax_uid != _EXPLICIT_BE
    found: dict[str, bytes] = {}
    end = _walk(buf, 0, len(buf), implicit, little, nested=False, found=found)
    if end != len(buf):
        raise InstanceValidationError(f"Data set encoding breaks at byte {end} of {len(buf)}.")
    return found


def _walk(buf: memoryview, pos: int, end: int, implicit: bool, little: bool, nested: bool,
          found: dict[str, bytes] | None = None) -> int:
    """Walk elements from ``pos``; returns the position after the last element (or after an item delimiter)."""
    order = "little" if little else "big"
    while pos < end:
        if pos + 8 > end:
            raise InstanceValidationError(f"Data set truncated in an element header at byte {pos}.")
        group = int.from_bytes(buf[pos:pos + 2], order)
        elem = int.from_bytes(buf[pos + 2:pos + 4], order)
        tag = (group << 16) | elem
        if tag == _ITEM_END and nested:
            return pos + 8
        if tag in (_ITEM_END, _SEQ_END):
            raise InstanceValidationError(f"Unexpected delimiter at byte {pos}.")
        vr = bytes(buf[pos + 4:pos + 6])
        if implicit or group == 0xFFFE:
            length, header, vr = int.from_bytes(buf[pos + 4:pos + 8], order), 8, b""
        elif vr in _LONG_VRS:
            if pos + 12 > end:
                raise InstanceValidationError(f"Data set truncated in an element header at byte {pos}.")
            length, header = int.from_bytes(buf[pos + 8:pos + 12], order), 12
        elif vr.isalpha() and vr.isupper():
            length, header = int.from_bytes(buf[pos + 6:pos + 8], order), 8
        else:
            raise InstanceValidationError(f"Invalid VR {vr!r} at byte {pos}.")
        pos += header
        if length == _UNDEFINED:
            # Sequence (or encapsulated pixel data, or UN holding a sequence in implicit VR LE).
            sub_implicit = implicit or vr == b"UN"
            sub_little = little or vr == b"UN"
            pos = _walk_items(buf, pos, end, sub_implicit, sub_little)
            continue
        if pos + length > end:
            raise InstanceValidationError(
                f"Element ({group:04X},{elem:04X}) at byte {pos - header} needs {length} bytes; "
                f"only {end - pos} remain (data set truncated).")
        if found is not None and tag in INDEX_TAGS:
            found[INDEX_TAGS[tag]] = bytes(buf[pos:pos + length])
        pos += length
    if nested:
        raise InstanceValidationError(f"Item not closed by an item delimiter (data set truncated at byte {pos}).")
    return pos


def _walk_items(buf: memoryview, pos: int, end: int, implicit: bool, little: bool) -> int:
    order = "little" if little else "big"
    while True:
        if pos + 8 > end:
            raise InstanceValidationError(f"Undefined-length sequence not closed (data set truncated at byte {pos}).")
        tag = (int.from_bytes(buf[pos:pos + 2], order) << 16) | int.from_bytes(buf[pos + 2:pos + 4], order)
        length = int.from_bytes(buf[pos + 4:pos + 8], order)
        if tag == _SEQ_END:
            return pos + 8
        if tag != _ITEM:
            raise InstanceValidationError(f"Expected an item tag in a sequence at byte {pos}.")
        pos += 8
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, implicit, little, nested=True)
        else:
            if pos + length > end:
                raise InstanceValidationError(f"Item at byte {pos - 8} needs {length} bytes; data set truncated.")
            pos += length


_LONG_META_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def read_file_meta(data: bytes | bytearray | memoryview) -> tuple[str, int]:
    """The transfer syntax of a Part 10 file and the offset where its data set starts (PS3.10 7.1).

    Raises
    ------
    InstanceValidationError
        ``kind="decode"`` when there is no ``DICM`` prefix or the file meta information is broken.
    """
    buf = memoryview(data)
    if bytes(buf[128:132]) != b"DICM":
        raise InstanceValidationError("Part is not a DICOM Part 10 file (no 'DICM' prefix).", kind="decode")
    pos, ts = 132, ""
    while pos + 8 <= len(buf) and int.from_bytes(buf[pos:pos + 2], "little") == 0x0002:
        elem = int.from_bytes(buf[pos + 2:pos + 4], "little")
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in _LONG_META_VRS:
            length, header = int.from_bytes(buf[pos + 8:pos + 12], "little"), 12
        else:
            length, header = int.from_bytes(buf[pos + 6:pos + 8], "little"), 8
        if length == 0xFFFFFFFF or pos + header + length > len(buf):
            raise InstanceValidationError("File meta information is truncated or malformed.", kind="decode")
        if elem == 0x0010:
            ts = bytes(buf[pos + header:pos + header + length]).decode("ascii", "replace").strip(" \x00")
        pos += header + length
    if not ts:
        raise InstanceValidationError("File meta information has no Transfer Syntax UID.", kind="decode")
    return ts, pos


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, *,
    implementation_class_uid: str, implementation_version_name: str = "", source_ae_title: str = "",
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1), encoded directly (Explicit VR LE)."""

    def el(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
        if len(value) % 2:
            value += pad
        if vr == b"OB":
            return (b"\x02\x00" + elem.to_bytes(2, "little") + vr + b"\x00\x00"
                    + len(value).to_bytes(4, "little") + value)
        return b"\x02\x00" + elem.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little") + value

    body = b"".join((
        el(0x0001, b"OB", b"\x00\x01", b"\x00"),
        el(0x0002, b"UI", sop_class_uid.encode("ascii"), b"\x00"),
        el(0x0003, b"UI", sop_instance_uid.encode("ascii"), b"\x00"),
        el(0x0010, b"UI", transfer_syntax_uid.encode("ascii"), b"\x00"),
        el(0x0012, b"UI", implementation_class_uid.encode("ascii"), b"\x00"),
        el(0x0013, b"SH", implementation_version_name.encode("ascii", "replace")[:16], b" ")
        if implementation_version_name else b"",
        el(0x0016, b"AE", source_ae_title.strip().encode("ascii", "replace")[:16], b" ") if source_ae_title.strip() else b"",
    ))
    return b"\x00" * 128 + b"DICM" + el(0x0000, b"UL", len(body).to_bytes(4, "little"), b"") + body


# --- acknowledgement journal ---------------------------------------------------------------------
#
# A ring of pre-allocated, zero-filled segment files under <store>/journal. An instance is appended
# as one record (header, JSON meta, the complete Part 10 file) and fdatasync'ed. The segment's blocks
# were written and fsynced when it was created, so that flush has no file-system metadata to commit:
# it is one data write plus one cache flush, where a new file costs a journal commit for its blocks
# and another for its directory entry. Once the record is durable the instance is placed (written,
# renamed, indexed) without further flushes, and acknowledged. A checkpointer thread later makes the
# placed files durable all at once (syncfs) and only then advances the durable checkpoint, which frees
# the segments behind it. Recovery replays every record newer than the checkpoint before anything is
# served. See docs/node.md "Durability guarantees".

_JOURNAL_MAGIC = b"AINJRNL1"
_JOURNAL_HEADER = struct.Struct("<8sQIQI")  # magic, seq, meta length, payload length, crc(meta + payload)
_JOURNAL_HEADER_SIZE = 64                   # header (32 bytes) + its crc32 (4) + checksum marker (4), zero padded
#: In the header's padding: the record's payload checksum is CRC-32C (Castagnoli). Records without it
#: (written before the marker existed: zero padding) carry zlib's CRC-32 and are still replayed.
_CRC32C_MARK = b"C32C"
_CHECKPOINT_MAGIC = b"AINJCKP1"
_ALIGN = 4096
#: Segments in the ring; each is ``journal_bytes / _JOURNAL_SEGMENTS`` long.
_JOURNAL_SEGMENTS = 4


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _encode_record(seq: int, meta: bytes, parts: Sequence[bytes | bytearray | memoryview]) -> tuple[bytes, int]:
    """The record header for ``meta`` + ``parts`` and the record's total length.

    The payload checksum is CRC-32C, computed in hardware (SSE 4.2 / ARMv8 CRC) by the ``crc32c``
    package: ~0.04 ms for a 0.5 MB instance where zlib's CRC-32 takes ~0.4 ms of CPU.
    """
    crc = crc32c(meta)
    length = 0
    for part in parts:
        crc = crc32c(part, crc)
        length += memoryview(part).nbytes
    head = _JOURNAL_HEADER.pack(_JOURNAL_MAGIC, seq, len(meta), length, crc)
    head += zlib.crc32(head).to_bytes(4, "little") + _CRC32C_MARK
    return head.ljust(_JOURNAL_HEADER_SIZE, b"\0"), _JOURNAL_HEADER_SIZE + len(meta) + length


@dataclass(frozen=True)
class JournalRecord:
    """A record read back from the journal: its sequence number, meta (AE title, kind, time) and file bytes."""

    seq: int
    meta: dict[str, Any]
    data: bytes


def read_journal(directory: Path) -> tuple[int, int, list[JournalRecord]]:
    """Scan a journal directory: (durable checkpoint, highest sequence number seen, records after the checkpoint).

    A segment is read from its start up to the first record that is not intact (a torn tail: bad
    header, bad checksum, or running past the end); records at or below the checkpoint are stale.
    """
    checkpoint = _read_checkpoint(directory)
    highest = checkpoint
    records: list[JournalRecord] = []
    for seg in sorted(directory.glob("seg-*.bin")):
        with open(seg, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + _JOURNAL_HEADER_SIZE <= len(data):
            head = data[pos:pos + _JOURNAL_HEADER.size]
            magic, seq, meta_len, length, crc = _JOURNAL_HEADER.unpack(head)
            h = pos + _JOURNAL_HEADER.size
            if magic != _JOURNAL_MAGIC or zlib.crc32(head) != int.from_bytes(data[h:h + 4], "little"):
                break
            start = pos + _JOURNAL_HEADER_SIZE
            end = start + meta_len + length
            checksum = crc32c if data[h + 4:h + 8] == _CRC32C_MARK else zlib.crc32
            if end > len(data) or checksum(memoryview(data)[start:end]) != crc:
                break  # torn: never acknowledged
            highest = max(highest, seq)
            if seq > checkpoint:
                try:
                    meta = json.loads(data[start:start + meta_len])
                except ValueError:
                    meta = {}
                records.append(JournalRecord(seq, meta if isinstance(meta, dict) else {},
                                             data[start + meta_len:end]))
            pos += _aligned(end - pos)
    records.sort(key=lambda r: r.seq)
    return checkpoint, highest, records


def _read_checkpoint(directory: Path) -> int:
    try:
        raw = (directory / "checkpoint").read_bytes()
    except FileNotFoundError:
        return 0
    if len(raw) == 20 and raw[:8] == _CHECKPOINT_MAGIC and zlib.crc32(raw[:16]) == int.from_bytes(raw[16:], "little"):
        return int.from_bytes(raw[8:16], "little")
    raise OSError(errno.EIO, "Journal checkpoint is unreadable", str(directory / "checkpoint"))


def _write_checkpoint(directory: Path, seq: int) -> None:
    """Durably replace the checkpoint (write, fsync, rename, directory fsync)."""
    body = _CHECKPOINT_MAGIC + seq.to_bytes(8, "little")
    tmp = directory / "checkpoint.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, body + zlib.crc32(body).to_bytes(4, "little"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / "checkpoint")
    _fsync_dir(directory)


_libc: Any = None


def _get_libc() -> Any:
    """The C library through ctypes (for syncfs and sync_file_range), or False when unavailable."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.syncfs  # noqa: B018 - probe
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc


def syncfs(path: Path) -> None:
    """Flush everything of the file system holding ``path`` to stable storage (syncfs(2); sync(2) without it).

    Raises
    ------
    OSError
        When the kernel reports a write-back error.
    """
    import ctypes

    lib = _get_libc()
    if not lib:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if lib.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed: {os.strerror(err)}", str(path))
    finally:
        os.close(fd)


class _Segment:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.state = "free"      # free -> active -> full -> free (after a checkpoint covers last_seq)
        self.last_seq = 0
        #: Set when a write or flush of record ``poisoned_from`` failed: no record after it in this
        #: segment may be acknowledged (a reader stops at the first record that is not intact).
        self.poisoned_from: int | None = None


class _Journal:
    """The acknowledgement journal of a serving store (see the comment above :func:`read_journal`).

    Appends from concurrent threads are written in parallel, each at its own reserved offset, and made
    durable together (group commit): the first appender that finds no flush in flight becomes the
    leader and fdatasyncs every record written so far; appenders that arrive while that flush is on
    the disk wait and join the next one. A record counts as durable only when it, and every record
    before it, was completely written before a flush that succeeded.
    """

    def __init__(self, directory: Path, total_bytes: int, sync_path: Path, after_seq: int,
                 idle_checkpoint_seconds: float = 1.0) -> None:
        self.directory = directory
        self.segment_bytes = max(1 << 20, _aligned(total_bytes // _JOURNAL_SEGMENTS))
        self.sync_path = sync_path
        self.idle_checkpoint_seconds = idle_checkpoint_seconds
        self.checkpoint = after_seq
        #: Highest sequence number handed out (its record may still be on its way to the disk).
        self.seq = after_seq
        self._segments: list[_Segment] = []
        self._active: _Segment | None = None
        self._offset = 0
        self._inflight: set[int] = set()
        self._mutex = threading.RLock()
        self._state = threading.Condition(self._mutex)    # segment states, in-flight set, checkpointer wake-ups
        self._flushed = threading.Condition(self._mutex)  # group commit: a flush finished
        #: Every record up to this one is decided (acknowledged durable, or failed).
        self._decided = after_seq
        self._written: dict[int, _Segment] = {}    # written completely, not yet decided
        self._failed: dict[int, BaseException] = {}  # decided: failed (taken by its appender)
        self._flushing = False
        self._stop = False
        self._force = False
        self._last_append = 0.0
        self.appended = 0
        self.bypassed = 0
        #: Flushes (fdatasync rounds) done for appended records; ``appended / flushes`` is the batch size.
        self.flushes = 0
        #: Called just before each record's flush (the store wakes its placer then).
        self.before_flush: Callable[[], None] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(directory.glob("seg-*.bin")):
            if path.stat().st_size != self.segment_bytes:
                path.unlink()  # from another journal size; replayed already
                continue
            self._segments.append(_Segment(path, os.open(path, os.O_RDWR | os.O_CLOEXEC)))
        if not self._segments:
            self._create_segment()
        self._thread = threading.Thread(target=self._run, name="store-journal", daemon=True)
        self._thread.start()

    @property
    def max_record(self) -> int:
        """Records larger than this bypass the journal (the file is flushed on its own instead)."""
        return self.segment_bytes // 2

    def _create_segment(self) -> bool:
        index = len(self._segments)
        if index >= _JOURNAL_SEGMENTS:
            return False
        path = self.directory / f"seg-{index:02d}.bin"
        tmp = path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                zeros = bytes(1 << 20)
                for _ in range(self.segment_bytes // len(zeros)):
                    os.write(fd, zeros)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.rename(tmp, path)
            _fsync_dir(self.directory)
        except OSError as exc:
            _unlink_quietly(tmp)
            logger.warning("Journal segment %s cannot be created (%s); instances are flushed one by one meanwhile",
                           path.name, exc)
            return False
        with self._state:
            self._segments.append(_Segment(path, fd))
        return True

    def append(self, meta: bytes, parts: Sequence[bytes | bytearray | memoryview]) -> int | None:
        """Write one record durably; its sequence number, or None when it must bypass the journal.

        Safe to call from several threads at once: their records share flushes (group commit). It
        returns only once the record is on stable storage.

        Raises
        ------
        OSError
            When the write fails, or the flush of the batch holding the record fails, or an earlier
            record of the same segment failed before this one could be flushed (nothing was
            acknowledged; the caller answers with a failure status).
        """
        size = _JOURNAL_HEADER_SIZE + len(meta) + sum(memoryview(p).nbytes for p in parts)
        if size > self.max_record:
            self.bypassed += 1
            return None
        with self._mutex:
            seg = self._active
            if seg is None or self._offset + size > self.segment_bytes:
                if seg is not None:
                    seg.state = "full"
                    self._active = None
                seg = next((s for s in self._segments if s.state == "free"), None)
                self._state.notify_all()
                if seg is None:
                    self.bypassed += 1
                    return None
                seg.state, self._active, self._offset, seg.poisoned_from = "active", seg, 0, None
            self.seq = seq = self.seq + 1
            offset = self._offset
            self._offset = offset + _aligned(size)
            seg.last_seq = seq
            self._inflight.add(seq)  # the checkpoint must not pass a record before it is placed
        try:
            head, _ = _encode_record(seq, meta, parts)
            written = os.pwritev(seg.fd, [head, meta, *parts], offset)
            if written != size:
                raise OSError(errno.EIO, f"Short journal write ({written} of {size} bytes)", str(seg.path))
        except BaseException as exc:  # whatever it is, the record must be decided or later ones wait forever
            with self._mutex:
                self._poison(seg, seq)
                self._failed[seq] = exc
                self._settle_decided()
                self._flushed.notify_all()  # a waiter behind this record may lead now
            self._take(seq)
            raise
        with self._mutex:
            self._written[seq] = seg
            self._settle_decided()
            while seq > self._decided:
                if self._flushing:
                    self._flushed.wait()
                    continue
                if not self._lead():
                    self._flushed.wait()  # a record before ours is still being written
        self._take(seq)
        return seq

    def _take(self, seq: int) -> None:
        """Collect the fate of a decided record: return normally when durable, raise its error otherwise."""
        with self._mutex:
            exc = self._failed.pop(seq, None)
            if exc is None:
                self._last_append = time.monotonic()
                self.appended += 1
                return
            self._inflight.discard(seq)
            self._state.notify_all()
        raise exc

    def _poison(self, seg: _Segment, seq: int) -> None:
        """Record ``seq`` of ``seg`` failed: retire the segment, and fail every later record in it (mutex held)."""
        if seg.poisoned_from is None or seq < seg.poisoned_from:
            seg.poisoned_from = seq
        if self._active is seg:
            seg.state = "full"
            self._active = None
            self._state.notify_all()

    def _settle_decided(self) -> None:
        """Advance ``_decided`` over failed records and over written records doomed by a failure before
        them in their segment (mutex held)."""
        while True:
            nxt = self._decided + 1
            if nxt in self._failed:
                self._decided = nxt
                continue
            seg = self._written.get(nxt)
            if seg is not None and seg.poisoned_from is not None and nxt > seg.poisoned_from:
                del self._written[nxt]
                self._failed[nxt] = OSError(errno.EIO, "An earlier journal record of the same segment failed",
                                            str(seg.path))
                self._decided = nxt
                self._flushed.notify_all()
                continue
            return

    def _lead(self) -> bool:
        """Flush every record written so far whose predecessors are all written (mutex held, released
        around the flush); False when there is nothing to flush yet."""
        batch: list[int] = []
        segments: dict[int, _Segment] = {}
        nxt = self._decided + 1
        while True:
            seg = self._written.get(nxt)
            if seg is None:
                if nxt in self._failed:
                    nxt += 1
                    continue
                break
            if seg.poisoned_from is not None and nxt > seg.poisoned_from:
                break  # decided as failed by _settle_decided, not flushed
            batch.append(nxt)
            segments[id(seg)] = seg
            nxt += 1
        if not batch:
            return False
        self._flushing = True
        error: OSError | None = None
        self._mutex.release()
        try:
            if self.before_flush is not None:
                self.before_flush()
            for seg in segments.values():
                os.fdatasync(seg.fd)
        except BaseException as exc:  # the batch fails; _flushing must not stay set
            error = exc if isinstance(exc, OSError) else OSError(errno.EIO, f"Journal flush failed: {exc!r}")
        finally:
            self._mutex.acquire()
        self._flushing = False
        self.flushes += 1
        for seq in batch:
            seg = self._written.pop(seq)
            if error is not None:
                # The kernel may have dropped the pages it could not write; nothing after the first
                # record of this batch in that segment may be acknowledged (a later flush that
                # succeeds would not bring them back).
                self._poison(seg, seq)
                self._failed[seq] = error
        self._decided = max(self._decided, batch[-1])
        self._settle_decided()
        self._flushed.notify_all()
        return True

    def done(self, seq: int) -> None:
        """The record's instance is placed (or was refused): the checkpoint may pass it."""
        with self._state:
            self._inflight.discard(seq)
            if not self._inflight:
                self._state.notify_all()

    def flush(self, timeout: float = 30.0) -> None:
        """Checkpoint everything placed so far, now (before deleting files, and on close)."""
        with self._state:
            want = self._target()
            deadline = time.monotonic() + timeout
            while self.checkpoint < want and not self._stop and time.monotonic() < deadline:
                self._force = True
                self._state.notify_all()
                self._state.wait(0.05)

    def close(self) -> None:
        self.flush()
        with self._state:
            self._stop = True
            self._state.notify_all()
        self._thread.join(timeout=30)
        try:
            self._checkpoint()  # whatever the thread left
        except OSError as exc:
            logger.error("Final journal checkpoint failed (the journal is replayed at the next start): %s", exc)
        for seg in self._segments:
            os.close(seg.fd)
        self._segments.clear()

    def _target(self) -> int:
        return (min(self._inflight) - 1) if self._inflight else self.seq

    def _run(self) -> None:
        while True:
            with self._state:
                while not self._stop:
                    target = self._target()
                    full = any(s.state == "full" and s.last_seq <= target for s in self._segments)
                    spare = any(s.state == "free" for s in self._segments)
                    idle = (target > self.checkpoint
                            and time.monotonic() - self._last_append >= self.idle_checkpoint_seconds)
                    create = not spare and len(self._segments) < _JOURNAL_SEGMENTS
                    checkpoint = self._force or full or idle
                    if checkpoint or create:
                        break
                    self._state.wait(min(self.idle_checkpoint_seconds / 2, 1.0))
                if self._stop:
                    return
            if create and not self._create_segment():
                time.sleep(1.0)  # e.g. the disk is full: try again later
            if checkpoint:
                try:
                    self._checkpoint()
                except OSError as exc:
                    logger.error("Journal checkpoint failed (retrying): %s", exc)
                    time.sleep(1.0)
                with self._state:
                    self._force = False
                    self._state.notify_all()

    def _checkpoint(self) -> None:
        with self._state:
            target = self._target()
        if target > self.checkpoint:
            # Every record up to ``target`` is placed: make those files, directory entries and index
            # rows durable, then record that the journal no longer needs them.
            syncfs(self.sync_path)
            _write_checkpoint(self.directory, target)
        with self._state:
            self.checkpoint = max(self.checkpoint, target)
            for seg in self._segments:
                if seg.state == "full" and seg.last_seq <= self.checkpoint:
                    seg.state = "free"
            self._state.notify_all()


@dataclass(frozen=True)
class PutResult:
    """Outcome of :meth:`Store.put`: ``duplicate`` when the SOP Instance UID was already held."""

    sop_instance_uid: str
    path: Path
    size: int
    duplicate: bool


@dataclass(frozen=True)
class _Pending:
    """A journaled (acknowledged) instance waiting for the placer thread."""

    seq: int
    info: InstanceInfo
    parts: Sequence[bytes | bytearray | memoryview]
    size: int
    when: float
    calling_ae_title: str
    kind: str
    final: Path


@dataclass(frozen=True)
class StagedInstance:
    """An instance written by :meth:`Store.stage` but not yet durable or visible (see :meth:`Store.commit_staged`)."""

    info: InstanceInfo
    tmp: Path
    size: int
    calling_ae_title: str
    kind: str
    received_at: float
    #: ``tmp`` is a spare file (:meth:`Store.start_spares`), not a ``.partial`` file in the series folder.
    spare: bool = False


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    path: Path
    size: int
    received_at: float
    calling_ae_title: str
    kind: str
    delivered_at: float | None


@dataclass(frozen=True)
class SeriesRecord:
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    calling_ae_title: str
    kind: str
    first_received: float
    last_received: float
    stable_at: float | None
    num_instances: int
    size: int


@dataclass(frozen=True)
class StudyRecord:
    study_instance_uid: str
    study_date: str
    study_description: str
    last_received: float
    num_series: int
    num_instances: int
    size: int


@dataclass
class RecoveryReport:
    """What :meth:`Store.recover` did."""

    partials_removed: int = 0
    #: Acknowledged instances written again from the journal (placed files lost or incomplete in a crash).
    replayed: int = 0
    reindexed: int = 0
    quarantined: int = 0
    missing_removed: int = 0
    skipped: bool = False


@dataclass
class RetentionReport:
    """What :meth:`Store.apply_retention` did."""

    deleted: int = 0
    freed_bytes: int = 0
    kept_undelivered: int = 0


#: Empty files a serving node keeps created in advance for pulls (:meth:`Store.start_spares`).
SPARE_FILES = 1024

#: The spare pool is refilled once no spare has been taken for this long (a transfer has ended).
SPARE_IDLE_SECONDS = 0.5

_SPARE_NAME = re.compile(r"(\d{1,18})\.spare")


class Store:
    """The node's durable instance store and its SQLite index.

    Layout under ``root``: ``instances/<study>/<series>/<sop>.dcm``, ``quarantine/`` (refused
    data with a ``.json`` reason), ``index.sqlite`` (WAL), ``journal/`` (:meth:`start_journal`),
    ``spare/`` (empty files for pulls, :meth:`start_spares`). The files are the source of truth:
    :meth:`recover` rebuilds missing index rows from them.

    Durability contract of :meth:`put`: when it returns, the instance survives ``kill -9`` and power
    loss and is indexed. Without the journal: the file is fdatasync'ed, renamed to its final name,
    its directory fsynced and the index row committed. With the journal (:meth:`start_journal`, the
    serving node): the complete file is appended to the journal and fdatasync'ed first, then written,
    renamed and indexed without further flushes; a later checkpoint makes those durable (syncfs) and
    :meth:`recover` replays every record the checkpoint does not cover. Only then may a C-STORE be
    acknowledged.

    Parameters
    ----------
    root
        Store directory (created when missing).
    durable
        fsync files and directories (True in production; tests of logic may turn it off).
    min_free_bytes
        :meth:`put` raises :class:`StoreFullError` when the file system has less free space.
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.quarantine_dir = self.root / "quarantine"
        self.db_path = self.root / "index.sqlite"
        self.durable = durable
        self.min_free_bytes = int(min_free_bytes)
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._owner_fd: int | None = None
        self._journal: _Journal | None = None
        self._replayed = 0
        # Asynchronous placement of journaled instances (see put and _place_loop).
        self._queue: deque[_Pending] = deque()
        self._pending: dict[str, _Pending] = {}
        self._queue_cv = threading.Condition()
        self._enqueued = 0
        self._placed = 0
        self._placer_stop = False
        self._placer_failing = False  # placement keeps failing (e.g. disk full): reads do not wait
        self._kicked = False
        self._placer_thread: threading.Thread | None = None
        self._journal_after: int | None = None  # highest journal sequence number, once replayed
        # Spare files for staging (see start_spares).
        self._spares: deque[Path] = deque()
        self._spare_cv = threading.Condition()
        self._spare_fd: int | None = None
        self._spare_target = 0
        self._spare_next = 0
        self._spare_taken_at = 0.0
        self._spare_stop = False
        self._spare_thread: threading.Thread | None = None
        # The index holds patient names and IDs (QIDO-RS matches on them): owner-only, whatever the umask.
        # SQLite gives its -wal and -shm files the main file's permissions.
        if not self.db_path.exists():
            os.close(os.open(self.db_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, INDEX_FILE_MODE))
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        # WAL; NORMAL sync is enough because the index is rebuilt from the fsynced files on recovery.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        _tighten_index_files(self.db_path)
        # A second connection for QIDO-RS searches (:meth:`select`): with WAL, readers and the writer do not wait
        # for each other.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        with self._lock:
            self._db.executescript(_SCHEMA)
        self._migrate()

    # --- life cycle ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        recover: bool = True,
        durable: bool = True,
        min_free_bytes: int = 0,
    ) -> Store:
        """Open (creating if needed) the store at ``root`` and, unless a node is serving it, recover it."""
        store = cls(root, durable=durable, min_free_bytes=min_free_bytes)
        if recover:
            store.recover()
        return store

    def acquire_owner_lock(self) -> bool:
        """Take the exclusive lock a serving node holds for its lifetime; False if another holds it."""
        if self._owner_fd is not None:
            return True
        fd = os.open(self.root / ".serve.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._owner_fd = fd
        return True

    def release_owner_lock(self) -> None:
        if self._owner_fd is not None:
            fcntl.flock(self._owner_fd, fcntl.LOCK_UN)
            os.close(self._owner_fd)
            self._owner_fd = None

    def close(self) -> None:
        self.stop_spares()
        self.stop_journal()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self._db.close()
        self.release_owner_lock()

    # --- index schema -------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring the index up to :data:`INDEX_VERSION` (see ``_V1_COLUMNS``); nothing is deleted, and a crash
        part way through resumes at the next open.

        1. One transaction adds the missing columns, the indexes and the triggers, and computes the counts the
           triggers maintain from then on.
        2. The kept attributes of each series (and of its study, if not yet filled) are read from the header of
           one of its instances, :data:`_MIGRATION_BATCH` series per transaction; rows already filled are
           skipped, so this step resumes where it stopped.
        3. ``user_version`` is set, and later opens skip all this.
        """
        db = self._db
        with self._lock:
            if int(db.execute("PRAGMA user_version").fetchone()[0]) >= INDEX_VERSION:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                for table, columns in _V1_COLUMNS.items():
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    for column in columns:
                        if column.split()[0] not in have:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                for statement in _statements(_V1_SQL + _V1_RECOUNT):
                    db.execute(statement)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            todo = int(db.execute("SELECT COUNT(*) FROM series WHERE attrs IS NULL").fetchone()[0])
        if todo:
            logger.info("Index migration to version %d: reading the attributes of %d series", INDEX_VERSION, todo)
        after = -1
        done = 0
        while True:
            with self._lock:
                batch = db.execute(
                    "SELECT rowid, series_instance_uid, study_instance_uid, (SELECT path FROM instances i "
                    "WHERE i.series_instance_uid = s.series_instance_uid ORDER BY instance_number, sop_instance_uid "
                    "LIMIT 1) AS path FROM series s WHERE attrs IS NULL AND rowid > ? ORDER BY rowid LIMIT ?",
                    (after, _MIGRATION_BATCH)).fetchall()
            if not batch:
                break
            after = batch[-1]["rowid"]
            read = [(r["series_instance_uid"], r["study_instance_uid"],
                     _read_attributes(r["path"], r["series_instance_uid"])) for r in batch]
            with self._lock:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for series_uid, study_uid, attrs in read:
                        _fill_attributes(db, series_uid, study_uid, attrs)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            done += len(batch)
            if done % (_MIGRATION_BATCH * 50) == 0:
                logger.info("Index migration: %d of %d series read", done, todo)
        with self._lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE studies SET attrs = '{}' WHERE attrs IS NULL")  # no instance to read
                db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if todo:
            logger.info("Index migration to version %d done", INDEX_VERSION)

    def select(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query on the index (QIDO-RS, :mod:`dicom_io.query`), once acknowledged instances
        are placed; on a connection of its own, so a long answer does not hold up indexing.

        Raises
        ------
        sqlite3.Error
            When the statement fails (a query that would write is refused: ``query_only``).
        """
        self.settle()
        with self._reader_lock:
            if self._reader is None:
                reader = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30.0)
                reader.row_factory = sqlite3.Row
                reader.execute("PRAGMA query_only=1")
                reader.execute("PRAGMA busy_timeout=30000")
                self._reader = reader
            return self._reader.execute(sql, tuple(args)).fetchall()

    # --- spare files ----------------------------------------------------------------------------

    @property
    def spare_dir(self) -> Path:
        return self.root / "spare"

    def start_spares(self, count: int = SPARE_FILES) -> bool:
        """Keep ``count`` empty files created in advance (``<root>/spare/``) for :meth:`stage` to write into.

        Creating a file is the part of writing a pulled instance that costs most when the file system has
        freed many inodes lately (ext4 without a journal scans past each one freed in the last minutes; see
        docs/dicomweb.md). A pull writes into spare files instead, and :meth:`commit_staged` renames them into
        place; the pool is refilled by a low-priority thread once no spare has been taken for
        :data:`SPARE_IDLE_SECONDS`. When the pool is empty, :meth:`stage` creates its files as before.

        One process uses a store's pool at a time (a lock on ``spare/.lock``); spares written but never
        committed (a crash) are emptied here. Returns False when another process holds the pool or
        ``count`` is 0 (files are then created as they arrive).
        """
        if count <= 0 or self._spare_fd is not None:
            return self._spare_fd is not None
        try:
            self.spare_dir.mkdir(exist_ok=True)
            if self.spare_dir.stat().st_dev != self.instances_dir.stat().st_dev:  # renames could not move them
                logger.warning("Spare files unavailable: %s and %s are on different file systems", self.spare_dir,
                               self.instances_dir)
                return False
            fd = os.open(self.spare_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            logger.warning("Spare files unavailable (%s); files are created as instances arrive", exc)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            logger.info("Spare files of store %s are in use by another process", self.root)
            return False
        ready, top = self._reclaim_spares()
        with self._spare_cv:
            self._spare_fd = fd
            self._spares.extend(ready)
            self._spare_next = top + 1
            self._spare_target = count
            self._spare_stop = False
        self._spare_thread = threading.Thread(target=self._spare_loop, name="store-spares", daemon=True)
        self._spare_thread.start()
        return True

    def stop_spares(self) -> None:
        """Stop refilling and release the pool (its files stay for the next owner)."""
        with self._spare_cv:
            self._spare_stop = True
            self._spare_cv.notify_all()
            thread, self._spare_thread = self._spare_thread, None
        if thread is not None:
            thread.join()
        with self._spare_cv:
            self._spares.clear()
            fd, self._spare_fd = self._spare_fd, None
        if fd is not None:
            os.close(fd)  # releases the lock

    def spares_ready(self) -> int:
        """How many spare files are ready now."""
        with self._spare_cv:
            return len(self._spares)

    def wait_spares(self, timeout: float = 60.0) -> bool:
        """Wait until the pool is full (after :meth:`start_spares`); False on timeout or without a pool."""
        deadline = time.monotonic() + timeout
        with self._spare_cv:
            while self._spare_fd is not None and len(self._spares) < self._spare_target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._spare_cv.wait(left)
            return self._spare_fd is not None

    def _reclaim_spares(self) -> tuple[list[Path], int]:
        """The spare files on disk (emptied when a crash left data in them) and the highest number in use."""
        ready: list[Path] = []
        top = 0
        for entry in os.scandir(self.spare_dir):
            m = _SPARE_NAME.fullmatch(entry.name)
            if not m:
                continue
            top = max(top, int(m.group(1)))
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
                if not statmod.S_ISREG(st.st_mode) or st.st_nlink > 1:
                    # Not a plain file, or also linked as an instance (a rename cut short): not ours to empty.
                    os.unlink(path)
                    continue
                if st.st_size:
                    os.truncate(path, 0)
            except OSError as exc:
                logger.warning("Spare file %s unusable (%s); skipped", path.name, exc)
                continue
            ready.append(path)
        ready.sort()
        return ready, top

    def _take_spare(self) -> Path | None:
        with self._spare_cv:
            if not self._spares:
                return None
            self._spare_taken_at = time.monotonic()
            if len(self._spares) >= self._spare_target:
                self._spare_cv.notify_all()  # the refiller waits untimed while the pool is full
            return self._spares.popleft()

    def _give_back_spare(self, path: Path) -> None:
        """Return a staged spare that will not be committed to the pool, emptied (or drop it)."""
        try:
            os.truncate(path, 0)
        except OSError:
            _unlink_quietly(path)
            return
        with self._spare_cv:
            if self._spare_fd is None:
                return  # the pool is closed; the file waits for the next owner
            self._spares.append(path)

    def _spare_loop(self) -> None:
        try:  # Linux: a thread's own nice value; creating files must not slow a transfer in progress
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (OSError, AttributeError):
            pass
        while True:
            with self._spare_cv:
                while True:
                    if self._spare_stop:
                        return
                    if len(self._spares) >= self._spare_target:
                        self._spare_cv.wait()
                        continue
                    idle = time.monotonic() - self._spare_taken_at
                    if idle < SPARE_IDLE_SECONDS:
                        self._spare_cv.wait(SPARE_IDLE_SECONDS - idle)
                        continue
                    break
                n = self._spare_next
                self._spare_next += 1
            path = self.spare_dir / f"{n:08d}.spare"
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            except FileExistsError:
                continue
            except OSError as exc:  # e.g. out of inodes: try again later
                logger.warning("Cannot create spare file %s (%s); retrying in a minute", path.name, exc)
                with self._spare_cv:
                    self._spare_cv.wait(60.0)
                continue
            with self._spare_cv:
                if self._spare_stop:
                    return  # the file stays for the next owner
                self._spares.append(path)
                self._spare_cv.notify_all()

    # --- acknowledgement journal --------------------------------------------------------------

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    def start_journal(self, total_bytes: int, *, idle_checkpoint_seconds: float = 1.0) -> bool:
        """Acknowledge through the journal from now on (the serving node does this after :meth:`recover`).

        Only the owner of the store (see :meth:`acquire_owner_lock`) may; records left by a crash are
        replayed first. ``total_bytes`` is the ring's size on disk (pre-allocated); after
        ``idle_checkpoint_seconds`` without a new instance everything placed is checkpointed. Returns
        False (and keeps flushing every file on its own) when the journal cannot be set up.
        """
        if self._journal is not None or not self.durable or total_bytes <= 0:
            return self._journal is not None
        if self._owner_fd is None:
            raise RuntimeError("Only the process that owns the store (serve lock) may start its journal.")
        try:
            after = self._journal_after if self._journal_after is not None else self._replay_journal()
            self._journal = _Journal(self.journal_dir, total_bytes, self.root, after, idle_checkpoint_seconds)
        except OSError as exc:
            logger.warning("Store journal unavailable (%s); every instance is flushed on its own", exc)
            return False
        self._placer_stop = False
        self._journal.before_flush = self._kick_placer
        self._placer_thread = threading.Thread(target=self._place_loop, name="store-placer", daemon=True)
        self._placer_thread.start()
        return True

    def stop_journal(self) -> None:
        """Checkpoint and close the journal (on shutdown); nothing is left to replay afterwards."""
        if self._placer_thread is not None:
            with self._queue_cv:
                self._placer_stop = True
                self._queue_cv.notify_all()
            self._placer_thread.join(timeout=60)
            self._placer_thread = None
        journal, self._journal = self._journal, None
        if journal is not None:
            journal.close()

    def _replay_journal(self) -> int:
        """Place every journal record newer than the checkpoint; returns the highest sequence number.

        Each record is an acknowledged (or about to be acknowledged) instance: it is written again
        unless the store already holds exactly its bytes, indexed, made durable (syncfs), and only
        then is the checkpoint advanced past it.
        """
        if not self.journal_dir.is_dir():
            self._journal_after = 0
            return 0
        checkpoint, highest, records = read_journal(self.journal_dir)
        replayed = 0
        blocked = False
        for rec in records:
            try:
                ts, offset = read_file_meta(rec.data)
                info = InstanceInfo.from_raw(check_encoding(memoryview(rec.data)[offset:], ts), ts)
            except InstanceValidationError as exc:  # validated before it was journaled: should not happen
                logger.error("Journal record %d cannot be read back (%s); kept in quarantine", rec.seq, exc)
                self.quarantine(rec.data, f"journal record {rec.seq} unreadable at replay: {exc}")
                continue
            existing = self._row(info.sop_instance_uid)
            if existing is not None and _same_bytes(existing.path, rec.data):
                continue
            try:
                series_dir = self._ensure_dir(info.study_instance_uid, info.series_instance_uid)
                final = series_dir / f"{info.sop_instance_uid}.dcm"
                if not _same_bytes(final, rec.data):  # lost, empty or cut short by the crash: write it again
                    tmp, _size = self._write_tmp(series_dir, info, [rec.data], flush=False)
                    os.rename(tmp, final)
            except OSError as exc:
                # E.g. the disk is full: keep the journal as it is (not checkpointed, not reused) and
                # replay again at the next start.
                logger.error("Journal record %d (instance %s) cannot be placed: %s; the journal is kept for the "
                             "next start", rec.seq, info.sop_instance_uid, exc)
                blocked = True
                continue
            with self._lock:
                self._index(info, final, len(rec.data), float(rec.meta.get("t") or time.time()),
                            str(rec.meta.get("ae") or ""), str(rec.meta.get("kind") or KIND_RECEIVED))
            replayed += 1
        self._replayed = replayed
        if blocked:
            self._journal_after = None
            raise OSError(errno.ENOSPC, "The journal could not be replayed completely", str(self.journal_dir))
        if highest > checkpoint:
            syncfs(self.root)
            _write_checkpoint(self.journal_dir, highest)
        if replayed:
            logger.warning("Store recovery: %d acknowledged instance(s) replayed from the journal", replayed)
        self._journal_after = highest
        self._replayed = replayed
        return highest

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ------------------------------------------------------------------------------

    def put(
        self,
        chunks: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview],
        info: InstanceInfo,
        *,
        calling_ae_title: str = "",
        kind: str = KIND_RECEIVED,
    ) -> PutResult:
        """Store one encoded DICOM file durably and index it; idempotent per SOP Instance UID.

        Parameters
        ----------
        chunks
            The complete file (preamble, file meta, data set) as bytes or as a sequence of byte
            chunks written in order.
        info
            Index attributes, e.g. from :meth:`InstanceInfo.from_dataset`.
        calling_ae_title
            Who sent it (recorded in the index).
        kind
            ``received`` or ``result``.

        Returns
        -------
        PutResult
            ``duplicate=True`` (and nothing written) when the SOP Instance UID is already stored.

        Raises
        ------
        InstanceValidationError
            When a UID in ``info`` is not a valid UID.
        StoreFullError
            When free space is below ``min_free_bytes``.
        OSError
            When writing fails (the partial file is removed).
        """
        _check_uids(info)
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        existing = self._row(info.sop_instance_uid)
        if existing is not None and existing.path.exists():
            return PutResult(info.sop_instance_uid, existing.path, existing.size, duplicate=True)
        now = time.time()
        journal = self._journal
        if journal is None:
            self.check_space()
        else:
            with self._queue_cv:
                pending = self._pending.get(info.sop_instance_uid)
            if pending is not None:
                return PutResult(info.sop_instance_uid, pending.final, pending.size, duplicate=True)
            # Acknowledged before its file exists: make sure the file fits (a write that fails for
            # space after the acknowledgement would have to wait in the journal for space). One
            # statvfs covers the reserve too.
            size = sum(memoryview(p).nbytes for p in parts)
            self.check_space(needed=size + _SPACE_MARGIN)
        series_dir = self._ensure_dir(info.study_instance_uid, info.series_instance_uid)
        if journal is not None:
            meta = json.dumps({"ae": calling_ae_title, "kind": kind, "t": now}).encode()
            seq = journal.append(meta, parts)
            if seq is not None:
                # Durable now (the journal record). The placer thread writes, renames and indexes the
                # file; reads through this store wait for it (:meth:`settle`), recovery replays it.
                item = _Pending(seq, info, parts, size, now, calling_ae_title, kind,
                                series_dir / f"{info.sop_instance_uid}.dcm")
                with self._queue_cv:
                    if not self._queue:
                        self._queue_cv.notify_all()  # wake an idle placer (it then waits for a kick)
                    self._queue.append(item)
                    self._pending[info.sop_instance_uid] = item
                    self._enqueued += 1
                return PutResult(info.sop_instance_uid, item.final, size, duplicate=False)
        flush = self.durable
        tmp, size = self._write_tmp(series_dir, info, parts, flush=flush)
        return self._place(tmp, series_dir, info, size, now, calling_ae_title, kind, flush_dir=flush)

    # --- asynchronous placement (journal) -----------------------------------------------------

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until every instance acknowledged so far is placed and indexed (reads call this)."""
        thread = self._placer_thread
        if thread is None or self._lock._is_owned():  # type: ignore[attr-defined]  # the placer needs the lock
            return
        with self._queue_cv:
            target = self._enqueued
            if self._placed < target:
                self._kicked = True
                self._queue_cv.notify_all()
            deadline = time.monotonic() + timeout
            while (self._placed < target and thread.is_alive() and not self._placer_failing
                   and time.monotonic() < deadline):
                self._queue_cv.wait(0.05)

    def _kick_placer(self) -> None:
        with self._queue_cv:
            if self._queue:
                self._kicked = True
                self._queue_cv.notify_all()

    def _place_loop(self) -> None:
        journal = self._journal
        assert journal is not None
        while True:
            with self._queue_cv:
                while not self._queue and not self._placer_stop:
                    self._queue_cv.wait()
                if not self._queue:
                    return
                # Work while the next instance's journal flush waits on the disk (the kick comes just
                # before it), not while the acknowledgement is on its way out; or after a short pause.
                if not self._kicked and not self._placer_stop:
                    self._queue_cv.wait(PLACER_PAUSE)
                self._kicked = False
                batch = [self._queue[i] for i in range(min(64, len(self._queue)))]
            rows: list[tuple[InstanceInfo, Path, int, float, str, str]] = []
            done: list[_Pending] = []
            failure: OSError | None = None
            try:
                held = self._rows([item.info.sop_instance_uid for item in batch])  # one query per batch
            except sqlite3.Error:
                held = {}
            dirs: dict[tuple[str, str], Path] = {}
            for item in batch:
                try:
                    self._place_pending(item, rows, held, dirs)
                except OSError as exc:
                    failure = exc
                    break
                done.append(item)
            attrs = self._new_series_attributes(rows)  # file reads, outside the lock
            try:
                with self._lock:
                    self._index_many(rows, attrs=attrs)
            except sqlite3.Error as exc:
                failure, done = OSError(errno.EIO, f"index: {exc}"), []
            with self._queue_cv:
                for item in done:
                    self._queue.popleft()
                    if self._pending.get(item.info.sop_instance_uid) is item:
                        del self._pending[item.info.sop_instance_uid]
                self._placed += len(done)
                self._placer_failing = failure is not None
                self._queue_cv.notify_all()
            for item in done:
                journal.done(item.seq)
            if failure is not None:
                # Acknowledged already and safe in the journal (not checkpointed while it waits here):
                # retry, and on shutdown leave it for the replay at the next start.
                logger.error("Placing acknowledged instance %s failed (%s); it stays in the journal and is retried",
                             batch[len(done)].info.sop_instance_uid, failure)
                with self._queue_cv:
                    if self._placer_stop:
                        return
                    self._queue_cv.wait(1.0)

    def _place_pending(self, item: _Pending, rows: list[tuple[InstanceInfo, Path, int, float, str, str]],
                       held: dict[str, InstanceRecord], dirs: dict[tuple[str, str], Path]) -> bool:
        """Write and rename one journaled instance (no flush); adds its index row. False for a duplicate.

        ``held`` are the index rows of the batch's instances read before it (a duplicate sent twice at once
        is caught here); ``dirs`` the series directories this batch has made sure of.
        """
        info = item.info
        existing = held.get(info.sop_instance_uid)
        if existing is not None and existing.path.exists():
            return False
        key = (info.study_instance_uid, info.series_instance_uid)
        series_dir = dirs.get(key)
        if series_dir is None:
            series_dir = dirs[key] = self._ensure_dir(*key)
        tmp, size = self._write_tmp(series_dir, info, item.parts, flush=False)
        try:
            os.rename(tmp, item.final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        rows.append((info, item.final, size, item.when, item.calling_ae_title, item.kind))
        return True

    def check_space(self, needed: int = 0) -> None:
        """Raise :class:`StoreFullError` when the file system has less free space than the reserve (+ ``needed``)."""
        if not self.min_free_bytes and not needed:
            return
        st = os.statvfs(self.instances_dir)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes + needed:
            raise StoreFullError(
                errno.ENOSPC,
                f"Store file system is below its free-space reserve ({free / 1e6:.1f} MB free, "
                f"{self.min_free_bytes / 1e6:.1f} MB reserved)", str(self.instances_dir))

    def _write_tmp(self, series_dir: Path, info: InstanceInfo, parts: Sequence[bytes | bytearray | memoryview], *,
                   flush: bool, writeback: bool = False, spare: Path | None = None) -> tuple[Path, int]:
        """Write ``.<sop>.<random>.partial`` in ``series_dir`` (or into the empty file ``spare``); fdatasync'ed
        when ``flush``. Removed on error."""
        tmp = spare or series_dir / f".{info.sop_instance_uid}.{secrets.token_hex(4)}.partial"
        size = 0
        try:
            if spare is not None:
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view:
                        written = os.write(fd, view)
                        size += written
                        view = view[written:]
                if flush:
                    os.fdatasync(fd)
                elif writeback:
                    _start_writeback(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            _unlink_quietly(tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                    and not isinstance(exc, StoreFullError):
                raise StoreFullError(exc.errno, f"Store file system is full: {exc.strerror}", str(tmp)) from exc
            raise
        return tmp, size

    def _place(self, tmp: Path, series_dir: Path, info: InstanceInfo, size: int, when: float, calling_ae_title: str,
               kind: str, *, flush_dir: bool) -> PutResult:
        """Rename a written temp file to ``<sop>.dcm`` and index it (or drop it for a racing duplicate)."""
        final = series_dir / f"{info.sop_instance_uid}.dcm"
        with self._lock:
            existing = self._row(info.sop_instance_uid)
            if existing is not None and existing.path.exists():
                _unlink_quietly(tmp)
                return PutResult(info.sop_instance_uid, existing.path, existing.size, duplicate=True)
            try:
                os.rename(tmp, final)
                if flush_dir:
                    _fsync_dir(series_dir)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            self._index(info, final, size, when, calling_ae_title, kind)
        return PutResult(info.sop_instance_uid, final, size, duplicate=False)

    # --- batches (pulls) ----------------------------------------------------------------------

    def stage(
        self,
        chunks: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview],
        info: InstanceInfo,
        *,
        calling_ae_title: str = "",
        kind: str = KIND_RECEIVED,
        check_duplicate: bool = True,
    ) -> StagedInstance | PutResult:
        """Write an instance as a temp file; :meth:`commit_staged` makes a batch durable and visible.

        Nothing staged is visible or acknowledged before the commit; a crash leaves only ``*.partial``
        files, which recovery deletes. The file's write-back is started now, so the disk works while the
        rest of the batch arrives; the commit flushes it. Returns a :class:`PutResult`
        (``duplicate=True``) for an instance the store already holds, unless ``check_duplicate`` is
        False (the caller knows the series' instances; :meth:`commit_staged` checks the index again).

        Raises
        ------
        InstanceValidationError, StoreFullError, OSError
            As :meth:`put` (nothing is left behind).
        """
        _check_uids(info)
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        if check_duplicate:
            existing = self._row(info.sop_instance_uid)
            if existing is not None and existing.path.exists():
                return PutResult(info.sop_instance_uid, existing.path, existing.size, duplicate=True)
        self.check_space()
        series_dir = self._ensure_dir(info.study_instance_uid, info.series_instance_uid)
        spare = self._take_spare()
        tmp, size = self._write_tmp(series_dir, info, parts, flush=False, writeback=self.durable, spare=spare)
        return StagedInstance(info, tmp, size, calling_ae_title, kind, time.time(), spare=spare is not None)

    def commit_staged(self, staged: Sequence[StagedInstance]) -> list[PutResult]:
        """Make staged instances durable and visible together: one flush of the batch (:func:`_flush_batch`),
        renames, directory fsyncs, one index transaction. Only after this returns may they be reported stored.

        Raises
        ------
        OSError
            When flushing fails; the staged files are removed (nothing was reported stored).
        """
        if not staged:
            return []
        try:
            if self.durable:
                _flush_batch([st.tmp for st in staged], sum(st.size for st in staged), self.instances_dir)
        except BaseException:
            self.discard_staged(staged)
            raise
        results: list[PutResult] = []
        rows: list[tuple[InstanceInfo, Path, int, float, str, str]] = []
        dirs: set[Path] = set()
        # The kept attributes of new series, read from the staged files before taking the lock.
        attrs = self._new_series_attributes([(st.info, st.tmp) for st in staged])
        with self._lock:
            try:
                held = self._rows([st.info.sop_instance_uid for st in staged])
                for st in staged:
                    uid = st.info.sop_instance_uid
                    existing = held.get(uid)
                    if existing is not None and existing.path.exists():
                        self._drop_staged(st)
                        results.append(PutResult(uid, existing.path, existing.size, duplicate=True))
                        continue
                    final = self.instances_dir / st.info.study_instance_uid / st.info.series_instance_uid / f"{uid}.dcm"
                    os.rename(st.tmp, final)
                    dirs.add(final.parent)
                    if st.spare:
                        dirs.add(st.tmp.parent)  # its name is gone from spare/ too
                    rows.append((st.info, final, st.size, st.received_at, st.calling_ae_title, st.kind))
                    results.append(PutResult(uid, final, st.size, duplicate=False))
                if self.durable:
                    for d in dirs:
                        _fsync_dir(d)
            except BaseException:
                self.discard_staged(staged)
                for info, final, *_ in rows:
                    _unlink_quietly(final)
                raise
            self._index_many(rows, attrs=attrs)
        return results

    def discard_staged(self, staged: Sequence[StagedInstance]) -> None:
        """Remove staged temp files (a failed or abandoned batch); spare files go back to the pool, emptied."""
        for st in staged:
            self._drop_staged(st)

    def _drop_staged(self, st: StagedInstance) -> None:
        if st.spare:
            self._give_back_spare(st.tmp)
        else:
            _unlink_quietly(st.tmp)

    def put_file(self, path: str | os.PathLike[str], *, kind: str = KIND_RESULT, calling_ae_title: str = "") -> PutResult:
        """Copy a DICOM file into the store (e.g. a SEG the node produced), durably and idempotently.

        Raises
        ------
        InstanceValidationError
            When the file cannot be read or lacks valid UIDs.
        """
        info = InstanceInfo.from_file(path)
        data = Path(path).read_bytes()
        return self.put(data, info, calling_ae_title=calling_ae_title, kind=kind)

    def quarantine(
        self,
        chunks: bytes | Sequence[bytes | bytearray | memoryview],
        reason: str,
        *,
        sop_instance_uid: str = "",
        calling_ae_title: str = "",
    ) -> Path:
        """Keep refused data for inspection: ``quarantine/<time>-<token>.dcm`` plus a ``.json`` reason."""
        stem = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
        path = self.quarantine_dir / f"{stem}.dcm"
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        with open(path, "wb") as fh:
            for part in parts:
                fh.write(part)
        meta = {
            "reason": reason,
            "sop_instance_uid": sop_instance_uid if is_valid_uid(sop_instance_uid) else "",
            "calling_ae_title": calling_ae_title,
            "time": time.time(),
        }
        (self.quarantine_dir / f"{stem}.json").write_text(json.dumps(meta, indent=1))
        return path

    def quarantined(self) -> list[dict[str, Any]]:
        """The quarantine's entries: each reason sidecar plus its ``path``."""
        out = []
        for meta in sorted(self.quarantine_dir.glob("*.json")):
            try:
                entry = json.loads(meta.read_text())
            except (OSError, ValueError):
                continue
            entry["path"] = str(meta.with_suffix(".dcm"))
            out.append(entry)
        return out

    # --- delivery bookkeeping -----------------------------------------------------------------

    def hold(self, sop_instance_uid: str, holder: str) -> None:
        """Protect an instance from retention until :meth:`release` (e.g. while queued for delivery)."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO holds VALUES (?, ?)", (sop_instance_uid, holder))

    def release(self, sop_instance_uid: str, holder: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM holds WHERE sop_instance_uid=? AND holder=?", (sop_instance_uid, holder))

    def mark_delivered(self, sop_instance_uid: str, when: float | None = None) -> None:
        """Record that a result has been delivered (retention may then delete it)."""
        with self._lock:
            self._db.execute(
                "UPDATE instances SET delivered_at=? WHERE sop_instance_uid=?",
                (time.time() if when is None else when, sop_instance_uid),
            )

    # --- reading ------------------------------------------------------------------------------

    def _row(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The index row, without waiting for acknowledged instances still being placed."""
        with self._lock:
            row = self._db.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
        return _instance(row) if row else None

    def _rows(self, sop_instance_uids: Sequence[str]) -> dict[str, InstanceRecord]:
        """The index rows of these instances (those that have one), by SOP Instance UID; one query per 500."""
        found: dict[str, InstanceRecord] = {}
        with self._lock:
            for i in range(0, len(sop_instance_uids), 500):
                chunk = sop_instance_uids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._db.execute(f"SELECT * FROM instances WHERE sop_instance_uid IN ({marks})", chunk):
                    found[row["sop_instance_uid"]] = _instance(row)
        return found

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        self.settle()
        with self._lock:
            row = self._db.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
        return _instance(row) if row else None

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        """The series' instances, by Instance Number then SOP Instance UID."""
        self.settle()
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE series_instance_uid=? ORDER BY instance_number, sop_instance_uid",
                (series_instance_uid,),
            ).fetchall()
        return [_instance(r) for r in rows]

    def series_paths(self, series_instance_uid: str) -> list[Path]:
        """File paths of a stored series (empty when the series is unknown)."""
        return [r.path for r in self.instances(series_instance_uid)]

    def series(self, study_instance_uid: str | None = None) -> list[SeriesRecord]:
        """Series in the index (of one study when given), newest first."""
        self.settle()
        sql = (
            "SELECT s.*, COUNT(i.sop_instance_uid) AS n, COALESCE(SUM(i.size), 0) AS bytes FROM series s "
            "LEFT JOIN instances i ON i.series_instance_uid = s.series_instance_uid "
        )
        args: tuple[Any, ...] = ()
        if study_instance_uid is not None:
            sql += "WHERE s.study_instance_uid=? "
            args = (study_instance_uid,)
        sql += "GROUP BY s.series_instance_uid ORDER BY s.last_received DESC"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_series(r) for r in rows]

    def get_series(self, series_instance_uid: str) -> SeriesRecord | None:
        self.settle()
        with self._lock:
            row = self._db.execute(
                "SELECT s.*, COUNT(i.sop_instance_uid) AS n, COALESCE(SUM(i.size), 0) AS bytes FROM series s "
                "LEFT JOIN instances i ON i.series_instance_uid = s.series_instance_uid "
                "WHERE s.series_instance_uid=? GROUP BY s.series_instance_uid",
                (series_instance_uid,),
            ).fetchone()
        return _series(row) if row else None

    def studies(self) -> list[StudyRecord]:
        """Studies in the index, newest first."""
        self.settle()
        with self._lock:
            rows = self._db.execute(
                "SELECT st.*, COUNT(DISTINCT i.series_instance_uid) AS ns, COUNT(i.sop_instance_uid) AS n, "
                "COALESCE(SUM(i.size), 0) AS bytes FROM studies st "
                "LEFT JOIN instances i ON i.study_instance_uid = st.study_instance_uid "
                "GROUP BY st.study_instance_uid ORDER BY st.last_received DESC"
            ).fetchall()
        return [
            StudyRecord(r["study_instance_uid"], r["study_date"], r["study_description"], r["last_received"],
                        r["ns"], r["n"], r["bytes"])
            for r in rows
        ]

    def count(self) -> int:
        self.settle()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def total_bytes(self) -> int:
        self.settle()
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0])

    # --- series completion --------------------------------------------------------------------

    def unstable_series(self, quiet_seconds: float, now: float | None = None) -> list[SeriesRecord]:
        """Received series with no new instance for ``quiet_seconds`` that are not yet marked stable."""
        now = time.time() if now is None else now
        with self._lock:
            uids = [r[0] for r in self._db.execute(
                "SELECT series_instance_uid FROM series WHERE stable_at IS NULL AND kind=? AND last_received<=? "
                "ORDER BY last_received",
                (KIND_RECEIVED, now - quiet_seconds),
            ).fetchall()]
        out = [self.get_series(uid) for uid in uids]
        return [s for s in out if s is not None]

    def mark_stable(self, series_instance_uid: str, last_received: float, when: float | None = None) -> bool:
        """Mark a series stable unless an instance arrived after ``last_received``; True when marked."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE series SET stable_at=? WHERE series_instance_uid=? AND last_received=? AND stable_at IS NULL",
                (time.time() if when is None else when, series_instance_uid, last_received),
            )
        return cur.rowcount == 1

    # --- recovery and retention ---------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the store consistent after a crash.

        Replays the acknowledgement journal (records newer than its checkpoint), deletes ``*.partial``
        files (data never acknowledged), indexes complete files that have no index row, quarantines unreadable unindexed files and drops index rows whose file is gone.
        Skipped (``report.skipped``) while another process is serving this store.
        """
        report = RecoveryReport()
        own = self._owner_fd is not None
        if not own and not self.acquire_owner_lock():
            logger.info("Store %s is in use by a running node; recovery skipped", self.root)
            report.skipped = True
            return report
        try:
            if self._journal is None:
                try:
                    self._replay_journal()
                except OSError as exc:
                    logger.error("Store recovery: %s; instances are flushed one by one until it is", exc)
                report.replayed = self._replayed
            with self._lock:
                indexed = {r[0]: r[1] for r in self._db.execute("SELECT sop_instance_uid, path FROM instances")}
                known_paths = set(indexed.values())
            for dirpath, _dirnames, filenames in os.walk(self.instances_dir):
                for name in filenames:
                    path = Path(dirpath) / name
                    if name.endswith(".partial"):
                        _unlink_quietly(path)
                        report.partials_removed += 1
                        continue
                    if not name.endswith(".dcm") or str(path) in known_paths:
                        continue
                    try:
                        info = InstanceInfo.from_file(path)
                        _check_file(path)
                    except InstanceValidationError as exc:
                        self.quarantine(path.read_bytes(), f"unindexed file unreadable at recovery: {exc}")
                        _unlink_quietly(path)
                        report.quarantined += 1
                        continue
                    if info.sop_instance_uid in indexed:
                        continue  # a second copy of an indexed instance; leave it alone
                    size = path.stat().st_size
                    with self._lock:
                        self._index(info, path, size, path.stat().st_mtime, "", KIND_RECEIVED)
                    report.reindexed += 1
            with self._lock:
                missing = [uid for uid, p in indexed.items() if not os.path.exists(p)]
                for uid in missing:
                    self._db.execute("DELETE FROM instances WHERE sop_instance_uid=?", (uid,))
                report.missing_removed = len(missing)
                self._drop_empty_series()
        finally:
            if not own:
                self.release_owner_lock()
        if report.partials_removed or report.reindexed or report.quarantined or report.missing_removed:
            logger.warning(
                "Store recovery: %d partial file(s) removed, %d file(s) re-indexed, %d quarantined, "
                "%d index row(s) without file removed",
                report.partials_removed, report.reindexed, report.quarantined, report.missing_removed,
            )
        return report

    def apply_retention(
        self, *, max_age_seconds: float | None = None, max_bytes: int | None = None, now: float | None = None
    ) -> RetentionReport:
        """Delete old instances: older than ``max_age_seconds``, then oldest first until ≤ ``max_bytes``.

        Never deletes an instance that is held (queued for delivery) or a result that has not
        been delivered.
        """
        now = time.time() if now is None else now
        report = RetentionReport()
        if self._journal is not None:
            # A deleted instance must not come back from the journal after a crash.
            self.settle()
            self._journal.flush()
        protected = (
            "NOT EXISTS (SELECT 1 FROM holds h WHERE h.sop_instance_uid = i.sop_instance_uid) "
            "AND NOT (i.kind = 'result' AND i.delivered_at IS NULL)"
        )
        with self._lock:
            victims: list[sqlite3.Row] = []
            if max_age_seconds:
                victims = self._db.execute(
                    f"SELECT sop_instance_uid, path, size FROM instances i WHERE received_at < ? AND {protected}",
                    (now - max_age_seconds,),
                ).fetchall()
            if max_bytes:
                total = self.total_bytes() - sum(r["size"] for r in victims)
                chosen = {r["sop_instance_uid"] for r in victims}
                if total > max_bytes:
                    for r in self._db.execute(
                        f"SELECT sop_instance_uid, path, size FROM instances i WHERE {protected} ORDER BY received_at"
                    ):
                        if total <= max_bytes:
                            break
                        if r["sop_instance_uid"] in chosen:
                            continue
                        victims.append(r)
                        total -= r["size"]
            report.kept_undelivered = int(self._db.execute(
                f"SELECT COUNT(*) FROM instances i WHERE NOT ({protected})"
            ).fetchone()[0])
            for r in victims:
                _unlink_quietly(Path(r["path"]))
                self._db.execute("DELETE FROM instances WHERE sop_instance_uid=?", (r["sop_instance_uid"],))
                report.deleted += 1
                report.freed_bytes += int(r["size"])
            if victims:
                self._drop_empty_series()
        if report.deleted:
            logger.info("Retention deleted %d instance(s), %d bytes", report.deleted, report.freed_bytes)
        return report

    # --- internals ----------------------------------------------------------------------------

    def _ensure_dir(self, study_uid: str, series_uid: str) -> Path:
        series_dir = self.instances_dir / study_uid / series_uid
        if series_dir.is_dir():
            return series_dir
        study_dir = series_dir.parent
        new_study = not study_dir.exists()
        series_dir.mkdir(parents=True, exist_ok=True)
        if self.durable:
            _fsync_dir(study_dir)
            if new_study:
                _fsync_dir(self.instances_dir)
        return series_dir

    def _index(
        self, info: InstanceInfo, path: Path, size: int, when: float, calling_ae_title: str, kind: str,
        stable: bool = False,
    ) -> None:
        self._index_many([(info, path, size, when, calling_ae_title, kind)], stable=stable)

    def _index_many(self, rows: Sequence[tuple[InstanceInfo, Path, int, float, str, str]], stable: bool = False,
                    attrs: dict[str, IndexedAttributes] | None = None) -> None:
        """Insert index rows (study, series, instance: the triggers count in that order) in one transaction.

        A series the index does not know yet gets its kept attributes (and its study's, for a new study)
        from the header of its first instance (:class:`dicom_io.query.IndexedAttributes`): ``attrs`` when the
        caller read them (outside the lock), else read here.
        """
        if not rows:
            return
        db = self._db
        if attrs is None:
            attrs = self._new_series_attributes(rows)
        db.execute("BEGIN IMMEDIATE")
        try:
            study_cols = ", ".join(STUDY_COLUMNS)
            db.executemany(
                f"INSERT INTO studies (study_instance_uid, study_date, study_description, last_received, attrs, "
                f"{study_cols}) VALUES (?,?,?,?,?{',?' * len(STUDY_COLUMNS)}) ON CONFLICT(study_instance_uid) DO "
                "UPDATE SET last_received=MAX(last_received, excluded.last_received), "
                + ", ".join(f"{c}=CASE WHEN attrs IS NULL AND excluded.attrs IS NOT NULL THEN excluded.{c} ELSE {c} END"
                            for c in STUDY_COLUMNS)
                + ", attrs=COALESCE(attrs, excluded.attrs)",
                [(info.study_instance_uid, info.study_date, info.study_description, when,
                  *_study_values(attrs.get(info.series_instance_uid)))
                 for info, _path, _size, when, _ae, _kind in rows],
            )
            series_cols = ", ".join(SERIES_COLUMNS)
            db.executemany(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number, "
                f"series_description, calling_ae_title, kind, first_received, last_received, stable_at, attrs, "
                f"{series_cols}) VALUES (?,?,?,?,?,?,?,?,?,?,?{',?' * len(SERIES_COLUMNS)}) "
                "ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "last_received=MAX(last_received, excluded.last_received), stable_at=excluded.stable_at, "
                + ", ".join(f"{c}=CASE WHEN attrs IS NULL AND excluded.attrs IS NOT NULL THEN excluded.{c} ELSE {c} END"
                            for c in SERIES_COLUMNS)
                + ", attrs=COALESCE(attrs, excluded.attrs)",
                [(info.series_instance_uid, info.study_instance_uid, info.modality, info.series_number,
                  info.series_description, calling_ae_title, kind, when, when,
                  when if (stable or kind != KIND_RECEIVED) else None,
                  *_series_values(attrs.get(info.series_instance_uid)))
                 for info, _path, _size, when, calling_ae_title, kind in rows],
            )
            # Row by row in the order given (the last row of a series sets its stable_at). An upsert, not
            # INSERT OR REPLACE: a replaced row would be counted again by the insert trigger.
            db.executemany(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_instance_uid, "
                "study_instance_uid, transfer_syntax_uid, instance_number, path, size, received_at, "
                "calling_ae_title, kind, pixel_rows, pixel_columns, bits_allocated, number_of_frames, "
                "header_indexed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1) ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                "sop_class_uid=excluded.sop_class_uid, series_instance_uid=excluded.series_instance_uid, "
                "study_instance_uid=excluded.study_instance_uid, transfer_syntax_uid=excluded.transfer_syntax_uid, "
                "instance_number=excluded.instance_number, path=excluded.path, size=excluded.size, "
                "received_at=excluded.received_at, calling_ae_title=excluded.calling_ae_title, kind=excluded.kind, "
                "delivered_at=NULL, pixel_rows=excluded.pixel_rows, pixel_columns=excluded.pixel_columns, "
                "bits_allocated=excluded.bits_allocated, number_of_frames=excluded.number_of_frames, "
                "header_indexed=1",
                [(info.sop_instance_uid, info.sop_class_uid, info.series_instance_uid, info.study_instance_uid,
                  info.transfer_syntax_uid, info.instance_number, str(path), size, when, calling_ae_title, kind,
                  info.rows, info.columns, info.bits_allocated, info.number_of_frames)
                 for info, path, size, when, calling_ae_title, kind in rows],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _new_series_attributes(self, rows: Sequence[tuple[Any, ...]]) -> dict[str, IndexedAttributes]:
        """Kept attributes of the series of ``rows`` (``(info, path, ...)``) that the index has none for yet, from
        one header each. A series indexed meanwhile by another thread is harmless: the upsert keeps the first."""
        uids = list({info.series_instance_uid: None for info, *_ in rows})
        known: set[str] = set()
        with self._lock:  # briefly: the writer's connection (a long search holds the reader's)
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                known.update(r[0] for r in self._db.execute(
                    f"SELECT series_instance_uid FROM series WHERE attrs IS NOT NULL AND series_instance_uid IN "
                    f"({','.join('?' * len(chunk))})", chunk))
        out = {}
        for info, path, *_ in rows:
            uid = info.series_instance_uid
            if uid in known or uid in out:
                continue
            attrs = IndexedAttributes.from_raw(info.kept) if info.kept is not None else None
            out[uid] = attrs if attrs is not None else _read_attributes(path, uid)
        return out

    def _drop_empty_series(self) -> None:
        db = self._db
        empty = [r[0] for r in db.execute(
            "SELECT series_instance_uid FROM series s WHERE NOT EXISTS "
            "(SELECT 1 FROM instances i WHERE i.series_instance_uid = s.series_instance_uid)"
        )]
        for uid in empty:
            row = db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid=?", (uid,)).fetchone()
            db.execute("DELETE FROM series WHERE series_instance_uid=?", (uid,))
            if row is not None:
                _rmdir_quietly(self.instances_dir / row[0] / uid)
        for (study_uid,) in db.execute(
            "SELECT study_instance_uid FROM studies st WHERE NOT EXISTS "
            "(SELECT 1 FROM series s WHERE s.study_instance_uid = st.study_instance_uid)"
        ).fetchall():
            db.execute("DELETE FROM studies WHERE study_instance_uid=?", (study_uid,))
            _rmdir_quietly(self.instances_dir / study_uid)


def _read_attributes(path: str | os.PathLike[str] | None, series_uid: str) -> IndexedAttributes:
    """The kept attributes of a series from one of its files; empty ones when it cannot be read (logged)."""
    if path is None:
        return IndexedAttributes()
    try:
        return IndexedAttributes.from_file(path)
    except (OSError, ValueError) as exc:
        logger.warning("Index: the header of series %s cannot be read (%s); it is searchable by UID only",
                       series_uid, type(exc).__name__)
        return IndexedAttributes()


def _study_values(attrs: IndexedAttributes | None) -> list[Any]:
    if attrs is None:
        return [None] + [""] * len(STUDY_COLUMNS)
    return [attrs.study_json] + [attrs.study_columns.get(c, "") for c in STUDY_COLUMNS]


def _series_values(attrs: IndexedAttributes | None) -> list[Any]:
    if attrs is None:
        return [None] + [""] * len(SERIES_COLUMNS)
    return [attrs.series_json] + [attrs.series_columns.get(c, "") for c in SERIES_COLUMNS]


def _fill_attributes(db: sqlite3.Connection, series_uid: str, study_uid: str, attrs: IndexedAttributes) -> None:
    """Set a series' kept attributes, and its study's when not yet set (the migration)."""
    db.execute(f"UPDATE series SET attrs=?, {', '.join(f'{c}=?' for c in SERIES_COLUMNS)} "
               "WHERE series_instance_uid=? AND attrs IS NULL", (*_series_values(attrs), series_uid))
    db.execute(f"UPDATE studies SET attrs=?, {', '.join(f'{c}=?' for c in STUDY_COLUMNS)} "
               "WHERE study_instance_uid=? AND attrs IS NULL", (*_study_values(attrs), study_uid))


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script one by one (``executescript`` would commit the transaction first)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""


def _tighten_index_files(db_path: Path) -> None:
    """Give the index and its WAL files :data:`INDEX_FILE_MODE` (an index made before, or under a wide umask)."""
    for suffix in ("", "-wal", "-shm"):
        path = db_path.with_name(db_path.name + suffix)
        try:
            if statmod.S_IMODE(os.lstat(path).st_mode) != INDEX_FILE_MODE:
                os.chmod(path, INDEX_FILE_MODE, follow_symlinks=False)
        except FileNotFoundError:
            pass
        except (OSError, NotImplementedError) as exc:
            logger.warning("Cannot restrict the permissions of %s: %s", path.name, exc)


def _instance(r: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        r["sop_instance_uid"], r["sop_class_uid"], r["series_instance_uid"], r["study_instance_uid"],
        r["transfer_syntax_uid"], r["instance_number"], Path(r["path"]), r["size"], r["received_at"],
        r["calling_ae_title"], r["kind"], r["delivered_at"],
    )


def _series(r: sqlite3.Row) -> SeriesRecord:
    return SeriesRecord(
        r["series_instance_uid"], r["study_instance_uid"], r["modality"], r["series_number"],
        r["series_description"], r["calling_ae_title"], r["kind"], r["first_received"], r["last_received"],
        r["stable_at"], r["n"], r["bytes"],
    )


def _check_file(path: Path) -> None:
    """Check a stored file's data set encoding (catches a file truncated by a crash)."""
    from pynetdicom.dsutils import split_dataset

    try:
        meta, offset = split_dataset(path)
    except Exception as exc:
        raise InstanceValidationError(f"File '{path}' has no readable file meta: {exc}") from exc
    ts = str(meta.get("TransferSyntaxUID", ""))
    with open(path, "rb") as fh:
        fh.seek(offset)
        check_encoding(fh.read(), ts)


def _check_uids(info: InstanceInfo) -> None:
    for name in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        if not is_valid_uid(getattr(info, name)):
            raise InstanceValidationError(f"{name} {getattr(info, name)!r} is not a valid UID.", kind="uid")


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now (sync_file_range WRITE: no wait, no flush)."""
    import ctypes

    lib = _get_libc()
    if lib:
        try:
            lib.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 2)
        except (OSError, AttributeError, ctypes.ArgumentError):
            pass


#: Threads that flush a staged batch file by file. Concurrent fdatasyncs share the file system's journal
#: commits, and unlike syncfs they flush nothing but the batch (not other programs' dirty data).
FLUSH_THREADS = 8

#: Other data waiting to be written back (machine-wide, beyond the batch's own) below which a staged batch
#: is flushed with one syncfs(2) instead of one fdatasync per file.
SYNCFS_OTHER_BYTES = 64 * 1024 * 1024


def _writeback_pending_bytes() -> int | None:
    """Dirty + Writeback from /proc/meminfo (bytes), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            total = 0
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("Dirty", "Writeback"):
                    total += int(rest.split()[0]) * 1024
            return total
    except (OSError, ValueError, IndexError):
        return None


def _flush_batch(paths: Sequence[Path], batch_bytes: int, root: Path) -> None:
    """Make a batch of written files durable (a pull's instances; their write-back was started when written).

    When the machine has little else to write back (:data:`SYNCFS_OTHER_BYTES`), one syncfs of the file
    system does it: it writes the files' inodes together and flushes the disk cache once, where an
    fdatasync per file flushes it once per file (measured by hand for 300 files: 11 ms against 28 ms at the
    end of a pull). Otherwise syncfs would first have to write other programs' data, so the files are
    flushed one by one (:func:`_flush_files`), which waits for nothing but them.

    Raises
    ------
    OSError
        When a flush fails.
    """
    if len(paths) > 1:
        pending = _writeback_pending_bytes()
        if pending is not None and pending - batch_bytes < SYNCFS_OTHER_BYTES:
            syncfs(root)
            return
    _flush_files(paths)


def _flush_files(paths: Sequence[Path]) -> None:
    """fdatasync every file, several at a time.

    Raises
    ------
    OSError
        The first flush error.
    """
    def one(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    if len(paths) <= 1:
        for path in paths:
            one(path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(FLUSH_THREADS, len(paths)), thread_name_prefix="flush") as pool:
        for _ in pool.map(one, paths):
            pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def iter_dicom_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Files named by ``paths``, directories expanded recursively (sorted), hidden files skipped."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    if not name.startswith("."):
                        yield Path(dirpath) / name
        else:
            yield path


__all__ = [
    "InstanceInfo", "InstanceRecord", "InstanceValidationError", "KIND_RECEIVED", "KIND_RESULT", "PutResult",
    "RecoveryReport", "RetentionReport", "SeriesRecord", "StagedInstance", "Store", "StoreFullError", "StudyRecord",
    "INDEX_TAGS", "JournalRecord", "check_encoding", "encode_file_meta", "is_valid_uid", "iter_dicom_files",
    "read_file_meta", "read_journal", "syncfs",
]
