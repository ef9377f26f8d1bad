"""Voxel ↔ patient geometry of loaded series, checked against each slice's own DICOM attributes and NIfTI."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.nifti import has_shear, read_nifti, write_nifti
from dicom_io.phantom import write_phantom_series
from dicom_io.series import load_series
from dicomio_helpers import AXIAL, CORONAL, SAGITTAL, oblique_orientation

CASES = {
    "oblique": oblique_orientation(20.0, 20.0),
    "sagittal": SAGITTAL,
    "coronal": CORONAL,
    "axial": AXIAL,
}
VOXELS = [(0, 0, 0), (39, 0, 0), (0, 47, 0), (0, 0, 9), (39, 47, 9), (17, 5, 3), (3, 31, 7)]


def _independent_lps(ds: pydicom.Dataset, x: int, y: int) -> np.ndarray:
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)  # DICOM order: between rows, between columns
    return ipp + x * col_spacing * iop[:3] + y * row_spacing * iop[3:]


@pytest.mark.parametrize("name", list(CASES))
def test_geometry_matches_dicom_and_nifti(tmp_path: Path, name: str) -> None:
    ph = write_phantom_series(
        tmp_path / "dcm", shape=(10, 48, 40), spacing=(0.7, 0.9, 3.0), orientation=CASES[name],
        origin=(12.0, -30.5, 41.0), seed=7, descending_instance_numbers=True,
    )
    s = load_series([tmp_path / "dcm"])
    assert s.voxels.shape == (10, 48, 40) and s.voxels.dtype == np.float32
    assert s.geometry.spacing == pytest.approx((0.7, 0.9, 3.0), abs=1e-5)
    np.testing.assert_array_equal(s.voxels, ph.volume)
    assert len(s.source_datasets) == 10 and all(f is None for _, f in s.frame_refs)
    assert [ds.SOPInstanceUID for ds in s.source_datasets] == [u for u, _ in s.frame_refs]

    nii = write_nifti(s.voxels, s.geometry, tmp_path / "img.nii.gz")
    img = nib.load(nii)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    sform, qform = img.get_sform(), img.get_qform()
    data = np.asanyarray(img.dataobj)
    assert data.shape == (40, 48, 10) and data.dtype == np.float32
    for x, y, k in VOXELS:
        ds = s.source_datasets[k]
        expected = _independent_lps(ds, x, y)
        np.testing.assert_allclose(s.geometry.voxel_to_lps((x, y, k)), expected, atol=1e-4)
        np.testing.assert_allclose(s.geometry.lps_to_voxel(expected), (x, y, k), atol=1e-5)
        ras = expected * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose((sform @ [x, y, k, 1])[:3], ras, atol=1e-3)
        np.testing.assert_allclose((qform @ [x, y, k, 1])[:3], ras, atol=1e-3)
        assert data[x, y, k] == s.voxels[k, y, x]
    # Slice order is along the normal, so instance numbers (written descending) come out reversed.
    numbers = [int(ds.InstanceNumber) for ds in s.source_datasets]
    assert numbers == sorted(numbers, reverse=True)


def test_sorting_ignores_instance_numbers_and_file_names(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path, shape=(8, 24, 24), spacing=(1.0, 1.0, 2.0), seed=1,
                              descending_instance_numbers=True, orientation=SAGITTAL)
    by_name = sorted(ph.paths, key=lambda p: p.name)
    s = load_series(by_name)
    np.testing.assert_array_equal(s.voxels, ph.volume)
    normal = np.cross(SAGITTAL[:3], SAGITTAL[3:])
    along = [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in s.source_datasets]
    assert along == sorted(along) and np.allclose(np.diff(along), 2.0)
    np.testing.assert_allclose(s.geometry.affine, ph.geometry.affine, atol=1e-5)


def test_tilted_gantry_shear(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    step = np.array([0.0, 0.8, 2.5])  # tilted gantry: positions move along P as well
    ph = write_phantom_series(tmp_path / "dcm", shape=(8, 32, 32), spacing=(1.0, 1.0, 2.5), slice_step=step)
    s = load_series([tmp_path / "dcm"])
    np.testing.assert_allclose(s.geometry.affine[:3, 2], step, atol=1e-5)
    np.testing.assert_allclose(s.geometry.affine, ph.geometry.affine, atol=1e-5)
    assert has_shear(s.geometry.affine)
    with caplog.at_level(logging.INFO, logger="dicom_io.nifti"):
        path = write_nifti(s.voxels, s.geometry, tmp_path / "sheared.nii.gz")
    assert "shear" in caplog.text
    img = nib.load(path)
    np.testing.assert_allclose(img.get_sform(), s.geometry.affine_ras, atol=1e-4)  # exact
    q = img.get_qform()
    assert not has_shear(q)
    np.testing.assert_allclose(q[:3, 3], s.geometry.affine_ras[:3, 3], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(q[:3, :3], axis=0), s.geometry.spacing, atol=1e-4)


def test_nifti_mask_dtype_and_roundtrip(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "dcm", shape=(6, 20, 24), spacing=(0.5, 0.6, 1.5),
                              orientation=oblique_orientation(10, 30))
    s = load_series([tmp_path / "dcm"])
    p = write_nifti(ph.mask, s.geometry, tmp_path / "mask.nii.gz")
    assert nib.load(p).get_data_dtype() == np.uint8
    arr, aff = read_nifti(p)
    np.testing.assert_array_equal(arr.astype(bool), ph.mask)
    np.testing.assert_allclose(aff, s.geometry.affine_ras, atol=1e-4)
    p16 = write_nifti(np.rint(s.voxels).astype(np.int32), s.geometry, tmp_path / "img16.nii.gz")
    arr16, _ = read_nifti(p16)
    assert arr16.dtype == np.int16
    np.testing.assert_array_equal(arr16, s.voxels)
    with pytest.raises(ValueError, match="does not match"):
        write_nifti(ph.mask[:2], s.geometry, tmp_path / "bad.nii.gz")
