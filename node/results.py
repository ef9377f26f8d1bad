"""The one result writer: a segmentation over a series → NIfTI and/or DICOM SEG files (CLI and API alike)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from config.settings import Settings
from dicom_io.seg import AlgorithmSpec, SegmentSpec, build_seg, write_seg
from dicom_io.series import Series
from node import __version__

logger = logging.getLogger(__name__)

#: Output names a result may ask for.
OUTPUTS = ("nifti", "seg")


@dataclass
class Written:
    """Files written for one result."""

    nifti: Path | None = None
    image_nifti: Path | None = None
    seg: Path | None = None
    seg_sop_instance_uid: str | None = None
    seg_series_instance_uid: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def write_outputs(series: Series, mask: np.ndarray, segment: SegmentSpec, settings: Settings, segmenter_name: str,
                  segmenter_version: str, out_dir: Path, name: str, outputs: Sequence[str], *,
                  save_image: bool = False, algorithm_type: str = "SEMIAUTOMATIC") -> Written:
    """Write ``<name>.nii.gz`` and/or ``<name>.seg.dcm`` for ``mask`` over ``series`` (blocking).

    Parameters
    ----------
    mask
        bool (slices, rows, columns) in the series' sorted slice order.
    outputs
        Any of :data:`OUTPUTS`.
    save_image
        Also write the image itself as ``<name>.image.nii.gz`` (with ``nifti``).

    Raises
    ------
    ValueError
        When the mask does not fit the series or the segment is invalid.
    """
    from dicom_io.nifti import write_nifti

    out = Written()
    out_dir.mkdir(parents=True, exist_ok=True)
    if "nifti" in outputs:
        t = time.perf_counter()
        out.nifti = write_nifti(np.asarray(mask).astype(np.uint8), series.geometry, out_dir / f"{name}.nii.gz")
        if save_image:
            out.image_nifti = write_nifti(series.voxels, series.geometry, out_dir / f"{name}.image.nii.gz")
        out.timings["nifti"] = time.perf_counter() - t
    if "seg" in outputs:
        t = time.perf_counter()
        seg = build_seg(mask, series, segment,
                        AlgorithmSpec(name=segmenter_name, version=segmenter_version, algorithm_type=algorithm_type),
                        manufacturer=settings.seg.manufacturer, software_version=__version__,
                        series_description=settings.seg.series_description,
                        series_number=settings.seg.series_number)
        out.seg = write_seg(seg, out_dir / f"{name}.seg.dcm")
        out.seg_sop_instance_uid = str(seg.SOPInstanceUID)
        out.seg_series_instance_uid = str(seg.SeriesInstanceUID)
        out.timings["seg"] = time.perf_counter() - t
    return out


__all__ = ["OUTPUTS", "Written", "write_outputs"]
