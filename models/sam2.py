"""SAM 2.1 (``sam2`` package) as a :class:`models.base.Segmenter`.

* The model is built from the SAM 2.1 config shipped inside the ``sam2`` package for the configured
  size and loaded from the official checkpoint layout ``{"model": state_dict}`` with a strict key
  check (our own loader: ``sam2.build_sam._load_checkpoint`` logs through the root logger and raises
  a bare ``RuntimeError``). ``image_size`` != 1024 is passed as the hydra override
  ``++model.image_size=N`` (SAM2 was trained at 1024; smaller sizes are much faster on CPU but their
  accuracy is unvalidated).
* Slices are frames of a ``SAM2VideoPredictor`` video, fed lazily from numpy: ``init_state`` only
  accepts video files / JPEG folders, so :func:`_numpy_frames_loader` swaps the module-level
  ``sam2.sam2_video_predictor.load_video_frames`` for a wrapper that understands
  :class:`ArrayFrames` (and delegates everything else to the original) for the duration of
  ``init_state`` only, under a lock, restoring the original afterwards. Frames are converted
  one at a time (uint8 via :mod:`models.intensity`, then /255 and SAM2's ImageNet mean/std), so memory
  stays at one frame instead of 12.6 MB per frame at 1024.
* Prompts: positive and negative points become labels 1/0; the positive boxes of a slice become one
  box (their enclosing box: SAM2 takes one box per frame and object). Slices that carry only negative
  points are added as conditioning frames too (SAM2's native refinement). Negative boxes, which SAM2
  has no notion of, clear the mask inside the box on their slice.
* 3D: propagate forward from the first prompted frame to the end and backward from the last
  prompted frame to the start; masks of frames visited twice are united. SAM2 decides itself when
  the object is absent (object-score head), so there is no IoU stop rule.
* 2D: each prompted slice is a one-frame video (same code path, no torchvision transforms).
* ``slice_scores`` holds SAM2's object-presence probability (sigmoid of the object-score logit) per
  segmented slice -- the video predictor does not keep its IoU predictions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from config.settings import ModelSettings, Sam2Settings
from models.base import (
    ImageVolume,
    Mode,
    ModelError,
    ProgressCallback,
    Prompts,
    SegmentationResult,
)
from models.intensity import IntensityParams, intensity_range, to_uint8

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

logger = logging.getLogger(__name__)

#: Model size -> SAM 2.1 config inside the sam2 package.
CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
#: Official checkpoint file names, for error messages.
CHECKPOINT_NAMES = {
    "tiny": "sam2.1_hiera_tiny.pt",
    "small": "sam2.1_hiera_small.pt",
    "base_plus": "sam2.1_hiera_base_plus.pt",
    "large": "sam2.1_hiera_large.pt",
}
_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)
_PATCH_LOCK = threading.Lock()


class ArrayFrames:
    """Lazy SAM2 video frames from a (slices, rows, columns) array in modality units.

    ``frames[i]`` is a (3, S, S) float32 tensor: clipped to ``[low, high]`` and scaled to uint8 as the
    other models see it, then /255, resized to S x S (bilinear, antialiased) and ImageNet-normalised,
    i.e. what SAM2's own JPEG loader produces.
    """

    def __init__(self, array: np.ndarray, low: float, high: float, image_size: int = 1024) -> None:
        self.array = array
        self.low = low
        self.high = high
        self.image_size = image_size
        #: Frame indices read so far, in order (diagnostics and tests).
        self.accessed: list[int] = []

    @property
    def height(self) -> int:
        return int(self.array.shape[1])

    @property
    def width(self) -> int:
        return int(self.array.shape[2])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def resized(self, image_size: int) -> ArrayFrames:
        self.image_size = image_size
        return self

    def __getitem__(self, i: int) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if not -len(self) <= i < len(self):
            raise IndexError(i)
        self.accessed.append(int(i) % len(self))
        u8 = to_uint8(self.array[i], self.low, self.high)
        x = torch.from_numpy(u8).float().div_(255.0)[None, None]
        s = self.image_size
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.expand(3, -1, -1)
        mean = torch.tensor(_IMG_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(_IMG_STD, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


@contextmanager
def _numpy_frames_loader() -> Iterator[None]:
    """Let ``SAM2VideoPredictor.init_state`` accept an :class:`ArrayFrames` for the block's duration."""
    import sam2.sam2_video_predictor as svp

    with _PATCH_LOCK:
        original = svp.load_video_frames

        def loader(video_path: Any, image_size: int, *args: Any, **kwargs: Any) -> Any:
            if isinstance(video_path, ArrayFrames):
                return video_path.resized(image_size), video_path.height, video_path.width
            return original(video_path, image_size, *args, **kwargs)

        svp.load_video_frames = loader
        try:
            yield
        finally:
            svp.load_video_frames = original


class SAM2Segmenter:
    """SAM 2.1 segmenter (:class:`models.base.Segmenter`).

    Parameters
    ----------
    settings
        ``[sam2]`` settings (size, checkpoint, image_size).
    model_settings
        ``[model]`` settings (device, threads).
    intensity
        Intensity normalisation (by default the ``[litemedsam]`` window / percentiles).

    Raises
    ------
    ValueError
        When ``size`` or ``image_size`` is invalid.
    ModelError
        When the checkpoint is not configured, missing, unreadable or made for another model size,
        when ``sam2`` is not installed, or the device is unavailable.
    """

    name = "sam2"

    def __init__(
        self,
        settings: Sam2Settings | None = None,
        model_settings: ModelSettings | None = None,
        intensity: IntensityParams | None = None,
    ) -> None:
        from models.device import resolve_device

        self.settings = settings or Sam2Settings()
        model_settings = model_settings or ModelSettings()
        self.intensity = intensity or IntensityParams()
        self.intensity.validate()
        size = self.settings.size.strip().lower()
        if size not in CONFIGS:
            raise ValueError(f"sam2.size {self.settings.size!r} is unknown; use one of {', '.join(CONFIGS)}.")
        if self.settings.image_size < 64 or self.settings.image_size % 32:
            raise ValueError(
                "sam2.image_size must be a multiple of 32 and >= 64 (1024 = as trained), "
                f"got {self.settings.image_size}."
            )
        self.size = size
        self._device = resolve_device(model_settings.device, model_settings.threads)
        self.device = str(self._device)
        self.checkpoint_path, self._predictor, sha = _load_predictor(
            size, self.settings.checkpoint, self.settings.image_size, self._device
        )
        self.version = f"sam2 {_package_version()} sam2.1_hiera_{size}+{sha[:12]}"
        #: The frames object of the last segment() call (diagnostics and tests).
        self.last_frames: ArrayFrames | None = None
        logger.info("SAM2 %s loaded from %s on %s (%s)", size, self.checkpoint_path, self.device, self.version)

    def segment(
        self,
        image: ImageVolume,
        prompts: Prompts,
        mode: Mode = "3d",
        progress: ProgressCallback | None = None,
    ) -> SegmentationResult:
        """Segment one object described by ``prompts`` (see the module docstring).

        Returns
        -------
        SegmentationResult
            bool mask (slices, rows, columns); ``slice_scores`` are object-presence probabilities;
            timings ``init``, ``prompt``, ``propagate``, ``total`` in seconds.

        Raises
        ------
        PromptError
            When a prompt does not fit the image.
        ValueError
            When ``image`` or ``mode`` is invalid.
        ModelError
            When the model fails to run.
        """
        import torch

        t0 = time.perf_counter()
        a = image.array
        if not isinstance(a, np.ndarray) or a.ndim != 3 or min(a.shape) < 1:
            raise ValueError(
                f"image.array must be a 3D numpy array (slices, rows, columns), got shape {getattr(a, 'shape', None)}."
            )
        if mode not in ("2d", "3d"):
            raise ValueError(f"mode must be '2d' or '3d', got {mode!r}.")
        prompts.validate(image.shape)
        lo, hi = intensity_range(a, image.modality, self.intensity)
        out = np.zeros(image.shape, dtype=bool)
        scores: dict[int, float] = {}
        timings = {"init": 0.0, "prompt": 0.0, "propagate": 0.0}
        try:
            with torch.inference_mode():
                if mode == "2d":
                    ks = prompts.slices
                    for n, k in enumerate(ks):
                        frames = ArrayFrames(a[k : k + 1], lo, hi)
                        state = self._init(frames, timings)
                        masks = self._add_prompts(state, {0: prompts.on_slice(k)}, timings)
                        out[k] = masks[0]
                        scores[k] = _object_score(state, 0)
                        self._predictor.reset_state(state)
                        if progress is not None:
                            progress(n + 1, len(ks))
                else:
                    self._segment_3d(a, lo, hi, prompts, out, scores, timings, progress)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            raise ModelError(f"SAM2 ran out of memory on {self.device}: {exc}") from exc
        # negative boxes: clear inside the box on their slice
        for b in prompts.boxes:
            if not b.positive:
                y0, y1 = max(0, int(math.floor(b.y0))), int(math.ceil(b.y1)) + 1
                x0, x1 = max(0, int(math.floor(b.x0))), int(math.ceil(b.x1)) + 1
                out[b.k, y0:y1, x0:x1] = False
        timings["total"] = time.perf_counter() - t0
        return SegmentationResult(mask=out, slice_scores=dict(sorted(scores.items())), timings=timings)

    # ------------------------------------------------------------------ internals

    def _init(self, frames: ArrayFrames, timings: dict[str, float]) -> dict[str, Any]:
        t = time.perf_counter()
        self.last_frames = frames
        with _numpy_frames_loader():
            state: dict[str, Any] = self._predictor.init_state(video_path=frames)
        timings["init"] += time.perf_counter() - t
        return state

    def _add_prompts(
        self, state: dict[str, Any], per_frame: dict[int, Prompts], timings: dict[str, float]
    ) -> dict[int, np.ndarray]:
        t = time.perf_counter()
        masks: dict[int, np.ndarray] = {}
        for f, p in sorted(per_frame.items()):
            pts = [(q.x, q.y) for q in p.points]
            labels = [1 if q.positive else 0 for q in p.points]
            pos_boxes = [b for b in p.boxes if b.positive]
            box = None
            if pos_boxes:
                box = np.array(
                    [min(b.x0 for b in pos_boxes), min(b.y0 for b in pos_boxes),
                     max(b.x1 for b in pos_boxes), max(b.y1 for b in pos_boxes)],
                    dtype=np.float32,
                )
                if len(pos_boxes) > 1:
                    logger.info("SAM2: %d positive boxes on slice prompt %d merged into one", len(pos_boxes), f)
            if not pts and box is None:
                continue
            _, _, logits = self._predictor.add_new_points_or_box(
                state,
                frame_idx=f,
                obj_id=1,
                points=np.array(pts, dtype=np.float32) if pts else None,
                labels=np.array(labels, dtype=np.int32) if pts else None,
                box=box,
            )
            masks[f] = (logits[0, 0] > 0).cpu().numpy()
        timings["prompt"] += time.perf_counter() - t
        return masks

    def _segment_3d(
        self,
        a: np.ndarray,
        lo: float,
        hi: float,
        prompts: Prompts,
        out: np.ndarray,
        scores: dict[int, float],
        timings: dict[str, float],
        progress: ProgressCallback | None,
    ) -> None:
        n = a.shape[0]
        frames = ArrayFrames(a, lo, hi)
        state = self._init(frames, timings)
        prompted = sorted({q.k for q in prompts.points} | {b.k for b in prompts.boxes if b.positive})
        self._add_prompts(state, {k: prompts.on_slice(k) for k in prompted}, timings)
        pos = prompts.slices
        first, last = pos[0], pos[-1]
        total = (n - first) + (last + 1)
        done = 0
        t = time.perf_counter()
        for reverse, start in ((False, first), (True, last)):
            for f, _ids, logits in self._predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                out[f] |= (logits[0, 0] > 0).cpu().numpy()
                scores[f] = max(scores.get(f, 0.0), _object_score(state, f))
                done += 1
                if progress is not None:
                    progress(done, total)
        timings["propagate"] += time.perf_counter() - t
        self._predictor.reset_state(state)
        for f in list(scores):
            if not out[f].any():
                del scores[f]


def _object_score(state: dict[str, Any], frame_idx: int) -> float:
    """Object-presence probability SAM2 computed for a frame (NaN when unknown)."""
    for store in ("output_dict_per_obj", "temp_output_dict_per_obj"):
        per_obj = state.get(store, {}).get(0, {})
        for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
            out = per_obj.get(kind, {}).get(frame_idx)
            if out is not None and out.get("object_score_logits") is not None:
                return float(out["object_score_logits"].float().sigmoid().max())
    return float("nan")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sam2")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_predictor(size: str, checkpoint: str, image_size: int, device: torch.device) -> tuple[str, Any, str]:
    """Build the SAM2 video predictor for ``size`` and load ``checkpoint`` strictly.

    Raises
    ------
    ModelError
        Checkpoint not configured / missing / unreadable / not the official layout / another size.
    """
    fix = (
        f"set AINODE_SAM2_CHECKPOINT (or [sam2] checkpoint) to the official SAM 2.1 "
        f"'{CHECKPOINT_NAMES[size]}' file for sam2.size={size!r}"
    )
    if not checkpoint:
        raise ModelError(f"SAM2 needs a checkpoint and none is configured; {fix} (weights are never downloaded).")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelError(f"SAM2 checkpoint '{path}' does not exist; {fix}.")
    import torch

    try:
        from sam2.build_sam import build_sam2_video_predictor
    except ImportError as exc:
        raise ModelError(
            f"the sam2 package cannot be imported ({exc}); install it with 'pip install sam2==1.1.0'.") from exc
    try:
        sha = _sha256(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ModelError(
            f"SAM2 checkpoint '{path}' cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or "
            f"not a torch checkpoint; {fix}."
        ) from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ModelError(
            f"SAM2 checkpoint '{path}' is not in the official layout {{'model': state_dict}}; {fix}."
        )
    overrides = [] if image_size == 1024 else [f"++model.image_size={image_size}"]
    try:
        predictor = build_sam2_video_predictor(
            CONFIGS[size], ckpt_path=None, device=str(device), hydra_overrides_extra=overrides
        )
    except Exception as exc:
        raise ModelError(f"SAM2 {size} cannot be built from {CONFIGS[size]} ({type(exc).__name__}: {exc}).") from exc
    try:
        predictor.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"SAM2 checkpoint '{path}' does not match the SAM 2.1 '{size}' model (sam2.size={size!r}); it was "
            f"probably made for another size or model ({detail}); {fix}, or set sam2.size to the checkpoint's size."
        ) from exc
    predictor.to(device).eval()
    predictor.fill_hole_area = 0  # hole filling needs the CUDA extension sam2._C
    if image_size != 1024:
        logger.warning("SAM2 runs at image_size=%d (trained at 1024): accuracy is not validated", image_size)
    return str(path), predictor, sha
