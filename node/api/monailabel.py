"""MONAI Label server compatibility: /info/, /infer/{model} (incl. OHIF-AI's streamed meta+seg), /session/."""

from __future__ import annotations

import gzip
import json
import logging
import secrets
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from config.settings import ApiSettings
from dicom_io.geometry import Geometry
from dicom_io.seg import SegmentSpec
from dicom_io.series import Series
from models.base import BoxPrompt, Mode, PointPrompt, Prompts
from node import __version__
from node.api.core import (
    ApiContext,
    ApiError,
    SeriesRef,
    bad,
    check_counts,
    check_prompts,
    echo,
    loads_json,
    user_of,
    write_outputs,
)
from node.pipeline import safe_name
from node.sessions import Session, Step

logger = logging.getLogger(__name__)

#: Model type MONAI Label clients treat as click/box driven (``deepgrow``: foreground/background points).
MODEL_TYPE = "deepgrow"
#: Result extensions MONAI Label writers accept.
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd")
#: What OHIF-AI's server answers to ``nninter: init`` / ``reset`` (a JSON string; the client ignores it).
NNINTER_REPLY = {"init": "/code/predictions/init.nii.gz", "reset": "/code/predictions/reset.nii.gz"}


@dataclass(frozen=True)
class ModelEntry:
    """A model as MONAI Label clients see it: our model name plus the dimension it works in."""

    name: str
    model: str
    mode: Mode
    description: str


def mime_type(name: str) -> str:
    """MONAI Label's ``get_mime_type``: ``mimetypes.guess_type`` else ``application/octet-stream``."""
    import mimetypes

    guessed = mimetypes.guess_type(name)[0]
    return guessed or "application/octet-stream"


def write_nrrd(mask: np.ndarray, geometry: Geometry, path: Path, dtype: str = "uint8", compress: bool = False) -> Path:
    """Write a (slices, rows, columns) label volume as NRRD (LPS space; first axis = column, fastest)."""
    arr = np.ascontiguousarray(mask.astype(dtype))
    a = geometry.affine
    dirs = " ".join("(" + ",".join(f"{v:.10g}" for v in a[:3, i]) + ")" for i in range(3))
    origin = "(" + ",".join(f"{v:.10g}" for v in a[:3, 3]) + ")"
    header = (
        "NRRD0004\n"
        f"type: {dtype}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {arr.shape[2]} {arr.shape[1]} {arr.shape[0]}\n"
        f"space directions: {dirs}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        f"encoding: {'gzip' if compress else 'raw'}\n"
        f"space origin: {origin}\n\n"
    )
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    path.write_bytes(header.encode("ascii") + (gzip.compress(data) if compress else data))
    return path


def multipart_form(fields: list[tuple[str, str | None, bytes, str]]) -> tuple[bytes, str]:
    """Encode parts like ``requests_toolbelt.MultipartEncoder`` (what MONAI Label answers with).

    ``fields`` are (name, filename or None, body, content type); returns (body, content type).
    """
    boundary = secrets.token_hex(16)
    out = bytearray()
    for name, filename, body, ctype in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode()
        out += body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _gzip_chunks(chunks: Iterator[bytes | memoryview], level: int) -> Iterator[bytes]:
    comp = zlib.compressobj(level=level, method=zlib.DEFLATED, wbits=16 + zlib.MAX_WBITS)
    for ch in chunks:
        out = comp.compress(ch)
        if out:
            yield out
    tail = comp.flush()
    if tail:
        yield tail


def stream_meta_seg(meta: Mapping[str, Any], mask: np.ndarray) -> StreamingResponse:
    """OHIF-AI's streamed answer: parts ``meta`` (double-encoded JSON) and ``seg`` (uint8 voxels), gzip per part."""
    boundary = f"monai-{secrets.token_hex(12)}"
    dash = b"--" + boundary.encode()
    crlf = b"\r\n"
    meta_headers = crlf.join([dash, b'Content-Disposition: form-data; name="meta"; filename="meta.json"',
                              b"Content-Type: application/json", b"Content-Encoding: gzip", b""]) + crlf
    seg_headers = crlf.join([dash, b'Content-Disposition: form-data; name="seg"; filename="seg.bin"',
                             b"Content-Type: application/octet-stream", b"Content-Encoding: gzip", b""]) + crlf
    # OHIF-AI's server passes a JSON string to its encoder, so the part holds a JSON-encoded string.
    meta_bytes = json.dumps(json.dumps(dict(meta))).encode()
    voxels = np.ascontiguousarray(mask.astype(np.uint8))
    view = voxels.data.cast("B")

    def chunks(step: int = 2 << 20) -> Iterator[memoryview]:
        for off in range(0, len(view), step):
            yield view[off:off + step]

    def gen() -> Iterator[bytes]:
        yield meta_headers
        yield from _gzip_chunks(iter([meta_bytes]), 6)
        yield crlf
        yield seg_headers
        yield from _gzip_chunks(chunks(), 1)
        yield crlf
        yield dash + b"--" + crlf

    return StreamingResponse(gen(), media_type=f"multipart/form-data; boundary={boundary}")


#: ``params`` keys that carry OHIF-AI prompts (echoed in the answer's ``prompt_info``, as its server does).
OHIF_AI_PROMPT_KEYS = ("pos_points", "neg_points", "pos_boxes", "neg_boxes", "pos_lassos", "neg_lassos",
                       "pos_scribbles", "neg_scribbles", "prompt_info")


def ohif_ai_meta(params: Mapping[str, Any], flipped: bool, elapsed: float) -> dict[str, str]:
    """The ``meta`` of an OHIF-AI answer, encoded as its server encodes it.

    Every field but ``label_name`` is a JSON-encoded string (the viewer calls ``meta.flipped.toLowerCase()``):
    ``{"prompt_info": "{...}", "flipped": "false", "nninter_elapsed": "0.41", "sam_elapsed": "null",
    "label_name": "nninter_pred_20251118103000"}``. ``nninter: false`` (SAM2 mode) fills ``sam_elapsed``
    instead. ``prompt_info`` echoes the prompt keys of ``params``.
    """
    sam = params.get("nninter") is False
    seconds = round(float(elapsed), 4)
    prompt_info = {k: params[k] for k in OHIF_AI_PROMPT_KEYS if k in params}
    return {
        "prompt_info": json.dumps(prompt_info),
        "flipped": json.dumps(bool(flipped)),
        "nninter_elapsed": json.dumps(None if sam else seconds),
        "sam_elapsed": json.dumps(seconds if sam else None),
        "label_name": f"{'sam2' if sam else 'nninter'}_pred_{time.strftime('%Y%m%d%H%M%S')}",
    }


def _is_flipped(series: Series) -> bool:
    """OHIF-AI's flip rule: InstanceNumber of the first sorted slice is larger than the second's."""
    src = series.source_datasets
    if len(src) < 2:
        return False
    try:
        return int(src[0].InstanceNumber) > int(src[1].InstanceNumber)
    except (AttributeError, TypeError, ValueError):
        return False


def _short(value: Any, limit: int = 200) -> str:
    """``repr`` of user input for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _xyz(value: Any, where: str) -> tuple[float, float, int]:
    if not isinstance(value, (list, tuple)) or len(value) < 3:
        raise bad(where, f"a point [x, y, z] is required, got {_short(value)}.")
    try:
        x, y, z = (float(v) for v in value[:3])
    except (TypeError, ValueError) as exc:
        raise bad(where, f"{_short(value)} holds a non-number.") from exc
    if not float(z).is_integer():
        raise bad(where, f"slice index z = {z:g} is not an integer.")
    return x, y, int(z)


def _list(params: Mapping[str, Any], key: str) -> list[Any]:
    value = params.get(key)
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = loads_json(value, f"params.{key}", ApiSettings().max_json_depth)
    if not isinstance(value, list):
        raise bad(f"params.{key}", f"a list is required, got {type(value).__name__}.")
    return value


#: Points a scribble becomes: spaced evenly along its length, both ends included.
SCRIBBLE_POINTS = 8
#: Most entries accepted in anandpreshob/OHIF-AI's ``prompt_info`` list.
MAX_PROMPT_INFO = 256


def _box_item(item: Any, where: str) -> tuple[float, float, float, float, int]:
    """A box as ``[[x0, y0, z], [x1, y1, z]]`` (OHIF-AI) or ``[x0, y0, x1, y1, z]`` (the fork's direct format)."""
    if isinstance(item, (list, tuple)) and len(item) == 5 and not any(isinstance(v, (list, tuple)) for v in item):
        try:
            x0, y0, x1, y1, z = (float(v) for v in item)
        except (TypeError, ValueError) as exc:
            raise bad(where, f"{_short(item)} holds a non-number.") from exc
        if not z.is_integer():
            raise bad(where, f"slice index z = {z:g} is not an integer.")
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), int(z)
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise bad(where, f"a box [[x0, y0, z], [x1, y1, z]] or [x0, y0, x1, y1, z] is required, got {_short(item)}.")
    x0, y0, z0 = _xyz(item[0], where + "[0]")
    x1, y1, z1 = _xyz(item[1], where + "[1]")
    if z0 != z1:
        raise bad(where, f"the corners lie on different slices ({z0} and {z1}); a box is drawn on one slice.")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), z0


def _polyline(item: Any, where: str, shape: tuple[int, int] | None) -> tuple[np.ndarray, int]:
    """Vertices (n, 2) as (x, y), clipped to the slice when ``shape`` (rows, columns) is known, and their slice."""
    if not isinstance(item, (list, tuple)) or not item:
        raise bad(where, f"a list of [x, y, z] points is required, got {_short(item)}.")
    pts = [_xyz(p, f"{where}[{m}]") for m, p in enumerate(item)]
    zs = sorted({p[2] for p in pts})
    if len(zs) != 1:
        raise bad(where, f"the points lie on several slices ({zs[:8]}); a lasso or scribble is drawn on one slice.")
    xy = np.array([(p[0], p[1]) for p in pts], dtype=np.float64)
    if not np.isfinite(xy).all():
        raise bad(where, "holds a coordinate that is not a finite number.")
    if shape is not None:
        rows, cols = shape
        inside = (xy[:, 0] >= -0.5) & (xy[:, 0] <= cols - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= rows - 0.5)
        if not inside.any():
            raise bad(where, f"every point lies outside the slice (x 0..{cols - 1}, y 0..{rows - 1}).")
        xy[:, 0] = np.clip(xy[:, 0], 0, cols - 1)
        xy[:, 1] = np.clip(xy[:, 1], 0, rows - 1)
    return xy, zs[0]


def resample_polyline(xy: np.ndarray, n: int = SCRIBBLE_POINTS) -> np.ndarray:
    """``n`` points spaced evenly by arc length along a polyline (both ends included; fewer for a short one).

    Parameters
    ----------
    xy
        Vertices (m, 2), m >= 1.
    n
        Most points returned.

    Returns
    -------
    ndarray
        (p, 2) points, 1 <= p <= n, without repeats.
    """
    seg = np.hypot(*np.diff(xy, axis=0).T) if len(xy) > 1 else np.zeros(0)
    length = float(seg.sum())
    if length < 1e-9:
        return xy[:1].copy()
    # about one point per pixel of length at most: a 3-pixel stroke gives 4 points, not 8 repeats
    count = max(2, min(n, int(length) + 1))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    at = np.linspace(0.0, length, count)
    out = np.stack([np.interp(at, cum, xy[:, 0]), np.interp(at, cum, xy[:, 1])], axis=1)
    _, first = np.unique(np.round(out, 3), axis=0, return_index=True)
    return out[np.sort(first)]


def _prompt_info(params: Mapping[str, Any], k_of: Callable[[int], int]) -> tuple[list[PointPrompt], list[BoxPrompt]]:
    """anandpreshob/OHIF-AI's ``prompt_info``: ``[{"type": "point"|"box", "data": {"pointType": "click"|"erase",
    "x", "y", "slice"[, "width", "height"]}}, ...]`` (a box is ``x, y`` .. ``x + width, y + height``)."""
    items = _list(params, "prompt_info")
    if len(items) > MAX_PROMPT_INFO:
        raise bad("params.prompt_info", f"{len(items)} entries exceed the limit of {MAX_PROMPT_INFO}.")
    points: list[PointPrompt] = []
    boxes: list[BoxPrompt] = []
    for n, item in enumerate(items):
        where = f"params.prompt_info[{n}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("data"), Mapping):
            raise bad(where, f'an object {{"type": "point"|"box", "data": {{...}}}} is required, got {_short(item)}.')
        kind, data = item.get("type"), item["data"]
        kind_text = _short(kind, 40)
        point_type = data.get("pointType", "click")
        if point_type not in ("click", "erase"):
            raise bad(f"{where}.data.pointType", f"{_short(point_type, 40)} is not 'click' (positive) or 'erase' "
                                                 "(negative).")
        positive = point_type == "click"
        keys = ("x", "y", "slice") if kind == "point" else ("x", "y", "width", "height", "slice")
        if kind not in ("point", "box"):
            raise bad(f"{where}.type", f"{kind_text} is not 'point' or 'box'.")
        values: dict[str, float] = {}
        for key in keys:
            v = data.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise bad(f"{where}.data.{key}", f"a number is required, got {_short(v, 40)}.")
            values[key] = float(v)
        if not values["slice"].is_integer():
            raise bad(f"{where}.data.slice", f"slice index {values['slice']:g} is not an integer.")
        k = k_of(int(values["slice"]))
        if kind == "point":
            points.append(PointPrompt(values["x"], values["y"], k, positive))
        else:
            x0, x1 = sorted((values["x"], values["x"] + values["width"]))
            y0, y1 = sorted((values["y"], values["y"] + values["height"]))
            boxes.append(BoxPrompt(x0, y0, x1, y1, k, positive))
    return points, boxes


def prompts_from_params(params: Mapping[str, Any], n_slices: int, flip: bool = False,
                        shape: tuple[int, int] | None = None, limits: ApiSettings | None = None) -> Prompts:
    """Prompts of a MONAI Label / OHIF-AI / AIAA ``params`` object, in our voxel order.

    Understood: ``foreground``/``background`` (DeepGrow, SAM2: ``[[x, y, z], ...]``), ``points`` +
    ``point_labels`` (VISTA3D), ``pos_points``/``neg_points`` and ``pos_boxes``/``neg_boxes``
    (``[[[x0, y0, z], [x1, y1, z]], ...]``, OHIF-AI, or ``[[x0, y0, x1, y1, z], ...]``, anandpreshob/OHIF-AI's
    direct format), ``prompt_info`` (anandpreshob/OHIF-AI's list of points and boxes), lassos and scribbles
    (below), ``roi`` (``[x0, y0, x1, y1, z0, z1]`` with ``slice``; MONAI Label SAM2) and extreme ``points``
    of DEXTR3D when ``point_labels`` is absent. With ``flip``, z counts from the other end of the volume
    (OHIF-AI's ``flipped``).

    Lassos and scribbles (``pos_lassos``, ``neg_lassos``, ``pos_scribbles``, ``neg_scribbles``: lists of
    polylines ``[[x, y, z], ...]`` on one slice, at most ``api.max_polylines`` in a request and
    ``api.max_polyline_points`` vertices each) become the prompt types every model takes:

    * a lasso (a closed outline, >= 3 vertices) becomes the box around it on its slice: positive, the
      object to segment; negative, the region whose mask is cleared;
    * a scribble becomes :data:`SCRIBBLE_POINTS` clicks spaced evenly along its length (both ends
      included; fewer on a stroke shorter than that many pixels): positive clicks mark the object,
      negative ones the background.

    With ``shape`` (rows, columns) the vertices are clipped to the slice first (a stroke that leaves the
    image keeps its part inside).

    ``limits`` (``settings.api``; default: the defaults) bound the points, boxes and polylines, counted
    before any is parsed.

    Raises
    ------
    ApiError
        422 naming the malformed key, or the limit (``api.max_points``, ``api.max_boxes``,
        ``api.max_polylines``, ``api.max_polyline_points``).
    """
    def k_of(z: int) -> int:
        return n_slices - 1 - z if flip else z

    limits = limits or ApiSettings()
    lines = [(key, item) for key in ("pos_lassos", "neg_lassos", "pos_scribbles", "neg_scribbles")
             for item in _list(params, key)]
    check_counts(sum(len(_list(params, key)) for key in ("foreground", "background", "pos_points", "neg_points",
                                                          "points")),
                 sum(len(_list(params, key)) for key in ("pos_boxes", "neg_boxes")), limits, "params",
                 polylines=len(lines))
    for key, item in lines:
        if isinstance(item, (list, tuple)) and len(item) > limits.max_polyline_points:
            raise bad(f"params.{key}", f"a polyline of {len(item)} points, more than api.max_polyline_points "
                                       f"({limits.max_polyline_points}) allows.")

    points: list[PointPrompt] = []
    boxes: list[BoxPrompt] = []
    for key, positive in (("foreground", True), ("background", False), ("pos_points", True),
                          ("neg_points", False)):
        for n, item in enumerate(_list(params, key)):
            x, y, z = _xyz(item, f"params.{key}[{n}]")
            points.append(PointPrompt(x, y, k_of(z), positive))
    labels = _list(params, "point_labels")
    if labels:
        pts = _list(params, "points")
        if len(pts) != len(labels):
            raise bad("params.point_labels", f"{len(labels)} labels for {len(pts)} points.")
        for n, (item, label) in enumerate(zip(pts, labels, strict=True)):
            x, y, z = _xyz(item, f"params.points[{n}]")
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise bad(f"params.point_labels[{n}]", f"{_short(label, 40)} is not 1 (foreground) or 0 (background).")
            points.append(PointPrompt(x, y, k_of(z), label > 0))
    for key, positive in (("pos_boxes", True), ("neg_boxes", False)):
        for n, item in enumerate(_list(params, key)):
            x0, y0, x1, y1, z = _box_item(item, f"params.{key}[{n}]")
            boxes.append(BoxPrompt(x0, y0, x1, y1, k_of(z), positive))
    info_points, info_boxes = _prompt_info(params, k_of)
    points.extend(info_points)
    boxes.extend(info_boxes)
    for key, positive in (("pos_lassos", True), ("neg_lassos", False), ("pos_scribbles", True),
                          ("neg_scribbles", False)):
        lines = _list(params, key)
        for n, item in enumerate(lines):
            where = f"params.{key}[{n}]"
            xy, z = _polyline(item, where, shape)
            k = k_of(z)
            if "lassos" in key:
                if len(xy) < 3:
                    raise bad(where, f"a lasso outlines an area: at least 3 points are required, got {len(xy)}.")
                (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
                if x1 - x0 < 1 or y1 - y0 < 1:
                    raise bad(where, f"the outline encloses no area (it spans {x1 - x0:g} x {y1 - y0:g} pixels).")
                boxes.append(BoxPrompt(float(x0), float(y0), float(x1), float(y1), k, positive))
            else:
                points.extend(PointPrompt(float(x), float(y), k, positive) for x, y in resample_polyline(xy))
    roi = _list(params, "roi")
    if roi:
        if len(roi) != 6:
            raise bad("params.roi", f"[x0, y0, x1, y1, z0, z1] is required, got {_short(roi)}.")
        try:
            x0, y0, x1, y1, z0, z1 = (float(v) for v in roi)
        except (TypeError, ValueError) as exc:
            raise bad("params.roi", f"{_short(roi)} holds a non-number.") from exc
        given = params.get("slice")
        k = int((z0 + z1) // 2) if given is None else given
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not float(k).is_integer():
            raise bad("params.slice", f"{_short(k, 40)} is not a slice index.")
        boxes.append(BoxPrompt(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1), k_of(int(k)), True))
    return Prompts(points=tuple(dict.fromkeys(points)), boxes=tuple(dict.fromkeys(boxes)))


def extreme_points_box(params: Mapping[str, Any], n_slices: int) -> Prompts:
    """DEXTR3D: a box around the extreme points on the slice in the middle of their z range."""
    pts = [_xyz(p, f"params.points[{n}]") for n, p in enumerate(_list(params, "points"))]
    if len(pts) < 2:
        raise bad("params.points", f"at least 2 extreme points are required (AIAA sends 6), got {len(pts)}.")
    xs, ys, zs = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    k = int(round((min(zs) + max(zs)) / 2))
    return Prompts(boxes=(BoxPrompt(min(xs), min(ys), max(xs), max(ys), k, True),))


class MonaiLabelApi:
    """MONAI Label's REST surface on top of the node's queues, sessions and store."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------------ models

    def entries(self) -> dict[str, ModelEntry]:
        """Model names offered to MONAI Label clients."""
        s = self.ctx.settings
        default = s.model.default
        out: dict[str, ModelEntry] = {}
        usable = [m for m in self.ctx.inference.model_names() if m != "sam2" or s.sam2.checkpoint]
        for m in usable:
            out[m] = ModelEntry(m, m, "3d", f"{m}: click/box prompted segmentation, 3D by slice propagation")
            out[f"{m}_2d"] = ModelEntry(f"{m}_2d", m, "2d", f"{m}: click/box prompted segmentation of one slice")
        out["sam_2d"] = ModelEntry("sam_2d", default, "2d", f"SAM-family 2D ({default})")
        out["sam_3d"] = ModelEntry("sam_3d", default, "3d", f"SAM-family 3D ({default})")
        # OHIF-AI posts every request to /infer/segmentation.
        out["segmentation"] = ModelEntry("segmentation", default, "3d", f"OHIF-AI interactive model ({default})")
        return out

    def entry(self, name: str) -> ModelEntry:
        e = self.entries().get(name)
        if e is None:
            raise ApiError(404, f"model: '{name}' is not a model of this server; known: "
                                f"{', '.join(self.entries())}.", "model")
        return e

    def labels(self) -> dict[str, int]:
        return {self.ctx.settings.seg.label: 1}

    async def info(self, request: Request) -> Response:
        models = {
            name: {"type": MODEL_TYPE, "labels": self.labels(), "dimension": 2 if e.mode == "2d" else 3,
                   "description": e.description, "config": {}}
            for name, e in self.entries().items()
        }
        return JSONResponse({
            "name": "ainode", "description": "PACS-side SAM-family segmentation node (MONAI Label compatible API)",
            "version": __version__, "labels": self.labels(), "models": models, "trainers": {}, "strategies": {},
            "scoring": {}, "train_stats": {}, "datastore": {"total": len(self.ctx.store.series()),
                                                           "completed": 0},
        })

    # ------------------------------------------------------------------ helpers

    async def read_form(self, request: Request) -> FormData:
        """The multipart (or urlencoded) form, refusing bodies larger than ``api.max_upload_bytes``."""
        limit = self.ctx.settings.api.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"body: {length} bytes exceed api.max_upload_bytes ({limit}).", "body")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return FormData()
        return await request.form(max_files=100000)

    async def parse_params(self, form: FormData) -> dict[str, Any]:
        """The ``params`` form field (a string, or a JSON file part as some clients send) as an object.

        Raises
        ------
        ApiError
            400 naming ``params`` when it is not a JSON object or nested deeper than ``api.max_json_depth``;
            413 when a file part passes ``api.max_json_bytes``.
        """
        api = self.ctx.settings.api
        raw = form.get("params")
        if raw is None:
            return {}
        if isinstance(raw, UploadFile):
            data = await raw.read(api.max_json_bytes + 1)
            if len(data) > api.max_json_bytes:
                raise ApiError(413, f"params: more than api.max_json_bytes ({api.max_json_bytes}) bytes.", "params")
            try:
                raw = data.decode()
            except UnicodeDecodeError as exc:
                raise ApiError(400, "params: not UTF-8 text.", "params") from exc
        text = raw.strip()
        if not text:
            return {}
        params = loads_json(text, "params", api.max_json_depth)
        if not isinstance(params, dict):
            raise ApiError(400, f"params: a JSON object is required, got {type(params).__name__}.", "params")
        return params

    async def save_uploads(self, files: list[UploadFile], where: str) -> Path:
        """Spool uploaded files into a fresh upload folder (names sanitised)."""
        folder = self.ctx.upload_dir()

        def copy() -> None:
            for n, up in enumerate(files):
                name = Path(up.filename or f"upload{n}").name or f"upload{n}"
                target = folder / f"{n:05d}_{safe_name(name)}"
                up.file.seek(0)
                with open(target, "wb") as fh:
                    shutil.copyfileobj(up.file, fh, 1 << 20)

        if not files:
            raise bad(where, "no file was uploaded.")
        await run_in_threadpool(copy)
        return folder

    async def image_series(self, request: Request, form: FormData, user: str,
                           params: Mapping[str, Any] | None = None) -> tuple[Series, Session | None]:
        """The image of an ``/infer`` request: ``session_id``, uploaded ``file``, or ``image`` (SeriesInstanceUID).

        Raises
        ------
        ApiError
            422 when none is given; 404 unknown series or session.
        """
        q = request.query_params
        session_id = q.get("session_id")
        if session_id:
            session = self.ctx.sessions.get(session_id, user)
            return session.series, session
        upload = form.get("file") or form.get("datapoint") or form.get("image")
        if isinstance(upload, UploadFile):
            folder = await self.save_uploads([upload], "file")
            try:
                series = await run_in_threadpool(self.ctx.load_upload_blocking, folder, "file")
            finally:
                # Like MONAI Label, an uploaded image is used for this request only.
                shutil.rmtree(folder, ignore_errors=True)
            return series, None
        image = q.get("image") or (form.get("image") if isinstance(form.get("image"), str) else None)
        if not image or image == "undefined":
            raise bad("image", "give image=<SeriesInstanceUID>, session_id=<id> or upload a file "
                               f"(got {_short(image)}).")
        if "/" in str(image):
            raise bad("image", f"'{image}' looks like an XNAT id (project/subject/experiment/scan); this node "
                               "resolves SeriesInstanceUIDs through its DICOMweb archive.")
        # OHIF-AI sends the study in params so the archive pull can skip the QIDO lookup.
        study = q.get("study") or str((params or {}).get("studyInstanceUID") or "")
        from dicom_io.store import is_valid_uid

        series = await self.ctx.load_series(SeriesRef(str(image), study if is_valid_uid(study) else ""), "image")
        return series, None

    # ------------------------------------------------------------------ /infer

    async def infer(self, request: Request) -> Response:
        return await self.run_infer(request, self.entry(request.path_params["model"]))

    async def run_infer(self, request: Request, entry: ModelEntry, *, aiaa: str | None = None) -> Response:
        form = await self.read_form(request)
        try:
            return await self._infer(request, form, entry, aiaa)
        finally:
            await form.close()

    async def _infer(self, request: Request, form: FormData, entry: ModelEntry, aiaa: str | None) -> Response:
        ctx = self.ctx
        user = user_of(request)
        output = request.query_params.get("output", "all").strip().lower()
        if output not in ("image", "json", "all", "dicom_seg"):
            raise bad("output", f"'{output[:40]}' is not one of image, json, all, dicom_seg.")
        params = await self.parse_params(form)
        t0 = time.perf_counter()
        nninter = params.get("nninter")
        ohif_ai = "nninter" in params
        series, upload_session = await self.image_series(request, form, user, params)
        t_load = time.perf_counter() - t0
        n = series.voxels.shape[0]
        flip = _is_flipped(series) if ohif_ai else False
        mode: Mode = entry.mode
        if ohif_ai and params.get("one"):
            mode = "2d"
        session = upload_session
        if ohif_ai:
            session = session or ctx.sessions.find(user, series.series_instance_uid, entry.model)
            if session is None:
                session = ctx.sessions.create(user, series, entry.model, mode=mode, flipped=flip,
                                              segment=SegmentSpec(label=ctx.settings.seg.label,
                                                                  color=ctx.settings.seg.color,
                                                                  category=ctx.settings.seg.category,
                                                                  type=ctx.settings.seg.type))
            if nninter in ("init", "reset"):
                if nninter == "reset":
                    # OHIF-AI's "New" (and a change of active segment): the next prompts are another segment;
                    # the one refined so far is kept, so a commit writes one SEG of all of them.
                    try:
                        session.next_segment()
                    except ValueError as exc:
                        raise ApiError(409, f"params.nninter: {exc}", "params") from exc
                # OHIF-AI's viewer (output=dicom_seg) checks the status only; its server answers a JSON string.
                # The deployment guide of anandpreshob/OHIF-AI (output=all, the default) shows {}.
                return JSONResponse(NNINTER_REPLY[str(nninter)] if output == "dicom_seg" else {})
        if aiaa == "dextr3d":
            prompts = extreme_points_box(params, n)
            mode = "3d"
        else:
            prompts = prompts_from_params(params, n, flip, shape=series.voxels.shape[1:], limits=ctx.settings.api)
        if not prompts:
            raise bad("params", "no prompt found: give foreground/background points, pos_points/neg_points, "
                                "pos_boxes/neg_boxes, pos_lassos/neg_lassos, pos_scribbles/neg_scribbles, "
                                "prompt_info, points+point_labels or roi.")
        if ohif_ai and session is not None:
            # OHIF-AI resends every prompt of the segment; the session remembers them (and the embeddings).
            check_prompts(prompts, series, "params", ctx.settings.api)
            async with session.lock:
                inferred = await ctx.infer(entry.model, series, prompts, mode, user, kind="ohif-ai",
                                           request=request, session=session)
                mask = np.asarray(inferred.result.mask, dtype=bool)
                session.push(Step(prompts, mask, int(mask.sum()), {}, dict(inferred.result.stats)))
        else:
            check_prompts(prompts, series, "params", ctx.settings.api)
            inferred = await ctx.infer(entry.model, series, prompts, mode, user, kind="monailabel", request=request)
            mask = np.asarray(inferred.result.mask, dtype=bool)
        label = _label_name(params, ctx.settings.seg.label)
        latencies = {"pre": round(t_load, 4), "infer": round(inferred.run_seconds, 4),
                     "queue": round(inferred.queue_seconds, 4), "invert": 0.0, "post": 0.0, "write": 0.0,
                     "total": round(time.perf_counter() - t0, 4)}
        result_json: dict[str, Any] = {
            "label_names": {label: 1}, "latencies": latencies, "model": entry.name,
            "voxel_count": int(mask.sum()), "volume_ml": round(int(mask.sum()) * series.geometry.voxel_volume_ml, 4),
            "slices": [int(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0]],
        }
        if ohif_ai and output in ("dicom_seg", "all"):
            meta = ohif_ai_meta(params, flip, inferred.run_seconds)
            if output == "dicom_seg":
                return stream_meta_seg(meta, mask)
            # anandpreshob/OHIF-AI: MONAI Label's multipart with the meta in `params` and a gzip'd NIfTI `image`.
            return await run_in_threadpool(self._fork_answer, series, mask, {**meta, **result_json})
        if output == "json":
            return JSONResponse(result_json)
        if output == "dicom_seg":
            return await self._dicom_seg(series, mask, label, params, inferred.model, inferred.version, upload_session)
        path = await run_in_threadpool(self._result_file, series, mask, params, label)
        try:
            data = await run_in_threadpool(path.read_bytes)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        if output == "image":
            return Response(data, media_type=mime_type(path.name),
                            headers={"Content-Disposition": f'attachment; filename="{path.name}"'})
        body, ctype = multipart_form([
            ("params", None, json.dumps(result_json).encode(), "application/json"),
            ("image", path.name, data, mime_type(path.name)),
        ])
        return Response(body, media_type=ctype)

    def _fork_answer(self, series: Series, mask: np.ndarray, meta: Mapping[str, Any]) -> Response:
        """anandpreshob/OHIF-AI's ``output=all`` answer: parts ``params`` (JSON) and ``image`` (gzip'd NIfTI).

        The fork's viewer reads the NIfTI's data as dims [Z, Y, X], Z fastest, ignoring the affine; the
        volume is written so (:func:`dicom_io.nifti.write_nifti` with ``axes="kyx"``), with the affine that
        maps those indices to the patient, so affine-respecting readers see the same voxels.
        """
        from dicom_io.nifti import write_nifti

        folder = self.ctx.upload_dir()
        try:
            name = f"{safe_name(str(meta.get('label_name') or 'prediction'))}.nii.gz"
            path = write_nifti(mask.astype(np.uint8), series.geometry, folder / name, dtype="uint8", axes="kyx")
            data = path.read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        body, ctype = multipart_form([
            ("params", None, json.dumps(dict(meta)).encode(), "application/json"),
            ("image", name, data, "application/gzip"),
        ])
        return Response(body, media_type=ctype)

    def _result_file(self, series: Series, mask: np.ndarray, params: Mapping[str, Any], label: str) -> Path:
        """Write the label file asked for by ``params`` into a fresh folder (the caller removes the folder)."""
        from dicom_io.nifti import write_nifti

        ext = str(params.get("result_extension") or ".nii.gz")
        if ext not in RESULT_EXTENSIONS:
            raise bad("params.result_extension", f"'{ext}' is not one of {', '.join(RESULT_EXTENSIONS)}.")
        dtype = str(params.get("result_dtype") or "uint8")
        if dtype not in ("uint8", "uint16"):
            raise bad("params.result_dtype", f"'{dtype}' is not uint8 or uint16.")
        compress = params.get("result_compress")
        folder = self.ctx.upload_dir()
        name = safe_name(f"{series.series_instance_uid}_{label}")
        if ext.endswith(".nrrd"):
            path = write_nrrd(mask, series.geometry, folder / f"{name}{ext}", dtype, bool(compress))
        else:
            if ext == ".nii.gz" and compress is False:
                ext = ".nii"
            path = write_nifti(mask.astype(dtype), series.geometry, folder / f"{name}{ext}", dtype=dtype)
        return path

    async def _dicom_seg(self, series: Series, mask: np.ndarray, label: str, params: Mapping[str, Any],
                         model: str, version: str, session: Session | None) -> Response:
        ctx = self.ctx
        if not series.source_datasets:
            raise bad("output", "dicom_seg needs a DICOM image; this one was uploaded as NIfTI.")
        if not mask.any():
            raise ApiError(422, "output: the result is empty; a DICOM SEG needs at least one segmented voxel.",
                           "output")
        s = ctx.settings.seg
        color = s.color
        info = params.get("label_info")
        if isinstance(info, list) and info and isinstance(info[0], Mapping) and info[0].get("color"):
            c = info[0]["color"]
            if isinstance(c, (list, tuple)) and len(c) >= 3:
                try:
                    color = "#" + "".join(f"{int(v) & 255:02x}" for v in c[:3])
                except (TypeError, ValueError, OverflowError) as exc:  # Infinity, NaN, a string, a list
                    raise bad("params.label_info", f"color {echo(c)} is not three numbers 0-255.") from exc
        spec = SegmentSpec(label=label, color=color, category=s.category, type=s.type)
        try:
            spec.validate()
        except ValueError as exc:
            raise bad("params.label_info", str(exc)) from exc
        specs, masks = [spec], [mask]
        if session is not None:
            # A session's results are one SEG: each label is a segment (a label answered again replaces its own).
            try:
                session.set_segment(spec, mask)
            except ValueError as exc:
                raise ApiError(409, f"session_id: {exc}", "session_id") from exc
            specs = [f.spec for f in session.finished if f.voxel_count]
            masks = [f.mask for f in session.finished if f.voxel_count]
        folder = ctx.upload_dir()
        try:
            archive = ctx.archive_name() if session is None and ctx._has_archive() else None
            written = await run_in_threadpool(
                partial(write_outputs, destinations=[archive] if archive else [],
                        refuses_labelmap=ctx.refuses_labelmap),
                series, np.stack(masks), specs, ctx.settings, model, version, folder,
                safe_name(f"{series.series_instance_uid}_{label}"), ["seg"])
            if written.seg is None:  # pragma: no cover - write_outputs writes what it is asked for
                raise RuntimeError("SEG was not written")
            data = await run_in_threadpool(written.seg.read_bytes)
            headers: dict[str, str] = {}
            if archive:
                # Like every result: into the store, then the persisted outbox delivers it (retried, once).
                states = await run_in_threadpool(ctx.deliver_blocking, written.seg, [archive], written.seg_binary)
                headers["X-Stored-To"] = f"{archive}: {states[archive]['state']}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return Response(data, media_type="application/dicom",
                        headers={**headers, "Content-Disposition": f'attachment; filename="{written.seg.name}"'})

    # ------------------------------------------------------------------ /session/

    async def put_session(self, request: Request) -> Response:
        ctx = self.ctx
        user = user_of(request)
        q = request.query_params
        expiry = q.get("expiry")
        ttl = None
        if expiry:
            try:
                if not expiry.isascii():  # float() would read other scripts' digits ("\u0663" = 3)
                    raise ValueError(expiry)
                ttl = float(expiry)
            except ValueError as exc:
                raise bad("expiry", f"{echo(expiry)} is not a number of seconds.") from exc
        form = await self.read_form(request)
        try:
            files = [f for key in ("files", "image", "file", "datapoint") for f in form.getlist(key)
                     if isinstance(f, UploadFile)]
            if not files:
                raise bad("files", "upload the image as multipart field 'files' (MONAI Label) or 'image' (AIAA).")
            folder = await self.save_uploads(files, "files")
            params = await self.parse_params(form)
        finally:
            await form.close()
        series = await run_in_threadpool(ctx.load_upload_blocking, folder, "files")
        session = ctx.sessions.create(user, series, ctx.inference.resolve_name(None), mode="3d", ttl=ttl,
                                      files_dir=folder, meta=params)
        return JSONResponse({"session_id": session.id, "session_info": _session_info(session)})

    async def get_session(self, request: Request) -> Response:
        touch = request.query_params.get("update_ts", "false").lower() in ("1", "true", "yes")
        session = self.ctx.sessions.get(request.path_params["id"], user_of(request), touch=touch)
        return JSONResponse(_session_info(session))

    async def delete_session(self, request: Request) -> Response:
        session = self.ctx.sessions.delete(request.path_params["id"], user_of(request))
        return JSONResponse(_session_info(session))

    # ------------------------------------------------------------------ small stubs clients probe

    async def auth_info(self, request: Request) -> Response:
        return JSONResponse({"enabled": bool(self.ctx.settings.api.tokens), "client_id": "", "realm": ""})

    async def datastore(self, request: Request) -> Response:
        return JSONResponse({"total": len(self.ctx.store.series()), "completed": 0, "label_tags": {},
                             "train": 0})

    async def image_info(self, request: Request) -> Response:
        # Empty: the XNAT viewer then uploads the image into a session, which is what we support.
        return JSONResponse({})

    def routes(self) -> list[Route]:
        return [
            Route("/info/", self.info, methods=["GET"]),
            Route("/info", self.info, methods=["GET"]),
            Route("/infer/{model}", self.infer, methods=["POST"]),
            Route("/session/", self.put_session, methods=["PUT"]),
            Route("/session", self.put_session, methods=["PUT"]),
            Route("/session/{id}", self.get_session, methods=["GET"]),
            Route("/session/{id}", self.delete_session, methods=["DELETE"]),
            Route("/auth/", self.auth_info, methods=["GET"]),
            Route("/datastore/", self.datastore, methods=["GET"]),
            Route("/datastore/image/info", self.image_info, methods=["GET"]),
            Route("/datastore/image/info/", self.image_info, methods=["GET"]),
        ]


def _label_name(params: Mapping[str, Any], default: str) -> str:
    info = params.get("label_info")
    if isinstance(info, list) and info and isinstance(info[0], Mapping) and isinstance(info[0].get("name"), str):
        name: str = info[0]["name"]
        if name.strip():
            return name[:64]
    return default


def _session_info(session: Session) -> dict[str, Any]:
    return {
        "name": session.id, "path": "", "image": session.series.series_instance_uid,
        "meta": session.meta, "create_ts": int(session.created), "last_access_ts": int(session.last_access),
        "expiry": int(session.ttl),
    }


__all__ = ["MonaiLabelApi", "extreme_points_box", "multipart_form", "ohif_ai_meta", "prompts_from_params",
           "resample_polyline", "stream_meta_seg", "write_nrrd"]
