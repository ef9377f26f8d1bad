"""The synthetic phantom writer: valid IODs, sensible content, geometry as asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io.phantom import write_phantom_series
from dicomio_helpers import dciodvfy_errors, oblique_orientation, requires_dciodvfy


@pytest.mark.peers
@requires_dciodvfy
@pytest.mark.parametrize(
    ("modality", "multiframe", "mono1"),
    [("CT", False, False), ("MR", False, False), ("CT", True, False), ("MR", True, False), ("CT", False, True)],
)
def test_phantom_passes_dciodvfy(tmp_path: Path, modality: str, multiframe: bool, mono1: bool) -> None:
    ph = write_phantom_series(
        tmp_path, shape=(4, 16, 16), modality=modality, multiframe=multiframe, monochrome1=mono1,
        orientation=oblique_orientation(),
    )
    for path in ph.paths[:2]:
        assert dciodvfy_errors(path) == [], path.name


def test_phantom_content_and_attributes(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path, shape=(10, 48, 48), spacing=(0.9, 0.9, 3.0), seed=3)
    assert len(ph.paths) == 10
    assert ph.mask.shape == ph.volume.shape == (10, 48, 48)
    assert ph.mask.dtype == np.bool_ and 20 < ph.mask.sum() < ph.mask.size // 10
    # Lesion ≈ 60 HU inside a lung ≈ -800 HU; spine present; air outside.
    assert abs(float(ph.volume[ph.mask].mean()) - 60) < 10
    assert (ph.volume < -700).mean() > 0.05 and (ph.volume > 500).any()
    ds = pydicom.dcmread(ph.paths[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.PatientName == "Phantom^Test" and ds.PatientID == "PHANTOM001"
    assert ds.PixelRepresentation == 1 and ds.RescaleIntercept == -1024
    assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.9]
    assert ds.SeriesInstanceUID == ph.series_instance_uid
    # File names do not follow slice order.
    names = [p.name for p in ph.paths]
    assert names != sorted(names)


def test_phantom_mr_is_positive(tmp_path: Path) -> None:
    ph = write_phantom_series(tmp_path, shape=(6, 32, 32), modality="MR")
    assert ph.volume.min() >= 0 and ph.volume[ph.mask].mean() > 3 * ph.volume[~ph.mask].mean()
    assert pydicom.dcmread(ph.paths[0]).SOPClassUID == pydicom.uid.MRImageStorage


def test_phantom_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modality"):
        write_phantom_series(tmp_path, shape=(2, 8, 8), modality="US")
    with pytest.raises(ValueError, match="orthogonal"):
        write_phantom_series(tmp_path, shape=(2, 8, 8), orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(ValueError, match="JPEG 2000 phantoms need at least 32"):
        write_phantom_series(tmp_path, shape=(2, 16, 16), transfer_syntax=pydicom.uid.JPEG2000Lossless)
