"""The series the API works on: from an in-memory cache, the store, or pulled from an archive."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from config.settings import Settings
from dicom_io.errors import DicomInputError
from dicom_io.series import Series, load_series
from dicom_io.store import Store
from node.api.errors import ApiError, bad
from node.api.parsing import SeriesRef
from node.api.pulls import Pulls


class SeriesSource:
    """Loads series by reference, keeping the last ``api.series_cache`` of them in memory.

    ``on_pulled``: called with the UID of a series just pulled and loaded (the pre-encoder's hook).
    """

    def __init__(self, settings: Settings, store: Store, pulls: Pulls) -> None:
        self.settings = settings
        self.store = store
        self.pulls = pulls
        self.on_pulled: Callable[[str], object] | None = None
        self._series: OrderedDict[tuple[str, int], Series] = OrderedDict()
        self._series_lock = threading.Lock()

    def load_series_blocking(self, ref: SeriesRef, where: str = "series") -> Series:
        """The loaded series (from the in-memory cache, the store, or pulled from its archive).

        Raises
        ------
        ApiError
            404 unknown series, 422 series that cannot be assembled, 502 archive failures.
        """
        rec = self.store.get_series(ref.series_instance_uid)
        pulled = False
        unfinished = self.pulls.unfinished(ref)
        if unfinished is not None:  # a pull that was cut short (crash, archive failure): resume it
            ref = unfinished
        if rec is None or rec.num_instances == 0 or unfinished is not None:
            if not ref.archive and not self.pulls.has_archive():
                raise ApiError(404, f"{where}.series_instance_uid: series {ref.series_instance_uid} is not stored "
                                    "on the node (give an archive to pull it from).", f"{where}.series_instance_uid")
            self.pulls.pull(ref, where)
            pulled = True
            rec = self.store.get_series(ref.series_instance_uid)
        if rec is None or rec.num_instances == 0:
            raise ApiError(404, f"{where}.series_instance_uid: series {ref.series_instance_uid} is not stored on "
                                "the node.", f"{where}.series_instance_uid")
        if ref.study_instance_uid and rec.study_instance_uid and ref.study_instance_uid != rec.study_instance_uid:
            raise bad(f"{where}.study_instance_uid", f"series {ref.series_instance_uid} belongs to study "
                                                     f"{rec.study_instance_uid}, not {ref.study_instance_uid}.")
        key = (ref.series_instance_uid, rec.num_instances)
        with self._series_lock:
            hit = self._series.get(key)
            if hit is not None:
                self._series.move_to_end(key)
                return hit
        paths = self.store.series_paths(ref.series_instance_uid)
        try:
            series = load_series(paths, series_uid=ref.series_instance_uid,
                                 spacing_tolerance=self.settings.input.spacing_tolerance)
        except DicomInputError as exc:
            raise ApiError(422, f"{where}: series {ref.series_instance_uid} cannot be used: {exc}", where) from exc
        self.cache_series(series, rec.num_instances)
        if pulled and self.on_pulled is not None:
            self.on_pulled(ref.series_instance_uid)
        return series

    def cache_series(self, series: Series, n_instances: int) -> None:
        with self._series_lock:
            self._series[(series.series_instance_uid, n_instances)] = series
            while len(self._series) > max(1, self.settings.api.series_cache):
                self._series.popitem(last=False)

    async def load_series(self, ref: SeriesRef, where: str = "series") -> Series:
        return await run_in_threadpool(self.load_series_blocking, ref, where)


__all__ = ["SeriesSource"]
