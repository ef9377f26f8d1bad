"""Inference queues: one worker thread and one bounded queue per model/device, owning the segmenter."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from config.settings import Settings
from models.base import ModelError, Segmenter
from node.errors import NodeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Job states.
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"

#: Job priorities: interactive refinements overtake queued one-shot (often 3D) jobs; background work
#: (pre-encoding) runs only when nothing else waits and yields at its next slice when something arrives.
INTERACTIVE, BATCH, BACKGROUND = 0, 1, 2

#: Finished jobs remembered for ``GET /v1/jobs/{id}``.
_KEEP_FINISHED = 256


#: Called on a model's worker thread once the model has loaded. The service entry point
#: (:func:`node.service.serve`) sets it to leave the long-lived objects out of garbage collection;
#: library users (tests, the CLI's one-shot commands) leave it None.
after_model_load: Callable[[], None] | None = None


class QueueFullError(NodeError):
    """The model's queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModelError(NodeError, ValueError):
    """A request names a model the node does not have."""


class JobCancelledError(NodeError):
    """The job was cancelled before it finished."""


class ModelUnavailableError(NodeError):
    """The model cannot be loaded (missing checkpoint, unavailable device)."""


class ModelOutOfMemoryError(ModelUnavailableError):
    """The model ran out of memory on one request; the node and the model stay usable."""


def _out_of_memory(exc: BaseException) -> bool:
    """True for a failed allocation: Python's/NumPy's MemoryError or torch's CPU allocator error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "out of memory" in text.lower())


@dataclass
class JobContext:
    """Handed to a job function with the segmenter: lets long work notice a cancellation."""

    job: Job[Any]
    #: The queue running the job (for :meth:`should_yield`).
    queue: InferenceQueue | None = None

    def check(self) -> None:
        """Raise :class:`JobCancelledError` when the job has been cancelled."""
        if self.job.cancel_requested.is_set():
            raise JobCancelledError(f"Job {self.job.id} was cancelled.")

    def progress(self, done: int, total: int) -> None:
        """A :data:`models.base.ProgressCallback` that records progress and stops a cancelled job."""
        self.job.progress = (done, total)
        self.check()

    def should_yield(self) -> bool:
        """True when this (background) job should stop now: it was cancelled or other work waits."""
        if self.job.cancel_requested.is_set():
            return True
        return self.queue is not None and self.queue.foreground_waiting() > 0


@dataclass(eq=False)
class Job(Generic[T]):
    """One unit of model work; ``future`` resolves to the function's return value."""

    id: str
    model: str
    kind: str
    user: str
    fn: Callable[[Segmenter, JobContext], T]
    future: Future[T] = field(default_factory=Future)
    state: str = QUEUED
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str = ""
    progress: tuple[int, int] = (0, 0)
    priority: int = BATCH
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> dict[str, Any]:
        """JSON-able state of the job."""
        return {
            "id": self.id, "model": self.model, "kind": self.kind, "state": self.state, "priority": self.priority,
            "submitted": self.submitted, "started": self.started, "finished": self.finished,
            "queue_seconds": None if self.started is None else round(self.started - self.submitted, 4),
            "run_seconds": None if self.started is None or self.finished is None
            else round(self.finished - self.started, 4),
            "progress": {"done": self.progress[0], "total": self.progress[1]},
            "error": self.error or None,
        }


class InferenceQueue:
    """A bounded queue of jobs run one at a time by a worker thread that owns one segmenter.

    Jobs run by priority (:data:`INTERACTIVE` before :data:`BATCH` before :data:`BACKGROUND`), then in
    arrival order. Background jobs do not count against ``maxsize``; one per key waits at a time
    (:meth:`submit_background`), and they stop early through :meth:`JobContext.should_yield`.

    The segmenter is loaded by the worker on first use (or by :meth:`warm_up`), so loading never
    blocks the event loop. Segmenters are not thread-safe; only this thread calls them.

    Parameters
    ----------
    model
        Model name (``litemedsam``, ``sam2``).
    loader
        Returns the segmenter; called once, on the worker thread.
    maxsize
        Jobs that may wait (not counting the running one).
    retry_after
        Seconds advertised in :class:`QueueFullError`.
    workers
        Worker threads taking jobs from the queue (1 for a local segmenter, which is not thread-safe;
        more for a segmenter that forwards each call to remote replicas, see :mod:`node.scaleout`).
    """

    def __init__(self, model: str, loader: Callable[[], Segmenter], maxsize: int = 8, retry_after: int = 5,
                 workers: int = 1) -> None:
        if maxsize < 1:
            raise ValueError(f"api.queue_size must be >= 1, got {maxsize}.")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}.")
        self.workers = workers
        self.model = model
        self._loader = loader
        self._segmenter: Segmenter | None = None
        # unbounded: ``maxsize`` is enforced for foreground jobs only (background jobs never take their places)
        self._queue: queue.PriorityQueue[tuple[int, int, Job[Any] | None]] = queue.PriorityQueue()
        self._foreground = 0
        #: Waiting foreground jobs admitted beyond ``maxsize`` (session clicks; see :meth:`submit`).
        self._uncounted: set[Job[Any]] = set()
        self._background: dict[str, Job[Any]] = {}
        self._seq = itertools.count()
        self.maxsize = maxsize
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._load_lock = threading.Lock()
        #: Running jobs, in start order.
        self._running: dict[str, Job[Any]] = {}
        self._counts = {DONE: 0, FAILED: 0, CANCELLED: 0, "rejected": 0}
        self._durations: deque[float] = deque(maxlen=50)
        self._load_error: str = ""

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if not self._threads:
                for n in range(self.workers):
                    name = f"inference-{self.model}" + (f"-{n}" if self.workers > 1 else "")
                    thread = threading.Thread(target=self._run, name=name, daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel waiting jobs and the running one (it stops after its current slice) and end the worker."""
        with self._lock:
            threads, self._threads = self._threads, []
            for running in self._running.values():
                running.cancel_requested.set()
        while True:
            try:
                _, _, job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._dequeued(job)
                self._finish_cancelled(job)
        for _ in threads:
            self._queue.put((-1, next(self._seq), None))
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- submitting -----------------------------------------------------------------------------

    def submit(self, fn: Callable[[Segmenter, JobContext], T], *, kind: str = "segment", user: str = "",
               priority: int = BATCH, counted: bool = True) -> Job[T]:
        """Queue ``fn(segmenter, context)``; returns the job (its ``future`` gives the result).

        ``counted=False`` admits the job beyond ``maxsize``: the caller bounds such jobs itself (a
        click of an interactive session: one at a time per session, sessions bounded by
        ``api.max_sessions``). ``maxsize`` protects memory (each one-shot job holds its series), not
        the click rate.

        Raises
        ------
        QueueFullError
            When ``maxsize`` counted jobs are already waiting.
        """
        self.start()
        job: Job[T] = Job(id=uuid.uuid4().hex, model=self.model, kind=kind, user=user, fn=fn, priority=priority)
        with self._lock:
            if priority < BACKGROUND:
                if counted and self._foreground_counted() >= self.maxsize:
                    self._counts["rejected"] += 1
                    raise QueueFullError(
                        f"The '{self.model}' queue is full ({self.maxsize} one-shot jobs waiting, "
                        f"api.queue_size); retry in "
                        f"{self.retry_after} s.", self.retry_after)
                self._foreground += 1
                if not counted:
                    self._uncounted.add(job)
        self._queue.put_nowait((priority, next(self._seq), job))
        return job

    def _foreground_counted(self) -> int:
        """Waiting foreground jobs that take one of ``maxsize``'s places (call with ``_lock`` held)."""
        return self._foreground - len(self._uncounted)

    def submit_background(self, key: str, fn: Callable[[Segmenter, JobContext], T], *, kind: str = "prefetch",
                          user: str = "") -> Job[T]:
        """Queue background work at :data:`BACKGROUND` priority; while a job with ``key`` waits, that job is returned.

        ``fn`` should poll ``context.should_yield()`` and return early when it is True (re-queueing
        what is left, e.g. by calling this method again).
        """
        with self._lock:
            waiting = self._background.get(key)
            if waiting is not None and waiting.state == QUEUED:
                return waiting
        job = self.submit(fn, kind=kind, user=user, priority=BACKGROUND)
        with self._lock:
            self._background[key] = job
        return job

    def foreground_waiting(self) -> int:
        """Interactive and batch jobs waiting (background ones yield to them)."""
        with self._lock:
            return self._foreground

    def _dequeued(self, job: Job[Any]) -> None:
        with self._lock:
            if job.priority < BACKGROUND:
                self._foreground -= 1
                self._uncounted.discard(job)
            else:
                for key, waiting in list(self._background.items()):
                    if waiting is job:
                        del self._background[key]

    def cancel(self, job: Job[Any]) -> bool:
        """Cancel a job: a waiting one is dropped, a running one stops at its next slice.

        Returns
        -------
        bool
            False when the job had already finished.
        """
        if job.state in (DONE, FAILED, CANCELLED):
            return False
        job.cancel_requested.set()
        if job.state == QUEUED and job.future.cancel():
            self._finish_cancelled(job)
        return True

    def warm_up(self) -> Future[None]:
        """Load the model on the worker thread now (instead of at the first request) and start its
        background work (LiteMedSAM: the encoder/decoder compile under ``ainode serve`` with
        ``encoder_backend = "compile"``)."""

        def warm(seg: Segmenter, ctx: JobContext) -> None:
            start = getattr(seg, "warm_up", None)
            if callable(start):
                start()

        return self.submit(warm, kind="warm-up").future

    # --- inspection -----------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._segmenter is not None

    @property
    def segmenter(self) -> Segmenter | None:
        """The loaded segmenter (for read-only metadata such as ``version``); never call it from here."""
        return self._segmenter

    def status(self) -> dict[str, Any]:
        """Queue depth, the running job and counters."""
        with self._lock:
            running = next(iter(self._running.values()), None)
            n_running = len(self._running)
            counts = dict(self._counts)
            durations = list(self._durations)
        seg = self._segmenter
        return {
            "model": self.model,
            "loaded": seg is not None,
            "device": getattr(seg, "device", None),
            "version": getattr(seg, "version", None),
            "backends": backends() if callable(backends := getattr(seg, "backends", None)) else None,
            "load_error": self._load_error or None,
            "available": not self._load_error,
            "queued": self._foreground,
            "background": self._queue.qsize() - self._foreground,
            "capacity": self.maxsize,
            "running": running.describe() if running is not None else None,
            "running_count": n_running,
            "workers": self.workers,
            "completed": counts[DONE],
            "failed": counts[FAILED],
            "cancelled": counts[CANCELLED],
            "rejected": counts["rejected"],
            "mean_run_seconds": round(sum(durations) / len(durations), 4) if durations else None,
        }

    # --- worker ---------------------------------------------------------------------------------

    def _finish_cancelled(self, job: Job[Any]) -> None:
        job.state = CANCELLED
        job.finished = time.time()
        if not job.future.done():
            job.future.set_exception(JobCancelledError(f"Job {job.id} was cancelled."))
        with self._lock:
            self._counts[CANCELLED] += 1

    def _load(self) -> Segmenter:
        with self._load_lock:
            if self._segmenter is None:
                try:
                    self._segmenter = self._loader()
                    self._load_error = ""
                except (ModelError, OSError, RuntimeError, ValueError) as exc:
                    self._load_error = str(exc)
                    raise ModelUnavailableError(f"Model '{self.model}' cannot be loaded: {exc}") from exc
                if after_model_load is not None:
                    after_model_load()
            return self._segmenter

    def _run(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            self._dequeued(job)
            if job.future.cancelled() or job.state == CANCELLED:
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            job.state = RUNNING
            job.started = time.time()
            with self._lock:
                self._running[job.id] = job
            try:
                if job.cancel_requested.is_set():
                    raise JobCancelledError(f"Job {job.id} was cancelled.")
                result = job.fn(self._load(), JobContext(job, self))
            except JobCancelledError as exc:
                job.state, job.error = CANCELLED, str(exc)
                job.future.set_exception(exc)
            except BaseException as exc:  # handed to the waiting request, which maps it to a status
                if _out_of_memory(exc):
                    logger.error("Job %s (%s on %s) ran out of memory: %s", job.id, job.kind, self.model, exc)
                    exc = ModelOutOfMemoryError(
                        f"Model '{self.model}' ran out of memory on this request ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); the node goes on serving; retry with a smaller series or region.")
                job.state, job.error = FAILED, str(exc)
                if not isinstance(exc, (NodeError, ValueError)):
                    logger.exception("Job %s (%s on %s) failed", job.id, job.kind, self.model)
                job.future.set_exception(exc)
            else:
                job.state = DONE
                job.future.set_result(result)
            job.finished = time.time()
            with self._lock:
                self._running.pop(job.id, None)
                key = job.state if job.state in self._counts else FAILED
                self._counts[key] += 1
                if job.state == DONE and job.priority < BACKGROUND:
                    self._durations.append(job.finished - (job.started or job.finished))


class InferencePool:
    """The node's inference queues, one per model, created on first use.

    Parameters
    ----------
    settings
        ``settings.api`` (queue size, Retry-After) and the model sections.
    loader
        ``loader(name, settings)`` returns a segmenter; default :func:`models.registry.load_segmenter`.
    """

    def __init__(self, settings: Settings,
                 loader: Callable[[str, Settings], Segmenter] | None = None) -> None:
        self.settings = settings
        if loader is None:
            from models.registry import load_segmenter

            loader = load_segmenter
        self._loader = loader
        self._queues: dict[str, InferenceQueue] = {}
        self._jobs: OrderedDict[str, Job[Any]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def model_names() -> list[str]:
        from models.registry import available_models

        return available_models()

    def resolve_name(self, name: str | None) -> str:
        """Normalise a requested model name (empty = the configured default).

        Raises
        ------
        UnknownModelError
            When the name is not a known model.
        """
        key = (name or self.settings.model.default).strip().lower()
        known = self.model_names()
        if key not in known:
            raise UnknownModelError(f"model '{name}' is unknown; known models: {', '.join(known)}.")
        return key

    def queue(self, name: str | None = None) -> InferenceQueue:
        """The queue of model ``name`` (created and started on first use).

        Raises
        ------
        UnknownModelError
            When the name is not a known model.
        """
        key = self.resolve_name(name)
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = InferenceQueue(key, lambda: self._loader(key, self.settings),
                                   maxsize=self.settings.api.queue_size,
                                   retry_after=self.settings.api.retry_after_seconds)
                q.start()
                self._queues[key] = q
            return q

    def submit(self, model: str | None, fn: Callable[[Segmenter, JobContext], T], *, kind: str = "segment",
               user: str = "", priority: int = BATCH, counted: bool = True) -> Job[T]:
        """Queue ``fn`` on the model's queue and remember the job for :meth:`job` (``counted``: see
        :meth:`InferenceQueue.submit`).

        Raises
        ------
        UnknownModelError, QueueFullError
        """
        job = self.queue(model).submit(fn, kind=kind, user=user, priority=priority, counted=counted)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > _KEEP_FINISHED:
                oldest_id, oldest = next(iter(self._jobs.items()))
                if oldest.state in (QUEUED, RUNNING):
                    break
                self._jobs.pop(oldest_id)
        return job

    def submit_background(self, model: str | None, key: str, fn: Callable[[Segmenter, JobContext], T], *,
                          kind: str = "prefetch") -> Job[T]:
        """Queue background work (see :meth:`InferenceQueue.submit_background`); not listed by :meth:`job`."""
        return self.queue(model).submit_background(key, fn, kind=kind)

    def job(self, job_id: str) -> Job[Any] | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> bool | None:
        """Cancel a job by id; None when unknown, False when it had already finished."""
        job = self.job(job_id)
        if job is None:
            return None
        return self._queues[job.model].cancel(job)

    def status(self) -> dict[str, Any]:
        with self._lock:
            queues = list(self._queues.values())
        return {q.model: q.status() for q in queues}

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            queues = list(self._queues.values())
        for q in queues:
            q.stop(timeout)


#: Modalities that are never images to segment (no pre-encoding when such a series becomes stable).
_NOT_IMAGES = frozenset({"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "REG", "DOC",
                         "ECG", "AU", "PLAN", "FID"})


class Preencoder:
    """Schedules background pre-encoding of series (LiteMedSAM slice embeddings) on the inference queue.

    Called when a series becomes stable (:meth:`on_series_stable`), is pulled, or a session opens
    (:meth:`schedule`). The work runs at :data:`BACKGROUND` priority, the most-likely-needed slices
    first (around the slice the viewer shows, else the middle), stops at the next slice when an
    interactive or batch job arrives and is re-queued behind it with the slices left.

    Parameters
    ----------
    pool
        The node's inference queues.
    settings
        Node settings (``litemedsam.preencode``, ``model.default``).
    load
        ``load(series_instance_uid)`` returns the loaded series from the store, or None.
    """

    def __init__(self, pool: InferencePool, settings: Settings,
                 load: Callable[[str], Any | None] | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self._load = load
        # stable / pulled series whose pre-encoding waits, oldest first (bounded by litemedsam.preencode_backlog)
        self._pending: OrderedDict[str, Job[Any]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.litemedsam.preencode)

    def schedule(self, series: Any, *, model: str | None = None, around: int | None = None,
                 to_memory: bool = True, order: list[int] | None = None) -> Job[Any] | None:
        """Queue pre-encoding of a loaded :class:`dicom_io.series.Series` (held until the job ran).

        ``to_memory``: keep the embeddings in the model's memory cache too (a session is open on it).
        Returns None when pre-encoding is off or the model is not LiteMedSAM.
        """
        name = (model or self.settings.model.default).strip().lower()
        if not self.enabled or name != "litemedsam":
            return None
        key = f"{series.series_instance_uid}:{tuple(series.voxels.shape)}"

        def run(seg: Segmenter, ctx: JobContext) -> Any:
            return self._run(seg, ctx, series, around, order, to_memory,
                             lambda rest: self.schedule(series, model=name, to_memory=to_memory, order=rest))

        return self.pool.submit_background(name, key, run)

    def schedule_uid(self, series_instance_uid: str, *, to_memory: bool = False,
                     order: list[int] | None = None) -> Job[Any] | None:
        """Queue pre-encoding of a stored series by UID: it is loaded (``load``) only when the job runs.

        So many series becoming stable at once never hold their voxels in memory while they wait.
        """
        name = self.settings.model.default.strip().lower()
        backlog = self.settings.litemedsam.preencode_backlog
        if not self.enabled or self._load is None or name != "litemedsam" or backlog <= 0:
            return None
        load = self._load

        def run(seg: Segmenter, ctx: JobContext) -> Any:
            with self._lock:
                wanted = self._pending.get(series_instance_uid) is ctx.job
                if wanted:
                    del self._pending[series_instance_uid]
            if not wanted:  # skipped: newer series arrived while it waited
                return None
            if ctx.job.cancel_requested.is_set():
                return None
            if ctx.should_yield():  # something else waits: come back after it
                return self.schedule_uid(series_instance_uid, to_memory=to_memory, order=order)
            try:
                series = load(series_instance_uid)
            except Exception as exc:  # a series that cannot be loaded is reported where it is used
                logger.info("Series %s is not pre-encoded: %s", series_instance_uid, exc)
                return None
            if series is None:
                return None
            return self._run(seg, ctx, series, None, order, to_memory,
                             lambda rest: self.schedule_uid(series_instance_uid, to_memory=to_memory, order=rest))

        job = self.pool.submit_background(name, series_instance_uid, run)
        with self._lock:
            self._pending[series_instance_uid] = job
            self._pending.move_to_end(series_instance_uid)
            while len(self._pending) > backlog:
                old, _ = self._pending.popitem(last=False)
                logger.info("Pre-encoding of series %s skipped: %d newer series wait (litemedsam.preencode_backlog)",
                            old, backlog)
        return job

    @staticmethod
    def _run(seg: Segmenter, ctx: JobContext, series: Any, around: int | None, order: list[int] | None,
             to_memory: bool, resume: Callable[[list[int]], Any]) -> Any:
        from node.pipeline import image_volume

        prefetch = getattr(seg, "prefetch", None)
        if prefetch is None:
            return None
        t0 = time.perf_counter()
        result = prefetch(image_volume(series), order=order, around=around, should_stop=ctx.should_yield,
                          to_memory=to_memory)
        if result.remaining and not ctx.job.cancel_requested.is_set():
            logger.debug("Pre-encoding of %s yields after %.2f s; %d slice(s) left", series.series_instance_uid,
                         time.perf_counter() - t0, len(result.remaining))
            try:
                resume(result.remaining)
            except NodeError as exc:
                logger.warning("Pre-encoding of %s cannot be resumed: %s", series.series_instance_uid, exc)
        return result

    def on_series_stable(self, event: Any) -> None:
        """A :data:`node.events.SeriesCallback`: pre-encode an image series that became stable."""
        if str(event.modality or "").upper() in _NOT_IMAGES:
            return
        self.schedule_uid(event.series_instance_uid)


__all__ = [
    "BACKGROUND", "BATCH", "CANCELLED", "DONE", "FAILED", "INTERACTIVE", "QUEUED", "RUNNING", "InferencePool",
    "InferenceQueue", "Job", "JobCancelledError",
    "JobContext", "ModelOutOfMemoryError", "Preencoder", "ModelUnavailableError", "QueueFullError", "UnknownModelError",
]
