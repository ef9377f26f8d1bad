"""Each kind of bad series input fails with a precise message naming the instance and the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io.errors import DicomInputError, SeriesError
from dicom_io.phantom import Phantom, write_phantom_series
from dicom_io.series import Series, load_series
from dicomio_helpers import SAGITTAL, edit, new_instance, sorted_paths


@pytest.fixture
def ph(tmp_path: Path) -> Phantom:
    return write_phantom_series(tmp_path / "s", shape=(8, 16, 16), spacing=(1.0, 1.0, 2.0), seed=5,
                                patient_name="Secret^Person", patient_id="SECRET-ID-123")


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _sr(path: Path, study_uid: str) -> Path:
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_gap_names_both_neighbours_and_distances(ph: Phantom) -> None:
    paths = sorted_paths(ph.paths)
    paths[4].unlink()
    with pytest.raises(SeriesError, match="Gap") as exc:
        load_series([ph.paths[0].parent])
    msg = str(exc.value)
    assert paths[3].name in msg and paths[5].name in msg and _sop(paths[3]) in msg
    assert "4.000 mm apart" in msg and "median slice step is 2.000 mm" in msg


def test_small_jitter_accepted(ph: Phantom) -> None:
    paths = sorted_paths(ph.paths)
    edit(paths[3], lambda ds: setattr(ds, "ImagePositionPatient",
                                      [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.1]))
    s = load_series(ph.paths)
    assert s.voxels.shape == (8, 16, 16)
    with pytest.raises(SeriesError, match="Gap"):
        load_series(ph.paths, spacing_tolerance=0.01)


def test_mixed_orientation_names_instance(ph: Phantom) -> None:
    bad = sorted_paths(ph.paths)[2]
    edit(bad, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.99, 0.141]))
    with pytest.raises(SeriesError, match="ImageOrientationPatient") as exc:
        load_series(ph.paths)
    assert bad.name in str(exc.value) and "not a localizer" in str(exc.value)


def test_localizer_excluded_with_warning(ph: Phantom, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def to_localizer(ds: Dataset) -> None:
        new_instance(ds)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = SAGITTAL
    loc = edit(ph.paths[0], to_localizer, dest=ph.paths[0].parent / "scout.dcm")
    with caplog.at_level(logging.WARNING, logger="dicom_io.series"):
        s = load_series([ph.paths[0].parent])
    np.testing.assert_array_equal(s.voxels, ph.volume)
    assert any("localizer" in w and loc.name in w for w in s.warnings)
    assert "localizer" in caplog.text


def test_duplicate_position(ph: Phantom) -> None:
    src = sorted_paths(ph.paths)[3]
    dup = edit(src, new_instance, dest=src.parent / "phase2.dcm")
    with pytest.raises(SeriesError, match="same position along the slice normal") as exc:
        load_series(ph.paths + [dup])
    assert {src.name, dup.name} <= set(str(exc.value).replace("(", " ").split())
    assert "8 distinct positions" in str(exc.value) and "9 images" in str(exc.value)


def test_two_series_need_a_choice(ph: Phantom, tmp_path: Path) -> None:
    other = write_phantom_series(tmp_path / "o", shape=(3, 16, 16), modality="MR",
                                 study_instance_uid=ph.study_instance_uid)
    with pytest.raises(SeriesError, match="2 image series") as exc:
        load_series([ph.paths[0].parent, other.paths[0].parent])
    msg = str(exc.value)
    assert f"{ph.series_instance_uid} (CT, 8 instance(s))" in msg
    assert f"{other.series_instance_uid} (MR, 3 instance(s))" in msg
    s = load_series([ph.paths[0].parent, other.paths[0].parent], series_uid=other.series_instance_uid)
    assert s.modality == "MR" and s.voxels.shape == (3, 16, 16)
    with pytest.raises(SeriesError, match="1.2.3.4 has no image instances"):
        load_series([ph.paths[0].parent], series_uid="1.2.3.4")


def test_mixed_frame_of_reference(ph: Phantom) -> None:
    bad = ph.paths[1]
    edit(bad, lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()))
    with pytest.raises(SeriesError, match="FrameOfReferenceUID") as exc:
        load_series(ph.paths)
    assert bad.name in str(exc.value) or ph.paths[0].name in str(exc.value)


def test_different_rows_columns(ph: Phantom) -> None:
    bad = ph.paths[2]

    def crop(ds: Dataset) -> None:
        arr = ds.pixel_array[:12, :16]
        ds.Rows = 12
        ds.PixelData = arr.tobytes()
    edit(bad, crop)
    with pytest.raises(SeriesError, match="image size") as exc:
        load_series(ph.paths)
    assert "12x16" in str(exc.value) and "16x16" in str(exc.value)


def test_different_pixel_spacing(ph: Phantom) -> None:
    edit(ph.paths[2], lambda ds: setattr(ds, "PixelSpacing", [1.2, 1.0]))
    with pytest.raises(SeriesError, match=f"{ph.paths[2].name}.*PixelSpacing"):
        load_series(ph.paths)


def test_colour_image(tmp_path: Path, ph: Phantom) -> None:
    def to_rgb(ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    rgb = edit(ph.paths[0], to_rgb, dest=tmp_path / "rgb.dcm")
    with pytest.raises(SeriesError, match=r"rgb\.dcm.*colour image \(SamplesPerPixel 3, RGB\)"):
        load_series([rgb])


def test_only_non_image_objects(tmp_path: Path, ph: Phantom) -> None:
    sr = _sr(tmp_path / "report.dcm", ph.study_instance_uid)
    with pytest.raises(SeriesError, match="only non-image objects: 1 × Comprehensive SR Storage"):
        load_series([sr])
    s = load_series([ph.paths[0].parent, sr])
    assert any("Comprehensive SR" in w for w in s.warnings)


def test_no_patient_identifiers_in_logs_or_messages(ph: Phantom, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        load_series([ph.paths[0].parent])
        sorted_paths(ph.paths)[4].unlink()
        with pytest.raises(SeriesError) as exc:
            load_series([ph.paths[0].parent])
    for secret in ("Secret", "SECRET-ID-123"):
        assert secret not in caplog.text and secret not in str(exc.value)


def test_from_datasets_and_empty(ph: Phantom) -> None:
    dss = [pydicom.dcmread(p) for p in ph.paths]
    s = Series.from_datasets(dss, names=[p.name for p in ph.paths], keep_pixel_data=True)
    np.testing.assert_array_equal(s.voxels, ph.volume)
    assert all("PixelData" in ds for ds in s.source_datasets)
    with pytest.raises(DicomInputError, match="No DICOM instances"):
        Series.from_datasets([])


def test_multiframe_without_functional_groups(tmp_path: Path, ph: Phantom) -> None:
    def to_mf(ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2
    mf = edit(ph.paths[0], to_mf, dest=tmp_path / "mf.dcm")
    with pytest.raises(SeriesError, match=r"mf\.dcm.*without Per-frame Functional Groups"):
        load_series([mf])
