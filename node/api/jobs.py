"""Inference submission for the API: queued model calls, awaited without blocking the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from config.settings import Settings
from dicom_io.series import Series
from models.base import Mode, PromptError, Prompts, SegmentationResult, Segmenter
from node.api.errors import ApiError, bad, echo
from node.inference import BATCH, INTERACTIVE, InferencePool, Job, JobContext
from node.pipeline import image_volume

logger = logging.getLogger(__name__)


@dataclass
class Inferred:
    """What one queued model call returned, with the time it waited and ran."""

    result: SegmentationResult
    model: str
    version: str
    queue_seconds: float
    run_seconds: float


class Jobs:
    """Queues model calls on the inference pool and waits for them (``api.job_timeout_seconds``)."""

    def __init__(self, settings: Settings, inference: InferencePool) -> None:
        self.settings = settings
        self.inference = inference

    def model_name(self, name: Any, where: str = "model") -> str:
        from node.inference import UnknownModelError

        if name is not None and not isinstance(name, str):
            raise bad(where, f"{echo(name)} is not a model name.")
        try:
            return self.inference.resolve_name(name)
        except UnknownModelError as exc:
            raise bad(where, str(exc)) from exc

    def submit(self, model: str, series: Series, prompts: Prompts, mode: Mode, user: str,
               kind: str = "segment", priority: int = BATCH, *, counted: bool = True,
               on_start: Callable[[], None] | None = None) -> Job[Inferred]:
        """Queue one model call on the series (its model-facing volume is built on the worker).

        ``counted``: the job takes one of the queue's ``api.queue_size`` places (False for a click of
        an open session, see :meth:`infer`). ``on_start`` runs on the worker when the job starts.
        """
        submitted = time.time()

        def run(seg: Segmenter, ctx: JobContext) -> Inferred:
            if on_start is not None:
                on_start()
            started = time.time()
            t = time.perf_counter()
            result = seg.segment(image_volume(series), prompts, mode=mode, progress=ctx.progress)
            return Inferred(result, seg.name, seg.version, started - submitted, time.perf_counter() - t)

        return self.inference.submit(model, run, kind=kind, user=user, priority=priority, counted=counted)

    async def wait(self, job: Job[Any], request: Request | None = None) -> Any:
        """Await a job without blocking the event loop.

        With ``request``, the job is cancelled when its client disconnects: a queued job is dropped, a
        running one stops at its next slice (the model's progress callback), and nothing is answered.

        Raises
        ------
        ApiError
            504 when ``api.job_timeout_seconds`` pass first (the job keeps running); 499 when the client
            went away (the job was cancelled; the answer reaches no one).
        """
        future = asyncio.ensure_future(asyncio.shield(asyncio.wrap_future(job.future)))
        gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
        try:
            done, _ = await asyncio.wait({future} | ({gone} if gone else set()),
                                         timeout=self.settings.api.job_timeout_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if gone is not None:
                gone.cancel()
        if future not in done:
            future.cancel()
            if gone is not None and gone in done:
                self.inference.cancel(job.id)
                logger.info("Job %s cancelled: its client disconnected", job.id)
                raise ApiError(499, f"job {job.id} was cancelled: the client disconnected.", "job")
            raise ApiError(504, f"job {job.id} did not finish within api.job_timeout_seconds "
                                f"({self.settings.api.job_timeout_seconds:g} s); see GET /v1/jobs/{job.id}.", "job")
        try:
            return future.result()
        except PromptError:
            raise
        except ValueError as exc:  # the model refused the image (e.g. a volume it cannot read)
            raise ApiError(422, f"image: {exc}", "image") from exc

    async def infer(self, model: str, series: Series, prompts: Prompts, mode: Mode, user: str,
                    kind: str = "segment", priority: int = INTERACTIVE, *, request: Request | None = None,
                    session: Any | None = None) -> Inferred:
        """Run one interactive model call and wait for it (see :meth:`wait`).

        ``session``: the call is a click of this open session, made under its lock. It does not take
        one of ``api.queue_size``'s places: a session has one call at a time and its series is in memory
        already, so ``api.max_sessions`` bounds such calls, and N users clicking get slower answers, not
        503. ``request``: the call is cancelled when the client disconnects.
        """
        job = self.submit(model, series, prompts, mode, user, kind, priority, counted=session is None)
        inferred: Inferred = await self.wait(job, request)
        return inferred


async def _disconnected(request: Request) -> None:
    """Return when the client of ``request`` has disconnected (its body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return



__all__ = ["Inferred", "Jobs"]
