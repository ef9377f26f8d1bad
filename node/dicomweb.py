"""The node's DICOMweb server over its store: STOW-RS receive, QIDO-RS search, WADO-RS retrieve (PS3.18)."""

from __future__ import annotations

import errno
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dicom_io.dicomweb import store_part
from dicom_io.multipart import MultipartError, MultipartParser, SpooledPart, new_boundary, parse_content_type
from dicom_io.query import Level, parse_search, search
from dicom_io.store import InstanceRecord, InstanceValidationError, Store, StoreFullError, is_valid_uid
from node import status
from node.scp import StoredInstance

logger = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
#: Failure reason for an instance of another study than the STOW-RS URL names (as dcm4chee-arc uses).
STUDY_MISMATCH = 0xC409

# Content types of encapsulated frames by transfer syntax (PS3.18 table 8.7.3-2).
_FRAME_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")


@dataclass
class DicomwebConfig:
    """What the DICOMweb routes need: the store, listeners for received instances, and a header cache size."""

    store: Store
    on_stored: Sequence[Callable[[StoredInstance], None]] = ()
    cache_size: int = 4096


class _HeaderCache:
    """Parsed headers (no pixel data) of stored files, keyed by path and modification time."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, int], Dataset] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Dataset:
        st = os.stat(path)
        key = (str(path), st.st_mtime_ns)
        with self._lock:
            ds = self._items.get(key)
            if ds is not None:
                self._items.move_to_end(key)
                return ds
        ds = dcmread(path, stop_before_pixels=True)
        with self._lock:
            self._items[key] = ds
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return ds



def _render_params(request: Request,
                   viewport: tuple[int, int] | None) -> tuple[str, tuple[int, int] | None, int] | Response:
    """(media type, viewport, frame number) of a rendered/thumbnail request, or its 400 answer."""
    accept = request.headers.get("accept", "")
    media = "image/png" if "image/png" in accept and "image/jpeg" not in accept else "image/jpeg"
    if "viewport" in request.query_params:
        try:
            w, h = (int(v) for v in request.query_params["viewport"].split(",")[:2])
            viewport = (max(1, w), max(1, h))
        except ValueError:
            return _error(400, "viewport must be 'width,height'.")
    try:
        frame = int(request.path_params.get("frames", "1").split(",")[0])
    except ValueError:
        return _error(400, "Frame number must be an integer.")
    return media, viewport, frame

def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code)


# --- STOW-RS --------------------------------------------------------------------------------


async def _stow(request: Request, cfg: DicomwebConfig) -> Response:
    study = request.path_params.get("study")
    if study is not None and not is_valid_uid(study):
        return _error(400, f'StudyInstanceUID "{study}" in the URL is not a valid UID.')
    media, params = parse_content_type(request.headers.get("content-type", ""))
    if media != "multipart/related":
        return _error(415, f"STOW-RS needs multipart/related, not '{media}'.")
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        return _error(415, f"STOW-RS parts of type '{part_type}' are not supported; send application/dicom.")
    boundary = params.get("boundary")
    if not boundary:
        return _error(400, "multipart/related without a boundary parameter.")
    store = cfg.store
    try:
        store.check_space()
        spool = store.root / "spool"
        spool.mkdir(exist_ok=True)  # cleaned of crash leftovers by dicom_io.dicomweb.spool_dir on pulls
    except OSError as exc:
        return _store_full(exc, study, _base_url(request))
    ready: list[SpooledPart] = []
    parser = MultipartParser(boundary, ready.append, spool_dir=spool, max_memory=8 * 1024 * 1024)
    stored: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    base = _base_url(request)
    peer = request.client.host if request.client else ""

    async def handle(part: SpooledPart) -> None:
        try:
            item, code = await run_in_threadpool(_store_one, cfg, part, study, base, peer)
        finally:
            part.discard()
        (stored if code is None else failed).append(item)

    try:
        async for chunk in request.stream():
            parser.feed(chunk)
            while ready:
                await handle(ready.pop(0))
        parser.close()
    except MultipartError as exc:
        for p in ready:
            p.discard()
        parser.abort()
        logger.warning("STOW-RS from %s: malformed body after %d part(s): %s", peer, parser.parts, exc)
        if not stored:
            return _error(400, f"Malformed multipart body: {exc}")
        failed.append({"00081197": {"vr": "US", "Value": [status.CANNOT_UNDERSTAND]}})
    except OSError as exc:  # the spool cannot be written (disk full)
        parser.abort()
        for p in ready:
            p.discard()
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        logger.error("STOW-RS from %s: cannot spool the request: %s", peer, exc)
        failed.append({"00081197": {"vr": "US", "Value": [status.OUT_OF_RESOURCES]}})
    except BaseException:
        parser.abort()
        for p in ready:
            p.discard()
        raise
    body: dict[str, Any] = {}
    if study is not None:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    body["00081199"] = {"vr": "SQ", "Value": stored}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    code = 200 if not failed else (202 if stored else 409)
    if not stored and not failed:
        code = 400
    out_of_space = [f for f in failed if f.get("00081197", {}).get("Value") == [status.OUT_OF_RESOURCES]]
    if failed and not stored and len(out_of_space) == len(failed):
        code = 507  # Insufficient Storage: nothing stored because the node is out of space; retry later
    logger.info("STOW-RS from %s: %d stored, %d failed", peer, len(stored), len(failed))
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


def _store_full(exc: OSError, study: str | None, base: str) -> JSONResponse:
    """507 Insufficient Storage with a Store Instances Response whose failure reason is 0xA700 (out of resources)."""
    logger.error("STOW-RS refused: %s", exc)
    body: dict[str, Any] = {}
    if study is not None:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    body["00081198"] = {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [status.OUT_OF_RESOURCES]}}]}
    body["00081199"] = {"vr": "SQ", "Value": []}
    return JSONResponse(body, status_code=507, media_type=DICOM_JSON, headers={"Retry-After": "60"})


def _store_one(cfg: DicomwebConfig, part: SpooledPart, study: str | None, base: str,
               peer: str) -> tuple[dict[str, Any], int | None]:
    """Store one part; returns (response item, None) on success or (item, failure reason)."""
    store = cfg.store
    try:
        put = store_part(store, part, calling_ae_title="", expect_study=study)
    except InstanceValidationError as exc:
        code = {"uid": status.INVALID_UID, "study_mismatch": STUDY_MISMATCH}.get(exc.kind, status.CANNOT_DECODE)
        try:
            store.quarantine([part.read()], f"STOW-RS from {peer}: {exc}")
        except OSError as qexc:
            logger.error("Cannot quarantine a refused STOW-RS part: %s", qexc)
        logger.warning("STOW-RS from %s: refused a part: %s", peer, exc)
        return ({"00081197": {"vr": "US", "Value": [code]}}, code)
    except (StoreFullError, OSError) as exc:
        logger.error("STOW-RS from %s: cannot store a part: %s", peer, exc)
        return ({"00081197": {"vr": "US", "Value": [status.OUT_OF_RESOURCES]}}, status.OUT_OF_RESOURCES)
    rec = store.instance(put.sop_instance_uid)
    assert rec is not None
    for listener in cfg.on_stored:
        try:
            listener(StoredInstance(rec.sop_instance_uid, rec.sop_class_uid, rec.series_instance_uid,
                                    rec.study_instance_uid, "", put.duplicate))
        except Exception:
            logger.exception("on_stored listener failed for %s", rec.sop_instance_uid)
    item = {
        "00081150": {"vr": "UI", "Value": [rec.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [rec.sop_instance_uid]},
        "00081190": {"vr": "UR", "Value": [_instance_url(base, rec)]},
    }
    return item, None


def _instance_url(base: str, rec: InstanceRecord) -> str:
    return f"{base}/studies/{rec.study_instance_uid}/series/{rec.series_instance_uid}/instances/{rec.sop_instance_uid}"


def _base_url(request: Request) -> str:
    """The DICOMweb root as the client addressed it (Host header kept, so proxies work)."""
    root = request.scope.get("root_path", "").rstrip("/")  # includes the mount prefix (/dicomweb)
    return f"{request.url.scheme}://{request.url.netloc}{root}"


# --- QIDO-RS --------------------------------------------------------------------------------


def _search(request: Request, cfg: DicomwebConfig, cache: _HeaderCache, level: Level,
            study: str | None = None, series: str | None = None) -> Response:
    """Search for studies, series or instances (PS3.18 10.6) from the store's index (:mod:`dicom_io.query`)."""
    try:
        query = parse_search(level, request.query_params.multi_items(), study_uid=study, series_uid=series)
    except ValueError as exc:
        return _error(400, str(exc))
    result = search(cfg.store.select, query, cache.get)
    if level is Level.SERIES and study is not None and not result.count and not cfg.store.select(
            "SELECT 1 FROM series WHERE study_instance_uid=? LIMIT 1", (study,)):
        return _error(404, f"Study {study} is not held.")
    headers = {"Warning": ", ".join(result.warnings)} if result.warnings else {}
    return Response(result.body.encode("utf-8"), media_type=DICOM_JSON, headers=headers)


# --- WADO-RS --------------------------------------------------------------------------------


def _records(store: Store, study: str, series: str | None = None, sop: str | None = None) -> list[InstanceRecord]:
    out = []
    for s in store.series(study):
        if series is not None and s.series_instance_uid != series:
            continue
        for rec in store.instances(s.series_instance_uid):
            if sop is None or rec.sop_instance_uid == sop:
                out.append(rec)
    return out


def _accepts(request: Request, wanted: str) -> tuple[bool, dict[str, str]]:
    """Whether the Accept header allows ``multipart/related; type=wanted``; returns its parameters."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return True, {}
    for item in accept.split(","):
        media, params = parse_content_type(item)
        if media in ("*/*", "multipart/*"):
            return True, params
        if media == "multipart/related" and params.get("type", wanted).lower() in (wanted, "*/*"):
            return True, params
        if media == wanted:
            return True, params
    return False, {}


def _multipart_files(paths: list[Path], content_type: str = "application/dicom") -> StreamingResponse:
    boundary = new_boundary()

    def gen() -> Iterator[bytes]:
        for p in paths:
            yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        gen(), media_type=f'multipart/related; type="{content_type}"; boundary={boundary}')


def _multipart_bytes(items: list[tuple[str, bytes]]) -> Response:
    boundary = new_boundary()
    body = bytearray()
    main_type = items[0][0].split(";")[0] if items else "application/octet-stream"
    for ctype, data in items:
        body += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode()
        body += data
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return Response(bytes(body), media_type=f'multipart/related; type="{main_type}"; boundary={boundary}')


def _pixel_vr(header: Dataset, ts: str) -> str:
    if ts not in _NATIVE or int(header.get("BitsAllocated", 16) or 16) <= 8:
        return "OB"
    return "OW"


def _metadata(base: str, rec: InstanceRecord, header: Dataset) -> dict[str, Any]:
    url = _instance_url(base, rec)

    def bulk(elem: Any) -> str:
        return f"{url}/bulk/{int(elem.tag):08X}"

    data = header.to_json_dict(bulk_data_threshold=2048, bulk_data_element_handler=bulk)
    for tag in [k for k in data if k.startswith("0002")]:
        del data[tag]
    if "Rows" in header and "Columns" in header:
        data["7FE00010"] = {"vr": _pixel_vr(header, rec.transfer_syntax_uid), "BulkDataURI": f"{url}/bulk/7FE00010"}
    if rec.transfer_syntax_uid:
        data["00083002"] = {"vr": "UI", "Value": [rec.transfer_syntax_uid]}
    return data


def _read_pixel_data(path: Path) -> tuple[Dataset, bytes]:
    ds = dcmread(path)
    return ds, bytes(ds.PixelData) if "PixelData" in ds else b""


def _frames(ds: Dataset, pixel_data: bytes, ts: str, numbers: list[int], transcode: bool) -> list[tuple[str, bytes]]:
    """Selected frames (1-based) as (content type, bytes)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    bad = [n for n in numbers if n < 1 or n > n_frames]
    if bad:
        raise ValueError(f"Frame number(s) {bad} outside 1..{n_frames}.")
    if ts in _NATIVE:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        out = []
        if bits == 1:
            import numpy as np

            per = rows * cols * spp
            flat = np.unpackbits(np.frombuffer(pixel_data, dtype=np.uint8), bitorder="little")
            for n in numbers:
                frame = flat[(n - 1) * per:n * per]
                out.append(("application/octet-stream", np.packbits(frame, bitorder="little").tobytes()))
            return out
        size = rows * cols * spp * bits // 8
        for n in numbers:
            out.append(("application/octet-stream", pixel_data[(n - 1) * size:n * size]))
        return out
    if not transcode:
        from pydicom.encaps import generate_frames

        frames = list(generate_frames(pixel_data, number_of_frames=n_frames))
        ctype = _FRAME_TYPES.get(ts, "application/octet-stream")
        return [(f"{ctype}; transfer-syntax={ts}", frames[n - 1]) for n in numbers]
    arr = ds.pixel_array
    if n_frames == 1:
        arr = arr[None]
    return [("application/octet-stream", arr[n - 1].astype(arr.dtype.newbyteorder("<")).tobytes()) for n in numbers]


class DicomwebRoutes:
    """The route handlers; built by :func:`dicomweb_routes`."""

    def __init__(self, cfg: DicomwebConfig) -> None:
        self.cfg = cfg
        self.cache = _HeaderCache(cfg.cache_size)

    # STOW
    async def stow(self, request: Request) -> Response:
        return await _stow(request, self.cfg)

    async def studies(self, request: Request) -> Response:
        if request.method == "POST":
            return await _stow(request, self.cfg)
        return await run_in_threadpool(_search, request, self.cfg, self.cache, Level.STUDY)

    async def study(self, request: Request) -> Response:
        study = request.path_params["study"]
        if request.method == "POST":
            return await _stow(request, self.cfg)
        return await self._retrieve(request, study)

    async def series_search(self, request: Request) -> Response:
        return await run_in_threadpool(_search, request, self.cfg, self.cache, Level.SERIES,
                                       request.path_params.get("study"))

    async def instance_search(self, request: Request) -> Response:
        return await run_in_threadpool(_search, request, self.cfg, self.cache, Level.INSTANCE,
                                       request.path_params.get("study"), request.path_params.get("series"))

    async def series(self, request: Request) -> Response:
        return await self._retrieve(request, request.path_params["study"], request.path_params["series"])

    async def instance(self, request: Request) -> Response:
        p = request.path_params
        return await self._retrieve(request, p["study"], p["series"], p["instance"])

    async def _retrieve(self, request: Request, study: str, series: str | None = None,
                        sop: str | None = None) -> Response:
        ok, params = _accepts(request, "application/dicom")
        if not ok:
            return _error(406, "Only multipart/related; type=\"application/dicom\" is offered here.")
        ts = params.get("transfer-syntax", "*")
        recs = await run_in_threadpool(_records, self.cfg.store, study, series, sop)
        if not recs:
            return _error(404, "No such study, series or instance is held.")
        if ts not in ("*", "") and any(r.transfer_syntax_uid and r.transfer_syntax_uid != ts for r in recs):
            # No transcoding: say what is offered rather than sending something else.
            return _error(406, f"Instances are held in their original transfer syntax; ask for "
                               f"transfer-syntax=* (requested {ts}).")
        return _multipart_files([r.path for r in recs])

    async def metadata(self, request: Request) -> Response:
        p = request.path_params
        recs = await run_in_threadpool(_records, self.cfg.store, p["study"], p.get("series"), p.get("instance"))
        if not recs:
            return _error(404, "No such study, series or instance is held.")
        base = _base_url(request)

        def build() -> list[dict[str, Any]]:
            return [_metadata(base, r, self.cache.get(r.path)) for r in recs]

        return JSONResponse(await run_in_threadpool(build), media_type=DICOM_JSON)

    async def frames(self, request: Request) -> Response:
        p = request.path_params
        try:
            numbers = [int(x) for x in p["frames"].split(",") if x.strip()]
        except ValueError:
            return _error(400, f'Frame list "{p["frames"]}" is not a comma-separated list of numbers.')
        recs = await run_in_threadpool(_records, self.cfg.store, p["study"], p["series"], p["instance"])
        if not recs:
            return _error(404, "No such instance is held.")
        rec = recs[0]
        accept = request.headers.get("accept", "")
        any_ts = "transfer-syntax=*" in accept.replace(" ", "") or not accept or "*/*" in accept
        wanted_native = rec.transfer_syntax_uid in _NATIVE or not any_ts

        def build() -> list[tuple[str, bytes]]:
            ds, pixels = _read_pixel_data(rec.path)
            return _frames(ds, pixels, rec.transfer_syntax_uid, numbers, transcode=wanted_native
                           and rec.transfer_syntax_uid not in _NATIVE)

        try:
            items = await run_in_threadpool(build)
        except ValueError as exc:
            return _error(404, str(exc))
        except (AttributeError, RuntimeError, NotImplementedError) as exc:
            return _error(406, f"Frames cannot be rendered in the requested syntax: {exc}")
        return _multipart_bytes(items)

    async def rendered(self, request: Request) -> Response:
        """WADO-RS rendered (PS3.18 10.4.1.1.3): one frame as JPEG (default) or PNG."""
        p = request.path_params
        parsed = _render_params(request, None)
        if isinstance(parsed, Response):
            return parsed
        media, viewport, frame = parsed
        recs = await run_in_threadpool(_records, self.cfg.store, p["study"], p["series"], p["instance"])
        if not recs:
            return _error(404, "No such instance is held.")
        try:
            data = await run_in_threadpool(_render, recs[0].path, frame, media, viewport)
        except ValueError as exc:
            return _error(404, str(exc))
        except Exception as exc:  # no decoder for the pixel data, unusual photometric interpretation
            logger.warning("Cannot render %s: %s", recs[0].sop_instance_uid, exc)
            return _error(406, f"Instance cannot be rendered: {type(exc).__name__}")
        return Response(data, media_type=media)

    async def thumbnail(self, request: Request) -> Response:
        """WADO-RS thumbnail (PS3.18 10.4.1.1.4) of a study, series, instance or frame: the middle
        instance of the (first) series, rendered like ``rendered`` and fitted into ``viewport``
        (default 128,128)."""
        p = request.path_params
        parsed = _render_params(request, (128, 128))
        if isinstance(parsed, Response):
            return parsed
        media, viewport, frame = parsed
        recs = await run_in_threadpool(_records, self.cfg.store, p["study"], p.get("series"), p.get("instance"))
        if not recs:
            return _error(404, "No such study, series or instance is held.")
        first_series = [r for r in recs if r.series_instance_uid == recs[0].series_instance_uid]
        rec = first_series[len(first_series) // 2]
        try:
            data = await run_in_threadpool(_render, rec.path, frame, media, viewport)
        except ValueError as exc:
            return _error(404, str(exc))
        except Exception as exc:  # no decoder for the pixel data, no pixel data (e.g. a report)
            logger.warning("Cannot render a thumbnail of %s: %s", rec.sop_instance_uid, exc)
            return _error(406, f"Instance cannot be rendered: {type(exc).__name__}")
        return Response(data, media_type=media)

    async def bulk(self, request: Request) -> Response:
        p = request.path_params
        try:
            tag = Tag(int(p["tag"], 16))
        except ValueError:
            return _error(400, f'"{p["tag"]}" is not a tag.')
        recs = await run_in_threadpool(_records, self.cfg.store, p["study"], p["series"], p["instance"])
        if not recs:
            return _error(404, "No such instance is held.")

        def build() -> bytes | None:
            ds = dcmread(recs[0].path)
            if tag not in ds:
                return None
            value = ds[tag].value
            return bytes(value) if isinstance(value, (bytes, bytearray)) else None

        data = await run_in_threadpool(build)
        if data is None:
            return _error(404, f"Instance has no bulk data element {p['tag']}.")
        return _multipart_bytes([("application/octet-stream", data)])


def _render(path: Path, frame: int, media: str, viewport: tuple[int, int] | None) -> bytes:
    """One frame windowed to 8 bits (VOI LUT / window from the header, else min–max) as JPEG or PNG."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    ds = dcmread(path)
    arr = ds.pixel_array
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame < 1 or frame > n_frames:
        raise ValueError(f"Frame {frame} outside 1..{n_frames}.")
    if n_frames > 1:
        arr = arr[frame - 1]
    if ds.get("PhotometricInterpretation", "MONOCHROME2") in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(arr, ds).astype(np.float64)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds).astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        img = ((values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)).astype(np.uint8)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            img = 255 - img
        pil = Image.fromarray(img, mode="L")
    else:
        pil = Image.fromarray(arr.astype(np.uint8))
    if viewport is not None:
        pil.thumbnail(viewport)
    out = io.BytesIO()
    pil.save(out, format="PNG" if media == "image/png" else "JPEG", quality=90)
    return out.getvalue()


def dicomweb_routes(cfg: DicomwebConfig) -> list[Route]:
    """The DICOMweb routes (to be mounted under ``/dicomweb``)."""
    h = DicomwebRoutes(cfg)
    s, se, i = "/studies/{study}", "/series/{series}", "/instances/{instance}"
    return [
        Route("/studies", h.studies, methods=["GET", "POST"], name="dicomweb_studies"),
        Route("/series", h.series_search, methods=["GET"]),
        Route("/instances", h.instance_search, methods=["GET"]),
        Route(s, h.study, methods=["GET", "POST"]),
        Route(s + "/metadata", h.metadata, methods=["GET"]),
        Route(s + "/series", h.series_search, methods=["GET"]),
        Route(s + "/instances", h.instance_search, methods=["GET"]),
        Route(s + se, h.series, methods=["GET"]),
        Route(s + se + "/metadata", h.metadata, methods=["GET"]),
        Route(s + se + "/instances", h.instance_search, methods=["GET"]),
        Route(s + se + i, h.instance, methods=["GET"]),
        Route(s + se + i + "/metadata", h.metadata, methods=["GET"]),
        Route(s + se + i + "/frames/{frames}", h.frames, methods=["GET"]),
        Route(s + se + i + "/rendered", h.rendered, methods=["GET"]),
        Route(s + se + i + "/frames/{frames}/rendered", h.rendered, methods=["GET"]),
        Route(s + "/thumbnail", h.thumbnail, methods=["GET"]),
        Route(s + se + "/thumbnail", h.thumbnail, methods=["GET"]),
        Route(s + se + i + "/thumbnail", h.thumbnail, methods=["GET"]),
        Route(s + se + i + "/frames/{frames}/thumbnail", h.thumbnail, methods=["GET"]),
        Route(s + se + i + "/bulk/{tag}", h.bulk, methods=["GET"]),
    ]


__all__ = ["DicomwebConfig", "STUDY_MISMATCH", "dicomweb_routes"]
