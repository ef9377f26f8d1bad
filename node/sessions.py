"""Interactive sessions: a loaded series per user with its prompt history and current mask; undo, reset, expiry."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_io.seg import SegmentSpec
from dicom_io.series import Series
from models.base import Mode, Prompts
from node.errors import NodeError

logger = logging.getLogger(__name__)


class SessionNotFoundError(NodeError, LookupError):
    """No session with that id exists for this user."""


class SessionExpiredError(NodeError, LookupError):
    """The session existed but expired (AIAA answers 440 for this)."""


class TooManySessionsError(NodeError):
    """``api.max_sessions`` sessions are open."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Step:
    """One refinement: the prompts added and the mask after applying all prompts so far.

    The mask is kept bit-packed (one bit per voxel) so a long history of a large CT stays small.
    """

    def __init__(self, prompts: Prompts, mask: np.ndarray, voxel_count: int,
                 timings: dict[str, float] | None = None, stats: dict[str, int] | None = None) -> None:
        self.prompts = prompts
        self.shape = tuple(int(n) for n in mask.shape)
        self._packed = np.packbits(np.asarray(mask, dtype=bool), axis=None)
        self.voxel_count = voxel_count
        self.timings = dict(timings or {})
        self.stats = dict(stats or {})

    @property
    def mask(self) -> np.ndarray:
        """The mask as bool (slices, rows, columns)."""
        n = int(np.prod(self.shape))
        return np.unpackbits(self._packed, count=n).astype(bool).reshape(self.shape)


#: Most segments one session holds (the finished ones and the one being refined); as node.results.MAX_SEGMENTS.
MAX_SEGMENTS = 32
#: Display colours given to segments 2, 3, ... of a session when the client names none (segment 1 keeps its own).
PALETTE = ("#00ff00", "#ff00ff", "#00ffff", "#ff8000", "#8080ff", "#ff0000", "#80ff80", "#ffff80")


class FinishedSegment:
    """A segment of a session that is no longer being refined: its description and its mask (bit-packed)."""

    def __init__(self, spec: SegmentSpec, mask: np.ndarray) -> None:
        self.spec = spec
        self.shape = tuple(int(n) for n in mask.shape)
        self._packed = np.packbits(np.asarray(mask, dtype=bool), axis=None)
        self.voxel_count = int(np.count_nonzero(mask))

    @property
    def mask(self) -> np.ndarray:
        n = int(np.prod(self.shape))
        return np.unpackbits(self._packed, count=n).astype(bool).reshape(self.shape)


def merge(a: Prompts, b: Prompts) -> Prompts:
    """All prompts of ``a`` and ``b`` (duplicates dropped, order kept)."""
    points = tuple(dict.fromkeys(a.points + b.points))
    boxes = tuple(dict.fromkeys(a.boxes + b.boxes))
    return Prompts(points=points, boxes=boxes)


@dataclass(eq=False)
class Session:
    """An interactive segmentation of one series by one user.

    The loaded :class:`Series` stays in memory, so each follow-up prompt reuses its voxels and the
    model's per-slice embedding cache (keyed by slice content) makes the image encoder run only
    for slices it has not seen.
    """

    id: str
    user: str
    series: Series
    model: str
    mode: Mode = "2d"
    segment: SegmentSpec = field(default_factory=SegmentSpec)
    ttl: float = 1800.0
    created: float = field(default_factory=time.time)
    last_access: float = field(default_factory=time.time)
    steps: list[Step] = field(default_factory=list)
    #: Folder holding uploaded files of this session (removed with the session).
    files_dir: Path | None = None
    #: Client-side slice order is reversed relative to ours (OHIF-AI's ``flipped``).
    flipped: bool = False
    #: Free-form client data (MONAI Label session meta).
    meta: dict[str, Any] = field(default_factory=dict)
    #: Serialises refinements of this session (one at a time, in arrival order).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Segments finished before the one being refined (``segment`` / ``steps``); segment numbers 1..n.
    finished: list[FinishedSegment] = field(default_factory=list)
    _mask: np.ndarray | None = field(default=None, repr=False)
    _mask_of: Step | None = field(default=None, repr=False)

    @property
    def expires(self) -> float:
        return self.last_access + self.ttl

    @property
    def prompts(self) -> Prompts:
        """All prompts applied so far."""
        out = Prompts()
        for step in self.steps:
            out = merge(out, step.prompts)
        return out

    @property
    def mask(self) -> np.ndarray:
        """The current mask (empty before the first prompt)."""
        if not self.steps:
            return np.zeros(self.series.voxels.shape, dtype=bool)
        last = self.steps[-1]
        mask = self._mask
        if self._mask_of is not last or mask is None:
            mask = last.mask
            self._mask, self._mask_of = mask, last
        return mask

    def touch(self) -> None:
        self.last_access = time.time()

    def push(self, step: Step) -> None:
        self.steps.append(step)

    def undo(self) -> Step | None:
        """Drop the last step; returns it, or None when there was nothing to undo."""
        return self.steps.pop() if self.steps else None

    def reset(self) -> int:
        """Drop every step; returns how many there were."""
        n = len(self.steps)
        self.steps.clear()
        return n

    def next_segment(self, spec: SegmentSpec | None = None) -> int:
        """Finish the segment being refined (kept when it has voxels) and start a new one; returns its number.

        ``spec``: the new segment's description (default: the current one's category and type, the label
        numbered after it and the next colour of :data:`PALETTE`).

        Raises
        ------
        ValueError
            When the session already holds :data:`MAX_SEGMENTS` segments.
        """
        mask = self.mask
        keep = bool(self.steps) and bool(mask.any())
        if keep and len(self.finished) + 1 >= MAX_SEGMENTS:
            raise ValueError(f"Session {self.id} holds {MAX_SEGMENTS} segments, the most one session may hold; "
                             "commit it and open another.")
        if keep:
            self.finished.append(FinishedSegment(self.segment, mask))
        number = len(self.finished) + 1
        if spec is None and number > 1:
            first = self.finished[0].spec
            spec = SegmentSpec(label=f"{first.label[:58]} {number}", color=PALETTE[(number - 2) % len(PALETTE)],
                               category=first.category, type=first.type)
        if spec is not None:
            self.segment = spec
        self.steps.clear()
        return number

    def set_segment(self, spec: SegmentSpec, mask: np.ndarray) -> int:
        """Hold ``mask`` as the segment labelled ``spec.label`` (replacing one of that label); returns its number.

        Used by clients that send whole results per label (MONAI Label): each label is one segment.

        Raises
        ------
        ValueError
            When a new label would pass :data:`MAX_SEGMENTS`.
        """
        for n, seg in enumerate(self.finished):
            if seg.spec.label == spec.label:
                self.finished[n] = FinishedSegment(spec, mask)
                return n + 1
        if len(self.finished) + 1 >= MAX_SEGMENTS:
            raise ValueError(f"Session {self.id} holds {MAX_SEGMENTS} segments, the most one session may hold.")
        self.finished.append(FinishedSegment(spec, mask))
        return len(self.finished)

    def segments(self) -> tuple[list[SegmentSpec], list[np.ndarray]]:
        """Every segment with voxels: the finished ones, then the one being refined."""
        specs = [f.spec for f in self.finished if f.voxel_count]
        masks = [f.mask for f in self.finished if f.voxel_count]
        current = self.mask
        if self.steps and current.any():
            specs.append(self.segment)
            masks.append(current)
        return specs, masks

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (no patient data)."""
        return {
            "id": self.id,
            "user": self.user,
            "series_instance_uid": self.series.series_instance_uid,
            "study_instance_uid": self.series.study_instance_uid,
            "shape": list(self.series.voxels.shape),
            "spacing": list(self.series.geometry.spacing),
            "model": self.model,
            "mode": self.mode,
            "label": self.segment.label,
            "steps": len(self.steps),
            "segment_number": len(self.finished) + 1,
            "segments": [{"number": n, "label": f.spec.label, "voxel_count": f.voxel_count}
                         for n, f in enumerate(self.finished, start=1)]
            + [{"number": len(self.finished) + 1, "label": self.segment.label,
                "voxel_count": self.steps[-1].voxel_count if self.steps else 0}],
            "points": len(self.prompts.points),
            "boxes": len(self.prompts.boxes),
            "voxel_count": self.steps[-1].voxel_count if self.steps else 0,
            "created": self.created,
            "last_access": self.last_access,
            "expires": self.expires,
        }

    def close(self) -> None:
        if self.files_dir is not None:
            shutil.rmtree(self.files_dir, ignore_errors=True)
            self.files_dir = None


class SessionStore:
    """Open sessions in memory, per user, with a time-to-live refreshed on each use.

    Parameters
    ----------
    ttl
        Default seconds of inactivity before a session expires.
    max_sessions
        Largest number of open sessions.
    retry_after
        Seconds advertised when full.

    Attributes
    ----------
    on_open
        Called with each new session (the API schedules pre-encoding of its series); its errors
        are logged and never fail the session.
    """

    def __init__(self, ttl: float = 1800.0, max_sessions: int = 16, retry_after: int = 5) -> None:
        self.ttl = float(ttl)
        self.max_sessions = int(max_sessions)
        self.retry_after = retry_after
        self._sessions: dict[str, Session] = {}
        self._expired: dict[str, float] = {}
        self._lock = threading.Lock()
        self.on_open: Callable[[Session], Any] | None = None

    def create(self, user: str, series: Series, model: str, *, mode: Mode = "2d",
               segment: SegmentSpec | None = None, ttl: float | None = None, files_dir: Path | None = None,
               flipped: bool = False, meta: dict[str, Any] | None = None) -> Session:
        """Open a session.

        Raises
        ------
        TooManySessionsError
            When ``max_sessions`` are open (after removing expired ones).
        """
        self.sweep()
        ttl = self.ttl if ttl is None or ttl <= 0 else min(float(ttl), self.ttl)
        session = Session(id=uuid.uuid4().hex, user=user, series=series, model=model, mode=mode,
                          segment=segment or SegmentSpec(), ttl=ttl, files_dir=files_dir, flipped=flipped,
                          meta=dict(meta or {}))
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessionsError(
                    f"{len(self._sessions)} sessions are open (api.max_sessions = {self.max_sessions}); "
                    "delete one or retry later.", self.retry_after)
            self._sessions[session.id] = session
        logger.info("Session %s opened on series %s (%s, %s)", session.id, series.series_instance_uid, model, mode)
        if self.on_open is not None:
            try:
                self.on_open(session)
            except Exception:
                logger.exception("Session %s: the on-open hook failed", session.id)
        return session

    def get(self, session_id: str, user: str, *, touch: bool = True) -> Session:
        """The user's session ``session_id``.

        Raises
        ------
        SessionExpiredError
            When it expired.
        SessionNotFoundError
            When it does not exist or belongs to another user.
        """
        now = time.time()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires < now:
                self._drop(session_id, now)
                session = None
            if session is None:
                if session_id in self._expired:
                    raise SessionExpiredError(f"session '{session_id}' has expired.")
                raise SessionNotFoundError(f"session '{session_id}' does not exist.")
            if session.user != user:
                raise SessionNotFoundError(f"session '{session_id}' does not exist.")
            if touch:
                session.last_access = now
            return session

    def find(self, user: str, series_instance_uid: str, model: str) -> Session | None:
        """The user's newest live session on a series with a model (OHIF-AI keys its state that way)."""
        self.sweep()
        now = time.time()
        with self._lock:
            found = [s for s in self._sessions.values()
                     if s.user == user and s.series.series_instance_uid == series_instance_uid
                     and s.model == model and s.expires >= now]
        return max(found, key=lambda s: s.last_access) if found else None

    def delete(self, session_id: str, user: str) -> Session:
        """Close a session.

        Raises
        ------
        SessionNotFoundError, SessionExpiredError
        """
        session = self.get(session_id, user, touch=False)
        with self._lock:
            self._sessions.pop(session_id, None)
        session.close()
        logger.info("Session %s closed", session_id)
        return session

    def sweep(self, now: float | None = None) -> int:
        """Remove expired sessions; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [sid for sid, s in self._sessions.items() if s.expires < now]
            for sid in gone:
                self._drop(sid, now)
            for sid, when in list(self._expired.items()):
                if when < now - 86400:
                    del self._expired[sid]
        if gone:
            logger.info("%d session(s) expired", len(gone))
        return len(gone)

    def _drop(self, session_id: str, now: float) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()
            self._expired[session_id] = now

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close_all(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()


__all__ = ["Session", "SessionExpiredError", "SessionNotFoundError", "SessionStore", "Step",
           "TooManySessionsError", "merge"]
