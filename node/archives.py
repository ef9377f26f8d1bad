"""Named archives (``[destinations.NAME]`` of kind dimse / dicomweb / xnat): pull from them, deliver to them."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from config.settings import DestinationSettings, Settings
from dicom_io.dicomweb import DicomwebClient, PullResult
from dicom_io.scu import StoreResult
from dicom_io.store import Store
from dicom_io.xnat import XnatClient, XnatPullResult
from node.destinations import KINDS, lookup, open_destination
from node.errors import ConfigError

_C = TypeVar("_C")

logger = logging.getLogger(__name__)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS origins (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    archive             TEXT NOT NULL,
    xnat_project        TEXT NOT NULL DEFAULT '',
    xnat_subject        TEXT NOT NULL DEFAULT '',
    xnat_session        TEXT NOT NULL DEFAULT '',
    xnat_scan           TEXT NOT NULL DEFAULT '',
    pulled_at           REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS origins_study ON origins(study_instance_uid);
"""


def destination(name: str, settings: Settings) -> DestinationSettings:
    """The configured destination ``name`` (see :func:`node.destinations.lookup`, the one lookup).

    Raises
    ------
    ConfigError
        When it is not configured or its ``kind`` is unknown.
    """
    return lookup(name, settings)


def open_dicomweb(name: str, settings: Settings) -> DicomwebClient:
    """A :class:`DicomwebClient` for a ``kind = "dicomweb"`` destination.

    Raises
    ------
    ConfigError
        When the destination is missing, of another kind, or its settings are unusable.
    """
    return _open(name, settings, DicomwebClient.from_settings)


def open_xnat(name: str, settings: Settings) -> XnatClient:
    """An :class:`XnatClient` for a ``kind = "xnat"`` destination.

    Raises
    ------
    ConfigError
        When the destination is missing, of another kind, or its settings are unusable.
    """
    return _open(name, settings, XnatClient.from_settings)


def _open(name: str, settings: Settings, factory: Callable[[str, Any], _C]) -> _C:
    dest = destination(name, settings)
    try:
        return factory(name, dest)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"Destination '{name}': {exc}") from exc


@dataclass(frozen=True)
class Origin:
    """Where a pulled series came from."""

    series_instance_uid: str
    study_instance_uid: str
    archive: str
    xnat_project: str = ""
    xnat_subject: str = ""
    xnat_session: str = ""
    xnat_scan: str = ""


class Origins:
    """Which archive (and XNAT session) each pulled series came from (``<data_dir>/origins.sqlite``).

    Used to send a series' results back to the archive it came from, and to find the XNAT session
    a SEG belongs in.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def for_settings(cls, settings: Settings) -> Origins:
        return cls(settings.data_path / "origins.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, origin: Origin) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO origins VALUES (?,?,?,?,?,?,?,?)",
                (origin.series_instance_uid, origin.study_instance_uid, origin.archive, origin.xnat_project,
                 origin.xnat_subject, origin.xnat_session, origin.xnat_scan, time.time()),
            )

    def of_series(self, series_instance_uid: str) -> Origin | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM origins WHERE series_instance_uid=?",
                                   (series_instance_uid,)).fetchone()
        return Origin(*row[:7]) if row else None

    def of_study(self, study_instance_uid: str, archive: str | None = None) -> Origin | None:
        sql, args = "SELECT * FROM origins WHERE study_instance_uid=?", [study_instance_uid]
        if archive is not None:
            sql += " AND archive=?"
            args.append(archive)
        with self._lock:
            row = self._db.execute(sql + " ORDER BY pulled_at DESC LIMIT 1", args).fetchone()
        return Origin(*row[:7]) if row else None


def result_destinations(settings: Settings, source_series_uid: str, origins: Origins | None = None,
                        store: Store | None = None) -> list[str]:
    """Where the results of a series go: ``deliver_to`` when configured, else the archive it came from.

    The origin is the archive it was pulled from (see :class:`Origins`), or, for a series received
    by C-STORE/STOW-RS, a configured destination named like the sender's calling AE title.
    """
    if settings.deliver_to:
        return list(settings.deliver_to)
    if origins is not None:
        origin = origins.of_series(source_series_uid)
        if origin is not None and origin.archive in settings.destinations:
            return [origin.archive]
    if store is not None:
        rec = store.get_series(source_series_uid)
        if rec is not None and rec.calling_ae_title in settings.destinations:
            return [rec.calling_ae_title]
    return []


def pull_dicomweb(settings: Settings, store: Store, archive: str, study_instance_uid: str,
                  series_instance_uid: str, progress: Callable[[int, int | None], None] | None = None,
                  origins: Origins | None = None) -> PullResult:
    """Pull a series from a DICOMweb archive into the store and record its origin.

    Raises
    ------
    ConfigError
        When ``archive`` is not a usable ``dicomweb`` destination.
    """
    with open_dicomweb(archive, settings) as client:
        result = client.pull_series(store, study_instance_uid, series_instance_uid, progress=progress)
    if result.held and origins is not None:
        origins.record(Origin(series_instance_uid, study_instance_uid, archive))
    return result


def pull_xnat(settings: Settings, store: Store, archive: str, session: str, scan: str,
              progress: Callable[[int], None] | None = None, origins: Origins | None = None,
              project: str | None = None) -> XnatPullResult:
    """Pull an XNAT scan into the store and record its origin (project, subject, session, scan).

    Raises
    ------
    ConfigError
        When ``archive`` is not a usable ``xnat`` destination.
    """
    dest = destination(archive, settings)
    with open_xnat(archive, settings) as client:
        try:
            found = client.get_session(session, project if project is not None else dest.project)
        except Exception as exc:  # XnatError or a bad identifier: reported, not raised
            return XnatPullResult(session, scan, error=str(exc))
        result = client.pull_scan(store, found.id, scan, max_zip_bytes=settings.input.max_zip_bytes,
                                  max_zip_members=settings.input.max_zip_members, progress=progress)
    if origins is not None:
        for study_uid in result.study_instance_uids[:1]:
            for series_uid in result.series_instance_uids:
                origins.record(Origin(series_uid, study_uid, archive, found.project, found.subject, found.id, scan))
    return result


def pull_xnat_by_uid(settings: Settings, store: Store, archive: str, study_instance_uid: str,
                     series_instance_uid: str, progress: Callable[[int], None] | None = None,
                     origins: Origins | None = None, project: str | None = None) -> XnatPullResult:
    """Pull from XNAT by UIDs: the project's session whose UID is the study, its scan whose UID is the series.

    XNAT reports these UIDs in its experiment and scan listings (``UID`` column); a server that does
    not gives an ``error`` naming what was not found.

    Raises
    ------
    ConfigError
        When ``archive`` is not a usable ``xnat`` destination.
    """
    dest = destination(archive, settings)
    project = project if project is not None else dest.project
    with open_xnat(archive, settings) as client:
        try:
            session = client.find_session_by_study_uid(study_instance_uid, project)
            if session is None:
                return XnatPullResult("", "", error=f"no session of project {project} has study {study_instance_uid}")
            scan = next((str(s["ID"]) for s in client.scans(session.id) if s.get("UID") == series_instance_uid), None)
        except Exception as exc:  # XnatError or a bad identifier: reported, not raised
            return XnatPullResult("", "", error=str(exc))
    if scan is None:
        return XnatPullResult(session.id, "", error=f"no scan of session {session.id} has series {series_instance_uid}")
    return pull_xnat(settings, store, archive, session.id, scan, progress=progress, origins=origins, project=project)


def send_to_destination(name: str, settings: Settings, paths: Sequence[Path],
                        origins: Origins | None = None) -> list[StoreResult]:
    """Deliver files to a ``dicomweb`` (STOW-RS) or ``xnat`` destination; one result per path.

    Results use DIMSE status semantics (``node.status``): success/warning = delivered, None or
    0xA7xx = retry later, other codes = refused for good. DIMSE destinations are the outbox's own
    business (:class:`node.destinations.DimseDestination`). ``origins`` (opened from ``settings`` when
    not given) tells which XNAT session a result belongs in.

    Raises
    ------
    ConfigError
        When the destination is missing, unusable, or of kind ``dimse``.
    """
    if lookup(name, settings).kind == "dimse":
        raise ConfigError(f"Destination '{name}' is a DIMSE peer; use node.destinations.open_destination.")
    return open_destination(name, settings, origins).send(list(paths))


def deliver(name: str, settings: Settings, paths: Sequence[Path]) -> list[StoreResult]:
    """The outbox's entry point for ``dicomweb`` and ``xnat`` destinations (see :func:`send_to_destination`).

    Raises
    ------
    ConfigError
        When the destination is missing or unusable.
    """
    origins = Origins.for_settings(settings)
    try:
        return send_to_destination(name, settings, paths, origins)
    finally:
        origins.close()


__all__ = [
    "KINDS", "deliver", "Origin", "Origins", "destination", "open_dicomweb", "open_xnat", "pull_dicomweb", "pull_xnat",
    "pull_xnat_by_uid",
    "result_destinations", "send_to_destination",
]
