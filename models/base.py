"""The segmenter interface: prompts in voxel coordinates in, a boolean mask volume out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Mode = Literal["2d", "3d"]

#: Called as ``progress(done, total)`` while a model works through slices; ``total`` may grow.
ProgressCallback = Callable[[int, int], None]


class ModelError(RuntimeError):
    """A model cannot be loaded or run (missing or mismatched checkpoint, out of memory...)."""


class PromptError(ValueError):
    """A prompt does not fit the volume it is applied to."""


@dataclass(frozen=True)
class PointPrompt:
    """A click at column ``x``, row ``y`` (pixels, may be fractional) on slice ``k``."""

    x: float
    y: float
    k: int
    positive: bool = True


@dataclass(frozen=True)
class BoxPrompt:
    """A box from (``x0``, ``y0``) to (``x1``, ``y1``) in pixels on slice ``k``, corners inclusive.

    A negative box marks a region to exclude from the result.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    k: int
    positive: bool = True


@dataclass(frozen=True)
class Prompts:
    """Points and boxes in voxel coordinates of a volume of shape (slices, rows, columns)."""

    points: tuple[PointPrompt, ...] = ()
    boxes: tuple[BoxPrompt, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.points or self.boxes)

    @property
    def slices(self) -> list[int]:
        """Prompted slice indices that carry at least one positive prompt, ascending."""
        ks = {p.k for p in self.points if p.positive} | {b.k for b in self.boxes if b.positive}
        return sorted(ks)

    def on_slice(self, k: int) -> Prompts:
        return Prompts(
            points=tuple(p for p in self.points if p.k == k),
            boxes=tuple(b for b in self.boxes if b.k == k),
        )

    def validate(self, shape: tuple[int, int, int]) -> None:
        """Check every prompt against a (slices, rows, columns) shape.

        Raises
        ------
        PromptError
            Naming the prompt and the problem: no positive prompt, a slice or point outside the
            volume, an empty or inverted box.
        """
        n_slices, rows, cols = shape
        if not self.slices:
            raise PromptError("At least one positive point or box is required.")
        for i, p in enumerate(self.points):
            name = f"point {i} ({p.x:g},{p.y:g}@{p.k})"
            if not (0 <= p.k < n_slices):
                raise PromptError(f"{name}: slice {p.k} is outside the volume (0..{n_slices - 1}).")
            if not (0 <= p.x <= cols - 1 and 0 <= p.y <= rows - 1):
                raise PromptError(
                    f"{name}: outside the slice (x 0..{cols - 1}, y 0..{rows - 1})."
                )
        for i, b in enumerate(self.boxes):
            name = f"box {i} ({b.x0:g},{b.y0:g},{b.x1:g},{b.y1:g}@{b.k})"
            if not (0 <= b.k < n_slices):
                raise PromptError(f"{name}: slice {b.k} is outside the volume (0..{n_slices - 1}).")
            if b.x1 < b.x0 or b.y1 < b.y0:
                raise PromptError(f"{name}: x1,y1 must not be smaller than x0,y0.")
            if b.x1 - b.x0 < 1 or b.y1 - b.y0 < 1:
                raise PromptError(f"{name}: the box is empty (less than one pixel wide or high).")
            if b.x1 < 0 or b.y1 < 0 or b.x0 > cols - 1 or b.y0 > rows - 1:
                raise PromptError(
                    f"{name}: outside the slice (x 0..{cols - 1}, y 0..{rows - 1})."
                )


@dataclass
class ImageVolume:
    """What a model sees of a series.

    Attributes
    ----------
    array
        float32 array of shape (slices, rows, columns) in modality units (HU for CT).
    spacing
        Voxel size in mm as (column spacing, row spacing, slice spacing).
    modality
        DICOM Modality (``CT``, ``MR``...), used to pick the intensity normalisation.
    key
        Identifies the image content (e.g. SeriesInstanceUID) for embedding caches; empty: no caching
        across calls.
    study_instance_uid, series_instance_uid
        Where the voxels came from (empty when unknown): a segmenter that forwards calls to remote
        replicas (node/scaleout.py) sends these instead of the voxels, and the replica reads the series.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    modality: str = "CT"
    key: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))


@dataclass
class SegmentationResult:
    """A boolean mask of shape (slices, rows, columns) and per-slice model scores (predicted IoU).

    ``timings`` are seconds per stage; ``stats`` are counts (slices encoded, decoder calls...).
    """

    mask: np.ndarray
    slice_scores: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)


class Segmenter(Protocol):
    """A promptable model. Implementations are not thread-safe; callers serialise calls."""

    #: Short model name used in APIs and in the SEG's algorithm identification.
    name: str
    #: Version string: package version plus a hash of the weights.
    version: str
    #: torch device string actually used (``cpu``, ``cuda:0``).
    device: str

    def segment(
        self,
        image: ImageVolume,
        prompts: Prompts,
        mode: Mode = "3d",
        progress: ProgressCallback | None = None,
    ) -> SegmentationResult:
        """Segment one object described by ``prompts``.

        Raises
        ------
        PromptError
            When a prompt does not fit the image.
        ModelError
            When the model fails to run.
        """
        ...
