"""Pixel handling: rescale per instance, MONOCHROME1, compressed transfer syntaxes, multi-frame, single slice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_io.errors import SeriesError
from dicom_io.phantom import Phantom, write_phantom_series
from dicom_io.series import load_series
from dicomio_helpers import edit, oblique_orientation, sorted_paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    return write_phantom_series(tmp_path_factory.mktemp("ref") / "s", shape=(8, 32, 36), seed=11,
                                orientation=oblique_orientation())


def _same_phantom(tmp_path: Path, **kwargs: object) -> Phantom:
    return write_phantom_series(tmp_path, shape=(8, 32, 36), seed=11, orientation=oblique_orientation(), **kwargs)  # type: ignore[arg-type]


def test_rescale_applied_per_instance(tmp_path: Path) -> None:
    ph = _same_phantom(tmp_path / "s")
    for i, path in enumerate(sorted_paths(ph.paths)):
        slope, intercept = (0.5, -2000.0) if i % 2 else (2.0, -1024.0 + i)

        def rescale(ds: Dataset, slope: float = slope, intercept: float = intercept) -> None:
            hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            stored = np.rint((hu - intercept) / slope)
            assert np.all(np.abs(stored * slope + intercept - hu) < 1.01)
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelData = stored.astype(np.int16).tobytes()
        edit(path, rescale)
    s = load_series(ph.paths)
    # Odd slope 2 slices round to within 1 HU; slope 0.5 slices are exact.
    np.testing.assert_allclose(s.voxels, ph.volume, atol=1.0)
    np.testing.assert_array_equal(s.voxels[1::2], ph.volume[1::2])


def test_monochrome1_phantom_matches_monochrome2(tmp_path: Path, reference: Phantom) -> None:
    ph = _same_phantom(tmp_path / "m1", monochrome1=True)
    assert pydicom.dcmread(ph.paths[0]).PhotometricInterpretation == "MONOCHROME1"
    s = load_series(ph.paths)
    np.testing.assert_array_equal(s.voxels, reference.volume)


def test_monochrome1_inversion_rule(tmp_path: Path, reference: Phantom) -> None:
    """12-bit unsigned, no rescale: value' = (0 + 4095) - stored, so bright stays bright."""
    paths = sorted_paths([Path(p) for p in reference.paths])
    out = tmp_path / "m1"
    out.mkdir()
    stored_all = []
    for i, path in enumerate(paths):
        def m1(ds: Dataset, i: int = i) -> None:
            stored = (np.arange(32 * 36).reshape(32, 36) * 8 + i).astype(np.uint16) % 4096
            stored_all.append(stored)
            ds.PhotometricInterpretation = "MONOCHROME1"
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
            ds.PixelData = stored.tobytes()
        edit(path, m1, dest=out / path.name)
    s = load_series([out])
    np.testing.assert_array_equal(s.voxels, 4095.0 - np.stack(stored_all).astype(np.float32))


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_transfer_syntaxes(tmp_path: Path, reference: Phantom, ts: pydicom.uid.UID) -> None:
    ph = _same_phantom(tmp_path / "c", transfer_syntax=ts)
    assert pydicom.dcmread(ph.paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    s = load_series(ph.paths)
    np.testing.assert_array_equal(s.voxels, reference.volume)
    np.testing.assert_allclose(s.geometry.affine, reference.geometry.affine, atol=1e-5)


@pytest.mark.peers
def test_jpeg_lossless_via_dcmtk(tmp_path: Path, reference: Phantom) -> None:
    """pydicom has no JPEG Lossless encoder; dcmtk's dcmcjpeg (+e1: process 14 SV1) writes it."""
    out = tmp_path / "jpeg"
    out.mkdir()
    for p in reference.paths:
        subprocess.run(["dcmcjpeg", "+e1", str(p), str(out / p.name)], check=True, capture_output=True, timeout=60)
    assert pydicom.dcmread(next(out.iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    s = load_series([out])
    np.testing.assert_array_equal(s.voxels, reference.volume)


def test_enhanced_ct_from_pydicom_data() -> None:
    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    s = load_series([path])
    ds = pydicom.dcmread(path)
    assert s.voxels.shape == (2, 512, 512) and s.modality == "CT"
    # Frame 1 is at z=-159, frame 2 at z=-149; the normal of IOP (-1,0,0,0,1,0) is -z, so frame 2 comes first.
    assert s.frame_refs == [(ds.SOPInstanceUID, 2), (ds.SOPInstanceUID, 1)]
    np.testing.assert_array_equal(s.voxels, ds.pixel_array[::-1].astype(np.float32) - 1024.0)
    np.testing.assert_allclose(s.geometry.voxel_to_lps((0, 0, 0)), (99.5, -301.5, -149.0))
    np.testing.assert_allclose(s.geometry.voxel_to_lps((1, 1, 1)), (99.5 - 0.388672, -301.5 + 0.388672, -159.0))
    assert s.geometry.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    assert len(s.source_datasets) == 1 and "PixelData" not in s.source_datasets[0]


@pytest.mark.parametrize("ts", [None, RLELossless], ids=["native", "rle"])
def test_legacy_converted_multiframe_equals_single_frame(tmp_path: Path, reference: Phantom,
                                                         ts: pydicom.uid.UID | None) -> None:
    kwargs = {"transfer_syntax": ts} if ts else {}
    ph = _same_phantom(tmp_path / "mf", multiframe=True, **kwargs)
    assert len(ph.paths) == 1
    s = load_series(ph.paths)
    single = load_series(reference.paths)
    np.testing.assert_array_equal(s.voxels, single.voxels)
    np.testing.assert_allclose(s.geometry.affine, single.geometry.affine, atol=1e-5)
    uid = pydicom.dcmread(ph.paths[0], stop_before_pixels=True).SOPInstanceUID
    assert [u for u, _ in s.frame_refs] == [uid] * 8
    assert sorted(f for _, f in s.frame_refs) == list(range(1, 9))  # type: ignore[type-var]


def test_single_slice_series(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path / "one", shape=(1, 32, 32), spacing=(0.8, 0.8, 5.0), origin=(-10, -10, 7.5))
    s = load_series(ph.paths)
    assert s.voxels.shape == (1, 32, 32)
    np.testing.assert_array_equal(s.voxels, ph.volume)
    np.testing.assert_allclose(s.geometry.affine[:3, 2], (0, 0, 5.0))  # normal × SliceThickness
    np.testing.assert_allclose(s.geometry.affine[:3, 3], (-10, -10, 7.5))
    assert ph.mask.any()


def test_highdicom_seg_accepts_sources_without_pixel_data(reference: Phantom, tmp_path: Path) -> None:
    """Series drops PixelData from its source datasets; highdicom 0.28 must still build a SEG from them."""
    ph = _same_phantom(tmp_path / "mf", multiframe=True)
    for s in (load_series(reference.paths), load_series(ph.paths)):
        assert all("PixelData" not in ds for ds in s.source_datasets)
        mask = np.zeros(s.voxels.shape, dtype=bool)
        mask[3, 5:10, 6:12] = True
        pixel_array = mask
        if s.frame_refs[0][1] is not None:  # multi-frame: frames in the instance's own frame order
            pixel_array = np.zeros_like(mask)
            for k, (_, frame) in enumerate(s.frame_refs):
                pixel_array[frame - 1] = mask[k]  # type: ignore[operator]
        seg = hd.seg.Segmentation(
            source_images=s.source_datasets, pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[hd.seg.SegmentDescription(
                segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
            series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0",
        )
        assert int(seg.NumberOfFrames) == 1
        assert seg.FrameOfReferenceUID == s.frame_of_reference_uid
    # A SEG (it has Rows and PixelData) next to its source series is ignored, not a second series.
    folder = tmp_path / "with_seg"
    folder.mkdir()
    for p in reference.paths:
        (folder / p.name).write_bytes(p.read_bytes())
    seg.save_as(folder / "seg.dcm")
    loaded = load_series([folder])
    np.testing.assert_array_equal(loaded.voxels, reference.volume)
    assert any("Segmentation Storage" in w for w in loaded.warnings)
    with pytest.raises(SeriesError, match="only non-image objects: 1 × Segmentation Storage"):
        load_series([folder / "seg.dcm"])
