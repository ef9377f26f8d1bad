"""DICOM Segmentation (PS3.3 A.51) writer and reader for masks over a loaded series."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_io.errors import DicomInputError

if TYPE_CHECKING:
    from dicom_io.series import Series

logger = logging.getLogger(__name__)

__all__ = ["SegmentSpec", "AlgorithmSpec", "parse_code", "build_seg", "write_seg", "read_seg_mask"]


def parse_code(text: str) -> Code:
    """Parse ``SCHEME^VALUE^MEANING`` (e.g. ``SCT^91723000^Anatomical Structure``) into a Code.

    Raises
    ------
    ValueError
        When the text does not have exactly three non-empty ``^``-separated parts.
    """
    parts = [p.strip() for p in text.split("^")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"Code '{text}' is not of the form SCHEME^VALUE^MEANING, e.g. 'SCT^91723000^Anatomical Structure'."
        )
    scheme, value, meaning = parts
    return Code(value=value, scheme_designator=scheme, meaning=meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment is: label, display colour and its coded category and type (CID 7150/7151)."""

    label: str = "Segment"
    color: str = "yellow"
    category: str = "SCT^91723000^Anatomical Structure"
    type: str = "SCT^91723000^Anatomical Structure"

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot be written."""
        if not self.label.strip() or len(self.label) > 64:
            shown = self.label if len(self.label) <= 80 else self.label[:80] + f"... ({len(self.label)} characters)"
            raise ValueError(f"Segment label '{shown}' must be 1 to 64 characters.")
        if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in self.label):
            raise ValueError(f"Segment label {self.label!r} holds a control character or a backslash, which a "
                             "DICOM LO value (SegmentLabel, PS3.5 6.2) cannot hold.")
        try:
            hd.color.CIELabColor.from_string(self.color)
        except ValueError as exc:
            raise ValueError(f"Segment colour '{self.color}' is not a colour name or #rrggbb.") from exc
        parse_code(self.category)
        parse_code(self.type)


@dataclass(frozen=True)
class AlgorithmSpec:
    """The algorithm that produced the mask: model name, version (weights hash) and how it was driven."""

    name: str
    version: str
    #: SEMIAUTOMATIC for prompted results (PS3.3 C.8.20.2.3), AUTOMATIC without a user in the loop.
    algorithm_type: str = "SEMIAUTOMATIC"


def build_seg(
    mask: np.ndarray,
    series: Series,
    segment: SegmentSpec,
    algorithm: AlgorithmSpec,
    *,
    manufacturer: str = "ainode",
    software_version: str = "0.1.0",
    series_description: str = "ainode segmentation",
    series_number: int = 9901,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG of one segment over ``series``.

    Parameters
    ----------
    mask
        bool array (slices, rows, columns) in the series' sorted slice order.
    series
        The source series; patient and study attributes are copied from it and every frame
        references its source instance (and frame, for multi-frame sources).

    Returns
    -------
    highdicom.seg.Segmentation
        A new instance with its own SeriesInstanceUID and SOPInstanceUID.

    Raises
    ------
    ValueError
        When the mask does not have the series' shape or the segment spec is invalid.
    """
    mask = np.asarray(mask)
    if mask.shape != series.voxels.shape:
        raise ValueError(
            f"Mask shape {mask.shape} does not match the series shape {series.voxels.shape}."
        )
    segment.validate()
    mask = mask.astype(bool)
    sources = list(series.source_datasets)
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        # One multi-frame source: highdicom wants frames in the source's frame order (1..N).
        frames = np.zeros((int(sources[0].NumberOfFrames),) + mask.shape[1:], dtype=bool)
        for k, (_uid, frame) in enumerate(series.frame_refs):
            if frame is None:
                raise DicomInputError("Multi-frame source slice without a frame number.")
            frames[frame - 1] = mask[k]
        pixel_array = frames
    else:
        pixel_array = mask

    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment.label,
        segmented_property_category=parse_code(segment.category),
        segmented_property_type=parse_code(segment.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues(algorithm.algorithm_type),
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            version=algorithm.version[:64],
            family=codes.cid7162.ArtificialIntelligence,
        ),
        tracking_uid=hd.UID(),
        tracking_id=f"{segment.label[:48]}",
        display_color=hd.color.CIELabColor.from_string(segment.color),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description[:64],
        content_label=_content_label(segment.label),
        content_description=f"{algorithm.name} {algorithm.algorithm_type.lower()} segmentation"[:64],
        omit_empty_frames=bool(mask.any()),
    )
    logger.info(
        "Built SEG %s (series %s) over source series %s: %d frames",
        seg.SOPInstanceUID, seg.SeriesInstanceUID, series.series_instance_uid, int(seg.NumberOfFrames),
    )
    return seg


def _content_label(label: str) -> str:
    """ContentLabel is a CS: upper case letters, digits, space and underscore, 16 characters."""
    cleaned = "".join(c if c.isalnum() else "_" for c in label.upper())[:16]
    return cleaned if cleaned and cleaned[0].isalpha() else ("SEG_" + cleaned)[:16]


def write_seg(seg: pydicom.Dataset, path: str | Path) -> Path:
    """Save a SEG dataset to ``path`` (parent directories created), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    seg.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def read_seg_mask(path: str | Path, series: Series, segment_number: int = 1) -> np.ndarray:
    """Read a SEG back into a bool mask (slices, rows, columns) in ``series``' slice order.

    Raises
    ------
    DicomInputError
        When the file is not a SEG or does not reference ``series``.
    """
    try:
        seg = hd.seg.segread(path)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomInputError(f"{Path(path).name}: not a readable DICOM SEG ({exc}).") from exc
    sources = list(series.source_datasets)
    try:
        if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
            frames = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=sources[0].SOPInstanceUID,
                source_frame_numbers=list(range(1, int(sources[0].NumberOfFrames) + 1)),
                segment_numbers=[segment_number],
                combine_segments=True,
                assert_missing_frames_are_empty=True,
            ).astype(bool)
            picked = []
            for _uid, frame in series.frame_refs:
                if frame is None:
                    raise DicomInputError("Multi-frame source slice without a frame number.")
                picked.append(frames[frame - 1])
            return np.stack(picked)
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid for uid, _ in series.frame_refs],
            segment_numbers=[segment_number],
            combine_segments=True,
            assert_missing_frames_are_empty=True,
        )
    except (KeyError, ValueError) as exc:
        raise DicomInputError(
            f"{Path(path).name}: SEG does not reference series {series.series_instance_uid} ({exc})."
        ) from exc
    return np.asarray(arr).astype(bool)
