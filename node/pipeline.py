"""One segmentation end to end: series + prompts → model → NIfTI + DICOM SEG on disk."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config.settings import Settings
from dicom_io.nifti import write_nifti
from dicom_io.seg import AlgorithmSpec, SegmentSpec, build_seg, write_seg
from dicom_io.series import Series
from models.base import ImageVolume, Mode, ProgressCallback, Prompts, Segmenter
from node import __version__

logger = logging.getLogger(__name__)


@dataclass
class SegmentationOutcome:
    """What a segmentation produced, with the time spent per stage (seconds)."""

    mask: np.ndarray
    voxel_count: int
    volume_ml: float
    slices: list[int]
    slice_scores: dict[int, float]
    nifti_path: Path | None = None
    image_nifti_path: Path | None = None
    seg_path: Path | None = None
    seg_sop_instance_uid: str | None = None
    seg_series_instance_uid: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def image_volume(series: Series) -> ImageVolume:
    """What the model sees of a series."""
    return ImageVolume(
        array=series.voxels,
        spacing=series.geometry.spacing,
        modality=str(series.modality or ""),
        key=f"{series.series_instance_uid}:{series.voxels.shape}",
    )


def safe_name(text: str) -> str:
    """A file-name-safe form of a label or UID."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return cleaned or "segmentation"


def run_segmentation(
    series: Series,
    prompts: Prompts,
    segmenter: Segmenter,
    settings: Settings,
    *,
    out_dir: Path,
    name: str | None = None,
    mode: Mode = "3d",
    segment: SegmentSpec | None = None,
    write_nifti_mask: bool = True,
    write_dicom_seg: bool = True,
    save_image: bool = False,
    progress: ProgressCallback | None = None,
) -> SegmentationOutcome:
    """Segment ``series`` with ``prompts`` and write ``<name>.nii.gz`` and ``<name>.seg.dcm``.

    Raises
    ------
    models.base.PromptError
        When a prompt does not fit the series.
    models.base.ModelError
        When the model fails.
    ValueError
        When the segment description is invalid.
    """
    segment = segment or SegmentSpec(
        label=settings.seg.label, color=settings.seg.color,
        category=settings.seg.category, type=settings.seg.type,
    )
    segment.validate()
    prompts.validate(series.voxels.shape)
    name = safe_name(name or f"{series.series_instance_uid}_{segment.label}")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    result = segmenter.segment(image_volume(series), prompts, mode=mode, progress=progress)
    timings["inference"] = time.perf_counter() - t0
    for key in ("encode", "decode"):
        if key in result.timings:
            timings[key] = result.timings[key]
    mask = np.asarray(result.mask, dtype=bool)
    if mask.shape != series.voxels.shape:
        raise RuntimeError(f"Model returned a mask of shape {mask.shape} for a volume of {series.voxels.shape}.")

    voxel_count = int(mask.sum())
    outcome = SegmentationOutcome(
        mask=mask,
        voxel_count=voxel_count,
        volume_ml=voxel_count * series.geometry.voxel_volume_ml,
        slices=[int(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0]],
        slice_scores=dict(result.slice_scores),
        timings=timings,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_nifti_mask:
        t = time.perf_counter()
        outcome.nifti_path = write_nifti(mask.astype(np.uint8), series.geometry, out_dir / f"{name}.nii.gz")
        if save_image:
            outcome.image_nifti_path = write_nifti(series.voxels, series.geometry, out_dir / f"{name}.image.nii.gz")
        timings["nifti"] = time.perf_counter() - t
    if write_dicom_seg:
        t = time.perf_counter()
        seg = build_seg(
            mask, series, segment,
            AlgorithmSpec(name=segmenter.name, version=segmenter.version),
            manufacturer=settings.seg.manufacturer,
            software_version=__version__,
            series_description=settings.seg.series_description,
            series_number=settings.seg.series_number,
        )
        outcome.seg_path = write_seg(seg, out_dir / f"{name}.seg.dcm")
        outcome.seg_sop_instance_uid = str(seg.SOPInstanceUID)
        outcome.seg_series_instance_uid = str(seg.SeriesInstanceUID)
        timings["seg"] = time.perf_counter() - t
    logger.info(
        "Segmented series %s with %s (%s): %d voxels, %.2f mL on %d slices",
        series.series_instance_uid, segmenter.name, mode, voxel_count, outcome.volume_ml, len(outcome.slices),
    )
    return outcome
