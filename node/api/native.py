"""The native REST API under /v1: one-shot segmentations, interactive sessions, jobs, models, status, metrics."""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from node.api.core import (
    ApiContext,
    ApiError,
    ResultRecord,
    bad,
    check_prompts,
    echo,
    json_body,
    parse_mode,
    parse_prompts,
    parse_segment,
    parse_series_ref,
    user_of,
    write_outputs,
)
from node.inference import DONE, Job, JobCancelledError
from node.pipeline import safe_name
from node.results import OUTPUTS
from node.sessions import Session, Step, merge

logger = logging.getLogger(__name__)

#: Media type of the compact mask: gzip'd ``numpy.packbits`` of the (slices, rows, columns) mask, C order.
MASK_MEDIA_TYPE = "application/x-ainode-mask"
#: Media type of one slice's voxels (``GET /v1/sessions/{id}/slices/{k}``): float32 little-endian, C order.
SLICE_MEDIA_TYPE = "application/x-ainode-slice"
#: Session mask outputs.
MASK_OUTPUTS = ("json", "bin", "nifti", "seg")
_SEGMENTATION_KEYS = {"series", "prompts", "model", "mode", "segment", "outputs", "destinations", "wait"}


def _outputs(value: Any, where: str = "outputs") -> list[str]:
    if value is None:
        return list(OUTPUTS)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad(where, f"a non-empty list of {', '.join(OUTPUTS)} is required, got {echo(value)}.")
    out = []
    for n, v in enumerate(value):
        key = v.strip().lower()
        if key == "both":
            out += [o for o in OUTPUTS if o not in out]
            continue
        if key not in OUTPUTS:
            raise bad(f"{where}[{n}]", f"{echo(v)} is not one of {', '.join(OUTPUTS)}.")
        if key not in out:
            out.append(key)
    return out


def _unknown_keys(data: dict[str, Any], allowed: set[str], where: str = "body") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise bad(where, f"unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}.")


def _result_json(ctx: ApiContext, rec: ResultRecord) -> dict[str, Any]:
    out = rec.to_json()
    out["deliveries"] = ctx.delivery_state(rec.seg_sop_instance_uid, rec.destinations)
    return out


class NativeApi:
    """Handlers of the native API (see ``docs/api.md``)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.api = ctx.settings.api

    async def _json(self, request: Request) -> dict[str, Any]:
        """The JSON object of the request, within ``api.max_json_bytes`` and ``api.max_json_depth``."""
        return await json_body(request, self.api.max_json_bytes, self.api.max_json_depth)

    # ------------------------------------------------------------------ one-shot segmentations

    async def create_segmentation(self, request: Request) -> Response:
        ctx = self.ctx
        data = await self._json(request)
        _unknown_keys(data, _SEGMENTATION_KEYS)
        if "series" not in data:
            raise bad("series", "is required (series_instance_uid, and study_instance_uid/archive to pull it).")
        ref = parse_series_ref(data["series"])
        model = ctx.model_name(data.get("model"))
        mode = parse_mode(data.get("mode"), "3d")
        segment = parse_segment(data.get("segment"), ctx.settings)
        outputs = _outputs(data.get("outputs"))
        wait = data.get("wait", True)
        if not isinstance(wait, bool):
            raise bad("wait", f"{echo(wait)} is not true or false.")
        if "prompts" not in data:
            raise bad("prompts", "is required: at least one positive point or box.")
        user = user_of(request)
        t0 = time.perf_counter()
        series = await ctx.load_series(ref)
        t_load = time.perf_counter() - t0
        prompts = parse_prompts(data["prompts"], series, limits=self.api)
        if "seg" not in outputs and data.get("destinations") is None:
            destinations: list[str] = []  # nothing to deliver: only the SEG goes to archives
        else:
            destinations = ctx.destinations_for(data.get("destinations"), series)
        if destinations and "seg" not in outputs:
            raise bad("destinations", "results are delivered as DICOM SEG; add 'seg' to outputs or give [].")
        progress: dict[str, Any] = {"rec": None, "started": False}
        lock = threading.Lock()

        def mark_running() -> None:  # a restart then reports the job as interrupted while running, not queued
            with lock:
                progress["started"] = True
                held = progress["rec"]
                if held is not None and held.state == "queued":
                    held.state = "running"
                    held.save()

        job = ctx.submit(model, series, prompts, mode, user, on_start=mark_running)
        rec = ctx.new_result(user, series, model, mode, segment.label, result_id=job.id)
        rec.destinations = destinations
        # Persisted now, so a restart reports a job that died with the process (docs/reliability.md).
        await run_in_threadpool(rec.save)
        progress["rec"] = rec
        if progress["started"]:  # the job started before the record was saved
            await run_in_threadpool(mark_running)

        async def complete() -> ResultRecord:
            try:
                inferred = await ctx.wait(job)
            except ApiError as exc:
                if exc.status == 504:
                    raise
                rec.state, rec.error = job.state, str(exc)
                await run_in_threadpool(rec.save)
                raise
            except Exception as exc:
                rec.state, rec.error = job.state, str(exc)
                await run_in_threadpool(rec.save)
                raise
            timings = {"load": t_load, "queue": inferred.queue_seconds, "inference": inferred.run_seconds}
            for key in ("encode", "decode"):
                if key in inferred.result.timings:
                    timings[key] = inferred.result.timings[key]
            await run_in_threadpool(ctx.finish_result, rec, series, np.asarray(inferred.result.mask, dtype=bool),
                                    segment, inferred.model, inferred.version, outputs, timings)
            if rec.seg:  # into the store, and to each destination
                t = time.perf_counter()
                await run_in_threadpool(ctx.deliver_blocking, Path(rec.seg), destinations,
                                        Path(rec.seg_binary) if rec.seg_binary else None)
                rec.timings["deliver"] = time.perf_counter() - t
                await run_in_threadpool(rec.save)
            return rec

        # The result is completed by its own task, so a client that goes away does not leave it half done.
        task = asyncio.ensure_future(complete())
        task.add_done_callback(_log_background_failure)
        if not wait:
            return JSONResponse({**_result_json(ctx, rec), "job": job.describe()}, status_code=202,
                                headers={"Location": f"/v1/segmentations/{rec.id}"})
        await asyncio.shield(task)
        return JSONResponse(_result_json(ctx, rec), status_code=201,
                            headers={"Location": f"/v1/segmentations/{rec.id}"})

    async def get_segmentation(self, request: Request) -> Response:
        rec = self.ctx.result(request.path_params["id"], user_of(request))
        body = _result_json(self.ctx, rec)
        job = self.ctx.inference.job(rec.id)
        if job is not None:
            body["job"] = job.describe()
            if rec.state != "done" and job.state != DONE:
                body["state"] = job.state
        return JSONResponse(body)

    async def get_nifti(self, request: Request) -> Response:
        rec = self.ctx.result(request.path_params["id"], user_of(request))
        return self._file(rec, rec.nifti, "nifti", "application/gzip")

    async def get_seg(self, request: Request) -> Response:
        rec = self.ctx.result(request.path_params["id"], user_of(request))
        return self._file(rec, rec.seg, "seg", "application/dicom")

    @staticmethod
    def _file(rec: ResultRecord, path: str | None, what: str, media_type: str) -> Response:
        if rec.state != "done":
            raise ApiError(409, f"id: segmentation '{rec.id}' is {rec.state}; its {what} is not ready.", "id")
        if not path or not Path(path).exists():
            raise ApiError(404, f"id: segmentation '{rec.id}' has no {what} output (outputs did not ask for it).",
                           "id")
        return FileResponse(path, media_type=media_type, filename=Path(path).name)

    # ------------------------------------------------------------------ jobs

    def _job(self, request: Request) -> Job[Any]:
        job = self.ctx.inference.job(request.path_params["id"])
        if job is None or (job.user != user_of(request) and self.ctx.settings.api.tokens):
            raise ApiError(404, f"id: job '{request.path_params['id']}' does not exist.", "id")
        return job

    async def get_job(self, request: Request) -> Response:
        return JSONResponse(self._job(request).describe())

    async def cancel_job(self, request: Request) -> Response:
        job = self._job(request)
        cancelled = self.ctx.inference.cancel(job.id)
        if not cancelled:
            raise ApiError(409, f"id: job '{job.id}' has already finished ({job.state}).", "id")
        return JSONResponse({**job.describe(), "cancel_requested": True}, status_code=202)

    # ------------------------------------------------------------------ sessions

    async def create_session(self, request: Request) -> Response:
        ctx = self.ctx
        data = await self._json(request)
        _unknown_keys(data, {"series", "model", "mode", "segment", "ttl_seconds"})
        if "series" not in data:
            raise bad("series", "is required (series_instance_uid, and study_instance_uid/archive to pull it).")
        ref = parse_series_ref(data["series"])
        model = ctx.model_name(data.get("model"))
        mode = parse_mode(data.get("mode"), "2d")
        segment = parse_segment(data.get("segment"), ctx.settings)
        ttl = data.get("ttl_seconds")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
            raise bad("ttl_seconds", f"{echo(ttl)} is not a positive number of seconds.")
        series = await ctx.load_series(ref)
        session = ctx.sessions.create(user_of(request), series, model, mode=mode, segment=segment,
                                      ttl=None if ttl is None else float(ttl))
        return JSONResponse(_session_json(session), status_code=201,
                            headers={"Location": f"/v1/sessions/{session.id}"})

    def _session(self, request: Request) -> Session:
        return self.ctx.sessions.get(request.path_params["id"], user_of(request))

    async def get_session(self, request: Request) -> Response:
        return JSONResponse(_session_json(self._session(request)))

    async def delete_session(self, request: Request) -> Response:
        session = self.ctx.sessions.delete(request.path_params["id"], user_of(request))
        return JSONResponse({**_session_json(session), "deleted": True})

    async def add_prompts(self, request: Request) -> Response:
        ctx = self.ctx
        session = self._session(request)
        output = _mask_output(request)
        data = await self._json(request)
        _unknown_keys(data, {"points", "boxes", "mode"})
        mode = parse_mode(data.get("mode"), session.mode)
        new = parse_prompts({k: v for k, v in data.items() if k != "mode"}, session.series, validate=False,
                            limits=self.api)
        async with session.lock:
            merged = merge(session.prompts, new)
            check_prompts(merged, session.series, limits=self.api)
            # A click of the session: not counted against api.queue_size, cancelled when the client goes.
            inferred = await ctx.infer(session.model, session.series, merged, mode, session.user, kind="session",
                                       request=request, session=session)
            mask = np.asarray(inferred.result.mask, dtype=bool)
            timings = {"queue": inferred.queue_seconds, "inference": inferred.run_seconds,
                       **{k: v for k, v in inferred.result.timings.items() if k in ("encode", "decode")}}
            session.push(Step(new, mask, int(mask.sum()), timings, dict(inferred.result.stats)))
            session.mode = mode
            session.touch()
            return await _mask_response(ctx, session, output)

    async def undo(self, request: Request) -> Response:
        session = self._session(request)
        output = _mask_output(request)
        async with session.lock:
            if session.undo() is None:
                raise ApiError(409, f"id: session '{session.id}' has no prompts to undo.", "id")
            return await _mask_response(self.ctx, session, output)

    async def reset(self, request: Request) -> Response:
        session = self._session(request)
        output = _mask_output(request)
        async with session.lock:
            session.reset()
            return await _mask_response(self.ctx, session, output)

    async def get_mask(self, request: Request) -> Response:
        session = self._session(request)
        return await _mask_response(self.ctx, session, _mask_output(request))

    async def get_slices(self, request: Request) -> Response:
        """The session's image geometry and display defaults (what a viewer needs before fetching slices)."""
        session = self._session(request)
        return JSONResponse(await run_in_threadpool(_slices_json, session))

    async def get_slice(self, request: Request) -> Response:
        """One slice's voxels: float32 little-endian (rows, columns) in modality units (HU for CT)."""
        session = self._session(request)
        series = session.series
        raw = request.path_params["k"]
        digits = raw[1:] if raw.startswith("-") else raw
        if not (digits.isascii() and digits.isdigit()):  # int() would read other scripts' digits ("\u0663" = 3)
            raise bad("k", f"{echo(raw)} is not a slice index (ASCII digits 0-9).")
        k = int(raw)
        n = series.shape[0]
        if not 0 <= k < n:
            raise ApiError(404, f"k: slice {k} is outside the volume (0..{n - 1}).", "k")
        plane = np.ascontiguousarray(series.voxels[k], dtype="<f4")
        position = series.geometry.voxel_to_lps([0.0, 0.0, float(k)])
        headers = {"X-Session-Id": session.id, "X-Slice": str(k),
                   "X-Slice-Shape": f"{plane.shape[0]},{plane.shape[1]}",
                   "X-Image-Position": ",".join(f"{v:.6f}" for v in position),
                   "Cache-Control": "private, max-age=3600"}
        body = plane.tobytes()
        if "gzip" in request.headers.get("accept-encoding", "").lower():
            body = await run_in_threadpool(gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type=SLICE_MEDIA_TYPE, headers=headers)

    async def new_segment(self, request: Request) -> Response:
        """Finish the segment being refined and start the next one (``{"segment": {label, color, ...}}``)."""
        session = self._session(request)
        data = await self._json(request)
        _unknown_keys(data, {"segment"})
        spec = parse_segment(data.get("segment"), self.ctx.settings) if data.get("segment") is not None else None
        async with session.lock:
            try:
                session.next_segment(spec)
            except ValueError as exc:
                raise ApiError(409, f"id: {exc}", "id") from exc
            session.touch()
        return JSONResponse(_session_json(session), status_code=201)

    async def commit(self, request: Request) -> Response:
        ctx = self.ctx
        session = self._session(request)
        data = await self._json(request)
        _unknown_keys(data, {"outputs", "destinations", "segment"})
        outputs = _outputs(data.get("outputs"))
        segment = parse_segment(data.get("segment"), ctx.settings) if "segment" in data else session.segment
        if "seg" not in outputs and data.get("destinations") is None:
            destinations: list[str] = []
        else:
            destinations = ctx.destinations_for(data.get("destinations"), session.series)
        if destinations and "seg" not in outputs:
            raise bad("destinations", "results are delivered as DICOM SEG; add 'seg' to outputs or give [].")
        async with session.lock:
            if not session.steps and not session.finished:
                raise ApiError(409, f"id: session '{session.id}' has no mask yet; add prompts first.", "id")
            if "segment" in data:
                session.segment = segment  # names the segment being refined
            specs, masks = session.segments()
            if not masks:
                raise ApiError(409, f"id: session '{session.id}' has an empty mask; nothing to commit.", "id")
            q = ctx.inference.queue(session.model)
            seg = q.segmenter
            rec = ctx.new_result(session.user, session.series, session.model, session.mode, specs[0].label)
            rec.destinations = destinations
            last = session.steps[-1] if session.steps else None
            await run_in_threadpool(
                ctx.finish_result, rec, session.series, np.stack(masks), specs,
                getattr(seg, "name", session.model), getattr(seg, "version", ""), outputs,
                dict(last.timings) if last else {})
            if rec.seg:  # into the store, and to each destination
                await run_in_threadpool(ctx.deliver_blocking, Path(rec.seg), destinations,
                                        Path(rec.seg_binary) if rec.seg_binary else None)
        return JSONResponse({**_result_json(ctx, rec), "session": session.id}, status_code=201,
                            headers={"Location": f"/v1/segmentations/{rec.id}"})

    # ------------------------------------------------------------------ node

    async def status(self, request: Request) -> Response:
        ctx = self.ctx
        ctx.sessions.sweep()
        return JSONResponse({
            "status": "ok", "uptime_seconds": round(time.time() - ctx.started, 3),
            "queues": ctx.inference.status(), "sessions": len(ctx.sessions),
            "max_sessions": ctx.sessions.max_sessions,
        })

    async def metrics(self, request: Request) -> Response:
        ctx = self.ctx
        lines = [
            "# HELP ainode_api_sessions Open interactive sessions.", "# TYPE ainode_api_sessions gauge",
            f"ainode_api_sessions {len(ctx.sessions)}",
            "# HELP ainode_inference_queued Jobs waiting per model.", "# TYPE ainode_inference_queued gauge",
        ]
        status = ctx.inference.status()
        for name, st in status.items():
            lines.append(f'ainode_inference_queued{{model="{name}"}} {st["queued"]}')
        lines += ["# HELP ainode_inference_running Jobs running per model.", "# TYPE ainode_inference_running gauge"]
        for name, st in status.items():
            lines.append(f'ainode_inference_running{{model="{name}"}} {1 if st["running"] else 0}')
        lines += ["# HELP ainode_inference_jobs_total Finished jobs per model and outcome.",
                  "# TYPE ainode_inference_jobs_total counter"]
        for name, st in status.items():
            for state in ("completed", "failed", "cancelled", "rejected"):
                lines.append(f'ainode_inference_jobs_total{{model="{name}",outcome="{state}"}} {st[state]}')
        lines += ["# HELP ainode_inference_mean_run_seconds Mean run time of recent jobs.",
                  "# TYPE ainode_inference_mean_run_seconds gauge"]
        for name, st in status.items():
            if st["mean_run_seconds"] is not None:
                lines.append(f'ainode_inference_mean_run_seconds{{model="{name}"}} {st["mean_run_seconds"]}')
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/segmentations", self.create_segmentation, methods=["POST"]),
            Route("/v1/segmentations/{id}", self.get_segmentation, methods=["GET"]),
            Route("/v1/segmentations/{id}/nifti", self.get_nifti, methods=["GET"]),
            Route("/v1/segmentations/{id}/seg", self.get_seg, methods=["GET"]),
            Route("/v1/jobs/{id}", self.get_job, methods=["GET"]),
            Route("/v1/jobs/{id}", self.cancel_job, methods=["DELETE"]),
            Route("/v1/sessions", self.create_session, methods=["POST"]),
            Route("/v1/sessions/{id}", self.get_session, methods=["GET"]),
            Route("/v1/sessions/{id}", self.delete_session, methods=["DELETE"]),
            Route("/v1/sessions/{id}/prompts", self.add_prompts, methods=["POST"]),
            Route("/v1/sessions/{id}/undo", self.undo, methods=["POST"]),
            Route("/v1/sessions/{id}/reset", self.reset, methods=["POST"]),
            Route("/v1/sessions/{id}/mask", self.get_mask, methods=["GET"]),
            Route("/v1/sessions/{id}/slices", self.get_slices, methods=["GET"]),
            Route("/v1/sessions/{id}/slices/{k}", self.get_slice, methods=["GET"]),
            Route("/v1/sessions/{id}/segments", self.new_segment, methods=["POST"]),
            Route("/v1/sessions/{id}/commit", self.commit, methods=["POST"]),
            Route("/v1/status", self.status, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]


def _log_background_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, (ApiError, JobCancelledError)):
        logger.warning("Background segmentation ended with %s: %s", type(exc).__name__, exc)


def _session_json(session: Session) -> dict[str, Any]:
    base = f"/v1/sessions/{session.id}"
    return {**session.describe(), "links": {"self": base, "prompts": base + "/prompts", "undo": base + "/undo",
                                            "reset": base + "/reset", "mask": base + "/mask",
                                            "segments": base + "/segments", "commit": base + "/commit"}}


def _first_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _slices_json(session: Session) -> dict[str, Any]:
    """Geometry (per-slice positions, orientation, spacing) and a default window of a session's series."""
    series = session.series
    geo = series.geometry
    n, rows, cols = series.shape
    a = geo.affine
    dc, dr = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    orientation = [*(a[:3, 0] / dc), *(a[:3, 1] / dr)]
    positions = [[round(float(v), 6) for v in geo.voxel_to_lps([0.0, 0.0, float(k)])] for k in range(n)]
    sample = series.voxels[:, ::4, ::4] if series.voxels.size > 4_000_000 else series.voxels
    lo, hi = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    vmin, vmax = float(series.voxels.min()), float(series.voxels.max())
    window = {"center": (lo + hi) / 2.0, "width": max(hi - lo, 1.0), "source": "percentiles"}
    first = series.source_datasets[0] if series.source_datasets else None
    center = _first_float(getattr(first, "WindowCenter", None)) if first is not None else None
    width = _first_float(getattr(first, "WindowWidth", None)) if first is not None else None
    monochrome1 = first is not None and str(getattr(first, "PhotometricInterpretation", "")) == "MONOCHROME1"
    if center is not None and width is not None and width > 0 and not monochrome1:
        window = {"center": center, "width": width, "source": "dicom"}
    base = f"/v1/sessions/{session.id}"
    return {
        "session": session.id, "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid, "frame_of_reference_uid": series.frame_of_reference_uid,
        "modality": series.modality, "shape": [n, rows, cols],
        "pixel_spacing": [round(dr, 6), round(dc, 6)],  # DICOM order: between rows, between columns
        "slice_spacing": round(float(np.linalg.norm(a[:3, 2])), 6),
        "orientation": [round(float(v), 6) for v in orientation],
        "positions": positions,
        "window": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in window.items()},
        "range": [vmin, vmax], "dtype": "float32",
        "links": {"slice": base + "/slices/{k}"},
    }


def _mask_output(request: Request) -> str:
    value = request.query_params.get("output", "json").strip().lower()
    if value not in MASK_OUTPUTS:
        raise bad("output", f"{echo(value)} is not one of {', '.join(MASK_OUTPUTS)}.")
    return value


async def _mask_response(ctx: ApiContext, session: Session, output: str) -> Response:
    mask = session.mask
    series = session.series
    voxels = int(mask.sum())
    slices = [int(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0]]
    last = session.steps[-1] if session.steps else None
    headers = {"X-Session-Id": session.id, "X-Step": str(len(session.steps)), "X-Voxel-Count": str(voxels),
               "X-Mask-Shape": ",".join(str(n) for n in mask.shape)}
    if output == "json":
        return JSONResponse({
            "session": session.id, "step": len(session.steps), "voxel_count": voxels,
            "volume_ml": round(voxels * series.geometry.voxel_volume_ml, 4), "slices": slices,
            "shape": list(mask.shape),
            "bbox": _bbox(mask),
            "timings": {k: round(v, 4) for k, v in (last.timings if last else {}).items()},
            "stats": dict(last.stats) if last else {},
            "prompts": {"points": len(session.prompts.points), "boxes": len(session.prompts.boxes)},
        }, headers=headers)
    if output == "bin":
        body = gzip.compress(np.packbits(mask.astype(bool), axis=None).tobytes(), compresslevel=1)
        return Response(body, media_type=MASK_MEDIA_TYPE, headers={**headers, "Content-Encoding": "gzip"})
    name = safe_name(f"{series.series_instance_uid}_{session.segment.label}_step{len(session.steps)}")
    if output == "seg" and not mask.any():
        raise ApiError(409, f"id: session '{session.id}' has an empty mask; a SEG needs at least one voxel.", "id")
    if output == "seg" and not series.source_datasets:
        raise ApiError(422, "output: this session's image was not DICOM; a SEG cannot reference it.", "output")
    folder = session.files_dir or ctx.results_dir / "sessions" / session.id
    written = await run_in_threadpool(write_outputs, series, mask, session.segment, ctx.settings, session.model,
                                      "", folder, name, [output])
    path = written.nifti if output == "nifti" else written.seg
    if path is None:  # pragma: no cover - write_outputs always writes what it is asked for
        raise RuntimeError(f"{output} was not written")
    data = await run_in_threadpool(path.read_bytes)
    path.unlink(missing_ok=True)
    media = "application/gzip" if output == "nifti" else "application/dicom"
    return Response(data, media_type=media,
                    headers={**headers, "Content-Disposition": f'attachment; filename="{path.name}"'})


def _bbox(mask: np.ndarray) -> list[list[int]] | None:
    if not mask.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        out.append([int(idx[0]), int(idx[-1])])
    return out


def unpack_mask(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of the ``bin`` output (after HTTP gzip decoding): bool (slices, rows, columns)."""
    n = shape[0] * shape[1] * shape[2]
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n).astype(bool).reshape(shape)


__all__ = ["MASK_MEDIA_TYPE", "SLICE_MEDIA_TYPE", "NativeApi", "unpack_mask"]
