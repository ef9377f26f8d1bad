"""Records of the API's segmentation results: what ``GET /v1/segmentations/{id}`` answers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import Settings
from dicom_io.seg import SegmentSpec, stack_masks
from dicom_io.series import Series
from node.api.errors import ApiError
from node.pipeline import safe_name
from node.results import write_outputs


@dataclass
class ResultRecord:
    """A finished (or running) segmentation: what ``GET /v1/segmentations/{id}`` answers."""

    id: str
    user: str
    state: str
    series_instance_uid: str
    study_instance_uid: str
    model: str
    mode: str
    label: str
    dir: Path
    voxel_count: int | None = None
    volume_ml: float | None = None
    slices: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    nifti: str | None = None
    seg: str | None = None
    seg_sop_instance_uid: str | None = None
    seg_series_instance_uid: str | None = None
    destinations: list[str] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    #: Labels of the result's segments (segment numbers 1..n in this order).
    segments: list[str] = field(default_factory=list)
    #: ``binary`` or ``labelmap``: the form of ``seg``.
    seg_format: str | None = None
    #: A BINARY copy of a label-map ``seg`` for destinations that need it.
    seg_binary: str | None = None

    def to_json(self) -> dict[str, Any]:
        base = f"/v1/segmentations/{self.id}"
        links: dict[str, str] = {"self": base}
        if self.nifti:
            links["nifti"] = base + "/nifti"
        if self.seg:
            links["seg"] = base + "/seg"
        return {
            "id": self.id, "state": self.state, "series_instance_uid": self.series_instance_uid,
            "study_instance_uid": self.study_instance_uid, "model": self.model, "mode": self.mode,
            "label": self.label, "voxel_count": self.voxel_count,
            "volume_ml": None if self.volume_ml is None else round(self.volume_ml, 4),
            "slices": self.slices, "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "seg_sop_instance_uid": self.seg_sop_instance_uid,
            "seg_series_instance_uid": self.seg_series_instance_uid,
            "segments": self.segments or [self.label], "seg_format": self.seg_format,
            "links": links, "error": self.error, "created": self.created,
        }

    def save(self) -> None:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "result.json.partial"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / "result.json")

    @classmethod
    def load(cls, path: Path) -> ResultRecord:
        data = json.loads(path.read_text())
        data["dir"] = Path(data["dir"])
        return cls(**data)


class ResultRecords:
    """The results of this node's API: the last 512 in memory, every one in ``<results_dir>/<id>/result.json``.

    ``refuses_labelmap``: whether a destination is known to refuse Label Map SEGs (see :mod:`node.api.delivery`).
    """

    def __init__(self, settings: Settings, results_dir: Path, refuses_labelmap: Callable[[str], bool]) -> None:
        self.settings = settings
        self.results_dir = results_dir
        self.refuses_labelmap = refuses_labelmap
        self._results: OrderedDict[str, ResultRecord] = OrderedDict()
        self._results_lock = threading.Lock()

    def new_result(self, user: str, series: Series, model: str, mode: str, label: str,
                   result_id: str | None = None) -> ResultRecord:
        rid = result_id or uuid.uuid4().hex
        rec = ResultRecord(id=rid, user=user, state="queued", series_instance_uid=series.series_instance_uid,
                           study_instance_uid=series.study_instance_uid, model=model, mode=mode, label=label,
                           dir=self.results_dir / rid)
        with self._results_lock:
            self._results[rid] = rec
            while len(self._results) > 512:
                self._results.popitem(last=False)
        return rec

    def result(self, result_id: str, user: str) -> ResultRecord:
        """A result by id (from memory, else from its ``result.json``).

        Raises
        ------
        ApiError
            404 when unknown (or another user's).
        """
        with self._results_lock:
            rec = self._results.get(result_id)
        if rec is None and all(c in "0123456789abcdef" for c in result_id) and len(result_id) == 32:
            path = self.results_dir / result_id / "result.json"
            if path.exists():
                rec = ResultRecord.load(path)
        if rec is None or (rec.user != user and self.settings.api.tokens):
            raise ApiError(404, f"id: segmentation '{result_id}' does not exist.", "id")
        return rec

    def finish_result(self, rec: ResultRecord, series: Series, mask: np.ndarray | Sequence[np.ndarray],
                      segment: SegmentSpec | Sequence[SegmentSpec], model: str, version: str, outputs: Sequence[str],
                      timings: dict[str, float]) -> ResultRecord:
        """Write the result files and record the outcome (blocking).

        ``mask``/``segment``: one segment, or (segments, slices, rows, columns) and one spec per segment.
        """
        specs = [segment] if isinstance(segment, SegmentSpec) else list(segment)
        name = safe_name(f"{series.series_instance_uid}_{specs[0].label}")
        written = write_outputs(series, mask, specs, self.settings, model, version, rec.dir, name, outputs,
                                destinations=rec.destinations, refuses_labelmap=self.refuses_labelmap)
        union = stack_masks(mask).any(axis=0)
        voxels = int(union.sum())
        rec.voxel_count = voxels
        rec.volume_ml = voxels * series.geometry.voxel_volume_ml
        rec.slices = [int(k) for k in np.flatnonzero(np.any(union, axis=(1, 2)))]
        rec.segments = [s.label for s in specs]
        rec.seg_format = written.seg_format
        rec.seg_binary = str(written.seg_binary) if written.seg_binary else None
        rec.timings = {**timings, **written.timings}
        rec.nifti = str(written.nifti) if written.nifti else None
        rec.seg = str(written.seg) if written.seg else None
        rec.seg_sop_instance_uid = written.seg_sop_instance_uid
        rec.seg_series_instance_uid = written.seg_series_instance_uid
        rec.state = "done"
        rec.save()
        return rec


__all__ = ["ResultRecord", "ResultRecords"]
