"""Assemble one DICOM image series (single- or multi-frame) into a sorted float32 volume."""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicom_io.errors import DicomInputError, NotDicomError, SeriesError
from dicom_io.geometry import Geometry
from dicom_io.sources import DEFAULT_MAX_ZIP_BYTES, DEFAULT_MAX_ZIP_MEMBERS, DEFAULT_MAX_ZIP_RATIO, collect_files

logger = logging.getLogger(__name__)

#: ImageType / FrameType values that mark a localizer (scout) image.
LOCALIZER_TYPES = frozenset({"LOCALIZER"})
#: Weaker hints: excluded only when the instance's orientation also differs from the series'.
LOCALIZER_HINTS = frozenset({"SCOUT", "TOPOGRAM", "SURVEY", "LOCALISER", "SCANOGRAM"})
#: Largest difference between direction cosines still treated as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Positions closer than this along the normal (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-2
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: SOP classes that carry pixel data but are not images to segment (they are ignored like SR/PR).
NON_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
})


@dataclass
class Series:
    """A loaded image series.

    Attributes
    ----------
    voxels
        float32 (slices, rows, columns) in modality units (rescale applied; HU for CT), slices
        ascending along the normal ``cross(row_cosines, col_cosines)``; MONOCHROME1 inverted.
    geometry
        Voxel (x, y, k) → LPS mapping.
    source_datasets
        Distinct source instances in order of their first slice: one per slice for a single-frame
        series, the one instance of a multi-frame series. Their pixel data has been dropped after
        decoding (highdicom's Segmentation accepts such datasets as ``source_images``).
    frame_refs
        Per slice: (SOPInstanceUID, 1-based frame number or None for single-frame instances).
    warnings
        Human-readable notes about what was ignored or excluded (also logged).
    """

    voxels: np.ndarray
    geometry: Geometry
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    source_datasets: list[Dataset]
    frame_refs: list[tuple[str, int | None]]
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return self.geometry.shape

    @classmethod
    def from_datasets(
        cls,
        datasets: Sequence[Dataset],
        *,
        series_uid: str | None = None,
        spacing_tolerance: float = 0.1,
        names: Sequence[str] | None = None,
        keep_pixel_data: bool = False,
    ) -> Series:
        """Assemble a series from already read datasets.

        Parameters
        ----------
        datasets
            Instances of one or more series (non-image objects are ignored with a warning).
        series_uid
            SeriesInstanceUID to load; required when the datasets hold several image series.
        spacing_tolerance
            Relative deviation of a slice step from the median step tolerated before a gap is declared.
        names
            Labels (usually file names) used in messages, parallel to ``datasets``.
        keep_pixel_data
            Keep the pixel data elements in ``source_datasets``; by default they are deleted
            (in place) once decoded to save memory.

        Returns
        -------
        Series

        Raises
        ------
        ValueError
            When ``names`` is not parallel to ``datasets``.
        DicomInputError
            When there are no datasets.
        SeriesError
            When no single consistent image volume can be built (see :func:`load_series`).
        """
        labels = list(names) if names is not None else [f"dataset #{i + 1}" for i in range(len(datasets))]
        if len(labels) != len(datasets):
            raise ValueError("names must be parallel to datasets")
        return _assemble(list(datasets), labels, series_uid, spacing_tolerance, keep_pixel_data)


def load_series(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    workdir: Path | None = None,
    spacing_tolerance: float = 0.1,
    max_zip_bytes: int = DEFAULT_MAX_ZIP_BYTES,
    max_zip_members: int = DEFAULT_MAX_ZIP_MEMBERS,
    keep_pixel_data: bool = False,
    max_zip_ratio: float = DEFAULT_MAX_ZIP_RATIO,
) -> Series:
    """Load one image series from folders, files and/or zip archives.

    Instances are grouped by SeriesInstanceUID and sorted by position along the slice normal
    (never by InstanceNumber or file name). Localizers are excluded with a warning, non-image
    objects (SEG, SR, RT, presentation states...) are ignored with a warning.

    Pixel values: RescaleSlope/Intercept are applied per instance (per frame for multi-frame).
    MONOCHROME1 frames are inverted so that higher is brighter: ``value' = C − value`` with
    ``C = lo + hi``, where lo/hi are the smallest/largest rescaled values the stored range
    (BitsStored, PixelRepresentation) can hold, taken over all MONOCHROME1 frames of the series so
    the same mapping applies to every slice. Compressed transfer syntaxes are decoded by pydicom's
    pixel pipeline with the installed plugins (pylibjpeg, gdcm, pyjpegls).

    Parameters
    ----------
    inputs
        Folders (searched recursively), DICOM files and/or .zip archives.
    series_uid
        SeriesInstanceUID to load; required when the inputs hold several image series.
    workdir
        Folder to extract archives into; a temporary folder (removed afterwards) when None.
    spacing_tolerance
        Relative deviation of a slice step from the median step tolerated before a gap is declared.
    max_zip_bytes, max_zip_members, max_zip_ratio
        Zip archive limits (see :func:`dicom_io.sources.extract_zip`).
    keep_pixel_data
        Keep the pixel data in ``Series.source_datasets`` (dropped by default).

    Returns
    -------
    Series

    Raises
    ------
    DicomInputError
        No input, a missing path, an unreadable file.
    NotDicomError
        An explicitly given file is not DICOM.
    UnsafeArchiveError
        A zip archive is refused.
    SeriesError
        Several series without ``series_uid``, an unknown ``series_uid``, only non-image objects,
        colour images, mixed orientation / pixel spacing / matrix size / frame of reference,
        duplicate slice positions, a gap between slices, undecodable pixel data.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ainode-dicom-") as tmp:
            return _load(inputs, series_uid, Path(tmp), spacing_tolerance, max_zip_bytes,
                         max_zip_members, keep_pixel_data, max_zip_ratio)
    return _load(inputs, series_uid, Path(workdir), spacing_tolerance, max_zip_bytes,
                 max_zip_members, keep_pixel_data, max_zip_ratio)


def _load(
    inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    series_uid: str | None,
    workdir: Path,
    spacing_tolerance: float,
    max_zip_bytes: int,
    max_zip_members: int,
    keep_pixel_data: bool,
    max_zip_ratio: float = DEFAULT_MAX_ZIP_RATIO,
) -> Series:
    files = collect_files(inputs, workdir, max_zip_bytes=max_zip_bytes, max_zip_members=max_zip_members,
                          max_zip_ratio=max_zip_ratio)
    datasets: list[Dataset] = []
    names: list[str] = []
    for path in files:
        try:
            # Large elements (pixel data) are read lazily, only for the series that is kept; all
            # decoding happens before a temporary workdir is removed. Kept pixel data must be read
            # now, as the files may not outlive this call.
            ds = pydicom.dcmread(path, defer_size=None if keep_pixel_data else "64 KB", force=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise NotDicomError(f"{path.name}: cannot be read as DICOM ({exc}).") from exc
        datasets.append(ds)
        names.append(path.name)
    series = _assemble(datasets, names, series_uid, spacing_tolerance, keep_pixel_data)
    for kept in series.source_datasets:
        # Read any element still deferred: the files (e.g. a temporary zip extraction) may be
        # removed once this call returns.
        for _ in kept.iterall():
            pass
    return series


# --------------------------------------------------------------------------------------------
# internals


@dataclass
class _Frame:
    ds_index: int
    frame_number: int | None
    label: str
    sop_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    image_type: tuple[str, ...]
    thickness: float | None
    spacing_between: float | None


def _label(name: str, ds: Dataset) -> str:
    return f"{name} (SOPInstanceUID {ds.get('SOPInstanceUID', '?')})"


def _is_image(ds: Dataset) -> bool:
    if str(ds.get("SOPClassUID", "")) in NON_IMAGE_SOP_CLASSES:
        return False
    return "Rows" in ds and "Columns" in ds and any(k in ds for k in _PIXEL_KEYWORDS)


def _sop_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        return "unknown SOP class"
    name = UID(str(uid)).name
    return f"{name} ({uid})" if name != str(uid) else str(uid)


def _floats(value: Any, n: int, what: str, label: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{label}: {what} {value!r} is not numeric.") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{label}: {what} {list(value)!r} must have {n} finite values.")
    return arr


def _opt_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _fg(ds: Dataset, item: Dataset | None, seq: str) -> Dataset | None:
    """Functional group macro item: per-frame first, then shared."""
    if item is not None and seq in item and len(item[seq].value):
        first: Dataset = item[seq].value[0]
        return first
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq in shared[0] and len(shared[0][seq].value):
        common: Dataset = shared[0][seq].value[0]
        return common
    return None


def _frame_type(ds: Dataset, item: Dataset | None) -> tuple[str, ...]:
    for source in (item, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if source is None:
            continue
        for elem in source:
            if elem.keyword.endswith("FrameTypeSequence") and len(elem.value):
                ft = elem.value[0].get("FrameType")
                if ft:
                    return tuple(str(v).upper() for v in (ft if isinstance(ft, (list, MultiValue)) else [ft]))
    it = ds.get("ImageType") or []
    return tuple(str(v).upper() for v in (it if isinstance(it, (list, MultiValue)) else [it]))


def _frames_of(ds: Dataset, index: int, label: str) -> list[_Frame]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if per_frame is None and n_frames > 1:
        raise SeriesError(
            f"{label}: multi-frame instance ({n_frames} frames) without Per-frame Functional Groups; "
            "frame positions are unknown, so it cannot be loaded as a volume."
        )
    if per_frame is not None and len(per_frame) != n_frames:
        raise SeriesError(
            f"{label}: NumberOfFrames is {n_frames} but Per-frame Functional Groups has {len(per_frame)} items."
        )
    frames: list[_Frame] = []
    for f in range(n_frames):
        item = per_frame[f] if per_frame is not None else None
        flabel = f"{label} frame {f + 1}" if per_frame is not None else label
        pos_item = _fg(ds, item, "PlanePositionSequence")
        ori_item = _fg(ds, item, "PlaneOrientationSequence")
        meas = _fg(ds, item, "PixelMeasuresSequence")
        pvt = _fg(ds, item, "PixelValueTransformationSequence")
        pos = (pos_item or ds).get("ImagePositionPatient")
        ori = (ori_item or ds).get("ImageOrientationPatient")
        ps = (meas or ds).get("PixelSpacing")
        if pos is None:
            raise SeriesError(f"{flabel}: no ImagePositionPatient; the slice cannot be placed in a volume.")
        if ori is None:
            raise SeriesError(f"{flabel}: no ImageOrientationPatient; the slice cannot be placed in a volume.")
        if ps is None:
            raise SeriesError(f"{flabel}: no PixelSpacing; voxel size unknown.")
        src = pvt if pvt is not None and "RescaleSlope" in pvt else ds
        slope = _opt_float(src.get("RescaleSlope", 1.0))
        intercept = _opt_float(src.get("RescaleIntercept", 0.0))
        thickness = _opt_float((meas or ds).get("SliceThickness"))
        between = _opt_float((meas or ds).get("SpacingBetweenSlices"))
        spacing = _floats(ps, 2, "PixelSpacing", flabel)
        if np.any(spacing <= 0):
            raise SeriesError(f"{flabel}: PixelSpacing {list(spacing)} must be positive.")
        orientation = _floats(ori, 6, "ImageOrientationPatient", flabel)
        r, c = orientation[:3], orientation[3:]
        if np.linalg.norm(r) < 0.5 or np.linalg.norm(c) < 0.5:
            raise SeriesError(f"{flabel}: ImageOrientationPatient {list(orientation)} is degenerate.")
        orientation = np.concatenate([r / np.linalg.norm(r), c / np.linalg.norm(c)])
        frames.append(
            _Frame(
                ds_index=index,
                frame_number=f + 1 if per_frame is not None else None,
                label=flabel,
                sop_uid=sop_uid,
                position=_floats(pos, 3, "ImagePositionPatient", flabel),
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
                image_type=_frame_type(ds, item),
                thickness=thickness,
                spacing_between=between,
            )
        )
    return frames


def _select_series(datasets: list[Dataset], series_uid: str | None, warns: list[str]) -> list[int]:
    if not datasets:
        raise DicomInputError("No DICOM instances given.")
    images = [i for i, ds in enumerate(datasets) if _is_image(ds)]
    others = [i for i, ds in enumerate(datasets) if not _is_image(ds)]
    if not images:
        kinds = Counter(_sop_name(datasets[i]) for i in others)
        desc = ", ".join(f"{n} × {k}" for k, n in kinds.items())
        raise SeriesError(f"No image instances in the input, only non-image objects: {desc}.")
    groups: dict[str, list[int]] = {}
    for i in images:
        groups.setdefault(str(datasets[i].get("SeriesInstanceUID", "")), []).append(i)
    if series_uid is not None:
        if series_uid not in groups:
            known = ", ".join(sorted(groups))
            raise SeriesError(f"Series {series_uid} has no image instances in the input; found: {known}.")
        chosen = groups[series_uid]
    elif len(groups) > 1:
        desc = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'} ({datasets[idx[0]].get('Modality', '?')}, {len(idx)} instance(s))"
            for uid, idx in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        )
        raise SeriesError(f"The input holds {len(groups)} image series; choose one by SeriesInstanceUID: {desc}.")
    else:
        chosen = next(iter(groups.values()))
    if others:
        kinds = Counter(_sop_name(datasets[i]) for i in others)
        msg = "Ignored non-image object(s): " + ", ".join(f"{n} × {k}" for k, n in kinds.items()) + "."
        warns.append(msg)
        logger.warning("%s", msg)
    skipped = len(images) - len(chosen)
    if skipped:
        logger.info("Ignoring %d image instance(s) of other series", skipped)
    return chosen


def _orientation_key(o: np.ndarray) -> tuple[float, ...]:
    return tuple(np.round(o, 2).tolist())


def _assemble(
    datasets: list[Dataset],
    labels: list[str],
    series_uid: str | None,
    spacing_tolerance: float,
    keep_pixel_data: bool,
) -> Series:
    warns: list[str] = []
    chosen = _select_series(datasets, series_uid, warns)

    for i in chosen:
        ds = datasets[i]
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        if spp != 1:
            raise SeriesError(
                f"{_label(labels[i], ds)}: colour image (SamplesPerPixel {spp}, "
                f"{ds.get('PhotometricInterpretation', '?')}); only greyscale series can be segmented."
            )

    frames: list[_Frame] = []
    for i in chosen:
        frames.extend(_frames_of(datasets[i], i, _label(labels[i], datasets[i])))

    # Localizers.
    majority = Counter(_orientation_key(f.orientation) for f in frames).most_common(1)[0][0]
    kept: list[_Frame] = []
    excluded: list[_Frame] = []
    for f in frames:
        types = set(f.image_type)
        other_orientation = _orientation_key(f.orientation) != majority
        if types & LOCALIZER_TYPES or (other_orientation and types & LOCALIZER_HINTS):
            excluded.append(f)
        else:
            kept.append(f)
    if excluded:
        msg = f"Excluded {len(excluded)} localizer image(s): " + ", ".join(f.label for f in excluded) + "."
        warns.append(msg)
        logger.warning("%s", msg)
    if not kept:
        raise SeriesError("The series holds only localizer images; there is no volume to load.")

    # Reference orientation: the most common one among the kept frames.
    counts = Counter(_orientation_key(f.orientation) for f in kept)
    ref_key = counts.most_common(1)[0][0]
    ref = next(f for f in kept if _orientation_key(f.orientation) == ref_key)
    ref_ds = datasets[ref.ds_index]
    rows, cols = int(ref_ds.Rows), int(ref_ds.Columns)
    for_uid = str(ref_ds.get("FrameOfReferenceUID", "") or "")
    for f in kept:
        ds = datasets[f.ds_index]
        if np.max(np.abs(f.orientation - ref.orientation)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"{f.label}: ImageOrientationPatient {np.round(f.orientation, 5).tolist()} differs from "
                f"the series' {np.round(ref.orientation, 5).tolist()} (and it is not a localizer)."
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise SeriesError(
                f"{f.label}: image size {int(ds.Rows)}x{int(ds.Columns)} (rows x columns) differs from "
                f"the series' {rows}x{cols}."
            )
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise SeriesError(
                f"{f.label}: PixelSpacing {list(f.pixel_spacing)} differs from the series' {list(ref.pixel_spacing)}."
            )
        fo = str(ds.get("FrameOfReferenceUID", "") or "")
        if fo != for_uid:
            raise SeriesError(
                f"{f.label}: FrameOfReferenceUID {fo or '(none)'} differs from the series' {for_uid or '(none)'}."
            )
    if not for_uid:
        msg = "The series has no FrameOfReferenceUID; its position cannot be related to other series."
        warns.append(msg)
        logger.warning("%s", msg)

    orientation = np.mean([f.orientation for f in kept], axis=0)
    row_cos = orientation[:3] / np.linalg.norm(orientation[:3])
    col_cos = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    order = sorted(range(len(kept)), key=lambda j: float(np.dot(kept[j].position, normal)))
    kept = [kept[j] for j in order]
    positions = np.array([f.position for f in kept])
    along = positions @ normal
    n = len(kept)

    if n > 1:
        steps = np.diff(along)
        for j, d in enumerate(steps):
            if d < DUPLICATE_TOLERANCE_MM:
                raise SeriesError(
                    f"{kept[j].label} and {kept[j + 1].label} lie at the same position along the slice "
                    f"normal ({along[j]:.3f} mm; {n} images but {len(np.unique(np.round(along, 2)))} distinct "
                    "positions): several phases, echoes or acquisitions in one series are not supported."
                )
        median = float(np.median(steps))
        for j, d in enumerate(steps):
            if abs(d - median) > spacing_tolerance * median:
                raise SeriesError(
                    f"Gap in the series between {kept[j].label} and {kept[j + 1].label}: they are "
                    f"{d:.3f} mm apart along the slice normal while the median slice step is {median:.3f} mm "
                    f"(tolerance {spacing_tolerance:.0%})."
                )
        step = (positions[-1] - positions[0]) / (n - 1)
        for j in range(n - 1):
            dev = float(np.linalg.norm((positions[j + 1] - positions[j]) - step))
            if dev > spacing_tolerance * median:
                raise SeriesError(
                    f"Irregular slice positions between {kept[j].label} and {kept[j + 1].label}: the step "
                    f"deviates {dev:.3f} mm from the mean step {np.round(step, 3).tolist()}."
                )
    else:
        thickness = kept[0].thickness or kept[0].spacing_between or 1.0
        step = normal * thickness

    geometry = Geometry.from_plane(positions[0], np.concatenate([row_cos, col_cos]),
                                   ref.pixel_spacing, step, (n, rows, cols))
    voxels = _decode(datasets, kept, labels, rows, cols)

    used: list[int] = list(dict.fromkeys(f.ds_index for f in kept))
    sources = [datasets[i] for i in used]
    if not keep_pixel_data:
        for ds in sources:
            for kw in _PIXEL_KEYWORDS:
                if kw in ds:
                    delattr(ds, kw)
    study_uid = str(ref_ds.get("StudyInstanceUID", "") or "")
    series = Series(
        voxels=voxels,
        geometry=geometry,
        series_instance_uid=str(ref_ds.get("SeriesInstanceUID", "") or ""),
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        modality=str(ref_ds.get("Modality", "") or ""),
        source_datasets=sources,
        frame_refs=[(f.sop_uid, f.frame_number) for f in kept],
        warnings=warns,
    )
    logger.info(
        "Loaded series %s (%s): %d slices of %dx%d, spacing %s mm",
        series.series_instance_uid, series.modality, n, rows, cols,
        tuple(round(s, 4) for s in geometry.spacing),
    )
    return series


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _decode(
    datasets: list[Dataset], kept: list[_Frame], labels: list[str], rows: int, cols: int
) -> np.ndarray:
    voxels = np.empty((len(kept), rows, cols), dtype=np.float32)
    by_ds: dict[int, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(kept):
        by_ds.setdefault(f.ds_index, []).append((k, f))
    inv_lo: float | None = None
    inv_hi: float | None = None
    inverted: list[int] = []
    for i, items in by_ds.items():
        ds = datasets[i]
        label = _label(labels[i], ds)
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - plugins raise many kinds; report them uniformly
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            ts_name = UID(str(ts)).name if ts else "unknown transfer syntax"
            raise SeriesError(f"{label}: pixel data cannot be decoded ({ts_name}): {exc}") from exc
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if arr.size != n_frames * rows * cols:
            raise SeriesError(f"{label}: decoded pixel data has shape {arr.shape}, expected {(n_frames, rows, cols)}.")
        arr = arr.reshape(n_frames, rows, cols)
        mono1 = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"
        lo_s, hi_s = _stored_range(ds)
        for k, f in items:
            plane = arr[(f.frame_number or 1) - 1].astype(np.float64)
            voxels[k] = plane * f.slope + f.intercept
            if mono1:
                a, b = sorted((lo_s * f.slope + f.intercept, hi_s * f.slope + f.intercept))
                inv_lo = a if inv_lo is None else min(inv_lo, a)
                inv_hi = b if inv_hi is None else max(inv_hi, b)
                inverted.append(k)
        del arr
    if inverted:
        assert inv_lo is not None and inv_hi is not None
        c = np.float32(inv_lo + inv_hi)
        voxels[inverted] = c - voxels[inverted]
        logger.info("Inverted %d MONOCHROME1 slice(s) as value' = %g - value", len(inverted), float(c))
    return voxels
