"""Persisted outbox: results and forwarded instances wait here until a destination confirms them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from dicom_io.scu import Peer, StoreResult
from dicom_io.store import KIND_RESULT, InstanceValidationError, Store
from node import status
from node.destinations import Destination, DimseDestination, lookup, open_destination, validate_names
from node.errors import ConfigError

logger = logging.getLogger(__name__)

PENDING = "pending"
#: While a delivery attempt runs, its rows' next attempt is pushed this far beyond the longest retry delay (a lease).
_CLAIM_SECONDS = 300.0
DELIVERED = "delivered"
FAILED = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    destination      TEXT NOT NULL,
    path             TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt     REAL NOT NULL,
    last_status      INTEGER,
    last_error       TEXT NOT NULL DEFAULT '',
    created          REAL NOT NULL,
    delivered_at     REAL,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt);
CREATE TABLE IF NOT EXISTS labelmap_refusals (
    destination TEXT PRIMARY KEY,
    status      INTEGER,
    detail      TEXT NOT NULL DEFAULT '',
    at          REAL NOT NULL
);
"""

#: Answers that refuse a Label Map SEG for its SOP class: 0x0122 (SOP class not supported), 0xA900 (data set
#: does not match the SOP class) and 0xC000 (a STOW-RS 4xx without a response body); a DIMSE peer that
#: accepted no presentation context for it gives no status and a "not sent" error (dicom_io.scu).
_LABELMAP_REFUSALS = frozenset({status.SOP_CLASS_NOT_SUPPORTED, status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                status.CANNOT_UNDERSTAND})


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    sop_instance_uid: str
    destination: str
    path: Path
    state: str
    attempts: int
    next_attempt: float
    last_status: int | None
    last_error: str
    created: float
    delivered_at: float | None
    #: A BINARY SEG sent instead when the destination refuses the Label Map SEG at ``path`` ('' = none).
    fallback: str = ""


def destination_peer(name: str, settings: Settings) -> Peer:
    """The :class:`Peer` of a configured DIMSE destination (looked up by :func:`node.destinations.lookup`).

    Raises
    ------
    ConfigError
        When ``name`` is not configured or not a DIMSE peer.
    """
    dest = lookup(name, settings)
    if dest.kind != "dimse":
        raise ConfigError(f"Destination '{name}' is of kind '{dest.kind}', not a DIMSE peer.")
    return DimseDestination.from_settings(name, dest, settings).peer


class Outbox:
    """Per-destination delivery queue persisted in SQLite; exactly one row per (SOP Instance UID, destination).

    Every destination is a :class:`node.destinations.Destination` (DIMSE, DICOMweb, XNAT), opened by
    :func:`node.destinations.open_destination`; all answer with DIMSE status semantics, so they get
    the same retries.

    A row is ``pending`` until the destination answers the C-STORE with success or a warning
    (``delivered``), or refuses it for good / exhausts ``max_attempts`` (``failed``). No response
    and transient refusals (0xA7xx, 0x0110) are retried with exponential backoff, across restarts.
    Queuing the same instance for the same destination again is a no-op, so a result is sent
    once; the only repeat is after a crash between the peer's answer and our commit, and then
    with the same SOP Instance UID (the peer sees the same instance again, not a new one).

    Parameters
    ----------
    path
        SQLite file (created when missing).
    settings
        ``settings.outbox`` (backoff) and ``settings.destinations`` (peers).
    store
        When given, queued instances are held against retention and results are marked
        delivered in the store.
    destination_for
        Maps a destination name to a :class:`Destination` (default: :func:`open_destination`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        settings: Settings,
        store: Store | None = None,
        destination_for: Callable[[str], Destination] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.store = store
        self.destination_for = destination_for or (lambda name: open_destination(name, settings))
        self._lock = threading.RLock()
        self._deliver_lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a queued result must survive power loss
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)").fetchall()}
        if "fallback" not in columns:  # an outbox from before label-map SEGs
            self._db.execute("ALTER TABLE outbox ADD COLUMN fallback TEXT NOT NULL DEFAULT ''")
        self.files_dir = self.path.parent / "outbox-files"
        self.wakeup = threading.Event()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _claim_seconds(self) -> float:
        # beyond any retry delay, so release_claims() can tell a claim from a scheduled retry
        return float(self.settings.outbox.retry_max_seconds) + _CLAIM_SECONDS

    def release_claims(self, now: float | None = None) -> int:
        """Make rows claimed by an attempt that a crash cut short due now; returns their number.

        A delivery attempt pushes its rows' next attempt :data:`_CLAIM_SECONDS` out while it runs;
        after ``kill -9`` nothing would clear that, and the result would wait minutes. Called by
        ``ainode serve`` at start, before its outbox worker runs (a retry delay is never longer than
        ``outbox.retry_max_seconds``, so a later due time can only be a claim).
        """
        now = time.time() if now is None else now
        limit = now + float(self.settings.outbox.retry_max_seconds)
        with self._lock:
            cur = self._db.execute(
                "UPDATE outbox SET next_attempt=? WHERE state='pending' AND next_attempt>?", (now, limit))
        if cur.rowcount:
            logger.warning("Outbox: %d delivery attempt(s) cut short by a crash; retrying now", cur.rowcount)
        return cur.rowcount

    # --- queueing -----------------------------------------------------------------------------

    def enqueue(self, sop_instance_uid: str, path: str | os.PathLike[str], destinations: Iterable[str],
                fallback: str | os.PathLike[str] | None = None) -> list[int]:
        """Queue one stored instance for each destination; returns the ids of newly queued rows.

        Rows that already exist for (SOP Instance UID, destination) are left as they are. ``fallback``:
        a BINARY SEG (kept with :meth:`keep_file`) sent once instead of the Label Map SEG ``path`` when a
        destination refuses that SOP class; the refusal is remembered (:meth:`refuses_labelmap`).
        """
        now = time.time()
        new: list[int] = []
        destinations = list(destinations)
        with self._lock:
            for dest in destinations:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO outbox (sop_instance_uid, destination, path, next_attempt, created, "
                    "fallback) VALUES (?,?,?,?,?,?)",
                    (sop_instance_uid, dest, str(path), now, now, str(fallback) if fallback else ""),
                )
                if cur.rowcount:
                    new.append(int(cur.lastrowid or 0))
                    if self.store is not None:
                        self.store.hold(sop_instance_uid, f"outbox:{dest}")
        if new:
            logger.info("Queued %s for %s", sop_instance_uid, ", ".join(destinations))
            self.wakeup.set()
        return new

    def keep_file(self, path: str | os.PathLike[str], name: str) -> Path:
        """Copy a file the outbox will send (a BINARY fallback SEG) next to the outbox, durably; returns the copy."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        target = self.files_dir / name
        tmp = target.with_name(target.name + ".partial")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        tmp.replace(target)
        fd = os.open(self.files_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return target

    def refuses_labelmap(self, destination: str) -> bool:
        """True once ``destination`` refused a Label Map SEG (such results then go to it as BINARY)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM labelmap_refusals WHERE destination=?", (destination,)).fetchone()
        return row is not None

    # --- inspection ---------------------------------------------------------------------------

    def entries(self, state: str | None = None) -> list[OutboxEntry]:
        sql = "SELECT * FROM outbox"
        args: tuple[str, ...] = ()
        if state is not None:
            sql, args = sql + " WHERE state=?", (state,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [_entry(r) for r in rows]

    def entry(self, sop_instance_uid: str, destination: str) -> OutboxEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM outbox WHERE sop_instance_uid=? AND destination=?",
                                   (sop_instance_uid, destination)).fetchone()
        return _entry(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def next_due(self) -> float | None:
        """Time of the earliest pending attempt, or None when nothing is pending."""
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt) FROM outbox WHERE state='pending'").fetchone()
        return None if row[0] is None else float(row[0])

    # --- delivery -----------------------------------------------------------------------------

    def deliver_due(self, now: float | None = None, only_ids: Iterable[int] | None = None) -> dict[str, int]:
        """Try every pending row whose time has come (or ``only_ids``), one association per destination.

        Returns
        -------
        dict
            Counts of rows that became ``delivered``, ``failed`` or stayed ``pending`` (retry).
        """
        now = time.time() if now is None else now
        counts = {DELIVERED: 0, FAILED: 0, PENDING: 0}
        with self._deliver_lock:
            with self._lock:
                if only_ids is not None:
                    ids = list(only_ids)
                    rows = [r for i in ids for r in self._db.execute(
                        "SELECT * FROM outbox WHERE id=? AND state='pending'", (i,)).fetchall()]
                else:
                    rows = self._db.execute(
                        "SELECT * FROM outbox WHERE state='pending' AND next_attempt<=? ORDER BY id", (now,)
                    ).fetchall()
                # Claim the rows (push their next attempt out) so another process serving the same
                # outbox does not send them at the same time.
                claimed = []
                for r in rows:
                    cur = self._db.execute(
                        "UPDATE outbox SET next_attempt=? WHERE id=? AND state='pending' AND next_attempt=?",
                        (now + self._claim_seconds(), r["id"], r["next_attempt"]),
                    )
                    if cur.rowcount:
                        claimed.append(r)
            by_dest: dict[str, list[OutboxEntry]] = defaultdict(list)
            for r in claimed:
                by_dest[r["destination"]].append(_entry(r))
            for dest, entries in by_dest.items():
                for state, n in self._deliver(dest, entries).items():
                    counts[state] += n
        return counts

    def _deliver(self, dest: str, entries: list[OutboxEntry]) -> dict[str, int]:
        counts = {DELIVERED: 0, FAILED: 0, PENDING: 0}
        try:
            target = self.destination_for(dest)
        except (ConfigError, OSError, ValueError) as exc:
            for e in entries:
                counts[self._record(e, None, str(exc), permanent=True)] += 1
            return counts
        if self.store is not None:
            self.store.settle()  # an instance acknowledged through the store's journal is placed asynchronously
        missing = [e for e in entries if not e.path.exists()]
        for e in missing:
            if self.store is not None and self.store.instance(e.sop_instance_uid) is not None:
                # Indexed but its file not in place (placement delayed, e.g. the disk is full): try again later.
                counts[self._record(e, None, f"file {e.path} is not in place yet")] += 1
            else:
                counts[self._record(e, None, f"file {e.path} no longer exists", permanent=True)] += 1
        present = [e for e in entries if e.path.exists()]
        if not present:
            return counts
        paths = [e.path for e in present]
        # Each answer is committed as it arrives (DIMSE answers one by one), before the next instance and
        # the release: a crash can then repeat a delivery only if it lands between the answer and that commit.
        recorded: set[int] = set()

        fell_back: list[OutboxEntry] = []

        def outcome(e: OutboxEntry, res: StoreResult) -> None:
            refused = res.status in _LABELMAP_REFUSALS or (res.status is None and res.error.startswith("not sent"))
            if e.fallback and refused:
                fell_back.append(self._fall_back(e, res))
            else:
                counts[self._record(e, res.status, res.error)] += 1

        def committed(index: int, res: StoreResult) -> None:
            outcome(present[index], res)
            recorded.add(index)

        try:
            results: list[StoreResult] = list(target.send(paths, on_response=committed))
        except ConfigError as exc:
            for i, e in enumerate(present):
                if i not in recorded:
                    counts[self._record(e, None, str(exc), permanent=True)] += 1
            return counts
        except Exception as exc:  # a peer or network outcome: retry later
            logger.warning("Delivery to %s failed: %s", dest, exc)
            results = [StoreResult(str(p), e.sop_instance_uid, "", None, f"{type(exc).__name__}: {exc}")
                       for p, e in zip(paths, present, strict=False)]
        if target.kind == "dimse":
            # send_instances reports every instance; those answered through ``committed`` are recorded.
            results = [r for i, r in enumerate(results) if i not in recorded]
            present = [e for i, e in enumerate(present) if i not in recorded]
        elif len(results) != len(present):
            results = [StoreResult(str(p), e.sop_instance_uid, "", None, "no result from the archive")
                       for p, e in zip(paths, present, strict=False)]
        for e, res in zip(present, results, strict=False):
            outcome(e, res)
        if fell_back:  # once: the BINARY SEG rows have no fallback of their own
            for state, n in self._deliver(dest, fell_back).items():
                counts[state] += n
        logger.info("Outbox -> %s: %d delivered, %d failed, %d to retry",
                    dest, counts[DELIVERED], counts[FAILED], counts[PENDING])
        return counts

    def _fall_back(self, e: OutboxEntry, res: StoreResult) -> OutboxEntry:
        """The destination refused the Label Map SEG: remember that, and make the row send the BINARY SEG."""
        text = res.error or status.describe(res.status)
        logger.warning("%s refused the Label Map SEG %s (%s); sending the BINARY SEG instead, and BINARY from now on",
                       e.destination, e.sop_instance_uid, text)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO labelmap_refusals (destination, status, detail, at) "
                             "VALUES (?,?,?,?)", (e.destination, res.status, text[:500], time.time()))
            self._db.execute("UPDATE outbox SET path=?, fallback='', last_status=?, last_error=? WHERE id=?",
                             (e.fallback, res.status, f"label map refused ({text[:200]}); sent as BINARY", e.id))
        return dataclasses.replace(e, path=Path(e.fallback), fallback="")

    def _record(self, e: OutboxEntry, code: int | None, error: str, permanent: bool = False) -> str:
        now = time.time()
        attempts = e.attempts + 1
        cfg = self.settings.outbox
        if status.is_delivered(code):
            state = DELIVERED
        elif permanent or not status.is_retryable(code) or (cfg.max_attempts and attempts >= cfg.max_attempts):
            state = FAILED
        else:
            state = PENDING
        delay = min(cfg.retry_max_seconds, cfg.retry_base_seconds * (2 ** (attempts - 1)))
        delay *= 1.0 + 0.1 * random.random()  # a little jitter so destinations are not hit in lockstep
        text = error or ("" if code is None else status.describe(code))
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state=?, attempts=?, next_attempt=?, last_status=?, last_error=?, delivered_at=? "
                "WHERE id=?",
                (state, attempts, now + delay, code, text, now if state == DELIVERED else None, e.id),
            )
        if state == DELIVERED and self.store is not None:
            self._after_delivery(e)
        if state == FAILED:
            logger.error("Delivery of %s to %s failed for good after %d attempt(s): %s",
                         e.sop_instance_uid, e.destination, attempts, text)
        elif state == PENDING:
            logger.warning("Delivery of %s to %s failed (attempt %d, %s); retrying in %.0f s",
                           e.sop_instance_uid, e.destination, attempts, text or "no response", delay)
        return state

    def _after_delivery(self, e: OutboxEntry) -> None:
        assert self.store is not None
        self.store.release(e.sop_instance_uid, f"outbox:{e.destination}")
        with self._lock:
            left = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE sop_instance_uid=? AND state!='delivered'", (e.sop_instance_uid,)
            ).fetchone()[0]
        if not left:
            self.store.mark_delivered(e.sop_instance_uid)

    def retry_failed(self, destination: str | None = None) -> int:
        """Put ``failed`` rows back to ``pending`` (after fixing the cause); returns how many."""
        sql = "UPDATE outbox SET state='pending', next_attempt=? WHERE state='failed'"
        args: tuple[object, ...] = (time.time(),)
        if destination:
            sql += " AND destination=?"
            args += (destination,)
        with self._lock:
            n = self._db.execute(sql, args).rowcount
        self.wakeup.set()
        return int(n)


def _entry(r: sqlite3.Row) -> OutboxEntry:
    return OutboxEntry(
        r["id"], r["sop_instance_uid"], r["destination"], Path(r["path"]), r["state"], r["attempts"],
        r["next_attempt"], r["last_status"], r["last_error"], r["created"], r["delivered_at"], r["fallback"],
    )


class OutboxWorker:
    """Background thread delivering due outbox rows; wakes on :meth:`Outbox.enqueue` or every poll."""

    def __init__(self, outbox: Outbox, poll_seconds: float = 1.0) -> None:
        self.outbox = outbox
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.outbox.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.outbox.deliver_due()
            except Exception:
                logger.exception("Outbox delivery pass failed")
            due = self.outbox.next_due()
            wait = self.poll_seconds if due is None else max(0.05, min(self.poll_seconds, due - time.time()))
            self.outbox.wakeup.wait(wait)
            self.outbox.wakeup.clear()


#: State a result (``<data_dir>/results/<id>/result.json``) gets when the node stopped while it was
#: queued or running: its job died with the process; nothing of it was written or delivered.
INTERRUPTED = "interrupted"


@dataclass
class ResultRecovery:
    """What :func:`recover_results` did at start."""

    interrupted: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    leftovers_removed: int = 0


def recover_results(results_dir: str | os.PathLike[str], store: Store, outbox: Outbox) -> ResultRecovery:
    """Make the API's results consistent after a crash (run by ``ainode serve`` before it listens).

    * A result still ``queued`` or ``running`` on disk belonged to a job that died with the process:
      it becomes ``interrupted`` with an error saying so (``GET /v1/segmentations/{id}`` answers it),
      and the output files it may have begun are removed. The client submits it again.
    * A ``done`` result with destinations whose SEG is not in the outbox for one of them (a crash
      between writing the result and queueing it) is put in the store and queued now. Queueing is
      idempotent per (SOP Instance UID, destination), so nothing already queued or delivered is
      sent again.
    * ``*.partial`` files (an interrupted atomic write) are removed.
    """
    report = ResultRecovery()
    root = Path(results_dir)
    if not root.is_dir():
        return report
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for leftover in folder.glob("*.partial"):
            _remove(leftover)
            report.leftovers_removed += 1
        path = folder / "result.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            logger.error("Result %s cannot be read at recovery: %s", folder.name, exc)
            continue
        state = data.get("state")
        if state in ("queued", "running"):
            for out in folder.iterdir():
                if out.name != "result.json" and out.is_file():
                    _remove(out)
                    report.leftovers_removed += 1
            data.update(state=INTERRUPTED, nifti=None, seg=None, seg_sop_instance_uid=None,
                        seg_series_instance_uid=None,
                        error=f"interrupted: the node stopped while this segmentation was {state} "
                              f"(recovered at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}); "
                              "nothing was written or delivered; submit it again.")
            _write_json(path, data)
            report.interrupted.append(folder.name)
            continue
        seg, sop, dests = data.get("seg"), data.get("seg_sop_instance_uid"), data.get("destinations") or []
        if state != "done" or not seg or not sop or not dests:
            continue
        missing = [d for d in dests if outbox.entry(sop, d) is None]
        if not missing:
            continue
        try:
            put = store.put_file(seg, kind=KIND_RESULT)
        except (OSError, InstanceValidationError) as exc:
            logger.error("Result %s: its SEG cannot be queued at recovery: %s", folder.name, exc)
            continue
        from node.results import queue_result

        binary = data.get("seg_binary")  # the BINARY copy of a label-map SEG, for destinations that need it
        queue_result(outbox, outbox.settings, put.sop_instance_uid, put.path, missing,
                     Path(binary) if binary and Path(binary).exists() else None)
        report.requeued.append(folder.name)
    if report.interrupted or report.requeued:
        logger.warning("Results recovery: %d interrupted job(s) marked, %d result(s) queued for delivery",
                       len(report.interrupted), len(report.requeued))
    return report


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def queue_destinations(names: Iterable[str], settings: Settings) -> list[str]:
    """Validate destination names against the settings; returns them de-duplicated in order.

    Raises
    ------
    ConfigError
        When a name is not configured.
    """
    return validate_names(names, settings)


__all__ = ["DELIVERED", "FAILED", "INTERRUPTED", "PENDING", "Outbox", "OutboxEntry", "OutboxWorker", "ResultRecovery",
           "destination_peer", "queue_destinations", "recover_results"]
