"""What every REST flavour shares: ``ApiContext``, the facade over the API's parts.

Each concept has its own module: errors (:mod:`node.api.errors`), request parsing (:mod:`node.api.parsing`),
pulls and their resume markers (:mod:`node.api.pulls`), the series source and its cache
(:mod:`node.api.series_source`), inference submission (:mod:`node.api.jobs`), result records
(:mod:`node.api.result_records`), delivery (:mod:`node.api.delivery`) and uploads (:mod:`node.api.uploads`).
Their public names stay importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request

from config.settings import Settings
from dicom_io.seg import SegmentSpec
from dicom_io.series import Series
from dicom_io.store import Store
from models.base import Mode, Prompts
from node.api.delivery import Delivery
from node.api.errors import ECHO_CHARS, MESSAGE_CHARS, ApiError, bad, echo, shorten
from node.api.jobs import Inferred, Jobs
from node.api.parsing import (
    SeriesRef,
    check_counts,
    check_prompts,
    json_body,
    json_depth,
    loads_json,
    parse_mode,
    parse_prompts,
    parse_segment,
    parse_series_ref,
    user_of,
)
from node.api.pulls import Pulls
from node.api.result_records import ResultRecord, ResultRecords
from node.api.series_source import SeriesSource
from node.api.uploads import Uploads, series_from_nifti
from node.inference import BATCH, INTERACTIVE, InferencePool, Job, Preencoder
from node.results import OUTPUTS, Written, write_outputs
from node.sessions import SessionStore


class ApiContext:
    """Everything the handlers share; built once per application.

    Parameters
    ----------
    settings
        Node settings (``settings.api`` in particular).
    store
        The node's store (series are read from it; pulled series and SEG results go into it).
    inference
        The inference queues.
    sessions
        Interactive sessions.
    outbox
        The persisted outbox results are queued in (``None``: results are not delivered).
    """

    def __init__(self, settings: Settings, store: Store, inference: InferencePool, sessions: SessionStore,
                 outbox: Any | None = None) -> None:
        self.settings = settings
        self.store = store
        self.inference = inference
        self.sessions = sessions
        self.outbox = outbox
        self.results_dir = settings.data_path / "results"
        self.uploads_dir = settings.data_path / "uploads"
        self._origins: Any = None
        self.started = time.time()
        self.requests = 0
        self.pulls = Pulls(settings, store, lambda: self.origins)
        self.series = SeriesSource(settings, store, self.pulls)
        self.jobs = Jobs(settings, inference)
        self.delivery = Delivery(settings, store, outbox, lambda: self.origins)
        self.result_records = ResultRecords(settings, self.results_dir, self.delivery.refuses_labelmap)
        self.uploads = Uploads(settings, self.uploads_dir)
        #: Background pre-encoding (LiteMedSAM embeddings) of stable, pulled and opened series.
        self.preencoder = Preencoder(inference, settings, lambda uid: self.load_series_blocking(SeriesRef(uid)))
        self.series.on_pulled = self.preencoder.schedule_uid
        sessions.on_open = lambda session: self.preencoder.schedule(session.series, model=session.model)

    # --- origins ------------------------------------------------------------------------------

    @property
    def origins(self) -> Any:
        if self._origins is None:
            from node.archives import Origins

            self._origins = Origins.for_settings(self.settings)
        return self._origins

    def close(self) -> None:
        """Stop the inference workers (after their running job), close sessions and the origins index."""
        self.inference.stop()
        if self._origins is not None:
            self._origins.close()
            self._origins = None
        self.sessions.close_all()

    # --- series (node.api.series_source, node.api.pulls) ------------------------------------------

    def archive_name(self) -> str:
        return self.pulls.archive_name()

    def _has_archive(self) -> bool:
        return self.pulls.has_archive()

    def load_series_blocking(self, ref: SeriesRef, where: str = "series") -> Series:
        return self.series.load_series_blocking(ref, where)

    def cache_series(self, series: Series, n_instances: int) -> None:
        self.series.cache_series(series, n_instances)

    async def load_series(self, ref: SeriesRef, where: str = "series") -> Series:
        return await self.series.load_series(ref, where)

    # --- inference (node.api.jobs) ------------------------------------------------------------

    def model_name(self, name: Any, where: str = "model") -> str:
        return self.jobs.model_name(name, where)

    def submit(self, model: str, series: Series, prompts: Prompts, mode: Mode, user: str,
               kind: str = "segment", priority: int = BATCH, *, counted: bool = True,
               on_start: Callable[[], None] | None = None) -> Job[Inferred]:
        return self.jobs.submit(model, series, prompts, mode, user, kind, priority, counted=counted,
                                on_start=on_start)

    async def wait(self, job: Job[Any], request: Request | None = None) -> Any:
        return await self.jobs.wait(job, request)

    async def infer(self, model: str, series: Series, prompts: Prompts, mode: Mode, user: str,
                    kind: str = "segment", priority: int = INTERACTIVE, *, request: Request | None = None,
                    session: Any | None = None) -> Inferred:
        return await self.jobs.infer(model, series, prompts, mode, user, kind, priority, request=request,
                                     session=session)

    # --- results (node.api.result_records) ----------------------------------------------------

    def new_result(self, user: str, series: Series, model: str, mode: str, label: str,
                   result_id: str | None = None) -> ResultRecord:
        return self.result_records.new_result(user, series, model, mode, label, result_id)

    def result(self, result_id: str, user: str) -> ResultRecord:
        return self.result_records.result(result_id, user)

    def finish_result(self, rec: ResultRecord, series: Series, mask: np.ndarray | Sequence[np.ndarray],
                      segment: SegmentSpec | Sequence[SegmentSpec], model: str, version: str, outputs: Sequence[str],
                      timings: dict[str, float]) -> ResultRecord:
        return self.result_records.finish_result(rec, series, mask, segment, model, version, outputs, timings)

    # --- delivery (node.api.delivery) ---------------------------------------------------------

    def destinations_for(self, value: Any, series: Series, where: str = "destinations") -> list[str]:
        return self.delivery.destinations_for(value, series, where)

    def refuses_labelmap(self, destination: str) -> bool:
        return self.delivery.refuses_labelmap(destination)

    def deliver_blocking(self, seg_path: Path, destinations: Sequence[str],
                         binary_path: Path | None = None) -> dict[str, dict[str, Any]]:
        return self.delivery.deliver_blocking(seg_path, destinations, binary_path)

    def delivery_state(self, sop_instance_uid: str | None, destinations: Sequence[str]) -> dict[str, Any]:
        return self.delivery.delivery_state(sop_instance_uid, destinations)

    # --- uploads (node.api.uploads) -----------------------------------------------------------

    def upload_dir(self) -> Path:
        return self.uploads.upload_dir()

    def load_upload_blocking(self, folder: Path, where: str) -> Series:
        return self.uploads.load_upload_blocking(folder, where)


__all__ = [
    "ECHO_CHARS", "INTERACTIVE", "MESSAGE_CHARS", "OUTPUTS", "ApiContext", "ApiError", "Inferred", "ResultRecord",
    "SeriesRef", "Written", "bad", "check_counts", "check_prompts", "echo", "json_body", "json_depth", "loads_json",
    "parse_mode", "parse_prompts", "parse_segment", "parse_series_ref", "series_from_nifti", "shorten", "user_of",
    "write_outputs",
]
