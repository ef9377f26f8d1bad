"""Scale-out: model calls on the replicas of a Ray Serve deployment, with series affinity (docs/scale-out.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from config.settings import (
    InputSettings,
    LiteMedSAMSettings,
    ModelSettings,
    Sam2Settings,
    Settings,
)
from models.base import (
    BoxPrompt,
    ImageVolume,
    Mode,
    ModelError,
    PointPrompt,
    ProgressCallback,
    PromptError,
    Prompts,
    SegmentationResult,
    Segmenter,
)
from node.errors import ConfigError
from node.inference import InferencePool, InferenceQueue, QueueFullError

logger = logging.getLogger(__name__)

#: Name of the Serve application and of its deployment.
APP_NAME = "ainode"
#: Header of a replica's own error answers (its value names the error); other 5xx come from Serve itself.
ERROR_HEADER = "x-ainode-error"
#: Serve's header carrying the multiplexed model id (routing key).
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
#: Slices one pre-encoding request encodes on a replica; between requests the node's queue lets clicks go first.
PREFETCH_CHUNK = 4


class InferenceUnavailableError(QueueFullError):
    """The replicas cannot be reached, or lost a request twice; the API answers 503 with ``Retry-After``.

    A subclass of :class:`~node.inference.QueueFullError` so every route maps it as it maps a full
    queue: the work is not done, nothing is wrong with the request, and it may be sent again.
    """


# --------------------------------------------------------------------------------------- shared


def volume_fingerprint(volume: ImageVolume) -> str:
    """A digest of what the model sees: voxels (bytes, dtype, shape), spacing and modality.

    The node sends it with every call; a replica answers only from a series whose fingerprint is the
    same, so a replica holding an older copy of a series (instances added since) reloads it.
    """
    arr = np.ascontiguousarray(volume.array)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([str(arr.dtype), list(arr.shape), [float(v) for v in volume.spacing],
                         volume.modality]).encode())
    h.update(arr.data)
    return h.hexdigest()


class _Fingerprints:
    """Fingerprints of the node's loaded volumes, computed once per array (the series cache reuses them)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[weakref.ref[np.ndarray], tuple[Any, ...], str]] = {}
        self._lock = threading.Lock()

    def of(self, volume: ImageVolume) -> str:
        key = id(volume.array)
        extra = (tuple(volume.spacing), volume.modality)
        with self._lock:
            hit = self._known.get(key)
            if hit is not None and hit[0]() is volume.array and hit[1] == extra:
                return hit[2]
        digest = volume_fingerprint(volume)
        with self._lock:
            self._known = {k: v for k, v in self._known.items() if v[0]() is not None}
            self._known[key] = (weakref.ref(volume.array), extra, digest)
        return digest


def _prompts_to_json(prompts: Prompts) -> dict[str, Any]:
    return {"points": [dataclasses.asdict(p) for p in prompts.points],
            "boxes": [dataclasses.asdict(b) for b in prompts.boxes]}


def _prompts_from_json(data: dict[str, Any]) -> Prompts:
    return Prompts(points=tuple(PointPrompt(**p) for p in data.get("points", ())),
                   boxes=tuple(BoxPrompt(**b) for b in data.get("boxes", ())))


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _unpack(body: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(body), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _json_array(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)


def _pack_result(result: SegmentationResult, meta: dict[str, Any]) -> bytes:
    """The mask as its bounding box's crop (a click's mask is one slice of the volume) plus JSON meta."""
    mask = np.asarray(result.mask)
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d))) for d in range(mask.ndim)]
    if all(len(n) for n in nz):
        lo = [int(n[0]) for n in nz]
        hi = [int(n[-1]) + 1 for n in nz]
    else:
        lo = hi = [0] * mask.ndim
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=False))]
    meta = {**meta, "shape": list(mask.shape), "dtype": str(mask.dtype), "lo": lo,
            "slice_scores": {str(k): float(v) for k, v in result.slice_scores.items()},
            "timings": {k: float(v) for k, v in result.timings.items()},
            "stats": {k: int(v) for k, v in result.stats.items()}}
    return _pack({"crop": np.ascontiguousarray(crop), "meta": _json_array(meta)})


def _unpack_result(body: bytes) -> tuple[SegmentationResult, dict[str, Any]]:
    parts = _unpack(body)
    meta = json.loads(parts["meta"].tobytes())
    mask = np.zeros(tuple(meta["shape"]), dtype=np.dtype(meta["dtype"]))
    crop = parts["crop"]
    mask[tuple(slice(a, a + n) for a, n in zip(meta["lo"], crop.shape, strict=False))] = crop
    result = SegmentationResult(mask, {int(k): float(v) for k, v in meta["slice_scores"].items()},
                                dict(meta["timings"]), {k: int(v) for k, v in meta["stats"].items()})
    return result, meta


# --------------------------------------------------------------------------------------- node side


class RemoteSegmenter:
    """A :class:`~models.base.Segmenter` whose calls run on the Serve replicas (thread-safe: it holds no model).

    Each call is one HTTP request to ``inference.serve_url`` carrying the prompts, the series' UIDs and
    its fingerprint, routed by Serve's model multiplexing on ``model:SeriesInstanceUID`` so the
    replica that already holds the series (and its embeddings) gets it. A request that a replica
    could not answer (it died, Serve had no replica) is sent once more; a second failure, an
    unreachable cluster or a timeout raise :class:`InferenceUnavailableError`. The voxels are sent
    only when the replica cannot read the series from ``inference.series_url`` (an uploaded series).
    """

    device = "ray"

    def __init__(self, model: str, settings: Settings) -> None:
        import httpx

        inf = settings.inference
        self.name = model
        self.version = ""
        self.url = inf.serve_url.rstrip("/")
        self.retry_after = settings.api.retry_after_seconds
        self._timeout = inf.request_timeout_seconds
        self._http = httpx.Client(timeout=httpx.Timeout(inf.request_timeout_seconds, connect=5.0),
                                  limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self._fingerprints = _Fingerprints()
        self.retries = 0

    def close(self) -> None:
        self._http.close()

    def segment(self, image: ImageVolume, prompts: Prompts, mode: Mode = "3d",
                progress: ProgressCallback | None = None) -> SegmentationResult:
        """Run :meth:`models.base.Segmenter.segment` on a replica (see the class docstring).

        Raises
        ------
        PromptError, ModelError
            As the model raised them on the replica.
        InferenceUnavailableError
            The replicas cannot answer now.
        """
        if progress is not None:
            progress(0, 1)  # a job cancelled while it waited stops here
        result, meta = self._answer(self._request(image, {"op": "segment", "mode": mode,
                                                          "prompts": _prompts_to_json(prompts)}))
        self.version = str(meta.get("version") or self.version)
        if progress is not None:
            progress(1, 1)
        return result

    def prefetch(self, image: ImageVolume, *, order: list[int] | None = None, around: int | None = None,
                 should_stop: Callable[[], bool] | None = None, to_memory: bool = True) -> Any:
        """Pre-encode on the replica that will serve the series (same routing key as :meth:`segment`).

        :data:`PREFETCH_CHUNK` slices per request; ``should_stop()`` is checked between requests, so
        a click waits at most one chunk. Returns a :class:`models.litemedsam.PrefetchResult`.

        Raises
        ------
        InferenceUnavailableError, ModelError
            As :meth:`segment`.
        """
        from models.litemedsam import PrefetchResult, prefetch_order

        todo = [int(k) for k in (order if order is not None else prefetch_order(image.shape[0], around))]
        out = PrefetchResult()
        while todo:
            if should_stop is not None and should_stop():
                out.remaining = todo
                break
            chunk, todo = todo[:PREFETCH_CHUNK], todo[PREFETCH_CHUNK:]
            rsp = self._request(image, {"op": "prefetch", "order": chunk, "to_memory": to_memory})
            if rsp.status_code != 200 or rsp.headers.get(ERROR_HEADER):
                self._answer(rsp)  # raises the replica's error
            done = rsp.json()
            out.encoded += int(done["encoded"])
            out.loaded += int(done["loaded"])
            out.cached += int(done["cached"])
        return out

    def _request(self, image: ImageVolume, op: dict[str, Any]) -> Any:
        request: dict[str, Any] = {
            **op, "model": self.name,
            "study_instance_uid": image.study_instance_uid, "series_instance_uid": image.series_instance_uid,
            "key": image.key, "fingerprint": self._fingerprints.of(image),
        }
        rsp = self._call(image, request)
        if rsp.status_code == 404 and rsp.headers.get(ERROR_HEADER) == "SeriesNotFound":
            rsp = self._call(image, request, voxels=True)  # not readable over WADO-RS: send the voxels
        return rsp

    def _call(self, image: ImageVolume, request: dict[str, Any], voxels: bool = False) -> Any:
        import httpx

        arrays = {"request": _json_array(request)}
        if voxels:
            arrays.update(voxels=np.ascontiguousarray(image.array),
                          spacing=np.asarray(image.spacing, dtype=np.float64),
                          modality=_json_array(image.modality))
        body = _pack(arrays)
        headers = {MULTIPLEX_HEADER: f"{self.name}:{image.series_instance_uid or image.key}",
                   "content-type": "application/octet-stream"}
        last = ""
        for attempt in (1, 2):
            try:
                rsp = self._http.post(self.url, content=body, headers=headers)
            except httpx.TimeoutException as exc:
                raise InferenceUnavailableError(
                    f"The inference replicas did not answer within inference.request_timeout_seconds "
                    f"({self._timeout:g} s); retry in {self.retry_after} s.", self.retry_after) from exc
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {str(exc)[:200]}"
            else:
                if rsp.status_code < 500 or rsp.headers.get(ERROR_HEADER):
                    return rsp
                last = f"HTTP {rsp.status_code} from Serve: {rsp.text[:200]}"
            if attempt == 1:
                self.retries += 1
                logger.warning("Inference request for series %s failed on the replicas (%s); sending it once more",
                               request["series_instance_uid"], last)
        raise InferenceUnavailableError(
            f"The inference replicas at {self.url} cannot answer ({last}); retry in {self.retry_after} s.",
            self.retry_after)

    def _answer(self, rsp: Any) -> tuple[SegmentationResult, dict[str, Any]]:
        error = rsp.headers.get(ERROR_HEADER)
        if rsp.status_code == 200 and not error:
            return _unpack_result(rsp.content)
        try:
            message = str(rsp.json().get("message", ""))
        except ValueError:
            message = rsp.text[:300]
        if error == "PromptError":
            raise PromptError(message)
        if error == "ValueError":
            raise ValueError(message)
        if error in ("SeriesChanged", "SeriesNotFound", "Unavailable"):
            raise InferenceUnavailableError(f"{message}; retry in {self.retry_after} s.", self.retry_after)
        raise ModelError(f"Model '{self.name}' failed on a replica: {message}")


class RayInferencePool(InferencePool):
    """The node's inference queues with every model call forwarded to the Serve replicas.

    The queues stay on the node (priorities, ``api.queue_size``, jobs, cancellation before a call
    starts); each has ``replicas x replica_concurrency`` worker threads, so that many calls are in
    flight at once, and the replicas share them out by series.
    """

    def __init__(self, settings: Settings) -> None:
        inf = settings.inference
        if inf.replicas < 1 or inf.replica_concurrency < 1:
            raise ConfigError(f"inference.replicas ({inf.replicas}) and inference.replica_concurrency "
                              f"({inf.replica_concurrency}) must be >= 1.")
        super().__init__(settings, lambda name, s: RemoteSegmenter(name, s))

    def queue(self, name: str | None = None) -> InferenceQueue:
        key = self.resolve_name(name)
        inf = self.settings.inference
        with self._lock:
            q = self._queues.get(key)
            if q is None:
                q = InferenceQueue(key, lambda: self._loader(key, self.settings),
                                   maxsize=self.settings.api.queue_size,
                                   retry_after=self.settings.api.retry_after_seconds,
                                   workers=inf.replicas * inf.replica_concurrency)
                q.start()
                self._queues[key] = q
            return q

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            queues = list(self._queues.values())
        super().stop(timeout)
        for q in queues:
            seg = q.segmenter
            if isinstance(seg, RemoteSegmenter):
                seg.close()


def inference_pool(settings: Settings) -> InferencePool:
    """The inference backend ``inference.backend`` names: ``local`` queues or the Ray replicas.

    Raises
    ------
    node.errors.ConfigError
        When the backend is unknown or the replica counts are below 1.
    """
    backend = settings.inference.backend.strip().lower()
    if backend == "local":
        return InferencePool(settings)
    if backend == "ray":
        return RayInferencePool(settings)
    raise ConfigError(f"Config 'inference.backend' has value {settings.inference.backend[:40]!r}; "
                      "expected 'local' or 'ray'.")


# --------------------------------------------------------------------------------------- replica side


def replica_settings(settings: Settings) -> dict[str, Any]:
    """What a replica needs of the node's settings, as plain data (it crosses to other machines)."""
    inf = settings.inference
    lm = dataclasses.asdict(settings.litemedsam)
    if inf.shared_cache:
        lm["disk_cache_dir"] = inf.shared_cache
    series_url = inf.series_url or f"http://127.0.0.1:{settings.http.port}/dicomweb"
    return {"data_dir": settings.data_dir, "model": dataclasses.asdict(settings.model), "litemedsam": lm,
            "sam2": dataclasses.asdict(settings.sam2), "input": dataclasses.asdict(settings.input),
            "series_url": series_url, "series_token": inf.series_token.get_secret_value(),
            "default_model": settings.model.default}


def _settings_from(data: dict[str, Any]) -> Settings:
    return Settings(data_dir=data["data_dir"], model=ModelSettings(**data["model"]),
                    litemedsam=LiteMedSAMSettings(**data["litemedsam"]), sam2=Sam2Settings(**data["sam2"]),
                    input=InputSettings(**{k: tuple(v) if isinstance(v, list) else v  # type: ignore[arg-type]
                                           for k, v in data["input"].items()}))


class _SeriesSlot:
    """One series a replica holds (the value of Serve's multiplexed-model cache)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.volume: ImageVolume | None = None
        self.fingerprint = ""
        self.lock = threading.Lock()


class SeriesReplica:
    """A Serve replica: loads the model once, holds a few series (Serve multiplexing) and answers model calls.

    Requests are ``POST`` bodies of :func:`_pack` arrays (``request`` JSON, optional ``voxels``);
    answers are the mask's crop plus meta (``replica``: this replica's rank, ``replica_pid``,
    ``replica_id``, ``version``, ``load_seconds``). Errors carry :data:`ERROR_HEADER`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        from dicom_io.dicomweb import DicomwebClient, make_auth

        self.settings = _settings_from(config)
        token = config.get("series_token") or ""
        self._dicomweb = DicomwebClient(config["series_url"], auth=make_auth("bearer", token=token) if token else None,
                                        timeout=120.0, name="front")
        self._model_lock = threading.Lock()
        self._id, self._rank = _replica_identity()
        self._segmenter(config["default_model"])  # loaded now: the replica is healthy once it can answer
        logger.info("Replica %s (rank %d, pid %d) ready", self._id, self._rank, os.getpid())

    def _segmenter(self, name: str) -> Segmenter:
        from models.registry import load_segmenter

        return load_segmenter(name, self.settings)

    async def __call__(self, http_request: Any) -> Any:
        import asyncio

        from ray import serve
        from starlette.responses import JSONResponse, Response

        body = await http_request.body()
        try:
            arrays = _unpack(body)
            request = json.loads(arrays.pop("request").tobytes())
            if request.get("op") not in ("segment", "prefetch"):
                raise ValueError(f"unknown op {str(request.get('op'))[:40]!r}")
        except (ValueError, KeyError, OSError) as exc:
            return JSONResponse({"message": f"bad request: {str(exc)[:200]}"}, status_code=400,
                                headers={ERROR_HEADER: "BadRequest"})
        slot = await self.series(serve.get_multiplexed_model_id())
        try:
            if request["op"] == "prefetch":
                done = await asyncio.to_thread(self._prefetch, slot, request, arrays)
                return JSONResponse(done)
            content = await asyncio.to_thread(self._segment, slot, request, arrays)
        except _SeriesError as exc:
            return JSONResponse({"message": str(exc)}, status_code=exc.status, headers={ERROR_HEADER: exc.kind})
        except PromptError as exc:
            return JSONResponse({"message": str(exc)}, status_code=422, headers={ERROR_HEADER: "PromptError"})
        except ValueError as exc:
            return JSONResponse({"message": str(exc)}, status_code=422, headers={ERROR_HEADER: "ValueError"})
        except Exception as exc:  # the model failed: answered, logged, the replica goes on
            logger.exception("Model call on series %s failed", str(request.get("series_instance_uid"))[:80])
            return JSONResponse({"message": f"{type(exc).__name__}: {str(exc)[:300]}"}, status_code=500,
                                headers={ERROR_HEADER: "ModelError"})
        return Response(content, media_type="application/octet-stream")

    async def series(self, model_id: str) -> _SeriesSlot:
        """Serve's multiplexed loader (wrapped per deployment in :func:`build_app`): an empty slot, filled on use."""
        return _SeriesSlot(model_id)

    def _segment(self, slot: _SeriesSlot, request: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
        t0 = time.perf_counter()
        loaded = self._ensure(slot, request, arrays)
        load_seconds = time.perf_counter() - t0
        seg = self._segmenter(str(request["model"]))
        prompts = _prompts_from_json(request["prompts"])
        assert slot.volume is not None
        with self._model_lock:
            t1 = time.perf_counter()
            result = seg.segment(slot.volume, prompts, mode=request["mode"])
            run = time.perf_counter() - t1
        result.timings = {**result.timings, "replica_load": load_seconds, "replica_run": run}
        result.stats = {**result.stats, "replica": self._rank, "replica_pid": os.getpid(),
                        "replica_series_loaded": int(loaded)}
        return _pack_result(result, {"replica_id": self._id, "version": seg.version})

    def _prefetch(self, slot: _SeriesSlot, request: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        self._ensure(slot, request, arrays)
        seg = self._segmenter(str(request["model"]))
        prefetch = getattr(seg, "prefetch", None)
        if prefetch is None or slot.volume is None:
            return {"encoded": 0, "loaded": 0, "cached": 0}
        with self._model_lock:
            done = prefetch(slot.volume, order=[int(k) for k in request["order"]],
                            to_memory=bool(request.get("to_memory", True)))
        return {"encoded": done.encoded, "loaded": done.loaded, "cached": done.cached, "replica_pid": os.getpid()}

    def _ensure(self, slot: _SeriesSlot, request: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
        """Make ``slot`` hold the series the request's fingerprint names; True when it had to be loaded."""
        want = str(request["fingerprint"])
        with slot.lock:
            if slot.volume is not None and slot.fingerprint == want:
                return False
            volume = self._read(request, arrays)
            got = volume_fingerprint(volume)
            if got != want:
                raise _SeriesError(409, "SeriesChanged",
                                   f"series {str(request['series_instance_uid'])[:80]} read by the replica differs "
                                   "from the node's copy (instances arriving?)")
            slot.volume, slot.fingerprint = volume, got
            return True

    def _read(self, request: dict[str, Any], arrays: dict[str, np.ndarray]) -> ImageVolume:
        if "voxels" in arrays:
            return ImageVolume(arrays["voxels"], tuple(float(v) for v in arrays["spacing"]),  # type: ignore[arg-type]
                               json.loads(arrays["modality"].tobytes()), str(request["key"]),
                               str(request["study_instance_uid"]), str(request["series_instance_uid"]))
        study, series_uid = str(request["study_instance_uid"]), str(request["series_instance_uid"])
        if not study or not series_uid:
            raise _SeriesError(404, "SeriesNotFound", "the request names no stored series")
        return self._fetch(study, series_uid)

    def _fetch(self, study: str, series_uid: str) -> ImageVolume:
        """WADO-RS Retrieve Series from the node (PS3.18 10.4), assembled as the node assembles it."""
        import pydicom

        from dicom_io.dicomweb import DicomwebError
        from dicom_io.errors import DicomInputError
        from dicom_io.series import Series
        from node.pipeline import image_volume

        datasets: list[Any] = []

        def on_part(part: Any) -> None:
            try:
                datasets.append(pydicom.dcmread(io.BytesIO(part.read())))
            finally:
                part.discard()

        try:
            self._dicomweb.retrieve_series(study, series_uid, on_part)
        except DicomwebError as exc:
            if getattr(exc, "status", None) == 404:
                raise _SeriesError(404, "SeriesNotFound", f"series {series_uid[:80]} is not on the node") from exc
            raise _SeriesError(503, "Unavailable", f"series {series_uid[:80]} cannot be read: {exc}") from exc
        if not datasets:
            raise _SeriesError(404, "SeriesNotFound", f"series {series_uid[:80]} has no instances on the node")
        try:
            series = Series.from_datasets(datasets, series_uid=series_uid,
                                          spacing_tolerance=self.settings.input.spacing_tolerance)
        except DicomInputError as exc:
            raise ValueError(f"series {series_uid[:80]} cannot be used: {exc}") from exc
        return image_volume(series)


class _SeriesError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _replica_identity() -> tuple[str, int]:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        ctx = serve.get_replica_context()
    except RayServeException:  # not inside a Serve replica
        return f"pid-{os.getpid()}", -1
    rid = getattr(ctx.replica_id, "unique_id", str(ctx.replica_id))
    rank = getattr(ctx, "rank", None)
    rank = getattr(rank, "rank", rank)
    return str(rid), int(rank) if isinstance(rank, int) else -1


def build_app(settings: Settings) -> Any:
    """The Serve application: ``inference.replicas`` replicas of :class:`SeriesReplica`.

    Raises
    ------
    ImportError
        When ``ray[serve]`` is not installed (``pip install 'ainode[ray]'``).
    """
    from ray import serve

    inf = settings.inference
    per_replica = max(1, inf.series_per_replica)

    class Replica(SeriesReplica):
        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def series(self, model_id: str) -> _SeriesSlot:
            return _SeriesSlot(model_id)

    Replica.__name__ = Replica.__qualname__ = "SeriesReplica"
    deployment = serve.deployment(
        Replica, name=APP_NAME, num_replicas=inf.replicas, max_ongoing_requests=max(1, inf.replica_concurrency),
        ray_actor_options={"num_cpus": inf.replica_cpus, "num_gpus": inf.replica_gpus},
        health_check_period_s=2.0, health_check_timeout_s=30.0)
    return deployment.bind(replica_settings(settings))  # type: ignore[attr-defined]


def app_builder(args: dict[str, str]) -> Any:
    """``serve run node.scaleout:app_builder config=/etc/ainode.toml`` (and KubeRay's ``import_path``)."""
    return build_app(Settings.load(args.get("config") or None))


def deploy(settings: Settings, wait: Callable[[], None] | None = None) -> str:
    """Start (or update) the Serve application on the Ray cluster ``inference.ray_address``; returns its URL.

    Raises
    ------
    ImportError
        When ``ray[serve]`` is not installed.
    ConnectionError
        When the cluster cannot be reached (as Ray raises it).
    """
    import ray
    from ray import serve

    inf = settings.inference
    parts = urlsplit(inf.serve_url)
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    ray.init(address=inf.ray_address, ignore_reinit_error=True, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1" if local else "0.0.0.0", "port": inf.serve_port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix=parts.path.rstrip("/") or "/", blocking=False)
        if wait is not None:
            wait()
    finally:
        ray.shutdown()
    return inf.serve_url


def undeploy(settings: Settings) -> None:
    """Delete the Serve application (the cluster keeps running)."""
    import ray
    from ray import serve

    ray.init(address=settings.inference.ray_address, ignore_reinit_error=True, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def add_parsers(sub: Any, add_common: Callable[[Any], None]) -> None:
    """``ainode scaleout deploy|delete``."""
    p = sub.add_parser("scaleout", help="start or delete the inference replicas on a Ray cluster (docs/scale-out.md)",
                       description="Deploy the Serve application of [inference] (replicas, CPUs/GPUs each) on the "
                                   "Ray cluster inference.ray_address, or delete it.")
    p.add_argument("action", choices=("deploy", "delete"))
    add_common(p)


def run_command(args: Any, settings: Settings) -> int:
    try:
        if args.action == "deploy":
            url = deploy(settings)
            print(f"ainode replicas ({settings.inference.replicas}) serving at {url}")
        else:
            undeploy(settings)
            print("ainode replicas deleted")
    except ImportError as exc:
        print(f"ainode scaleout: ray[serve] is not installed (pip install 'ainode[ray]'): {exc}")
        return 2
    except (ConnectionError, RuntimeError) as exc:
        logger.error("ainode scaleout %s failed: %s", args.action, exc)
        return 1
    return 0


__all__ = ["InferenceUnavailableError", "RayInferencePool", "RemoteSegmenter", "SeriesReplica", "app_builder",
           "build_app", "deploy", "inference_pool", "undeploy", "volume_fingerprint"]
