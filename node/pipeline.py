"""One segmentation end to end: series + prompts → model → NIfTI + DICOM SEG on disk."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config.settings import Settings
from dicom_io.seg import SegmentSpec
from dicom_io.series import Series
from models.base import ImageVolume, Mode, ProgressCallback, Prompts, Segmenter
from node.results import write_outputs

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
    #: BINARY copy of a Label Map ``seg_path`` for destinations that need one.
    seg_binary_path: Path | None = None
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
        study_instance_uid=str(series.study_instance_uid or ""),
        series_instance_uid=str(series.series_instance_uid or ""),
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
    destinations: Sequence[str] = (),
) -> SegmentationOutcome:
    """Segment ``series`` with ``prompts`` and write ``<name>.nii.gz`` and ``<name>.seg.dcm``.

    ``destinations``: where the SEG will be delivered (decides its form, see :func:`node.results.plan_seg`).

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
    outputs = [o for o, on in (("nifti", write_nifti_mask), ("seg", write_dicom_seg)) if on]
    written = write_outputs(series, mask, segment, settings, segmenter.name, segmenter.version, out_dir, name,
                            outputs, save_image=save_image, destinations=destinations)
    outcome.seg_binary_path = written.seg_binary
    outcome.nifti_path, outcome.image_nifti_path, outcome.seg_path = written.nifti, written.image_nifti, written.seg
    outcome.seg_sop_instance_uid = written.seg_sop_instance_uid
    outcome.seg_series_instance_uid = written.seg_series_instance_uid
    timings.update(written.timings)
    logger.info(
        "Segmented series %s with %s (%s): %d voxels, %.2f mL on %d slices",
        series.series_instance_uid, segmenter.name, mode, voxel_count, outcome.volume_ml, len(outcome.slices),
    )
    return outcome
