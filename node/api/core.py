"""What every REST flavour shares: errors, series resolution, queued inference, result files and delivery."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import reprlib
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from config.settings import ApiSettings, Settings
from dicom_io.errors import DicomInputError
from dicom_io.seg import SegmentSpec, stack_masks
from dicom_io.series import Series, load_series
from dicom_io.store import Store, is_valid_uid
from models.base import BoxPrompt, Mode, PointPrompt, PromptError, Prompts, SegmentationResult, Segmenter
from node.destinations import lookup
from node.errors import ConfigError, NodeError
from node.inference import BATCH, INTERACTIVE, InferencePool, Job, JobContext, Preencoder
from node.pipeline import image_volume, safe_name
from node.results import Written, queue_result, write_outputs
from node.sessions import SessionStore

logger = logging.getLogger(__name__)


#: Characters of user input quoted in an error message or a log line; a longer value is cut (docs/security.md).
ECHO_CHARS = 200
#: Longest error message answered or logged; a longer one keeps its start and end (the limit it names).
MESSAGE_CHARS = 1000

_ECHO = reprlib.Repr()
_ECHO.maxstring = ECHO_CHARS
_ECHO.maxother = ECHO_CHARS
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3
_ECHO.maxlong = 60


def echo(value: Any) -> str:
    """``repr(value)`` for an error message or a log line, at most about :data:`ECHO_CHARS` characters.

    A long string says how long it was; containers show their first items only, nested ones a few
    levels deep. So a 100 MB "UID" costs a 200-character message, not a 100 MB log line.
    """
    if isinstance(value, str) and len(value) > ECHO_CHARS:
        return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS + 20 else text[:ECHO_CHARS] + "..."


def shorten(message: str, limit: int = MESSAGE_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, keeping its start and its end."""
    if len(message) <= limit:
        return message
    tail = limit // 4
    return f"{message[:limit - tail]} ... [{len(message) - limit} characters cut] ... {message[-tail:]}"


class ApiError(NodeError):
    """A request the API refuses: HTTP ``status``, the offending ``field`` and a message naming the problem.

    The message is cut to :data:`MESSAGE_CHARS` (a backstop: handlers quote user input with :func:`echo`).
    """

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(shorten(message))
        self.status = status
        self.field = field
        self.headers = dict(headers or {})


def bad(field: str, message: str, status: int = 422) -> ApiError:
    """A validation error about ``field`` (its name is put in front of the message)."""
    return ApiError(status, f"{field}: {message}", field)


# --------------------------------------------------------------------------------------- request parsing

# A JSON string (escapes included), written as an unrolled loop so the regex engine never backtracks.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not count).

    Linear in the length of ``text`` and without recursion, so it can run before :func:`json.loads`
    (whose C scanner recurses once per level and fails with ``RecursionError`` on deep input).
    """
    outside = _JSON_STRING.sub("", text).encode("utf-8", "replace")
    if not outside:
        return 0
    codes = np.frombuffer(outside, dtype=np.uint8)
    steps = (codes == ord("[")).astype(np.int32) + (codes == ord("{"))
    steps -= (codes == ord("]")).astype(np.int32) + (codes == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


def loads_json(text: str | bytes, where: str, max_depth: int) -> Any:
    """Parse JSON from a client, refusing nesting deeper than ``max_depth`` before parsing it.

    Raises
    ------
    ApiError
        400 naming ``where``: not UTF-8, nested deeper than ``api.max_json_depth``, malformed.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}).", where) from exc
    depth = json_depth(text)
    if depth > max_depth:
        raise ApiError(400, f"{where}: JSON nested {depth} levels deep, more than api.max_json_depth "
                            f"({max_depth}); refused before parsing.", where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{where}: malformed JSON ({exc.msg}: line {exc.lineno} column {exc.colno}).",
                       where) from exc
    except RecursionError as exc:  # pragma: no cover - json_depth refuses such input first
        raise ApiError(400, f"{where}: JSON nested too deeply.", where) from exc


async def json_body(request: Request, max_bytes: int, max_depth: int = 32) -> dict[str, Any]:
    """The request's JSON object, read up to ``max_bytes`` (``api.max_json_bytes``) and parsed depth-first checked.

    Raises
    ------
    ApiError
        400 for malformed JSON, nesting deeper than ``max_depth`` or a body that is not an object; 413
        when the body passes ``max_bytes`` (counted as it streams).
    """
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"body: {length} bytes exceed api.max_json_bytes ({max_bytes}).", "body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"body: more than api.max_json_bytes ({max_bytes}) bytes of JSON.", "body")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    data = loads_json(body, "body", max_depth)
    if not isinstance(data, dict):
        raise ApiError(400, f"body: a JSON object is required, got {type(data).__name__}.", "body")
    return data


def check_counts(points: int, boxes: int, limits: ApiSettings | None, where: str, polylines: int = 0) -> None:
    """Refuse more prompts than the limits allow, before any of them is used.

    Raises
    ------
    ApiError
        422 naming the limit (``api.max_points``, ``api.max_boxes``, ``api.max_polylines``).
    """
    limits = limits or ApiSettings()
    for n, limit, name, what in ((points, limits.max_points, "max_points", "points"),
                                 (boxes, limits.max_boxes, "max_boxes", "boxes"),
                                 (polylines, limits.max_polylines, "max_polylines", "polylines")):
        if n > limit:
            raise bad(where, f"{n} {what}, more than api.{name} ({limit}) allows in one request.")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise bad(where, f"{echo(value)} is not a finite number.")
    return float(value)


def _vector(value: Any, n: int, where: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise bad(where, f"expected a list of {n} numbers, got {echo(value)}.")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _slice_index(value: float, where: str) -> int:
    k = int(round(value))
    if abs(value - k) > 1e-6:
        raise bad(where, f"slice index {value:g} is not an integer.")
    return k


def _flag(item: Mapping[str, Any], where: str) -> bool:
    value = item.get("positive", True)
    if not isinstance(value, bool):
        raise bad(f"{where}.positive", f"{echo(value)} is not true or false.")
    return value


def parse_prompts(data: Any, series: Series, where: str = "prompts", validate: bool = True,
                  limits: ApiSettings | None = None) -> Prompts:
    """Parse native prompts and check them against the series.

    ``{"points": [{"ijk": [i, j, k]} | {"lps": [X, Y, Z]}, ...], "boxes": [{"ijk": [[i0, j0, k], [i1, j1, k]]}
    | {"lps": [[X0, Y0, Z0], [X1, Y1, Z1]]}, ...]}``; each item may carry ``"positive": false``. ``i`` is the
    column, ``j`` the row and ``k`` the 0-based slice in the series sorted along its normal; ``lps`` are
    DICOM patient coordinates in mm, snapped to the nearest slice.

    ``limits`` (``settings.api``; default: the defaults) bound the number of points and boxes; they are
    counted before any is parsed.

    Raises
    ------
    ApiError
        422 naming the prompt: wrong shape, not on a slice, outside the volume, empty box, no positive prompt;
        422 naming the limit: more points or boxes than ``api.max_points`` / ``api.max_boxes``.
    """
    from node.prompts import _to_slice

    if data is None:
        raise bad(where, "at least one positive point or box is required (give 'points' and/or 'boxes').")
    if not isinstance(data, Mapping):
        raise bad(where, f"an object with 'points' and/or 'boxes' is required, got {type(data).__name__}.")
    unknown = sorted(set(data) - {"points", "boxes"})
    if unknown:
        raise bad(where, f"unknown key(s) {unknown}; use 'points' and 'boxes'.")
    geo = series.geometry
    points: list[PointPrompt] = []
    boxes: list[BoxPrompt] = []
    raw_points = data.get("points") or []
    raw_boxes = data.get("boxes") or []
    if not isinstance(raw_points, list):
        raise bad(f"{where}.points", "a list is required.")
    if not isinstance(raw_boxes, list):
        raise bad(f"{where}.boxes", "a list is required.")
    check_counts(len(raw_points), len(raw_boxes), limits, where)
    for n, item in enumerate(raw_points):
        w = f"{where}.points[{n}]"
        if not isinstance(item, Mapping):
            raise bad(w, "an object with 'ijk' or 'lps' is required.")
        pos = _flag(item, w)
        try:
            if "ijk" in item:
                i, j, kf = _vector(item["ijk"], 3, f"{w}.ijk")
                points.append(PointPrompt(i, j, _slice_index(kf, f"{w}.ijk[2]"), pos))
            elif "lps" in item:
                x, y, k = _to_slice(geo, _vector(item["lps"], 3, f"{w}.lps"), "point")
                points.append(PointPrompt(x, y, k, pos))
            else:
                raise bad(w, "give 'ijk' (voxel column, row, slice) or 'lps' (patient mm).")
        except PromptError as exc:
            raise bad(w, str(exc)) from exc
    for n, item in enumerate(raw_boxes):
        w = f"{where}.boxes[{n}]"
        if not isinstance(item, Mapping):
            raise bad(w, "an object with 'ijk' or 'lps' is required.")
        pos = _flag(item, w)
        key = "ijk" if "ijk" in item else "lps" if "lps" in item else None
        if key is None:
            raise bad(w, "give 'ijk' ([[i0, j0, k], [i1, j1, k]]) or 'lps' (two corners in patient mm).")
        corners = item[key]
        if not isinstance(corners, (list, tuple)) or len(corners) != 2:
            raise bad(f"{w}.{key}", f"two corners are required, got {echo(corners)}.")
        a = _vector(corners[0], 3, f"{w}.{key}[0]")
        b = _vector(corners[1], 3, f"{w}.{key}[1]")
        try:
            if key == "ijk":
                ka, kb = _slice_index(a[2], f"{w}.ijk[0][2]"), _slice_index(b[2], f"{w}.ijk[1][2]")
                xa, ya, xb, yb = a[0], a[1], b[0], b[1]
            else:
                xa, ya, ka = _to_slice(geo, a, "box corner 1")
                xb, yb, kb = _to_slice(geo, b, "box corner 2")
        except PromptError as exc:
            raise bad(w, str(exc)) from exc
        if ka != kb:
            raise bad(w, f"the corners lie on different slices ({ka} and {kb}); a box is drawn on one slice.")
        boxes.append(BoxPrompt(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb), ka, pos))
    prompts = Prompts(points=tuple(points), boxes=tuple(boxes))
    if validate:
        check_prompts(prompts, series, where, limits)
    elif not prompts:
        raise bad(where, "at least one point or box is required.")
    return prompts


def check_prompts(prompts: Prompts, series: Series, where: str = "prompts", limits: ApiSettings | None = None) -> None:
    """Validate prompts against the series shape and the prompt limits.

    A box may reach beyond the image (it is clipped to it, as a box dragged past the edge of a viewer's
    image), but no farther than the image's own width and height: a corner beyond that is no drawing.

    Raises
    ------
    ApiError
        422 with the model layer's message (which names the prompt); 422 naming the limit
        (``api.max_points``, ``api.max_boxes``); 422 for a box corner far outside the image.
    """
    check_counts(len(prompts.points), len(prompts.boxes), limits, where)
    _, rows, cols = series.voxels.shape
    for i, b in enumerate(prompts.boxes):
        if not (-cols <= b.x0 and b.x1 <= 2 * cols and -rows <= b.y0 and b.y1 <= 2 * rows):
            raise bad(where, f"box {i} ({b.x0:g},{b.y0:g},{b.x1:g},{b.y1:g}@{b.k}): a corner lies farther outside "
                             f"the slice (x 0..{cols - 1}, y 0..{rows - 1}) than the slice is wide or high.")
    try:
        prompts.validate(series.voxels.shape)
    except PromptError as exc:
        raise bad(where, str(exc)) from exc


def parse_mode(value: Any, default: Mode, where: str = "mode") -> Mode:
    if value is None:
        return default
    text = str(value).strip().lower()
    if text not in ("2d", "3d"):
        raise bad(where, f"{echo(value)} is not '2d' or '3d'.")
    return "2d" if text == "2d" else "3d"


def parse_segment(data: Any, settings: Settings, where: str = "segment") -> SegmentSpec:
    """A :class:`SegmentSpec` from ``{"label", "color", "category", "type"}`` over the configured defaults.

    Raises
    ------
    ApiError
        422 naming the invalid value.
    """
    data = data or {}
    if not isinstance(data, Mapping):
        raise bad(where, "an object with label, color, category, type is required.")
    unknown = sorted(set(data) - {"label", "color", "category", "type"})
    if unknown:
        raise bad(where, f"unknown key(s) {unknown}; use label, color, category, type.")
    for key, value in data.items():
        if not isinstance(value, str):
            raise bad(f"{where}.{key}", f"{echo(value)} is not a string.")
    d = settings.seg
    spec = SegmentSpec(label=data.get("label", d.label), color=data.get("color", d.color),
                       category=data.get("category", d.category), type=data.get("type", d.type))
    try:
        spec.validate()
    except ValueError as exc:
        text = str(exc)
        key = ("color" if "colour" in text.lower() else "label" if "label" in text.lower()
               else "category" if spec.category in text else "type")
        raise bad(f"{where}.{key}", text) from exc
    return spec


@dataclass(frozen=True)
class SeriesRef:
    """A series to work on: stored by UID, or on a named archive (pulled when the node lacks it)."""

    series_instance_uid: str
    study_instance_uid: str = ""
    archive: str = ""


def parse_series_ref(data: Any, where: str = "series") -> SeriesRef:
    """``{"series_instance_uid", "study_instance_uid"?, "archive"?}`` (or just the UID as a string).

    Raises
    ------
    ApiError
        422 naming the missing or malformed field.
    """
    from dicom_io.store import is_valid_uid

    if isinstance(data, str):
        data = {"series_instance_uid": data}
    if not isinstance(data, Mapping):
        raise bad(where, "an object with series_instance_uid (and optionally study_instance_uid, archive) "
                         "is required.")
    unknown = sorted(set(data) - {"series_instance_uid", "study_instance_uid", "archive"})
    if unknown:
        raise bad(where, f"unknown key(s) {unknown}; use series_instance_uid, study_instance_uid, archive.")
    uid = data.get("series_instance_uid")
    if not isinstance(uid, str) or not is_valid_uid(uid):
        raise bad(f"{where}.series_instance_uid", f"{echo(uid)} is not a valid UID.")
    study = data.get("study_instance_uid") or ""
    if study and (not isinstance(study, str) or not is_valid_uid(study)):
        raise bad(f"{where}.study_instance_uid", f"{echo(study)} is not a valid UID.")
    archive = data.get("archive") or ""
    if not isinstance(archive, str):
        raise bad(f"{where}.archive", f"{echo(archive)} is not a destination name.")
    return SeriesRef(uid, study, archive)


# --------------------------------------------------------------------------------------- results


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


# --------------------------------------------------------------------------------------- context


@dataclass
class Inferred:
    """What one queued model call returned, with the time it waited and ran."""

    result: SegmentationResult
    model: str
    version: str
    queue_seconds: float
    run_seconds: float


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
        self._series: OrderedDict[tuple[str, int], Series] = OrderedDict()
        self._series_lock = threading.Lock()
        self._results: OrderedDict[str, ResultRecord] = OrderedDict()
        self._results_lock = threading.Lock()
        self._origins: Any = None
        self.started = time.time()
        self.requests = 0
        #: Background pre-encoding (LiteMedSAM embeddings) of stable, pulled and opened series.
        self.preencoder = Preencoder(inference, settings, lambda uid: self.load_series_blocking(SeriesRef(uid)))
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

    # --- series -------------------------------------------------------------------------------

    def archive_name(self) -> str:
        """The DICOMweb archive MONAI Label image ids are resolved through.

        Raises
        ------
        ApiError
            503 when no ``dicomweb`` destination is configured.
        """
        if self.settings.api.archive:
            return self.settings.api.archive
        for name, dest in self.settings.destinations.items():
            if dest.kind == "dicomweb":
                return name
        raise ApiError(404, "image: the series is not stored on the node and no DICOMweb archive is configured "
                            "(set api.archive or a [destinations.NAME] with kind = \"dicomweb\").", "image")

    def _pull(self, ref: SeriesRef, where: str) -> None:
        from dicom_io.dicomweb import DicomwebError, first_value
        from node.archives import destination, open_dicomweb, pull_dicomweb

        archive = ref.archive or self.archive_name()
        try:
            dest = destination(archive, self.settings)
        except ConfigError as exc:
            raise bad(f"{where}.archive", str(exc)) from exc
        if dest.kind != "dicomweb":
            raise bad(f"{where}.archive", f"destination '{archive}' is of kind '{dest.kind}'; only dicomweb "
                                          "archives can be pulled from by UID.")
        study = ref.study_instance_uid
        t0 = time.perf_counter()
        try:
            if not study:
                with open_dicomweb(archive, self.settings) as client:
                    found = client.search_for_series(search_filters={"SeriesInstanceUID": ref.series_instance_uid},
                                                     fields=["StudyInstanceUID"])
                if not found:
                    raise ApiError(404, f"{where}: series {ref.series_instance_uid} is neither stored on the node "
                                        f"nor found on archive '{archive}'.", where)
                study = str(first_value(found[0], "0020000D") or "")
                if not study:
                    raise ApiError(502, f"{where}: archive '{archive}' found series {ref.series_instance_uid} but "
                                        "did not return its StudyInstanceUID.", where)
            marker = self._pull_marker(ref.series_instance_uid)
            _write_durably(marker, json.dumps({"archive": archive, "study_instance_uid": study}))
            result = pull_dicomweb(self.settings, self.store, archive, study, ref.series_instance_uid,
                                   origins=self.origins)
            if not result.error:
                marker.unlink(missing_ok=True)
        except DicomwebError as exc:
            raise ApiError(502, f"{where}: archive '{archive}' failed: {exc}", where) from exc
        except ConfigError as exc:
            raise bad(f"{where}.archive", str(exc)) from exc
        except ValueError as exc:
            raise bad(where, str(exc)) from exc
        if result.error:  # the series is incomplete: the marker stays, the next request resumes the pull
            raise ApiError(502, f"{where}: pulling series {ref.series_instance_uid} from '{archive}' failed "
                                f"({result.held} instance(s) held, retrying resumes the pull): {result.error}", where)
        if not result.held:
            raise ApiError(404, f"{where}: series {ref.series_instance_uid} was not found on archive '{archive}'.",
                           where)
        logger.info("Pulled series %s from %s for the API in %.2f s", ref.series_instance_uid, archive,
                    time.perf_counter() - t0)

    def load_series_blocking(self, ref: SeriesRef, where: str = "series") -> Series:
        """The loaded series (from the in-memory cache, the store, or pulled from its archive).

        Raises
        ------
        ApiError
            404 unknown series, 422 series that cannot be assembled, 502 archive failures.
        """
        rec = self.store.get_series(ref.series_instance_uid)
        pulled = False
        unfinished = self._unfinished_pull(ref)
        if unfinished is not None:  # a pull that was cut short (crash, archive failure): resume it
            ref = unfinished
        if rec is None or rec.num_instances == 0 or unfinished is not None:
            if not ref.archive and not self._has_archive():
                raise ApiError(404, f"{where}.series_instance_uid: series {ref.series_instance_uid} is not stored "
                                    "on the node (give an archive to pull it from).", f"{where}.series_instance_uid")
            self._pull(ref, where)
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
        if pulled:
            self.preencoder.schedule_uid(ref.series_instance_uid)
        return series

    def _pull_marker(self, series_instance_uid: str) -> Path:
        """``<data_dir>/pulls/<series>.json``: present from the start of a pull until it completes."""
        return self.settings.data_path / "pulls" / f"{series_instance_uid}.json"

    def _unfinished_pull(self, ref: SeriesRef) -> SeriesRef | None:
        """``ref`` completed with the archive and study of a pull of it that never finished, else None."""
        if not is_valid_uid(ref.series_instance_uid):
            return None
        try:
            data = json.loads(self._pull_marker(ref.series_instance_uid).read_text())
        except (OSError, ValueError):
            return None
        return SeriesRef(ref.series_instance_uid, ref.study_instance_uid or str(data.get("study_instance_uid") or ""),
                         ref.archive or str(data.get("archive") or ""))

    def _has_archive(self) -> bool:
        return bool(self.settings.api.archive) or any(
            d.kind == "dicomweb" for d in self.settings.destinations.values())

    def cache_series(self, series: Series, n_instances: int) -> None:
        with self._series_lock:
            self._series[(series.series_instance_uid, n_instances)] = series
            while len(self._series) > max(1, self.settings.api.series_cache):
                self._series.popitem(last=False)

    async def load_series(self, ref: SeriesRef, where: str = "series") -> Series:
        return await run_in_threadpool(self.load_series_blocking, ref, where)

    # --- inference ----------------------------------------------------------------------------

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

    # --- results ------------------------------------------------------------------------------

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

    # --- delivery -----------------------------------------------------------------------------

    def destinations_for(self, value: Any, series: Series, where: str = "destinations") -> list[str]:
        """Validated destination names; default: where the series came from (or ``deliver_to``).

        Raises
        ------
        ApiError
            422 naming an unknown destination.
        """
        if value is None:
            from node.archives import result_destinations

            return result_destinations(self.settings, series.series_instance_uid, self.origins, self.store)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(where, f"a list of destination names is required, got {echo(value)}.")
        out: list[str] = []
        for n, name in enumerate(value):
            if name not in self.settings.destinations:
                known = ", ".join(sorted(self.settings.destinations)) or "none configured"
                raise bad(f"{where}[{n}]", f"destination {echo(name)} is not configured (known: {known}).")
            try:
                lookup(name, self.settings)
            except ConfigError as exc:
                raise bad(f"{where}[{n}]", str(exc)) from exc
            if name not in out:
                out.append(name)
        return out

    def refuses_labelmap(self, destination: str) -> bool:
        """True when ``destination`` is known to refuse Label Map SEGs (remembered by the outbox)."""
        return self.outbox is not None and bool(self.outbox.refuses_labelmap(destination))

    def deliver_blocking(self, seg_path: Path, destinations: Sequence[str],
                         binary_path: Path | None = None) -> dict[str, dict[str, Any]]:
        """Put a SEG into the store and queue it in the persisted outbox for each destination.

        Every result leaves the node this way (C-STORE, STOW-RS, XNAT alike): the outbox row is
        committed before this returns, and ``ainode serve``'s outbox worker delivers it with retries
        and backoff across restarts. Without destinations the node's own store is where the result
        is delivered (its DICOMweb server and viewer show it), so it is marked delivered at once
        (retention may then age it out). An app built without an outbox (embedded, tests) sends
        nothing: each destination is reported ``not queued``.

        ``binary_path``: a BINARY copy of a Label Map SEG ``seg_path`` (see :func:`node.results.plan_seg`);
        it goes to destinations set to ``binary`` or known to refuse label maps, and is the fallback of
        those set to ``auto``.

        Returns
        -------
        dict
            The delivery state per destination (``pending`` or ``not queued``).
        """
        put = self.store.put_file(seg_path, kind="result")
        if not destinations:
            self.store.mark_delivered(put.sop_instance_uid)
            return {}
        if self.outbox is None:
            return {name: {"state": "not queued", "detail": "the node runs without an outbox"}
                    for name in destinations}
        queue_result(self.outbox, self.settings, put.sop_instance_uid, put.path, destinations, binary_path)
        return {name: {"state": "pending"} for name in destinations}

    def delivery_state(self, sop_instance_uid: str | None, destinations: Sequence[str]) -> dict[str, Any]:
        """Current delivery state of a result per destination."""
        out: dict[str, Any] = {}
        if not sop_instance_uid:
            return out
        for name in destinations:
            entry = self.outbox.entry(sop_instance_uid, name) if self.outbox is not None else None
            if entry is None:
                out[name] = {"state": "not queued"}
            else:
                out[name] = {"state": entry.state, "attempts": entry.attempts,
                             "detail": entry.last_error or None}
        return out

    # --- uploads ------------------------------------------------------------------------------

    def upload_dir(self) -> Path:
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="up-", dir=self.uploads_dir))

    def load_upload_blocking(self, folder: Path, where: str) -> Series:
        """Load a series from uploaded files (DICOM files, a zip of them, or one NIfTI volume).

        Raises
        ------
        ApiError
            422 when the files are not one usable series.
        """
        files = [p for p in folder.rglob("*") if p.is_file()]
        niftis = [p for p in files if p.name.endswith((".nii", ".nii.gz"))]
        try:
            if niftis and len(files) == 1:
                return series_from_nifti(niftis[0], self.settings.input.max_zip_bytes)
            zips = [p for p in files if p.name.lower().endswith(".zip")]
            inputs: list[Path] = zips + ([folder] if len(zips) < len(files) else [])
            return load_series(inputs, spacing_tolerance=self.settings.input.spacing_tolerance,
                               max_zip_bytes=self.settings.input.max_zip_bytes,
                               max_zip_members=self.settings.input.max_zip_members,
                               max_zip_ratio=self.settings.input.max_zip_ratio)
        except (DicomInputError, ValueError, OSError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise ApiError(422, f"{where}: the uploaded files are not one usable image series: {exc}", where) from exc


async def _disconnected(request: Request) -> None:
    """Return when the client of ``request`` has disconnected (its body must have been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _write_durably(path: Path, text: str) -> None:
    """Write ``path`` atomically and fsync it (and its folder) before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def series_from_nifti(path: Path, max_bytes: int = 0) -> Series:
    """A :class:`Series` over a NIfTI volume (no DICOM sources: NIfTI results only, no SEG).

    Raises
    ------
    ValueError
        When the file is not a readable 3-D NIfTI image, or declares more than ``max_bytes`` of image data.
    """
    from dicom_io.geometry import LPS_TO_RAS, Geometry
    from dicom_io.nifti import read_nifti

    array, affine_ras = read_nifti(path, max_bytes=max_bytes)
    geometry = Geometry(affine=LPS_TO_RAS @ affine_ras, shape=(int(array.shape[0]), int(array.shape[1]),
                                                               int(array.shape[2])))
    uid = "2.25." + str(uuid.uuid4().int)
    return Series(voxels=np.asarray(array, dtype=np.float32), geometry=geometry, series_instance_uid=uid,
                  study_instance_uid=uid, frame_of_reference_uid="", modality="OT", source_datasets=[],
                  frame_refs=[])


def user_of(request: Request) -> str:
    """The authenticated user (``anonymous`` when authentication is off)."""
    return str(request.scope.get("ainode.user") or "anonymous")


__all__ = [
    "ApiContext", "ApiError", "Inferred", "ResultRecord", "SeriesRef", "Written", "bad", "check_prompts",
    "json_body", "parse_mode", "parse_prompts", "parse_segment", "parse_series_ref", "series_from_nifti",
    "user_of", "write_outputs",
]
