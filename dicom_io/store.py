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
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_io.errors import DicomInputError

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


class InstanceValidationError(DicomInputError):
    """An instance cannot be stored: it cannot be decoded, or a required UID is missing or invalid.

    ``kind`` is ``"decode"``, ``"uid"``, ``"sop_class_mismatch"`` or ``"sop_instance_mismatch"``.
    """

    def __init__(self, message: str, kind: str = "decode") -> None:
        super().__init__(message)
        self.kind = kind


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
        )

    @classmethod
    def from_raw(cls, values: dict[str, bytes], transfer_syntax_uid: str = "") -> InstanceInfo:
        """Build from the raw values :func:`check_encoding` returns (no pydicom decoding).

        Raises
        ------
        InstanceValidationError
            ``kind="uid"`` when an identifying UID is missing or invalid.
        """
        text = {k: v.decode("ascii", errors="replace").strip(" \x00") for k, v in values.items()}
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
    0x00081030: "StudyDescription",
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


@dataclass(frozen=True)
class PutResult:
    """Outcome of :meth:`Store.put`: ``duplicate`` when the SOP Instance UID was already held."""

    sop_instance_uid: str
    path: Path
    size: int
    duplicate: bool


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


class Store:
    """The node's durable instance store and its SQLite index.

    Layout under ``root``: ``instances/<study>/<series>/<sop>.dcm``, ``quarantine/`` (refused
    data with a ``.json`` reason), ``index.sqlite`` (WAL). The files are the source of truth:
    :meth:`recover` rebuilds missing index rows from them.

    Durability contract of :meth:`put`: when it returns, the bytes are fsynced, the file has been
    renamed to its final name, its directory fsynced and the index row committed. Only then may a
    C-STORE be acknowledged.

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
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        # WAL; NORMAL sync is enough because the index is rebuilt from the fsynced files on recovery.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)

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
        with self._lock:
            self._db.close()
        self.release_owner_lock()

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
        for name in ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid"):
            if not is_valid_uid(getattr(info, name)):
                raise InstanceValidationError(f"{name} {getattr(info, name)!r} is not a valid UID.", kind="uid")
        parts = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        existing = self.instance(info.sop_instance_uid)
        if existing is not None and existing.path.exists():
            return PutResult(info.sop_instance_uid, existing.path, existing.size, duplicate=True)
        if self.min_free_bytes:
            st = os.statvfs(self.instances_dir)
            if st.f_bavail * st.f_frsize < self.min_free_bytes:
                raise StoreFullError(errno.ENOSPC, "Store file system is below its free-space minimum",
                                     str(self.instances_dir))
        series_dir = self._ensure_dir(info.study_instance_uid, info.series_instance_uid)
        tmp = series_dir / f".{info.sop_instance_uid}.{secrets.token_hex(4)}.partial"
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                for part in parts:
                    view = memoryview(part).cast("B")
                    while view:
                        written = os.write(fd, view)
                        size += written
                        view = view[written:]
                if self.durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        final = series_dir / f"{info.sop_instance_uid}.dcm"
        now = time.time()
        with self._lock:
            existing = self.instance(info.sop_instance_uid)
            if existing is not None and existing.path.exists():
                _unlink_quietly(tmp)
                return PutResult(info.sop_instance_uid, existing.path, existing.size, duplicate=True)
            try:
                os.rename(tmp, final)
                if self.durable:
                    _fsync_dir(series_dir)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            self._index(info, final, size, now, calling_ae_title, kind)
        return PutResult(info.sop_instance_uid, final, size, duplicate=False)

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

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)).fetchone()
        return _instance(row) if row else None

    def instances(self, series_instance_uid: str) -> list[InstanceRecord]:
        """The series' instances, by Instance Number then SOP Instance UID."""
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
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def total_bytes(self) -> int:
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

        Deletes ``*.partial`` files (data never acknowledged), indexes complete files that have no
        index row, quarantines unreadable unindexed files and drops index rows whose file is gone.
        Skipped (``report.skipped``) while another process is serving this store.
        """
        report = RecoveryReport()
        own = self._owner_fd is not None
        if not own and not self.acquire_owner_lock():
            logger.info("Store %s is in use by a running node; recovery skipped", self.root)
            report.skipped = True
            return report
        try:
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
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, sop_class_uid, series_instance_uid, "
                "study_instance_uid, transfer_syntax_uid, instance_number, path, size, received_at, "
                "calling_ae_title, kind) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (info.sop_instance_uid, info.sop_class_uid, info.series_instance_uid, info.study_instance_uid,
                 info.transfer_syntax_uid, info.instance_number, str(path), size, when, calling_ae_title, kind),
            )
            db.execute(
                "INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_number, "
                "series_description, calling_ae_title, kind, first_received, last_received, stable_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "last_received=MAX(last_received, excluded.last_received), stable_at=excluded.stable_at",
                (info.series_instance_uid, info.study_instance_uid, info.modality, info.series_number,
                 info.series_description, calling_ae_title, kind, when, when,
                 when if (stable or kind != KIND_RECEIVED) else None),
            )
            db.execute(
                "INSERT INTO studies (study_instance_uid, study_date, study_description, last_received) "
                "VALUES (?,?,?,?) ON CONFLICT(study_instance_uid) DO UPDATE SET "
                "last_received=MAX(last_received, excluded.last_received)",
                (info.study_instance_uid, info.study_date, info.study_description, when),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

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
    "RecoveryReport", "RetentionReport", "SeriesRecord", "Store", "StoreFullError", "StudyRecord",
    "INDEX_TAGS", "check_encoding", "encode_file_meta", "is_valid_uid", "iter_dicom_files",
]
