"""Synthetic CT/MR DICOM series with a ground-truth lesion, for demos and tests."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from dicom_io.geometry import Geometry

logger = logging.getLogger(__name__)

#: Tissue values: (CT HU, MR signal).
_BACKGROUND = (-1000.0, 0.0)
_SOFT_TISSUE = (40.0, 300.0)
_LUNG = (-800.0, 60.0)
_SPINE = (700.0, 150.0)
_LESION = (60.0, 900.0)


@dataclass(frozen=True)
class Phantom:
    """What :func:`write_phantom_series` wrote.

    Attributes
    ----------
    paths
        The files written (shuffled names; one file when multi-frame).
    mask
        Ground truth of the lesion, bool (slices, rows, columns) in sorted slice order.
    volume
        The exact voxel values written (after rounding), float32 (slices, rows, columns), sorted.
    geometry
        Voxel → LPS mapping of the sorted volume.
    """

    paths: list[Path]
    mask: np.ndarray
    volume: np.ndarray
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    geometry: Geometry


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v)
    return out


def _content(
    geometry: Geometry, modality: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy-like intensities and lesion mask, defined in patient (LPS) mm space."""
    k, y, x = geometry.shape
    kk, yy, xx = np.meshgrid(np.arange(k), np.arange(y), np.arange(x), indexing="ij")
    lps = geometry.voxel_to_lps(np.stack([xx, yy, kk], axis=-1).astype(np.float64))
    corners = np.array(
        [[cx, cy, ck] for cx in (0, x - 1) for cy in (0, y - 1) for ck in (0, k - 1)], dtype=np.float64
    )
    cl = geometry.voxel_to_lps(corners)
    centre = (cl.min(axis=0) + cl.max(axis=0)) / 2.0
    spacing = geometry.spacing
    # Half extents along L, P, S; a single slice still gets a slab of its own thickness.
    half = np.maximum((cl.max(axis=0) - cl.min(axis=0)) / 2.0, max(spacing) / 2.0)
    d = lps - centre
    ex, ey, ez = half
    col = 0 if modality == "CT" else 1
    out = np.full(lps.shape[:3], _BACKGROUND[col], dtype=np.float64)
    body = (d[..., 0] / (0.9 * ex)) ** 2 + (d[..., 1] / (0.75 * ey)) ** 2 <= 1.0
    out[body] = _SOFT_TISSUE[col]
    lung_r = np.array([0.3 * ex, 0.45 * ey, 0.9 * ez])
    right_lung_c = np.array([-0.4 * ex, -0.1 * ey, 0.0])
    for cx in (-0.4 * ex, 0.4 * ex):
        c = np.array([cx, -0.1 * ey, 0.0])
        lung = (((d - c) / lung_r) ** 2).sum(axis=-1) <= 1.0
        out[lung & body] = _LUNG[col]
    spine_r = 0.12 * min(ex, ey)
    spine = d[..., 0] ** 2 + (d[..., 1] - 0.55 * ey) ** 2 <= spine_r**2
    out[spine & body] = _SPINE[col]
    min_r = 1.1 * max(spacing)
    lesion_r = np.maximum(np.array([0.15 * ex, 0.18 * ey, 0.35 * ez]), min_r)
    mask = (((d - right_lung_c) / lesion_r) ** 2).sum(axis=-1) <= 1.0
    out[mask] = _LESION[col]
    sigma = 15.0 if modality == "CT" else 20.0
    out += rng.normal(0.0, sigma, size=out.shape)
    if modality != "CT":
        out = np.clip(out, 0.0, None)
    return np.rint(out), mask


def _base_dataset(
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    patient_name: str,
    patient_id: str,
    rows: int,
    cols: int,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
) -> Dataset:
    now = _dt.datetime(2024, 1, 2, 3, 4, 5)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "ainode phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic phantom"
    ds.SeriesDescription = f"Phantom {modality}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
    ds.PixelSpacing = [round(float(pixel_spacing[0]), 6), round(float(pixel_spacing[1]), 6)]
    ds.SliceThickness = round(float(slice_thickness), 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.ConvolutionKernel = "STANDARD"
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.ImagedNucleus = "1H"
        ds.PixelRepresentation = 0
        ds.WindowCenter = 500
        ds.WindowWidth = 1000
    return ds


def write_phantom_series(
    out_dir: Path,
    *,
    shape: tuple[int, int, int] = (40, 128, 128),
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-51.2, -51.2, -50.0),
    modality: str = "CT",
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    multiframe: bool = False,
    monochrome1: bool = False,
    shuffle_files: bool = True,
    descending_instance_numbers: bool = False,
    slice_step: Sequence[float] | None = None,
    patient_name: str = "Phantom^Test",
    patient_id: str = "PHANTOM001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
) -> Phantom:
    """Write a synthetic chest-like CT (HU) or MR series with one ellipsoidal lesion in the right lung.

    The anatomy (body ellipse, two lungs, spine, lesion) is defined in patient mm around the centre
    of the imaged volume, so any orientation (axial, sagittal, coronal, oblique) shows it sensibly.
    CT is written as signed int16 with RescaleIntercept -1024 / RescaleSlope 1; MR as unsigned
    16-bit without rescale. Files are valid CT/MR Image Storage instances (``dciodvfy``-clean).

    Parameters
    ----------
    out_dir
        Folder to write into (created if needed).
    shape
        (slices, rows, columns).
    spacing
        (column spacing, row spacing, slice spacing) in mm — note DICOM PixelSpacing is written as
        (row spacing, column spacing).
    orientation
        ImageOrientationPatient (row cosines then column cosines); normalised before use.
    origin
        ImagePositionPatient of the first slice (sorted order), LPS mm.
    modality
        ``"CT"`` or ``"MR"``.
    seed
        Seed of the noise generator and of the file-name shuffle.
    transfer_syntax
        Transfer syntax UID; compressed syntaxes use pydicom's encoders: RLE Lossless (pydicom's
        own), JPEG-LS Lossless/Near-lossless (pyjpegls), JPEG 2000 Lossless (pylibjpeg-openjpeg,
        which uses 6 wavelet levels and so needs rows and columns >= 32). pydicom has no JPEG
        baseline/lossless encoder; use dcmtk's ``dcmcjpeg`` on the written files for those.
    multiframe
        Write one Legacy Converted Enhanced CT/MR Image instance (via highdicom) instead of one file
        per slice.
    monochrome1
        Write MONOCHROME1: stored values are inverted so that the loader's MONOCHROME1 rule
        (value' = lo + hi − value, lo/hi the rescaled stored range) gives back :attr:`Phantom.volume`.
    shuffle_files
        Give files random names so that file order differs from slice order.
    descending_instance_numbers
        Number instances opposite to the slice order (to test that sorting ignores them).
    slice_step
        Vector (mm) between consecutive slices; default is the normal times the slice spacing. A
        vector with an in-plane component models a tilted gantry (sheared volume).
    patient_name, patient_id
        Patient module values.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        UIDs to use; new ones are generated when None.

    Returns
    -------
    Phantom
        Paths, ground-truth mask, written volume, UIDs and geometry.

    Raises
    ------
    ValueError
        For an unknown modality, a degenerate orientation or a transfer syntax without an encoder.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"Phantom modality must be 'CT' or 'MR', not {modality!r}.")
    iop = np.asarray(orientation, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    if (np.linalg.norm(row_cos) == 0 or np.linalg.norm(col_cos) == 0
            or abs(np.dot(_unit(row_cos), _unit(col_cos))) > 1e-6):
        raise ValueError(f"Orientation {list(iop)} is not two orthogonal non-zero vectors.")
    row_cos, col_cos = _unit(row_cos), _unit(col_cos)
    iop = np.concatenate([row_cos, col_cos])
    normal = np.cross(row_cos, col_cos)
    n_slices, rows, cols = (int(v) for v in shape)
    dc, dr, dz = (float(v) for v in spacing)
    step = normal * dz if slice_step is None else np.asarray(slice_step, dtype=np.float64)
    origin_v = np.asarray(origin, dtype=np.float64)
    geometry = Geometry.from_plane(origin_v, iop, (dr, dc), step, (n_slices, rows, cols))
    rng = np.random.default_rng(seed)
    volume, mask = _content(geometry, modality, rng)
    ts = UID(transfer_syntax)
    if ts in (JPEG2000Lossless, JPEG2000) and min(rows, cols) < 32:
        raise ValueError(f"JPEG 2000 phantoms need at least 32 rows and columns, not {rows}x{cols}.")

    written = write_volume_series(
        out_dir, volume, geometry, modality, seed=seed, transfer_syntax=ts, multiframe=multiframe,
        monochrome1=monochrome1, shuffle_files=shuffle_files,
        descending_instance_numbers=descending_instance_numbers, patient_name=patient_name,
        patient_id=patient_id, study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid, frame_of_reference_uid=frame_of_reference_uid,
        slice_thickness=dz,
    )
    paths, study_uid, series_uid, for_uid = (written.paths, written.study_instance_uid,
                                             written.series_instance_uid, written.frame_of_reference_uid)
    return Phantom(
        paths=paths,
        mask=mask,
        volume=volume.astype(np.float32),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        frame_of_reference_uid=for_uid,
        geometry=geometry,
    )


@dataclass(frozen=True)
class WrittenSeries:
    """Files and UIDs written by :func:`write_volume_series`."""

    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str


def write_volume_series(
    out_dir: Path,
    volume: np.ndarray,
    geometry: Geometry,
    modality: str,
    *,
    seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    multiframe: bool = False,
    monochrome1: bool = False,
    shuffle_files: bool = True,
    descending_instance_numbers: bool = False,
    patient_name: str = "Phantom^Test",
    patient_id: str = "PHANTOM001",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    slice_thickness: float | None = None,
) -> WrittenSeries:
    """Write a volume in modality units (HU for CT) as a CT or MR series laid out by ``geometry``.

    Used for the phantom and for real volumes (e.g. a NIfTI's voxels written as DICOM so that they
    go through the node's own DICOM input path). Slice ``k`` of ``volume`` (slices, rows, columns)
    is written at ``geometry.voxel_to_lps((0, 0, k))`` with the geometry's orientation and spacing.
    See :func:`write_phantom_series` for the parameters.

    Raises
    ------
    ValueError
        When ``volume`` does not have ``geometry.shape`` or the modality is not CT/MR.
    """
    if modality not in ("CT", "MR"):
        raise ValueError(f"Series modality must be 'CT' or 'MR', not {modality!r}.")
    if tuple(volume.shape) != tuple(geometry.shape):
        raise ValueError(f"volume shape {volume.shape} differs from the geometry's {geometry.shape}.")
    n_slices, rows, cols = (int(v) for v in geometry.shape)
    a = np.asarray(geometry.affine, dtype=np.float64)
    dc, dr = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    iop = np.concatenate([a[:3, 0] / dc, a[:3, 1] / dr])
    normal = np.cross(iop[:3], iop[3:])
    step, origin_v = a[:3, 2], a[:3, 3]
    dz = float(abs(np.dot(step, normal))) if slice_thickness is None else float(slice_thickness)
    ts = UID(transfer_syntax)
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if modality == "CT":
        intercept, slope = -1024.0, 1.0
        lo, hi = -32768, 32767
    else:
        intercept, slope = 0.0, 1.0
        lo, hi = 0, 65535
    if monochrome1:
        # Loader rule: value' = (slope*lo+intercept) + (slope*hi+intercept) − (slope*s+intercept).
        c = (slope * lo + intercept) + (slope * hi + intercept)
        stored_f = ((c - volume) - intercept) / slope
    else:
        stored_f = (volume - intercept) / slope
    dtype = np.int16 if modality == "CT" else np.uint16
    stored = np.clip(np.rint(stored_f), lo, hi).astype(dtype)

    datasets: list[Dataset] = []
    for k in range(n_slices):
        ds = _base_dataset(
            modality=modality, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid,
            patient_name=patient_name, patient_id=patient_id, rows=rows, cols=cols,
            orientation=iop, pixel_spacing=(dr, dc), slice_thickness=dz,
        )
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n_slices - k if descending_instance_numbers else k + 1
        pos = origin_v + k * step
        ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
        ds.SliceLocation = round(float(np.dot(pos, normal)), 6)
        if monochrome1:
            ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)

    if multiframe:
        datasets = [_to_multiframe(datasets, modality, ts)]

    names = [f"IM{i:05d}.dcm" for i in range(len(datasets))]
    if shuffle_files and len(names) > 1:
        perm = np.random.default_rng(seed + 1).permutation(len(names))
        # Guarantee file order differs from slice order.
        if np.all(perm == np.arange(len(names))):
            perm = perm[::-1]
        names = [f"IM{int(i):05d}_{generate_uid()[-6:]}.dcm" for i in perm]
    paths: list[Path] = []
    for ds, name in zip(datasets, names, strict=True):
        if not multiframe:
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            if ts != ExplicitVRLittleEndian:
                _compress(ds, ts)
        path = out_dir / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.info(
        "Wrote %s series %s: %d slices of %dx%d in %d file(s) to %s",
        modality, series_uid, n_slices, rows, cols, len(paths), out_dir,
    )
    return WrittenSeries(paths, study_uid, series_uid, for_uid)


def _compress(ds: Dataset, ts: UID) -> None:
    if not ts.is_compressed:
        ds.file_meta.TransferSyntaxUID = ts
        return
    try:
        ds.compress(ts, encoding_plugin="pydicom" if ts == RLELossless else "")
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise ValueError(f"Cannot write the phantom with transfer syntax {ts.name}: {exc}") from exc


def _to_multiframe(datasets: list[Dataset], modality: str, ts: UID) -> Dataset:
    import highdicom.legacy as hdl  # local: only needed for multi-frame phantoms

    cls = hdl.LegacyConvertedEnhancedCTImage if modality == "CT" else hdl.LegacyConvertedEnhancedMRImage
    for ds in datasets:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    mf = cls(
        legacy_datasets=datasets,
        series_instance_uid=datasets[0].SeriesInstanceUID,
        series_number=int(datasets[0].SeriesNumber),
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    out = pydicom.Dataset(mf)
    out.file_meta = mf.file_meta
    # The single-frame sources are never written, so the Common Instance Reference to them would
    # point nowhere (dciodvfy flags it); drop it.
    if "ReferencedSeriesSequence" in out:
        del out.ReferencedSeriesSequence
    if ts != ExplicitVRLittleEndian:
        _compress(out, ts)
    return out
