"""Request parsing: JSON bodies, prompts, modes, segment descriptions and series references."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request

from config.settings import ApiSettings, Settings
from dicom_io.seg import SegmentSpec
from dicom_io.series import Series
from models.base import BoxPrompt, Mode, PointPrompt, PromptError, Prompts
from node.api.errors import ApiError, bad, echo

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


def user_of(request: Request) -> str:
    """The authenticated user (``anonymous`` when authentication is off)."""
    return str(request.scope.get("ainode.user") or "anonymous")


__all__ = [
    "SeriesRef", "check_counts", "check_prompts", "json_body", "json_depth", "loads_json", "parse_mode",
    "parse_prompts", "parse_segment", "parse_series_ref", "user_of",
]
