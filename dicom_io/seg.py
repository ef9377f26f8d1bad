"""DICOM Segmentation (PS3.3 A.51) writer and reader for masks over a loaded series."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_io.errors import DicomInputError

if TYPE_CHECKING:
    from dicom_io.series import Series

logger = logging.getLogger(__name__)

__all__ = ["LABELMAP_SEG_SOP_CLASS", "SEG_FORMATS", "SEG_SOP_CLASS", "AlgorithmSpec", "SegmentSpec", "build_seg",
           "label_map", "parse_code", "read_seg_mask", "read_seg_masks", "resolve_format", "segments_overlap",
           "stack_masks", "write_seg"]


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


#: Label Map Segmentation Storage (PS3.4 B.5, Supplement 243): one frame per slice holding segment numbers.
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
#: Segmentation Storage: BINARY (one bit-packed frame per slice and segment) or FRACTIONAL.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

#: Values of ``seg.format``: ``auto`` (label map where segments do not overlap and the destination accepts
#: it, else BINARY), ``labelmap`` (label map unless segments overlap) or ``binary``.
SEG_FORMATS = ("auto", "labelmap", "binary")


def stack_masks(masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Segment masks as one bool array (segments, slices, rows, columns); a 3-D mask is one segment."""
    if isinstance(masks, np.ndarray):
        arr = masks
    else:
        arr = np.stack([np.asarray(m) for m in masks]) if len(masks) else np.zeros((0, 0, 0, 0), dtype=bool)
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[np.newaxis]
    if arr.ndim != 4:
        raise ValueError(f"Masks must be (slices, rows, columns) or (segments, slices, rows, columns); got shape "
                         f"{arr.shape}.")
    return arr.astype(bool, copy=False)


def segments_overlap(masks: np.ndarray | Sequence[np.ndarray]) -> bool:
    """True when a voxel belongs to more than one segment (such segments cannot be one label map)."""
    stacked = stack_masks(masks)
    if stacked.shape[0] < 2:
        return False
    seen = np.zeros(stacked.shape[1:], dtype=bool)
    for m in stacked:
        if np.logical_and(seen, m).any():
            return True
        seen |= m
    return False


def label_map(masks: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Non-overlapping segment masks as one uint8/uint16 array of segment numbers (0 = background).

    Raises
    ------
    ValueError
        When segments overlap (a label map would flatten them).
    """
    stacked = stack_masks(masks)
    dtype = np.uint8 if stacked.shape[0] < 256 else np.uint16
    out = np.zeros(stacked.shape[1:], dtype=dtype)
    for n, m in enumerate(stacked, start=1):
        if n > 1 and out[m].any():
            raise ValueError("Segments overlap; a label map would flatten them. Write a BINARY SEG instead.")
        out[m] = n
    return out


def resolve_format(requested: str, overlap: bool, accepts_labelmap: bool = True) -> str:
    """``binary`` or ``labelmap``: what to write for ``seg.format`` = ``requested``.

    Overlapping segments are always BINARY (never flattened); ``auto`` writes a label map only where
    ``accepts_labelmap``.

    Raises
    ------
    ValueError
        When ``requested`` is not one of :data:`SEG_FORMATS`.
    """
    if requested not in SEG_FORMATS:
        raise ValueError(f"SEG format '{requested}' is not one of {', '.join(SEG_FORMATS)}.")
    if overlap or requested == "binary":
        return "binary"
    if requested == "labelmap":
        return "labelmap"
    return "labelmap" if accepts_labelmap else "binary"


def build_seg(
    mask: np.ndarray | Sequence[np.ndarray],
    series: Series,
    segment: SegmentSpec | Sequence[SegmentSpec],
    algorithm: AlgorithmSpec,
    *,
    manufacturer: str = "ainode",
    software_version: str = "0.1.0",
    series_description: str = "ainode segmentation",
    series_number: int = 9901,
    seg_format: str = "binary",
) -> hd.seg.Segmentation:
    """Build a DICOM SEG of one or several segments over ``series``, BINARY or as a Label Map.

    Parameters
    ----------
    mask
        bool array (slices, rows, columns) for one segment, or (segments, slices, rows, columns) /
        a sequence of such arrays for several, in the series' sorted slice order.
    series
        The source series; patient and study attributes are copied from it and every frame
        references its source instance (and frame, for multi-frame sources).
    segment
        One :class:`SegmentSpec` per segment (segment numbers 1..n in this order).
    seg_format
        ``binary`` (Segmentation Storage, SegmentationType BINARY, Explicit VR Little Endian) or
        ``labelmap`` (Label Map Segmentation Storage, PS3.3 A.51 as of Supplement 243, RLE Lossless);
        ``auto`` is resolved by the caller (:func:`resolve_format`).

    Returns
    -------
    highdicom.seg.Segmentation
        A new instance with its own SeriesInstanceUID and SOPInstanceUID.

    Raises
    ------
    ValueError
        When a mask does not have the series' shape, the number of masks and segment specs differ, a
        segment spec is invalid, ``seg_format`` is unknown, or a label map is asked for overlapping segments.
    """
    stacked = stack_masks(mask)
    specs = [segment] if isinstance(segment, SegmentSpec) else list(segment)
    if stacked.shape[1:] != series.voxels.shape:
        raise ValueError(f"Mask shape {stacked.shape[1:]} does not match the series shape {series.voxels.shape}.")
    if len(specs) != stacked.shape[0] or not specs:
        raise ValueError(f"{stacked.shape[0]} mask(s) but {len(specs)} segment description(s); give one per mask.")
    if seg_format not in ("binary", "labelmap"):
        raise ValueError(f"SEG format '{seg_format}' is not 'binary' or 'labelmap' (resolve 'auto' first).")
    for spec in specs:
        spec.validate()
    labelmap = seg_format == "labelmap"
    sources = list(series.source_datasets)
    # highdicom wants (frames, rows, columns[, segments]) in source order: a label map (one frame per slice
    # whatever the number of segments) or stacked binary segments.
    # Segments that do not overlap go to highdicom as one label-map style array even for BINARY (it splits
    # them into per-segment frames ~3x faster than from a stacked (..., segments) array: benchmarks/seg_write).
    if stacked.shape[0] == 1:
        per_slice = stacked[0] if not labelmap else stacked[0].astype(np.uint8)
    elif labelmap:
        per_slice = label_map(stacked)  # raises when segments overlap
    else:
        try:
            per_slice = label_map(stacked)
        except ValueError:  # overlapping: stacked, each segment whole
            per_slice = np.moveaxis(stacked, 0, -1)
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        # One multi-frame source: highdicom wants frames in the source's frame order (1..N).
        frames = np.zeros((int(sources[0].NumberOfFrames),) + per_slice.shape[1:], dtype=per_slice.dtype)
        for k, (_uid, frame) in enumerate(series.frame_refs):
            if frame is None:
                raise DicomInputError("Multi-frame source slice without a frame number.")
            frames[frame - 1] = per_slice[k]
        pixel_array = frames
    else:
        pixel_array = per_slice

    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=spec.label,
            segmented_property_category=parse_code(spec.category),
            segmented_property_type=parse_code(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues(algorithm.algorithm_type),
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm.name,
                version=algorithm.version[:64],
                family=codes.cid7162.ArtificialIntelligence,
            ),
            tracking_uid=hd.UID(),
            tracking_id=f"{spec.label[:48]}",
            display_color=hd.color.CIELabColor.from_string(spec.color),
        )
        for n, spec in enumerate(specs, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP if labelmap
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description[:64],
        content_label=_content_label(specs[0].label if len(specs) == 1 else "SEGMENTATION"),
        content_description=f"{algorithm.name} {algorithm.algorithm_type.lower()} segmentation"[:64],
        omit_empty_frames=bool(stacked.any()),
        # A label map's 8/16-bit frames are RLE Lossless (as OHIF 3.13 writes them): a 512x512x300 label map is
        # ~31 MB uncompressed; a BINARY SEG stays 1-bit Explicit VR Little Endian (what every reader takes).
        transfer_syntax_uid=RLELossless if labelmap else ExplicitVRLittleEndian,
    )
    logger.info(
        "Built %s SEG %s (series %s) over source series %s: %d segment(s), %d frames",
        seg_format, seg.SOPInstanceUID, seg.SeriesInstanceUID, series.series_instance_uid, len(specs),
        int(seg.NumberOfFrames),
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


def read_seg_mask(path: str | Path, series: Series, segment_number: int = 1,
                  seg: hd.seg.Segmentation | None = None) -> np.ndarray:
    """Read a SEG back into a bool mask (slices, rows, columns) in ``series``' slice order.

    Raises
    ------
    DicomInputError
        When the file is not a SEG or does not reference ``series``.
    """
    if seg is None:
        try:
            seg = hd.seg.segread(path)
        except (AttributeError, ValueError, TypeError) as exc:
            raise DicomInputError(f"{Path(path).name}: not a readable DICOM SEG ({exc}).") from exc
    return np.asarray(_read_segments(seg, path, series, [segment_number])[0], dtype=bool)


def _read_segments(seg: hd.seg.Segmentation, path: str | Path, series: Series, numbers: list[int]) -> np.ndarray:
    """bool (len(numbers), slices, rows, columns) in ``series``' slice order."""
    # Segments are read stacked (combine_segments=False): highdicom 0.28.2 combining a label map's chosen
    # segments returns every label, so each segment is its own channel here, BINARY and label map alike.
    sources = list(series.source_datasets)
    try:
        if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
            frames = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=sources[0].SOPInstanceUID,
                source_frame_numbers=list(range(1, int(sources[0].NumberOfFrames) + 1)),
                segment_numbers=numbers,
                combine_segments=False,
                assert_missing_frames_are_empty=True,
            ).astype(bool)
            picked = []
            for _uid, frame in series.frame_refs:
                if frame is None:
                    raise DicomInputError("Multi-frame source slice without a frame number.")
                picked.append(frames[frame - 1])
            arr = np.stack(picked)
        else:
            arr = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[uid for uid, _ in series.frame_refs],
                segment_numbers=numbers,
                combine_segments=False,
                assert_missing_frames_are_empty=True,
            )
    except (KeyError, ValueError) as exc:
        raise DicomInputError(
            f"{Path(path).name}: SEG does not reference series {series.series_instance_uid} ({exc})."
        ) from exc
    return np.moveaxis(np.asarray(arr).astype(bool), -1, 0)


def read_seg_masks(path: str | Path, series: Series) -> tuple[np.ndarray, list[str]]:
    """Read every segment of a SEG (BINARY or label map) in ``series``' slice order.

    Returns
    -------
    tuple
        bool masks (segments, slices, rows, columns) for segment numbers 1..n, and their labels.

    Raises
    ------
    DicomInputError
        When the file is not a SEG or does not reference ``series``.
    """
    try:
        seg = hd.seg.segread(path)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomInputError(f"{Path(path).name}: not a readable DICOM SEG ({exc}).") from exc
    # A label map describes its background as segment 0 (Supplement 243); segments are 1..n.
    described = [d for d in seg.SegmentSequence if int(d.SegmentNumber) > 0]
    numbers = [int(d.SegmentNumber) for d in described]
    labels = [str(d.SegmentLabel) for d in described]
    masks = _read_segments(seg, path, series, numbers) if numbers else np.zeros((0,) + series.voxels.shape, bool)
    return masks, labels
